"""The OTLP/HTTP span exporter: the SDK's, with :mod:`service.telemetry.otlp_encoding` doing the encoding.

Everything an operator configures stays the SDK's: the endpoint, headers,
timeout, compression and certificates from the standard ``OTEL_EXPORTER_OTLP_*``
variables, and its transport with its retries. Only the encoding of each
batch is ours, faster (docs/performance.md, "Tracing cost"). The SDK
exporter encodes and posts in one method; posting alone goes through its
transport client, which is not public API. When the installed SDK has no such
client (another version), every batch goes through the SDK's own ``export``:
slower, never wrong. ``tests/unit/test_span_encoding.py`` checks that the
pinned versions (constraints.txt) take the fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from service.telemetry.otlp_encoding import SpanEncoder

log = logging.getLogger(__name__)


class OtlpHttpSpanExporter(OTLPSpanExporter):
    """Exports spans over OTLP/HTTP (protobuf), encoded by :class:`SpanEncoder`."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = SpanEncoder()
        self._closed = False
        post = getattr(getattr(self, "_client", None), "export", None)
        self._post: Callable[[bytes], Any] | None = post if callable(post) else None

    @property
    def encodes_batches(self) -> bool:
        """True when batches are encoded here and posted by the SDK's transport (the fast path)."""
        return self._post is not None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._post is None or self._closed:
            return super().export(spans)
        try:
            data = self._encoder.encode(spans)
        except Exception as exc:
            # Never a span's content in the log: which class failed is enough to file a bug.
            log.error("apptgate's span encoder failed (%s); the SDK encodes this batch", type(exc).__name__)
            return super().export(spans)
        result = self._post(data)
        return SpanExportResult.SUCCESS if getattr(result, "success", False) else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._closed = True
        super().shutdown()  # type: ignore[no-untyped-call]
