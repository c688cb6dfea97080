"""The partner request rate, held across every process that shares the database.

A process spends request tokens it leased from PostgreSQL in small batches
(:mod:`service.store.request_leases`): a call costs a round trip only when the
process's lease is spent or over, so a partner at its limit is refused from
memory until the database could grant again. A lease ends with its tenth of a
second, which bounds what any one second of calls can hold fleet-wide to
``max(rate, burst)``; the bucket under it refills at ``rate``. The batch
follows demand (doubled when a lease was spent whole, else what was spent, up
to a tenth of a second's rate), and what a lease left unspent goes back with
the next question, so a partner calling now and then is not charged for
tokens it never used.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from service.access.limits import PartnerPolicy
from service.errors import ResourceExhausted
from service.store.request_leases import RequestLease, Unspent

#: Leases a process asks for per second and partner at most, while the partner is busy: the
#: batch is a tenth of a second's rate, and a lease lasts until the end of its tenth.
LEASES_PER_SECOND = 10
#: The longest a refusal is answered from memory: a partner whose limits were raised, or whose
#: tokens another process left unspent, is asked about again this soon.
_REFUSAL_MEMORY = 1 / LEASES_PER_SECOND
#: Partners whose lease a process keeps, least recently used out first.
_MAX_PARTNERS = 10_000

#: Asks the database for tokens: (partner, rate, burst, how many, what is returned) → the lease.
LeaseSource = Callable[[UUID, float, int, int, Unspent], Awaitable[RequestLease]]


@dataclass(slots=True)
class _Lease:
    tokens: int = 0
    until: float = 0.0  # when the tokens lapse, on this process's clock
    granted: int = 0  # by the last lease
    tenth: int = 0  # the last lease's, which its unspent tokens are returned by
    batch: int = 1  # how many to ask for next
    refused_until: float = 0.0
    retry_at: float = 0.0
    pending: asyncio.Future[None] | None = None


def largest_batch(policy: PartnerPolicy) -> int:
    """The most tokens a process asks for at a time: a tenth of a second's rate, within the burst."""
    return max(1, min(policy.burst, math.ceil(policy.requests_per_second / LEASES_PER_SECOND)))


class FleetRate:
    """Admits partner calls within their request rate, across processes, from leased tokens."""

    def __init__(self, lease: LeaseSource, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease = lease
        self._clock = clock
        self._leases: OrderedDict[UUID, _Lease] = OrderedDict()

    async def take(self, partner_id: UUID, policy: PartnerPolicy) -> None:
        """Spend one of the partner's tokens. Raises RESOURCE_EXHAUSTED (``RATE_LIMITED``) with RetryInfo."""
        while True:
            state = self._state(partner_id)
            now = self._clock()
            if state.tokens > 0 and now < state.until:
                state.tokens -= 1
                return
            if now < state.refused_until:
                raise _rate_limited(state.retry_at - now)
            if state.pending is not None:
                # Another call of this partner is asking already: its answer serves this one too.
                await asyncio.shield(state.pending)
                continue
            await self._renew(partner_id, state, policy)
            if self._clock() < state.refused_until:
                raise _rate_limited(state.retry_at - self._clock())

    async def _renew(self, partner_id: UUID, state: _Lease, policy: PartnerPolicy) -> None:
        pending = state.pending = asyncio.get_running_loop().create_future()
        try:
            unspent = Unspent(state.tokens, state.tenth) if state.tokens > 0 else Unspent()
            if state.granted:
                spent_whole = state.tokens == 0
                state.batch = state.batch * 2 if spent_whole else max(1, state.granted - state.tokens)
            state.batch = min(state.batch, largest_batch(policy))
            state.tokens = 0  # returned with this question
            asked = self._clock()
            lease = await self._lease(partner_id, policy.requests_per_second, policy.burst, state.batch, unspent)
            # Counted from when the question left, so the lease ends here no later than in the database.
            state.tokens, state.granted, state.tenth = lease.granted, lease.granted, lease.tenth
            state.until = asked + lease.expire_in
            if lease.granted == 0:
                state.retry_at = asked + lease.retry_in
                # Never less than a moment, so a refusal cannot turn into a loop of questions.
                state.refused_until = asked + min(max(lease.retry_in, 0.001), _REFUSAL_MEMORY)
        finally:
            state.pending = None
            pending.set_result(None)

    def _state(self, partner_id: UUID) -> _Lease:
        state = self._leases.get(partner_id)
        if state is None:
            state = self._leases[partner_id] = _Lease()
            if len(self._leases) > _MAX_PARTNERS:
                self._leases.popitem(last=False)
        else:
            self._leases.move_to_end(partner_id)
        return state


def _rate_limited(wait: float) -> ResourceExhausted:
    return ResourceExhausted("too many requests", reason="RATE_LIMITED", retry_delay=max(wait, 0.001))
