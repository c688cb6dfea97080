"""Who sees what: grants, partner-scoped ids, revocation, and NOT_FOUND for everything not yours."""

from __future__ import annotations

import base64
import os
from datetime import timedelta

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.partner.v1 import appointment_pb2
from harness import MONDAY, World, ts


async def _not_found(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    return caught.value


def _fingerprint(error: grpc.aio.AioRpcError) -> tuple[object, ...]:
    """Everything a caller can observe of an error."""
    return (error.code(), error.details(), harness.status_of(error).SerializeToString())


async def test_partners_see_only_practitioners_that_granted_them(world: World) -> None:
    shared, only_a, only_b, nobody = [await world.practitioner() for _ in range(4)]
    patient = await world.patient()
    booked = {p: await world.appointment(p, patient.patient_id) for p in (shared, only_a, only_b, nobody)}
    partner_a = await world.partner("A", shared, only_a)
    partner_b = await world.partner("B", shared, only_b)

    seen_a = {a.practitioner.practitioner_id for a in await partner_a.list_all()}
    seen_b = {a.practitioner.practitioner_id for a in await partner_b.list_all()}

    assert seen_a == {shared, only_a}
    assert seen_b == {shared, only_b}
    assert len(booked) == 4


async def test_the_same_appointment_has_unrelated_ids_for_two_partners_and_stable_ids_for_one(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    for hour in range(3):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner_a = await world.partner("A", practitioner)
    partner_b = await world.partner("B", practitioner)

    first_a, again_a, seen_b = await partner_a.list_all(), await partner_a.list_all(), await partner_b.list_all()

    assert [a.appointment_id for a in first_a] == [a.appointment_id for a in again_a]
    assert not {a.appointment_id for a in first_a} & {a.appointment_id for a in seen_b}
    # One patient: one reference per partner, and the two partners' references differ.
    assert len({a.patient_ref for a in first_a}) == 1
    assert first_a[0].patient_ref != seen_b[0].patient_ref
    assert all(a.appointment_id.startswith("apt_") and a.patient_ref.startswith("pat_") for a in first_a)
    # Internal identifiers never appear.
    assert patient.patient_id not in str(first_a)


async def test_times_are_whole_seconds_so_two_partners_cannot_match_rows_by_them(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(microseconds=123_456))
    partner = await world.partner("A", practitioner)
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("UPDATE appointments SET update_time = '2030-03-01T10:00:00.654321Z'")
        stored = await conn.fetchval("SELECT update_time FROM appointments")
    finally:
        await conn.close()

    [listed] = await partner.list_all()
    got = await partner.get(listed.appointment_id)

    assert stored.microsecond == 654_321  # the database keeps microseconds
    for message in (listed, got):
        assert (message.start_time.nanos, message.end_time.nanos, message.update_time.nanos) == (0, 0, 0)
        assert message.start_time.seconds == int(MONDAY.timestamp())
        assert message.update_time.seconds == int(stored.timestamp())  # truncated, never rounded up


async def test_not_yours_answers_exactly_like_nonexistent(world: World) -> None:
    mine, theirs, ungranted = await world.practitioner(), await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    await world.appointment(mine, patient.patient_id)
    await world.appointment(theirs, patient.patient_id)
    await world.appointment(ungranted, patient.patient_id)
    partner_a = await world.partner("A", mine)
    partner_b = await world.partner("B", theirs, ungranted)
    b_ids = [a.appointment_id for a in await partner_b.list_all()]
    await world.revoke_grant(partner_b.partner_id, ungranted)
    still_visible = {a.appointment_id for a in await partner_b.list_all()}
    [revoked_id] = [i for i in b_ids if i not in still_visible]
    random_id = "apt_" + base64.b32encode(os.urandom(16)).decode().rstrip("=").lower()

    errors = [
        await _not_found(partner_a.get(b_ids[0])),  # issued to another partner
        await _not_found(partner_a.get(random_id)),  # does not exist
        await _not_found(partner_b.get(revoked_id)),  # grant revoked
    ]

    assert len({_fingerprint(e) for e in errors}) == 1


async def test_listing_a_practitioner_not_granted_is_not_found(world: World) -> None:
    granted, other = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    await world.appointment(other, patient.patient_id)
    partner = await world.partner("A", granted)

    not_granted = await _not_found(partner.list(practitioner_id=other))
    nonexistent = await _not_found(partner.list(practitioner_id="00000000-0000-4000-8000-000000000000"))

    assert _fingerprint(not_granted) == _fingerprint(nonexistent)
    assert (await partner.list(practitioner_id=granted)).appointments == []


async def test_a_revoked_grant_takes_effect_on_the_next_call(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("A", practitioner)
    [appointment] = await partner.list_all()

    await world.revoke_grant(partner.partner_id, practitioner)

    assert await partner.list_all() == []
    await _not_found(partner.get(appointment.appointment_id))
    await world.grant(partner.partner_id, practitioner)
    assert (await partner.get(appointment.appointment_id)) == appointment


async def test_a_page_token_grants_nothing_after_revocation(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    for hour in range(4):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner = await world.partner("A", practitioner)
    first = await partner.list(page_size=2)
    assert first.next_page_token

    await world.revoke_grant(partner.partner_id, practitioner)

    rest = await partner.list(page_size=2, page_token=first.next_page_token)
    assert list(rest.appointments) == []
    assert rest.next_page_token == ""


async def test_a_revoked_key_fails_on_its_next_call(world: World) -> None:
    partner = await world.partner("A")
    await partner.list()

    await world.revoke_key(partner.key_id)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.list()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.error_info(caught.value).reason == "INVALID_CREDENTIALS"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "CREDENTIALS_MISSING"),
        ((("authorization", "Bearer not-a-key"),), "INVALID_CREDENTIALS"),
        ((("authorization", "Bearer pk_aaaaaaaaaaaaaaaa." + "A" * 43),), "INVALID_CREDENTIALS"),
    ],
)
async def test_missing_or_unknown_keys_are_unauthenticated(
    world: World, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    partner = await world.partner("A")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.stub.ListAppointments(
            harness.partner_pb.ListAppointmentsRequest(start_time=ts(MONDAY), end_time=ts(MONDAY + timedelta(days=1))),
            metadata=metadata,
        )

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.error_info(caught.value).reason == reason


async def test_a_wrong_secret_for_a_real_key_id_is_unauthenticated(world: World) -> None:
    partner = await world.partner("A")
    forged = partner.secret[: partner.secret.index(".") + 1] + "B" * 43

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.stub.ListAppointments(
            harness.partner_pb.ListAppointmentsRequest(start_time=ts(MONDAY), end_time=ts(MONDAY + timedelta(days=1))),
            metadata=(("authorization", f"Bearer {forged}"),),
        )

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_cancelled_appointments_stay_visible_with_their_status(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    appointment = await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("A", practitioner)
    await world.scheduling.CancelAppointment(
        harness.scheduling_pb.CancelAppointmentRequest(appointment_id=appointment.appointment_id),
        metadata=world.internal_metadata,
    )

    [seen] = await partner.list_all()

    assert seen.status == appointment_pb2.APPOINTMENT_STATUS_CANCELLED
    # Partners see whole seconds: the cancellation's time, never before the booking's second.
    assert seen.update_time.ToDatetime() >= appointment.update_time.ToDatetime().replace(microsecond=0)
