"""OpenTelemetry traces and metrics, and JSON logs, all passing :mod:`service.redaction`.

A :class:`Telemetry` is built once by the composition root. With nothing
configured it holds no-op providers: spans are not built, nothing is exported,
and the only work left is carrying the caller's W3C trace context so audit
records still name the caller's trace. Exporters are chosen by the standard
variables (``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``: ``otlp``,
``console`` or ``none``, default ``none``); the OpenTelemetry SDK reads the
rest of its standard variables itself (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_EXPORTER_OTLP_ENDPOINT``/``_HEADERS``…), as the specification defines.

Every span goes through :class:`RedactingSpanExporter` before any exporter
sees it, every metric through a view that keeps only allowed labels, and every
log line through :class:`JsonFormatter`: one policy, not care at call sites.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import redaction
from service.memo import remember
from service.settings import Settings

log = logging.getLogger(__name__)
SCOPE = "apptgate"
#: Statements recorded without a span of their own (they are part of every transaction).
_BOOKKEEPING = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET LOCAL", "SELECT PG_ADVISORY_UNLOCK_ALL")


def current_trace_id() -> str:
    """The W3C trace id of the current span (32 hex digits), or ``""`` when nothing is traced."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


@dataclass
class CallInfo:
    """What one RPC learned about itself, for its span, metrics and access log."""

    listener: str
    method: str
    partner_id: str = ""
    key_id: str = ""
    #: Attributes for the call's span, set on it once when the call ends.
    attributes: dict[str, Any] = field(default_factory=dict)
    #: The call's span is sampled: it is built and exported when the call ends.
    traced: bool = False
    #: The call ended with a status that marks its span as an error.
    failed: bool = False


_CALL: ContextVar[CallInfo | None] = ContextVar("apptgate_call", default=None)


def annotate(
    *,
    partner_id: str | None = None,
    key_id: str | None = None,
    view: str | None = None,
    appointments: int | None = None,
    consent_presented: bool | None = None,
    consent_outcome: str | None = None,
) -> None:
    """Record facts about the current call for its span and access log (only these, by design).

    Inside a call they are gathered and set on its span when it ends, in one
    update (each update of an SDK span takes its lock and validates every
    value); outside one, on the current span at once.
    """
    attributes: dict[str, Any] = {
        "apptgate.partner_id": partner_id,
        "apptgate.key_id": key_id,
        "apptgate.view": view,
        "apptgate.appointments": appointments,
        "apptgate.consent.presented": consent_presented,
        "apptgate.consent.outcome": consent_outcome,
    }
    attributes = {k: v for k, v in attributes.items() if v is not None}
    call = _CALL.get()
    if call is None:
        trace.get_current_span().set_attributes(attributes)
    else:
        call.attributes.update(attributes)
        if partner_id is not None:
            call.partner_id = partner_id
        if key_id is not None:
            call.key_id = key_id


