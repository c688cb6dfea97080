"""WatchAppointments: the change feed, replayed from a resume token and then live from the hub.

Each batch is delivered the way a read discloses: the key and the grants
are checked again, the ledger records it and the usage is counted, in one
transaction that commits before the events are sent. Events are built by
the same view code as ``ListAppointments``.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import grpc.aio
from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import auth, models, pagination, validation, views
from service.errors import FieldViolation, NotFound, OutOfRange, PermissionDenied, Unauthenticated
from service.extraction import SUSPENDED
from service.feed import FeedHub, Subscription
from service.partner_gate import PartnerGate
from service.pseudonyms import Pseudonyms
from service.store import feed as store_feed
from service.store import ledger, partners
from service.store.database import PARTNER_ROLE, Database
from service.telemetry import Telemetry, annotate

_POSITION = struct.Struct(">q")
_REPLAY_BATCH = 500


class AppointmentFeed:
    """Serves ``WatchAppointments`` streams for :class:`~service.partner_api.PartnerAppointmentApi`."""

    def __init__(
        self,
        database: Database,
        gate: PartnerGate,
        pseudonyms: Pseudonyms,
        page_tokens: pagination.PageTokens,
        hub: FeedHub,
        telemetry: Telemetry,
    ) -> None:
        self._db = database
        self._gate = gate
        self._pseudonyms = pseudonyms
        self._page_tokens = page_tokens
        self._hub = hub
        self._telemetry = telemetry

    async def watch(
        self, request: pb.WatchAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AppointmentChange]:
        problems: list[FieldViolation] = []
        practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems, required=False)
        validation.raise_if(problems)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        async with self._db.transaction(role=PARTNER_ROLE) as conn:
            principal, _ = await self._gate.authenticate(conn, token, key_id)
            granted = await store_feed.granted_practitioners(conn, principal.partner_id)
            head, pruned = await store_feed.head(conn)
            if practitioner is not None and practitioner not in granted:
                entry = self._gate.entry(principal, "WatchAppointments", ledger.VIEW_BASIC, denial_reason="NOT_FOUND")
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
            policy = self._gate.guard.policy(overrides)
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
            if messages and not await self._gate.guard.charge(conn, principal.partner_id, policy, patients):
                suspended = True
            else:
                await ledger.append(
                    conn,
                    self._gate.entry(principal, "WatchAppointments", ledger.VIEW_BASIC),
                    [
                        (m.appointment.appointment_id, c.appointment.id, c.appointment.patient_id)
                        for m, c in zip(messages, allowed, strict=True)
                    ],
                )
        if suspended:
            raise SUSPENDED
        self._gate.disclosed("basic", len(messages))
        return messages
