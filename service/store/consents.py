"""Patients' consents (migration 0003): granted, revoked and listed by the internal ConsentService.

The partner path checks a consent in the statement that records its use
(:func:`service.store.ledger.disclose_contacts`).
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from service import models
from service.errors import FailedPrecondition, NotFound
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
