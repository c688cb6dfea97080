"""The memo of records written in full (service.store.repeats): what it finds, under which row, and what it forgets."""

from __future__ import annotations

import uuid

from service.store.ledger import array_literal
from service.store.repeats import RecordedResponses, fingerprint


def _fingerprint(items: list[tuple[str, uuid.UUID, uuid.UUID]]) -> bytes:
    return fingerprint([array_literal(column) for column in zip(*items, strict=True)])


def test_only_the_same_items_in_the_same_order_have_the_same_fingerprint() -> None:
    a, b = (uuid.uuid4() for _ in range(2))
    items = [("apt_1", a, b), ("apt_2", b, a)]

    assert _fingerprint(items) == _fingerprint(list(items))
    assert _fingerprint(items) != _fingerprint(items[::-1])
    assert _fingerprint(items) != _fingerprint([("apt_1", a, b), ("apt_2", b, b)])
    # Ids that would run together when concatenated stay apart: every element is quoted in its literal.
    assert _fingerprint([("ab", a, a), ("c", a, a)]) != _fingerprint([("a", a, a), ("bc", a, a)])
    assert _fingerprint([('a","b', a, a)]) != _fingerprint([("a", a, a), ("b", a, a)])


def test_a_record_is_found_only_for_its_partner_and_the_counter_row_it_was_written_under() -> None:
    memo = RecordedResponses()
    partner, other = uuid.uuid4(), uuid.uuid4()
    memo.add(partner, 7, b"page", 41)

    assert memo.find(partner, 7, b"page") == 41
    assert memo.find(partner, 8, b"page") is None  # a new day, or counters started over
    assert memo.find(other, 7, b"page") is None
    assert memo.find(partner, 7, b"other page") is None


def test_the_least_recently_used_record_goes_first_once_the_memo_is_full() -> None:
    memo = RecordedResponses(size=2)
    partner = uuid.uuid4()
    memo.add(partner, 1, b"first", 1)
    memo.add(partner, 1, b"second", 2)
    memo.find(partner, 1, b"first")  # used again: the second is now the oldest
    memo.add(partner, 1, b"third", 3)

    assert len(memo) == 2
    assert memo.find(partner, 1, b"second") is None
    assert (memo.find(partner, 1, b"first"), memo.find(partner, 1, b"third")) == (1, 3)
    memo.clear()
    assert len(memo) == 0
