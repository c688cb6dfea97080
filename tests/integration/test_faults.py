"""Database faults, deadlines, cancellation and isolation under reuse.

The chaos test puts a TCP proxy between the gateway and PostgreSQL and cuts
it in the middle of sustained traffic, as a restart or a network partition
would: calls must fail fast with UNAVAILABLE (never INTERNAL, never past
their deadline), health must turn NOT_SERVING and back, the pool must
recover by itself, and no response may have been sent without its audit
record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import MONDAY, World

from service import deadlines
from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.errors import DeadlineExceeded
from service.settings import Settings, TransportLimits
from service.store.database import Database


class Proxy:
    """A TCP proxy to PostgreSQL that can be cut (every connection dropped, new ones refused) and restored."""

    def __init__(self, target_dsn: str) -> None:
        parts = urlsplit(target_dsn)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        self._unix = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._tcp = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._parts = parts
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.port = harness.free_port()

    @property
    def dsn(self) -> str:
        user = self._parts.username or "postgres"
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{self.port}", self._parts.path, "", ""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._unix:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update({writer, up_writer})

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@pytest.fixture
async def proxied(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[tuple[World, Proxy, Gateway]]:
    proxy = Proxy(database_dsn)
    await proxy.start()
    database = await Database.connect(proxy.dsn, min_size=2, max_size=4, connect_timeout=1.0)
    gateway = Gateway(
        replace(settings, limits=TransportLimits(default_deadline=2.0)),
        database,
        Secrets(os.urandom(32), keyring, data_keys),
    )
    try:
        async with harness.serving(gateway) as world:
            yield world, proxy, gateway
    finally:
        await database.close()
        await proxy.cut()


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(reply.status)


async def _takes_a_new_call(channel: grpc.aio.Channel) -> bool:
    """Whether a health check over ``channel`` is answered SERVING (False when the call is refused, UNAVAILABLE)."""
    try:
        return await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False


async def _health_turns(channel: grpc.aio.Channel, expected: int, within: float = 30.0) -> int:
    """The health status once it is ``expected``, or the last one seen after ``within`` seconds.

    The server checks its database once a second (``HEALTH_INTERVAL``): how soon after a cut or a
    restore the status changes depends on that period and on how busy the machine is.
    """
    deadline = time.monotonic() + within
    while True:
        status = await _health(channel)
        if status == expected or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_cutting_the_database_mid_traffic_fails_fast_recovers_alone_and_loses_no_audit_record(
    proxied: tuple[World, Proxy, Gateway], database_dsn: str
) -> None:
    world, proxy, _ = proxied
    practitioner = await world.practitioner()
    patient = await world.patient()
    for hour in range(5):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner = await world.partner("Chaos", practitioner)
    ids = [a.appointment_id for a in await partner.list_all()]
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    served_after_restore: list[float] = []
    stop, recovered = asyncio.Event(), asyncio.Event()
    retry_info: list[bool] = []
    restored_at = 0.0

    async def traffic() -> None:
        nonlocal slowest
        while not stop.is_set():
            began = time.monotonic()
            try:
                await partner.stub.GetAppointment(
                    harness.partner_pb.GetAppointmentRequest(appointment_id=random.choice(ids)),
                    metadata=partner.metadata,
                    timeout=3,
                )
                outcomes["OK"] += 1
                if restored_at and began >= restored_at:
                    served_after_restore.append(time.monotonic())
                    recovered.set()
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name] += 1
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    details = harness.status_of(error).details
                    retry_info.append(any(d.Is(harness.error_details_pb2.RetryInfo.DESCRIPTOR) for d in details))
                await asyncio.sleep(0.02)
            slowest = max(slowest, time.monotonic() - began)

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    await harness.eventually(lambda: outcomes["OK"] >= 20)  # traffic flows
    before_cut = outcomes["OK"]
    await proxy.cut()
    # The cut is seen: calls fail (UNAVAILABLE), and the health probe reports it.
    await harness.eventually(lambda: outcomes["UNAVAILABLE"] >= 4)
    health_during = await _health_turns(world.partner_channel, health_pb2.HealthCheckResponse.NOT_SERVING)
    await proxy.start()
    restored_at = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(recovered.wait(), timeout=15)
    health_after = await _health_turns(world.partner_channel, health_pb2.HealthCheckResponse.SERVING)
    stop.set()
    await asyncio.gather(*workers)

    recovery = served_after_restore[0] - restored_at if served_after_restore else float("inf")
    conn = await asyncpg.connect(database_dsn)
    try:
        audited = await conn.fetchval(
            "SELECT count(*) FROM disclosure_items "
            "WHERE partner_id = $1 AND rpc LIKE '%/GetAppointment' AND outcome = 1",
            harness.uuid_of(partner.partner_id),
        )
    finally:
        await conn.close()
    others = {code: n for code, n in outcomes.items() if code not in ("OK", "UNAVAILABLE")}
    print(
        f"\nchaos: {outcomes['OK']} OK ({before_cut} before the cut), {outcomes['UNAVAILABLE']} UNAVAILABLE, "
        f"other errors {others or 0}, recovery {recovery:.2f} s, slowest call {slowest:.2f} s, "
        f"responses without audit record {max(0, outcomes['OK'] - audited)}, "
        f"audited but not received {max(0, audited - outcomes['OK'])}"
    )
    assert outcomes["UNAVAILABLE"] > 0
    assert retry_info and all(retry_info)  # every UNAVAILABLE says when to retry
    assert others == {}
    # Not one response without its audit record. (The converse can happen: a commit
    # that succeeded while the cut lost its answer is audited but never received.)
    assert outcomes["OK"] <= audited
    assert recovery < 5
    assert slowest < 3.5  # never past the deadline (3 s) by more than scheduling noise
    assert health_during == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_after == health_pb2.HealthCheckResponse.SERVING


async def test_two_thousand_interleaved_calls_never_cross_partners(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    database = await Database.connect(database_dsn, min_size=1, max_size=2)
    gateway = Gateway(replace(settings), database, Secrets(os.urandom(32), keyring, data_keys))
    try:
        async with harness.serving(gateway) as world:
            mine, theirs = await world.practitioner(), await world.practitioner()
            patient = await world.patient()
            for hour in range(3):
                await world.appointment(mine, patient.patient_id, MONDAY + timedelta(hours=hour))
                await world.appointment(theirs, patient.patient_id, MONDAY + timedelta(hours=hour))
            partner_a = await world.partner("A", mine)
            partner_b = await world.partner("B", theirs)
            expected = {partner_a.partner_id: mine, partner_b.partner_id: theirs}

            async def call(partner: harness.PartnerHandle) -> set[str]:
                page = await partner.list()
                return {a.practitioner.practitioner_id for a in page.appointments} | {expected[partner.partner_id]}

            calls = [call(partner_a if n % 2 else partner_b) for n in range(2000)]
            results = []
            for chunk in range(0, len(calls), 80):  # under the 100 streams a connection may carry
                results.extend(await asyncio.gather(*calls[chunk : chunk + 80]))
    finally:
        await database.close()

    assert len(results) == 2000
    assert all(len(seen) == 1 for seen in results)  # each answer held only its own partner's practitioner


async def _settled(check: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``check()`` holds, at most ``within`` seconds.

    The server's background tasks (the ledger sequencer, the health probe) borrow
    pool connections for a moment, and a cancelled statement returns its connection
    only once PostgreSQL confirmed the cancel: a pool is at rest a little after the
    last call, and a connection truly held stays in use past any bound.
    """
    settle_by = time.monotonic() + within
    while time.monotonic() < settle_by:
        if check():
            return
        await asyncio.sleep(0.05)


