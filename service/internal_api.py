"""The internal servicers: scheduling writes and the partner registry.

These run on the internal listener only, behind the internal token (checked by
the error boundary's guard before any handler runs). They use internal
identifiers and may carry contact details, which partners never reach.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from uuid import UUID, uuid4

import grpc.aio
from appointments.internal.v1 import (
    partner_registry_pb2,
    scheduling_pb2,
)
from appointments.internal.v1 import (
    partner_registry_service_pb2 as registry_pb,
)
from appointments.internal.v1 import (
    partner_registry_service_pb2_grpc as registry_grpc,
)
from appointments.internal.v1 import (
    scheduling_service_pb2 as scheduling_pb,
)
from appointments.internal.v1 import (
    scheduling_service_pb2_grpc as scheduling_grpc,
)
from appointments.type.v1 import contact_pb2

from service import auth, models, sealing, validation
from service.errors import FieldViolation, InvalidArgument
from service.extraction import ExtractionGuard
from service.store import partners, scheduling, usage
from service.store.database import Database
from service.timestamps import set_timestamp

SCHEDULING_SERVICE = scheduling_pb.DESCRIPTOR.services_by_name["SchedulingService"].full_name
REGISTRY_SERVICE = registry_pb.DESCRIPTOR.services_by_name["PartnerRegistryService"].full_name
MAX_APPOINTMENT_LENGTH = timedelta(hours=24)
_NAME_LENGTH = 200
_STATUS = {
    "booked": scheduling_pb2.APPOINTMENT_STATUS_BOOKED,
    "cancelled": scheduling_pb2.APPOINTMENT_STATUS_CANCELLED,
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
        name = validation.text(request.display_name, "display_name", problems, max_length=_NAME_LENGTH)
        specialty = validation.text(request.specialty, "specialty", problems, max_length=_NAME_LENGTH)
        validation.raise_if(problems)
        async with self._db.transaction() as conn:
            return practitioner_message(await scheduling.create_practitioner(conn, name, specialty))

    async def CreatePatient(
        self, request: scheduling_pb.CreatePatientRequest, context: grpc.aio.ServicerContext
    ) -> scheduling_pb2.Patient:
        problems: list[FieldViolation] = []
        given = validation.text(request.given_name, "given_name", problems, max_length=_NAME_LENGTH)
        family = validation.text(request.family_name, "family_name", problems, max_length=_NAME_LENGTH)
        phone = validation.phone(request.phone, "phone", problems)
        email = validation.email(request.email, "email", problems)
        if request.sex not in contact_pb2.Sex.values():
            problems.append(FieldViolation("sex", "unknown value"))
        validation.raise_if(problems)
        patient_id = uuid4()
        contact = sealing.seal_patient_contact(
            self._data_keys, patient_id, given_name=given, family_name=family, phone=phone, email=email
        )
        async with self._db.transaction() as conn:
            create_time: datetime = await scheduling.create_patient(
                conn, patient_id=patient_id, sex=request.sex, contact=contact
            )
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


def _key_message(row: models.PartnerKey, secret: str = "") -> partner_registry_pb2.PartnerKey:
    message = partner_registry_pb2.PartnerKey(key_id=row.id, partner_id=str(row.partner_id), secret=secret)
    set_timestamp(message.create_time, row.create_time)
    if row.revoke_time is not None:
        set_timestamp(message.revoke_time, row.revoke_time)
    return message


def _grant_message(row: models.PractitionerGrant) -> partner_registry_pb2.PractitionerGrant:
    message = partner_registry_pb2.PractitionerGrant(
        partner_id=str(row.partner_id), practitioner_id=str(row.practitioner_id)
    )
    set_timestamp(message.grant_time, row.grant_time)
    if row.revoke_time is not None:
        set_timestamp(message.revoke_time, row.revoke_time)
    return message


def _pair(
    request: registry_pb.GrantPractitionerAccessRequest | registry_pb.RevokePractitionerAccessRequest,
) -> tuple[UUID, UUID]:
    problems: list[FieldViolation] = []
    partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
    practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems)
    validation.raise_if(problems)
    assert partner is not None and practitioner is not None
    return partner, practitioner


class PartnerRegistryApi(registry_grpc.PartnerRegistryServiceServicer):
    """Serves ``appointments.internal.v1.PartnerRegistryService``."""

    def __init__(self, database: Database, guard: ExtractionGuard) -> None:
        self._db = database
        self._guard = guard

    def _limits_message(
        self, partner_id: UUID, overrides: models.PartnerOverrides
    ) -> partner_registry_pb2.PartnerLimits:
        policy = self._guard.policy(overrides)
        message = partner_registry_pb2.PartnerLimits(
            partner_id=str(partner_id),
            requests_per_second=policy.requests_per_second,
            burst=policy.burst,
            contact_daily_cap=policy.contact_daily_cap,
            patient_daily_cap=policy.patient_daily_cap,
            suspend_reason=overrides.suspend_reason,
        )
        if overrides.suspend_time is not None:
            set_timestamp(message.suspend_time, overrides.suspend_time)
        return message

    async def SetPartnerLimits(
        self, request: registry_pb.SetPartnerLimitsRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerLimits:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        values = {
            name: getattr(request, name) if request.HasField(name) else None
            for name in ("requests_per_second", "burst", "contact_daily_cap", "patient_daily_cap")
        }
        for name, value in values.items():
            positive = value is None or (value > 0 if name in ("requests_per_second", "burst") else value >= 0)
            if not positive or (value is not None and not math.isfinite(value)):
                problems.append(FieldViolation(name, "must be positive"))
        validation.raise_if(problems)
        assert partner is not None
        async with self._db.transaction() as conn:
            overrides = await usage.set_limits(conn, partner, **values)
        self._guard.forget(partner)  # this process applies them at once; others within POLICY_TTL
        return self._limits_message(partner, overrides)

    async def GetPartnerUsage(
        self, request: registry_pb.GetPartnerUsageRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerUsage:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        async with self._db.transaction(readonly=True) as conn:
            overrides = await usage.overrides(conn, partner)
            today = await usage.today(conn, partner)
        message = partner_registry_pb2.PartnerUsage(
            partner_id=str(partner),
            day=today.day,
            disclosures=today.disclosures,
            contact_disclosures=today.contact_disclosures,
            patients_reached=today.patients_reached,
            recent_daily_average=today.recent_daily_average,
            limits=self._limits_message(partner, overrides),
        )
        if today.flag_time is not None:
            set_timestamp(message.flag_time, today.flag_time)
        return message

    async def LiftPartnerSuspension(
        self, request: registry_pb.LiftPartnerSuspensionRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerLimits:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        async with self._db.transaction() as conn:
            overrides = await usage.lift_suspension(conn, partner)
        self._guard.forget(partner)
        return self._limits_message(partner, overrides)

    async def CreatePartner(
        self, request: registry_pb.CreatePartnerRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.Partner:
        problems: list[FieldViolation] = []
        name = validation.text(request.display_name, "display_name", problems, max_length=_NAME_LENGTH)
        validation.raise_if(problems)
        async with self._db.transaction() as conn:
            row = await partners.create_partner(conn, name)
        message = partner_registry_pb2.Partner(partner_id=str(row.id), display_name=row.display_name)
        set_timestamp(message.create_time, row.create_time)
        return message

    async def IssuePartnerKey(
        self, request: registry_pb.IssuePartnerKeyRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerKey:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        issued = auth.new_partner_key()
        async with self._db.transaction() as conn:
            row = await partners.insert_key(conn, issued.key_id, partner, issued.secret_hash)
        return _key_message(row, issued.secret)

    async def RevokePartnerKey(
        self, request: registry_pb.RevokePartnerKeyRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerKey:
        if not request.key_id:
            raise InvalidArgument.field("key_id", "is required")
        if not auth.is_key_id(request.key_id):
            raise InvalidArgument.field("key_id", "not a key id")
        async with self._db.transaction() as conn:
            return _key_message(await partners.revoke_key(conn, request.key_id))

    async def GrantPractitionerAccess(
        self, request: registry_pb.GrantPractitionerAccessRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PractitionerGrant:
        partner, practitioner = _pair(request)
        async with self._db.transaction() as conn:
            return _grant_message(await partners.grant_access(conn, partner, practitioner))

    async def RevokePractitionerAccess(
        self, request: registry_pb.RevokePractitionerAccessRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PractitionerGrant:
        partner, practitioner = _pair(request)
        async with self._db.transaction() as conn:
            return _grant_message(await partners.revoke_access(conn, partner, practitioner))
