"""Partner limits, daily usage counters and suspensions (migration 0010)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from service import models
from service.errors import FailedPrecondition, NotFound
from service.store.database import Connection


@dataclass(frozen=True, slots=True)
class ChargeTerms:
    """What a response is counted against: the partner's caps and the anomaly rule."""

    contact_cap: int
    patient_cap: int
    anomaly_factor: float
    anomaly_min: int
    suspend_on_anomaly: bool


def charge_columns(terms: Mapping[UUID, ChargeTerms]) -> tuple[list[Any], ...]:
    """The partners a group statement charges, in lock order (sorted), and their terms: one list per column."""
    partners = sorted(terms)
    charged = [terms[p] for p in partners]
    return (
        partners,
        [t.contact_cap for t in charged],
        [t.patient_cap for t in charged],
        [t.anomaly_factor for t in charged],
        [t.anomaly_min for t in charged],
        [t.suspend_on_anomaly for t in charged],
    )


class CountedPatients:
    """The patients each partner is known to have been counted for today: a memo of this process.

    A partner's patients of the day (``partner_daily_patients``) only grow
    while its counter row for the day stands, and counting a patient counted
    already adds nothing; agenda tools list the same pages all day. So the
    record statement of basic views (migration 0020) is sent only the patients
    this memo does not hold, with the counter row they were counted under
    (:meth:`since`, the row's ``counted_since``), and charges every patient
    anyway when the partner's row for its day is another one (a new day, or
    counters deleted and started again). What the memo holds was read back
    from committed statements (:meth:`add`); once it holds ``size`` patients
    it starts again empty. A patient it does not hold costs one probe more.
    """

    __slots__ = ("_held", "_known", "_size")

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._known: dict[UUID, tuple[int, set[UUID]]] = {}  # partner → (counted_since, patients)
        self._held = 0

    def since(self, partner_id: UUID) -> int | None:
        """The counter row (``counted_since``) the partner's known patients were counted under, if any."""
        known = self._known.get(partner_id)
        return known[0] if known is not None else None

    def unknown(self, partner_id: UUID, patients: Iterable[UUID]) -> list[UUID]:
        """The ``patients`` not known to be counted for ``partner_id``, in order."""
        known = self._known.get(partner_id)
        if known is None:
            return list(patients)
        counted = known[1]
        return [p for p in patients if p not in counted]

    def add(self, partner_id: UUID, since: int | None, patients: Iterable[UUID]) -> None:
        """Remember ``patients`` as counted for ``partner_id`` under the counter row ``since`` (committed)."""
        if self._held >= self._size:
            self._known.clear()
            self._held = 0
        known = self._known.pop(partner_id, None)
        if known is not None and known[0] != since:
            self._held -= len(known[1])
            known = None
        if since is None:  # no counter row: nothing to know
            return
        if known is None:
            known = (since, set())
        counted = known[1]
        before = len(counted)
        counted.update(patients)
        self._held += len(counted) - before
        self._known[partner_id] = known


#: The answers of ``charge_partner_usage`` (and of the statements built on it) over a cap.
CAP_OUTCOMES = ("contact_cap", "patient_cap")


def cap_reached(exc: asyncpg.PostgresError) -> str | None:
    """The cap a record statement refused over (SQLSTATE AG429, migrations 0013 and 0017), if that was it."""
    detail = getattr(exc, "detail", None)
    if getattr(exc, "sqlstate", None) == "AG429" and detail in CAP_OUTCOMES:
        return str(detail)
    return None


_OVERRIDES = "requests_per_second, burst, contact_daily_cap, patient_daily_cap, suspend_time, suspend_reason"


async def overrides(conn: Connection, partner_id: UUID) -> models.PartnerOverrides:
    """The partner's overrides (all ``None`` when it has none). Raises :class:`NotFound` for an unknown partner."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM partners WHERE id = $1)", partner_id):
        raise NotFound("partner not found", metadata={"partner_id": str(partner_id)})
    row = await conn.fetchrow(f"SELECT {_OVERRIDES} FROM partner_limits WHERE partner_id = $1", partner_id)
    return models.PartnerOverrides(*row) if row else models.PartnerOverrides()


async def set_limits(
    conn: Connection,
    partner_id: UUID,
    *,
    requests_per_second: float | None,
    burst: int | None,
    contact_daily_cap: int | None,
    patient_daily_cap: int | None,
) -> models.PartnerOverrides:
    """Override the given limits (``None`` keeps the current value). Raises :class:`NotFound`."""
    try:
        row = await conn.fetchrow(
            "INSERT INTO partner_limits AS l (partner_id, requests_per_second, burst, contact_daily_cap, "
            "patient_daily_cap) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (partner_id) DO UPDATE SET "
            "requests_per_second = coalesce(EXCLUDED.requests_per_second, l.requests_per_second), "
            "burst = coalesce(EXCLUDED.burst, l.burst), "
            "contact_daily_cap = coalesce(EXCLUDED.contact_daily_cap, l.contact_daily_cap), "
            "patient_daily_cap = coalesce(EXCLUDED.patient_daily_cap, l.patient_daily_cap), update_time = now() "
            f"RETURNING {_OVERRIDES}",
            partner_id,
            requests_per_second,
            burst,
            contact_daily_cap,
            patient_daily_cap,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("partner not found", metadata={"partner_id": str(partner_id)}) from exc
    await conn.execute(
        "INSERT INTO partner_events (partner_id, kind, detail) VALUES ($1, 'limits', 'limits changed')", partner_id
    )
    return models.PartnerOverrides(*row)


async def lift_suspension(conn: Connection, partner_id: UUID) -> models.PartnerOverrides:
    """Lift a suspension. Raises :class:`NotFound`, or :class:`FailedPrecondition` when not suspended."""
    current = await overrides(conn, partner_id)
    if current.suspend_time is None:
        raise FailedPrecondition(
            "the partner is not suspended", reason="NOT_SUSPENDED", metadata={"partner_id": str(partner_id)}
        )
    row = await conn.fetchrow(
        "UPDATE partner_limits SET suspend_time = NULL, suspend_reason = '', update_time = now() "
        f"WHERE partner_id = $1 RETURNING {_OVERRIDES}",
        partner_id,
    )
    await conn.execute(
        "INSERT INTO partner_events (partner_id, kind, detail) VALUES ($1, 'lifted', 'by an operator')", partner_id
    )
    return models.PartnerOverrides(*row)


async def today(conn: Connection, partner_id: UUID) -> models.PartnerUsage:
    """The partner's counters for the current UTC day (disclosures from the ledger), and its recent norm."""
    row = await conn.fetchrow(
        "WITH d AS (SELECT (statement_timestamp() AT TIME ZONE 'UTC')::date AS day) "
        "SELECT d.day::text, "
        "(SELECT count(*) FROM disclosure_items l WHERE l.partner_id = $1 AND l.outcome = 1 "
        " AND l.disclose_time >= d.day::timestamp AT TIME ZONE 'UTC'), "
        "coalesce(u.contact_disclosures, 0), coalesce(u.patients_reached, 0), "
        "(SELECT coalesce(sum(p.patients_reached), 0) / 7.0 FROM partner_daily_usage p "
        " WHERE p.partner_id = $1 AND p.day >= d.day - 7 AND p.day < d.day)::float8, u.flag_time "
        "FROM d LEFT JOIN partner_daily_usage u ON u.partner_id = $1 AND u.day = d.day",
        partner_id,
    )
    return models.PartnerUsage(*row)