def _redacted(span: ReadableSpan) -> ReadableSpan:
    status = Status(span.status.status_code)  # the description is dropped: it can hold abort() text
    return ReadableSpan(
        name=redaction.span_name(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=redaction.span_attributes(span.attributes),
        events=[
            Event(e.name if e.name == "exception" else "event", redaction.event_attributes(e.attributes), e.timestamp)
            for e in span.events
        ],
        links=(),
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingSpanExporter(SpanExporter):
    """Hands an exporter the spans reduced to what :mod:`service.redaction` allows.

    A span already within the policy (its name, attributes and statement text
    unchanged by it, no events, links or status text) is passed as it is: that
    is what the redacted copy would be, without the cost of making it. Any
    other span is copied, reduced.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self._statements = _Memo(lambda text: redaction.scrub_sql(text) == text)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([span if self._within_policy(span) else _redacted(span) for span in spans])

    def _within_policy(self, span: ReadableSpan) -> bool:
        return (
            not span.events
            and not span.links
            and span.status.description is None
            and redaction.within_policy(span.name, span.attributes, self._statements)
        )

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _SpanBuilder:
    """Builds the gateway's spans finished, and hands them to the provider's span processors.

    The SDK's ``Tracer.start_span`` validates every attribute value, takes a
    lock per span and copies the span when it ends: for the two spans of a
    ListAppointments call that was ~60 µs, 24% of the call's instructions once
    the gateway itself had become cheaper (``bench/instructions.py plain
    tracing``). The gateway's spans have two fixed shapes and attribute values
    it sets itself (strings, integers, booleans), so they are made here as
    ``ReadableSpan``s, once, when they end, with what the SDK would give them:
    ids from the provider's id generator, the decision of the provider's
    sampler (a span not sampled is not built; its context still carries the
    trace), the provider's resource and this module's instrumentation scope.
    """

    def __init__(self, provider: TracerProvider) -> None:
        processor = getattr(provider, "_active_span_processor", None)
        if processor is None:
            # Not public API; constraints.txt pins an SDK that has it, and a test checks that it does.
            raise RuntimeError("this OpenTelemetry SDK does not expose its span processors")
        self._processor = processor
        self._sampler = provider.sampler
        self._ids = provider.id_generator
        self._resource = provider.resource
        self._scope = InstrumentationScope(SCOPE)

    def begin(
        self,
        name: str,
        parent: otel_context.Context | None,
        parent_span: SpanContext,
        kind: SpanKind,
        attributes: dict[str, Any],
    ) -> SpanContext:
        """The context of a new span under ``parent`` (whose span is ``parent_span``), sampled or not by the sampler.

        Attributes the sampler adds are added to ``attributes``.
        """
        trace_id = parent_span.trace_id if parent_span.is_valid else self._ids.generate_trace_id()
        sampled = self._sampler.should_sample(parent, trace_id, name, kind, attributes)
        if sampled.attributes:
            attributes.update(sampled.attributes)
        flags = TraceFlags(TraceFlags.SAMPLED if sampled.decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT)
        return SpanContext(trace_id, self._ids.generate_span_id(), False, flags, sampled.trace_state)

    def child(self, parent: SpanContext) -> SpanContext:
        """The context of a new span under ``parent``, following its sampling decision."""
        return SpanContext(parent.trace_id, self._ids.generate_span_id(), False, parent.trace_flags, parent.trace_state)

    def end(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start_time: int,
        end_time: int,
        *,
        failed: bool = False,
    ) -> None:
        """Hand the finished span to the processors (nothing when it is not sampled)."""
        if not context.trace_flags.sampled:
            return
        self._processor.on_end(
            ReadableSpan(
                name=name,
                context=context,
                parent=parent if parent is not None and parent.is_valid else None,
                resource=self._resource,
                attributes=attributes,
                kind=kind,
                status=Status(StatusCode.ERROR) if failed else Status(StatusCode.UNSET),
                start_time=start_time,
                end_time=end_time,
                instrumentation_scope=self._scope,
            )
        )


class _Memo:
    """A bounded memo of a pure function of text (statement texts: a fixed set in a running service)."""

    def __init__(self, function: Callable[[str], Any], size: int = 1024) -> None:
        self._function = function
        self._size = size
        self._values: dict[str, Any] = {}

    def __call__(self, text: str) -> Any:
        try:
            return self._values[text]
        except KeyError:
            return remember(self._values, text, self._function(text), self._size)


def metric_views() -> list[View]:
    """Views that keep only the allowed labels on every instrument."""
    return [View(instrument_name="*", attribute_keys=set(redaction.METRIC_LABELS))]


class Telemetry:
    """Tracer, meter and instruments of one service process."""

    def __init__(
        self, *, tracer_provider: TracerProvider | None = None, meter_provider: MeterProvider | None = None
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._spans = _SpanBuilder(tracer_provider) if tracer_provider is not None else None
        meter: Meter = meter_provider.get_meter(SCOPE) if meter_provider else NoOpMeter(SCOPE)
        self._meter = meter
        self._propagator = TraceContextTextMapPropagator()
        self._access_log = logging.getLogger("apptgate.access")
        self._statement = _Memo(_describe_statement)
        self.rpc_duration = meter.create_histogram(
            "rpc.server.duration", unit="ms", description="Duration of RPCs, by method and status code."
        )
        self.disclosures = meter.create_counter(
            "apptgate.disclosures", unit="{appointment}", description="Appointments disclosed, by view and field."
        )
        self.consent_denials = meter.create_counter(
            "apptgate.consent.denials", unit="{call}", description="Contact requests refused, by reason."
        )
        self.anomalies = meter.create_counter(
            "apptgate.partner.anomalies", unit="{event}", description="Partner volume anomalies, flagged or suspended."
        )
        self.active_streams = meter.create_up_down_counter(
            "apptgate.streams.active", unit="{stream}", description="Server streams open now."
        )

    @property
    def tracing(self) -> bool:
        """True when spans are recorded and exported."""
        return self._spans is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> Telemetry:
        """Build exporters from the standard OTEL_* choices in ``settings`` (``none`` means none)."""
        if settings.otel_sdk_disabled:
            return cls()
        resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "apptgate"}))
        tracer_provider = None
        if settings.otel_traces_exporter != "none":
            tracer_provider = TracerProvider(resource=resource)
            exporter = RedactingSpanExporter(
                _span_exporter(settings.otel_traces_exporter, settings.otel_traces_protocol)
            )
            processor = (
                SimpleSpanProcessor(exporter)
                if settings.otel_traces_exporter == "console"
                else BatchSpanProcessor(exporter)
            )
            tracer_provider.add_span_processor(processor)
        meter_provider = None
        if settings.otel_metrics_exporter != "none":
            reader: MetricReader = PeriodicExportingMetricReader(
                _metric_exporter(settings.otel_metrics_exporter, settings.otel_metrics_protocol)
            )
            meter_provider = MeterProvider(resource=resource, metric_readers=[reader], views=metric_views())
        return cls(tracer_provider=tracer_provider, meter_provider=meter_provider)

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()

    def observe_pool(self, sizes: Any) -> None:
        """Report a connection pool's use: ``sizes()`` returns (in use, idle, waiting)."""

        def observe(_options: Any) -> Iterator[Observation]:
            in_use, idle, waiting = sizes()
            yield Observation(in_use, {"state": "in_use"})
            yield Observation(idle, {"state": "idle"})
            yield Observation(waiting, {"state": "waiting"})

        self._meter.create_observable_gauge(
            "apptgate.db.pool.connections", callbacks=[observe], unit="{connection}", description="Pool connections."
        )

    @contextmanager
    def server_call(
        self, listener: str, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> Iterator[CallInfo]:
        """Run one RPC inside a server span that continues the caller's W3C trace context."""
        carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate") and isinstance(v, str)}
        parent = self._propagator.extract(carrier)
        call = CallInfo(listener, method)
        call_token = _CALL.set(call)
        try:
            if self._spans is None:
                # No spans are built, but the caller's trace id still reaches the audit records.
                attached = otel_context.attach(parent)
                try:
                    yield call
                finally:
                    otel_context.detach(attached)
                return
            service, _, rpc = method.lstrip("/").partition("/")
            attributes: dict[str, Any] = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": rpc,
                "apptgate.listener": listener,
            }
            start = time.time_ns()
            remote = trace.get_current_span(parent).get_span_context()
            span = self._spans.begin(method, parent, remote, SpanKind.SERVER, attributes)
            call.traced = span.trace_flags.sampled
            # The call's span is current (its statements are its children, its trace id goes
            # into the audit records); it is built when the call ends, with what it gathered.
            attached = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(span), parent))
            try:
                yield call
            finally:
                otel_context.detach(attached)
                attributes.update(call.attributes)
                self._spans.end(
                    method, span, remote, SpanKind.SERVER, attributes, start, time.time_ns(), failed=call.failed
                )
        finally:
            # A cancelled stream's generator can be finalised in another context,
            # where the token no longer applies; the variable dies with that context.
            with contextlib.suppress(ValueError):
                _CALL.reset(call_token)

    def finish_call(self, call: CallInfo, code: str, started: float, reason: str = "") -> None:
        """Record the outcome of a call on its span, in the RPC metrics and in the access log."""
        duration_ms = (time.perf_counter() - started) * 1000
        if call.traced:  # for the span built when the call ends
            attributes = call.attributes
            attributes["rpc.grpc.status_code"] = code
            if reason:
                attributes["apptgate.error.reason"] = reason
            call.failed = code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED")
        self.rpc_duration.record(duration_ms, {"rpc.method": call.method, "rpc.grpc.status_code": code})
        access = self._access_log
        if access.isEnabledFor(logging.INFO):
            # Built and handed to the handlers directly: Logger.info would also look for its
            # caller's source line in the stack, which an access line does not carry.
            extra = {
                "event": "rpc",
                "listener": call.listener,
                "method": call.method,
                "code": code,
                "duration_ms": round(duration_ms, 3),
                "partner_id": call.partner_id or None,
                "key_id": call.key_id or None,
                "trace_id": current_trace_id() or None,
            }
            access.handle(access.makeRecord(access.name, logging.INFO, __file__, 0, "rpc", (), None, extra=extra))

    def observe_query(self, query: str, elapsed: float, exception: BaseException | None) -> None:
        """Record one finished statement as a child span of the current call (never its parameters).

        A statement's span follows its call's sampling decision: it is built only when the call's is.
        """
        parent = trace.get_current_span().get_span_context()
        if self._spans is None or not parent.is_valid or not parent.trace_flags.sampled:
            return  # not traced, pool housekeeping outside any call, or a call not sampled
        described = self._statement(query)
        if described is None:
            return  # transaction control carries no information worth a span, and spans cost CPU
        name, operation, text = described
        end = time.time_ns()
        attributes: dict[str, Any] = {"db.system": "postgresql", "db.operation": operation, "db.statement": text}
        if exception is not None:
            attributes["error.type"] = type(exception).__name__
        self._spans.end(
            name,
            self._spans.child(parent),
            parent,
            SpanKind.CLIENT,
            attributes,
            end - int(elapsed * 1e9),
            end,
            failed=exception is not None,
        )


