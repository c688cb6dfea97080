"""Reads of the disclosure ledger: the audit trail and the breach-scope report.

Both read the ``disclosure_items`` view (migration 0005), one row per
appointment of every record, whichever its shape: a record's own items, or
those of the record a reference names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from service import models
from service.store.database import Connection

_COLUMNS = (
    "id, item, partner_id, key_id, requested_id, appointment_id, patient_id, view, contact_fields, consent_id, rpc, "
    "trace_id, disclose_time, outcome, denial_reason, client_cert"
)


def _disclosure(row: asyncpg.Record) -> models.Disclosure:
    return models.Disclosure(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        models.View(row[7]),
        tuple(row[8]),
        row[9],
        row[10],
        row[11],
        row[12],
        models.Outcome(row[13]),
        row[14],
        row[15],
    )


async def list_disclosures(
    conn: Connection,
    *,
    partner_id: UUID | None,
    patient_id: UUID | None,
    start_time: datetime | None,
    end_time: datetime | None,
    after: tuple[int, int],
    limit: int,
) -> list[models.Disclosure]:
    """Appointments of the records matching every given filter, in the order written, after ``(id, item)``.

    Only the filters given become conditions, so each can use its index: a
    patient is found through ``disclosures_patient_ids_idx`` (the records
    holding it), then ``disclosures_items_of_idx`` (the records repeating those).
    """
    conditions = ["d.id >= $1", "(d.id, d.item) > ($1, $2)"]
    args: list[Any] = [after[0], after[1]]
    if partner_id is not None:
        args.append(partner_id)
        conditions.append(f"d.partner_id = ${len(args)}")
    if patient_id is not None:
        args.append(patient_id)
        conditions.append(
            f"d.patient_id = ${len(args)} AND d.id IN (SELECT r.id FROM disclosures r "
            f"WHERE r.patient_ids @> ARRAY[${len(args)}::uuid] "
            f"UNION ALL SELECT r.id FROM disclosures o JOIN disclosures r ON r.items_of = o.id "
            f"WHERE o.patient_ids @> ARRAY[${len(args)}::uuid])"
        )
    if start_time is not None:
        args.append(start_time)
        conditions.append(f"d.disclose_time >= ${len(args)}")
    if end_time is not None:
        args.append(end_time)
        conditions.append(f"d.disclose_time < ${len(args)}")
    args.append(limit)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM disclosure_items d WHERE {' AND '.join(conditions)} "
        f"ORDER BY d.id, d.item LIMIT ${len(args)}",
        *args,
    )
    return [_disclosure(row) for row in rows]


#: The breach report's statement (public so that a benchmark can EXPLAIN it).
BREACH_SQL = """
SELECT d.patient_id,
       array_agg(DISTINCT d.appointment_id) FILTER (WHERE d.outcome = 1 AND d.appointment_id IS NOT NULL)
           AS appointment_ids,
       array_agg(DISTINCT f.field) FILTER (WHERE d.outcome = 1 AND f.field IS NOT NULL) AS contact_fields,
       min(d.disclose_time) AS first_time,
       max(d.disclose_time) AS last_time,
       count(DISTINCT d.id) FILTER (WHERE d.outcome = 3) AS consent_requests,
       array_agg(DISTINCT d.view) FILTER (WHERE d.outcome = 1) AS views
FROM disclosure_items d
LEFT JOIN LATERAL unnest(d.contact_fields) AS f(field) ON true
WHERE d.partner_id = $1 AND d.disclose_time >= $2 AND d.disclose_time < $3
  AND d.outcome IN (1, 3) AND d.patient_id IS NOT NULL AND ($4::text IS NULL OR d.key_id = $4)
GROUP BY d.patient_id
ORDER BY d.patient_id
"""


async def breach_report(
    conn: Connection, *, partner_id: UUID, start_time: datetime, end_time: datetime, key_id: str | None
) -> AsyncIterator[models.AffectedPatient]:
    """Yield every patient the partner was shown something about, or sent a consent request, in the window.

    Streams through a server-side cursor (the connection must be in a
    transaction), so a report over a large ledger does not sit in memory twice.
    """
    async for row in conn.cursor(BREACH_SQL, partner_id, start_time, end_time, key_id, prefetch=2000):
        yield models.AffectedPatient(
            row["patient_id"],
            tuple(row["appointment_ids"] or ()),
            tuple(sorted(row["contact_fields"] or ())),
            row["first_time"],
            row["last_time"],
            row["consent_requests"],
            tuple(models.View(v) for v in sorted(row["views"] or ())),
        )
