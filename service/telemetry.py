"""OpenTelemetry glue: the current trace id, for audit records that must match their span."""

from __future__ import annotations

from opentelemetry import trace


def current_trace_id() -> str:
    """The W3C trace id of the current span (32 hex digits), or ``""`` when nothing is traced."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
