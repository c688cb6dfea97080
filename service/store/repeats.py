"""The records of basic-view responses this process wrote, so that a repeated response is recorded by reference.

Agenda tools list the same pages all day. A response whose items (requested
ids, appointment ids and patient ids, in order) are exactly those of a record
this process wrote for the same partner, under the partner's counter row of
the day that still stands, is recorded as a reference to that record
(migration 0021): no items of its own, and no patient to charge, since every
patient of the record it names was counted under that row.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from uuid import UUID

#: Fewer items than this and a response is recorded in full: its record is hardly larger than a reference.
MIN_ITEMS = 8


def fingerprint(requested: Sequence[str], appointments: Sequence[str], patients: Sequence[str]) -> bytes | None:
    """The SHA-256 of a response's items, from the text of its ids, as ``disclosure_items_digest`` (migration 0021)
    computes it from a record: each column's elements joined by 0x1e, the columns by 0x1f.

    ``None`` when the response is too small to be worth a reference, or when
    the text would be ambiguous: a requested id holding a separator, or an
    item lacking an appointment or a patient (its text is ``"None"``, which no
    UUID reads as). Otherwise two responses have the same fingerprint only
    when their items are the same, in the same order.
    """
    if len(requested) < MIN_ITEMS or "None" in appointments or "None" in patients:
        return None
    names = "\x1e".join(requested)
    if "\x1f" in names or names.count("\x1e") != len(requested) - 1:
        return None
    text = "\x1f".join((names, "\x1e".join(appointments), "\x1e".join(patients)))
    return hashlib.sha256(text.encode()).digest()


class RecordedResponses:
    """A bounded memo: (partner, counter row, items fingerprint) → the id of the record holding those items.

    Only committed records are added (:meth:`add`), under the counter row
    (``counted_since``) their patients were counted under; a lookup under
    another row finds nothing, so a reference never spans a new day or
    counters started over. The least recently used entry goes first once the
    memo holds ``size`` (an entry takes ~240 bytes: ~5 MB when full). :meth:`clear` forgets
    everything, for when the database refused a reference (a record lost in a
    failover, say).
    """

    __slots__ = ("_records", "_size")

    def __init__(self, size: int = 20_000) -> None:
        self._size = size
        self._records: OrderedDict[tuple[UUID, int, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def find(self, partner_id: UUID, since: int, items: bytes) -> int | None:
        """The record of ``partner_id`` written under counter row ``since`` with these items, if remembered."""
        key = (partner_id, since, items)
        record_id = self._records.get(key)
        if record_id is not None:
            self._records.move_to_end(key)
        return record_id

    def add(self, partner_id: UUID, since: int, items: bytes, record_id: int) -> None:
        """Remember the committed record ``record_id`` of ``partner_id``, counted under row ``since``."""
        key = (partner_id, since, items)
        self._records[key] = record_id
        self._records.move_to_end(key)
        if len(self._records) > self._size:
            self._records.popitem(last=False)

    def clear(self) -> None:
        """Forget every record."""
        self._records.clear()
