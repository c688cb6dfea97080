"""The partner reads, from an admitted call to the response it may send: read → view → record.

Each read is one statement as the partner role
(:mod:`service.store.partner_path`), which verifies the key again, re-checks
the partner's suspension and joins the partner's active grants, so revoking a
key or a grant takes effect on the next call; the appointment reads of
concurrent calls go together, one such call per request in one statement
(:mod:`service.disclosure.named_reads`). The rows become the partner's view
(:mod:`service.disclosure.views`), then the response is recorded
(:mod:`service.disclosure.record`): counted against the partner's limits and
written to the ledger, committed before the response leaves. For a contact
view the record statement also checks the consent and returns the released
fields sealed; they are opened here, the only decryption on the partner path.
Anything the caller may not see answers NOT_FOUND, whatever the reason, and
every refused attempt is recorded too.

With read replicas (:mod:`service.store.replicas`), a basic read runs on one
of them, and the statement that records its answer on the primary first
decides whether the key is still live, the partner not suspended, and every
practitioner the answer shows still granted (migration 0013): an answer it
does not authorise is neither recorded nor sent, and the call reads again on
the primary, which also answers (and records) whatever a replica could not:
nothing found, a refusal, a replica failing. Contact reads run on the primary
only.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from appointments.partner.v1 import appointment_pb2, contact_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import models
from service.access.consent_tokens import ConsentDenial, ConsentDenied, ConsentKeyring
from service.access.gate import PartnerGate
from service.access.limits import PartnerPolicy
from service.crypto import sealing
from service.disclosure import named_reads, pagination, views
from service.disclosure.groups import Expected
from service.disclosure.named_reads import NamedReads
from service.disclosure.pseudonyms import PartnerPseudonyms, Pseudonyms
from service.disclosure.record import DisclosureRecorder, entry
from service.errors import InvalidArgument, NotFound, PermissionDenied
from service.store import ledger, partner_path
from service.store.database import Connection, Database
from service.store.replicas import Replicas
from service.telemetry.tracing import Telemetry, annotate
from service.timestamps import Micros

T = TypeVar("T")

_LIST = "ListAppointments"
_GET = "GetAppointment"
_CONTACT = "GetAppointmentContact"
#: A consent the record statement found not live, as the partner is told.
_DENIALS = {
    models.ConsentState.REVOKED: ConsentDenial.REVOKED,
    models.ConsentState.EXPIRED: ConsentDenial.EXPIRED,
    models.ConsentState.UNKNOWN: ConsentDenial.INVALID,
}


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ListAppointments request."""

    practitioner_id: UUID | None
    start_time: datetime
    end_time: datetime
    page_size: int
    page_token: str

    def filters(self, after: tuple[Micros, UUID] | None) -> dict[str, Any]:
        """The listing statement's filters: this query's, after ``after``, one row more than a page."""
        return {
            "practitioner_id": self.practitioner_id,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "after": after,
            "limit": self.page_size + 1,
        }

    def binding(self, partner_id: UUID) -> bytes:
        """The bytes a page token of this query is bound to: the caller and every filter."""
        practitioner = self.practitioner_id.bytes if self.practitioner_id else b""
        window = struct.pack(">dd", self.start_time.timestamp(), self.end_time.timestamp())
        return b"ListAppointments|" + partner_id.bytes + b"|" + practitioner + b"|" + window


