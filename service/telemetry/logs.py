"""JSON log lines on stderr, each through :mod:`service.telemetry.redaction`."""

from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Any

from service.telemetry import redaction


def exception_fields(exc: BaseException) -> dict[str, str]:
    """What a log line may say of an exception: its class and its frames, each cause's after it.

    Never a message: an exception's text can quote stored values (PostgreSQL's
    ``DETAIL: Key (email)=(…)``). Frames name files, lines, functions and the
    source line, which is code, not data. ``exception_type`` reads
    ``Outer <- Cause`` along the chain of causes.
    """
    types, stacks = [], []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        types.append(type(current).__name__)
        stacks.append(f"{type(current).__name__}:\n" + "".join(traceback.format_tb(current.__traceback__)))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return {"exception_type": " <- ".join(types)[:256], "stack": "caused by ".join(stacks)}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with only the fields :mod:`service.telemetry.redaction` allows.

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
        if record.exc_info and record.exc_info[1] is not None:
            fields.update(exception_fields(record.exc_info[1]))
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
