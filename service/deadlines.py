"""The time a call has left, carried to the database layer. Pure: no I/O.

The API edge sets the deadline of each call (the caller's, capped by the
configured default when the caller sets none); the store bounds every
connection wait and statement by what remains (``statement_timeout`` per
transaction), so no database work outlives the call that asked for it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DEADLINE: ContextVar[float | None] = ContextVar("apptgate_deadline", default=None)


@contextmanager
def bounded(seconds: float | None) -> Iterator[None]:
    """Run the block with ``seconds`` left (``None``: no deadline)."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        # A cancelled stream may be finalised in another context (see telemetry.server_call).
        with contextlib.suppress(ValueError):
            _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left in the current call, or ``None`` when it has no deadline."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()