class PartnerReads:
    """Serves the partner's reads of appointments, each with its record."""

    def __init__(
        self,
        database: Database,
        gate: PartnerGate,
        recorder: DisclosureRecorder,
        ids: Pseudonyms,
        page_tokens: pagination.PageTokens,
        pages: views.BasicPages,
        keyring: ConsentKeyring,
        data_keys: sealing.DataKeyring,
        telemetry: Telemetry,
        replicas: Replicas | None = None,
        *,
        budget: float,
    ) -> None:
        """``budget``: the seconds a statement read for many calls at once may take (the default deadline)."""
        self._db = database
        self._replicas = replicas if replicas else None
        self._named = NamedReads(named_reads.on_primary(database), budget=budget)
        self._named_on_replicas = NamedReads(named_reads.on_replicas(replicas), budget=budget) if replicas else None
        self._gate = gate
        self._guard = gate.guard
        self._recorder = recorder
        self._ids = ids
        self._page_tokens = page_tokens
        self._pages = pages
        self._keyring = keyring
        self._data_keys = data_keys
        self._telemetry = telemetry

    async def list_appointments(
        self, principal: models.Principal, policy: PartnerPolicy, query: ListQuery, practitioner_id: str
    ) -> pb.ListAppointmentsResponse:
        """A page of the appointments the partner may see; ``practitioner_id`` as the request spelled it.

        Raises NOT_FOUND for a practitioner the partner may not see (recorded),
        INVALID_ARGUMENT for a page token of another query.
        """
        binding = query.binding(principal.partner_id)
        after = None
        if query.page_token:
            cursor = self._page_tokens.open(query.page_token, binding)
            try:
                after = pagination.unpack_time_cursor(cursor)
            except ValueError as exc:  # sealed by us, so only a format change gets here
                raise InvalidArgument.field("page_token", "unsupported page token") from exc
        response = pb.ListAppointmentsResponse()
        with self._recorder.expect_basic() as expected:
            listed = await self._on_replica(
                lambda conn: partner_path.list_appointments(conn, principal, **query.filters(after))
            )
            rows = None
            if listed:  # a page read on a replica: recorded once the primary authorised it
                rows = await self._record_listing(response, principal, policy, query, listed, expected, checked=True)
            if rows is None:
                listed = await self._listed_rows(principal, query, after, practitioner_id)
                rows = await self._record_listing(response, principal, policy, query, listed, expected, checked=False)
            assert rows is not None  # an answer read on the primary is never refused by its record
        page = rows[: query.page_size]
        self._telemetry.disclosed(models.View.BASIC, len(page))
        if len(rows) > query.page_size:
            last = page[-1]
            response.next_page_token = self._page_tokens.seal(
                pagination.pack_time_cursor(last.start_time, last.id), binding
            )
        return response

    async def get_appointment(
        self, principal: models.Principal, policy: PartnerPolicy, appointment_id: str
    ) -> appointment_pb2.Appointment:
        """The basic view of one appointment; NOT_FOUND (recorded) when the partner may not see it."""
        ids = self._ids.for_partner(principal.partner_id)
        record = entry(principal, _GET, models.View.BASIC)
        terms = self._guard.terms(policy)
        with self._recorder.expect_basic() as expected:
            internal_id = ids.parse_appointment_id(appointment_id)
            found = None
            if self._named_on_replicas is not None:
                found = await self._named_on_replicas.read(principal, internal_id)
            outcome = None
            if found is not None:  # read on a replica: recorded once the primary authorised it
                row = found
                items = [(appointment_id, row.id, row.patient_id)]
                outcome = await self._recorder.record(record, items, terms, expected, shown=(row.practitioner_id,))
            if outcome is None:
                row = await self.named_appointment(principal, ids, appointment_id, _GET, models.View.BASIC)
                items = [(appointment_id, row.id, row.patient_id)]
                outcome = await self._recorder.record(record, items, terms, expected)
                assert outcome is not None  # read on the primary: never refused by its record
            message = views.basic_appointment(row, ids)
        self._guard.settle(principal.partner_id, outcome)
        self._telemetry.disclosed(models.View.BASIC, 1)
        return message

    async def get_contact(
        self, principal: models.Principal, policy: PartnerPolicy, appointment_id: str, consent_token: str
    ) -> contact_pb2.AppointmentContact:
        """The contact view of one appointment: exactly the fields a live consent releases.

        Raises NOT_FOUND as :meth:`get_appointment` does, PERMISSION_DENIED (recorded) for
        a consent that is missing, invalid, expired, revoked or another
        patient's.
        """
        ids = self._ids.for_partner(principal.partner_id)
        consent_id: UUID | None = None
        try:
            with self._recorder.expect_contact() as expected:
                row = await self.named_appointment(principal, ids, appointment_id, _CONTACT, models.View.CONTACT)
                claims = self._keyring.verify(consent_token, partner_id=principal.partner_id, now=datetime.now(UTC))
                try:
                    consent_id = ids.parse_consent_ref(claims.consent_ref)
                except ValueError:
                    raise ConsentDenied(ConsentDenial.INVALID, "bad consent reference") from None
                if claims.patient_ref != ids.patient_ref(row.patient_id):
                    raise ConsentDenied(ConsentDenial.INVALID, "issued for another patient")
                # One statement, shared with concurrent calls, checks the consent, counts and
                # records the disclosure, and returns the released fields sealed.
                stored = await self._recorder.disclose_contact(
                    ledger.ContactRequest(
                        entry(principal, _CONTACT, models.View.CONTACT, consent_id=consent_id),
                        appointment_id,
                        row.id,
                        row.patient_id,
                        claims.fields,
                    ),
                    self._guard.terms(policy),
                    expected,
                )
                if stored.consent is not models.ConsentState.LIVE:
                    raise ConsentDenied(_DENIALS[stored.consent], stored.consent.value)
        except ConsentDenied as denied:
            reason = denied.reason.value
            annotate(view="contact", consent_presented=bool(consent_token), consent_outcome=reason)
            self._telemetry.consent_denials.add(1, {"reason": reason})
            refused = entry(principal, _CONTACT, models.View.CONTACT, denial_reason=reason, consent_id=consent_id)
            async with self._db.partner_statements() as conn:
                await partner_path.record_refusal(conn, principal, refused, [(appointment_id, row.id, row.patient_id)])
            raise PermissionDenied(denied.message, reason=reason) from None
        assert stored.charge is not None
        self._guard.settle(principal.partner_id, stored.charge)
        # Its record is already durable: should opening fail, the ledger holds a disclosure
        # that was not sent (never the reverse).
        contact = sealing.open_consented_contact(self._data_keys, row.patient_id, stored)
        self._telemetry.disclosed(models.View.CONTACT, 1, stored.fields)
        annotate(consent_presented=True, consent_outcome="GRANTED")
        return views.appointment_contact(appointment_id, contact)

    async def _listed_rows(
        self, principal: models.Principal, query: ListQuery, after: tuple[Micros, UUID] | None, practitioner_id: str
    ) -> list[models.BasicAppointment]:
        """The page's rows (one more than the page, to tell whether another follows).

        A practitioner the partner may not see is recorded and answered
        NOT_FOUND; a key revoked or a partner suspended since they were cached
        is refused.
        """
        async with self._db.partner_statements() as conn:
            try:
                return await partner_path.list_appointments(conn, principal, **query.filters(after))
            except partner_path.ReadRefused as refused:
                if refused.refusal is not partner_path.Refusal.NOT_GRANTED:
                    raise self._gate.refused(refused, principal) from None
                denial = entry(principal, _LIST, models.View.BASIC, denial_reason="NOT_FOUND")
                await partner_path.record_refusal(conn, principal, denial, [(practitioner_id, None, None)])
        raise NotFound("practitioner not found")

    async def named_appointment(
        self, principal: models.Principal, ids: PartnerPseudonyms, appointment_id: str, method: str, view: models.View
    ) -> models.BasicAppointment:
        """The appointment the caller named, if it may see it; otherwise the attempt is recorded and NOT_FOUND raised.

        Raises for a key revoked or a partner suspended since they were cached.
        """
        internal_id = ids.parse_appointment_id(appointment_id)
        try:
            row = await self._named.read(principal, internal_id)
        except partner_path.ReadRefused as refused:
            raise self._gate.refused(refused, principal) from None
        if row is None:
            denial = entry(principal, method, view, denial_reason="NOT_FOUND")
            async with self._db.partner_statements() as conn:
                await partner_path.record_refusal(conn, principal, denial, [(appointment_id, None, None)])
        if row is None:
            # No metadata: "does not exist", "not yours" and "no longer granted"
            # must be byte-for-byte the same answer.
            raise NotFound("appointment not found")
        return row

    async def _record_listing(
        self,
        response: pb.ListAppointmentsResponse,
        principal: models.Principal,
        policy: PartnerPolicy,
        query: ListQuery,
        rows: list[models.BasicAppointment],
        expected: Expected,
        *,
        checked: bool,
    ) -> list[models.BasicAppointment] | None:
        """Fill ``response`` with the page of ``rows`` and record it; ``rows``, or ``None`` when refused.

        ``checked``: read on a replica, so the record statement authorises the
        answer first; refused, nothing was recorded and ``response`` is empty again.
        """
        page = rows[: query.page_size]
        if not page:
            return rows
        shown = self._pages.fill(response, page, self._ids.for_partner(principal.partner_id))
        outcome = await self._recorder.record(
            entry(principal, _LIST, models.View.BASIC),
            [(public_id, r.id, r.patient_id) for public_id, r in zip(shown, page, strict=True)],
            self._guard.terms(policy),
            expected,
            shown=sorted({r.practitioner_id for r in page}) if checked else (),
        )
        if outcome is None:
            del response.appointments[:]
            return None
        self._guard.settle(principal.partner_id, outcome)
        return rows

    async def _on_replica(self, read: Callable[[Connection], Awaitable[T]]) -> T | None:
        """What ``read`` answers on a replica within the lag bound; ``None`` when there is none, or it failed there.

        A refusal on a lagging copy, a recovery conflict, a replica gone: the primary answers instead.
        """
        if self._replicas is None:
            return None
        replicated = await self._replicas.read(read)
        return None if replicated is None else replicated.value
