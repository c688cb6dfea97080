"""The breach report's reads beyond its list of patients (:func:`service.store.disclosures.breach_report`).

The appointments disclosed, with their practitioners and specialties; the
activity hour by hour, view and key; the totals per view; the records of the
window and whether they are chained; and, for the notification letters only,
the patients' names and emails as stored (sealed). Each reads the window as
the patient list does: the partner's records in ``[start_time, end_time)``,
of one key when given, disclosures (outcome 1) and consent requests
(outcome 3), never the platform's own use (outcome 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from service import models
from service.store.database import Connection

#: The window's condition, shared by every statement: partner $1, window [$2, $3), key $4 or any.
_WINDOW = "d.partner_id = $1 AND d.disclose_time >= $2 AND d.disclose_time < $3 AND ($4::text IS NULL OR d.key_id = $4)"

#: Appointments read per statement, so that one statement's array stays a bounded parameter.
APPOINTMENT_BATCH = 5000

ACTIVITY_SQL = f"""
SELECT date_trunc('hour', d.disclose_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour, d.view, d.outcome,
       d.key_id, count(*) AS items
FROM disclosure_items d
WHERE {_WINDOW} AND d.outcome IN (1, 3) AND d.patient_id IS NOT NULL
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
"""

VIEW_TOTALS_SQL = f"""
SELECT d.view, count(DISTINCT d.patient_id) AS patients, count(DISTINCT d.appointment_id) AS appointments,
       count(*) AS items
FROM disclosure_items d
WHERE {_WINDOW} AND d.outcome = 1 AND d.patient_id IS NOT NULL
GROUP BY d.view
ORDER BY d.view
"""

_WINDOW_RECORDS = f"""
SELECT count(*) AS records,
       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM disclosure_chain c WHERE c.id = d.id)) AS unchained
FROM disclosures d
WHERE {_WINDOW}
"""

_APPOINTMENTS = """
SELECT a.id, a.patient_id, a.start_time, p.id, p.display_name, p.specialty
FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id
WHERE a.id = ANY($1::uuid[])
ORDER BY a.start_time, a.id
"""

_NOTICE_CONTACTS = """
SELECT id, sealed_given_name, sealed_family_name, sealed_email, given_name, family_name, email
FROM patients
WHERE id = ANY($1::uuid[])
"""


@dataclass(frozen=True, slots=True)
class Window:
    """Which records a breach report reads: one partner's, in ``[start_time, end_time)``, of one key or every key."""

    partner_id: UUID
    start_time: datetime
    end_time: datetime
    key_id: str | None = None

    def args(self) -> tuple[UUID, datetime, datetime, str | None]:
        """The statements' parameters $1 to $4."""
        return (self.partner_id, self.start_time, self.end_time, self.key_id)


@dataclass(frozen=True, slots=True)
class ActivityRow:
    """The appointments of one hour, view, outcome and key (a response of N appointments counts N)."""

    hour_start_time: datetime
    view: models.View
    outcome: models.Outcome
    key_id: str
    items: int


@dataclass(frozen=True, slots=True)
class ViewRow:
    """What was disclosed in one view: distinct patients and appointments, and appointments per response."""

    view: models.View
    patients: int
    appointments: int
    items: int


async def activity(conn: Connection, window: Window) -> list[ActivityRow]:
    """The window's disclosures and consent requests per hour (UTC), view, outcome and key, oldest first."""
    rows = await conn.fetch(ACTIVITY_SQL, *window.args())
    return [
        ActivityRow(row["hour"], models.View(row["view"]), models.Outcome(row["outcome"]), row["key_id"], row["items"])
        for row in rows
    ]


async def view_totals(conn: Connection, window: Window) -> list[ViewRow]:
    """The window's disclosures per view, in enum order (views with none left out)."""
    rows = await conn.fetch(VIEW_TOTALS_SQL, *window.args())
    return [ViewRow(models.View(row["view"]), row["patients"], row["appointments"], row["items"]) for row in rows]


async def window_records(conn: Connection, window: Window) -> tuple[int, int]:
    """The number of the window's records (every outcome), and of those not chained yet."""
    row = await conn.fetchrow(_WINDOW_RECORDS, *window.args())
    return int(row["records"]), int(row["unchained"])


async def appointments(conn: Connection, appointment_ids: Sequence[UUID]) -> list[models.AppointmentSummary]:
    """The appointments of ``appointment_ids`` that exist, by start time, with their practitioners."""
    found: list[models.AppointmentSummary] = []
    for first in range(0, len(appointment_ids), APPOINTMENT_BATCH):
        rows = await conn.fetch(_APPOINTMENTS, list(appointment_ids[first : first + APPOINTMENT_BATCH]))
        found.extend(models.AppointmentSummary(*row) for row in rows)
    found.sort(key=lambda a: (a.start_time, a.id))
    return found


async def notice_contacts(conn: Connection, patient_ids: Sequence[UUID]) -> list[models.StoredNoticeContact]:
    """The names and emails of the patients of ``patient_ids`` as stored: sealed, or the clear text an import left."""
    found: list[models.StoredNoticeContact] = []
    for first in range(0, len(patient_ids), APPOINTMENT_BATCH):
        rows = await conn.fetch(_NOTICE_CONTACTS, list(patient_ids[first : first + APPOINTMENT_BATCH]))
        for row in rows:
            found.append(
                models.StoredNoticeContact(
                    row["id"],
                    row["given_name"] if row["given_name"] is not None else row["sealed_given_name"],
                    row["family_name"] if row["family_name"] is not None else row["sealed_family_name"],
                    row["email"] if row["email"] is not None else row["sealed_email"],
                )
            )
    return found
