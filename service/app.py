"""The composition root: builds the database, keys and components, wires them, and runs the listeners.

Nothing in ``service/`` imports this module but the command line; it is the
one place that knows every component. Start order: database (and its
migration check) → keys → components → change-feed listener → listeners;
stop order: listeners refuse new calls → streams end → in-flight calls finish →
change-feed listener → pool closes → embedded database stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import grpc.aio
from appointments.internal.v1 import (
    audit_service_pb2_grpc,
    consent_service_pb2_grpc,
    partner_registry_service_pb2_grpc,
    scheduling_service_pb2_grpc,
)
from appointments.partner.v1 import partner_appointment_service_pb2_grpc

from service import sweeps
from service.access import credentials
from service.access.consent_tokens import ConsentKeyring
from service.access.gate import PartnerGate
from service.access.limits import ExtractionGuard
from service.access.request_rate import FleetRate
from service.api import audit, consents, partner, registry, scheduling
from service.api.reflection import documented_files
from service.api.server import BindError, ErrorBoundary, Listener, start_listener
from service.crypto import sealing
from service.crypto.keyfiles import load_data_keys, load_server_secret, load_signing_keys, private_data_dir
from service.disclosure.consent_requests import ConsentRequests
from service.disclosure.pagination import PageTokens
from service.disclosure.pseudonyms import Pseudonyms, derive_key
from service.disclosure.reads import PartnerReads
from service.disclosure.record import DisclosureRecorder
from service.disclosure.views import BasicPages
from service.errors import ApptgateError, ConfigError
from service.feed.consent_requests import ConsentRequestWatches
from service.feed.delivery import Deliveries
from service.feed.hub import FeedHub
from service.feed.privacy import PrivacyWatches
from service.feed.watch import Watches
from service.inflight import CallsInFlight
from service.settings import Settings, serving_problems, split_address
from service.store import chain, request_leases, sealed_columns
from service.store import consent_requests as consent_requests_store
from service.store import data_keys as key_checks
from service.store import privacy as privacy_store
from service.store import replicas as replicas_store
from service.store.database import Database, partner_login_dsn
from service.store.embedded import EmbeddedPostgres
from service.store.replicas import Replicas
from service.telemetry.tracing import Telemetry

log = logging.getLogger(__name__)

PARTNER_PREFIX = "/appointments.partner."
INTERNAL_PREFIX = "/appointments.internal."
#: Seconds between database checks behind grpc.health.v1.
HEALTH_INTERVAL = 1.0
#: The health service name of read replica N on the internal listener: ``apptgate.replica.N``.
REPLICA_HEALTH_PREFIX = "apptgate.replica."
#: Seconds between sequencer passes once it has caught up (a record waits about that long to be chained).
LEDGER_CHAIN_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class Secrets:
    """Key material: the server secret (pseudonyms, page tokens, ledger seals), the consent keyring, and
    the data keyring (contact details and visit reasons encrypted at rest)."""

    server_secret: bytes
    keyring: ConsentKeyring
    data_keys: sealing.DataKeyring


def load_secrets(settings: Settings) -> Secrets:
    """Load (or, in development, create) the secrets. Raises ``ConfigError`` listing the problems of all three.

    Each key file passes the checks of :func:`service.settings.read_private_file`
    (no symbolic link, owned by this user or root, written by no one else); the
    internal token and the database passwords are read with the settings
    (:func:`service.settings.load`). Whether the data keys are the ones the
    database's values were sealed with is checked once the database is open
    (:func:`verify_data_keys`).
    """
    problems: list[str] = []
    loaded: list[Any] = []
    for load in (load_server_secret, load_signing_keys, load_data_keys):
        try:
            loaded.append(load(settings))
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)  # a bad data directory, once
    if problems:
        raise ConfigError(problems)
    return Secrets(*loaded)


@dataclass(frozen=True, slots=True)
class Parts:
    """The components of the partner path that hold state or keys, built by :meth:`build`.

    The seam for measuring a variant of the gateway: ``serve(customize=…)``
    gets them built, with the database and secrets, and returns them with one replaced
    (:func:`dataclasses.replace`): a recorder that answers at once, memos of
    size 0, a data keyring that opens nothing (``bench/whatif.py``).
    """

    pseudonyms: Pseudonyms
    page_tokens: PageTokens
    pages: BasicPages
    recorder: DisclosureRecorder
    data_keys: sealing.DataKeyring
    #: The partner listener's calls in their handlers, counted by its error boundary, read by the recorder.
    in_flight: CallsInFlight

    @classmethod
    def build(cls, settings: Settings, database: Database, secrets: Secrets) -> Parts:
        """The parts as ``settings`` configure them."""
        in_flight = CallsInFlight()
        return cls(
            Pseudonyms(secrets.server_secret),
            PageTokens(derive_key(secrets.server_secret, b"page-token")),
            BasicPages(settings.view_memo),
            DisclosureRecorder(database, budget=settings.limits.default_deadline, in_flight=in_flight),
            secrets.data_keys,
            in_flight,
        )


def check_transport_security(settings: Settings) -> None:
    """Refuse what keeps ``settings`` from serving (:func:`service.settings.serving_problems`), all at once.

    The command line finds the same problems as it loads the settings
    (``checks=``); this guard holds for whoever builds settings otherwise.
    """
    problems = serving_problems(settings)
    if problems:
        raise ConfigError(problems)


def listened_on(address: str) -> bool:
    """True when some process listens on ``address`` now (a worker could bind beside it with ``SO_REUSEPORT``).

    A probe without ``SO_REUSEPORT`` cannot bind a port that any socket listens
    on; ``SO_REUSEADDR`` lets it past connections of an earlier server still
    closing (TIME_WAIT), which are no listener.
    """
    host, port = split_address(address)
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the bind reports an address that does not resolve
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def check_ports_free(settings: Settings) -> None:
    """Raise :class:`BindError` when another process listens on a listener's fixed port.

    Checked before anything starts, so that a second server (a second ``make
    run``) stops in one line, having opened and issued nothing; the bind
    itself still reports a port taken in between. Workers sharing ports
    (``APPTGATE_REUSE_PORT``) are checked by their supervisor instead.
    """
    if settings.reuse_port:
        return
    for variable, address in (
        ("APPTGATE_PARTNER_ADDR", settings.partner_addr),
        ("APPTGATE_INTERNAL_ADDR", settings.internal_addr),
    ):
        if split_address(address)[1] != 0 and listened_on(address):
            raise BindError(
                f"{variable}: {address} is in use by another process (another apptgate, or `make run` "
                "still running?); stop it or choose another address"
            )


class Gateway:
    """The running service: the partner and internal listeners over one database pool."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        secrets: Secrets,
        *,
        telemetry: Telemetry | None = None,
        parts: Parts | None = None,
        replicas: Replicas | None = None,
    ):
        if not settings.internal_token:
            raise ConfigError(["APPTGATE_INTERNAL_TOKEN is required"])
        self.settings = settings
        self.database = database
        self.telemetry = telemetry or Telemetry()
        self._parts = parts or Parts.build(settings, database, secrets)
        self._keyring = secrets.keyring
        self._guard = ExtractionGuard(settings, self.telemetry)
        self.feed = FeedHub(
            database,
            buffer=settings.feed_buffer,
            max_streams_per_partner=settings.feed_max_streams,
            retention=settings.feed_retention,
        )
        parts = self._parts
        self._gate = PartnerGate(
            database,
            self._guard,
            FleetRate(request_leases.source(database, settings.limits.default_deadline)),
        )
        # Built from the settings unless given (a test watches which statements run on its replica).
        self.replicas = (
            replicas
            if replicas is not None
            else Replicas(
                settings.read_replica_urls,
                max_lag=settings.replica_max_lag,
                max_size=settings.db_pool_max,
                connect_timeout=settings.db_connect_timeout,
                statement_timeout=settings.limits.default_deadline,
                on_query=self.telemetry.observe_query if self.telemetry.tracing else None,
            )
        )
        self._reads = PartnerReads(
            database,
            self._gate,
            parts.recorder,
            parts.pseudonyms,
            parts.page_tokens,
            parts.pages,
            self._keyring,
            parts.data_keys,
            self.telemetry,
            self.replicas if len(self.replicas) else None,
            budget=settings.limits.default_deadline,
        )
        self._consent_requests = ConsentRequests(
            database,
            self._gate,
            self._reads,
            parts.pseudonyms,
            self._keyring,
            parts.data_keys,
            lapse=settings.consent_request_ttl,
            daily_cap=settings.consent_request_daily_cap,
        )
        self._internal_token = credentials.InternalToken(settings.internal_token)
        self._documented = documented_files()
        self._health_task: asyncio.Task[None] | None = None
        self._sequencer_task: asyncio.Task[None] | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._announcement_task: asyncio.Task[None] | None = None
        self._replica_task: asyncio.Task[None] | None = None
        self.partner: Listener | None = None
        self.internal: Listener | None = None

    @property
    def calls_in_flight(self) -> int:
        """The partner listener's unary calls in their handlers now."""
        return self._parts.in_flight.count

    def partner_appointment_id(self, partner_id: UUID, appointment_id: UUID) -> str:
        """The id a partner knows an appointment by (for the demo's walk-through)."""
        return self._parts.pseudonyms.for_partner(partner_id).appointment_id(appointment_id)

    def _register_partner(self, server: grpc.aio.Server) -> list[str]:
        parts, database, gate = self._parts, self.database, self._gate
        deliveries = Deliveries(database, gate, parts.pseudonyms, parts.page_tokens)
        watches = Watches(
            database,
            gate,
            self.feed,
            deliveries,
            parts.page_tokens,
            self.telemetry,
            bookmark_interval=self.settings.watch_bookmark_interval,
            replicas=self.replicas if len(self.replicas) else None,
        )
        request_watches = ConsentRequestWatches(
            database, gate, self.feed, self._consent_requests, parts.page_tokens, self.telemetry
        )
        partner_appointment_service_pb2_grpc.add_PartnerAppointmentServiceServicer_to_server(
            partner.PartnerAppointmentApi(
                gate,
                self._reads,
                watches,
                self._keyring,
                self._consent_requests,
                request_watches,
                self.settings.consent_max_ttl,
            ),
            server,
        )
        return [partner.SERVICE_NAME]

    def _register_internal(self, server: grpc.aio.Server) -> list[str]:
        data_keys = self._parts.data_keys
        scheduling_service_pb2_grpc.add_SchedulingServiceServicer_to_server(
            scheduling.SchedulingApi(self.database, data_keys), server
        )
        partner_registry_service_pb2_grpc.add_PartnerRegistryServiceServicer_to_server(
            registry.PartnerRegistryApi(self.database, self._guard, self._parts.page_tokens), server
        )
        consent_service_pb2_grpc.add_ConsentServiceServicer_to_server(
            consents.ConsentApi(
                self.database,
                self._keyring,
                self._parts.pseudonyms,
                self.settings.consent_max_ttl,
                self._consent_requests,
                self._parts.page_tokens,
            ),
            server,
        )
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(
            audit.AuditApi(
                self.database,
                self._parts.page_tokens,
                PrivacyWatches(self.database, self.feed, self._parts.page_tokens),
            ),
            server,
        )
        return [scheduling.SERVICE_NAME, registry.SERVICE_NAME, consents.SERVICE_NAME, audit.SERVICE_NAME]

    async def start(self) -> None:
        """Start the change-feed listener, then bind and start both listeners."""
        limits = self.settings.limits
        await self.feed.start()
        self.partner = await start_listener(
            "partner",
            self.settings.partner_addr,
            register=self._register_partner,
            boundary=ErrorBoundary(
                PARTNER_PREFIX,
                self.telemetry,
                listener="partner",
                default_deadline=limits.default_deadline,
                in_flight=self._parts.in_flight,
            ),
            limits=limits,
            tls=self.settings.tls,
            reuse_port=self.settings.reuse_port,
            documented=self._documented,
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
                    default_deadline=limits.default_deadline,
                    guard=self._internal_token.verify,
                ),
                limits=limits,
                reuse_port=self.settings.reuse_port,
                documented=self._documented,
            )
        except BaseException:
            await self.partner.stop(0)
            await self.feed.stop()
            raise
        self._health_task = asyncio.create_task(self._watch_database(), name="apptgate-health")
        if len(self.replicas):
            self.telemetry.observe_replicas(lambda: self.replicas.states)
            self._replica_task = asyncio.create_task(self._watch_replicas(), name="apptgate-replicas")
        self._sequencer_task = asyncio.create_task(self._chain_ledger(), name="apptgate-ledger-sequencer")
        # Woken by the notifications that bring a new due time: a request made, a consent granted.
        self._expiry_task = asyncio.create_task(
            sweeps.run(
                self.database,
                self.feed.consent_request_activity,
                consent_requests_store.expire_lapsed,
                consent_requests_store.seconds_to_next_lapse,
                what="consent requests expired",
            ),
            name="apptgate-consent-request-expiry",
        )
        self._announcement_task = asyncio.create_task(
            sweeps.run(
                self.database,
                self.feed.privacy_activity,
                privacy_store.announce_expired_consents,
                privacy_store.seconds_to_next_consent_expiry,
                what="consent expiries announced",
            ),
            name="apptgate-consent-expiry",
        )

    async def _chain_ledger(self) -> None:
        """Hash-chain committed disclosure records, off the request path (one process at a time does it).

        A pass is one statement in a transaction of its own: one round trip,
        where a transaction block would take several.
        """
        while True:
            try:
                async with self.database.statements(self.settings.limits.default_deadline) as conn:
                    chained = await chain.chain(conn)
            except ApptgateError:
                chained = 0  # the database is away: the health task reports it; records wait, durable
            await asyncio.sleep(0 if chained >= chain.CHAIN_BATCH else LEDGER_CHAIN_INTERVAL)

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

    async def _watch_replicas(self) -> None:
        """Measure the read replicas' lag every second; each one's health on the internal listener follows it."""
        shown: dict[int, bool] = {}
        while True:
            for state in await self.replicas.measure_all():
                if shown.get(state.index) is not state.usable and self.internal is not None:
                    await self.internal.set_component(f"{REPLICA_HEALTH_PREFIX}{state.index}", state.usable)
                    shown[state.index] = state.usable
            await asyncio.sleep(replicas_store.WATCH_INTERVAL)

    async def stop(self, grace: float) -> None:
        """Drain both listeners: refuse new calls, end the streams, let in-flight calls finish for ``grace`` seconds.

        Streams end with UNAVAILABLE (``SERVER_SHUTTING_DOWN``, a short
        RetryInfo delay) once the listeners refuse new calls, so a client that
        resumes at once reaches another process, never this one.
        """
        listeners = [listener for listener in (self.partner, self.internal) if listener is not None]
        tasks = (
            self._health_task,
            self._sequencer_task,
            self._expiry_task,
            self._announcement_task,
            self._replica_task,
        )
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        stopping = [await listener.begin_stop(grace) for listener in listeners]
        self.feed.drain()  # the hub refuses new streams too: a call accepted just before is told to resume elsewhere
        await asyncio.gather(*stopping)
        await self.feed.stop()
        await self.replicas.close()


