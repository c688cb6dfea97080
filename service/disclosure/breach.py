"""The breach report: what a partner's incident reached, as one message in every format. Pure: no I/O.

:class:`Report` gathers what :mod:`service.disclosure.breach_scope` read (the
patients, their appointments, the activity hour by hour, the totals per view)
with the ledger's verification. :func:`response_message` turns it into
``appointments.internal.v1.BreachReportResponse``, which ``AuditService.
BreachReport`` answers and from which ``audit breach-report`` writes its JSON
(the message's JSON mapping, with the proto's field names) and its CSV
(columns named after the same fields), so every format says the same thing
in the same words: enum names (``CONTACT_FIELD_NAME``) and RFC 3339 UTC times
(``…Z``). The HTML dossier (:mod:`service.disclosure.breach_dossier`) reads
the same :class:`Report`.

Practitioners' names and specialties and partners' names are third-party
text: the CSV neutralises a cell a spreadsheet would run as a formula.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from appointments.internal.v1 import audit_pb2
from appointments.internal.v1 import audit_service_pb2 as pb
from appointments.type.v1 import contact_pb2
from google.protobuf import json_format

from service import models
from service.access.consent_tokens import CONTACT_FIELDS
from service.timestamps import set_timestamp


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


class VerificationState(enum.IntEnum):
    """Whether the ledger was verified with a report: ``appointments.internal.v1.LedgerVerificationState``."""

    NOT_CHECKED = 1
    INTACT = 2
    NOT_INTACT = 3


@dataclass(frozen=True, slots=True)
class Verification:
    """The ledger's verification as a report states it: the whole chain, which covers the window."""

    state: VerificationState = VerificationState.NOT_CHECKED
    verify_time: datetime | None = None
    #: Chained records verified, from the first to ``head_seq``.
    records: int = 0
    head_seq: int = 0
    seals_checked: int = 0
    witnessed_checkpoints: int = 0
    #: The report's partner's (and key's) records in the window, and how many of them were not chained.
    window_records: int = 0
    window_unchained_records: int = 0
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReportedPatient:
    """One patient of a report: what was disclosed, the appointments concerned, and the letter's address if read."""

    affected: models.AffectedPatient
    appointments: tuple[models.AppointmentSummary, ...] = ()
    contact: models.NoticeContact | None = None


@dataclass(frozen=True, slots=True)
class Activity:
    """The appointments disclosed in one hour (UTC) and view, counted once per response that carried one."""

    hour_start_time: datetime
    view: models.View
    disclosures: int


@dataclass(frozen=True, slots=True)
class ViewTotal:
    """What was disclosed in one view."""

    view: models.View
    patients: int
    appointments: int
    disclosures: int


@dataclass(frozen=True, slots=True)
class SpecialtyTotal:
    """The patients and appointments of one specialty."""

    specialty: str
    patients: int
    appointments: int


@dataclass(frozen=True, slots=True)
class Report:
    """Everything a breach report says, as of ``generate_time``."""

    partner: models.Partner
    #: The key asked for, ``None`` for every key of the partner.
    key_id: str | None
    #: The keys concerned: ``key_id``, else every key with a disclosure or consent request in the window.
    key_ids: tuple[str, ...]
    start_time: datetime
    end_time: datetime
    generate_time: datetime
    patients: tuple[ReportedPatient, ...]
    activity: tuple[Activity, ...]
    views: tuple[ViewTotal, ...]
    verification: Verification = Verification()
    #: The keys concerned that are revoked, with when (what the dossier's measures start from).
    revoked_keys: tuple[tuple[str, datetime], ...] = ()

    @property
    def totals(self) -> Totals:
        """The patient totals."""
        return totals(p.affected for p in self.patients)

    @property
    def specialties(self) -> tuple[SpecialtyTotal, ...]:
        """The specialties of the appointments disclosed, by name."""
        patients: dict[str, set[UUID]] = {}
        appointments: dict[str, set[UUID]] = {}
        for patient in self.patients:
            for appointment in patient.appointments:
                patients.setdefault(appointment.practitioner_specialty, set()).add(patient.affected.patient_id)
                appointments.setdefault(appointment.practitioner_specialty, set()).add(appointment.id)
        return tuple(SpecialtyTotal(s, len(patients[s]), len(appointments[s])) for s in sorted(patients))

    @property
    def first_disclosure_time(self) -> datetime | None:
        """The first record of the report, ``None`` when it has none."""
        return min((p.affected.first_disclosure_time for p in self.patients), default=None)

    @property
    def last_disclosure_time(self) -> datetime | None:
        """The last record of the report, ``None`` when it has none."""
        return max((p.affected.last_disclosure_time for p in self.patients), default=None)

    @property
    def disclosures(self) -> int:
        """Appointments disclosed, counted once per response that carried one."""
        return sum(v.disclosures for v in self.views)

    @property
    def contact_included(self) -> bool:
        """Whether the patients' names and emails were read for the letters."""
        return any(p.contact is not None for p in self.patients)


