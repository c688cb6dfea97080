"""Consent requests (migration 0008), on the gateway's own connection: made, decided, listed, expired.

A request is made after the partner path has read its appointment (which
verified the key and the grant): :func:`request_access` runs
``request_contact_access``, which applies the caps and writes the request and
its ledger record in one statement. The patient app's decisions lock the
request (:func:`for_decision`), then write the consent and the approval's
ledger record, or the denial, in the same transaction. Every change of state
appends an event by trigger (the stream of :mod:`service.feed.consent_requests`).
The partner's own reads and its cancellation are in :mod:`service.store.partner_path`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from service import models
from service.errors import NotFound
from service.store.database import Connection

_PATIENT_COLUMNS = (
    "r.id, r.partner_id, p.display_name, r.key_id, r.appointment_id, a.start_time, pr.display_name, pr.specialty, "
    "r.patient_id, r.fields, r.sealed_purpose, r.sealed_message, r.ttl, "
    "CASE WHEN r.state = 'pending' AND r.expire_time <= statement_timestamp() THEN 'expired' "
    "ELSE r.state::text END, r.create_time, r.expire_time, "
    "CASE WHEN r.state = 'pending' AND r.expire_time <= statement_timestamp() THEN r.expire_time "
    "ELSE r.decide_time END, r.granted_fields, r.consent_id"
)
_PATIENT_FROM = (
    "FROM consent_requests r JOIN partners p ON p.id = r.partner_id JOIN appointments a ON a.id = r.appointment_id "
    "JOIN practitioners pr ON pr.id = a.practitioner_id"
)
# The state as the patient sees it (a pending request past its time has lapsed).
_SHOWN_STATE = (
    "(CASE WHEN r.state = 'pending' AND r.expire_time <= statement_timestamp() THEN 'expired' ELSE r.state::text END)"
)


class RequestOutcome(enum.StrEnum):
    """What ``request_contact_access`` answered."""

    CREATED = "created"
    #: A request of the same partner, patient and fields is pending.
    DUPLICATE = "duplicate"
    DAILY_CAP = "daily_cap"
    PATIENT_CAP = "patient_cap"


@dataclass(frozen=True, slots=True)
class RequestResult:
    """The outcome of a request, the request it made or duplicates, and when a cap frees up."""

    outcome: RequestOutcome
    request_id: UUID | None
    retry_time: datetime | None


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request to make: who asks, for what, and its ledger record's call details."""

    id: UUID
    partner_id: UUID
    key_id: str
    appointment_id: UUID
    patient_id: UUID
    #: The appointment id as the partner named it (the ledger record's item).
    requested_id: str
    fields: tuple[int, ...]
    sealed_purpose: bytes
    sealed_message: bytes | None
    ttl: timedelta
    rpc: str
    trace_id: str
    client_cert: str


@dataclass(frozen=True, slots=True)
class Caps:
    """The limits a request is checked against: the gateway's settings, passed by its own role only."""

    lapse: timedelta
    daily: int
    per_patient: int
    patient_window: timedelta


async def request_access(conn: Connection, new: NewRequest, caps: Caps) -> RequestResult:
    """Make a request, or refuse it (a duplicate, a cap), with its ledger record either way."""
    row = await conn.fetchrow(
        "SELECT outcome, request_id, retry_time FROM request_contact_access("
        "$1, $2, $3, $4, $5, $6, $7::smallint[], $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        new.id,
        new.partner_id,
        new.key_id,
        new.appointment_id,
        new.patient_id,
        new.requested_id,
        list(new.fields),
        new.sealed_purpose,
        new.sealed_message,
        new.ttl,
        caps.lapse,
        caps.daily,
        caps.per_patient,
        caps.patient_window,
        new.rpc,
        new.trace_id,
        new.client_cert,
    )
    assert row is not None
    return RequestResult(RequestOutcome(row["outcome"]), row["request_id"], row["retry_time"])


def _patient_request(row: Sequence[Any]) -> models.PatientConsentRequest:
    values = list(row)
    values[9] = tuple(values[9])
    values[13] = models.ConsentRequestState(values[13])
    values[17] = tuple(values[17] or ())
    return models.PatientConsentRequest(*values)


async def get(conn: Connection, request_id: UUID) -> models.PatientConsentRequest:
    """One request as the patient app shows it. Raises :class:`NotFound`."""
    row = await conn.fetchrow(f"SELECT {_PATIENT_COLUMNS} {_PATIENT_FROM} WHERE r.id = $1", request_id)
    if row is None:
        raise NotFound("consent request not found", metadata={"consent_request_id": str(request_id)})
    return _patient_request(row)


