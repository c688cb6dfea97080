"""A patient's history for a subject-access request: the document, its totals, JSON and CSV. Pure: no I/O.

``python -m service audit patient-history`` reads the entries through
:func:`service.store.privacy.patient_disclosures` (one snapshot, every page)
and renders them here: JSON and CSV for staff and tools, in the internal API's
field names (``appointments.internal.v1.PatientDisclosure``);
:mod:`service.disclosure.patient_history_page` renders the page the patient
reads.

Partner names, practitioners' names and specialties and consent purposes are
third-party text: the JSON quotes them, the CSV neutralises a cell a
spreadsheet would run as a formula, the page escapes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from uuid import UUID

from service import models
from service.access.consent_tokens import CONTACT_FIELDS

#: What each outcome is called in the JSON and CSV (``appointments.internal.v1.DisclosureOutcome``'s names).
OUTCOME_LABELS = MappingProxyType({outcome: outcome.name.lower() for outcome in models.Outcome})


@dataclass(frozen=True, slots=True)
class History:
    """One patient's history over a window, as of one instant."""

    patient_id: UUID
    #: The window's start (inclusive); ``None``: from the first record.
    start_time: datetime | None
    #: The window's end (exclusive); ``None``: up to ``generate_time``.
    end_time: datetime | None
    #: When the history was read: the instant its snapshot shows.
    generate_time: datetime
    #: The entries, most recent access first.
    entries: tuple[models.PatientDisclosure, ...]


@dataclass(frozen=True, slots=True)
class Totals:
    """Counts over a history: entries, distinct partners and appointments, responses per outcome."""

    entries: int
    partners: int
    appointments: int
    #: Responses (the sum of the entries' counts) per outcome, every outcome present.
    responses: Mapping[models.Outcome, int]


def totals(entries: Iterable[models.PatientDisclosure]) -> Totals:
    """The totals of ``entries``."""
    count = 0
    partners: set[UUID] = set()
    appointments: set[UUID] = set()
    responses = dict.fromkeys(models.Outcome, 0)
    for entry in entries:
        count += 1
        partners.add(entry.partner_id)
        if entry.appointment_id is not None:
            appointments.add(entry.appointment_id)
        responses[entry.outcome] += entry.count
    return Totals(count, len(partners), len(appointments), MappingProxyType(responses))


def field_labels(fields: Sequence[int]) -> list[str]:
    """The contact fields' names (``name``, ``sex``, ``phone``, ``email``), in enum order."""
    return [CONTACT_FIELDS.get(number, str(number)) for number in sorted(fields)]


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _id(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def json_entry(entry: models.PatientDisclosure) -> dict[str, object]:
    """One entry as a JSON object."""
    return {
        "partner": {"partner_id": str(entry.partner_id), "display_name": entry.partner_display_name},
        "appointment": {
            "appointment_id": _id(entry.appointment_id),
            "start_time": _time(entry.appointment_start_time),
            "practitioner_display_name": entry.practitioner_display_name,
            "practitioner_specialty": entry.practitioner_specialty,
        },
        "view": entry.view.label,
        "fields": field_labels(entry.fields),
        "outcome": OUTCOME_LABELS[entry.outcome],
        "denial_reason": entry.denial_reason,
        "consent_id": _id(entry.consent_id),
        "purpose": entry.purpose,
        "first_time": entry.first_time.isoformat(),
        "last_time": entry.last_time.isoformat(),
        "count": entry.count,
    }


def json_totals(value: Totals) -> dict[str, object]:
    """The totals as a JSON object."""
    return {
        "entries": value.entries,
        "partners": value.partners,
        "appointments": value.appointments,
        "responses": {OUTCOME_LABELS[outcome]: n for outcome, n in value.responses.items()},
    }


def json_document(history: History) -> dict[str, object]:
    """The whole history as a JSON object: patient, window, generation time, entries, totals."""
    return {
        "patient_id": str(history.patient_id),
        "window": {"start_time": _time(history.start_time), "end_time": _time(history.end_time)},
        "generate_time": history.generate_time.isoformat(),
        "entries": [json_entry(entry) for entry in history.entries],
        "totals": json_totals(totals(history.entries)),
    }


CSV_HEADER = [
    "partner_id",
    "partner_display_name",
    "appointment_id",
    "appointment_start_time",
    "practitioner_display_name",
    "practitioner_specialty",
    "view",
    "fields",
    "outcome",
    "denial_reason",
    "consent_id",
    "purpose",
    "first_time",
    "last_time",
    "count",
]

#: What makes a spreadsheet read a cell as a formula (OWASP's list for CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    """Third-party text made inert for a spreadsheet: a leading ``'`` before a formula's first character."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_row(entry: models.PatientDisclosure) -> list[str]:
    """One CSV row: lists joined with spaces, times in RFC 3339, empty for none."""
    return [
        str(entry.partner_id),
        _cell(entry.partner_display_name),
        _id(entry.appointment_id) or "",
        _time(entry.appointment_start_time) or "",
        _cell(entry.practitioner_display_name),
        _cell(entry.practitioner_specialty),
        entry.view.label,
        " ".join(field_labels(entry.fields)),
        OUTCOME_LABELS[entry.outcome],
        entry.denial_reason,
        _id(entry.consent_id) or "",
        _cell(entry.purpose),
        entry.first_time.isoformat(),
        entry.last_time.isoformat(),
        str(entry.count),
    ]
