"""Traces, metrics and logs show every call, and never a personal value.

The gateway here records everything (tracing at 100%, metrics, JSON logs);
every RPC of both listeners is driven through success and failure. What the
exporters receive, what the metric reader holds and every log line are then
searched for the seeded personal values, tokens and secrets.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import harness
import pytest
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_NAME
from google.protobuf.duration_pb2 import Duration
from harness import MONDAY, World, ts
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database
from service.telemetry.logs import JsonFormatter
from service.telemetry.spans import RedactingSpanExporter
from service.telemetry.tracing import Telemetry, metric_views

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Captured:
    """Everything telemetry emitted during a test."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.logs = io.StringIO()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(self.spans)))
        meter_provider = MeterProvider(metric_readers=[self.metrics], views=metric_views())
        self.telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metric_points(self) -> dict[str, list[Any]]:
        data = self.metrics.get_metrics_data()
        found: dict[str, list[Any]] = {}
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found

    def access_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if '"event": "rpc"' in line]

    def everything(self) -> str:
        spans = [span.to_json() for span in self.finished()]
        data = self.metrics.get_metrics_data()
        return "\n".join([*spans, data.to_json() if data else "", self.logs.getvalue()])


@pytest.fixture
async def captured(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[tuple[Captured, World]]:
    capture = Captured()
    handler = logging.StreamHandler(capture.logs)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    database = await Database.connect(database_dsn, min_size=1, max_size=4, on_query=capture.telemetry.observe_query)
    capture.telemetry.observe_pool(database.pool_usage)
    gateway = Gateway(
        replace(settings), database, Secrets(os.urandom(32), keyring, data_keys), telemetry=capture.telemetry
    )
    try:
        async with harness.serving(gateway) as world:
            yield capture, world
    finally:
        await database.close()
        root.removeHandler(handler)
        root.setLevel(previous_level)


async def _swallow(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _consent_request_calls(
    world: World, partner: harness.PartnerHandle, appointment_id: str, patient_id: str
) -> tuple[list[grpc.StatusCode], str]:
    """Every consent request call, with distinctive partner text: their codes, and the approved request's id."""
    meta, pb, cpb = world.internal_metadata, harness.partner_pb, harness.consent_pb
    ttl = Duration(seconds=3600)
    ask = partner.stub.RequestContactAccess(
        pb.RequestContactAccessRequest(
            appointment_id=appointment_id,
            fields=[CONTACT_FIELD_EMAIL],
            purpose="LEAKPURPOSE reminders",
            message="LEAKMESSAGE hello",
            ttl=ttl,
        ),
        metadata=partner.metadata,
    )
    asked = await ask
    stream = partner.stub.WatchConsentRequests(pb.WatchConsentRequestsRequest(), metadata=partner.metadata)
    await stream.initial_metadata()
    other = await partner.stub.RequestContactAccess(
        pb.RequestContactAccessRequest(
            appointment_id=appointment_id, fields=[CONTACT_FIELD_NAME], purpose="LEAKPURPOSE two", ttl=ttl
        ),
        metadata=partner.metadata,
    )
    await stream.read()
    stream.cancel()
    listed = await world.consents.ListConsentRequests(
        cpb.ListConsentRequestsRequest(patient_id=patient_id), metadata=meta
    )
    by_state = {r.fields[0]: r.consent_request_id for r in listed.consent_requests}
    codes = [
        await _swallow(
            partner.stub.RequestContactAccess(  # ALREADY_EXISTS
                pb.RequestContactAccessRequest(
                    appointment_id=appointment_id, fields=[CONTACT_FIELD_EMAIL], purpose="LEAKPURPOSE", ttl=ttl
                ),
                metadata=partner.metadata,
            )
        ),
        await _swallow(
            world.consents.DenyConsentRequest(
                cpb.DenyConsentRequestRequest(consent_request_id=by_state[CONTACT_FIELD_NAME]), metadata=meta
            )
        ),
        await _swallow(
            partner.stub.CancelConsentRequest(  # FAILED_PRECONDITION: denied already
                pb.CancelConsentRequestRequest(consent_request_id=other.consent_request_id), metadata=partner.metadata
            )
        ),
        await _swallow(
            world.consents.ApproveConsentRequest(
                cpb.ApproveConsentRequestRequest(consent_request_id=by_state[CONTACT_FIELD_EMAIL]), metadata=meta
            )
        ),
    ]
    assert codes == [
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OK,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OK,
    ]
    return codes, asked.consent_request_id


async def test_no_personal_value_token_or_secret_reaches_spans_metrics_or_logs(
    captured: tuple[Captured, World],
) -> None:
    capture, world = captured
    meta = world.internal_metadata
    practitioner = await world.practitioner()
    patient = await world.patient(
        given_name="Zebulonleak",
        family_name="QUAXWORTH-LEAK",
        phone="+33611122233",
        email="quaxworth.leak@example.invalid",
    )
    appointment = await world.appointment(practitioner, patient.patient_id, reason="LEAKREASON chest pain")
    partner = await world.partner("Telemetry partner", practitioner)
    consent = await world.consent(
        patient.patient_id, partner.partner_id, [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL], purpose="LEAKPURPOSE consent"
    )
    [listed] = await partner.list_all()
    codes = [
        await _swallow(partner.get(listed.appointment_id)),
        await _swallow(partner.contact(listed.appointment_id, consent.token)),
        await _swallow(partner.contact(listed.appointment_id, "")),  # CONSENT_REQUIRED
        await _swallow(partner.contact(listed.appointment_id, consent.token[:-4] + "AAAA")),  # CONSENT_INVALID
        await _swallow(partner.get("apt_" + "b" * 25 + "a")),  # NOT_FOUND
        await _swallow(partner.list(page_size=-1)),  # INVALID_ARGUMENT
        await _swallow(
            partner.stub.ListConsentKeys(harness.partner_pb.ListConsentKeysRequest(), metadata=partner.metadata)
        ),
        await _swallow(
            partner.stub.GetAppointment(
                harness.partner_pb.GetAppointmentRequest(appointment_id=listed.appointment_id),
                metadata=(("authorization", f"Bearer {partner.secret[:-1]}x"),),
            )
        ),
        await _swallow(
            world.scheduling.CreatePatient(
                harness.scheduling_pb.CreatePatientRequest(
                    given_name="Zebulonleak", family_name="QUAXWORTH-LEAK", email="not-an-email-LEAK"
                ),
                metadata=meta,
            )
        ),
        await _swallow(
            world.scheduling.CreatePractitioner(
                harness.scheduling_pb.CreatePractitionerRequest(display_name="x", specialty="y"),
                metadata=(("authorization", "Bearer " + "w" * 40),),
            )
        ),
        await _swallow(
            world.scheduling.CancelAppointment(
                harness.scheduling_pb.CancelAppointmentRequest(appointment_id=appointment.appointment_id), metadata=meta
            )
        ),
        await _swallow(
            world.consents.ListConsents(
                harness.consent_pb.ListConsentsRequest(patient_id=patient.patient_id), metadata=meta
            )
        ),
        await _swallow(
            world.consents.RevokeConsent(
                harness.consent_pb.RevokeConsentRequest(consent_id=consent.consent_id), metadata=meta
            )
        ),
        await _swallow(partner.contact(listed.appointment_id, consent.token)),  # CONSENT_REVOKED
        await _swallow(world.audit.ListDisclosures(harness.audit_pb.ListDisclosuresRequest(), metadata=meta)),
        await _swallow(
            world.audit.BreachReport(
                harness.audit_pb.BreachReportRequest(
                    partner_id=partner.partner_id,
                    start_time=ts(MONDAY - timedelta(days=9999)),
                    end_time=ts(MONDAY + timedelta(days=9999)),
                ),
                metadata=meta,
            )
        ),
    ]
    history = await world.audit.ListPatientDisclosures(
        harness.audit_pb.ListPatientDisclosuresRequest(patient_id=patient.patient_id), metadata=meta
    )
    assert any(entry.purpose for entry in history.disclosures)  # the consent's purpose went out, not into telemetry
    request_codes, approved_id = await _consent_request_calls(world, partner, listed.appointment_id, patient.patient_id)
    codes += request_codes
    approved = await partner.stub.GetConsentRequest(
        harness.partner_pb.GetConsentRequestRequest(consent_request_id=approved_id), metadata=partner.metadata
    )
    codes += [
        await _swallow(world.registry.ListPartners(harness.registry_pb.ListPartnersRequest(), metadata=meta)),
        await _swallow(
            world.registry.ListPartnerKeys(
                harness.registry_pb.ListPartnerKeysRequest(partner_id=partner.partner_id), metadata=meta
            )
        ),
        await _swallow(world.revoke_grant(partner.partner_id, practitioner)),
        await _swallow(world.revoke_key(partner.key_id)),
        await _swallow(partner.list()),  # UNAUTHENTICATED after revocation
    ]
    assert grpc.StatusCode.PERMISSION_DENIED in codes and grpc.StatusCode.NOT_FOUND in codes
    assert grpc.StatusCode.UNAUTHENTICATED in codes and grpc.StatusCode.INVALID_ARGUMENT in codes
    # The server records a call (span, metrics, access line) as it ends, which for a refused call
    # is just after the status went out: the client can have its answer first. Wait for the record
    # of the last call before looking at what was emitted.
    last_call = ("/appointments.partner.v1.PartnerAppointmentService/ListAppointments", "UNAUTHENTICATED")
    assert await harness.eventually(
        lambda: any((line.get("method"), line.get("code")) == last_call for line in capture.access_lines())
    )

    emitted = capture.everything()
    secrets = [
        "Zebulonleak",
        "QUAXWORTH",
        "quaxworth",
        "+33611122233",
        "33611122233",
        "LEAKREASON",
        "chest pain",
        consent.token,
        consent.token[10:40],
        approved.consent_token,
        approved.consent_token[10:40],
        "LEAKPURPOSE",
        "LEAKMESSAGE",
        partner.secret,
        partner.secret.split(".")[1],
        harness.INTERNAL_TOKEN,
        "w" * 40,
        patient.given_name,
        patient.email,
    ]
    leaks = [value for value in secrets if value in emitted]
    assert leaks == []

    spans = capture.finished()
    rpc_spans = {s.name: s for s in spans if s.kind.name == "SERVER"}
    assert "/appointments.partner.v1.PartnerAppointmentService/GetAppointmentContact" in rpc_spans
    assert "/appointments.internal.v1.AuditService/BreachReport" in rpc_spans
    contact_codes = {
        s.attributes["rpc.grpc.status_code"] for s in spans if s.name.endswith("GetAppointmentContact") and s.attributes
    }
    assert contact_codes == {"OK", "PERMISSION_DENIED"}
    outcomes = {s.attributes.get("apptgate.consent.outcome") for s in spans if s.attributes}
    assert {"GRANTED", "CONSENT_REQUIRED", "CONSENT_INVALID", "CONSENT_REVOKED"} <= outcomes
    listing = next(
        s for s in spans if s.name.endswith("/ListAppointments") and s.attributes.get("apptgate.appointments")
    )
    assert listing.attributes["apptgate.partner_id"] == partner.partner_id
    assert listing.attributes["apptgate.view"] == "basic"
    db_spans = [s for s in spans if s.name.startswith("db ")]
    assert db_spans, "no database spans"
    assert all(s.parent is not None for s in db_spans)
    assert any(s.parent.span_id == listing.context.span_id for s in db_spans if s.parent), "no read under its call"
    assert any("partner_record_refusal" in str(s.attributes.get("db.statement")) for s in db_spans)

    points = capture.metric_points()
    assert {
        "rpc.server.duration",
        "apptgate.disclosures",
        "apptgate.consent.denials",
        "apptgate.db.pool.connections",
    } <= set(points)
    denial_reasons = {p.attributes["reason"] for p in points["apptgate.consent.denials"]}
    assert denial_reasons == {"CONSENT_REQUIRED", "CONSENT_INVALID", "CONSENT_REVOKED"}
    disclosed = {(p.attributes["view"], p.attributes["contact_field"]) for p in points["apptgate.disclosures"]}
    assert {("basic", "none"), ("contact", "name"), ("contact", "email")} <= disclosed
    statuses = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]) for p in points["rpc.server.duration"]
    }
    assert ("/appointments.partner.v1.PartnerAppointmentService/ListAppointments", "UNAUTHENTICATED") in statuses

    access = capture.access_lines()
    assert len(access) >= len(codes)
    assert all({"method", "code", "duration_ms", "trace_id"} <= set(line) for line in access)
    assert any(line.get("partner_id") == partner.partner_id for line in access)


