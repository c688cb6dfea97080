"""The partner servicer: validate → authenticate → authorize and query → audit → view.

Each call runs in one transaction, as the partner-path database role, whose
statements join the caller's active grants: revoking a key or a grant takes
effect on the next call. Anything the caller may not see answers NOT_FOUND,
whatever the reason. Every disclosure, and every refused attempt, is written
to the ledger in the same transaction, which commits before the response
leaves: no data is sent unless its audit record is durable.
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

from service import auth, pagination, sealing, validation, views
from service.consent import (
    CONSENT_EXPIRED,
    CONSENT_INVALID,
    CONSENT_REVOKED,
    ConsentDenied,
    ConsentKeyring,
)
from service.errors import (
    ApptgateError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from service.extraction import SUSPENDED
from service.partner_gate import PartnerGate
from service.pseudonyms import Pseudonyms, looks_like_appointment_id
from service.store import consents, ledger, partner_reads
from service.store.database import PARTNER_ROLE, Database
from service.telemetry import Telemetry, annotate
from service.watch_api import AppointmentFeed

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_WINDOW = timedelta(days=366)


class PartnerSuspended(Exception):
    """Internal signal: the call just suspended its partner (commit, send nothing)."""


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
    ) -> None:
        self._db = database
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
        key_id = auth.partner_key_id(token)
        failure: ApptgateError | None = None
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            principal, policy = await self._gate.authenticate(conn, token, key_id)
            binding = query.binding(principal.partner_id)
            after = None
            if query.page_token:
                cursor = self._page_tokens.open(query.page_token, binding)
                try:
                    after = pagination.unpack_time_cursor(cursor)
                except ValueError as exc:  # sealed by us, so only a format change gets here
                    raise InvalidArgument.field("page_token", "unsupported page token") from exc
            rows = await partner_reads.list_appointments(
                conn,
                partner_id=principal.partner_id,
                practitioner_id=query.practitioner_id,
                start_time=query.start_time,
                end_time=query.end_time,
                after=after,
                limit=query.page_size + 1,
            )
            page = rows[: query.page_size]
            if (
                not rows
                and query.practitioner_id is not None
                and not await partner_reads.is_granted(conn, principal.partner_id, query.practitioner_id)
            ):
                failure = NotFound("practitioner not found")
                entry = self._gate.entry(principal, "ListAppointments", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(request.practitioner_id, None, None)])
            elif not await self._guard.charge(conn, principal.partner_id, policy, [row.patient_id for row in page]):
                failure = SUSPENDED  # committed (the suspension must stick), nothing sent
            else:
                ids = self._pseudonyms.for_partner(principal.partner_id)
                messages = [views.basic_appointment(row, ids) for row in page]
                await ledger.append(
                    conn,
                    self._gate.entry(principal, "ListAppointments", ledger.VIEW_BASIC),
                    [(m.appointment_id, row.id, row.patient_id) for m, row in zip(messages, page, strict=True)],
                )
                self._gate.disclosed("basic", len(messages))
        if failure is not None:
            raise failure
        response = pb.ListAppointmentsResponse(appointments=messages)
        if len(rows) > query.page_size:
            last = page[-1]
            response.next_page_token = self._page_tokens.seal(
                pagination.pack_time_cursor(last.start_time, last.id), binding
            )
        return response

    async def GetAppointment(
        self, request: pb.GetAppointmentRequest, context: grpc.aio.ServicerContext
    ) -> appointment_pb2.Appointment:
        _check_appointment_id(request.appointment_id)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        failure: ApptgateError | None = None
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            principal, policy = await self._gate.authenticate(conn, token, key_id)
            ids = self._pseudonyms.for_partner(principal.partner_id)
            appointment_id = ids.parse_appointment_id(request.appointment_id)
            row = await partner_reads.get_appointment(conn, principal.partner_id, appointment_id)
            if row is None:
                # No metadata: "does not exist", "not yours" and "no longer granted"
                # must be byte-for-byte the same answer.
                failure = NotFound("appointment not found")
                entry = self._gate.entry(principal, "GetAppointment", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(request.appointment_id, None, None)])
            elif not await self._guard.charge(conn, principal.partner_id, policy, [row.patient_id]):
                failure = SUSPENDED
            else:
                message = views.basic_appointment(row, ids)
                entry = self._gate.entry(principal, "GetAppointment", ledger.VIEW_BASIC)
                await ledger.append(conn, entry, [(request.appointment_id, row.id, row.patient_id)])
                self._gate.disclosed("basic", 1)
        if failure is not None:
            raise failure
        return message

    async def GetAppointmentContact(
        self, request: pb.GetAppointmentContactRequest, context: grpc.aio.ServicerContext
    ) -> contact_pb2.AppointmentContact:
        _check_appointment_id(request.appointment_id)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        failure: ApptgateError | None = None
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            principal, policy = await self._gate.authenticate(conn, token, key_id)
            ids = self._pseudonyms.for_partner(principal.partner_id)
            row = await partner_reads.get_appointment(
                conn, principal.partner_id, ids.parse_appointment_id(request.appointment_id)
            )
            if row is None:
                failure = NotFound("appointment not found")
                entry = self._gate.entry(
                    principal,
                    "GetAppointmentContact",
                    ledger.VIEW_CONTACT,
                    denial_reason="NOT_FOUND",
                )
                await ledger.append(conn, entry, [(request.appointment_id, None, None)])
            else:
                item = [(request.appointment_id, row.id, row.patient_id)]
                consent_id: UUID | None = None
                try:
                    claims = self._keyring.verify(
                        request.consent_token, partner_id=principal.partner_id, now=datetime.now(UTC)
                    )
                    consent_id = claims.consent_id
                    if claims.patient_id != row.patient_id:
                        raise ConsentDenied(CONSENT_INVALID, "issued for another patient")
                    stored = await consents.read_consented_contact(
                        conn, claims.consent_id, principal.partner_id, row.patient_id
                    )
                    if stored.state != "live":
                        raise ConsentDenied(_CONSENT_STATES.get(stored.state, CONSENT_INVALID), stored.state)
                    fields = sorted(set(claims.fields) & set(stored.fields))
                    if not await self._guard.charge(conn, principal.partner_id, policy, [row.patient_id], contacts=1):
                        raise PartnerSuspended
                    # The only decryption on the partner path: the fields a live consent released.
                    contact = sealing.open_consented_contact(self._data_keys, row.patient_id, stored)
                    message = views.appointment_contact(request.appointment_id, contact, fields)
                    entry = self._gate.entry(
                        principal,
                        "GetAppointmentContact",
                        ledger.VIEW_CONTACT,
                        contact_fields=fields,
                        consent_id=claims.consent_id,
                    )
                    await ledger.append(conn, entry, item)
                    self._gate.disclosed("contact", 1, fields)
                    annotate(consent_presented=True, consent_outcome="GRANTED")
                except PartnerSuspended:
                    failure = SUSPENDED
                except ConsentDenied as denied:
                    annotate(
                        view="contact", consent_presented=bool(request.consent_token), consent_outcome=denied.reason
                    )
                    self._telemetry.consent_denials.add(1, {"reason": denied.reason})
                    failure = PermissionDenied(denied.message, reason=denied.reason)
                    entry = self._gate.entry(
                        principal,
                        "GetAppointmentContact",
                        ledger.VIEW_CONTACT,
                        denial_reason=denied.reason,
                        consent_id=consent_id,
                    )
                    await ledger.append(conn, entry, item)
        if failure is not None:
            raise failure
        return message

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
