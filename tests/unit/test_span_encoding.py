"""service.span_encoding writes the request the SDK's encoder builds; service.span_export posts it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from service.telemetry.otlp_encoding import SpanEncoder
from service.telemetry.otlp_export import OtlpHttpSpanExporter

REMOTE_PARENT = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "abc"), ("other", "x1")]),
)


def _spans() -> list[ReadableSpan]:
    """Spans of every shape the encoder handles, from two resources and three scopes."""
    spans: list[ReadableSpan] = []
    for resource in (
        Resource({"service.name": "apptgate", "service.instance.id": "w1", "host.cpus": 2}),
        Resource({"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
    ):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(SimpleSpanProcessor(memory))
        plain = provider.get_tracer("apptgate")
        versioned = provider.get_tracer(
            "lib", "1.2.3", schema_url="https://example.test/schema", attributes={"scope.flag": True}
        )
        parent = trace.set_span_in_context(NonRecordingSpan(REMOTE_PARENT))
        with plain.start_as_current_span(
            "/appointments.partner.v1.PartnerAppointmentService/ListAppointments",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "apptgate.appointments": 50, "apptgate.consent.presented": False},
        ) as server:
            server.set_attributes(
                {
                    "negative": -7,
                    "large": 2**62,
                    "ratio": 0.25,
                    "blob": b"\x00\xff",
                    "empty": "",
                    "names": ["a", "", "ü"],
                    "numbers": [1, -2, 3],
                    "flags": [True, False],
                    "mixed": True,
                    "one": 1,  # the same value as True, of another type
                }
            )
            with plain.start_as_current_span("db SELECT", kind=SpanKind.CLIENT) as child:
                child.add_event("exception", {"exception.type": "ValueError", "count": 3})
                child.add_event("bare")
                child.set_status(Status(StatusCode.ERROR, "text kept by this exporter's input"))
            linked = versioned.start_span(
                "linked", links=[Link(REMOTE_PARENT, {"link.kind": "follows"}), Link(server.get_span_context())]
            )
            linked.set_status(Status(StatusCode.OK))
            linked.end()
        spans.extend(memory.get_finished_spans())
    return spans


def test_the_encoding_decodes_to_the_sdk_encoders_message() -> None:
    spans = _spans()
    ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert ours == encode_spans(spans)
    # The fixture covers what it claims: two resources, a remote parent with a trace state, events, links.
    assert len(ours.resource_spans) == 2
    server = ours.resource_spans[0].scope_spans[0].spans[-1]
    assert server.trace_state == "vendor=abc,other=x1"
    assert server.flags == 0x300
    assert {len(s.events) for s in ours.resource_spans[0].scope_spans[0].spans} == {0, 2}
    assert len(ours.resource_spans[0].scope_spans[1].spans[0].links) == 2


def test_an_encoder_reused_across_batches_gives_the_same_bytes() -> None:
    spans = _spans()
    encoder = SpanEncoder()
    first = encoder.encode(spans)
    assert encoder.encode(spans) == first  # from its memos this time
    assert encoder.encode(spans[:1]) == SpanEncoder().encode(spans[:1])
    assert encoder.encode([]) == b""


def test_an_attribute_of_a_type_otlp_cannot_carry_is_left_out_and_the_span_kept() -> None:
    span = ReadableSpan(
        "odd", context=REMOTE_PARENT, attributes={"kept": "yes", "object": object()}, resource=Resource({})
    )
    decoded = ExportTraceServiceRequest.FromString(SpanEncoder().encode([span]))
    (only,) = decoded.resource_spans[0].scope_spans[0].spans
    assert [a.key for a in only.attributes] == ["kept"]


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, bytes]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def test_the_exporter_posts_our_encoding_through_the_sdk_transport(collector: list[tuple[str, str, bytes]]) -> None:
    exporter = OtlpHttpSpanExporter()
    # The pinned SDK (constraints.txt) takes the fast path; if an upgrade loses it, this says so.
    assert exporter.encodes_batches
    spans = _spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()
    (path, content_type, body) = collector[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert ExportTraceServiceRequest.FromString(body) == encode_spans(spans)
