"""The partner path's reads: only appointments of practitioners who granted the partner access.

Each read is one statement, a function of migration 0007 run as the partner
role: it refuses a revoked key or a suspended partner, binds the partner for
row-level security, and reads only the basic-view columns of appointments
whose practitioner granted the caller access. No contact column and no visit
reason is ever read on this path. The function's refusals arrive as
:class:`ReadRefused`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar
from uuid import UUID

import asyncpg

from service import models
from service.store.database import Connection
from service.timestamps import Micros, from_micros

T = TypeVar("T")


class Refusal(enum.Enum):
    """Why a partner-path function refused a read, by the SQLSTATE it raised."""

    #: The key is unknown, revoked, or another partner's.
    KEY_INVALID = "AG401"
    PARTNER_SUSPENDED = "AG403"
    #: The practitioner named is not granted to the partner.
    NOT_GRANTED = "AG404"


_REFUSALS = {refusal.value: refusal for refusal in Refusal}

# Times as exact integer microseconds since the epoch (EXTRACT gives numeric; PostgreSQL 14 and
# newer), which PostgreSQL hands over for almost nothing where asyncpg builds each datetime
# through a timedelta; the status as its label.
_MICROS = "(extract(epoch FROM {}) * 1000000)::int8".format
_COLUMNS = (
    f"id, patient_id, {_MICROS('start_time')}, {_MICROS('end_time')}, status::text, {_MICROS('update_time')}, "
    "practitioner_id, display_name, specialty"
)
#: The listing's statement (public so that a benchmark can EXPLAIN it as the partner role).
LIST_SQL = f"SELECT {_COLUMNS} FROM partner_list_appointments($1, $2, $3, $4, $5, $6, $7, $8)"
#: The appointment read's statement (public for the same reason).
GET_SQL = f"SELECT {_COLUMNS} FROM partner_get_appointment($1, $2, $3)"


class ReadRefused(Exception):
    """The database refused a partner read, for ``refusal``."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.name)
        self.refusal = refusal


async def _refusing(conn: Connection, statement: Callable[[], Awaitable[T]]) -> T:
    try:
        if conn.is_in_transaction():
            # The fallback without a partner login runs the whole call in one
            # transaction: a refusal must not abort it (a denial is recorded next).
            async with conn.transaction():
                return await statement()
        return await statement()
    except asyncpg.PostgresError as exc:
        refusal = _REFUSALS.get(str(getattr(exc, "sqlstate", "")))
        if refusal is None:
            raise
        raise ReadRefused(refusal) from None


async def list_appointments(
    conn: Connection,
    *,
    key_id: str,
    partner_id: UUID,
    practitioner_id: UUID | None,
    start_time: datetime,
    end_time: datetime,
    after: tuple[Micros, UUID] | None,
    limit: int,
) -> list[models.BasicAppointment]:
    """Return up to ``limit`` visible appointments starting in ``[start_time, end_time)``.

    Ordered by ``(start_time, id)`` and strictly after the ``after`` cursor.
    Raises :class:`ReadRefused` (``NOT_GRANTED`` when ``practitioner_id`` is not granted).
    """
    after_time, after_id = (from_micros(after[0]), after[1]) if after is not None else (None, None)
    values = (key_id, partner_id, practitioner_id, start_time, end_time, after_time, after_id, limit)
    rows = await _refusing(conn, lambda: conn.fetch(LIST_SQL, *values))
    return [models.BasicAppointment(*row) for row in rows]


async def get_appointment(
    conn: Connection, *, key_id: str, partner_id: UUID, appointment_id: UUID
) -> models.BasicAppointment | None:
    """Return the appointment if it exists and is visible to the partner, else ``None``. Raises :class:`ReadRefused`."""
    row = await _refusing(conn, lambda: conn.fetchrow(GET_SQL, key_id, partner_id, appointment_id))
    return models.BasicAppointment(*row) if row else None
