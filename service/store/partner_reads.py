"""The partner path's reads: only appointments of practitioners who granted the partner access.

Every query here joins the active grants of the calling partner, so access is
checked by the same statement that reads, on every call and every page. The
select lists name only the basic-view columns: no contact column and no visit
reason is ever read on this path.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from service import models
from service.store.database import Connection

_BASIC_COLUMNS = (
    "a.id, a.patient_id, a.start_time, a.end_time, a.status, a.update_time, p.id, p.display_name, p.specialty"
)
_ACTIVE_GRANT = "g.partner_id = $1 AND g.revoke_time IS NULL"
_FROM_GRANTED = (
    "FROM practitioner_grants g "
    "JOIN appointments a ON a.practitioner_id = g.practitioner_id "
    "JOIN practitioners p ON p.id = g.practitioner_id "
)
_WINDOW = "a.start_time >= $2 AND a.start_time < $3"
_ORDER = "ORDER BY a.start_time, a.id LIMIT $4"

# Four fixed statements (one practitioner or all; first page or after a cursor),
# so each keeps a plan of its own and every value stays a bound parameter.
_LIST_ALL = f"SELECT {_BASIC_COLUMNS} {_FROM_GRANTED} WHERE {_ACTIVE_GRANT} AND {_WINDOW} {_ORDER}"
_LIST_ALL_AFTER = (
    f"SELECT {_BASIC_COLUMNS} {_FROM_GRANTED} WHERE {_ACTIVE_GRANT} AND {_WINDOW} "
    f"AND (a.start_time, a.id) > ($5, $6) {_ORDER}"
)
_LIST_ONE = (
    f"SELECT {_BASIC_COLUMNS} {_FROM_GRANTED} WHERE {_ACTIVE_GRANT} AND {_WINDOW} AND g.practitioner_id = $5 {_ORDER}"
)
_LIST_ONE_AFTER = (
    f"SELECT {_BASIC_COLUMNS} {_FROM_GRANTED} WHERE {_ACTIVE_GRANT} AND {_WINDOW} AND g.practitioner_id = $5 "
    f"AND (a.start_time, a.id) > ($6, $7) {_ORDER}"
)
_GET = (
    f"SELECT {_BASIC_COLUMNS} FROM appointments a JOIN practitioners p ON p.id = a.practitioner_id "
    "WHERE a.id = $2 AND EXISTS (SELECT 1 FROM practitioner_grants g "
    f"WHERE {_ACTIVE_GRANT} AND g.practitioner_id = a.practitioner_id)"
)
_IS_GRANTED = f"SELECT EXISTS (SELECT 1 FROM practitioner_grants g WHERE {_ACTIVE_GRANT} AND g.practitioner_id = $2)"


async def list_appointments(
    conn: Connection,
    *,
    partner_id: UUID,
    practitioner_id: UUID | None,
    start_time: datetime,
    end_time: datetime,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[models.BasicAppointment]:
    """Return up to ``limit`` visible appointments starting in ``[start_time, end_time)``.

    Ordered by ``(start_time, id)`` and strictly after the ``after`` cursor.
    """
    window = (partner_id, start_time, end_time, limit)
    if practitioner_id is None:
        if after is None:
            rows = await conn.fetch(_LIST_ALL, *window)
        else:
            rows = await conn.fetch(_LIST_ALL_AFTER, *window, *after)
    elif after is None:
        rows = await conn.fetch(_LIST_ONE, *window, practitioner_id)
    else:
        rows = await conn.fetch(_LIST_ONE_AFTER, *window, practitioner_id, *after)
    return [models.BasicAppointment(*row) for row in rows]


async def is_granted(conn: Connection, partner_id: UUID, practitioner_id: UUID) -> bool:
    """True when the practitioner has an active grant to the partner."""
    return bool(await conn.fetchval(_IS_GRANTED, partner_id, practitioner_id))


async def get_appointment(conn: Connection, partner_id: UUID, appointment_id: UUID) -> models.BasicAppointment | None:
    """Return the appointment if it exists and is visible to the partner, else ``None``."""
    row = await conn.fetchrow(_GET, partner_id, appointment_id)
    return models.BasicAppointment(*row) if row else None
