"""Partners' limit overrides, suspensions and daily counters (migration 0004), as operators read and change them.

The counters are written by the record statements (:mod:`service.store.ledger`).
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from service import models
from service.errors import FailedPrecondition, NotFound
from service.store.database import Connection

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
        "INSERT INTO partner_events (partner_id, kind, detail) VALUES ($1, $2, 'limits changed')",
        partner_id,
        models.PartnerEventKind.LIMITS,
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
        "INSERT INTO partner_events (partner_id, kind, detail) VALUES ($1, $2, 'by an operator')",
        partner_id,
        models.PartnerEventKind.LIFTED,
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
