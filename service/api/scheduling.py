"""The internal SchedulingService: practitioners, patients and appointments, as the platform writes them.

It runs on the internal listener only, behind the internal token (checked by
the error boundary's guard before any handler runs). It uses internal
identifiers and takes contact details and visit reasons, which it seals before
they reach the store and never reads back.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from uuid import uuid4

import grpc.aio
from appointments.internal.v1 import scheduling_pb2
from appointments.internal.v1 import (
    scheduling_service_pb2 as scheduling_pb,
)
from appointments.internal.v1 import (
    scheduling_service_pb2_grpc as scheduling_grpc,
)
from appointments.type.v1 import contact_pb2

from service import models
from service.api import validation
from service.crypto import sealing
from service.errors import FieldViolation
from service.store import scheduling
from service.store.database import Database
from service.timestamps import set_timestamp

SERVICE_NAME = scheduling_pb.DESCRIPTOR.services_by_name["SchedulingService"].full_name
MAX_APPOINTMENT_LENGTH = timedelta(hours=24)
_STATUS = {
    models.AppointmentStatus.BOOKED: scheduling_pb2.APPOINTMENT_STATUS_BOOKED,
    models.AppointmentStatus.CANCELLED: scheduling_pb2.APPOINTMENT_STATUS_CANCELLED,
}


def practitioner_message(row: models.Practitioner) -> scheduling_pb2.Practitioner:
    """The internal message of a practitioner."""
    message = scheduling_pb2.Practitioner(
        practitioner_id=str(row.id), display_name=row.display_name, specialty=row.specialty
    )
    set_timestamp(message.create_time, row.create_time)
    return message


def patient_message(row: models.Patient) -> scheduling_pb2.Patient:
    """The internal message of a patient (contact details included, as the request gave them)."""
    message = scheduling_pb2.Patient(
        patient_id=str(row.id),
        given_name=row.given_name,
        family_name=row.family_name,
        sex=row.sex,  # type: ignore[arg-type]  # stored as the enum number
        phone=row.phone or "",
        email=row.email or "",
    )
    set_timestamp(message.create_time, row.create_time)
    return message


def appointment_message(row: models.Appointment, reason: str = "") -> scheduling_pb2.Appointment:
    """The internal message of an appointment.

    The visit reason is stored sealed and never opened on this path: only the
    answer to its creation echoes it (from the request).
    """
    message = scheduling_pb2.Appointment(
        appointment_id=str(row.id),
        practitioner_id=str(row.practitioner_id),
        patient_id=str(row.patient_id),
        reason=reason,
        status=_STATUS[row.status],
    )
    for field, value in (
        (message.start_time, row.start_time),
        (message.end_time, row.end_time),
        (message.create_time, row.create_time),
        (message.update_time, row.update_time),
    ):
        set_timestamp(field, value)
    return message


class SchedulingApi(scheduling_grpc.SchedulingServiceServicer):
    """Serves ``appointments.internal.v1.SchedulingService``.

    Contact details and the visit reason are sealed here, before they reach
    the store, under the active data key and bound to the row's id (generated
    here for that reason).
    """

    def __init__(self, database: Database, data_keys: sealing.DataKeyring) -> None:
        self._db = database
        self._data_keys = data_keys

    async def CreatePractitioner(
        self, request: scheduling_pb.CreatePractitionerRequest, context: grpc.aio.ServicerContext
    ) -> scheduling_pb2.Practitioner:
        problems: list[FieldViolation] = []
        name = validation.text(request.display_name, "display_name", problems, max_length=validation.NAME_LENGTH)
        specialty = validation.text(request.specialty, "specialty", problems, max_length=validation.NAME_LENGTH)
        validation.raise_if(problems)
        async with self._db.transaction() as conn:
            return practitioner_message(await scheduling.create_practitioner(conn, name, specialty))

    async def CreatePatient(
        self, request: scheduling_pb.CreatePatientRequest, context: grpc.aio.ServicerContext
    ) -> scheduling_pb2.Patient:
        problems: list[FieldViolation] = []
        given = validation.text(request.given_name, "given_name", problems, max_length=validation.NAME_LENGTH)
        family = validation.text(request.family_name, "family_name", problems, max_length=validation.NAME_LENGTH)
        phone = validation.phone(request.phone, "phone", problems)
        email = validation.email(request.email, "email", problems)
        if request.sex not in contact_pb2.Sex.values():
            problems.append(FieldViolation("sex", "unknown value"))
        validation.raise_if(problems)
        patient_id = uuid4()
        contact = sealing.seal_patient_contact(
            self._data_keys,
            patient_id,
            given_name=given,
            family_name=family,
            sex=request.sex,
            phone=phone,
            email=email,
        )
        async with self._db.transaction() as conn:
            create_time: datetime = await scheduling.create_patient(conn, patient_id=patient_id, contact=contact)
        return patient_message(models.Patient(patient_id, given, family, request.sex, phone, email, create_time))

    async def CreateAppointment(
        self, request: scheduling_pb.CreateAppointmentRequest, context: grpc.aio.ServicerContext
    ) -> scheduling_pb2.Appointment:
        problems: list[FieldViolation] = []
        practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems)
        patient = validation.parse_uuid(request.patient_id, "patient_id", problems)
        start = validation.timestamp(request, "start_time", problems)
        end = validation.timestamp(request, "end_time", problems)
        validation.window(start, end, problems, max_length=MAX_APPOINTMENT_LENGTH)
        reason = validation.text(request.reason, "reason", problems, max_length=2000, required=False)
        validation.raise_if(problems)
        assert practitioner and patient and start and end
        appointment_id = uuid4()
        sealed_reason = sealing.seal_reason(self._data_keys, appointment_id, reason)
        async with self._db.transaction() as conn:
            row = await scheduling.create_appointment(
                conn,
                appointment_id=appointment_id,
                practitioner_id=practitioner,
                patient_id=patient,
                start_time=start,
                end_time=end,
                sealed_reason=sealed_reason,
            )
        return appointment_message(row, reason)

    async def CancelAppointment(
        self, request: scheduling_pb.CancelAppointmentRequest, context: grpc.aio.ServicerContext
    ) -> scheduling_pb2.Appointment:
        appointment = validation.uuid_field(request.appointment_id, "appointment_id")
        async with self._db.transaction() as conn:
            return appointment_message(await scheduling.cancel_appointment(conn, appointment))
