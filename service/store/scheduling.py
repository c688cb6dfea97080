"""Writes and reads of practitioners, patients and appointments (the internal path)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from service import models
from service.errors import FailedPrecondition, NotFound
from service.store.database import Connection

_PRACTITIONER_COLUMNS = "id, display_name, specialty, create_time"
_PATIENT_COLUMNS = "id, given_name, family_name, sex, phone, email, create_time"
_APPOINTMENT_COLUMNS = "id, practitioner_id, patient_id, start_time, end_time, reason, status, create_time, update_time"


async def create_practitioner(conn: Connection, display_name: str, specialty: str) -> models.Practitioner:
    """Insert a practitioner."""
    row = await conn.fetchrow(
        f"INSERT INTO practitioners (display_name, specialty) VALUES ($1, $2) RETURNING {_PRACTITIONER_COLUMNS}",
        display_name,
        specialty,
    )
    return models.Practitioner(*row)


async def create_patient(
    conn: Connection,
    *,
    given_name: str,
    family_name: str,
    sex: int,
    phone: str | None,
    email: str | None,
) -> models.Patient:
    """Insert a patient."""
    row = await conn.fetchrow(
        "INSERT INTO patients (given_name, family_name, sex, phone, email) VALUES ($1, $2, $3, $4, $5) "
        f"RETURNING {_PATIENT_COLUMNS}",
        given_name,
        family_name,
        sex,
        phone,
        email,
    )
    return models.Patient(*row)


async def create_appointment(
    conn: Connection,
    *,
    practitioner_id: UUID,
    patient_id: UUID,
    start_time: datetime,
    end_time: datetime,
    reason: str,
) -> models.Appointment:
    """Book an appointment. Raises :class:`NotFound` for an unknown practitioner or patient."""
    try:
        row = await conn.fetchrow(
            "INSERT INTO appointments (practitioner_id, patient_id, start_time, end_time, reason) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {_APPOINTMENT_COLUMNS}",
            practitioner_id,
            patient_id,
            start_time,
            end_time,
            reason,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        if exc.constraint_name == "appointments_practitioner_id_fkey":
            raise NotFound("practitioner not found", metadata={"practitioner_id": str(practitioner_id)}) from exc
        raise NotFound("patient not found", metadata={"patient_id": str(patient_id)}) from exc
    return models.Appointment(*row)


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
    if row["status"] == "cancelled":
        raise FailedPrecondition(
            "the appointment is already cancelled",
            reason="APPOINTMENT_ALREADY_CANCELLED",
            metadata={"appointment_id": str(appointment_id)},
        )
    row = await conn.fetchrow(
        "UPDATE appointments SET status = 'cancelled', update_time = now() WHERE id = $1 "
        f"RETURNING {_APPOINTMENT_COLUMNS}",
        appointment_id,
    )
    return models.Appointment(*row)


async def first_appointment(conn: Connection, practitioner_id: UUID) -> models.Appointment | None:
    """The earliest appointment of a practitioner, if any."""
    row = await conn.fetchrow(
        f"SELECT {_APPOINTMENT_COLUMNS} FROM appointments WHERE practitioner_id = $1 ORDER BY start_time, id LIMIT 1",
        practitioner_id,
    )
    return models.Appointment(*row) if row else None
