"""The unary calls a listener is serving at this moment.

The error boundary (:mod:`service.api.server`) counts every unary call of the
partner listener from the moment its handler starts until it returns; the
ledger's group writer (:mod:`service.disclosure.groups`) reads the count to
know whether another call could still join the group it is about to write. A
plain integer on the event loop's thread: no lock, nothing to await.
"""

from __future__ import annotations


class CallsInFlight:
    """How many unary calls are inside their handlers now."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0
