"""Writes to the disclosure ledger: the record statements of migration 0005.

* :func:`record_basic` runs ``record_basic_disclosures``: the basic-view
  responses of many calls charged and recorded in one statement;
* :func:`disclose_contacts` runs ``disclose_consented_contacts``: the contact
  views of many calls, each consent checked, charged and recorded, the
  released values returned.

What a record holds, when it is durable and how responses are grouped is
:mod:`service.disclosure.record`'s to say; this module turns its columns into
statements. Every array of a group statement travels as one text parameter,
its array literal, which PostgreSQL's ``array_in`` parses: asyncpg encodes an
array parameter element by element, asking each whether it is a sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from service import models
from service.store.database import Connection

#: The record statement refused a partner over a daily cap (the cap in DETAIL, the partner in HINT).
_CAP_REACHED = "AG429"
#: The record statement refused a reference to a record it cannot repeat.
_REFERENCE_REFUSED = "AG409"
#: The record statement refused answers read on a replica (their positions in DETAIL, from 1).
_REPLICA_ANSWERS_REFUSED = "AG412"

_RECORD_BASIC = (
    "SELECT partner_id, outcome::text, counted_since, record_ids FROM record_basic_disclosures($1::text::uuid[], "
    "$2::text::text[], $3::text::text[], $4::text::text[], $5::text::int[], $6::text::bigint[], $7::text::text[], "
    "$8::text::text[], $9::text::uuid[], $10::text::uuid[], $11::text::uuid[], $12::text::int[], $13::text::int[], "
    "$14::text::float8[], $15::text::bigint[], $16::text::bool[], $17::text::bigint[], $18::text::int[], "
    "$19::text::uuid[], $20::text::text[])"
)
#: The same, with per response the practitioners to authorise first (migration 0013).
_RECORD_CHECKED_BASIC = (
    "SELECT partner_id, outcome::text, counted_since, record_ids FROM record_checked_basic_disclosures("
    "$1::text::int[], $2::text::uuid[], $3::text::uuid[], $4::text::text[], $5::text::text[], $6::text::text[], "
    "$7::text::int[], $8::text::bigint[], $9::text::text[], $10::text::text[], $11::text::uuid[], $12::text::uuid[], "
    "$13::text::uuid[], $14::text::int[], $15::text::int[], $16::text::float8[], $17::text::bigint[], "
    "$18::text::bool[], $19::text::bigint[], $20::text::int[], $21::text::uuid[], $22::text::text[])"
)
_DISCLOSE_CONTACTS = (
    "SELECT consent::text, outcome::text, fields, sealed_given_name, sealed_family_name, sealed_sex, sealed_phone, "
    "sealed_email, given_name, family_name, sex, phone, email FROM disclose_consented_contacts($1::text::uuid[], "
    "$2::text::text[], $3::text::text[], $4::text::text[], $5::text::text[], $6::text::uuid[], $7::text::uuid[], "
    "$8::text::uuid[], $9::text::text[], $10::text::uuid[], $11::text::int[], $12::text::int[], "
    "$13::text::float8[], $14::text::bigint[], $15::text::bool[], $16::text::text[])"
)

Items = Sequence[tuple[str, UUID | None, UUID | None]]
#: A charge outcome by its label: a dictionary lookup, where calling the enum searches its members.
_CHARGE_OUTCOMES = {outcome.value: outcome for outcome in models.ChargeOutcome}


class CapReached(Exception):
    """A partner of a group went over a daily cap: nothing of the group was counted or recorded."""

    def __init__(self, partner_id: UUID, cap: models.ChargeOutcome) -> None:
        super().__init__(cap)
        self.partner_id = partner_id
        self.cap = cap


class ReferenceRefused(Exception):
    """A response named a record it cannot repeat (missing, another partner's or day's): nothing was written."""


class ReplicaAnswersRefused(Exception):
    """The primary did not authorise some answers read on a replica: nothing of the group was written.

    ``positions`` are those responses' indexes in the group (from 0).
    """

    def __init__(self, positions: Sequence[int]) -> None:
        super().__init__(positions)
        self.positions = positions


@dataclass(frozen=True, slots=True)
class BasicRow:
    """One charged partner's answer to :func:`record_basic`."""

    partner_id: UUID
    outcome: models.ChargeOutcome
    #: The partner's counter row for the day (``partner_daily_usage.counted_since``), if it has one.
    counted_since: int | None
    #: Every response's record id, in the order given (``None``: no record).
    record_ids: Sequence[int | None]


