"""The memo of patients counted today (``record.CountedPatients``): what it leaves out, and when it forgets."""

from __future__ import annotations

import uuid

from service.disclosure.record import CountedPatients


def test_a_partner_unknown_to_the_memo_has_every_patient_charged() -> None:
    memo = CountedPatients()
    partner, patients = uuid.uuid4(), [uuid.uuid4() for _ in range(3)]

    assert memo.since(partner) is None
    assert memo.unknown(partner, patients) == patients


def test_patients_counted_under_the_standing_row_are_left_out_and_the_rest_keep_their_order() -> None:
    memo = CountedPatients()
    partner, other = uuid.uuid4(), uuid.uuid4()
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    memo.add(partner, 7, [a, c])

    assert memo.since(partner) == 7
    assert memo.unknown(partner, [d, a, b, c]) == [d, b]
    assert memo.unknown(other, [a, b]) == [a, b]  # another partner's count is its own


def test_another_counter_row_replaces_what_the_memo_knew_of_the_partner() -> None:
    memo = CountedPatients()
    partner = uuid.uuid4()
    a, b = uuid.uuid4(), uuid.uuid4()
    memo.add(partner, 7, [a])

    memo.add(partner, 9, [b])  # the next day's row, or the day's counters started over

    assert memo.since(partner) == 9
    assert memo.unknown(partner, [a, b]) == [a]


def test_a_partner_without_a_counter_row_is_forgotten() -> None:
    memo = CountedPatients()
    partner, a = uuid.uuid4(), uuid.uuid4()
    memo.add(partner, 7, [a])

    memo.add(partner, None, [a])

    assert memo.since(partner) is None
    assert memo.unknown(partner, [a]) == [a]


def test_a_full_memo_starts_again_empty() -> None:
    memo = CountedPatients(size=4)
    first, second = uuid.uuid4(), uuid.uuid4()
    early = [uuid.uuid4() for _ in range(4)]
    memo.add(first, 1, early)

    late = uuid.uuid4()
    memo.add(second, 2, [late])  # the memo was full: everything it held is forgotten first

    assert memo.since(first) is None
    assert memo.unknown(first, early) == early
    assert memo.unknown(second, [late]) == []
