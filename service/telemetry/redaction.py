"""What telemetry may record: the one allowlist every span, metric label and log line passes. Pure: no I/O.

Telemetry backends are usually less guarded than the database, so nothing
personal may reach them: no patient name, sex, phone, email, visit reason,
consent token, key secret, internal token or SQL parameter. Rather than
trusting every call site, the exporters, the metric views and the log
formatter keep only the keys named here, and reduce what they keep:

* span and event attributes: only :data:`SPAN_ATTRIBUTES` (and
  ``exception.type``); every value must be a short scalar;
* SQL statement text with every literal replaced by ``?`` (parameters are
  never recorded at all);
* span status descriptions and exception messages are dropped: the text of an
  exception can quote stored values (PostgreSQL's ``DETAIL: Key (email)=(…)``),
  and ``abort()`` texts become span statuses in gRPC instrumentation;
* metric labels: only :data:`METRIC_LABELS`;
* log lines: only :data:`LOG_FIELDS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

#: Span attributes that may be recorded (OpenTelemetry semantic conventions and ours).
SPAN_ATTRIBUTES = frozenset(
    {
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "rpc.grpc.status_code",
        "apptgate.listener",
        "apptgate.partner_id",
        "apptgate.key_id",
        "apptgate.client_cert",
        "apptgate.view",
        "apptgate.appointments",
        "apptgate.consent.presented",
        "apptgate.consent.outcome",
        "apptgate.error.reason",
        "db.system",
        "db.statement",
        "db.operation",
        "error.type",
    }
)
#: Event attributes that may be recorded (an exception event keeps its class only).
EVENT_ATTRIBUTES = frozenset({"exception.type"})
#: Metric attribute keys that may be recorded.
METRIC_LABELS = frozenset(
    {"rpc.method", "rpc.grpc.status_code", "view", "contact_field", "reason", "state", "listener", "replica"}
)
#: Keys a JSON log line may carry, in the order a line shows them.
LOG_FIELD_ORDER = (
    "time",
    "level",
    "logger",
    "message",
    "event",
    "listener",
    "method",
    "code",
    "duration_ms",
    "partner_id",
    "key_id",
    "client_cert",
    "trace_id",
    "span_id",
    "exception_type",
    "stack",
)
LOG_FIELDS = frozenset(LOG_FIELD_ORDER)
#: Span names follow these shapes; anything else is renamed.
_SPAN_NAME = re.compile(r"/[A-Za-z0-9_.]+/[A-Za-z0-9_]+|db [A-Z]+|db")
_MAX_VALUE = 256
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'|\$([A-Za-z_]*)\$.*?\$\1\$", re.DOTALL)
_NUMBER_LITERAL = re.compile(r"(?<![\w$])\d+(?:\.\d+)?\b")


def scrub_sql(statement: str) -> str:
    """Return SQL text with every literal value replaced by ``?`` and whitespace folded."""
    text = _STRING_LITERAL.sub("?", statement)
    text = _NUMBER_LITERAL.sub("?", text)
    return " ".join(text.split())[:2000]


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= _MAX_VALUE
    return isinstance(value, (bool, int, float))  # a tuple is checked faster than a union


def span_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keep the allowed attributes; scrub SQL text; drop anything else or anything large."""
    kept: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if key not in SPAN_ATTRIBUTES:
            continue
        if key == "db.statement" and isinstance(value, str):
            kept[key] = scrub_sql(value)
        elif _scalar(value):
            kept[key] = value
    return kept


def within_policy(name: str, attributes: Mapping[str, Any] | None, clean_statement: Callable[[str], bool]) -> bool:
    """True when :func:`span_name` and :func:`span_attributes` would return ``name`` and ``attributes`` unchanged.

    ``clean_statement(text)`` must answer ``scrub_sql(text) == text`` (callers
    memoize it: a service runs a fixed set of statements).
    """
    if not _SPAN_NAME.fullmatch(name):
        return False
    for key, value in (attributes or {}).items():
        if key not in SPAN_ATTRIBUTES or not _scalar(value):
            return False
        if key == "db.statement" and not clean_statement(value):
            return False
    return True


def event_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keep only the exception class of an event."""
    return {k: v for k, v in (attributes or {}).items() if k in EVENT_ATTRIBUTES and _scalar(v)}


def span_name(name: str) -> str:
    """Return the name if it has a known shape, else a placeholder."""
    return name if _SPAN_NAME.fullmatch(name) else "redacted"


def log_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the allowed log fields with scalar values."""
    return {k: v for k, v in fields.items() if v is not None and k in LOG_FIELDS and (_scalar(v) or k == "stack")}