@dataclass(frozen=True, slots=True)
class ContactRequest:
    """One call's contact disclosure: its entry (``entry.consent_id`` names the consent) and what it asks for."""

    entry: models.LedgerEntry
    requested_id: str
    appointment_id: UUID
    patient_id: UUID
    token_fields: Sequence[int]


async def record_basic(conn: Connection, columns: Sequence[Sequence[object] | str]) -> list[BasicRow]:
    """Run ``record_basic_disclosures`` with its 20 columns (a string is the column's array literal already).

    Raises :class:`CapReached` or :class:`ReferenceRefused`; either way
    nothing was counted or recorded.
    """
    return _basic_rows(await _run_group(conn, _RECORD_BASIC, columns))


async def record_checked_basic(
    conn: Connection, practitioners: Sequence[Sequence[UUID]], columns: Sequence[Sequence[object] | str]
) -> list[BasicRow]:
    """:func:`record_basic`, after the primary authorised each response's answer read on a replica.

    ``practitioners`` holds per response those its answer shows (empty: read
    on the primary). Raises :class:`ReplicaAnswersRefused` as well, and then
    nothing was counted or recorded.
    """
    ends: list[int] = []
    flat: list[UUID] = []
    total = 0
    for shown in practitioners:
        total += len(shown)
        ends.append(total)
        flat += shown
    return _basic_rows(await _run_group(conn, _RECORD_CHECKED_BASIC, [ends, flat, *columns]))


def _basic_rows(rows: Sequence[Any]) -> list[BasicRow]:
    return [BasicRow(row[0], _CHARGE_OUTCOMES[row[1]], row[2], row[3]) for row in rows]


async def disclose_contacts(
    conn: Connection, requests: Sequence[ContactRequest], terms: Mapping[UUID, models.ChargeTerms]
) -> list[models.StoredConsentedContact]:
    """Check the consents, charge, record and read the released fields of many calls: one statement.

    One answer per request, in order. The released fields are those both the
    token and the stored consent name. A consent that is not live has nothing
    counted or recorded (the caller records the refusal); a live one has its
    partner's charge outcome, and its values when the charge let them go.
    Each partner in ``terms`` is charged once for all its live requests.
    Raises :class:`CapReached`, and then nothing at all is counted or recorded.
    """
    for request in requests:
        if request.entry.view != models.View.CONTACT or request.entry.consent_id is None:
            raise ValueError("disclose_contacts records contact views under a consent only")
    columns: tuple[Sequence[object], ...] = (
        [r.entry.partner_id for r in requests],
        [r.entry.key_id for r in requests],
        [r.entry.rpc for r in requests],
        [r.entry.trace_id for r in requests],
        [r.requested_id for r in requests],
        [r.appointment_id for r in requests],
        [r.patient_id for r in requests],
        [r.entry.consent_id for r in requests],
        [array_literal(r.token_fields) for r in requests],
        *charge_columns(terms),
        [r.entry.client_cert for r in requests],
    )
    return [_stored_contact(row) for row in await _run_group(conn, _DISCLOSE_CONTACTS, columns)]


def _stored_contact(row: asyncpg.Record) -> models.StoredConsentedContact:
    def stored(column: str) -> bytes | str | None:
        clear: str | None = row[column]
        return clear if clear is not None else row[f"sealed_{column}"]  # clear text an import left wins

    sex: int | None = row["sex"]
    outcome = row["outcome"]
    return models.StoredConsentedContact(
        models.ConsentState(row["consent"]),
        models.ChargeOutcome(outcome) if outcome is not None else None,
        tuple(row["fields"]),
        stored("given_name"),
        stored("family_name"),
        sex if sex is not None else row["sealed_sex"],  # as for the others, a clear sex an import left wins
        stored("phone"),
        stored("email"),
    )


