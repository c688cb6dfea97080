"""Partners' basic reads and the feed's catch-up on a real streaming replica; keys and grants decided on the primary.

A primary and a ``pg_basebackup`` standby (:class:`demo.cluster.Cluster`) per
module; the replica's replay is paused with ``pg_wal_replay_pause()`` to make
its copy lag behind the primary's decisions.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import MONDAY, PartnerHandle, World

from demo.cluster import Cluster
from service.access import credentials
from service.access.consent_tokens import ConsentKeyring
from service.app import REPLICA_HEALTH_PREFIX, Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database, QueryObserver, partner_login_dsn
from service.store.replicas import Replicas


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="apptgate-cluster-"))
    made = Cluster(base)
    try:
        made.start()
        yield made
    finally:
        made.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def primary_template(cluster: Cluster) -> str:
    return asyncio.run(harness.create_template(cluster.primary.dsn("postgres")))


@pytest.fixture
async def primary_dsn(cluster: Cluster, primary_template: str) -> AsyncIterator[str]:
    admin = cluster.primary.dsn("postgres")
    dsn = await harness.create_database(admin, primary_template)
    try:
        yield dsn
    finally:
        await harness.drop_database(admin, dsn)


def _on_replica(cluster: Cluster, primary_dsn: str) -> str:
    """The test database's URL on the replica, as the partner role logs in."""
    return partner_login_dsn(cluster.replica.dsn(primary_dsn.rsplit("/", 1)[1]))


async def _replica_admin(cluster: Cluster) -> asyncpg.Connection:
    return await asyncpg.connect(cluster.replica.dsn("postgres"))


async def _caught_up(cluster: Cluster) -> None:
    """Wait until the replica has replayed everything the primary wrote so far."""
    primary = await asyncpg.connect(cluster.primary.dsn("postgres"))
    replica = await _replica_admin(cluster)
    try:
        written = await primary.fetchval("SELECT pg_current_wal_lsn()")
        assert await harness.eventually(
            lambda: replica.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", written), within=60
        )
    finally:
        await primary.close()
        await replica.close()


async def _set_replay(cluster: Cluster, *, paused: bool) -> None:
    replica = await _replica_admin(cluster)
    try:
        await replica.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")
        wanted = "paused" if paused else "not paused"
        assert await harness.eventually(
            lambda: replica.fetchval("SELECT pg_get_wal_replay_pause_state() = $1", wanted), within=60
        )
    finally:
        await replica.close()


@asynccontextmanager
async def _replica_gateway(
    settings: Settings,
    primary_dsn: str,
    replica_url: str,
    keyring: ConsentKeyring,
    data_keys: DataKeyring,
    *,
    on_primary: QueryObserver | None = None,
    on_replica: QueryObserver | None = None,
    **changes: Any,
) -> AsyncIterator[tuple[Gateway, World]]:
    """A gateway over the primary reading from the replica, serving, its database closed after.

    ``on_primary``/``on_replica`` see each one's statements.
    """
    database = await Database.connect(
        primary_dsn,
        min_size=1,
        max_size=5,
        partner_dsn=partner_login_dsn(primary_dsn),
        require_partner_login=True,
        on_query=on_primary,
    )
    try:
        chosen = replace(settings, read_replica_urls=(replica_url,), **changes)
        replicas = Replicas(chosen.read_replica_urls, max_lag=chosen.replica_max_lag, on_query=on_replica)
        gateway = Gateway(chosen, database, Secrets(os.urandom(32), keyring, data_keys), replicas=replicas)
        async with harness.serving(gateway) as world:
            yield gateway, world
    finally:
        await database.close()


