"""Consents, and the consent-gated reads of contact details."""

from __future__ import annotations

from collections.abc import Sequence
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


_DISCLOSE = (
    "SELECT * FROM disclose_consented_contact($1, $2, $3, $4, $5, $6, $7, $8, $9::smallint[], $10, $11, $12, $13, $14)"
)


async def disclose_consented_contact(
    conn: Connection,
    entry: ledger.Entry,
    requested_id: str,
    appointment_id: UUID,
    patient_id: UUID,
    token_fields: Sequence[int],
    terms: usage.ChargeTerms,
) -> models.StoredConsentedContact:
    """Check the consent, count and record the disclosure, and read the released fields: one statement.

    ``entry.consent_id`` names the consent. The released fields are those both
    the token and the stored consent name (``fields`` of the answer). The
    answer's ``state`` is the consent's state when it is not live (nothing was
    counted or recorded: the caller records the refusal), else the charge's
    outcome: ``ok`` or ``flagged`` (recorded, values returned sealed),
    ``suspended`` (nothing recorded, no value), or a cap (``contact_cap``,
    ``patient_cap``: nothing counted or recorded).
    """
    try:
        row = await conn.fetchrow(
            _DISCLOSE,
            entry.partner_id,
            entry.key_id,
            entry.rpc,
            entry.trace_id,
            requested_id,
            appointment_id,
            patient_id,
            entry.consent_id,
            list(token_fields),
            terms.contact_cap,
            terms.patient_cap,
            terms.anomaly_factor,
            terms.anomaly_min,
            terms.suspend_on_anomaly,
        )
    except asyncpg.PostgresError as exc:
        cap = usage.cap_reached(exc)
        if cap is None:
            raise
        return models.StoredConsentedContact(cap, (), None, None, None, None, None)
    return _stored_contact(row)
