"""The breach-scope report: totals over the patients a partner reached, and its file formats. Pure: no I/O.

Used by ``AuditService.BreachReport`` and by ``python -m service audit
breach-report``, so the incident team and internal tools get the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from service import models
from service.access.consent_tokens import CONTACT_FIELDS


@dataclass
class Totals:
    """Counts over a report: distinct patients, appointments, and patients per contact field."""

    patients: int = 0
    appointments: int = 0
    contact_patients: int = 0
    consent_request_patients: int = 0
    per_field: dict[int, int] = field(default_factory=lambda: dict.fromkeys(CONTACT_FIELDS, 0))

    def add(self, patient: models.AffectedPatient) -> None:
        """Count one patient (each patient is reported once)."""
        self.patients += 1
        self.appointments += len(patient.appointment_ids)
        if patient.contact_fields:
            self.contact_patients += 1
        if patient.consent_requests:
            self.consent_request_patients += 1
        for number in patient.contact_fields:
            self.per_field[number] += 1


def totals(patients: Iterable[models.AffectedPatient]) -> Totals:
    """Totals over ``patients``."""
    result = Totals()
    for patient in patients:
        result.add(patient)
    return result


CSV_HEADER = [
    "patient_id",
    "appointment_ids",
    "contact_fields",
    "first_disclosure_time",
    "last_disclosure_time",
    "consent_requests",
]


def csv_row(patient: models.AffectedPatient) -> list[str]:
    """One CSV row (lists joined with spaces, times in RFC 3339)."""
    return [
        str(patient.patient_id),
        " ".join(str(a) for a in patient.appointment_ids),
        " ".join(CONTACT_FIELDS[f] for f in patient.contact_fields),
        patient.first_disclosure_time.isoformat(),
        patient.last_disclosure_time.isoformat(),
        str(patient.consent_requests),
    ]


def json_patient(patient: models.AffectedPatient) -> dict[str, object]:
    """One patient as a JSON object."""
    return {
        "patient_id": str(patient.patient_id),
        "appointment_ids": [str(a) for a in patient.appointment_ids],
        "contact_fields": [CONTACT_FIELDS[f] for f in patient.contact_fields],
        "first_disclosure_time": patient.first_disclosure_time.isoformat(),
        "last_disclosure_time": patient.last_disclosure_time.isoformat(),
        "consent_requests": patient.consent_requests,
    }


def json_totals(value: Totals) -> dict[str, object]:
    """The totals as a JSON object."""
    return {
        "patients": value.patients,
        "appointments": value.appointments,
        "contact_patients": value.contact_patients,
        "consent_request_patients": value.consent_request_patients,
        "patients_per_contact_field": {CONTACT_FIELDS[n]: count for n, count in value.per_field.items()},
    }
