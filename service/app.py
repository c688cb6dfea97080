"""The composition root: builds the database, keys and servicers, and runs the listeners.

Nothing imports this module but the command line. Start order: database (and
its migration check) → keys → listeners; stop order: listeners drain → pool
closes → embedded database stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from uuid import UUID

import grpc.aio
from appointments.internal.v1 import (
    audit_service_pb2_grpc,
    consent_service_pb2_grpc,
    partner_registry_service_pb2_grpc,
    scheduling_service_pb2_grpc,
)
from appointments.partner.v1 import partner_appointment_service_pb2_grpc

from service import audit_api, auth, consent_api, internal_api, partner_api, sealing
from service.consent import ConsentKeyring
from service.errors import ApptgateError, ConfigError
from service.extraction import ExtractionGuard
from service.feed import FeedHub
from service.keyfiles import load_data_keys, load_server_secret, load_signing_keys
from service.pagination import PageTokens
from service.partner_gate import SERVICE_NAME, PartnerGate
from service.pseudonyms import Pseudonyms, derive_key
from service.recorder import DisclosureRecorder
from service.reflection import DocumentedPool, documented_files
from service.server import ErrorBoundary, Listener, start_listener
from service.settings import Settings, is_loopback
from service.store import ledger, sealed_columns
from service.store.database import Database, partner_login_dsn
from service.store.embedded import EmbeddedPostgres
from service.telemetry import Telemetry
from service.views import BasicPages
from service.watch_api import AppointmentFeed

log = logging.getLogger(__name__)

PARTNER_PREFIX = "/appointments.partner."
HEALTH_INTERVAL = 1.0  # seconds between database checks behind grpc.health.v1
LEDGER_CHAIN_INTERVAL = 0.1  # seconds between sequencer passes when it has caught up
INTERNAL_PREFIX = "/appointments.internal."


@dataclass(frozen=True, slots=True)
class Secrets:
    """Key material: the server secret (pseudonyms, page tokens, ledger seals), the consent keyring, and
    the data keyring (contact details and visit reasons encrypted at rest)."""

    server_secret: bytes
    keyring: ConsentKeyring
    data_keys: sealing.DataKeyring


def load_secrets(settings: Settings) -> Secrets:
    """Load (or, in development, create) the secrets. Raises ``ConfigError``."""
    return Secrets(load_server_secret(settings), load_signing_keys(settings), load_data_keys(settings))


def check_transport_security(settings: Settings) -> None:
    """Refuse plaintext on a non-loopback address unless ``--allow-insecure`` was given."""
    problems = []
    if settings.tls is None and not settings.allow_insecure and not is_loopback(settings.partner_addr):
        problems.append(
            f"the partner listener {settings.partner_addr} is not on loopback and has no TLS: set "
            "APPTGATE_TLS_CERT/APPTGATE_TLS_KEY, bind a loopback address, or pass --allow-insecure"
        )
    if not settings.allow_insecure and not is_loopback(settings.internal_addr):
        problems.append(
            f"the internal listener {settings.internal_addr} is not on loopback; it has no TLS of its own, "
            "so put it behind a TLS proxy and pass --allow-insecure"
        )
    if not settings.internal_token:
        problems.append("APPTGATE_INTERNAL_TOKEN is required (at least 32 characters)")
    if problems:
        raise ConfigError(problems)


class Gateway:
    """The running service: the partner and internal listeners over one database pool."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        secrets: Secrets,
        *,
        telemetry: Telemetry | None = None,
    ):
        if not settings.internal_token:
            raise ConfigError(["APPTGATE_INTERNAL_TOKEN is required"])
        self.settings = settings
        self.database = database
        self._limits = settings.limits
        self._pseudonyms = Pseudonyms(secrets.server_secret)
        self._page_tokens = PageTokens(derive_key(secrets.server_secret, b"page-token"))
        self._keyring = secrets.keyring
        self._data_keys = secrets.data_keys
        self.telemetry = telemetry or Telemetry()
        self._guard = ExtractionGuard(settings, self.telemetry)
        self.feed = FeedHub(
            database,
            buffer=settings.feed_buffer,
            max_streams_per_partner=settings.feed_max_streams,
            retention=settings.feed_retention,
        )
        self._internal_token = auth.InternalToken(settings.internal_token)
        self._reflection = DocumentedPool(documented_files())
        self._health_task: asyncio.Task[None] | None = None
        self._sequencer_task: asyncio.Task[None] | None = None
        self.partner: Listener | None = None
        self.internal: Listener | None = None

    def partner_appointment_id(self, partner_id: UUID, appointment_id: UUID) -> str:
        """The id a partner knows an appointment by (for the demo's walk-through)."""
        return self._pseudonyms.for_partner(partner_id).appointment_id(appointment_id)

    def _register_partner(self, server: grpc.aio.Server) -> list[str]:
        gate = PartnerGate(self.database, self._guard, self.telemetry)
        feed = AppointmentFeed(self.database, gate, self._pseudonyms, self._page_tokens, self.feed, self.telemetry)
        api = partner_api.PartnerAppointmentApi(
            self.database,
            gate,
            self._pseudonyms,
            self._page_tokens,
            self._keyring,
            self.telemetry,
            self._data_keys,
            feed,
            DisclosureRecorder(self.database, budget=self._limits.default_deadline),
            BasicPages(self.settings.view_memo),
        )
        partner_appointment_service_pb2_grpc.add_PartnerAppointmentServiceServicer_to_server(api, server)
        return [SERVICE_NAME]

    def _register_internal(self, server: grpc.aio.Server) -> list[str]:
        scheduling_service_pb2_grpc.add_SchedulingServiceServicer_to_server(
            internal_api.SchedulingApi(self.database, self._data_keys), server
        )
        partner_registry_service_pb2_grpc.add_PartnerRegistryServiceServicer_to_server(
            internal_api.PartnerRegistryApi(self.database, self._guard), server
        )
        consent_service_pb2_grpc.add_ConsentServiceServicer_to_server(
            consent_api.ConsentApi(self.database, self._keyring, self.settings.consent_max_ttl), server
        )
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(
            audit_api.AuditApi(self.database, self._page_tokens), server
        )
        return [
            internal_api.SCHEDULING_SERVICE,
            internal_api.REGISTRY_SERVICE,
            consent_api.SERVICE_NAME,
            audit_api.SERVICE_NAME,
        ]

    async def start(self) -> None:
        """Start the change-feed listener, then bind and start both listeners."""
        await self.feed.start()
        self.partner = await start_listener(
            "partner",
            self.settings.partner_addr,
            register=self._register_partner,
            boundary=ErrorBoundary(
                PARTNER_PREFIX, self.telemetry, listener="partner", default_deadline=self._limits.default_deadline
            ),
            limits=self._limits,
            tls=self.settings.tls,
            reuse_port=self.settings.reuse_port,
            reflection_pool=self._reflection,
        )
        try:
            self.internal = await start_listener(
                "internal",
                self.settings.internal_addr,
                register=self._register_internal,
                boundary=ErrorBoundary(
                    INTERNAL_PREFIX,
                    self.telemetry,
                    listener="internal",
                    default_deadline=self._limits.default_deadline,
                    guard=self._internal_token.verify,
                ),
                limits=self._limits,
                reuse_port=self.settings.reuse_port,
                reflection_pool=self._reflection,
            )
        except BaseException:
            await self.partner.stop(0)
            await self.feed.stop()
            raise
        self._health_task = asyncio.create_task(self._watch_database(), name="apptgate-health")
        self._sequencer_task = asyncio.create_task(self._chain_ledger(), name="apptgate-ledger-sequencer")

    async def _chain_ledger(self) -> None:
        """Hash-chain committed disclosure records, off the request path (one process at a time does it).

        A pass is one statement in a transaction of its own: one round trip, where a
        transaction block took five (BEGIN, its timeout, the pass, COMMIT, the pool's reset).
        """
        while True:
            try:
                async with self.database.statements(self._limits.default_deadline) as conn:
                    chained = await ledger.chain(conn)
            except ApptgateError:
                chained = 0  # the database is away: the health task reports it; records wait, durable
            await asyncio.sleep(0 if chained >= ledger.CHAIN_BATCH else LEDGER_CHAIN_INTERVAL)

    async def _watch_database(self) -> None:
        """Turn health NOT_SERVING while the database does not answer, and SERVING again when it does."""
        serving = True
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            now_serving = await self.database.ping(within=HEALTH_INTERVAL)
            if now_serving != serving:
                serving = now_serving
                log.warning("database %s: health is now %s", "back" if serving else "unreachable",
                            "SERVING" if serving else "NOT_SERVING")  # fmt: skip
                for listener in (self.partner, self.internal):
                    if listener is not None:
                        await listener.set_serving(serving)

    async def stop(self, grace: float) -> None:
        """Drain both listeners: refuse new calls, let in-flight ones finish for ``grace`` seconds."""
        listeners = [listener for listener in (self.partner, self.internal) if listener is not None]
        for task in (self._health_task, self._sequencer_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.feed.stop()  # streams end first (UNAVAILABLE: resume elsewhere), unary calls drain
        await asyncio.gather(*(listener.stop(grace) for listener in listeners))


async def open_database(settings: Settings, stack: AsyncExitStack, telemetry: Telemetry | None = None) -> Database:
    """Connect to ``DATABASE_URL``, or start the embedded PostgreSQL when it is unset."""
    dsn = settings.database_url
    if dsn is None:
        if settings.production:
            raise ConfigError(["DATABASE_URL is required in production"])
        embedded = EmbeddedPostgres(settings.data_dir / "pgdata")
        dsn = await asyncio.to_thread(embedded.start)
        stack.callback(embedded.stop)
    database = await Database.connect(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        connect_timeout=settings.db_connect_timeout,
        statement_timeout=settings.limits.default_deadline,
        partner_dsn=settings.partner_database_url or partner_login_dsn(dsn),
        require_partner_login=settings.production or settings.partner_database_url is not None,
        on_query=telemetry.observe_query if telemetry is not None and telemetry.tracing else None,
    )
    stack.push_async_callback(database.close)
    if telemetry is not None:
        telemetry.observe_pool(database.pool_usage)
    return database


async def warn_about_unsealed_values(database: Database, data_keys: sealing.DataKeyring) -> None:
    """Log a warning when values are left in clear or sealed under a key other than the active one.

    A few index probes (migration 0009), cheap enough for every start;
    ``python -m service data-key status`` counts every value.
    """
    async with database.transaction(readonly=True) as conn:
        headers, clear = await sealed_columns.headers_in_use(conn)
    for problem in sealing.usage_problems(data_keys, headers, clear):
        log.warning("%s: run `python -m service data-key reencrypt` (`data-key status` shows the counts)", problem)


async def serve(
    settings: Settings,
    *,
    prepare: Callable[[Database, Secrets], Awaitable[None]] | None = None,
    on_ready: Callable[[Gateway], Awaitable[None]] | None = None,
) -> None:
    """Run the gateway until SIGTERM or SIGINT, then drain and return.

    ``prepare`` runs on the open database before the migration check (the demo
    migrates and seeds there); ``on_ready`` runs once both listeners serve.
    """
    check_transport_security(settings)
    # Handle a stop request from the first moment: one that arrives while
    # starting stops the service as soon as it is up, instead of killing it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    secrets = load_secrets(settings)
    telemetry = Telemetry.from_settings(settings)
    async with AsyncExitStack() as stack:
        stack.callback(telemetry.shutdown)
        database = await open_database(settings, stack, telemetry)
        if prepare is not None:
            await prepare(database, secrets)
        await database.ensure_migrated()
        await warn_about_unsealed_values(database, secrets.data_keys)
        gateway = Gateway(settings, database, secrets, telemetry=telemetry)
        await gateway.start()
        assert gateway.partner and gateway.internal
        # What starting allocated (modules, descriptors, pools) lives as long as the process: out of
        # the collector's sight, a full collection walks only what calls allocate. Measured under
        # ListAppointments load: full collections 0.39 s → 0.01 s per ~20k calls (docs/performance.md).
        gc.freeze()
        log.info(
            "serving: partner on %s (port %d), internal on %s (port %d)",
            settings.partner_addr,
            gateway.partner.port,
            settings.internal_addr,
            gateway.internal.port,
        )
        if on_ready is not None:
            await on_ready(gateway)
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.0f s", settings.shutdown_grace)
        await gateway.stop(settings.shutdown_grace)
        log.info("stopped")
