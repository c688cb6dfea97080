"""What a partner sees: the only place that turns stored data into partner messages. Pure: no I/O.

The basic view is built from :class:`~service.models.BasicAppointment`,
which has no contact column and no visit reason; identifiers are replaced by
the partner's pseudonyms. The contact view is the only message that carries
contact details, and it sets exactly the fields a live consent covers. Views
are allowlists: a new column or field is invisible to partners until a
function here names it.

:class:`BasicPages` remembers the encoded basic view of the appointments it
has shown: agenda tools list the same pages all day, and a view is a pure
function of the partner and the row it shows.
"""

from __future__ import annotations

from collections.abc import Sequence

from appointments.partner.v1 import appointment_pb2, consent_request_pb2, contact_pb2
from appointments.partner.v1.partner_appointment_service_pb2 import ListAppointmentsResponse
from appointments.type.v1.contact_pb2 import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_NAME,
    CONTACT_FIELD_PHONE,
    CONTACT_FIELD_SEX,
)

from service import models
from service.access.consent_tokens import SigningKey
from service.disclosure.pseudonyms import PartnerPseudonyms
from service.memo import remember
from service.timestamps import set_timestamp, set_timestamp_micros

ALL_CONTACT_FIELDS = (CONTACT_FIELD_NAME, CONTACT_FIELD_SEX, CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL)
_STATUS: dict[str, appointment_pb2.AppointmentStatus.ValueType] = {
    models.AppointmentStatus.BOOKED: appointment_pb2.APPOINTMENT_STATUS_BOOKED,
    models.AppointmentStatus.CANCELLED: appointment_pb2.APPOINTMENT_STATUS_CANCELLED,
}


_SECOND = 1_000_000  # microseconds


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
    # Whole seconds, all an agenda needs: a microsecond update time, beside the practitioner and the
    # slot, would let two partners granted the same practitioner match their rows.
    set_timestamp_micros(message.start_time, row.start_time - row.start_time % _SECOND)
    set_timestamp_micros(message.end_time, row.end_time - row.end_time % _SECOND)
    set_timestamp_micros(message.update_time, row.update_time - row.update_time % _SECOND)


_ViewKey = tuple[PartnerPseudonyms, models.BasicAppointment]


class BasicPages:
    """Builds the basic view of pages of appointments, remembering each appointment's encoded view.

    Setting a page's fifty messages field by field is most of the Python a
    listing costs; merging fifty remembered encodings into the response is a
    fraction of it. A view is remembered under the partner's codec and the
    whole row it shows, so a row changed in any field (a time, the status, the
    practitioner's name) is built anew: the memo can be cold, never stale. It
    holds what the partner was shown, which the process can derive again from
    the database at any time. At most ``size`` views are kept, across all
    partners, then all forgotten at once; 0 keeps none
    (``APPTGATE_VIEW_MEMO``; docs/performance.md gives a view's weight).
    """

    __slots__ = ("_encoded", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        # (partner codec, row) -> (the partner's appointment id, a one-item ListAppointmentsResponse encoded).
        self._encoded: dict[_ViewKey, tuple[str, bytes]] = {}

    def fill(
        self, response: ListAppointmentsResponse, rows: Sequence[models.BasicAppointment], ids: PartnerPseudonyms
    ) -> list[str]:
        """Append the basic view of each row to ``response.appointments``; return their appointment ids in order."""
        encoded = self._encoded
        shown: list[str] = []
        parts: list[bytes] = []
        for row in rows:
            key = (ids, row)
            view = encoded.get(key)
            if view is None:
                view = remember(encoded, key, self._encode(row, ids), self._size)
            shown.append(view[0])
            parts.append(view[1])
        # Encoded messages concatenated parse as their merge: each part appends one appointment.
        response.MergeFromString(b"".join(parts))
        return shown

    @staticmethod
    def _encode(row: models.BasicAppointment, ids: PartnerPseudonyms) -> tuple[str, bytes]:
        one = ListAppointmentsResponse()
        message = one.appointments.add()
        fill_basic_appointment(message, row, ids)
        return message.appointment_id, one.SerializeToString()


def appointment_contact(appointment_id: str, contact: models.ConsentedContact) -> contact_pb2.AppointmentContact:
    """Return the contact view: exactly the released fields set, every other field withheld and listed."""
    covered = set(contact.fields)
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


def consent_request(
    row: models.PartnerConsentRequest,
    ids: PartnerPseudonyms,
    *,
    purpose: str,
    state: models.ConsentRequestState,
    token: str,
) -> consent_request_pb2.ConsentRequest:
    """Return a partner's view of its own consent request, in ``state`` (the state an event left it in).

    The granted fields and the consent's times only once approved; ``token``
    only while that consent is live (the caller decides). Never the patient's
    message, which is for the patient.
    """
    message = consent_request_pb2.ConsentRequest(
        consent_request_id=ids.consent_request_id(row.id),
        appointment_id=ids.appointment_id(row.appointment_id),
        fields=list(row.fields),  # type: ignore[arg-type]
        purpose=purpose,
        state=state.number,  # type: ignore[arg-type]
    )
    set_timestamp(message.create_time, row.create_time)
    set_timestamp(message.expire_time, row.expire_time)
    if state is not models.ConsentRequestState.PENDING and row.decide_time is not None:
        set_timestamp(message.decide_time, row.decide_time)
    if state is models.ConsentRequestState.APPROVED and row.consent is not None:
        message.granted_fields.extend(row.granted_fields)  # type: ignore[arg-type]
        set_timestamp(message.consent_expire_time, row.consent.expire_time)
        if row.consent.revoke_time is not None:
            set_timestamp(message.consent_revoke_time, row.consent.revoke_time)
        message.consent_token = token
    return message