class _Statements:
    """The statements one side ran without failing (an ``on_query`` observer), counted by the function each calls."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, query: str, seconds: float, exception: BaseException | None) -> None:
        if exception is None:
            self.ran.append(query)

    def calls(self, function: str) -> int:
        return sum(f"FROM {function}(" in query for query in self.ran)


@asynccontextmanager
async def _observed_gateway(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[tuple[Gateway, World, _Statements, _Statements]]:
    """:func:`_replica_gateway` with an hour's lag bound (a paused replica stays usable), and each side's statements."""
    on_primary, on_replica = _Statements(), _Statements()
    async with _replica_gateway(
        settings,
        primary_dsn,
        _on_replica(cluster, primary_dsn),
        keyring,
        data_keys,
        on_primary=on_primary,
        on_replica=on_replica,
        replica_max_lag=3600.0,
    ) as (gateway, world):
        yield gateway, world, on_primary, on_replica


async def _usable(gateway: Gateway, usable: bool = True) -> bool:
    return await harness.eventually(lambda: gateway.replicas.states[0].usable is usable, within=60)


async def _ids(partner: harness.PartnerHandle) -> set[str]:
    return {a.appointment_id for a in await partner.list_all()}


async def _replica_health(world: World) -> int:
    reply = await health_pb2_grpc.HealthStub(world.internal_channel).Check(
        health_pb2.HealthCheckRequest(service=f"{REPLICA_HEALTH_PREFIX}0"), timeout=10
    )
    return int(reply.status)


async def test_revocations_on_the_primary_hold_on_the_next_call_while_the_replica_replays_nothing(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    async with _replica_gateway(
        settings, primary_dsn, _on_replica(cluster, primary_dsn), keyring, data_keys, replica_max_lag=3600.0
    ) as (gateway, world):
        practitioner = await world.practitioner()
        await world.appointment(practitioner, (await world.patient()).patient_id, MONDAY)
        revoked = await world.partner("Revoked later", practitioner)
        keyless = await world.partner("Key revoked later", practitioner)
        bystander = await world.partner("Still granted", practitioner)
        await _caught_up(cluster)
        assert await _usable(gateway)
        seen_before = await _ids(bystander)
        [shown] = await revoked.list_all()  # the appointment as this partner knows it
        await _set_replay(cluster, paused=True)
        try:
            await world.appointment(practitioner, (await world.patient()).patient_id, MONDAY + timedelta(hours=1))
            await world.revoke_grant(revoked.partner_id, practitioner)
            await world.revoke_key(keyless.key_id)

            # The replica still shows the grant and the key; the primary's decisions hold.
            after_revocation = await revoked.list_all()
            with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                await keyless.list()
            with pytest.raises(grpc.aio.AioRpcError) as not_found:
                await revoked.get(shown.appointment_id)
            # The bystander's reads come from the paused replica: the new appointment is not there yet.
            while_paused = await _ids(bystander)
        finally:
            await _set_replay(cluster, paused=False)
        await _caught_up(cluster)
        after_replay = await _ids(bystander)

    assert len(seen_before) == 1
    assert after_revocation == []
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert while_paused == seen_before
    assert len(after_replay) == 2 and after_replay > seen_before


async def test_gets_read_on_the_replica_are_authorised_and_recorded_on_the_primary(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    async with _observed_gateway(cluster, primary_dsn, settings, keyring, data_keys) as (
        gateway,
        world,
        on_primary,
        on_replica,
    ):
        practitioner = await world.practitioner()
        patient = (await world.patient()).patient_id
        for hour in range(4):
            await world.appointment(practitioner, patient, MONDAY + timedelta(hours=hour))
        partner = await world.partner("Getting", practitioner)
        listed = await partner.list_all()
        await _caught_up(cluster)
        assert await _usable(gateway)
        on_primary.ran.clear()
        on_replica.ran.clear()

        got = await asyncio.gather(*(partner.get(a.appointment_id) for a in listed))

    assert [g.appointment_id for g in got] == [a.appointment_id for a in listed]
    grouped = [q for q in on_replica.ran if "LATERAL partner_get_appointment(" in q]
    assert 1 <= len(grouped) <= 4  # the four gets read on the replica, concurrent ones in one statement
    assert not [q for q in on_primary.ran if "partner_get_appointment(" in q]  # none read again on the primary
    assert on_primary.calls("record_checked_basic_disclosures") >= 1  # each authorised and recorded there


async def test_a_replica_past_the_lag_bound_is_skipped_and_its_health_says_so(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    async with _replica_gateway(
        settings, primary_dsn, _on_replica(cluster, primary_dsn), keyring, data_keys, replica_max_lag=1.0
    ) as (gateway, world):
        practitioner = await world.practitioner()
        await world.appointment(practitioner, (await world.patient()).patient_id, MONDAY)
        partner = await world.partner("Reading", practitioner)
        await _caught_up(cluster)
        assert await _usable(gateway)
        serving = await _replica_health(world)
        await _set_replay(cluster, paused=True)
        try:
            await world.appointment(practitioner, (await world.patient()).patient_id, MONDAY + timedelta(hours=1))
            # WAL keeps arriving and is not replayed: the lag grows past the bound.
            skipped = await _usable(gateway, usable=False)
            lag = gateway.replicas.states[0].lag
            listed = await _ids(partner)  # from the primary now: both appointments
            not_serving = await _replica_health(world)
        finally:
            await _set_replay(cluster, paused=False)
        back = await _usable(gateway)

    assert serving == health_pb2.HealthCheckResponse.SERVING
    assert skipped and lag is not None and lag > 1.0
    assert len(listed) == 2
    assert not_serving == health_pb2.HealthCheckResponse.NOT_SERVING
    assert back


async def test_the_cluster_command_starts_two_gateways_reading_from_a_replica_and_removes_it_all() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "demo.cluster", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(120):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                line = await process.stdout.readline()
                assert line, lines  # the command ended before it was ready
                lines.append(line.decode().strip())
        internals = [line.split("internal ")[1].split(" ")[0] for line in lines if line.startswith("gateway ")]
        states = []
        for address in internals:
            async with grpc.aio.insecure_channel(address) as channel:
                # Each gateway measures its replica once a second: wait for the first measure.
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service=f"{REPLICA_HEALTH_PREFIX}0")
                assert await harness.eventually(lambda stub=stub, request=request: _serving(stub, request), within=60)
                states.append((await stub.Check(request, timeout=10)).status)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=120)
    base = lines[-1].rsplit(" ", 1)[1]

    assert len(internals) == 2
    assert states == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert code == 0
    assert not await asyncio.to_thread(os.path.exists, base)


async def _serving(stub: health_pb2_grpc.HealthStub, request: health_pb2.HealthCheckRequest) -> bool:
    try:
        reply = await stub.Check(request, timeout=10)
    except grpc.aio.AioRpcError:  # not set yet: NOT_FOUND
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# The change feed's catch-up: a resumed watch replays on the replica only once it holds the changes.

_READ_TIMEOUT = 30


def _watch(partner: PartnerHandle, resume_token: str = "") -> Any:
    """A watch over every granted practitioner, with bookmarks: the first one says the catch-up is over."""
    return partner.stub.WatchAppointments(
        pb.WatchAppointmentsRequest(resume_token=resume_token, allow_bookmarks=True), metadata=partner.metadata
    )


async def _next(stream: Any) -> pb.AppointmentChange:
    message = await asyncio.wait_for(stream.read(), timeout=_READ_TIMEOUT)
    assert message is not grpc.aio.EOF
    return message  # type: ignore[no-any-return]


async def _resume_point(partner: PartnerHandle) -> str:
    """A token from now on: the first bookmark of a fresh watch (sent at once, nothing to replay)."""
    stream = _watch(partner)
    bookmark = await _next(stream)
    stream.cancel()
    assert bookmark.change_type == pb.CHANGE_TYPE_BOOKMARK
    return bookmark.resume_token


async def _replayed(stream: Any) -> list[pb.AppointmentChange]:
    """What the stream sends before its first bookmark, which comes once it has caught up."""
    changes = []
    while (message := await _next(stream)).change_type != pb.CHANGE_TYPE_BOOKMARK:
        changes.append(message)
    return changes


async def _replay(partner: PartnerHandle, resume_token: str) -> list[pb.AppointmentChange]:
    """What a watch resumed at ``resume_token`` replays; the watch is then closed."""
    stream = _watch(partner, resume_token)
    try:
        return await _replayed(stream)
    finally:
        stream.cancel()


async def _next_change(stream: Any) -> pb.AppointmentChange:
    while (message := await _next(stream)).change_type == pb.CHANGE_TYPE_BOOKMARK:
        pass
    return message


async def _hub_at_head(gateway: Gateway, primary_dsn: str) -> bool:
    """Wait until the gateway's hub has seen every change made so far, so that a stream opened now replays them all."""
    conn = await asyncpg.connect(primary_dsn)
    try:
        head = await conn.fetchval("SELECT position FROM change_feed_head")
    finally:
        await conn.close()
    return await harness.eventually(lambda: gateway.feed.position >= head, within=60)


