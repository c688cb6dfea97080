"""Writes and reads of practitioners, patients and appointments (the internal path).

Contact details and the visit reason arrive already sealed (:mod:`service.crypto.sealing`,
by the API layer): this module stores bytes and never reads them back.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from service import models
from service.errors import FailedPrecondition, NotFound
from service.store.database import Connection

_PRACTITIONER_COLUMNS = "id, display_name, specialty, create_time"
_APPOINTMENT_COLUMNS = "id, practitioner_id, patient_id, start_time, end_time, status::text, create_time, update_time"


def _appointment(row: asyncpg.Record) -> models.Appointment:
    return models.Appointment(row[0], row[1], row[2], row[3], row[4], models.AppointmentStatus(row[5]), row[6], row[7])


async def create_practitioner(conn: Connection, display_name: str, specialty: str) -> models.Practitioner:
    """Insert a practitioner."""
    row = await conn.fetchrow(
        f"INSERT INTO practitioners (display_name, specialty) VALUES ($1, $2) RETURNING {_PRACTITIONER_COLUMNS}",
        display_name,
        specialty,
    )
    return models.Practitioner(*row)


async def create_patient(conn: Connection, *, patient_id: UUID, contact: models.SealedPatientContact) -> datetime:
    """Insert a patient whose contact details are already sealed for ``patient_id``; return its create time.

    The clear-text contact columns, an import's, stay NULL: the sex too is stored sealed only.
    """
    create_time: datetime = await conn.fetchval(
        "INSERT INTO patients (id, sealed_given_name, sealed_family_name, sealed_sex, sealed_phone, sealed_email) "
        "VALUES ($1, $2, $3, $4, $5, $6) RETURNING create_time",
        patient_id,
        contact.given_name,
        contact.family_name,
        contact.sex,
        contact.phone,
        contact.email,
    )
    return create_time


async def create_appointment(
    conn: Connection,
    *,
    appointment_id: UUID,
    practitioner_id: UUID,
    patient_id: UUID,
    start_time: datetime,
    end_time: datetime,
    sealed_reason: bytes,
) -> models.Appointment:
    """Book an appointment whose visit reason is already sealed for ``appointment_id``.

    Raises :class:`NotFound` for an unknown practitioner or patient.
    """
    try:
        row = await conn.fetchrow(
            "INSERT INTO appointments (id, practitioner_id, patient_id, start_time, end_time, sealed_reason) "
            f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_APPOINTMENT_COLUMNS}",
            appointment_id,
            practitioner_id,
            patient_id,
            start_time,
            end_time,
            sealed_reason,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        if exc.constraint_name == "appointments_practitioner_id_fkey":
            raise NotFound("practitioner not found", metadata={"practitioner_id": str(practitioner_id)}) from exc
        raise NotFound("patient not found", metadata={"patient_id": str(patient_id)}) from exc
    return _appointment(row)


async def cancel_appointment(conn: Connection, appointment_id: UUID) -> models.Appointment:
    """Cancel a booked appointment.

    Raises :class:`NotFound` for an unknown one and :class:`FailedPrecondition`
    for one already cancelled.
    """
    row = await conn.fetchrow(
        f"SELECT {_APPOINTMENT_COLUMNS} FROM appointments WHERE id = $1 FOR UPDATE", appointment_id
    )
    if row is None:
        raise NotFound("appointment not found", metadata={"appointment_id": str(appointment_id)})
    if row["status"] == models.AppointmentStatus.CANCELLED:
        raise FailedPrecondition(
            "the appointment is already cancelled",
            reason="APPOINTMENT_ALREADY_CANCELLED",
            metadata={"appointment_id": str(appointment_id)},
        )
    row = await conn.fetchrow(
        f"UPDATE appointments SET status = $2, update_time = now() WHERE id = $1 RETURNING {_APPOINTMENT_COLUMNS}",
        appointment_id,
        models.AppointmentStatus.CANCELLED,
    )
    return _appointment(row)


async def first_appointment(conn: Connection, practitioner_id: UUID) -> models.Appointment | None:
    """The earliest appointment of a practitioner, if any."""
    row = await conn.fetchrow(
        f"SELECT {_APPOINTMENT_COLUMNS} FROM appointments WHERE practitioner_id = $1 ORDER BY start_time, id LIMIT 1",
        practitioner_id,
    )
    return _appointment(row) if row else None
