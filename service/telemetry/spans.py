"""How the gateway's spans are made and reduced: built finished when they end, redacted before export.

:class:`SpanBuilder` makes the gateway's spans itself, as ``ReadableSpan``s,
once, when they end; :class:`RedactingSpanExporter` hands an exporter only what
:mod:`service.telemetry.redaction` allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from service.memo import remember
from service.telemetry import redaction

SCOPE = "apptgate"


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
    """Hands an exporter the spans reduced to what :mod:`service.telemetry.redaction` allows.

    A span already within the policy (its name, attributes and statement text
    unchanged by it, no events, links or status text) is passed as it is: that
    is what the redacted copy would be, without the cost of making it. Any
    other span is copied, reduced.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self._statements = Memo(lambda text: redaction.scrub_sql(text) == text)

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


class SpanBuilder:
    """Builds the gateway's spans finished, and hands them to the provider's span processors.

    The SDK's ``Tracer.start_span`` validates every attribute value, takes a
    lock per span and copies the span when it ends, which cost a listing a
    large share of its instructions once the gateway itself had become cheaper
    (``bench/instructions.py plain tracing``). The gateway's spans have two
    fixed shapes and attribute values
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


class Memo:
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
