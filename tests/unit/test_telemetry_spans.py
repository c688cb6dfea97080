"""The spans Telemetry builds itself: ids, parents, sampling, attributes and status as the SDK would give them."""

from __future__ import annotations

import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from service.telemetry.spans import SCOPE, RedactingSpanExporter
from service.telemetry.tracing import Telemetry, current_trace_id

METHOD = "/appointments.partner.v1.PartnerAppointmentService/ListAppointments"
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STATEMENT = "SELECT id FROM partner_list_appointments($1, $2)"


def _traced(sampler: object = None) -> tuple[Telemetry, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider() if sampler is None else TracerProvider(sampler=sampler)  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(spans)))
    return Telemetry(tracer_provider=provider), spans


def test_a_call_and_its_statements_become_a_server_span_and_its_children() -> None:
    telemetry, spans = _traced()
    before = time.time_ns()
    with telemetry.server_call("partner", METHOD, [("traceparent", PARENT)]) as call:
        trace_id = current_trace_id()
        telemetry.observe_query(STATEMENT, 0.002, None)
        telemetry.observe_query(STATEMENT, 0.001, RuntimeError("boom"))
        call.attributes["apptgate.appointments"] = 50
        telemetry.finish_call(call, "OK", time.perf_counter())

    ok, failed, server = spans.get_finished_spans()
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"  # the caller's trace continues
    assert server.name == METHOD and server.kind is SpanKind.SERVER
    assert server.parent is not None and server.parent.span_id == 0xB7AD6B7169203331 and server.parent.is_remote
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "appointments.partner.v1.PartnerAppointmentService",
        "rpc.method": "ListAppointments",
        "apptgate.listener": "partner",
        "apptgate.appointments": 50,
        "rpc.grpc.status_code": "OK",
    }
    assert server.status.status_code is StatusCode.UNSET
    assert server.instrumentation_scope is not None and server.instrumentation_scope.name == SCOPE
    assert before <= server.start_time <= server.end_time  # type: ignore[operator]
    for child in (ok, failed):
        assert child.kind is SpanKind.CLIENT and child.name == "db SELECT"
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
        assert child.context.span_id not in (0, server.context.span_id)
    assert ok.end_time - ok.start_time == 2_000_000  # type: ignore[operator]
    assert ok.status.status_code is StatusCode.UNSET and "error.type" not in (ok.attributes or {})
    assert failed.status.status_code is StatusCode.ERROR and (failed.attributes or {})["error.type"] == "RuntimeError"
    assert ok.context.span_id != failed.context.span_id


def test_a_failed_call_marks_its_span_as_an_error_and_a_new_trace_starts_without_a_caller() -> None:
    telemetry, spans = _traced()
    with telemetry.server_call("partner", METHOD, None) as call:
        telemetry.finish_call(call, "INTERNAL", time.perf_counter(), "boom")

    [server] = spans.get_finished_spans()
    assert server.parent is None and server.context.trace_id != 0
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["apptgate.error.reason"] == "boom"


def test_a_call_the_sampler_drops_builds_no_span_but_still_carries_its_trace() -> None:
    telemetry, spans = _traced(ALWAYS_OFF)
    with telemetry.server_call("partner", METHOD, [("traceparent", PARENT)]) as call:
        assert current_trace_id() == "0af7651916cd43dd8448eb211c80319c"
        telemetry.observe_query(STATEMENT, 0.001, None)
        telemetry.finish_call(call, "OK", time.perf_counter())

    assert not call.traced
    assert spans.get_finished_spans() == ()
