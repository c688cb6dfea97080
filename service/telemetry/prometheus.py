"""``OTEL_METRICS_EXPORTER=prometheus``: the service's metrics served for scraping on ``/metrics``.

The OpenTelemetry Prometheus reader (``opentelemetry-exporter-prometheus``)
turns the meter provider's metrics into Prometheus' text format when
scraped; they pass the same views as every other exporter's
(:func:`service.telemetry.tracing.metric_views`), so only the labels
:data:`service.telemetry.redaction.METRIC_LABELS` allows become labels. The
endpoint serves a registry of its own (the process's metrics, ``process_*``,
beside the service's), never the library's global one, on
``OTEL_EXPORTER_PROMETHEUS_HOST``:``OTEL_EXPORTER_PROMETHEUS_PORT`` (default
``localhost:9464``), over plain HTTP without authentication: bind it where
only the scraper reaches. With several workers, each serves its own port
(:mod:`service.cli.workers`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server


class MetricsEndpoint:
    """A ``/metrics`` endpoint and the metric reader it serves, running until :meth:`close`."""

    def __init__(self, host: str, port: int) -> None:
        """Bind ``host:port`` and serve. Raises ``OSError`` naming the variables when it cannot bind."""
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.reader = PrometheusMetricReader(registry=self.registry)
        self._server: Any
        self._thread: threading.Thread
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            self.reader.shutdown()
            raise OSError(
                exc.errno,
                f"OTEL_EXPORTER_PROMETHEUS_HOST/PORT: cannot serve /metrics on {host}:{port} "
                f"({exc.strerror or os.strerror(exc.errno or 0)})",
            ) from None

    @property
    def port(self) -> int:
        """The port ``/metrics`` is served on."""
        port: int = self._server.server_port
        return port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