def embedded_database(settings: Settings, *, create: bool) -> EmbeddedPostgres:
    """The embedded PostgreSQL of ``settings``' data directory (no ``DATABASE_URL``), not started.

    Only ``create`` (``migrate`` and ``demo``) may make a new one: any other
    command run from the wrong directory would otherwise start an empty
    database there and then find it not migrated. Raises
    :class:`MissingDatabase` saying where it looked and what to set, and
    :class:`ConfigError` in production, which takes no embedded database.
    """
    if settings.production:
        raise ConfigError(["DATABASE_URL: required in production (the embedded PostgreSQL is for development)"])
    if not create:
        EmbeddedPostgres(settings.data_dir / "pgdata").require()  # before the data directory is made
    return EmbeddedPostgres(private_data_dir(settings) / "pgdata")


async def open_database(
    settings: Settings, stack: AsyncExitStack, telemetry: Telemetry | None = None, *, create: bool = False
) -> Database:
    """Connect to ``DATABASE_URL``, or start the embedded PostgreSQL when it is unset.

    Without ``DATABASE_URL``, only ``create`` makes a new embedded database
    (:func:`embedded_database`); raises :class:`MissingDatabase` otherwise.
    """
    dsn = settings.database_url  # with the password of APPTGATE_DATABASE_PASSWORD_FILE, when set
    if dsn is None:
        embedded = embedded_database(settings, create=create)
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


