"""The partner servicer: validate → authenticate → authorize and query → audit → view.

Each read is one statement as the partner-path database role (migration
0013), which re-checks the key and the partner's suspension and joins the
caller's active grants, so revoking a key or a grant takes effect on the next
call; then the record, which counts the response against the partner's
limits and writes its ledger record, and commits before the response leaves:
no data is sent unless its audit record is durable. Responses are recorded
together with those of concurrent calls (:mod:`service.recorder`, one commit
for all); for a contact view, that statement also checks the consent and
returns the released fields. Anything the caller may not see answers
NOT_FOUND, whatever the reason, and every refused attempt is recorded too.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import grpc.aio
from appointments.partner.v1 import (
    appointment_pb2,
    contact_pb2,
)
from appointments.partner.v1 import (
    partner_appointment_service_pb2 as pb,
)
from appointments.partner.v1 import (
    partner_appointment_service_pb2_grpc as pb_grpc,
)

from service import auth, models, pagination, sealing, validation, views
from service.consent import (
    CONSENT_EXPIRED,
    CONSENT_INVALID,
    CONSENT_REVOKED,
    ConsentDenied,
    ConsentKeyring,
)
from service.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from service.extraction import SUSPENDED
from service.partner_gate import PartnerGate
from service.pseudonyms import PartnerPseudonyms, Pseudonyms, looks_like_appointment_id
from service.recorder import DisclosureRecorder
from service.store import consents, ledger, partner_reads
from service.store.database import PARTNER_ROLE, Database
from service.telemetry import Telemetry, annotate
from service.timestamps import Micros
from service.watch_api import AppointmentFeed

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_WINDOW = timedelta(days=366)


_CONSENT_STATES = {"revoked": CONSENT_REVOKED, "expired": CONSENT_EXPIRED, "unknown": CONSENT_INVALID}


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ListAppointments request."""

    practitioner_id: UUID | None
    start_time: datetime
    end_time: datetime
    page_size: int
    page_token: str

    def binding(self, partner_id: UUID) -> bytes:
        """The bytes a page token of this query is bound to: the caller and every filter."""
        practitioner = self.practitioner_id.bytes if self.practitioner_id else b""
        window = struct.pack(">dd", self.start_time.timestamp(), self.end_time.timestamp())
        return b"ListAppointments|" + partner_id.bytes + b"|" + practitioner + b"|" + window


def parse_list_request(request: pb.ListAppointmentsRequest) -> ListQuery:
    """Validate a ListAppointments request. Raises :class:`InvalidArgument` naming every bad field."""
    problems: list[FieldViolation] = []
    practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems, required=False)
    start = validation.timestamp(request, "start_time", problems)
    end = validation.timestamp(request, "end_time", problems)
    validation.window(start, end, problems, max_length=MAX_WINDOW)
    try:
        size = pagination.page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    except InvalidArgument as exc:
        problems.extend(exc.violations)
        size = 0
    validation.raise_if(problems)
    assert start is not None and end is not None
    return ListQuery(practitioner, start, end, size, request.page_token)


def _check_appointment_id(value: str) -> None:
    if not value:
        raise InvalidArgument.field("appointment_id", "is required")
    if not looks_like_appointment_id(value):
        raise InvalidArgument.field("appointment_id", "not an appointment id")