def _credential(partner: PartnerHandle) -> bytes:
    """What the partner functions take for the partner's key (no client certificate)."""
    return credentials.credential(credentials.hash_secret(partner.secret), None)


def _hours(changes: list[pb.AppointmentChange]) -> list[tuple[int, int]]:
    return [(c.change_type, c.appointment.start_time.ToDatetime().hour) for c in changes]


async def test_a_resumed_watch_replays_on_a_replica_that_has_replayed_its_changes(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    async with _observed_gateway(cluster, primary_dsn, settings, keyring, data_keys) as (
        gateway,
        world,
        on_primary,
        on_replica,
    ):
        practitioner = await world.practitioner()
        patient = (await world.patient()).patient_id
        partner = await world.partner("Syncing", practitioner)
        token = await _resume_point(partner)
        for hour in (1, 2, 3):
            await world.appointment(practitioner, patient, MONDAY + timedelta(hours=hour))
        await _caught_up(cluster)
        assert await _usable(gateway)
        assert await _hub_at_head(gateway, primary_dsn)
        replayed = await _replay(partner, token)

    assert _hours(replayed) == [(pb.CHANGE_TYPE_CREATED, hour) for hour in (1, 2, 3)]
    # The replica's head was checked, then the batch read there; the primary read no change.
    assert on_replica.calls("partner_watch") == 1
    assert on_replica.calls("partner_changes") == 1
    assert on_primary.calls("partner_changes") == 0


async def test_a_resumed_watch_replays_on_the_primary_what_a_paused_replica_has_not_replayed(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    # Paused, the replica stays within the hour's bound: only its feed head keeps the replay from it.
    async with _observed_gateway(cluster, primary_dsn, settings, keyring, data_keys) as (
        gateway,
        world,
        on_primary,
        on_replica,
    ):
        practitioner = await world.practitioner()
        patient = (await world.patient()).patient_id
        partner = await world.partner("Syncing", practitioner)
        token = await _resume_point(partner)
        moved = await world.appointment(practitioner, patient, MONDAY + timedelta(hours=1))
        await _caught_up(cluster)
        assert await _usable(gateway)
        await _set_replay(cluster, paused=True)
        try:
            # Made on the primary only: the replica still has the appointment at 1 o'clock.
            second = await world.appointment(practitioner, patient, MONDAY + timedelta(hours=2))
            third = await world.appointment(practitioner, patient, MONDAY + timedelta(hours=3))
            owner = await asyncpg.connect(primary_dsn)
            try:
                await owner.execute(
                    "UPDATE appointments SET start_time = start_time + interval '3 hours', "
                    "end_time = end_time + interval '3 hours', update_time = now() WHERE id = $1",
                    moved.appointment_id,
                )
            finally:
                await owner.close()
            assert await _hub_at_head(gateway, primary_dsn)
            still_usable = gateway.replicas.states[0].usable
            resumed = _watch(partner, token)
            replayed = await _replayed(resumed)
            later = await world.appointment(practitioner, patient, MONDAY + timedelta(hours=5))
            live = await _next_change(resumed)  # the next change, not one of the replayed again
            resumed.cancel()
        finally:
            await _set_replay(cluster, paused=False)
        records = [
            r for r in await world.disclosures(partner_id=partner.partner_id) if r.rpc.endswith("/WatchAppointments")
        ]

    assert still_usable
    assert _hours(replayed) == [
        (pb.CHANGE_TYPE_CREATED, 1),
        (pb.CHANGE_TYPE_CREATED, 2),
        (pb.CHANGE_TYPE_CREATED, 3),
        (pb.CHANGE_TYPE_UPDATED, 4),  # the primary's state of the appointment, not the replica's
    ]
    assert _hours([live]) == [(pb.CHANGE_TYPE_CREATED, 5)]
    # The replica's head was checked and found behind: the batch was read on the primary.
    assert on_replica.calls("partner_watch") == 1
    assert on_replica.calls("partner_changes") == 0
    assert on_primary.calls("partner_changes") == 1
    # Recorded as sent: the appointment moved while the replica was paused, twice.
    assert sorted(r.appointment_id for r in records) == sorted(
        [moved.appointment_id, second.appointment_id, third.appointment_id, moved.appointment_id, later.appointment_id]
    )


async def test_a_key_and_a_grant_revoked_while_the_replica_is_paused_hold_for_resumed_watches(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    on_replica = _Statements()
    replica_url = _on_replica(cluster, primary_dsn)
    async with _replica_gateway(
        settings, primary_dsn, replica_url, keyring, data_keys, on_replica=on_replica, replica_max_lag=3600.0
    ) as (gateway, world):
        kept, dropped = await world.practitioner(), await world.practitioner()
        patient = (await world.patient()).patient_id
        keyless = await world.partner("Key revoked later", kept)
        narrowed = await world.partner("Grant revoked later", kept, dropped)
        keyless_token, narrowed_token = await _resume_point(keyless), await _resume_point(narrowed)
        for hour, practitioner in enumerate((kept, dropped, kept, dropped), start=1):
            await world.appointment(practitioner, patient, MONDAY + timedelta(hours=hour))
        await _caught_up(cluster)
        assert await _usable(gateway)
        await _set_replay(cluster, paused=True)
        try:
            await world.revoke_key(keyless.key_id)
            await world.revoke_grant(narrowed.partner_id, dropped)
            assert await _hub_at_head(gateway, primary_dsn)
            # The paused replica still knows the key live, still grants `dropped`, and holds every change.
            as_partner = await asyncpg.connect(replica_url)
            try:
                replica_head = await as_partner.fetchval(
                    "SELECT head FROM partner_watch($1, $2)", keyless.key_id, _credential(keyless)
                )
                replica_grants = await as_partner.fetchval(
                    "SELECT granted FROM partner_watch($1, $2)", narrowed.key_id, _credential(narrowed)
                )
            finally:
                await as_partner.close()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _next(_watch(keyless, keyless_token))
            replayed = await _replay(narrowed, narrowed_token)
        finally:
            await _set_replay(cluster, paused=False)

    assert replica_head is not None and replica_head >= gateway.feed.position
    assert {str(p) for p in replica_grants} == {kept, dropped}
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Read on the replica, whose copy still grants `dropped`: only the practitioner still granted.
    assert on_replica.calls("partner_changes") == 1
    assert [
        (c.appointment.practitioner.practitioner_id, c.appointment.start_time.ToDatetime().hour) for c in replayed
    ] == [
        (kept, 1),
        (kept, 3),
    ]