def charge_columns(terms: Mapping[UUID, models.ChargeTerms]) -> tuple[list[Any], ...]:
    """The partners a group statement charges, in lock order (sorted), and their terms: one list per column."""
    partners = sorted(terms)
    charged = [terms[p] for p in partners]
    return (
        partners,
        [t.contact_cap for t in charged],
        [t.patient_cap for t in charged],
        [t.anomaly_factor for t in charged],
        [t.anomaly_min for t in charged],
        [t.suspend_on_anomaly for t in charged],
    )


async def _run_group(conn: Connection, statement: str, columns: Sequence[Sequence[object] | str]) -> list[Any]:
    """Run a group statement with one array literal per column; translate its refusals."""
    try:
        rows: list[Any] = await conn.fetch(statement, *(c if isinstance(c, str) else array_literal(c) for c in columns))
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == _REFERENCE_REFUSED:
            raise ReferenceRefused from None
        if sqlstate == _REPLICA_ANSWERS_REFUSED:
            raise ReplicaAnswersRefused([int(n) - 1 for n in str(getattr(exc, "detail", "")).split(",")]) from None
        detail = getattr(exc, "detail", None)
        if sqlstate == _CAP_REACHED and detail in (models.ChargeOutcome.CONTACT_CAP, models.ChargeOutcome.PATIENT_CAP):
            raise CapReached(UUID(str(getattr(exc, "hint", ""))), models.ChargeOutcome(detail)) from None
        raise
    return rows


def array_literal(values: Sequence[object], strings: Sequence[str] | None = None) -> str:
    """The PostgreSQL array literal of ``values`` (``None`` for NULL), every other element quoted.

    ``strings``, when given, is ``values`` already passed through ``str``.
    Numbers, booleans and enums are written as Python prints them, which
    PostgreSQL reads back exactly.
    """
    if strings is None:
        strings = list(map(str, values))
    if not strings:
        return "{}"
    if "None" in strings and any(v is None for v in values):  # comparing strings is cheaper than ids to None
        return "{" + ",".join("NULL" if v is None else _quoted(str(v)) for v in values) + "}"
    plain = "".join(strings)
    if '"' in plain or "\\" in plain:
        return "{" + ",".join(map(_quoted, strings)) + "}"
    return '{"' + '","'.join(strings) + '"}'


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The method an internal-use record names: the command that read the contact details (migration 0012).
INTERNAL_USE_RPC = "/apptgate.cli.Audit/BreachReport"


async def record_internal_use(
    conn: Connection, partner_id: UUID, patient_ids: Sequence[UUID], fields: Sequence[int], *, rpc: str
) -> int:
    """Record that the platform itself read ``fields`` of ``patient_ids`` about ``partner_id``'s incident.

    One record (outcome 5, internal use), one item per patient: the patient
    id as the requested id, no appointment, no key, no consent. It commits
    with the caller's transaction, which reads the values after it; the
    sequencer chains it like any record. Returns the record's id.
    """
    if not patient_ids or not fields:
        raise ValueError("an internal use names at least one patient and one field")
    record_id: int = await conn.fetchval(
        "INSERT INTO disclosures (partner_id, key_id, view, contact_fields, rpc, outcome, requested_ids, "
        "appointment_ids, patient_ids) VALUES ($1, '', $2, $3::smallint[], $4, $5, $6::text[], $7::uuid[], "
        "$8::uuid[]) RETURNING id",
        partner_id,
        models.View.CONTACT,
        sorted(fields),
        rpc,
        models.Outcome.INTERNAL_USE,
        [str(p) for p in patient_ids],
        [None] * len(patient_ids),
        list(patient_ids),
    )
    return record_id
