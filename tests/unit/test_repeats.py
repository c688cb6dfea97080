"""The memo of records written in full (``RecordedResponses``): what it finds, under which row, what it forgets."""

from __future__ import annotations

import uuid

from service.disclosure.record import MIN_ITEMS, RecordedResponses, fingerprint


def _fingerprint(items: list[tuple[str, uuid.UUID | None, uuid.UUID | None]]) -> bytes | None:
    return fingerprint(*([str(value) for value in column] for column in zip(*items, strict=True)))


def _page(size: int = MIN_ITEMS) -> list[tuple[str, uuid.UUID | None, uuid.UUID | None]]:
    return [(f"apt_{n}", uuid.uuid4(), uuid.uuid4()) for n in range(size)]


def test_only_the_same_items_in_the_same_order_have_the_same_fingerprint() -> None:
    page = _page()
    other_patient = [*page[:-1], (page[-1][0], page[-1][1], uuid.uuid4())]

    assert _fingerprint(page) == _fingerprint(list(page))
    assert _fingerprint(page) != _fingerprint(page[::-1])
    assert _fingerprint(page) != _fingerprint(other_patient)
    # Requested ids that would run together stay apart: elements are joined by a separator.
    assert _fingerprint([("ab", *page[0][1:]), ("c", *page[1][1:]), *page[2:]]) != _fingerprint(
        [("a", *page[0][1:]), ("bc", *page[1][1:]), *page[2:]]
    )


def test_a_response_too_small_or_ambiguous_gets_no_fingerprint() -> None:
    page = _page()

    assert _fingerprint(page[:-1]) is None  # fewer than MIN_ITEMS
    assert _fingerprint([("apt_\x1e", *page[0][1:]), *page[1:]]) is None  # a separator in a requested id
    assert _fingerprint([("apt_\x1f", *page[0][1:]), *page[1:]]) is None
    assert _fingerprint([(page[0][0], None, page[0][2]), *page[1:]]) is None  # an item without an appointment


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