def activity(rows: Iterable[tuple[datetime, models.View, int]]) -> tuple[Activity, ...]:
    """Disclosures per hour and view from finer rows (per key, say), oldest hour first."""
    summed: dict[tuple[datetime, models.View], int] = {}
    for hour, view, count in rows:
        summed[(hour, view)] = summed.get((hour, view), 0) + count
    return tuple(Activity(hour, view, count) for (hour, view), count in sorted(summed.items()))


def view_totals(found: Mapping[models.View, tuple[int, int, int]]) -> tuple[ViewTotal, ...]:
    """Every view, in enum order, with its (patients, appointments, disclosures) or zeros."""
    return tuple(ViewTotal(view, *found.get(view, (0, 0, 0))) for view in models.View)


def attach_appointments(
    patients: Sequence[models.AffectedPatient], appointments: Iterable[models.AppointmentSummary]
) -> tuple[ReportedPatient, ...]:
    """Each patient with its appointments disclosed (by start time), read separately."""
    by_patient: dict[UUID, list[models.AppointmentSummary]] = {}
    for appointment in appointments:
        by_patient.setdefault(appointment.patient_id, []).append(appointment)
    return tuple(
        ReportedPatient(patient, tuple(sorted(by_patient.get(patient.patient_id, ()), key=lambda a: a.start_time)))
        for patient in patients
    )


# --------------------------------------------------------------------------- the message


def _verification_message(value: Verification) -> audit_pb2.LedgerVerification:
    message = audit_pb2.LedgerVerification(
        state=value.state.value,  # type: ignore[arg-type]
        records=value.records,
        head_seq=value.head_seq,
        seals_checked=value.seals_checked,
        witnessed_checkpoints=value.witnessed_checkpoints,
        window_records=value.window_records,
        window_unchained_records=value.window_unchained_records,
        problems=list(value.problems),
    )
    if value.verify_time is not None:
        set_timestamp(message.verify_time, value.verify_time)
    return message


def patient_message(patient: ReportedPatient) -> audit_pb2.AffectedPatient:
    """The message of one patient of a report."""
    affected = patient.affected
    message = audit_pb2.AffectedPatient(
        patient_id=str(affected.patient_id),
        appointment_ids=[str(a) for a in affected.appointment_ids],
        contact_fields=list(affected.contact_fields),  # type: ignore[arg-type]
        consent_requests=affected.consent_requests,
        views=[v.value for v in affected.views],  # type: ignore[misc]
    )
    set_timestamp(message.first_disclosure_time, affected.first_disclosure_time)
    set_timestamp(message.last_disclosure_time, affected.last_disclosure_time)
    for appointment in patient.appointments:
        summary = message.appointments.add(
            appointment_id=str(appointment.id),
            practitioner_display_name=appointment.practitioner_display_name,
            practitioner_specialty=appointment.practitioner_specialty,
        )
        set_timestamp(summary.start_time, appointment.start_time)
    if patient.contact is not None:
        message.contact.CopyFrom(
            audit_pb2.NoticeContact(
                given_name=patient.contact.given_name,
                family_name=patient.contact.family_name,
                email=patient.contact.email,
            )
        )
    return message


