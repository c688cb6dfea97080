"""Limits on bulk extraction, applied to every partner call. Pure but for a log line and a metric.

Three layers, each answering RESOURCE_EXHAUSTED with a RetryInfo:

* a request rate per partner (``APPTGATE_PARTNER_RPS``/``_BURST``), held across
  every process from tokens leased from PostgreSQL (:mod:`service.access.request_rate`);
* daily caps on contact disclosures and on distinct patients reached, counted
  in PostgreSQL by the statement that records the disclosure, so they hold
  across every process (``APPTGATE_CONTACT_DAILY_CAP``/``_PATIENT_DAILY_CAP``);
* an anomaly detector: a day reaching far more distinct patients than the
  partner's own recent norm is flagged (an event in ``partner_events``, a
  metric, a log line) and, with ``APPTGATE_ANOMALY_SUSPEND``, suspends the
  partner until an operator lifts it.

Per-partner overrides come from ``PartnerRegistryService.SetPartnerLimits``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from service import models
from service.errors import ApptgateError, PartnerSuspended, ResourceExhausted
from service.settings import Settings
from service.telemetry.tracing import Telemetry

log = logging.getLogger(__name__)

#: How long a process trusts a partner's limits before reading them again: suspension is not
#: cached (every partner statement checks it), and the process whose registry changes a
#: partner's limits forgets them at once.
POLICY_TTL = 1.0
#: Partners whose limits and buckets a process keeps, least recently used out first.
_MAX_PARTNERS = 10_000


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
    """Token buckets by key (a peer's address), bounded in number (least recently used evicted)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_partners: int = _MAX_PARTNERS) -> None:
        self._clock = clock
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        self._max = max_partners

    def peek(self, key: Hashable, rate: float, burst: int) -> float:
        """The seconds until ``key``'s bucket holds a token (0: it holds one now), taking nothing."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(float(burst), bucket.tokens + (self._clock() - bucket.stamp) * rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / rate

    def take(self, key: Hashable, rate: float, burst: int) -> float:
        """Take one token; return 0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(burst), now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / rate


def _until_tomorrow() -> float:
    now = datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


def refusal(outcome: models.ChargeOutcome) -> ApptgateError | None:
    """The error a charge's outcome answers the call with, if any (a cap, or the partner just suspended)."""
    if outcome is models.ChargeOutcome.CONTACT_CAP:
        return ResourceExhausted(
            "the daily cap on contact disclosures is reached",
            reason="CONTACT_CAP_REACHED",
            retry_delay=_until_tomorrow(),
        )
    if outcome is models.ChargeOutcome.PATIENT_CAP:
        return ResourceExhausted(
            "the daily cap on patients reached is reached", reason="PATIENT_CAP_REACHED", retry_delay=_until_tomorrow()
        )
    if outcome is models.ChargeOutcome.SUSPENDED:
        return PartnerSuspended()
    return None


class ExtractionGuard:
    """Decides whether a partner call may proceed and acts on what its charge answered."""

    def __init__(
        self, settings: Settings, telemetry: Telemetry, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._anomalies = telemetry.anomalies
        self._clock = clock
        self._policies: OrderedDict[UUID, tuple[PartnerPolicy, float]] = OrderedDict()

    def known_policy(self, partner_id: UUID) -> PartnerPolicy | None:
        """The partner's limits read less than :data:`POLICY_TTL` ago, if any."""
        known = self._policies.get(partner_id)
        if known is None or self._clock() - known[1] > POLICY_TTL:
            return None
        return known[0]

    def learn(self, partner_id: UUID, overrides: models.PartnerOverrides) -> PartnerPolicy:
        """Remember the partner's limits as just read; return them."""
        policy = self.policy(overrides)
        self._policies[partner_id] = (policy, self._clock())
        self._policies.move_to_end(partner_id)
        if len(self._policies) > _MAX_PARTNERS:
            self._policies.popitem(last=False)
        return policy

    def forget(self, partner_id: UUID) -> None:
        """Drop the partner's remembered limits (they just changed)."""
        self._policies.pop(partner_id, None)

    def policy(self, overrides: models.PartnerOverrides) -> PartnerPolicy:
        """The limits in force: the partner's overrides over the configured defaults."""
        s = self._settings
        return PartnerPolicy(
            overrides.requests_per_second or s.partner_rps,
            overrides.burst or s.partner_burst,
            s.contact_daily_cap if overrides.contact_daily_cap is None else overrides.contact_daily_cap,
            s.patient_daily_cap if overrides.patient_daily_cap is None else overrides.patient_daily_cap,
            overrides.suspend_time is not None,
        )

    @staticmethod
    def admit(policy: PartnerPolicy) -> None:
        """Refuse a suspended partner."""
        if policy.suspended:
            raise PartnerSuspended()

    def terms(self, policy: PartnerPolicy) -> models.ChargeTerms:
        """What the partner's responses are counted against."""
        s = self._settings
        return models.ChargeTerms(
            policy.contact_daily_cap,
            policy.patient_daily_cap,
            s.anomaly_factor,
            s.anomaly_min_volume,
            s.anomaly_suspend,
        )

    def settle(self, partner_id: UUID, outcome: models.ChargeOutcome) -> None:
        """Act on a charge's outcome: report an anomaly; raise what a cap or a suspension answers.

        Over a cap nothing was counted or recorded; a suspension was committed
        (it sticks) and nothing was recorded: either way nothing may be sent.
        """
        if outcome is models.ChargeOutcome.OK:  # nearly every call
            return
        if outcome is models.ChargeOutcome.FLAGGED or outcome is models.ChargeOutcome.SUSPENDED:
            self._anomalies.add(1, {"state": outcome.value})
            log.warning(
                "partner volume far above its recent norm: %s",
                outcome.value,
                extra={"event": "anomaly", "partner_id": str(partner_id)},
            )
        error = refusal(outcome)
        if error is not None:
            raise error