class PartnerAppointmentApi(pb_grpc.PartnerAppointmentServiceServicer):
    """Serves ``appointments.partner.v1.PartnerAppointmentService``."""

    def __init__(
        self,
        database: Database,
        gate: PartnerGate,
        pseudonyms: Pseudonyms,
        page_tokens: pagination.PageTokens,
        keyring: ConsentKeyring,
        telemetry: Telemetry,
        data_keys: sealing.DataKeyring,
        feed: AppointmentFeed,
        recorder: DisclosureRecorder,
        pages: views.BasicPages,
    ) -> None:
        self._db = database
        self._pages = pages
        self._recorder = recorder
        self._gate = gate
        self._guard = gate.guard
        self._data_keys = data_keys
        self._pseudonyms = pseudonyms
        self._page_tokens = page_tokens
        self._keyring = keyring
        self._telemetry = telemetry
        self._feed = feed

    async def ListAppointments(
        self, request: pb.ListAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAppointmentsResponse:
        query = parse_list_request(request)
        token = auth.bearer_token(context.invocation_metadata())
        principal, policy = await self._gate.admit(token, auth.partner_key_id(token))
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
            rows = await self._listed_rows(principal, query, after, request.practitioner_id)
            page = rows[: query.page_size]
            if page:
                shown = self._pages.fill(response, page, self._pseudonyms.for_partner(principal.partner_id))
                outcome = await self._recorder.record(
                    self._gate.entry(principal, "ListAppointments", ledger.VIEW_BASIC),
                    [(public_id, r.id, r.patient_id) for public_id, r in zip(shown, page, strict=True)],
                    self._guard.terms(policy),
                    expected,
                )
                if not self._guard.settle(principal.partner_id, outcome):
                    raise SUSPENDED  # committed (the suspension sticks), nothing recorded or sent
        self._gate.disclosed("basic", len(page))
        if len(rows) > query.page_size:
            last = page[-1]
            response.next_page_token = self._page_tokens.seal(
                pagination.pack_time_cursor(last.start_time, last.id), binding
            )
        return response

    async def _listed_rows(
        self,
        principal: auth.Principal,
        query: ListQuery,
        after: tuple[Micros, UUID] | None,
        practitioner_id: str,
    ) -> list[models.BasicAppointment]:
        """The page's rows (one more than the page, to tell whether another follows).

        A practitioner the partner may not see is recorded and answered
        NOT_FOUND; a key revoked or a partner suspended since they were cached
        is refused.
        """
        async with self._db.partner_statements() as conn:
            try:
                return await partner_reads.list_appointments(
                    conn,
                    key_id=principal.key_id,
                    partner_id=principal.partner_id,
                    practitioner_id=query.practitioner_id,
                    start_time=query.start_time,
                    end_time=query.end_time,
                    after=after,
                    limit=query.page_size + 1,
                )
            except partner_reads.Refusal as refusal:
                if refusal.kind != partner_reads.NOT_GRANTED:
                    raise self._gate.refused(refusal, principal) from None
                entry = self._gate.entry(principal, "ListAppointments", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(practitioner_id, None, None)])
        raise NotFound("practitioner not found")

    async def _named_appointment(
        self, principal: auth.Principal, ids: PartnerPseudonyms, appointment_id: str, rpc: str, view: int
    ) -> models.BasicAppointment:
        """The appointment the caller named, if it may see it; otherwise the attempt is recorded and NOT_FOUND raised.

        Raises for a key revoked or a partner suspended since they were cached.
        """
        async with self._db.partner_statements() as conn:
            try:
                row = await partner_reads.get_appointment(
                    conn,
                    key_id=principal.key_id,
                    partner_id=principal.partner_id,
                    appointment_id=ids.parse_appointment_id(appointment_id),
                )
            except partner_reads.Refusal as refusal:
                raise self._gate.refused(refusal, principal) from None
            if row is None:
                entry = self._gate.entry(principal, rpc, view, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(appointment_id, None, None)])
        if row is None:
            # No metadata: "does not exist", "not yours" and "no longer granted"
            # must be byte-for-byte the same answer.
            raise NotFound("appointment not found")
        return row

    async def GetAppointment(
        self, request: pb.GetAppointmentRequest, context: grpc.aio.ServicerContext
    ) -> appointment_pb2.Appointment:
        _check_appointment_id(request.appointment_id)
        token = auth.bearer_token(context.invocation_metadata())
        principal, policy = await self._gate.admit(token, auth.partner_key_id(token))
        ids = self._pseudonyms.for_partner(principal.partner_id)
        with self._recorder.expect_basic() as expected:
            row = await self._named_appointment(
                principal, ids, request.appointment_id, "GetAppointment", ledger.VIEW_BASIC
            )
            message = views.basic_appointment(row, ids)
            outcome = await self._recorder.record(
                self._gate.entry(principal, "GetAppointment", ledger.VIEW_BASIC),
                [(request.appointment_id, row.id, row.patient_id)],
                self._guard.terms(policy),
                expected,
            )
        if not self._guard.settle(principal.partner_id, outcome):
            raise SUSPENDED
        self._gate.disclosed("basic", 1)
        return message

    async def GetAppointmentContact(
        self, request: pb.GetAppointmentContactRequest, context: grpc.aio.ServicerContext
    ) -> contact_pb2.AppointmentContact:
        _check_appointment_id(request.appointment_id)
        token = auth.bearer_token(context.invocation_metadata())
        principal, policy = await self._gate.admit(token, auth.partner_key_id(token))
        ids = self._pseudonyms.for_partner(principal.partner_id)
        rpc = "GetAppointmentContact"
        consent_id: UUID | None = None
        try:
            with self._recorder.expect_contact() as expected:
                row = await self._named_appointment(principal, ids, request.appointment_id, rpc, ledger.VIEW_CONTACT)
                claims = self._keyring.verify(
                    request.consent_token, partner_id=principal.partner_id, now=datetime.now(UTC)
                )
                consent_id = claims.consent_id
                if claims.patient_id != row.patient_id:
                    raise ConsentDenied(CONSENT_INVALID, "issued for another patient")
                # One statement, shared with concurrent calls, checks the consent, counts and
                # records the disclosure, and returns the released fields sealed.
                stored = await self._recorder.disclose_contact(
                    consents.ContactRequest(
                        self._gate.entry(principal, rpc, ledger.VIEW_CONTACT, consent_id=consent_id),
                        request.appointment_id,
                        row.id,
                        row.patient_id,
                        claims.fields,
                    ),
                    self._guard.terms(policy),
                    expected,
                )
                if stored.state in _CONSENT_STATES:
                    raise ConsentDenied(_CONSENT_STATES[stored.state], stored.state)
        except ConsentDenied as denied:
            annotate(view="contact", consent_presented=bool(request.consent_token), consent_outcome=denied.reason)
            self._telemetry.consent_denials.add(1, {"reason": denied.reason})
            entry = self._gate.entry(
                principal, rpc, ledger.VIEW_CONTACT, denial_reason=denied.reason, consent_id=consent_id
            )
            async with self._db.partner_statements() as conn:
                await ledger.append(conn, entry, [(request.appointment_id, row.id, row.patient_id)])
            raise PermissionDenied(denied.message, reason=denied.reason) from None
        if not self._guard.settle(principal.partner_id, stored.state):
            raise SUSPENDED  # committed (the suspension sticks), nothing recorded or sent
        # The only decryption on the partner path: the fields a live consent released. Its
        # record is already durable: should opening fail, the ledger holds a disclosure
        # that was not sent (never the reverse).
        contact = sealing.open_consented_contact(self._data_keys, row.patient_id, stored)
        self._gate.disclosed("contact", 1, stored.fields)
        annotate(consent_presented=True, consent_outcome="GRANTED")
        return views.appointment_contact(request.appointment_id, contact, stored.fields)

    def WatchAppointments(
        self, request: pb.WatchAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AppointmentChange]:
        return self._feed.watch(request, context)

    async def ListConsentKeys(
        self, request: pb.ListConsentKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentKeysResponse:
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        async with self._db.transaction(role=PARTNER_ROLE, readonly=True) as conn:
            await self._gate.authenticate(conn, token, key_id)
        active = self._keyring.active_key_id
        return pb.ListConsentKeysResponse(
            keys=[views.consent_key(key, active=key.key_id == active) for key in self._keyring.public_keys()]
        )
