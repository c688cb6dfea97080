"""Bounded memos: a dict that is emptied at once when full. Pure: no I/O.

Every memo of the gateway (derived pseudonyms, verified consent tokens,
statement descriptions, encoded span fragments) holds values that are cheap to
compute again and costly to compute on every call. Emptying the whole table
when it is full keeps each insertion O(1) with no bookkeeping per entry; a
working set that fits is never evicted, one that does not is recomputed.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(table: dict[K, V], key: K, value: V, size: int) -> V:
    """Store ``value`` under ``key`` in ``table``, a memo of ``size`` entries at most (0: none); return ``value``."""
    if size:
        if len(table) >= size:
            table.clear()
        table[key] = value
    return value
