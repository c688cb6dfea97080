"""Token buckets: bursts, refill, eviction."""

from __future__ import annotations

import uuid

from service.access.limits import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_calls_wait_for_the_refill() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    partner = uuid.uuid4()

    allowed = [buckets.take(partner, rate=2.0, burst=3) for _ in range(3)]
    refused = buckets.take(partner, rate=2.0, burst=3)

    assert allowed == [0.0, 0.0, 0.0]
    assert refused == 0.5  # one token every half second
    clock.now = 0.5
    assert buckets.take(partner, rate=2.0, burst=3) == 0.0


def test_partners_have_separate_buckets_and_idle_time_refills_up_to_the_burst_only() -> None:
    clock = Clock()
    buckets = TokenBuckets(clock=clock)
    a, b = uuid.uuid4(), uuid.uuid4()
    for _ in range(2):
        buckets.take(a, rate=1.0, burst=2)

    assert buckets.take(b, rate=1.0, burst=2) == 0.0
    clock.now = 1000.0
    assert [buckets.take(a, rate=1.0, burst=2) for _ in range(3)][-1] > 0


def test_the_number_of_buckets_is_bounded() -> None:
    buckets = TokenBuckets(clock=Clock(), max_partners=10)
    for _ in range(50):
        buckets.take(uuid.uuid4(), rate=1.0, burst=1)

    assert len(buckets._buckets) == 10