async def test_the_callers_trace_continues_and_the_audit_record_carries_it(captured: tuple[Captured, World]) -> None:
    capture, world = captured
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Traced", practitioner)

    await partner.stub.ListAppointments(
        harness.partner_pb.ListAppointmentsRequest(
            start_time=ts(MONDAY - timedelta(days=1)), end_time=ts(MONDAY + timedelta(days=30))
        ),
        metadata=(*partner.metadata, ("traceparent", TRACEPARENT)),
    )

    trace_id = TRACEPARENT.split("-")[1]
    [server_span] = [s for s in capture.finished() if s.name.endswith("/ListAppointments")]
    assert format(server_span.context.trace_id, "032x") == trace_id
    assert server_span.parent is not None and format(server_span.parent.span_id, "016x") == "00f067aa0ba902b7"
    [record] = await world.disclosures(partner_id=partner.partner_id)
    assert record.trace_id == trace_id


async def test_without_tracing_the_audit_record_still_carries_the_callers_trace_id(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Untraced", practitioner)

    await partner.stub.ListAppointments(
        harness.partner_pb.ListAppointmentsRequest(
            start_time=ts(MONDAY - timedelta(days=1)), end_time=ts(MONDAY + timedelta(days=30))
        ),
        metadata=(*partner.metadata, ("traceparent", TRACEPARENT)),
    )

    [record] = await world.disclosures(partner_id=partner.partner_id)
    assert record.trace_id == TRACEPARENT.split("-")[1]


async def test_console_exporter_prints_spans_for_grpcurl_calls_without_personal_data(
    database_dsn: str, tmp_path: Path
) -> None:
    partner_port, internal_port = harness.free_port(), harness.free_port()
    env = harness.environment(
        DATABASE_URL=database_dsn,
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{partner_port}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{internal_port}",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="apptgate-console-test",
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await harness.wait_for_port(internal_port)
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
        patient = json.dumps(
            {"given_name": "Consoleleak", "family_name": "CONSOLE-LEAK", "email": "console.leak@example.invalid"}
        )
        process = await asyncio.create_subprocess_exec(
            grpcurl,
            "-plaintext",
            "-H",
            f"authorization: Bearer {harness.INTERNAL_TOKEN}",
            "-d",
            patient,
            f"127.0.0.1:{internal_port}",
            "appointments.internal.v1.SchedulingService/CreatePatient",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert b"Consoleleak" in out  # the internal caller gets the patient back...
    finally:
        server.terminate()
        stdout, stderr = await asyncio.wait_for(server.communicate(), timeout=30)
    printed = stdout.decode()
    # ...but the span printed for that call holds none of it.
    assert "/appointments.internal.v1.SchedulingService/CreatePatient" in printed
    assert "apptgate-console-test" in printed
    assert "Consoleleak" not in printed + stderr.decode()
    assert "console.leak" not in printed + stderr.decode()
    assert harness.INTERNAL_TOKEN not in printed + stderr.decode()
