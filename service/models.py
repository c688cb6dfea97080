"""Plain records passed between the store and the API layers. Pure: no I/O.

The store builds these from rows; the views turn them into protobuf messages.
The partner path only ever gets :class:`BasicAppointment`, a projection with
no contact column and no visit reason, so those values are not even in memory
when a partner's answer is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple
from uuid import UUID

from service.timestamps import Micros


@dataclass(frozen=True, slots=True)
class Practitioner:
    """A practitioner row."""

    id: UUID
    display_name: str
    specialty: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class Patient:
    """A patient with its contact details in clear (internal path only: built from the request, stored sealed)."""

    id: UUID
    given_name: str
    family_name: str
    sex: int
    phone: str | None
    email: str | None
    create_time: datetime


@dataclass(frozen=True, slots=True)
class SealedPatientContact:
    """A patient's contact details as stored: each value sealed for its row and column (:mod:`service.sealing`)."""

    given_name: bytes
    family_name: bytes
    phone: bytes | None
    email: bytes | None


@dataclass(frozen=True, slots=True)
class Appointment:
    """An appointment row (internal path only). The visit reason is stored sealed and never read back."""

    id: UUID
    practitioner_id: UUID
    patient_id: UUID
    start_time: datetime
    end_time: datetime
    status: str
    create_time: datetime
    update_time: datetime


class BasicAppointment(NamedTuple):
    """The partner-path projection of an appointment: what the basic view may show, nothing more.

    A named tuple rather than a frozen dataclass like the others: a page builds
    fifty from database rows, and a frozen dataclass sets each field through
    ``object.__setattr__`` (69 µs a page, against 18 µs for this). Its times
    are microseconds since the epoch, as the partner reads select them
    (:mod:`service.timestamps`).
    """

    id: UUID
    patient_id: UUID
    start_time: Micros
    end_time: Micros
    status: str
    update_time: Micros
    practitioner_id: UUID
    practitioner_display_name: str
    practitioner_specialty: str


@dataclass(frozen=True, slots=True)
class Partner:
    """A partner row."""

    id: UUID
    display_name: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class PartnerKey:
    """A partner key row: the hash of the secret, never the secret."""

    id: str
    partner_id: UUID
    secret_hash: bytes
    create_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class PractitionerGrant:
    """A practitioner's grant of access to a partner."""

    partner_id: UUID
    practitioner_id: UUID
    grant_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class Consent:
    """A patient's consent row (the token itself is never stored)."""

    id: UUID
    patient_id: UUID
    partner_id: UUID
    fields: tuple[int, ...]
    purpose: str
    signing_key_id: str
    create_time: datetime
    expire_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class StoredConsentedContact:
    """What ``read_consented_contact`` returns: the consent's state and only the covered fields, as stored.

    Each contact value is sealed (``bytes``), or, in a database whose rows
    ``data-key reencrypt`` has not sealed yet, the leftover clear text (``str``).
    """

    state: str  # "live", "revoked", "expired" or "unknown"
    fields: tuple[int, ...]
    given_name: bytes | str | None
    family_name: bytes | str | None
    sex: int | None
    phone: bytes | str | None
    email: bytes | str | None


@dataclass(frozen=True, slots=True)
class ConsentedContact:
    """The consent's state and only the covered fields, opened: what the contact view is built from."""

    state: str  # "live", "revoked", "expired" or "unknown"
    fields: tuple[int, ...]
    given_name: str | None
    family_name: str | None
    sex: int | None
    phone: str | None
    email: str | None


@dataclass(frozen=True, slots=True)
class Disclosure:
    """One appointment of a disclosure ledger record (record ``id``, position ``item`` in it)."""

    id: int
    item: int
    partner_id: UUID
    key_id: str
    requested_id: str
    appointment_id: UUID | None
    patient_id: UUID | None
    view: int
    contact_fields: tuple[int, ...]
    consent_id: UUID | None
    rpc: str
    trace_id: str
    disclose_time: datetime
    outcome: int
    denial_reason: str


@dataclass(frozen=True, slots=True)
class AffectedPatient:
    """One patient reached by a partner, as the breach report lists it."""

    patient_id: UUID
    appointment_ids: tuple[UUID, ...]
    contact_fields: tuple[int, ...]
    first_disclosure_time: datetime
    last_disclosure_time: datetime


@dataclass(frozen=True, slots=True)
class FeedChange:
    """One change of the appointment change feed, with the basic-view state it left."""

    position: int
    change_type: int
    appointment: BasicAppointment


@dataclass(frozen=True, slots=True)
class SealableRow:
    """One row's sealable values as stored, by column: the sealed value, and any clear text left by older versions."""

    id: UUID
    sealed: dict[str, bytes | None]
    clear: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class SealedValueCount:
    """How many values of one column carry one seal header, and how many of them are still in clear."""

    table: str
    column: str
    header: bytes | None  # version and key id of the seal (service.sealing.header); None: not sealed
    sealed: int
    clear: int


@dataclass(frozen=True, slots=True)
class PartnerOverrides:
    """A partner's limit overrides (``None``: the configured default) and suspension."""

    requests_per_second: float | None = None
    burst: int | None = None
    contact_daily_cap: int | None = None
    patient_daily_cap: int | None = None
    suspend_time: datetime | None = None
    suspend_reason: str = ""


@dataclass(frozen=True, slots=True)
class PartnerUsage:
    """A partner's counters for one UTC day."""

    day: str
    disclosures: int
    contact_disclosures: int
    patients_reached: int
    recent_daily_average: float
    flag_time: datetime | None
