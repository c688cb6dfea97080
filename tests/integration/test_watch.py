"""WatchAppointments: every committed change once, in order, resumable, following grants live."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import audit_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from harness import MONDAY, PartnerHandle, World

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store import changes
from service.store.database import Database

READ_TIMEOUT = 10


def watch(partner: PartnerHandle, practitioner_id: str = "", resume_token: str = "") -> Any:
    return partner.stub.WatchAppointments(
        pb.WatchAppointmentsRequest(practitioner_id=practitioner_id, resume_token=resume_token),
        metadata=partner.metadata,
    )


async def read(stream: Any) -> pb.AppointmentChange:
    message = await asyncio.wait_for(stream.read(), timeout=READ_TIMEOUT)
    assert message is not grpc.aio.EOF
    return message  # type: ignore[no-any-return]


async def ended_with(stream: Any, within: float = READ_TIMEOUT) -> grpc.StatusCode:
    """Read until the stream fails; return its status code (fail when it outlives ``within``)."""
    deadline = time.monotonic() + within
    try:
        while True:
            message = await asyncio.wait_for(stream.read(), timeout=max(0.01, deadline - time.monotonic()))
            assert message is not grpc.aio.EOF
    except grpc.aio.AioRpcError as error:
        return error.code()


async def started(stream: Any) -> None:
    """Wait until the server has registered the stream (its initial metadata arrives then).

    From then on the stream is live: every change that commits afterwards reaches it
    (the server subscribes it to the feed hub before it sends the headers), so a test
    needs no pause before it makes changes.
    """
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)


async def test_creation_update_and_cancellation_arrive_with_their_audit_records(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner)
    await started(stream)

    booked = await world.appointment(practitioner, patient.patient_id, MONDAY)
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(
            "UPDATE appointments SET start_time = start_time + interval '1 hour', "
            "end_time = end_time + interval '1 hour', update_time = now() WHERE id = $1",
            booked.appointment_id,
        )
        await conn.execute(
            "UPDATE appointments SET reason = 'LEAKCHECK new reason' WHERE id = $1", booked.appointment_id
        )
    finally:
        await conn.close()
    await world.scheduling.CancelAppointment(
        harness.scheduling_pb.CancelAppointmentRequest(appointment_id=booked.appointment_id),
        metadata=world.internal_metadata,
    )

    changes = [await read(stream) for _ in range(3)]
    stream.cancel()

    assert [c.change_type for c in changes] == [
        pb.CHANGE_TYPE_CREATED,
        pb.CHANGE_TYPE_UPDATED,
        pb.CHANGE_TYPE_CANCELLED,
    ]
    assert len({c.appointment.appointment_id for c in changes}) == 1
    assert changes[1].appointment.start_time.ToDatetime() - changes[0].appointment.start_time.ToDatetime() == timedelta(
        hours=1
    )
    [listed] = await partner.list_all()
    assert listed.appointment_id == changes[0].appointment.appointment_id  # same view code, same ids
    assert "LEAKCHECK" not in str(changes)
    records = [
        r for r in await world.disclosures(partner_id=partner.partner_id) if r.rpc.endswith("/WatchAppointments")
    ]
    assert len(records) == 3
    assert all(r.view == audit_pb2.DISCLOSURE_VIEW_BASIC and r.appointment_id == booked.appointment_id for r in records)


async def test_changes_of_practitioners_not_granted_never_arrive(world: World) -> None:
    granted, other = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", granted)
    stream = watch(partner)
    await started(stream)

    await world.appointment(other, patient.patient_id, MONDAY)
    await world.appointment(other, patient.patient_id, MONDAY + timedelta(hours=1))
    mine = await world.appointment(granted, patient.patient_id, MONDAY + timedelta(hours=2))

    change = await read(stream)
    stream.cancel()
    assert change.appointment.practitioner.practitioner_id == granted
    assert change.appointment.start_time.ToDatetime() == mine.start_time.ToDatetime()


async def test_resuming_after_a_cut_loses_and_repeats_nothing_under_concurrent_writes(world: World) -> None:
    practitioners = [await world.practitioner() for _ in range(3)]
    patient = await world.patient()
    partner = await world.partner("Sync", *practitioners)
    stream = watch(partner)
    await started(stream)

    booked = 0

    async def writer(index: int) -> None:
        nonlocal booked
        for n in range(100):
            await world.appointment(practitioners[index], patient.patient_id, MONDAY + timedelta(minutes=n, days=index))
            booked += 1

    writers = asyncio.gather(*(writer(i) for i in range(3)))
    received: list[pb.AppointmentChange] = [await read(stream) for _ in range(40)]
    stream.cancel()  # forced disconnect while the writers go on
    # Changes commit while no stream is open (unless the writers are done already): the resumed
    # stream must replay them, then go on live.
    away_from = booked
    assert await harness.eventually(lambda: booked >= min(300, away_from + 30))
    resumed = watch(partner, resume_token=received[-1].resume_token)
    await writers
    while len(received) < 300:
        received.append(await read(resumed))
    resumed.cancel()

    ids = [c.appointment.appointment_id for c in received]
    assert len(ids) == 300
    assert len(set(ids)) == 300
    for practitioner in practitioners:  # commit order per practitioner = the order each writer booked in
        starts = [
            c.appointment.start_time.ToDatetime()
            for c in received
            if c.appointment.practitioner.practitioner_id == practitioner
        ]
        assert starts == sorted(starts) and len(starts) == 100


async def test_a_resume_token_replays_what_happened_while_away(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner)
    await started(stream)
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    first = await read(stream)
    stream.cancel()

    for hour in range(1, 4):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    resumed = watch(partner, practitioner_id=practitioner, resume_token=first.resume_token)
    replayed = [await read(resumed) for _ in range(3)]
    resumed.cancel()

    assert [c.appointment.start_time.ToDatetime().hour for c in replayed] == [1, 2, 3]


async def test_revoking_the_watched_grant_ends_the_stream_within_a_second(world: World) -> None:
    practitioner = await world.practitioner()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner, practitioner_id=practitioner)
    await started(stream)

    began = time.monotonic()
    await world.revoke_grant(partner.partner_id, practitioner)
    code = await ended_with(stream, within=1.0)

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert time.monotonic() - began < 1.0


async def test_a_stream_over_all_grants_drops_a_revoked_practitioner_then_ends_when_none_is_left(world: World) -> None:
    kept, dropped = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", kept, dropped)
    stream = watch(partner)
    await started(stream)

    await world.revoke_grant(partner.partner_id, dropped)
    await world.appointment(dropped, patient.patient_id, MONDAY)  # committed after the revocation
    await world.appointment(kept, patient.patient_id, MONDAY + timedelta(hours=1))
    change = await read(stream)
    assert change.appointment.practitioner.practitioner_id == kept

    await world.revoke_grant(partner.partner_id, kept)
    assert await ended_with(stream, within=1.0) == grpc.StatusCode.PERMISSION_DENIED


async def test_revoking_the_key_ends_its_streams_unauthenticated(world: World) -> None:
    practitioner = await world.practitioner()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner)
    await started(stream)

    await world.revoke_key(partner.key_id)

    assert await ended_with(stream, within=1.0) == grpc.StatusCode.UNAUTHENTICATED


async def test_watching_a_practitioner_not_granted_is_not_found_and_a_foreign_token_is_invalid(world: World) -> None:
    granted, other = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    partner_a = await world.partner("A", granted)
    partner_b = await world.partner("B", granted)
    stream = watch(partner_a)
    await started(stream)
    await world.appointment(granted, patient.patient_id, MONDAY)
    token = (await read(stream)).resume_token
    stream.cancel()

    assert await ended_with(watch(partner_a, practitioner_id=other)) == grpc.StatusCode.NOT_FOUND
    foreign = watch(partner_b, resume_token=token)
    assert await ended_with(foreign) == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_token_older_than_the_retention_window_is_out_of_range(world: World, database: Database) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner)
    await started(stream)
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    token = (await read(stream)).resume_token
    stream.cancel()
    await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=1))
    async with database.transaction() as conn:
        assert await changes.prune(conn, timedelta(0)) == 2

    resumed = watch(partner, resume_token=token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(resumed)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "list the appointments again" in (caught.value.details() or "")


@pytest.fixture
async def small_gateway(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[tuple[World, list[str]]]:
    """A gateway with tiny feed limits, over a pool whose every statement is counted."""
    statements: list[str] = []
    database = await Database.connect(
        database_dsn, min_size=1, max_size=4, on_query=lambda q, _e, _x: statements.append(q)
    )
    gateway = Gateway(
        replace(settings, feed_buffer=5, feed_max_streams=30), database, Secrets(os.urandom(32), keyring, data_keys)
    )
    try:
        async with harness.serving(gateway) as world:
            yield world, statements
    finally:
        await database.close()


async def test_idle_streams_cost_no_database_queries(small_gateway: tuple[World, list[str]]) -> None:
    world, statements = small_gateway
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", practitioner)
    streams = [watch(partner) for _ in range(25)]
    for stream in streams:
        await started(stream)
    # One change, received by every stream: the hub has handled every notification committed
    # before it (the grant's among them: notifications are handled in commit order), and the
    # delivery's own transaction is over. What the streams do from here on is idling.
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    for stream in streams:
        await read(stream)

    before = len(statements)
    # Idle for two periods of the health probe (SELECT 1 once a second), as the gateway itself
    # counts time: three probes after ``before`` span at least two seconds of its running.
    assert await harness.eventually(lambda: statements[before:].count("SELECT 1") >= 3)
    # The health probe and the ledger sequencer (every 100 ms), with their transactions
    # and the pool's reset of their connections, run whatever the number of streams.
    housekeeping = (
        "SELECT 1",
        "SELECT pg_advisory_unlock_all()",
        "SELECT chain_disclosures",
        "BEGIN",
        "COMMIT",
        "SET LOCAL",
    )
    idle_queries = [q for q in statements[before:] if not q.startswith(housekeeping)]
    for stream in streams:
        stream.cancel()

    assert idle_queries == []


async def test_a_stream_that_falls_behind_the_buffer_is_ended_and_resumes_from_its_token(
    small_gateway: tuple[World, list[str]], database_dsn: str
) -> None:
    world, _ = small_gateway
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner)
    await started(stream)
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    first = await read(stream)

    # A bulk import: 40 changes in one transaction, far more than the 5-change buffer.
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(
            "INSERT INTO appointments (practitioner_id, patient_id, start_time, end_time) "
            "SELECT $1::uuid, $2::uuid, t, t + interval '10 minutes' "
            "FROM generate_series(1, 40) AS n, LATERAL (SELECT $3::timestamptz + n * interval '1 minute') AS s(t)",
            practitioner,
            patient.patient_id,
            MONDAY,
        )
    finally:
        await conn.close()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(stream)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert harness.status_of(caught.value).details  # with RetryInfo and the reason
    resumed = watch(partner, resume_token=first.resume_token)
    replayed = [await read(resumed) for _ in range(40)]
    resumed.cancel()
    assert len({c.appointment.appointment_id for c in replayed}) == 40


async def test_each_partner_has_a_limit_on_open_streams(small_gateway: tuple[World, list[str]]) -> None:
    world, _ = small_gateway
    practitioner = await world.practitioner()
    partner = await world.partner("Sync", practitioner)
    streams = [watch(partner) for _ in range(30)]
    for stream in streams:
        await started(stream)

    extra = watch(partner)
    code = await ended_with(extra)
    for stream in streams:
        stream.cancel()

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_streams_woken_by_one_change_each_receive_it_with_their_own_audit_record(world: World) -> None:
    shared = await world.practitioner()
    patient = await world.patient()
    partners = [await world.partner(f"Fan {n}", shared) for n in range(3)]
    # Per partner: two streams on the practitioner, two over every grant.
    streams = [watch(p, practitioner_id=shared if n % 2 else "") for p in partners for n in range(4)]
    for stream in streams:
        await started(stream)

    booked = await world.appointment(shared, patient.patient_id, MONDAY)
    changes = [await read(stream) for stream in streams]

    ids = [c.appointment.appointment_id for c in changes]
    assert [len(set(ids[4 * n : 4 * n + 4])) for n in range(3)] == [1, 1, 1]  # one id per partner
    assert len(set(ids)) == 3  # pseudonyms differ between partners
    for partner in partners:
        records = [
            r for r in await world.disclosures(partner_id=partner.partner_id) if r.rpc.endswith("/WatchAppointments")
        ]
        assert len(records) == 4  # one per stream that was sent the change
        assert {r.appointment_id for r in records} == {booked.appointment_id}
        assert {r.key_id for r in records} == {partner.key_id}

    # One partner's key is revoked: its streams end, the others go on receiving.
    await world.revoke_key(partners[0].key_id)
    for stream in streams[:4]:
        assert await ended_with(stream, within=1.0) == grpc.StatusCode.UNAUTHENTICATED
    await world.appointment(shared, patient.patient_id, MONDAY + timedelta(hours=1))
    later = [await read(stream) for stream in streams[4:]]
    for stream in streams[4:]:
        stream.cancel()
    assert {c.appointment.start_time.ToDatetime().hour for c in later} == {MONDAY.hour + 1}
    assert not [
        r
        for r in await world.disclosures(partner_id=partners[0].partner_id)
        if r.rpc.endswith("/WatchAppointments") and r.appointment_id != booked.appointment_id
    ]


async def test_a_partner_over_its_daily_cap_ends_its_streams_without_holding_back_the_others(world: World) -> None:
    shared = await world.practitioner()
    first, second = await world.patient(), await world.patient()
    capped = await world.partner("Capped", shared)
    other = await world.partner("Other", shared)
    await world.registry.SetPartnerLimits(
        harness.registry_pb.SetPartnerLimitsRequest(partner_id=capped.partner_id, patient_daily_cap=1),
        metadata=world.internal_metadata,
    )
    capped_stream, other_stream = watch(capped), watch(other)
    await started(capped_stream)
    await started(other_stream)

    await world.appointment(shared, first.patient_id, MONDAY)
    assert (await read(capped_stream)).appointment.start_time.ToDatetime() == MONDAY.replace(tzinfo=None)
    await read(other_stream)
    await world.appointment(shared, second.patient_id, MONDAY + timedelta(hours=1))  # a second patient: over the cap

    assert await ended_with(capped_stream) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await read(other_stream)).appointment.start_time.ToDatetime().hour == MONDAY.hour + 1
    other_stream.cancel()
    capped_records = [
        r for r in await world.disclosures(partner_id=capped.partner_id) if r.rpc.endswith("/WatchAppointments")
    ]
    other_records = [
        r for r in await world.disclosures(partner_id=other.partner_id) if r.rpc.endswith("/WatchAppointments")
    ]
    assert len(capped_records) == 1  # the refused delivery left no record
    assert len(other_records) == 2
