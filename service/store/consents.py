"""Consents, and the consent-gated reads of contact details."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from service import models
from service.errors import FailedPrecondition, NotFound
from service.store import ledger, usage
from service.store.database import Connection

_COLUMNS = "id, patient_id, partner_id, fields, purpose, signing_key_id, create_time, expire_time, revoke_time"


def _consent(row: asyncpg.Record) -> models.Consent:
    values = list(row)
    values[3] = tuple(values[3])
    return models.Consent(*values)


async def insert(conn: Connection, consent: models.Consent) -> None:
    """Store a consent. Raises :class:`NotFound` for an unknown patient or partner."""
    try:
        await conn.execute(
            f"INSERT INTO consents ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            consent.id,
            consent.patient_id,
            consent.partner_id,
            list(consent.fields),
            consent.purpose,
            consent.signing_key_id,
            consent.create_time,
            consent.expire_time,
            consent.revoke_time,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        what = "patient" if exc.constraint_name == "consents_patient_id_fkey" else "partner"
        raise NotFound(f"{what} not found") from exc


async def revoke(conn: Connection, consent_id: UUID) -> models.Consent:
    """Revoke a consent. Raises :class:`NotFound`, or :class:`FailedPrecondition` when already revoked."""
    row = await conn.fetchrow(
        f"UPDATE consents SET revoke_time = now() WHERE id = $1 AND revoke_time IS NULL RETURNING {_COLUMNS}",
        consent_id,
    )
    if row is not None:
        return _consent(row)
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM consents WHERE id = $1)", consent_id):
        raise FailedPrecondition(
            "the consent is already revoked", reason="CONSENT_ALREADY_REVOKED", metadata={"consent_id": str(consent_id)}
        )
    raise NotFound("consent not found", metadata={"consent_id": str(consent_id)})


async def list_for_patient(conn: Connection, patient_id: UUID) -> list[models.Consent]:
    """A patient's consents, newest first. Raises :class:`NotFound` for an unknown patient."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM patients WHERE id = $1)", patient_id):
        raise NotFound("patient not found", metadata={"patient_id": str(patient_id)})
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM consents WHERE patient_id = $1 ORDER BY create_time DESC, id", patient_id
    )
    return [_consent(row) for row in rows]


async def read_consented_contact(
    conn: Connection, consent_id: UUID, partner_id: UUID, patient_id: UUID
) -> models.StoredConsentedContact:
    """Check the consent is live for this partner and patient, and read only the fields it covers, as stored.

    One statement: the revocation check and the read are the same primary-key
    lookup, in a function the partner role may call but whose tables it cannot
    read. The values come back sealed; the caller opens them
    (:func:`service.sealing.open_consented_contact`). A value an older version
    left in clear (not yet backfilled) comes back as text and wins over a seal.
    """
    row = await conn.fetchrow("SELECT * FROM read_consented_contact($1, $2, $3)", consent_id, partner_id, patient_id)
    return _stored_contact(row)


def _stored_contact(row: asyncpg.Record | None) -> models.StoredConsentedContact:
    if row is None:  # the patient row vanished: treat like an unknown consent
        return models.StoredConsentedContact("unknown", (), None, None, None, None, None)

    def stored(column: str) -> bytes | str | None:
        clear: str | None = row[column]
        sealed: bytes | None = row[f"sealed_{column}"]
        return clear if clear is not None else sealed

    return models.StoredConsentedContact(
        row["state"],
        tuple(row["fields"]),
        stored("given_name"),
        stored("family_name"),
        row["sex"],
        stored("phone"),
        stored("email"),
    )


@dataclass(frozen=True, slots=True)
class ContactRequest:
    """One call's contact disclosure: its entry (``entry.consent_id`` names the consent) and what it asks for."""

    entry: ledger.Entry
    requested_id: str
    appointment_id: UUID
    patient_id: UUID
    token_fields: Sequence[int]


# Every array travels as an array literal (ledger.run_group_statement).
_DISCLOSE_MANY = (
    "SELECT * FROM disclose_consented_contacts($1::text::uuid[], $2::text::text[], $3::text::text[], "
    "$4::text::text[], $5::text::text[], $6::text::uuid[], $7::text::uuid[], $8::text::uuid[], $9::text::text[], "
    "$10::text::uuid[], $11::text::int[], $12::text::int[], $13::text::float8[], $14::text::bigint[], "
    "$15::text::bool[])"
)


async def disclose_many(
    conn: Connection, requests: Sequence[ContactRequest], terms: dict[UUID, usage.ChargeTerms]
) -> list[models.StoredConsentedContact]:
    """Check the consents, count and record the disclosures, and read the released fields of many calls: one statement.

    One answer per request, in order (migration 0019). The released fields are
    those both the token and the stored consent name (``fields`` of the
    answer). An answer's ``state`` is its consent's state when that is not
    live (nothing was counted or recorded for it: the caller records the
    refusal), else its partner's charge outcome: ``ok`` or ``flagged``
    (recorded, values returned sealed) or ``suspended`` (nothing recorded, no
    value). Each partner in ``terms`` is charged once for all its live
    requests. Raises :class:`ledger.CapReached` when a partner goes over a
    daily cap, and then nothing at all is counted or recorded.
    """
    for request in requests:
        if request.entry.view != ledger.VIEW_CONTACT or request.entry.consent_id is None:
            raise ValueError("disclose_many records contact views under a consent only")
    columns: tuple[Sequence[object], ...] = (
        [r.entry.partner_id for r in requests],
        [r.entry.key_id for r in requests],
        [r.entry.rpc for r in requests],
        [r.entry.trace_id for r in requests],
        [r.requested_id for r in requests],
        [r.appointment_id for r in requests],
        [r.patient_id for r in requests],
        [r.entry.consent_id for r in requests],
        [ledger.array_literal(r.token_fields) for r in requests],
        *usage.charge_columns(terms),
    )
    return [_stored_contact(row) for row in await ledger.run_group_statement(conn, _DISCLOSE_MANY, columns)]
