"""The process side of the fleet's request rate: spending leased tokens, asking once, refusing from memory."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from service.access.limits import PartnerPolicy
from service.access.request_rate import FleetRate, batch
from service.errors import ResourceExhausted
from service.store.request_leases import RequestLease


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Grants from a queue of answers; counts the questions, and can hold them until released."""

    def __init__(self, *answers: RequestLease) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[UUID, float, int, int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, partner_id: UUID, rate: float, burst: int, want: int) -> RequestLease:
        self.asked.append((partner_id, rate, burst, want))
        await self.release.wait()
        return self.answers.pop(0)


def _policy(rate: float = 50, burst: int = 100) -> PartnerPolicy:
    return PartnerPolicy(rate, burst, 10, 10, suspended=False)


def test_a_batch_is_a_tenth_of_a_seconds_rate_within_the_burst() -> None:
    assert [batch(_policy(r, b)) for r, b in ((50, 100), (0.01, 3), (1e6, 20), (5, 5))] == [5, 1, 20, 1]


async def test_leased_tokens_are_spent_without_asking_again_until_they_lapse() -> None:
    clock = Clock()
    source = Source(RequestLease(3, 0.05, 0), RequestLease(1, 0.1, 0))
    rate = FleetRate(source, clock=clock)
    partner = uuid4()

    for _ in range(3):
        await rate.take(partner, _policy())
    asked_for_three = len(source.asked)
    clock.now += 0.06  # the first lease has lapsed
    await rate.take(partner, _policy())

    assert (asked_for_three, len(source.asked)) == (1, 2)
    assert source.asked[0] == (partner, 50, 100, 5)


async def test_concurrent_calls_of_a_partner_share_one_question() -> None:
    source = Source(RequestLease(10, 1.0, 0))
    source.release.clear()
    rate = FleetRate(source, clock=Clock())
    partner = uuid4()

    calls = [asyncio.create_task(rate.take(partner, _policy())) for _ in range(8)]
    await asyncio.sleep(0)  # every call reaches the question in flight
    source.release.set()
    await asyncio.gather(*calls)

    assert len(source.asked) == 1


async def test_a_refusal_is_answered_from_memory_for_at_most_a_tenth_of_a_second() -> None:
    clock = Clock()
    source = Source(RequestLease(0, 0.05, 30.0), RequestLease(1, 0.1, 0))
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
