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
from collections.abc import AsyncIterator, Sequence
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
    CONTACT_FIELDS,
    ConsentDenied,
    ConsentKeyring,
)
from service.errors import (
    ApptgateError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)
from service.extraction import SUSPENDED, ExtractionGuard
from service.feed import FeedHub, Subscription
from service.limits import PartnerPolicy
from service.pseudonyms import Pseudonyms, looks_like_appointment_id
from service.store import consents, ledger, partner_reads, partners
from service.store import feed as store_feed
from service.store.database import PARTNER_ROLE, Connection, Database
from service.telemetry import Telemetry, annotate, current_trace_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_WINDOW = timedelta(days=366)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PartnerAppointmentService"].full_name
_RPC_PREFIX = f"/{SERVICE_NAME}/"
_POSITION = struct.Struct(">q")


class PartnerSuspended(Exception):
    """Internal signal: the call just suspended its partner (commit, send nothing)."""


_REPLAY_BATCH = 500
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
        pseudonyms: Pseudonyms,
        page_tokens: pagination.PageTokens,
        keyring: ConsentKeyring,
        telemetry: Telemetry,
        hub: FeedHub,
        data_keys: sealing.DataKeyring,
        guard: ExtractionGuard,
    ) -> None:
        self._db = database
        self._guard = guard
        self._data_keys = data_keys
        self._pseudonyms = pseudonyms
        self._page_tokens = page_tokens
        self._keyring = keyring
        self._telemetry = telemetry
        self._hub = hub

    async def _authenticate(self, conn: Connection, token: str, key_id: str) -> tuple[auth.Principal, PartnerPolicy]:
        """Verify the key, then refuse a suspended or too eager partner; return who calls and its limits."""
        key, overrides = await partners.authenticate_key(conn, key_id)
        principal = auth.verify_partner_key(token, key)
        annotate(partner_id=str(principal.partner_id), key_id=principal.key_id)
        policy = self._guard.policy(overrides)
        self._guard.admit(principal.partner_id, policy)
        return principal, policy

    def _disclosed(self, view: str, count: int, fields: Sequence[int] = ()) -> None:
        annotate(view=view, appointments=count)
        if view == "basic":
            self._telemetry.disclosures.add(count, {"view": view, "contact_field": "none"})
        for number in fields:
            self._telemetry.disclosures.add(count, {"view": view, "contact_field": CONTACT_FIELDS[number]})

    @staticmethod
    def _entry(
        principal: auth.Principal,
        rpc: str,
        view: int,
        *,
        denial_reason: str = "",
        contact_fields: Sequence[int] = (),
        consent_id: UUID | None = None,
    ) -> ledger.Entry:
        """The ledger entry of this call; a ``denial_reason`` marks a refused attempt."""
        return ledger.Entry(
            principal.partner_id,
            principal.key_id,
            _RPC_PREFIX + rpc,
            current_trace_id(),
            view,
            outcome=ledger.OUTCOME_DENIED if denial_reason else ledger.OUTCOME_DISCLOSED,
            denial_reason=denial_reason,
            contact_fields=contact_fields,
            consent_id=consent_id,
        )

    async def ListAppointments(
        self, request: pb.ListAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAppointmentsResponse:
        query = parse_list_request(request)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        failure: ApptgateError | None = None
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            principal, policy = await self._authenticate(conn, token, key_id)
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
                entry = self._entry(principal, "ListAppointments", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(request.practitioner_id, None, None)])
            elif not await self._guard.charge(conn, principal.partner_id, policy, [row.patient_id for row in page]):
                failure = SUSPENDED  # committed (the suspension must stick), nothing sent
            else:
                ids = self._pseudonyms.for_partner(principal.partner_id)
                messages = [views.basic_appointment(row, ids) for row in page]
                await ledger.append(
                    conn,
                    self._entry(principal, "ListAppointments", ledger.VIEW_BASIC),
                    [(m.appointment_id, row.id, row.patient_id) for m, row in zip(messages, page, strict=True)],
                )
                self._disclosed("basic", len(messages))
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
            principal, policy = await self._authenticate(conn, token, key_id)
            ids = self._pseudonyms.for_partner(principal.partner_id)
            appointment_id = ids.parse_appointment_id(request.appointment_id)
            row = await partner_reads.get_appointment(conn, principal.partner_id, appointment_id)
            if row is None:
                # No metadata: "does not exist", "not yours" and "no longer granted"
                # must be byte-for-byte the same answer.
                failure = NotFound("appointment not found")
                entry = self._entry(principal, "GetAppointment", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(request.appointment_id, None, None)])
            elif not await self._guard.charge(conn, principal.partner_id, policy, [row.patient_id]):
                failure = SUSPENDED
            else:
                message = views.basic_appointment(row, ids)
                entry = self._entry(principal, "GetAppointment", ledger.VIEW_BASIC)
                await ledger.append(conn, entry, [(request.appointment_id, row.id, row.patient_id)])
                self._disclosed("basic", 1)
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
            principal, policy = await self._authenticate(conn, token, key_id)
            ids = self._pseudonyms.for_partner(principal.partner_id)
            row = await partner_reads.get_appointment(
                conn, principal.partner_id, ids.parse_appointment_id(request.appointment_id)
            )
            if row is None:
                failure = NotFound("appointment not found")
                entry = self._entry(
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
                    entry = self._entry(
                        principal,
                        "GetAppointmentContact",
                        ledger.VIEW_CONTACT,
                        contact_fields=fields,
                        consent_id=claims.consent_id,
                    )
                    await ledger.append(conn, entry, item)
                    self._disclosed("contact", 1, fields)
                    annotate(consent_presented=True, consent_outcome="GRANTED")
                except PartnerSuspended:
                    failure = SUSPENDED
                except ConsentDenied as denied:
                    annotate(
                        view="contact", consent_presented=bool(request.consent_token), consent_outcome=denied.reason
                    )
                    self._telemetry.consent_denials.add(1, {"reason": denied.reason})
                    failure = PermissionDenied(denied.message, reason=denied.reason)
                    entry = self._entry(
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

    async def WatchAppointments(
        self, request: pb.WatchAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AppointmentChange]:
        problems: list[FieldViolation] = []
        practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems, required=False)
        validation.raise_if(problems)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            principal, _ = await self._authenticate(conn, token, key_id)
            granted = await store_feed.granted_practitioners(conn, principal.partner_id)
            head, pruned = await store_feed.head(conn)
            if practitioner is not None and practitioner not in granted:
                entry = self._entry(principal, "WatchAppointments", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
                await ledger.append(conn, entry, [(request.practitioner_id, None, None)])
        binding = b"WatchAppointments|" + principal.partner_id.bytes
        resume = None
        if request.resume_token:
            resume = _POSITION.unpack(self._page_tokens.open(request.resume_token, binding, field="resume_token"))[0]
            if resume < pruned:
                raise OutOfRange(
                    "the resume token is older than the change feed's retention window: "
                    "list the appointments again, then watch without a token",
                    reason="RESUME_TOKEN_EXPIRED",
                )
        if practitioner is not None and practitioner not in granted:
            raise NotFound("practitioner not found")
        if practitioner is None and not granted:
            raise PermissionDenied("no practitioner grants the caller access", reason="NO_GRANTS")
        annotate(view="basic")
        sub = self._hub.subscribe(principal.partner_id, principal.key_id, practitioner, granted)
        self._telemetry.active_streams.add(1)
        try:
            # Headers now tell the caller the stream is live: changes from here on reach it.
            await context.send_initial_metadata(())
            # "From now" is the database's head, which the hub may not have read yet.
            cursor = max(head, sub.start_position) if resume is None else min(resume, sub.start_position)
            while cursor < sub.start_position:  # replay what committed before the subscription
                async with self._db.transaction(role=PARTNER_ROLE, readonly=True) as conn:
                    await partners.bind_partner(conn, principal.partner_id)
                    batch = await store_feed.changes(
                        conn,
                        after=cursor,
                        upto=sub.start_position,
                        limit=_REPLAY_BATCH,
                        practitioners=list(sub.watched),
                    )
                for message in await self._deliver(principal, sub, batch, binding):
                    yield message
                cursor = batch[-1].position if len(batch) == _REPLAY_BATCH else sub.start_position
            while True:  # then live, from the hub's shared ring
                batch, upto = self._hub.pending(sub, cursor)
                if batch:
                    for message in await self._deliver(principal, sub, batch, binding):
                        yield message
                cursor = upto
                if not batch:
                    await sub.wait()
        finally:
            self._hub.unsubscribe(sub)
            self._telemetry.active_streams.add(-1)

    async def _deliver(
        self, principal: auth.Principal, sub: Subscription, batch: list[models.FeedChange], binding: bytes
    ) -> list[pb.AppointmentChange]:
        """Check the key and grants again, audit, and build the events: in one transaction, before sending."""
        if not batch:
            return []
        suspended = False
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            key, overrides = await partners.authenticate_key(conn, principal.key_id)
            if key is None or key.revoke_time is not None:
                raise Unauthenticated("the key was revoked")
            policy = self._guard.policy(overrides)
            if policy.suspended:
                raise SUSPENDED
            granted = await store_feed.granted_practitioners(conn, principal.partner_id)
            if sub.practitioner_id is not None and sub.practitioner_id not in granted:
                raise PermissionDenied("the practitioner revoked access", reason="ACCESS_REVOKED")
            if not granted:
                raise PermissionDenied("no practitioner grants access any more", reason="ACCESS_REVOKED")
            ids = self._pseudonyms.for_partner(principal.partner_id)
            allowed = [c for c in batch if c.appointment.practitioner_id in granted & sub.watched]
            messages = [
                pb.AppointmentChange(
                    change_type=change.change_type,  # type: ignore[arg-type]
                    appointment=views.basic_appointment(change.appointment, ids),
                    resume_token=self._page_tokens.seal(_POSITION.pack(change.position), binding),
                )
                for change in allowed
            ]
            patients = [c.appointment.patient_id for c in allowed]
            if messages and not await self._guard.charge(conn, principal.partner_id, policy, patients):
                suspended = True
            else:
                await ledger.append(
                    conn,
                    self._entry(principal, "WatchAppointments", ledger.VIEW_BASIC),
                    [
                        (m.appointment.appointment_id, c.appointment.id, c.appointment.patient_id)
                        for m, c in zip(messages, allowed, strict=True)
                    ],
                )
        if suspended:
            raise SUSPENDED
        self._disclosed("basic", len(messages))
        return messages

    async def ListConsentKeys(
        self, request: pb.ListConsentKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentKeysResponse:
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        async with self._db.transaction(role=PARTNER_ROLE, readonly=True) as conn:
            await self._authenticate(conn, token, key_id)
        active = self._keyring.active_key_id
        return pb.ListConsentKeysResponse(
            keys=[views.consent_key(key, active=key.key_id == active) for key in self._keyring.public_keys()]
        )
