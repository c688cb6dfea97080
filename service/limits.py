"""Per-partner request rate limits: token buckets, one per partner, per process. Pure: no I/O.

The rate limit smooths bursts in each process; what must hold across
processes (daily caps) is counted in PostgreSQL instead
(``charge_partner_usage``, migration 0010). With N worker processes a
partner's sustained rate can reach N times the configured rate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True, slots=True)
class PartnerPolicy:
    """The limits in force for one partner (defaults with its overrides applied)."""

    requests_per_second: float
    burst: int
    contact_daily_cap: int
    patient_daily_cap: int
    suspended: bool


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """Token buckets by partner, bounded in number (least recently used evicted)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_partners: int = 10_000) -> None:
        self._clock = clock
        self._buckets: OrderedDict[UUID, _Bucket] = OrderedDict()
        self._max = max_partners

    def take(self, partner_id: UUID, rate: float, burst: int) -> float:
        """Take one token; return 0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        bucket = self._buckets.get(partner_id)
        if bucket is None:
            bucket = _Bucket(float(burst), now)
            self._buckets[partner_id] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(partner_id)
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / rate