async def verify_data_keys(database: Database, keys: sealing.DataKeyring, *, record: bool = True) -> None:
    """Refuse a data key that is not the key its id sealed with; with ``record``, record the new ids' check values.

    Each id of the ring with a recorded check value must match it: one query,
    whatever the data. An id with none yet is first tried on one stored row
    sealed under it per table (an index probe each), so that even a key never
    recorded is refused when it opens none of that row's values; then its
    check value is recorded (first use). Raises :class:`ConfigError`, one line
    per key, naming the id and what to do; never key text.
    """
    async with database.transaction(readonly=not record) as conn:
        known = await key_checks.recorded(conn, keys.key_ids)
        problems = [_wrong_key(k) for k, check in known.items() if check != keys.check_value(k)]
        new = [key_id for key_id in keys.key_ids if key_id not in known]
        for key_id in new:
            for table in sealing.SEALED_COLUMNS:
                row = await sealed_columns.row_sealed_under(conn, table, sealing.header(key_id))
                if row is None:
                    continue
                failed = sealing.columns_not_opening(keys, table, row.id, row.sealed, key_id)
                tried = [c for c, v in row.sealed.items() if v is not None and v.startswith(sealing.header(key_id))]
                # A wrong key opens none of them; a key that opens some is the right one, and the values it
                # does not open were altered (`data-key status` reports them).
                if failed and len(failed) == len(tried):
                    problems.append(
                        f"data key {key_id} opens none of the values sealed under id {key_id} that it was tried on "
                        f"({table} {row.id}: {', '.join(failed)}): configure the key that sealed them under id {key_id}"
                    )
                    break
        if not problems and record and new:
            now = await key_checks.record(conn, {key_id: keys.check_value(key_id) for key_id in new})
            problems = [_wrong_key(k) for k in new if now[k] != keys.check_value(k)]
        if problems:
            raise ConfigError(problems)