async def test_a_thousand_cancelled_calls_leave_the_pool_at_rest_and_no_task_behind(
    world: World, gateway: Gateway
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    for hour in range(20):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner = await world.partner("Impatient", practitioner)
    await partner.list()
    tasks_before = {t for t in asyncio.all_tasks()}
    await _settled(lambda: gateway.database.pool_usage()[0] == 0)
    in_use_before, idle_before, _ = gateway.database.pool_usage()

    for _ in range(10):
        calls = [asyncio.ensure_future(partner.list(page_size=20)) for _ in range(100)]
        await asyncio.sleep(random.uniform(0.001, 0.02))
        for pending in calls:
            pending.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    # The server notices each cancellation, cancels its statement and waits for PostgreSQL
    # to confirm before the connection goes back to the pool: give that a bounded time.
    waiting_for_next_call = "AioServer._request_registered_call"  # each call replaces this one task

    def leftover_tasks() -> set[asyncio.Task[object]]:
        return {
            t
            for t in asyncio.all_tasks()
            if t not in tasks_before
            and not t.done()
            and t is not asyncio.current_task()
            and getattr(t.get_coro(), "__qualname__", "") != waiting_for_next_call
        }

    await _settled(lambda: gateway.database.pool_usage()[0::2] == (0, 0) and not leftover_tasks())
    in_use, idle, waiting = gateway.database.pool_usage()
    leftover = leftover_tasks()
    assert (in_use, waiting) == (0, 0)
    assert idle >= idle_before and in_use_before == 0
    assert [getattr(t.get_coro(), "__qualname__", repr(t)) for t in leftover] == []
    # And it still serves. The connection carries 100 streams at most: the server frees those of
    # the cancelled calls as it processes their resets, which can come after their tasks ended (a
    # new stream is refused until then, RST_STREAM REFUSED_STREAM). Wait until it takes one.
    assert await harness.eventually(lambda: _takes_a_new_call(world.partner_channel))
    assert len((await partner.list(page_size=20)).appointments) == 20


async def test_a_call_without_a_deadline_gets_the_default_one(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring, tmp_path: Path
) -> None:
    database = await Database.connect(database_dsn, min_size=1, max_size=2)
    gateway = Gateway(
        replace(settings, limits=TransportLimits(default_deadline=0.5)),
        database,
        Secrets(os.urandom(32), keyring, data_keys),
    )
    await gateway.start()
    assert gateway.partner and gateway.internal
    blocker = await asyncpg.connect(database_dsn)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.partner.port}") as partner_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.internal.port}") as internal_channel,
        ):
            world = World(partner_channel, internal_channel)
            partner = await world.partner("Waiting")
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE practitioner_grants IN ACCESS EXCLUSIVE MODE")
                began = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await partner.list()  # no deadline from the caller
                waited = time.monotonic() - began
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert waited < 2.0
            assert len((await partner.list()).appointments) == 0  # the lock is gone, it serves again
            await _settled(lambda: gateway.database.pool_usage()[0] == 0)
            assert gateway.database.pool_usage()[0] == 0
    finally:
        await blocker.close()
        await gateway.stop(0)
        await database.close()


