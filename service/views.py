"""What a partner sees: the only place that turns stored data into partner messages. Pure: no I/O.

The basic view is built from :class:`~service.models.BasicAppointment`, which
has no contact column and no visit reason. Identifiers are replaced by the
partner's pseudonyms. Views are allowlists: a new column or field is invisible
to partners until a function here names it.
"""

from __future__ import annotations

from appointments.partner.v1 import appointment_pb2

from service import models
from service.pseudonyms import PartnerPseudonyms
from service.timestamps import set_timestamp

_STATUS = {
    "booked": appointment_pb2.APPOINTMENT_STATUS_BOOKED,
    "cancelled": appointment_pb2.APPOINTMENT_STATUS_CANCELLED,
}


def basic_appointment(row: models.BasicAppointment, ids: PartnerPseudonyms) -> appointment_pb2.Appointment:
    """Return the basic view of an appointment for the partner owning ``ids``."""
    message = appointment_pb2.Appointment(
        appointment_id=ids.appointment_id(row.id),
        status=_STATUS[row.status],
        patient_ref=ids.patient_ref(row.patient_id),
    )
    practitioner = message.practitioner
    practitioner.practitioner_id = str(row.practitioner_id)
    practitioner.display_name = row.practitioner_display_name
    practitioner.specialty = row.practitioner_specialty
    set_timestamp(message.start_time, row.start_time)
    set_timestamp(message.end_time, row.end_time)
    set_timestamp(message.update_time, row.update_time)
    return message
