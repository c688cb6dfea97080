"""A patient's own view of the ledger, and the privacy events (migration 0009).

:func:`patient_disclosures` aggregates every ledger item about one patient,
those of records holding the items and those of records repeating them by
reference, exactly as ``disclosure_items`` reads them: a record found by the
patient index (``disclosures_patient_ids_idx``), then the records naming it
(``disclosures_items_of_idx``), never a scan of the ledger. The privacy events
are written by triggers; this module reads them and runs the expiry sweep's
statements.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from service import models
from service.store.database import Connection

#: The statement of ListPatientDisclosures (public so that a benchmark can run and EXPLAIN it). The
#: records are read by id and by ``items_of`` inside ``LATERAL (… OFFSET 0)``, and the purpose by a
#: scalar subquery, so that no plan, the generic one a prepared statement falls back to included,
#: can trade those index probes for a hash over the whole ledger or the consents.
PATIENT_DISCLOSURES_SQL = """
WITH holders AS (
    SELECT d.id, u.appointment_id
    FROM disclosures d
    CROSS JOIN LATERAL unnest(d.appointment_ids, d.patient_ids) AS u(appointment_id, patient_id)
    WHERE d.patient_ids @> ARRAY[$1::uuid] AND u.patient_id = $1
), items AS (
    SELECT d.partner_id, h.appointment_id, d.view, d.contact_fields, d.outcome, d.denial_reason, d.consent_id,
           d.disclose_time
    FROM holders h CROSS JOIN LATERAL (SELECT * FROM disclosures d WHERE d.id = h.id OFFSET 0) d
    WHERE d.disclose_time >= $2 AND d.disclose_time < $3
    UNION ALL
    SELECT r.partner_id, h.appointment_id, r.view, r.contact_fields, r.outcome, r.denial_reason, r.consent_id,
           r.disclose_time
    FROM holders h CROSS JOIN LATERAL (SELECT * FROM disclosures r WHERE r.items_of = h.id OFFSET 0) r
    WHERE r.disclose_time >= $2 AND r.disclose_time < $3
), groups AS (
    SELECT partner_id, appointment_id, view, contact_fields, outcome, denial_reason, consent_id,
           min(disclose_time) AS first_time, max(disclose_time) AS last_time, count(*) AS n,
           concat_ws('|', partner_id, appointment_id, view, outcome, denial_reason, contact_fields::text,
                     consent_id) AS group_key
    FROM items
    GROUP BY partner_id, appointment_id, view, contact_fields, outcome, denial_reason, consent_id
)
SELECT g.partner_id, p.display_name, g.appointment_id, a.start_time, pr.display_name, pr.specialty, g.view,
       g.contact_fields, g.outcome, g.denial_reason, g.consent_id,
       (SELECT c.purpose FROM consents c WHERE c.id = g.consent_id), g.first_time, g.last_time, g.n, g.group_key
FROM groups g
JOIN partners p ON p.id = g.partner_id
LEFT JOIN appointments a ON a.id = g.appointment_id
LEFT JOIN practitioners pr ON pr.id = a.practitioner_id
WHERE $4::timestamptz IS NULL OR (g.last_time, g.group_key) < ($4, $5::text)
ORDER BY g.last_time DESC, g.group_key DESC
LIMIT $6
"""

_EVENTS = (
    "SELECT e.position, e.type, e.patient_id, e.partner_id, p.display_name, e.consent_id, e.consent_request_id, "
    "e.fields, e.event_time FROM privacy_events e JOIN partners p ON p.id = e.partner_id "
    "WHERE e.position > $1 ORDER BY e.position LIMIT $2"
)


def _patient_disclosure(row: asyncpg.Record) -> models.PatientDisclosure:
    return models.PatientDisclosure(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4] or "",
        row[5] or "",
        models.View(row[6]),
        tuple(row[7]),
        models.Outcome(row[8]),
        row[9],
        row[10],
        row[11] or "",
        row[12],
        row[13],
        row[14],
        row[15],
    )


async def patient_exists(conn: Connection, patient_id: UUID) -> bool:
    """Whether the patient exists."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM patients WHERE id = $1)", patient_id))


async def patient_disclosures(
    conn: Connection,
    patient_id: UUID,
    *,
    start_time: datetime,
    end_time: datetime,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[models.PatientDisclosure]:
    """The patient's history in ``[start_time, end_time)``, most recent access first, strictly after ``before``."""
    before_time, before_key = before if before is not None else (None, None)
    rows = await conn.fetch(PATIENT_DISCLOSURES_SQL, patient_id, start_time, end_time, before_time, before_key, limit)
    return [_patient_disclosure(row) for row in rows]


async def event_head(conn: Connection) -> int:
    """The position of the last privacy event (0 for none)."""
    return int(await conn.fetchval("SELECT position FROM privacy_event_head"))


async def events(conn: Connection, *, after: int, limit: int) -> list[models.PrivacyEvent]:
    """The privacy events after ``after``, in commit order."""
    rows = await conn.fetch(_EVENTS, after, limit)
    return [
        models.PrivacyEvent(
            row[0], models.PrivacyEventType(row[1]), row[2], row[3], row[4], row[5], row[6], tuple(row[7]), row[8]
        )
        for row in rows
    ]


async def announce_expired_consents(conn: Connection, *, limit: int) -> int:
    """Announce up to ``limit`` consents past their expiry (each once, across processes); return how many."""
    return int(await conn.fetchval("SELECT announce_expired_consents($1)", limit))


async def seconds_to_next_consent_expiry(conn: Connection) -> float | None:
    """Seconds until the next unannounced consent expires, by the database's clock; ``None`` when none will."""
    value = await conn.fetchval(
        "SELECT extract(epoch FROM min(expire_time) - statement_timestamp()) FROM consents "
        "WHERE NOT expire_announced AND revoke_time IS NULL"
    )
    return None if value is None else float(value)
