"""Everything the partner path runs: the functions of migrations 0007 and 0008, as the ``apptgate_partner`` role.

Each statement calls one function that takes the caller's key id and
credential (:attr:`service.models.Principal.credential`), verifies both, and
derives the partner from the key: nothing the caller states about itself is trusted, and the role
holds no privilege on any table. The reads return only the basic-view columns
of appointments whose practitioner granted the partner access, never a
contact column or the visit reason. The functions' refusals arrive as
:class:`ReadRefused`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from service import models
from service.store.database import Connection
from service.timestamps import Micros, from_micros, to_micros

T = TypeVar("T")


class Refusal(enum.Enum):
    """Why a partner-path function refused, by the SQLSTATE it raised."""

    #: The key is unknown, revoked, or presented with the wrong secret.
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
_AUTHENTICATE = (
    "SELECT partner_id, requests_per_second, burst, contact_daily_cap, patient_daily_cap, suspend_time "
    "FROM partner_authenticate($1, $2)"
)
_WATCH = (
    "SELECT partner_id, requests_per_second, burst, contact_daily_cap, patient_daily_cap, suspend_time, granted, "
    "head, pruned_through FROM partner_watch($1, $2)"
)
# A standby's feed head, read the way a stream's opening reads the primary's (no row for a key the
# standby does not know live).
_REPLAYED_HEAD = "SELECT head FROM partner_watch($1, $2)"
_CHANGES = (
    "SELECT position, change_type, id, patient_id, start_time, end_time, status::text, update_time, "
    "practitioner_id, display_name, specialty FROM partner_changes($1, $2, $3, $4, $5, $6::uuid[])"
)
_REQUEST_COLUMNS = (
    "id, appointment_id, patient_id, fields, sealed_purpose, state::text, create_time, expire_time, decide_time, "
    "granted_fields, consent_id, consent_purpose, consent_create_time, consent_expire_time, consent_revoke_time"
)
_CONSENT_REQUEST = f"SELECT {_REQUEST_COLUMNS} FROM partner_consent_request($1, $2, $3)"
_CANCEL_CONSENT_REQUEST = "SELECT partner_cancel_consent_request($1, $2, $3)"
_CONSENT_REQUEST_HEAD = "SELECT partner_consent_request_head($1, $2)"
_CONSENT_REQUEST_EVENTS = (
    "SELECT event_position, event_state::text, "
    + ", ".join(f"(request).{column.strip()}" for column in _REQUEST_COLUMNS.split(","))
    + " FROM partner_consent_request_events($1, $2, $3, $4)"
)
_REFUSE = "SELECT partner_record_refusal($1, $2, $3, $4, $5::smallint, $6, $7::text[], $8::uuid[], $9::uuid[], $10)"


class ReadRefused(Exception):
    """The database refused a partner statement, for ``refusal``."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.name)
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class Opening:
    """What a stream opens with: the partner and its limits, its grants, and the feed's head and retention mark."""

    partner_id: UUID
    overrides: models.PartnerOverrides
    granted: frozenset[UUID]
    head: int
    pruned_through: int


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


def _overrides(row: asyncpg.Record) -> models.PartnerOverrides:
    return models.PartnerOverrides(row[1], row[2], row[3], row[4], row[5])


async def authenticate(conn: Connection, key_id: str, credential: bytes) -> tuple[UUID, models.PartnerOverrides] | None:
    """The key's partner and the limits the database holds for it; ``None`` when the key does not verify."""
    row = await conn.fetchrow(_AUTHENTICATE, key_id, credential)
    return (row[0], _overrides(row)) if row is not None else None