async def _backends_waiting_on_a_lock(conn: asyncpg.Connection) -> int:
    """Backends of this database waiting on a lock now (a fresh look, even inside a transaction)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    )


async def test_the_callers_shorter_deadline_bounds_the_database_work(world: World, database_dsn: str) -> None:
    partner = await world.partner("Hurried")
    blocker = await asyncpg.connect(database_dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE practitioner_grants IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await partner.stub.ListAppointments(
                    harness.partner_pb.ListAppointmentsRequest(
                        start_time=harness.ts(MONDAY), end_time=harness.ts(MONDAY + timedelta(days=1))
                    ),
                    metadata=partner.metadata,
                    timeout=0.3,
                )
            waited = time.monotonic() - began
            # The call's deadline cancels the server's statement from the client side, and PostgreSQL
            # confirms a cancel a moment after the caller has its answer: watch for the backend to stop
            # waiting, while the lock is still held, well within the partner pool's 10 s
            # statement_timeout (the backstop that would end a statement left waiting on its own).
            settle_by = time.monotonic() + 5.0
            while True:
                locks_waiting = await _backends_waiting_on_a_lock(blocker)
                if locks_waiting == 0 or time.monotonic() > settle_by:
                    break
                await asyncio.sleep(0.05)
    finally:
        await blocker.close()

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waited < 1.0
    assert locks_waiting == 0  # the server's statement was cancelled with the call, not left waiting


async def test_a_partner_read_that_finds_every_connection_taken_says_so_within_its_deadline(
    database: Database,
) -> None:
    async with contextlib.AsyncExitStack() as taken:
        for _ in range(5):  # the fixture's partner pool holds five
            await taken.enter_async_context(database.partner_statements())
        began = time.monotonic()
        with deadlines.bounded(0.3), pytest.raises(DeadlineExceeded) as caught:
            async with database.partner_statements() as conn:
                await conn.fetchval("SELECT 1")
        waited = time.monotonic() - began

    # The wait is named (the call's timer used to run out first and blame the statement).
    assert "waiting for a database connection" in caught.value.message
    assert waited < 1.0


async def test_only_single_statement_work_skips_the_session_reset_on_release(database_dsn: str) -> None:
    # One connection, so every block below gets the same session back.
    db = await Database.connect(database_dsn, min_size=1, max_size=1)
    try:
        async with db.connection() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET application_name = 'apptgate-reset-probe'")
        async with db.connection() as conn:
            assert conn.get_server_pid() == pid
            # Released from connection(): asyncpg's reset query ran (RESET ALL).
            assert await conn.fetchval("SHOW application_name") == ""
        async with db.statements(5.0) as conn:
            # Against the contract of statements() on purpose, to see that its release skips the reset.
            await conn.execute("SET application_name = 'apptgate-reset-probe'")
        async with db.transaction() as conn:
            assert conn.get_server_pid() == pid
            assert await conn.fetchval("SHOW application_name") == "apptgate-reset-probe"
        async with db.connection() as conn:
            # The skip was used once: the transaction's release reset the session again.
            assert await conn.fetchval("SHOW application_name") == ""
        # A statements() block that fails still hands its connection back in a usable state.
        with pytest.raises(asyncpg.UndefinedTableError):
            async with db.statements(5.0) as conn:
                await conn.execute("SELECT * FROM apptgate_no_such_table")
        async with db.statements(5.0) as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()
