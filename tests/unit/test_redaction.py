"""The one telemetry filter: what it keeps and what it drops, including the known leaks."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from service.telemetry import redaction
from service.telemetry.logs import JsonFormatter, exception_fields
from service.telemetry.spans import RedactingSpanExporter
from service.telemetry.tracing import metric_views

DETAIL = (
    'duplicate key value violates unique constraint "patients_email_key"\n'
    "DETAIL: Key (email)=(leak.me@example.invalid) already exists."
)


def _export_one(build: object) -> object:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(memory)))
    tracer = provider.get_tracer("test")
    build(tracer)  # type: ignore[operator]
    [span] = memory.get_finished_spans()
    return span


def test_exception_events_keep_their_class_but_not_the_postgresql_detail() -> None:
    def build(tracer: object) -> None:
        with tracer.start_as_current_span("db INSERT") as span:  # type: ignore[attr-defined]
            span.record_exception(ValueError(DETAIL))
            span.set_status(Status(StatusCode.ERROR, DETAIL))

    span = _export_one(build)

    text = span.to_json()  # type: ignore[attr-defined]
    assert "leak.me" not in text and "DETAIL" not in text
    assert span.events[0].attributes == {"exception.type": "ValueError"}  # type: ignore[attr-defined]
    assert span.status.status_code == StatusCode.ERROR and span.status.description is None  # type: ignore[attr-defined]


def test_abort_text_recorded_as_a_status_description_is_dropped() -> None:
    def build(tracer: object) -> None:
        with tracer.start_as_current_span("/pkg.Service/Method") as span:  # type: ignore[attr-defined]
            span.set_status(Status(StatusCode.ERROR, "patient Zebulon Leak not found"))

    assert "Zebulon" not in _export_one(build).to_json()  # type: ignore[attr-defined]


def test_unknown_attributes_parameters_and_odd_span_names_are_dropped() -> None:
    def build(tracer: object) -> None:
        with tracer.start_as_current_span("lookup leak.me@example.invalid") as span:  # type: ignore[attr-defined]
            span.set_attribute(
                "db.statement", "SELECT * FROM patients WHERE email = 'leak.me@example.invalid' AND id = 42"
            )
            span.set_attribute("db.statement.parameters", "('leak.me@example.invalid',)")
            span.set_attribute("patient.email", "leak.me@example.invalid")
            span.set_attribute("rpc.method", "GetAppointment")

    span = _export_one(build)

    assert span.name == "redacted"  # type: ignore[attr-defined]
    assert dict(span.attributes) == {  # type: ignore[attr-defined]
        "db.statement": "SELECT * FROM patients WHERE email = ? AND id = ?",
        "rpc.method": "GetAppointment",
    }


def test_a_span_within_the_policy_is_passed_as_it_is_and_any_other_is_reduced() -> None:
    received: list[object] = []

    class Keep(InMemorySpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            received.extend(spans)  # type: ignore[call-overload]
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    clean = {"db.system": "postgresql", "db.statement": "SELECT f($1, $2)", "apptgate.appointments": 50}
    for attributes in (
        clean,
        {**clean, "db.statement": "SELECT f($1,\n  'leak.me@example.invalid')"},  # a literal, and unfolded text
        {**clean, "apptgate.view": "x" * 300},  # too long to be a label
        {**clean, "patient.email": "leak.me@example.invalid"},
    ):
        with tracer.start_as_current_span("db SELECT", attributes=attributes):
            pass
    spans = memory.get_finished_spans()

    RedactingSpanExporter(Keep()).export(spans)

    assert received[0] is spans[0]
    assert all(r is not s for r, s in zip(received[1:], spans[1:], strict=True))
    assert [dict(r.attributes) for r in received[1:]] == [  # type: ignore[attr-defined]
        {**clean, "db.statement": "SELECT f($1, ?)"},
        clean,
        clean,
    ]


def test_scrub_sql_replaces_literals_and_keeps_placeholders() -> None:
    assert (
        redaction.scrub_sql("UPDATE t SET a = 'x''y', b = 3.5 WHERE id = $1")
        == "UPDATE t SET a = ?, b = ? WHERE id = $1"
    )
    assert redaction.scrub_sql("SELECT $tag$secret$tag$, col1 FROM t2") == "SELECT ?, col1 FROM t2"


def test_metric_labels_outside_the_allowlist_never_reach_the_reader() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader], views=metric_views()).get_meter("test")
    counter = meter.create_counter("c")

    counter.add(1, {"view": "basic", "email": "leak.me@example.invalid"})

    data = reader.get_metrics_data()
    assert data is not None
    assert "leak.me" not in data.to_json()
    point = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0]
    assert dict(point.attributes) == {"view": "basic"}


def test_json_logs_keep_allowed_fields_and_log_exceptions_without_their_message() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError(DETAIL)
        except ValueError:
            logger.exception("lookup failed", extra={"method": "/a.B/C", "email": "leak.me@example.invalid"})
    finally:
        logger.removeHandler(handler)

    line = json.loads(stream.getvalue())
    assert line["message"] == "lookup failed"
    assert line["method"] == "/a.B/C"
    assert line["exception_type"] == "ValueError"
    assert "leak.me" not in stream.getvalue() and "email" not in line


def test_json_log_time_is_the_records_utc_time_to_the_millisecond() -> None:
    formatter = JsonFormatter()
    record = logging.makeLogRecord({"msg": "tick"})
    # Within one second (the second's text is reused), across seconds, and next to a boundary.
    for created in (1_764_400_000.0, 1_764_400_000.25, 1_764_400_000.9995, 1_764_400_001.0019, 1_764_400_059.9999996):
        record.created = created
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.format(record))["time"] == expected


def test_an_exception_is_described_by_its_classes_and_frames_along_its_causes_never_its_text() -> None:
    def lookup() -> None:
        raise KeyError(DETAIL)

    try:
        try:
            lookup()
        except KeyError as exc:
            raise RuntimeError(DETAIL) from exc
    except RuntimeError as exc:
        fields = exception_fields(exc)

    assert fields["exception_type"] == "RuntimeError <- KeyError"
    assert "in lookup" in fields["stack"] and "caused by KeyError:" in fields["stack"]
    assert DETAIL not in str(fields) and "leak" not in str(fields)
