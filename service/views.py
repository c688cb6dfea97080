"""What a partner sees: the only place that turns stored data into partner messages. Pure: no I/O.

The basic view is built from :class:`~service.models.BasicAppointment`,
which has no contact column and no visit reason; identifiers are replaced by
the partner's pseudonyms. The contact view is the only message that carries
contact details, and it sets exactly the fields a live consent covers. Views
are allowlists: a new column or field is invisible to partners until a
function here names it.
"""

from __future__ import annotations

from collections.abc import Sequence

from appointments.partner.v1 import appointment_pb2, contact_pb2
from appointments.type.v1.contact_pb2 import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_NAME,
    CONTACT_FIELD_PHONE,
    CONTACT_FIELD_SEX,
)

from service import models
from service.consent import SigningKey
from service.pseudonyms import PartnerPseudonyms
from service.timestamps import set_timestamp_micros

ALL_CONTACT_FIELDS = (CONTACT_FIELD_NAME, CONTACT_FIELD_SEX, CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL)
_STATUS = {
    "booked": appointment_pb2.APPOINTMENT_STATUS_BOOKED,
    "cancelled": appointment_pb2.APPOINTMENT_STATUS_CANCELLED,
}


def basic_appointment(row: models.BasicAppointment, ids: PartnerPseudonyms) -> appointment_pb2.Appointment:
    """Return the basic view of an appointment for the partner owning ``ids``."""
    message = appointment_pb2.Appointment()
    fill_basic_appointment(message, row, ids)
    return message


def fill_basic_appointment(
    message: appointment_pb2.Appointment, row: models.BasicAppointment, ids: PartnerPseudonyms
) -> None:
    """Set the basic view of an appointment into an empty ``message`` (one of a response's repeated field)."""
    message.appointment_id = ids.appointment_id(row.id)
    message.status = _STATUS[row.status]
    message.patient_ref = ids.patient_ref(row.patient_id)
    practitioner = message.practitioner
    practitioner.practitioner_id = str(row.practitioner_id)
    practitioner.display_name = row.practitioner_display_name
    practitioner.specialty = row.practitioner_specialty
    set_timestamp_micros(message.start_time, row.start_time)
    set_timestamp_micros(message.end_time, row.end_time)
    set_timestamp_micros(message.update_time, row.update_time)


def appointment_contact(
    appointment_id: str, contact: models.ConsentedContact, fields: Sequence[int]
) -> contact_pb2.AppointmentContact:
    """Return the contact view: exactly the consented ``fields`` set, every other field withheld and listed."""
    covered = set(fields)
    patient = contact_pb2.PatientContact()
    if CONTACT_FIELD_NAME in covered:
        if contact.given_name is not None:
            patient.given_name = contact.given_name
        if contact.family_name is not None:
            patient.family_name = contact.family_name
    if CONTACT_FIELD_SEX in covered and contact.sex is not None:
        patient.sex = contact.sex  # type: ignore[assignment]  # stored as the enum number
    if CONTACT_FIELD_PHONE in covered and contact.phone is not None:
        patient.phone = contact.phone
    if CONTACT_FIELD_EMAIL in covered and contact.email is not None:
        patient.email = contact.email
    withheld = [f for f in ALL_CONTACT_FIELDS if f not in covered]
    return contact_pb2.AppointmentContact(
        appointment_id=appointment_id,
        patient=patient,
        withheld_fields=withheld,
    )


def consent_key(key: SigningKey, *, active: bool) -> contact_pb2.ConsentKey:
    """Return the published form of a consent-verifying public key."""
    return contact_pb2.ConsentKey(key_id=key.key_id, algorithm="v4.public", public_key=key.public_paserk, active=active)
