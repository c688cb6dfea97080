"""Limits on bulk extraction, applied to every partner call.

Three layers, each answering RESOURCE_EXHAUSTED with a RetryInfo:

* a token bucket per partner and process (``APPTGATE_PARTNER_RPS``/``_BURST``);
* daily caps on contact disclosures and on distinct patients reached, counted
  in PostgreSQL in the same transaction as the disclosure, so they hold across
  every process (``APPTGATE_CONTACT_DAILY_CAP``/``_PATIENT_DAILY_CAP``);
* an anomaly detector: a day reaching far more distinct patients than the
  partner's own recent norm is flagged (an event in ``partner_events``, a metric, a log line) and, with
  ``APPTGATE_ANOMALY_SUSPEND``, suspends the partner until an operator lifts it.

Per-partner overrides come from ``PartnerRegistryService.SetPartnerLimits``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from service import models
from service.errors import PermissionDenied, ResourceExhausted
from service.limits import PartnerPolicy, TokenBuckets
from service.settings import Settings
from service.store.usage import ChargeTerms
from service.telemetry import Telemetry

log = logging.getLogger(__name__)

#: How long a process trusts a partner's limits before reading them again. Suspension is
#: not cached (the partner path's statements check it), and this process forgets a
#: partner's limits as soon as its own registry changes them.
POLICY_TTL = 1.0
_MAX_POLICIES = 10_000

SUSPENDED = PermissionDenied(
    "the partner is suspended; an operator must lift the suspension", reason="PARTNER_SUSPENDED"
)


def _until_tomorrow() -> float:
    now = datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class ExtractionGuard:
    """Decides whether a partner call may proceed and counts what it discloses."""

    def __init__(
        self, settings: Settings, telemetry: Telemetry, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._buckets = TokenBuckets()
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
        if len(self._policies) > _MAX_POLICIES:
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

    def admit(self, partner_id: UUID, policy: PartnerPolicy) -> None:
        """Refuse a suspended partner, or one over its request rate."""
        if policy.suspended:
            raise SUSPENDED
        self.throttle(partner_id, policy)

    def throttle(self, partner_id: UUID, policy: PartnerPolicy) -> None:
        """Refuse a partner over its request rate."""
        wait = self._buckets.take(partner_id, policy.requests_per_second, policy.burst)
        if wait > 0:
            raise ResourceExhausted("too many requests", reason="RATE_LIMITED", retry_delay=wait)

    def terms(self, policy: PartnerPolicy) -> ChargeTerms:
        """What the partner's responses are counted against."""
        s = self._settings
        return ChargeTerms(
            policy.contact_daily_cap,
            policy.patient_daily_cap,
            s.anomaly_factor,
            s.anomaly_min_volume,
            s.anomaly_suspend,
        )

    def settle(self, partner_id: UUID, outcome: str) -> bool:
        """Act on a charge's outcome; return False when the partner was just suspended for it.

        Raises :class:`ResourceExhausted` over a daily cap (nothing was counted).
        """
        if outcome == "contact_cap":
            raise ResourceExhausted(
                "the daily cap on contact disclosures is reached",
                reason="CONTACT_CAP_REACHED",
                retry_delay=_until_tomorrow(),
            )
        if outcome == "patient_cap":
            raise ResourceExhausted(
                "the daily cap on patients reached is reached",
                reason="PATIENT_CAP_REACHED",
                retry_delay=_until_tomorrow(),
            )
        if outcome in ("flagged", "suspended"):
            self._anomalies.add(1, {"state": outcome})
            log.warning(
                "partner volume far above its recent norm: %s",
                "suspended" if outcome == "suspended" else "flagged",
                extra={"event": "anomaly", "partner_id": str(partner_id)},
            )
        return outcome != "suspended"
