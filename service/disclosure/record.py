"""The record of a response: what it holds, when it is durable, how it is grouped, what the memos skip.

**What a record holds.** Every partner response that reveals appointment data
appends one ledger record (``disclosures``, migration 0005): partner, key,
RPC, trace id, time (the database's), view, contact fields and consent, and
the response's items in order: the id the partner named or was shown, the
internal appointment id, its patient. A refused attempt (a not-found probe, a
consent denial) is a record too, with outcome ``DENIED`` and its reason.

**When it is durable.** Before the response leaves: the statement that writes
the record commits first, and nothing is sent unless it did. A caller that
goes away while its record is being written leaves the record to be written,
so the ledger may hold a disclosure that was not sent, never the reverse. The
same statement counts the response against the partner's daily caps; over a
cap nothing is recorded and nothing is sent.

**How responses are grouped.** The basic views of concurrent calls
(``ListAppointments``, ``GetAppointment``) share one statement and one commit,
``record_basic_disclosures``; their contact views (``GetAppointmentContact``)
another, ``disclose_consented_contacts``, which also checks each consent and
returns the released fields sealed. :class:`DisclosureRecorder` forms the
groups (:mod:`service.disclosure.groups`); the change feed's deliveries are
recorded by :func:`write_basic` inside their own transaction
(:mod:`service.feed.delivery`). Refusals go one by one through
:func:`service.store.partner_path.record_refusal`, on the partner path.

**What the memos skip.** Agenda tools list the same pages all day, so two
memos of this process make a repeated page cheap to record, and the database
still decides:

* :class:`CountedPatients`: the patients each partner was counted for today.
  Only the others are sent to be charged, with the counter row they were
  counted under; when the partner's row for the day is another one (a new
  day, counters started over), the statement charges every patient anyway.
* :class:`RecordedResponses`: the records this process wrote in full, by the
  fingerprint of their items. A response of :data:`MIN_ITEMS` items or more
  repeating one, for the same partner under the same counter row, is recorded
  as a reference to it (its id and the SHA-256 of its items) instead of
  holding the items again. The statement checks the record named is the same
  partner's, of the same UTC day, with items of its own; when it refuses, the
  memo is forgotten and the responses written in full.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from uuid import UUID

from appointments.partner.v1 import partner_appointment_service_pb2

from service import models
from service.disclosure.groups import Expected, Grouping, GroupWriter, RecordKind
from service.inflight import CallsInFlight
from service.store import ledger
from service.store.database import Connection, Database
from service.telemetry.tracing import current_trace_id

#: Fewer items than this and a response is recorded in full: its record is hardly larger than a reference.
MIN_ITEMS = 8
#: Records remembered for references: a day's distinct pages of many partners, a few megabytes at most.
RECORDED_RESPONSES = 20_000
#: Patients remembered as counted: a day's patients of many partners, a few megabytes at most.
COUNTED_PATIENTS = 100_000
_PARTNER_METHODS = (
    "/" + partner_appointment_service_pb2.DESCRIPTOR.services_by_name["PartnerAppointmentService"].full_name + "/"
)

Response = tuple[models.LedgerEntry, ledger.Items]


def entry(
    principal: models.Principal,
    method: str,
    view: models.View,
    *,
    denial_reason: str = "",
    consent_id: UUID | None = None,
) -> models.LedgerEntry:
    """The ledger entry of a call of the partner service's ``method``; a ``denial_reason`` marks a refused attempt."""
    return models.LedgerEntry(
        principal.partner_id,
        principal.key_id,
        _PARTNER_METHODS + method,
        current_trace_id(),
        view,
        outcome=models.Outcome.DENIED if denial_reason else models.Outcome.DISCLOSED,
        denial_reason=denial_reason,
        consent_id=consent_id,
        client_cert=principal.client_cert,
    )


def fingerprint(requested: Sequence[str], appointments: Sequence[str], patients: Sequence[str]) -> bytes | None:
    """The SHA-256 of a response's items from the text of its ids, as ``disclosure_items_digest`` computes it.

    Each column's elements are joined by 0x1e, the columns by 0x1f. ``None``
    when the response is too small to be worth a reference, or when the text
    would be ambiguous: a requested id holding a separator, or an item lacking
    an appointment or a patient (its text is ``"None"``, which no UUID reads
    as). Otherwise two responses have the same fingerprint only when their
    items are the same, in the same order.
    """
    if len(requested) < MIN_ITEMS or "None" in appointments or "None" in patients:
        return None
    names = "\x1e".join(requested)
    if "\x1f" in names or names.count("\x1e") != len(requested) - 1:
        return None
    text = "\x1f".join((names, "\x1e".join(appointments), "\x1e".join(patients)))
    return hashlib.sha256(text.encode()).digest()


