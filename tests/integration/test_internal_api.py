"""The internal listener: its token, and the scheduling and registry contracts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import scheduling_pb2
from harness import MONDAY, World, registry_pb, scheduling_pb, ts


async def _fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-token-" + "y" * 40),)])
async def test_internal_calls_need_the_internal_token(world: World, metadata: tuple[tuple[str, str], ...]) -> None:
    request = scheduling_pb.CreatePractitionerRequest(display_name="Dr. X", specialty="Y")

    await _fails(world.scheduling.CreatePractitioner(request, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED)


async def test_a_partner_key_does_not_open_the_internal_listener(world: World) -> None:
    partner = await world.partner("A")
    request = scheduling_pb.CreatePractitionerRequest(display_name="Dr. X", specialty="Y")

    await _fails(
        world.scheduling.CreatePractitioner(request, metadata=partner.metadata), grpc.StatusCode.UNAUTHENTICATED
    )


async def test_a_patient_is_created_with_its_contact_details(world: World) -> None:
    patient = await world.patient(given_name="Leakcheckgiven", phone="+33612345678", email="a.b@example.invalid")

    assert patient.given_name == "Leakcheckgiven"
    assert patient.phone == "+33612345678"
    assert patient.email == "a.b@example.invalid"
    assert patient.create_time.seconds > 0


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"given_name": ""}, {"given_name"}),
        ({"family_name": " "}, {"family_name"}),
        ({"phone": "0612345678"}, {"phone"}),
        ({"email": "not-an-email"}, {"email"}),
        ({"sex": 9}, {"sex"}),
        ({"given_name": "x" * 201, "email": "@"}, {"given_name", "email"}),
    ],
)
async def test_malformed_patients_are_refused_naming_the_fields(
    world: World, fields: dict[str, Any], bad: set[str]
) -> None:
    error = await _fails(world.patient(**fields), grpc.StatusCode.INVALID_ARGUMENT)

    assert harness.bad_fields(error) == bad
    # The refused values are not echoed back.
    assert "x" * 50 not in str(harness.status_of(error))


async def test_an_appointment_with_unknown_practitioner_or_patient_is_not_found(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    unknown = "00000000-0000-4000-8000-000000000001"

    await _fails(world.appointment(unknown, patient.patient_id), grpc.StatusCode.NOT_FOUND)
    await _fails(world.appointment(practitioner, unknown), grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("minutes", [0, -30, 24 * 60 + 1])
async def test_an_appointment_needs_a_sane_time_range(world: World, minutes: int) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()

    error = await _fails(
        world.appointment(practitioner, patient.patient_id, MONDAY, minutes=minutes), grpc.StatusCode.INVALID_ARGUMENT
    )

    assert harness.bad_fields(error) == {"end_time"}


async def test_cancelling_twice_is_a_failed_precondition(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    appointment = await world.appointment(practitioner, patient.patient_id)
    request = scheduling_pb.CancelAppointmentRequest(appointment_id=appointment.appointment_id)

    cancelled = await world.scheduling.CancelAppointment(request, metadata=world.internal_metadata)
    error = await _fails(
        world.scheduling.CancelAppointment(request, metadata=world.internal_metadata),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    assert cancelled.status == scheduling_pb2.APPOINTMENT_STATUS_CANCELLED
    assert harness.error_info(error).reason == "APPOINTMENT_ALREADY_CANCELLED"


async def test_duplicates_are_already_exists(world: World) -> None:
    practitioner = await world.practitioner()
    partner = await world.partner("Same name", practitioner)

    await _fails(world.partner("Same name"), grpc.StatusCode.ALREADY_EXISTS)
    await _fails(world.grant(partner.partner_id, practitioner), grpc.StatusCode.ALREADY_EXISTS)


async def test_grants_and_keys_of_unknown_things_are_not_found(world: World) -> None:
    practitioner = await world.practitioner()
    partner = await world.partner("A")
    unknown = "00000000-0000-4000-8000-000000000002"

    await _fails(world.grant(unknown, practitioner), grpc.StatusCode.NOT_FOUND)
    await _fails(world.grant(partner.partner_id, unknown), grpc.StatusCode.NOT_FOUND)
    await _fails(world.revoke_grant(partner.partner_id, practitioner), grpc.StatusCode.NOT_FOUND)
    await _fails(world.revoke_key("pk_" + "a" * 16), grpc.StatusCode.NOT_FOUND)
    await _fails(
        world.registry.IssuePartnerKey(
            registry_pb.IssuePartnerKeyRequest(partner_id=unknown), metadata=world.internal_metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_a_key_secret_is_shown_once_and_revocation_is_reported(world: World) -> None:
    partner = await world.partner("A")

    revoked = await world.registry.RevokePartnerKey(
        registry_pb.RevokePartnerKeyRequest(key_id=partner.key_id), metadata=world.internal_metadata
    )
    again = world.revoke_key(partner.key_id)

    assert partner.secret.startswith(partner.key_id + ".")
    assert revoked.secret == ""
    assert revoked.HasField("revoke_time")
    await _fails(again, grpc.StatusCode.FAILED_PRECONDITION)


async def test_a_key_secret_is_stored_only_as_a_hash(world: World, database_dsn: str) -> None:
    import asyncpg

    partner = await world.partner("A")
    conn = await asyncpg.connect(database_dsn)
    try:
        dump = await conn.fetch("SELECT * FROM partner_keys")
    finally:
        await conn.close()

    secret_part = partner.secret.split(".", 1)[1]
    assert dump
    assert secret_part not in str([dict(r) for r in dump])
    assert secret_part.encode() not in b"".join(r["secret_hash"] for r in dump)


async def test_an_appointment_window_edge_is_half_open(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=1))
    partner = await world.partner("A", practitioner)

    page = await partner.list(start_time=ts(MONDAY), end_time=ts(MONDAY + timedelta(hours=1)))

    assert len(page.appointments) == 1
    assert page.appointments[0].start_time.ToDatetime().replace(tzinfo=MONDAY.tzinfo) == MONDAY


@pytest.mark.parametrize("key_id", ["\x00", "pk_unknown", "pk_" + "A" * 16, "x" * 500])
async def test_a_malformed_key_id_is_invalid_argument_not_internal(world: World, key_id: str) -> None:
    # Found by the fuzzer: a NUL character used to reach PostgreSQL and come back as INTERNAL.
    error = await _fails(world.revoke_key(key_id), grpc.StatusCode.INVALID_ARGUMENT)
    assert harness.bad_fields(error) == {"key_id"}

    report = world.audit.BreachReport(
        harness.audit_pb.BreachReportRequest(
            partner_id="00000000-0000-4000-8000-000000000003",
            start_time=ts(MONDAY),
            end_time=ts(MONDAY + timedelta(days=1)),
            key_id=key_id,
        ),
        metadata=world.internal_metadata,
    )
    error = await _fails(report, grpc.StatusCode.INVALID_ARGUMENT)
    assert harness.bad_fields(error) == {"key_id"}
