"""Partners' basic reads on a real streaming replica; keys, suspensions and grants decided on the primary.

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
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import MONDAY, World

from demo.cluster import Cluster
from service.access.consent_tokens import ConsentKeyring
from service.app import REPLICA_HEALTH_PREFIX, Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database, partner_login_dsn


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


async def _gateway(
    settings: Settings, primary_dsn: str, replica_url: str, keyring: ConsentKeyring, data_keys: DataKeyring, **changes
) -> tuple[Gateway, Database]:
    database = await Database.connect(
        primary_dsn, min_size=1, max_size=5, partner_dsn=partner_login_dsn(primary_dsn), require_partner_login=True
    )
    chosen = replace(settings, read_replica_urls=(replica_url,), **changes)
    return Gateway(chosen, database, Secrets(os.urandom(32), keyring, data_keys)), database


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
    gateway, database = await _gateway(
        settings, primary_dsn, _on_replica(cluster, primary_dsn), keyring, data_keys, replica_max_lag=3600.0
    )
    try:
        async with harness.serving(gateway) as world:
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
    finally:
        await database.close()

    assert len(seen_before) == 1
    assert after_revocation == []
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert while_paused == seen_before
    assert len(after_replay) == 2 and after_replay > seen_before


async def test_a_replica_past_the_lag_bound_is_skipped_and_its_health_says_so(
    cluster: Cluster, primary_dsn: str, settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    gateway, database = await _gateway(
        settings, primary_dsn, _on_replica(cluster, primary_dsn), keyring, data_keys, replica_max_lag=1.0
    )
    try:
        async with harness.serving(gateway) as world:
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
    finally:
        await database.close()

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
