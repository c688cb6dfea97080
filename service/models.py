"""Plain records and enums passed between the store, the policies and the API. Pure: no I/O.

The store builds these from rows; the views turn them into protobuf messages.
The partner path only ever gets :class:`BasicAppointment`, a projection with
no contact column and no visit reason, so those values are not even in memory
when a partner's answer is built.

The enums are the values the schema stores or returns, under the same names:
integer ones carry the numbers of the proto enums of the same meaning, text ones
the labels of the PostgreSQL enum types of the same name.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from service.timestamps import Micros


class View(enum.IntEnum):
    """What a response showed: ``appointments.internal.v1.DisclosureView`` (``disclosures.view``)."""

    BASIC = 1
    CONTACT = 2

    @property
    def label(self) -> str:
        """The view's name in telemetry (``basic``, ``contact``)."""
        return self.name.lower()


class ContactField(enum.IntEnum):
    """A contact detail a consent can release: ``appointments.type.v1.ContactField``."""

    NAME = 1
    SEX = 2
    PHONE = 3
    EMAIL = 4

    @property
    def label(self) -> str:
        """The field's name in consent tokens, reports and telemetry (``name``, ``sex``, ``phone``, ``email``)."""
        return self.name.lower()


class Outcome(enum.IntEnum):
    """Whether a ledger record is a disclosure or a refusal: ``DisclosureOutcome`` (``disclosures.outcome``)."""

    DISCLOSED = 1
    DENIED = 2
    #: A consent request made: the fields asked for, nothing sent.
    REQUESTED = 3
    #: A consent request approved: the fields granted and the consent created, nothing sent yet.
    CONSENT_GRANTED = 4
    #: The platform itself read the fields (the letters of a breach notification); nothing sent to the partner.
    INTERNAL_USE = 5


class ConsentRequestState(enum.StrEnum):
    """Where a consent request stands (SQL type ``consent_request_state``).

    The proto enums of both APIs (``ConsentRequestState``) number them in this order, from 1.
    """

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def number(self) -> int:
        """The value of ``ConsentRequestState`` in the protos."""
        return list(ConsentRequestState).index(self) + 1


class ChargeOutcome(enum.StrEnum):
    """What counting a response against its partner's limits answered (SQL type ``charge_outcome``)."""

    OK = "ok"
    #: Counted; the response crossed the anomaly threshold (reported once per group).
    FLAGGED = "flagged"
    #: Crossed it, and the partner is now suspended: nothing was recorded, nothing may be sent.
    SUSPENDED = "suspended"
    #: Over the daily cap on contact disclosures: nothing was counted or recorded.
    CONTACT_CAP = "contact_cap"
    #: Over the daily cap on distinct patients: nothing was counted or recorded.
    PATIENT_CAP = "patient_cap"


class ConsentState(enum.StrEnum):
    """What a consent is worth when it is presented (SQL type ``consent_state``)."""

    LIVE = "live"
    REVOKED = "revoked"
    EXPIRED = "expired"
    #: No consent of that id for this partner and patient.
    UNKNOWN = "unknown"


class AppointmentStatus(enum.StrEnum):
    """An appointment's status (SQL type ``appointment_status``)."""

    BOOKED = "booked"
    CANCELLED = "cancelled"


class PartnerEventKind(enum.StrEnum):
    """What happened to a partner's standing (SQL type ``partner_event_kind``)."""

    ANOMALY = "anomaly"
    SUSPENDED = "suspended"
    LIFTED = "lifted"
    LIMITS = "limits"