def _describe_statement(query: str) -> tuple[str, str, str] | None:
    """A statement's span name, operation and text without literals, or None for transaction control.

    Reduced at the source, once per distinct statement (memoized by the caller).
    """
    if query.lstrip().upper().startswith(_BOOKKEEPING):
        return None
    operation = (query.lstrip().split(None, 1) or ["?"])[0].upper()
    return (f"db {operation}" if operation.isalpha() else "db"), operation, redaction.scrub_sql(query)


def _span_exporter(kind: str, protocol: str) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    from service.span_export import OtlpHttpSpanExporter  # imports the SDK's OTLP/HTTP exporter

    return OtlpHttpSpanExporter()


def _metric_exporter(kind: str, protocol: str) -> Any:
    if kind == "console":
        return ConsoleMetricExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with only the fields :mod:`service.redaction` allows.

    An exception is logged as its class and its stack frames, never its message.
    """

    #: Fields a record may carry as ``extra`` (the first four come from the record itself).
    _EXTRA = redaction.LOG_FIELD_ORDER[4:]

    def __init__(self) -> None:
        super().__init__()
        self._encode = json.JSONEncoder(default=str).encode  # json.dumps would build one per line
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        given = record.__dict__
        for key in self._EXTRA:
            if key in given:
                fields[key] = given[key]
        if record.exc_info and record.exc_info[0] is not None:
            fields["exception_type"] = record.exc_info[0].__name__
            fields["stack"] = "".join(traceback.format_tb(record.exc_info[2]))
        return self._encode(redaction.log_fields(fields))

    def _time(self, created: float) -> str:
        """``created`` in ISO 8601, UTC, to the millisecond (the second's text is formatted once)."""
        second, micros = divmod(round(created * 1_000_000), 1_000_000)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{micros // 1000:03d}+00:00"


def configure_logging(level: str, stream: Any = None) -> None:
    """Send every log record to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
