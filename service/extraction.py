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
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from service import models
from service.errors import PermissionDenied, ResourceExhausted
from service.limits import PartnerPolicy, TokenBuckets
from service.settings import Settings
from service.store import usage
from service.store.database import Connection
from service.telemetry import Telemetry

log = logging.getLogger(__name__)

SUSPENDED = PermissionDenied(
    "the partner is suspended; an operator must lift the suspension", reason="PARTNER_SUSPENDED"
)


def _until_tomorrow() -> float:
    now = datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class ExtractionGuard:
    """Decides whether a partner call may proceed and counts what it discloses."""

    def __init__(self, settings: Settings, telemetry: Telemetry) -> None:
        self._settings = settings
        self._buckets = TokenBuckets()
        self._anomalies = telemetry.anomalies

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
        wait = self._buckets.take(partner_id, policy.requests_per_second, policy.burst)
        if wait > 0:
            raise ResourceExhausted("too many requests", reason="RATE_LIMITED", retry_delay=wait)

    async def charge(
        self,
        conn: Connection,
        partner_id: UUID,
        policy: PartnerPolicy,
        patient_ids: Sequence[UUID],
        *,
        contacts: int = 0,
    ) -> bool:
        """Count a response's disclosures; return False when the partner was just suspended for it.

        Raises :class:`ResourceExhausted` over a daily cap (the caller's
        transaction then rolls back, this count with it).
        """
        s = self._settings
        outcome = await usage.charge(
            conn,
            partner_id=partner_id,
            patient_ids=patient_ids,
            disclosures=len(patient_ids),
            contacts=contacts,
            contact_cap=policy.contact_daily_cap,
            patient_cap=policy.patient_daily_cap,
            anomaly_factor=s.anomaly_factor,
            anomaly_min=s.anomaly_min_volume,
            suspend_on_anomaly=s.anomaly_suspend,
        )
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
