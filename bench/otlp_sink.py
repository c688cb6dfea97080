"""A local OTLP/HTTP sink for the tracing-cost runs: accepts every export, keeps nothing.

The gateway exports with the standard OTLP/HTTP exporter behind a
BatchSpanProcessor, exactly as in production; the sink answers 200 with an
empty ExportTraceServiceResponse (an empty protobuf message is zero bytes), so
the exporter sees success and never retries. It counts requests and bytes and
prints them when stopped.

    python bench/otlp_sink.py --port 56090
"""

from __future__ import annotations

import argparse
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    requests = 0
    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
        type(self).requests += 1
        type(self).received += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)

    def stop(*_: object) -> None:
        print(f"otlp sink: {_Handler.requests} exports, {_Handler.received:,} bytes", file=sys.stderr, flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"otlp sink on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