@dataclass(frozen=True, slots=True)
class ChargeTerms:
    """What a partner's responses are counted against: its daily caps and the anomaly rule."""

    contact_cap: int
    patient_cap: int
    anomaly_factor: float
    anomaly_min: int
    suspend_on_anomaly: bool


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated partner: who calls, with which key, and the credential it presented.

    The credential is the SHA-256 of the secret presented, followed by the
    SHA-256 of the client certificate when the connection presented one
    (:func:`service.access.credentials.credential`). The partner path's
    statements are called with the key id and the credential, and verify both
    themselves (migration 0007).
    """

    partner_id: UUID
    key_id: str
    credential: bytes = field(repr=False)

    @property
    def client_cert(self) -> str:
        """The hex SHA-256 of the client certificate the call came with, ``""`` without one."""
        return self.credential[32:].hex()


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What one response disclosed, or was refused: the parts of its ledger record common to its items."""

    partner_id: UUID
    key_id: str
    #: The full gRPC method name (``/appointments.partner.v1.PartnerAppointmentService/ListAppointments``).
    rpc: str
    #: The W3C trace id of the call, ``""`` when it was not traced.
    trace_id: str
    view: View
    outcome: Outcome = Outcome.DISCLOSED
    #: The ErrorInfo reason of a refusal (``NOT_FOUND``, ``CONSENT_REVOKED``…), ``""`` for a disclosure.
    denial_reason: str = ""
    contact_fields: Sequence[int] = ()
    consent_id: UUID | None = None
    #: The hex SHA-256 of the client certificate the call came with (mutual TLS), ``""`` without.
    client_cert: str = ""


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
    """A patient's contact details as stored: each value sealed for its row and column (service.crypto.sealing)."""

    given_name: bytes
    family_name: bytes
    sex: bytes
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
    status: AppointmentStatus
    create_time: datetime
    update_time: datetime


class BasicAppointment(NamedTuple):
    """The partner-path projection of an appointment: what the basic view may show, nothing more.

    A named tuple rather than a frozen dataclass like the others, because a
    page builds fifty of them from rows and a frozen dataclass sets each field
    through ``object.__setattr__``. Its times are microseconds since the epoch,
    as the partner reads select them (:mod:`service.timestamps`), and its
    status the ``appointment_status`` label as the row holds it.
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
    #: The SHA-256 of the client certificate the key is bound to, if it is bound to one.
    client_cert_sha256: bytes | None
    create_time: datetime
    revoke_time: datetime | None
    #: When the key stops verifying by itself, if it was issued to lapse.
    expire_time: datetime | None = None


class KeyState(enum.IntEnum):
    """Whether a partner key verifies now: ``appointments.internal.v1.PartnerKeyState``."""

    ACTIVE = 1
    EXPIRED = 2
    #: Revoked, whatever its expire time.
    REVOKED = 3


@dataclass(frozen=True, slots=True)
class KeyStanding:
    """A partner key as an operator lists it: its times and state, never its secret's hash."""

    id: str
    partner_id: UUID
    client_cert_sha256: bytes | None
    create_time: datetime
    revoke_time: datetime | None
    expire_time: datetime | None
    #: The time of the latest ledger record made with the key, ``None`` for none.
    last_use_time: datetime | None
    state: KeyState


@dataclass(frozen=True, slots=True)
class KeyAccess:
    """What a key is worth now: its partner, whether it is revoked, its partner's limits and granted practitioners."""

    partner_id: UUID
    #: Revoked, or past its expire time: either way the key no longer verifies.
    revoked: bool
    overrides: PartnerOverrides
    granted: frozenset[UUID]


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
    """The answer to one contact call's record statement: the consent's state, the charge, the fields as stored.

    ``charge`` is ``None`` when the consent is not live (nothing was counted
    or recorded). The values are those of the fields both the consent and the
    token name (``fields``), only once the charge let them go: each sealed
    (``bytes``), or the clear value an import left that ``data-key reencrypt``
    has not sealed yet (``str``, or ``int`` for the sex).
    """

    consent: ConsentState
    charge: ChargeOutcome | None
    fields: tuple[int, ...]
    given_name: bytes | str | None = None
    family_name: bytes | str | None = None
    sex: bytes | int | None = None
    phone: bytes | str | None = None
    email: bytes | str | None = None


@dataclass(frozen=True, slots=True)
class ConsentedContact:
    """The released fields, opened: what the contact view is built from."""

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
    view: View
    contact_fields: tuple[int, ...]
    consent_id: UUID | None
    rpc: str
    trace_id: str
    disclose_time: datetime
    outcome: Outcome
    denial_reason: str
    #: The hex SHA-256 of the client certificate the call came with, ``""`` without one.
    client_cert: str


@dataclass(frozen=True, slots=True)
class AffectedPatient:
    """One patient reached by a partner, as the breach report lists it."""

    patient_id: UUID
    appointment_ids: tuple[UUID, ...]
    contact_fields: tuple[int, ...]
    first_disclosure_time: datetime
    last_disclosure_time: datetime
    #: Consent requests the partner sent the patient in the window.
    consent_requests: int = 0
    #: The views the patient's appointments were disclosed in, in enum order.
    views: tuple[View, ...] = ()


