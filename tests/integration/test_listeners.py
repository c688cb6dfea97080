"""Reflection, health and grpcurl: what a person debugging sees, without credentials."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import Gateway

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(*args: str) -> tuple[int, str, str]:
    """Run the real grpcurl binary; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_health_answers_without_credentials_on_both_listeners(gateway: Gateway) -> None:
    assert gateway.partner and gateway.internal
    for port, service in (
        (gateway.partner.port, "appointments.partner.v1.PartnerAppointmentService"),
        (gateway.internal.port, "appointments.internal.v1.SchedulingService"),
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpcurl_lists_the_partner_service_reflection_and_health(gateway: Gateway) -> None:
    assert gateway.partner
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{gateway.partner.port}", "list")

    assert code == 0, err
    assert set(out.split()) == {
        "appointments.partner.v1.PartnerAppointmentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_the_partner_listener_does_not_expose_internal_services(gateway: Gateway) -> None:
    assert gateway.partner
    address = f"127.0.0.1:{gateway.partner.port}"
    _, out, _ = await grpcurl("-plaintext", address, "list")
    described = {
        symbol: await grpcurl("-plaintext", address, "describe", symbol)
        for symbol in (
            "appointments.internal.v1.ConsentService",
            "appointments.internal.v1.GrantConsentRequest",
            "appointments.internal.v1.SchedulingService.CreatePatient",
        )
    }
    _, _, nonexistent_err = await grpcurl("-plaintext", address, "describe", "appointments.nope.v1.X")

    assert "internal" not in out
    for symbol, (code, out, err) in described.items():
        assert code != 0 and "internal" not in out, symbol  # answered as for a name that does not exist
        assert err.replace(symbol, "appointments.nope.v1.X") == nonexistent_err


async def test_the_internal_listener_describes_its_own_services(gateway: Gateway) -> None:
    assert gateway.internal
    code, out, err = await grpcurl(
        "-plaintext", f"127.0.0.1:{gateway.internal.port}", "describe", "appointments.internal.v1.ConsentService"
    )

    assert code == 0, err
    assert "rpc GrantConsent" in out


async def test_grpcurl_describe_shows_the_commented_types(gateway: Gateway) -> None:
    assert gateway.partner
    code, out, err = await grpcurl(
        "-plaintext", f"127.0.0.1:{gateway.partner.port}", "describe", "appointments.partner.v1.Appointment"
    )

    assert code == 0, err
    assert "partner-scoped pseudonym of the patient" in out
    assert "string patient_ref = 6;" in out


async def test_grpcurl_calls_list_appointments_with_a_key(gateway: Gateway, world: object) -> None:
    from harness import World

    assert isinstance(world, World)
    assert gateway.partner
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("A", practitioner)

    code, out, err = await grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {partner.secret}",
        "-d",
        json.dumps({"start_time": "2030-01-01T00:00:00Z", "end_time": "2030-12-31T00:00:00Z"}),
        f"127.0.0.1:{gateway.partner.port}",
        "appointments.partner.v1.PartnerAppointmentService/ListAppointments",
    )

    assert code == 0, err
    [appointment] = json.loads(out)["appointments"]
    assert appointment["status"] == "APPOINTMENT_STATUS_BOOKED"
    assert appointment["practitioner"]["practitionerId"] == practitioner
    assert "LEAKCHECK" not in out