async def list_appointments(
    conn: Connection,
    caller: models.Principal,
    *,
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
    values = (
        caller.key_id,
        caller.credential,
        practitioner_id,
        start_time,
        end_time,
        after_time,
        after_id,
        limit,
    )
    rows = await _refusing(conn, lambda: conn.fetch(LIST_SQL, *values))
    return [models.BasicAppointment(*row) for row in rows]


async def get_appointment(
    conn: Connection, caller: models.Principal, appointment_id: UUID
) -> models.BasicAppointment | None:
    """Return the appointment if it exists and is visible to the partner, else ``None``. Raises :class:`ReadRefused`."""
    row = await _refusing(conn, lambda: conn.fetchrow(GET_SQL, caller.key_id, caller.credential, appointment_id))
    return models.BasicAppointment(*row) if row else None


#: Many calls' appointment reads in one statement: row ``n`` answers the ``n``-th request.
_GET_MANY = (
    f"SELECT r.n, {_COLUMNS} FROM unnest($1::text[], $2::bytea[], $3::uuid[]) WITH ORDINALITY AS r(k, c, i, n) "
    "CROSS JOIN LATERAL partner_get_appointment(r.k, r.c, r.i)"
)


async def get_appointments(
    conn: Connection, requests: Sequence[tuple[models.Principal, UUID]]
) -> list[models.BasicAppointment | None]:
    """:func:`get_appointment` for many callers in one statement; one answer per request, in order.

    Raises :class:`ReadRefused` when any caller's key or partner is refused, and then answers none.
    """
    rows = await _refusing(
        conn,
        lambda: conn.fetch(
            _GET_MANY,
            [caller.key_id for caller, _ in requests],
            [caller.credential for caller, _ in requests],
            [appointment_id for _, appointment_id in requests],
        ),
    )
    found: list[models.BasicAppointment | None] = [None] * len(requests)
    for row in rows:
        found[row[0] - 1] = models.BasicAppointment(*row[1:])
    return found


async def record_refusal(
    conn: Connection,
    caller: models.Principal,
    entry: models.LedgerEntry,
    items: Sequence[tuple[str, UUID | None, UUID | None]],
) -> None:
    """Record a refused attempt of the key's partner (``entry.denial_reason`` says why), with its items."""
    if not entry.denial_reason or not items:
        raise ValueError("a refusal has a reason and at least one item")
    await _refusing(
        conn,
        lambda: conn.execute(
            _REFUSE,
            caller.key_id,
            caller.credential,
            entry.rpc,
            entry.trace_id,
            entry.view,
            entry.denial_reason,
            [i[0] for i in items],
            [i[1] for i in items],
            [i[2] for i in items],
            entry.consent_id,
        ),
    )


async def open_stream(conn: Connection, key_id: str, credential: bytes) -> Opening | None:
    """What a stream opens with, read in one statement; ``None`` when the key does not verify."""
    row = await conn.fetchrow(_WATCH, key_id, credential)
    if row is None:
        return None
    return Opening(row[0], _overrides(row), frozenset(row[6]), int(row[7]), int(row[8]))


def _change(row: asyncpg.Record) -> models.FeedChange:
    appointment = models.BasicAppointment(
        row[2], row[3], to_micros(row[4]), to_micros(row[5]), row[6], to_micros(row[7]), row[8], row[9], row[10]
    )
    return models.FeedChange(row[0], row[1], appointment)


async def changes(
    conn: Connection, caller: models.Principal, *, after: int, upto: int, limit: int, practitioners: Sequence[UUID]
) -> list[models.FeedChange]:
    """The changes in ``(after, upto]`` of ``practitioners``, in commit order, made while the partner held a grant.

    Raises :class:`ReadRefused`.
    """
    rows = await _refusing(
        conn,
        lambda: conn.fetch(_CHANGES, caller.key_id, caller.credential, after, upto, limit, list(practitioners)),
    )
    return [_change(row) for row in rows]


async def replayed_changes(
    conn: Connection, caller: models.Principal, *, after: int, upto: int, limit: int, practitioners: Sequence[UUID]
) -> list[models.FeedChange] | None:
    """What :func:`changes` reads, on a streaming replica that has replayed the feed up to ``upto``.

    ``None``, read nothing, when it has not (or does not know the key live):
    the feed's positions are gapless and in commit order (migration 0006), so
    a copy whose head is at ``upto`` or beyond holds every change in
    ``(after, upto]``, and a replica only moves forward, so the read after the
    check sees at least as much. Raises :class:`ReadRefused`.
    """
    head = await conn.fetchval(_REPLAYED_HEAD, caller.key_id, caller.credential)
    if head is None or head < upto:
        return None
    return await changes(conn, caller, after=after, upto=upto, limit=limit, practitioners=practitioners)


def _consent_request(row: Sequence[Any]) -> models.PartnerConsentRequest:
    consent = models.RequestConsent(*row[10:15]) if row[10] is not None else None
    return models.PartnerConsentRequest(
        row[0],
        row[1],
        row[2],
        tuple(row[3]),
        row[4],
        models.ConsentRequestState(row[5]),
        row[6],
        row[7],
        row[8],
        tuple(row[9] or ()),
        consent,
    )


async def consent_request(
    conn: Connection, caller: models.Principal, request_id: UUID
) -> models.PartnerConsentRequest | None:
    """One of the partner's consent requests, or ``None`` (another partner's, or none). Raises :class:`ReadRefused`."""
    row = await _refusing(conn, lambda: conn.fetchrow(_CONSENT_REQUEST, caller.key_id, caller.credential, request_id))
    return _consent_request(row) if row is not None else None


class Cancellation(enum.StrEnum):
    """What cancelling a consent request did (``partner_cancel_consent_request``)."""

    CANCELLED = "cancelled"
    NOT_PENDING = "not_pending"
    NOT_FOUND = "not_found"


async def cancel_consent_request(conn: Connection, caller: models.Principal, request_id: UUID) -> Cancellation:
    """Cancel one of the partner's pending consent requests. Raises :class:`ReadRefused`."""
    outcome = await _refusing(
        conn, lambda: conn.fetchval(_CANCEL_CONSENT_REQUEST, caller.key_id, caller.credential, request_id)
    )
    return Cancellation(outcome)


async def consent_request_head(conn: Connection, caller: models.Principal) -> int:
    """The position of the partner's last consent-request event (0 for none). Raises :class:`ReadRefused`."""
    return int(await _refusing(conn, lambda: conn.fetchval(_CONSENT_REQUEST_HEAD, caller.key_id, caller.credential)))


async def consent_request_events(
    conn: Connection, caller: models.Principal, *, after: int, limit: int
) -> list[tuple[int, models.ConsentRequestState, models.PartnerConsentRequest]]:
    """The partner's consent-request events after ``after``, in commit order: position, state left, request.

    Raises :class:`ReadRefused`.
    """
    rows = await _refusing(
        conn, lambda: conn.fetch(_CONSENT_REQUEST_EVENTS, caller.key_id, caller.credential, after, limit)
    )
    return [(row[0], models.ConsentRequestState(row[1]), _consent_request(tuple(row)[2:])) for row in rows]