def _wrong_key(key_id: int) -> str:
    return (
        f"data key {key_id} is not the key this database recorded under id {key_id} (their check values differ): "
        f"configure the original key {key_id}; a new key takes a new id"
    )


async def warn_about_unsealed_values(database: Database, data_keys: sealing.DataKeyring) -> None:
    """Log a warning when values are left in clear or sealed under a key other than the active one.

    A few index probes, cheap enough for every start; ``python -m service
    data-key status`` counts every value.
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
    customize: Callable[[Parts, Database, Secrets], Parts] | None = None,
    create_database: bool = False,
) -> None:
    """Run the gateway until SIGTERM or SIGINT, then drain and return.

    ``prepare`` runs on the open database before the migration check (the demo
    migrates and seeds there); ``on_ready`` runs once both listeners serve;
    ``customize`` replaces built :class:`Parts` (for measuring a variant);
    ``create_database`` lets a new embedded database be made (the demo).
    """
    check_transport_security(settings)
    check_ports_free(settings)
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
        database = await open_database(settings, stack, telemetry, create=create_database)
        if prepare is not None:
            await prepare(database, secrets)
        await database.ensure_migrated()
        # Before anything is sealed: a wrong data key stops the start here, not call by call.
        await verify_data_keys(database, secrets.data_keys)
        await warn_about_unsealed_values(database, secrets.data_keys)
        parts = Parts.build(settings, database, secrets)
        if customize is not None:
            parts = customize(parts, database, secrets)
        gateway = Gateway(settings, database, secrets, telemetry=telemetry, parts=parts)
        await gateway.start()
        assert gateway.partner and gateway.internal
        # What starting allocated (modules, descriptors, pools) lives as long as the process: out of
        # the collector's sight, a full collection walks only what calls allocate.
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