async def for_patient(
    conn: Connection,
    patient_id: UUID,
    states: Sequence[models.ConsentRequestState],
    *,
    before: tuple[datetime, UUID] | None,
    limit: int,
) -> list[models.PatientConsentRequest]:
    """A patient's requests, newest first, strictly before the cursor; only ``states`` unless empty.

    Raises :class:`NotFound` for an unknown patient.
    """
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM patients WHERE id = $1)", patient_id):
        raise NotFound("patient not found", metadata={"patient_id": str(patient_id)})
    wanted = [state.value for state in states] or None
    before_time, before_id = before if before is not None else (None, None)
    rows = await conn.fetch(
        f"SELECT {_PATIENT_COLUMNS} {_PATIENT_FROM} WHERE r.patient_id = $1 "
        f"AND ($2::text[] IS NULL OR {_SHOWN_STATE} = ANY ($2::text[])) "
        "AND ($3::timestamptz IS NULL OR (r.create_time, r.id) < ($3, $4::uuid)) "
        "ORDER BY r.create_time DESC, r.id DESC LIMIT $5",
        patient_id,
        wanted,
        before_time,
        before_id,
        limit,
    )
    return [_patient_request(row) for row in rows]


async def for_decision(conn: Connection, request_id: UUID) -> models.PatientConsentRequest:
    """Lock a request for the patient's decision (expiring it first when it has lapsed). Raises :class:`NotFound`."""
    state = await conn.fetchval("SELECT state::text FROM consent_requests WHERE id = $1 FOR UPDATE", request_id)
    if state is None:
        raise NotFound("consent request not found", metadata={"consent_request_id": str(request_id)})
    await conn.execute(
        "UPDATE consent_requests SET state = 'expired', decide_time = expire_time "
        "WHERE id = $1 AND state = 'pending' AND expire_time <= statement_timestamp()",
        request_id,
    )
    return await get(conn, request_id)


async def approve(
    conn: Connection,
    request: models.PatientConsentRequest,
    consent: models.Consent,
    *,
    requested_id: str,
    rpc: str,
    trace_id: str,
) -> None:
    """Mark a locked pending request approved with its consent (already inserted), and write the ledger record."""
    await conn.execute(
        "UPDATE consent_requests SET state = 'approved', decide_time = $2, granted_fields = $3::smallint[], "
        "consent_id = $4 WHERE id = $1",
        request.id,
        consent.create_time,
        list(consent.fields),
        consent.id,
    )
    await conn.execute(
        "INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, trace_id, outcome, "
        "requested_ids, appointment_ids, patient_ids) VALUES ($1, $2, 2, $3::smallint[], $4, $5, $6, $7, "
        "ARRAY[$8::text], ARRAY[$9::uuid], ARRAY[$10::uuid])",
        request.partner_id,
        request.key_id,
        list(consent.fields),
        consent.id,
        rpc,
        trace_id,
        models.Outcome.CONSENT_GRANTED,
        requested_id,
        request.appointment_id,
        request.patient_id,
    )


async def deny(conn: Connection, request_id: UUID) -> None:
    """Mark a locked pending request denied."""
    await conn.execute(
        "UPDATE consent_requests SET state = 'denied', decide_time = statement_timestamp() WHERE id = $1", request_id
    )


async def seconds_to_next_lapse(conn: Connection) -> float | None:
    """Seconds until the next pending request lapses, by the database's clock (``None`` when none is pending)."""
    value = await conn.fetchval(
        "SELECT extract(epoch FROM min(expire_time) - statement_timestamp()) FROM consent_requests "
        "WHERE state = 'pending'"
    )
    return None if value is None else float(value)


async def expire_lapsed(conn: Connection, *, limit: int) -> int:
    """Expire up to ``limit`` pending requests past their time; return how many.

    Rows another process is expiring are skipped (``SKIP LOCKED``), so each
    lapses once, with one event.
    """
    result = await conn.execute(
        "UPDATE consent_requests SET state = 'expired', decide_time = expire_time WHERE id IN ("
        "SELECT id FROM consent_requests WHERE state = 'pending' AND expire_time <= statement_timestamp() "
        "ORDER BY expire_time LIMIT $1 FOR UPDATE SKIP LOCKED)",
        limit,
    )
    return int(result.rsplit(" ", 1)[1])