class RecordedResponses:
    """A bounded memo: (partner, counter row, items fingerprint) → the id of the record holding those items.

    Only committed records are added (:meth:`add`), under the counter row
    (``counted_since``) their patients were counted under; a lookup under
    another row finds nothing, so a reference never spans a new day or
    counters started over. The least recently used entry goes first once the
    memo holds ``size``. :meth:`clear` forgets everything, for when the
    database refused a reference (a record lost in a failover, say).
    """

    __slots__ = ("_records", "_size")

    def __init__(self, size: int = RECORDED_RESPONSES) -> None:
        self._size = size
        self._records: OrderedDict[tuple[UUID, int, bytes], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def find(self, partner_id: UUID, since: int, items: bytes) -> int | None:
        """The record of ``partner_id`` written under counter row ``since`` with these items, if remembered."""
        key = (partner_id, since, items)
        record_id = self._records.get(key)
        if record_id is not None:
            self._records.move_to_end(key)
        return record_id

    def add(self, partner_id: UUID, since: int, items: bytes, record_id: int) -> None:
        """Remember the committed record ``record_id`` of ``partner_id``, counted under row ``since``."""
        key = (partner_id, since, items)
        self._records[key] = record_id
        self._records.move_to_end(key)
        if len(self._records) > self._size:
            self._records.popitem(last=False)

    def clear(self) -> None:
        """Forget every record."""
        self._records.clear()


class CountedPatients:
    """The patients each partner is known to have been counted for today, under which counter row.

    A partner's patients of the day (``partner_daily_patients``) only grow
    while its counter row for the day stands, and counting a patient counted
    already adds nothing. What the memo holds was read back from committed
    statements (:meth:`add`); once it holds ``size`` patients it starts again
    empty, and a patient it does not hold costs the statement one probe more.
    """

    __slots__ = ("_held", "_known", "_size")

    def __init__(self, size: int = COUNTED_PATIENTS) -> None:
        self._size = size
        self._known: dict[UUID, tuple[int, set[UUID]]] = {}  # partner → (counted_since, patients)
        self._held = 0

    def since(self, partner_id: UUID) -> int | None:
        """The counter row (``counted_since``) the partner's known patients were counted under, if any."""
        known = self._known.get(partner_id)
        return known[0] if known is not None else None

    def unknown(self, partner_id: UUID, patients: Iterable[UUID]) -> list[UUID]:
        """The ``patients`` not known to be counted for ``partner_id``, in order."""
        known = self._known.get(partner_id)
        if known is None:
            return list(patients)
        counted = known[1]
        return [p for p in patients if p not in counted]

    def add(self, partner_id: UUID, since: int | None, patients: Iterable[UUID]) -> None:
        """Remember ``patients`` as counted for ``partner_id`` under the counter row ``since`` (committed)."""
        if self._held >= self._size:
            self._known.clear()
            self._held = 0
        known = self._known.pop(partner_id, None)
        if known is not None and known[0] != since:
            self._held -= len(known[1])
            known = None
        if since is None:  # no counter row: nothing to know
            return
        if known is None:
            known = (since, set())
        counted = known[1]
        before = len(counted)
        counted.update(patients)
        self._held += len(counted) - before
        self._known[partner_id] = known


async def write_basic(
    conn: Connection,
    responses: Sequence[Response],
    terms: Mapping[UUID, models.ChargeTerms],
    counted: CountedPatients | None = None,
    recorded: RecordedResponses | None = None,
    checks: Sequence[Sequence[UUID]] | None = None,
) -> dict[UUID, models.ChargeOutcome]:
    """Charge and record the basic-view responses of many calls in one statement; each partner's charge outcome.

    Each partner in ``terms`` is charged once for all its responses; each
    response with items becomes one record; a partner suspended by its charge
    has none of its responses recorded. Raises :class:`ledger.CapReached` when
    a partner goes over a daily cap, and then nothing at all is counted or
    recorded.

    With ``counted``, only the patients it does not hold are sent to be
    charged, and it learns those of the statement once it returns: the
    statement must commit on its own (no enclosing transaction). With
    ``recorded`` as well, a response repeating a record it holds is recorded
    as a reference, and it learns the records written in full.

    ``checks`` holds per response the practitioners its answer shows when it
    was read on a replica (empty when read on the primary): the statement then
    authorises those answers first, and raises
    :class:`ledger.ReplicaAnswersRefused` for any it does not.
    """
    for entry, _ in responses:
        basic = entry.view == models.View.BASIC and entry.outcome == models.Outcome.DISCLOSED
        if not basic or entry.consent_id is not None:
            raise ValueError("write_basic records disclosed basic views only")
    columns: tuple[list[str], list[str], list[str]] = ([], [], [])  # per response, its items' literals (inner)
    ends: list[int] = []  # per response, the position of its last item
    items_of: list[int | None] = []  # per response, the record it repeats
    digests: list[str | None] = []  # per reference, the SHA-256 of the items it repeats (hex)
    fingerprints: list[bytes | None] = []  # per response written in full, what `recorded` learns it by
    reached: dict[UUID, list[UUID]] = {partner: [] for partner in terms}
    total = 0
    for entry, items in responses:
        ref = printed = None
        if items:
            ids, internal_ids, patient_ids = zip(*items, strict=True)
            strings = (list(ids), list(map(str, internal_ids)), list(map(str, patient_ids)))
            if recorded is not None and counted is not None:
                printed = fingerprint(*strings)
                since = counted.since(entry.partner_id)
                if printed is not None and since is not None:
                    ref = recorded.find(entry.partner_id, since, printed)
            if ref is None:
                for column, values, texts in zip(columns, (ids, internal_ids, patient_ids), strings, strict=True):
                    column.append(ledger.array_literal(values, texts)[1:-1])
                total += len(items)
                if entry.partner_id in reached:
                    reached[entry.partner_id] += patient_ids
        ends.append(total)
        items_of.append(ref)
        digests.append(None if ref is None or printed is None else printed.hex())
        fingerprints.append(printed if ref is None else None)
    charged = ledger.charge_columns(terms)
    since_column: list[int | None] = []
    new_ends: list[int] = []
    new_patients: list[UUID] = []
    for partner in charged[0]:  # the patients to charge: those the memo does not know counted
        known = None if counted is None else counted.since(partner)
        since_column.append(known)
        if counted is not None and known is not None:
            new_patients += counted.unknown(partner, reached[partner])
        new_ends.append(len(new_patients))
    group: list[Sequence[object] | str] = [
        [e.partner_id for e, _ in responses],
        [e.key_id for e, _ in responses],
        [e.rpc for e, _ in responses],
        [e.trace_id for e, _ in responses],
        ends,
        items_of,
        digests,
        *("{" + ",".join(filter(None, column)) + "}" for column in columns),
        *charged,
        since_column,
        new_ends,
        new_patients,
        [e.client_cert for e, _ in responses],
    ]
    try:
        if checks is not None and any(checks):
            rows = await ledger.record_checked_basic(conn, checks, group)
        else:
            rows = await ledger.record_basic(conn, group)
    except ledger.ReferenceRefused:
        if recorded is None:
            raise
        recorded.clear()  # a record it held is not there (a failover lost it, say): write everything in full
        return await write_basic(conn, responses, terms, counted, checks=checks)
    outcomes = {}
    for row in rows:
        outcomes[row.partner_id] = row.outcome
        if counted is not None:
            counted.add(row.partner_id, row.counted_since, reached[row.partner_id])
        if recorded is not None and row.counted_since is not None:
            for (entry, _), printed, record_id in zip(responses, fingerprints, row.record_ids, strict=True):
                if entry.partner_id == row.partner_id and printed is not None and record_id is not None:
                    recorded.add(row.partner_id, row.counted_since, printed, record_id)
    return outcomes


#: A basic-view response to record, with the practitioners its answer shows when read on a replica.
CheckedResponse = tuple[Response, Sequence[UUID]]


class _BasicViews(RecordKind[CheckedResponse, models.ChargeOutcome | None]):
    """Basic-view responses: answered with their partner's charge outcome (``None``: read again on the primary)."""

    def __init__(self, counted: CountedPatients, recorded: RecordedResponses) -> None:
        self._counted = counted
        self._recorded = recorded

    async def write(
        self, conn: Connection, requests: list[CheckedResponse], terms: Mapping[UUID, models.ChargeTerms]
    ) -> list[models.ChargeOutcome | None]:
        responses = [response for response, _ in requests]
        checks = [shown for _, shown in requests]
        outcomes = await write_basic(conn, responses, terms, self._counted, self._recorded, checks)
        return [outcomes[entry.partner_id] for entry, _ in responses]

    def capped(self, cap: models.ChargeOutcome) -> models.ChargeOutcome | None:
        return cap

    def refused(self) -> models.ChargeOutcome | None:
        return None

    def outcome(self, answer: models.ChargeOutcome | None) -> models.ChargeOutcome | None:
        return answer

    def unflagged(self, answer: models.ChargeOutcome | None) -> models.ChargeOutcome | None:
        return models.ChargeOutcome.OK


class _ContactViews(RecordKind[ledger.ContactRequest, models.StoredConsentedContact]):
    """Contact views: answered with the consent's state, the charge's outcome and the released fields."""

    async def write(
        self, conn: Connection, requests: list[ledger.ContactRequest], terms: Mapping[UUID, models.ChargeTerms]
    ) -> list[models.StoredConsentedContact]:
        return await ledger.disclose_contacts(conn, requests, terms)

    def capped(self, cap: models.ChargeOutcome) -> models.StoredConsentedContact:
        return models.StoredConsentedContact(models.ConsentState.LIVE, cap, ())

    def refused(self) -> models.StoredConsentedContact:
        raise AssertionError("contact views are read on the primary, never checked again")

    def outcome(self, answer: models.StoredConsentedContact) -> models.ChargeOutcome | None:
        return answer.charge

    def unflagged(self, answer: models.StoredConsentedContact) -> models.StoredConsentedContact:
        return replace(answer, charge=models.ChargeOutcome.OK)


class DisclosureRecorder:
    """Charges and records partner responses, many calls per statement: basic views and contact views apart.

    ``in_flight`` counts the partner listener's calls in their handlers; with
    it a group waits for those that may still bring records
    (:class:`~service.disclosure.groups.Grouping`), without it groups never hold.
    """

    def __init__(
        self,
        database: Database,
        *,
        budget: float,
        grouping: Grouping | None = None,
        in_flight: CallsInFlight | None = None,
    ) -> None:
        grouping = grouping or Grouping()
        self.counted = CountedPatients()
        self.recorded = RecordedResponses()
        self._basic = GroupWriter(database, budget, _BasicViews(self.counted, self.recorded), grouping, in_flight)
        self._contact = GroupWriter(database, budget, _ContactViews(), grouping, in_flight)

    def expect_basic(self) -> Expected:
        """Announce a basic-view call before its read, so that groups formed meanwhile wait for it."""
        return self._basic.expect()

    def expect_contact(self) -> Expected:
        """Announce a contact-view call before its read, so that groups formed meanwhile wait for it."""
        return self._contact.expect()

    async def record(
        self,
        entry: models.LedgerEntry,
        items: ledger.Items,
        terms: models.ChargeTerms,
        expected: Expected | None = None,
        *,
        shown: Sequence[UUID] = (),
    ) -> models.ChargeOutcome | None:
        """Charge and record one basic-view response; return its charge's outcome once it is durable.

        ``FLAGGED`` is given to one call of the partner's group only, so the
        anomaly is reported once; ``SUSPENDED`` and the caps mean nothing was
        recorded and nothing may be sent. ``shown``: the practitioners of an
        answer read on a replica, which the record statement authorises first;
        ``None`` when it did not (nothing was recorded: read on the primary).
        """
        return await self._basic.submit(entry.partner_id, ((entry, items), shown), terms, expected)

    async def disclose_contact(
        self, request: ledger.ContactRequest, terms: models.ChargeTerms, expected: Expected | None = None
    ) -> models.StoredConsentedContact:
        """Check the consent, charge and record one contact view; return what it releases once durable."""
        return await self._contact.submit(request.entry.partner_id, request, terms, expected)
