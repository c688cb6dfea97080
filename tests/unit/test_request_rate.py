"""The process side of the fleet's request rate: spending leased tokens, asking once, returning what was not spent."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from service.access.limits import PartnerPolicy
from service.access.request_rate import FleetRate, largest_batch
from service.errors import ResourceExhausted
from service.store.request_leases import RequestLease, Unspent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Grants as asked (or from a queue of answers); records the questions; can hold them until released."""

    def __init__(self, *answers: RequestLease) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[int, Unspent]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, partner_id: UUID, rate: float, burst: int, want: int, unspent: Unspent) -> RequestLease:
        self.asked.append((want, unspent))
        await self.release.wait()
        if self.answers:
            return self.answers.pop(0)
        return RequestLease(want, len(self.asked), 0.05, 0)


def _policy(rate: float = 50, burst: int = 100) -> PartnerPolicy:
    return PartnerPolicy(rate, burst, 10, 10, suspended=False)


def test_a_process_asks_for_a_tenth_of_a_seconds_rate_at_most_within_the_burst() -> None:
    assert [largest_batch(_policy(r, b)) for r, b in ((50, 100), (0.01, 3), (1e6, 20), (5, 5))] == [5, 1, 20, 1]


async def test_leased_tokens_are_spent_without_asking_again_until_they_lapse() -> None:
    clock = Clock()
    source = Source(RequestLease(3, 7, 0.05, 0))
    rate = FleetRate(source, clock=clock)
    partner = uuid4()

    for _ in range(3):
        await rate.take(partner, _policy())
    asked_for_three = len(source.asked)
    clock.now += 0.06  # the first lease has lapsed, spent whole
    await rate.take(partner, _policy())

    assert asked_for_three == 1
    assert source.asked == [(1, Unspent()), (2, Unspent())]


async def test_the_batch_grows_while_leases_are_spent_whole_up_to_a_tenth_of_a_seconds_rate() -> None:
    source = Source()
    rate = FleetRate(source, clock=Clock())
    partner = uuid4()

    for _ in range(40):
        await rate.take(partner, _policy(rate=100, burst=200))

    assert [want for want, _ in source.asked] == [1, 2, 4, 8, 10, 10, 10]  # the last lease is 5 spent of 10


async def test_what_a_lapsed_lease_left_goes_back_and_the_batch_shrinks_to_what_was_spent() -> None:
    clock = Clock()
    source = Source(RequestLease(8, 41, 0.05, 0))
    rate = FleetRate(source, clock=clock)
    partner = uuid4()

    await rate.take(partner, _policy())  # asks for 1; granted 8 (as if it had asked for more)
    await rate.take(partner, _policy())
    clock.now += 0.06
    await rate.take(partner, _policy())

    assert source.asked[1] == (2, Unspent(6, 41))


async def test_concurrent_calls_of_a_partner_share_one_question() -> None:
    source = Source(RequestLease(10, 1, 1.0, 0))
    source.release.clear()
    rate = FleetRate(source, clock=Clock())
    partner = uuid4()

    calls = [asyncio.create_task(rate.take(partner, _policy())) for _ in range(8)]
    # The tasks run in the order they were made: the first asks, the others find its question in flight.
    await asyncio.sleep(0)
    source.release.set()
    await asyncio.gather(*calls)

    assert len(source.asked) == 1


async def test_a_refusal_is_answered_from_memory_for_at_most_a_tenth_of_a_second() -> None:
    clock = Clock()
    source = Source(RequestLease(0, 1, 0.05, 30.0), RequestLease(1, 2, 0.1, 0))
    rate = FleetRate(source, clock=clock)
    partner = uuid4()

    with pytest.raises(ResourceExhausted) as first:
        await rate.take(partner, _policy())
    with pytest.raises(ResourceExhausted) as remembered:
        await rate.take(partner, _policy())
    asked_while_remembered = len(source.asked)
    clock.now += 0.1
    await rate.take(partner, _policy())

    assert (first.value.reason, remembered.value.reason) == ("RATE_LIMITED", "RATE_LIMITED")
    assert first.value.retry_delay == pytest.approx(30.0)
    assert (asked_while_remembered, len(source.asked)) == (1, 2)