@dataclass(frozen=True, slots=True)
class AppointmentSummary:
    """An appointment as a breach report names it: when, with whom, in which specialty."""

    id: UUID
    patient_id: UUID
    start_time: datetime
    practitioner_id: UUID
    practitioner_display_name: str
    practitioner_specialty: str


@dataclass(frozen=True, slots=True)
class StoredNoticeContact:
    """A patient's name and email as stored, for a breach notification letter: sealed bytes, or clear text an
    import left (opened by :func:`service.crypto.sealing.open_notice_contact`)."""

    patient_id: UUID
    given_name: bytes | str | None
    family_name: bytes | str | None
    email: bytes | str | None


@dataclass(frozen=True, slots=True)
class NoticeContact:
    """A patient's name and email, opened: what a breach notification letter is addressed with."""

    given_name: str
    family_name: str
    #: ``""`` when the platform has no email for the patient.
    email: str


@dataclass(frozen=True, slots=True)
class FeedChange:
    """One change of the appointment change feed, with the basic-view state it left."""

    position: int
    change_type: int
    appointment: BasicAppointment


@dataclass(frozen=True, slots=True)
class SealableRow:
    """One row's sealable values as stored, by column: the sealed value, and any clear text an import left."""

    id: UUID
    sealed: dict[str, bytes | None]
    clear: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class SealedValueCount:
    """How many values of one column carry one seal header, and how many of them are still in clear."""

    table: str
    column: str
    header: bytes | None  # version and key id of the seal (service.crypto.sealing.header); None: not sealed
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
    #: Appointments disclosed today, from the ledger.
    disclosures: int
    contact_disclosures: int
    patients_reached: int
    recent_daily_average: float
    flag_time: datetime | None


@dataclass(frozen=True, slots=True)
class RequestConsent:
    """The consent an approved request created, as its token is rebuilt from it."""

    id: UUID
    purpose: str
    create_time: datetime
    expire_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class PartnerConsentRequest:
    """A consent request as the partner path reads it: never the message, the purpose still sealed."""

    id: UUID
    appointment_id: UUID
    patient_id: UUID
    fields: tuple[int, ...]
    sealed_purpose: bytes
    state: ConsentRequestState
    create_time: datetime
    expire_time: datetime
    decide_time: datetime | None
    granted_fields: tuple[int, ...]
    consent: RequestConsent | None


@dataclass(frozen=True, slots=True)
class PatientConsentRequest:
    """A consent request as the patient app lists it: its partner and appointment, its text sealed."""

    id: UUID
    partner_id: UUID
    partner_display_name: str
    key_id: str
    appointment_id: UUID
    appointment_start_time: datetime
    practitioner_display_name: str
    practitioner_specialty: str
    patient_id: UUID
    fields: tuple[int, ...]
    sealed_purpose: bytes
    sealed_message: bytes | None
    ttl: timedelta
    state: ConsentRequestState
    create_time: datetime
    expire_time: datetime
    decide_time: datetime | None
    granted_fields: tuple[int, ...]
    consent_id: UUID | None


class PrivacyEventType(enum.IntEnum):
    """What a privacy event reports: ``appointments.internal.v1.PrivacyEventType`` (``privacy_events.type``)."""

    CONSENT_REQUESTED = 1
    CONSENT_GRANTED = 2
    CONSENT_REVOKED = 3
    CONSENT_EXPIRED = 4
    CONTACT_FIRST_DISCLOSED = 5
    PARTNER_SUSPENDED = 6


@dataclass(frozen=True, slots=True)
class PatientDisclosure:
    """One partner's responses about one appointment of a patient, for one view, field set and outcome."""

    partner_id: UUID
    partner_display_name: str
    appointment_id: UUID | None
    appointment_start_time: datetime | None
    practitioner_display_name: str
    practitioner_specialty: str
    view: View
    fields: tuple[int, ...]
    outcome: Outcome
    denial_reason: str
    consent_id: UUID | None
    purpose: str
    first_time: datetime
    last_time: datetime
    count: int
    #: What orders entries with the same last time (the page cursor's second half).
    group_key: str


@dataclass(frozen=True, slots=True)
class PrivacyEvent:
    """One event of the privacy stream."""

    position: int
    type: PrivacyEventType
    patient_id: UUID
    partner_id: UUID
    partner_display_name: str
    consent_id: UUID | None
    consent_request_id: UUID | None
    fields: tuple[int, ...]
    event_time: datetime
