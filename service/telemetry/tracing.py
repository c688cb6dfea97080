"""OpenTelemetry traces and metrics of every call, all passing :mod:`service.telemetry.redaction`.

A :class:`Telemetry` is built once by the composition root. With nothing
configured it holds no-op providers: spans are not built, nothing is exported,
and the only work left is carrying the caller's W3C trace context so audit
records still name the caller's trace. Exporters are chosen by the standard
variables (``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``: ``otlp``,
``console`` or ``none``, default ``none``, and for metrics ``prometheus``:
:mod:`service.telemetry.prometheus`); the OpenTelemetry SDK reads the
rest of its standard variables itself (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``,
``OTEL_EXPORTER_OTLP_ENDPOINT``/``_HEADERS``…), as the specification defines.

Every span goes through :class:`~service.telemetry.spans.RedactingSpanExporter`
before any exporter sees it, every metric through a view that keeps only
allowed labels, and every log line through
:class:`~service.telemetry.logs.JsonFormatter`: one policy, not care at call
sites.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import NonRecordingSpan, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import models
from service.settings import Exporter, OtlpProtocol, Settings
from service.telemetry import redaction
from service.telemetry.spans import SCOPE, Memo, RedactingSpanExporter, SpanBuilder

if TYPE_CHECKING:
    from service.telemetry.prometheus import MetricsEndpoint

log = logging.getLogger(__name__)
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
    #: The hex SHA-256 of the client certificate the call came with (mutual TLS), ``""`` without.
    client_cert: str = ""
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
    client_cert: str | None = None,
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
        "apptgate.client_cert": client_cert,
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
        if client_cert is not None:
            call.client_cert = client_cert


def metric_views() -> list[View]:
    """Views that keep only the allowed labels on every instrument."""
    return [View(instrument_name="*", attribute_keys=set(redaction.METRIC_LABELS))]


class Telemetry:
    """Tracer, meter and instruments of one service process."""

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        metrics_endpoint: MetricsEndpoint | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        #: Where Prometheus scrapes this process's metrics, with ``OTEL_METRICS_EXPORTER=prometheus``.
        self.metrics_endpoint = metrics_endpoint
        self._spans = SpanBuilder(tracer_provider) if tracer_provider is not None else None
        meter: Meter = meter_provider.get_meter(SCOPE) if meter_provider else NoOpMeter(SCOPE)
        self._meter = meter
        self._propagator = TraceContextTextMapPropagator()
        self._access_log = logging.getLogger("apptgate.access")
        self._statement = Memo(_describe_statement)
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
        if settings.otel_traces_exporter != Exporter.NONE:
            tracer_provider = TracerProvider(resource=resource)
            exporter = RedactingSpanExporter(
                _span_exporter(settings.otel_traces_exporter, settings.otel_traces_protocol)
            )
            processor = (
                SimpleSpanProcessor(exporter)
                if settings.otel_traces_exporter == Exporter.CONSOLE
                else BatchSpanProcessor(exporter)
            )
            tracer_provider.add_span_processor(processor)
        meter_provider = None
        endpoint = None
        if settings.otel_metrics_exporter == Exporter.PROMETHEUS:
            from service.telemetry.prometheus import MetricsEndpoint  # only this exporter needs prometheus_client

            endpoint = MetricsEndpoint(settings.otel_prometheus_host, settings.otel_prometheus_port)
            # The same views as any exporter's: only allowed labels reach a scrape.
            meter_provider = MeterProvider(resource=resource, metric_readers=[endpoint.reader], views=metric_views())
        elif settings.otel_metrics_exporter != Exporter.NONE:
            reader: MetricReader = PeriodicExportingMetricReader(
                _metric_exporter(settings.otel_metrics_exporter, settings.otel_metrics_protocol)
            )
            meter_provider = MeterProvider(resource=resource, metric_readers=[reader], views=metric_views())
        return cls(tracer_provider=tracer_provider, meter_provider=meter_provider, metrics_endpoint=endpoint)

    def shutdown(self) -> None:
        """Flush and stop the exporters (and stop serving ``/metrics``)."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()

    def disclosed(self, view: models.View, count: int, fields: Sequence[int] = ()) -> None:
        """Annotate the call's span and count what it disclosed, by view and contact field."""
        label = _VIEW_LABELS[view]
        annotate(view=label, appointments=count)
        if view is models.View.BASIC:
            self.disclosures.add(count, {"view": label, "contact_field": "none"})
        for number in fields:
            self.disclosures.add(count, {"view": label, "contact_field": models.ContactField(number).label})

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

    def observe_replicas(self, states: Callable[[], Sequence[Any]]) -> None:
        """Report each read replica's lag and whether it serves reads: ``states()`` returns objects with
        ``index``, ``lag`` (seconds, ``None`` when unknown) and ``usable`` (:mod:`service.store.replicas`)."""

        def lag(_options: Any) -> Iterator[Observation]:
            for state in states():
                if state.lag is not None:
                    yield Observation(state.lag, {"replica": str(state.index)})

        def usable(_options: Any) -> Iterator[Observation]:
            for state in states():
                yield Observation(int(state.usable), {"replica": str(state.index)})

        self._meter.create_observable_gauge(
            "apptgate.db.replica.lag", callbacks=[lag], unit="s", description="Replay lag of each read replica."
        )
        self._meter.create_observable_gauge(
            "apptgate.db.replica.usable",
            callbacks=[usable],
            unit="1",
            description="1 while a read replica serves partners' basic reads, 0 while it is skipped.",
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
                "client_cert": call.client_cert or None,
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


_VIEW_LABELS = {view: view.label for view in models.View}


def _describe_statement(query: str) -> tuple[str, str, str] | None:
    """A statement's span name, operation and text without literals, or None for transaction control.

    Reduced at the source, once per distinct statement (memoized by the caller).
    """
    if query.lstrip().upper().startswith(_BOOKKEEPING):
        return None
    operation = (query.lstrip().split(None, 1) or ["?"])[0].upper()
    return (f"db {operation}" if operation.isalpha() else "db"), operation, redaction.scrub_sql(query)


def _span_exporter(kind: Exporter, protocol: OtlpProtocol) -> SpanExporter:
    if kind == Exporter.CONSOLE:
        return ConsoleSpanExporter()
    if protocol == OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    from service.telemetry.otlp_export import OtlpHttpSpanExporter  # imports the SDK's OTLP/HTTP exporter

    return OtlpHttpSpanExporter()


def _metric_exporter(kind: Exporter, protocol: OtlpProtocol) -> Any:
    if kind == Exporter.CONSOLE:
        return ConsoleMetricExporter()
    if protocol == OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter()