def totals_message(report: Report) -> audit_pb2.BreachTotals:
    """The message of a report's totals."""
    value = report.totals
    message = audit_pb2.BreachTotals(
        patients=value.patients,
        appointments=value.appointments,
        contact_patients=value.contact_patients,
        consent_request_patients=value.consent_request_patients,
        fields=[audit_pb2.ContactFieldTotal(field=n, patients=c) for n, c in value.per_field.items()],  # type: ignore[arg-type]
        views=[
            audit_pb2.ViewTotal(
                view=v.view.value,  # type: ignore[arg-type]
                patients=v.patients,
                appointments=v.appointments,
                disclosures=v.disclosures,
            )
            for v in report.views
        ],
        specialties=[
            audit_pb2.SpecialtyTotal(specialty=s.specialty, patients=s.patients, appointments=s.appointments)
            for s in report.specialties
        ],
        disclosures=report.disclosures,
    )
    if (first := report.first_disclosure_time) is not None:
        set_timestamp(message.first_disclosure_time, first)
    if (last := report.last_disclosure_time) is not None:
        set_timestamp(message.last_disclosure_time, last)
    return message


def response_message(report: Report) -> pb.BreachReportResponse:
    """The whole report as ``BreachReportResponse``: what the RPC answers and the JSON and CSV are written from."""
    message = pb.BreachReportResponse(
        patients=[patient_message(p) for p in report.patients],
        totals=totals_message(report),
        partner=audit_pb2.PartnerSummary(partner_id=str(report.partner.id), display_name=report.partner.display_name),
        key_ids=list(report.key_ids),
        verification=_verification_message(report.verification),
    )
    set_timestamp(message.start_time, report.start_time)
    set_timestamp(message.end_time, report.end_time)
    set_timestamp(message.generate_time, report.generate_time)
    for item in report.activity:
        entry = message.activity.add(view=item.view.value, disclosures=item.disclosures)
        set_timestamp(entry.hour_start_time, item.hour_start_time)
    return message


def json_text(message: pb.BreachReportResponse | audit_pb2.BreachTotals, *, indent: int | None = 2) -> str:
    """The message's JSON mapping with the proto's field names, zero values included; a new line at the end."""
    text = json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=indent
    )
    return (text if indent is not None else " ".join(text.split())) + "\n"


# --------------------------------------------------------------------------- CSV

#: What makes a spreadsheet read a cell as a formula (OWASP's list for CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: Between the values of a list in one cell.
LIST_SEPARATOR = "; "


def cell(text: str) -> str:
    """Third-party text made inert for a spreadsheet: a leading ``'`` before a formula's first character."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _enum_names(enum_type: object, numbers: Iterable[int]) -> str:
    return LIST_SEPARATOR.join(enum_type.Name(n) for n in numbers)  # type: ignore[attr-defined]


def _join(values: Iterable[str]) -> str:
    return LIST_SEPARATOR.join(values)


#: One row per patient, columns named after ``AffectedPatient``'s fields (a nested field as ``parent.field``).
CSV_HEADER = [
    "patient_id",
    "appointment_ids",
    "contact_fields",
    "first_disclosure_time",
    "last_disclosure_time",
    "consent_requests",
    "views",
    "appointments.start_time",
    "appointments.practitioner_display_name",
    "appointments.practitioner_specialty",
]


def csv_row(patient: audit_pb2.AffectedPatient) -> list[str]:
    """One CSV row: lists joined by :data:`LIST_SEPARATOR` (the appointments' columns in the same order)."""
    return [
        patient.patient_id,
        _join(patient.appointment_ids),
        _enum_names(contact_pb2.ContactField, patient.contact_fields),
        patient.first_disclosure_time.ToJsonString(),
        patient.last_disclosure_time.ToJsonString(),
        str(patient.consent_requests),
        _enum_names(audit_pb2.DisclosureView, patient.views),
        _join(a.start_time.ToJsonString() for a in patient.appointments),
        _join(cell(a.practitioner_display_name) for a in patient.appointments),
        _join(cell(a.practitioner_specialty) for a in patient.appointments),
    ]
