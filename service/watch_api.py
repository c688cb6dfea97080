"""WatchAppointments: the change feed, replayed from a resume token and then live from the hub.

Each batch is delivered the way a read discloses: the key and the grants
are checked again, the ledger records it and the usage is counted, in a
transaction that commits before the events are sent. The streams woken by
the same change share that transaction (:class:`_FanoutLedger`), so a change
watched by 1,000 streams costs one transaction, not 1,000. Events are built
by the same view code as ``ListAppointments``.
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from uuid import UUID

import grpc.aio
from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import auth, models, pagination, validation, views
from service.errors import (
    ApptgateError,
    FieldViolation,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
)
from service.extraction import SUSPENDED, ExtractionGuard
from service.feed import FeedHub, Subscription
from service.limits import PartnerPolicy
from service.partner_gate import PartnerGate
from service.pseudonyms import Pseudonyms
from service.store import feed as store_feed
from service.store import ledger, partners
from service.store.database import PARTNER_ROLE, Database
from service.telemetry import Telemetry, annotate

_POSITION = struct.Struct(">q")
_REPLAY_BATCH = 500
#: Most changes audited in one transaction, over all its deliveries (a bound on its size, not a
#: wait); a delivery larger than this (a replay batch is at most 500) still goes alone.
_GROUP_CHANGES = 20_000


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
        self._ledger = _FanoutLedger(database, gate, pseudonyms, page_tokens)

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
        """Check the key and grants again, audit, and build the events, committed before anything is sent.

        The streams woken by one change are audited together (see :class:`_FanoutLedger`).
        """
        if not batch:
            return []
        entry = self._gate.entry(principal, "WatchAppointments", ledger.VIEW_BASIC)
        messages = await self._ledger.deliver(_Delivery(principal, sub, batch, binding, entry))
        self._gate.disclosed("basic", len(messages))
        return messages


@dataclass(eq=False)
class _Delivery:
    """One stream's batch of changes waiting for its audit records."""

    principal: auth.Principal
    sub: Subscription
    batch: list[models.FeedChange]
    binding: bytes
    entry: ledger.Entry
    future: asyncio.Future[list[pb.AppointmentChange]] = field(init=False)


class _CapReached(Exception):
    """Partners reached a daily cap while a group was charged: roll the group back, retry without them."""

    def __init__(self, refusals: dict[UUID, ApptgateError]) -> None:
        super().__init__(len(refusals))
        self.refusals = refusals


def _refusal(guard: ExtractionGuard, partner_id: UUID, outcome: str) -> ApptgateError:
    """The error :meth:`ExtractionGuard.settle` answers a cap outcome with."""
    try:
        guard.settle(partner_id, outcome)
    except ApptgateError as error:
        return error
    raise AssertionError(f"not a cap outcome: {outcome}")


class _FanoutLedger:
    """Audits the deliveries of many streams in one transaction (group commit).

    One change watched by 1,000 streams wakes them all at once; each hands its
    batch here and waits. One task takes every delivery queued so far and, in
    one transaction of two statements whatever its size, re-reads the keys,
    the partners' limits and the grants of every partner concerned, then
    charges each partner's usage once for all its streams and appends the
    ledger record of every stream (``ledger.record_many``, the statement basic
    reads are recorded with too); when it has committed, each stream gets its
    events and sends them. Deliveries queued meanwhile form the next group.
    The checks and the guarantee are those of a stream auditing alone — the
    key and the grants are re-checked in the transaction that records the
    delivery, which commits before anything is sent. A partner over a daily
    cap rolls the group back; it is retried without that partner, whose
    streams end with RESOURCE_EXHAUSTED.

    The transaction spans partners, so it runs on the owner path (like the
    hub's reads of the outbox) and filters by the grants it reads itself.
    """

    def __init__(
        self, database: Database, gate: PartnerGate, pseudonyms: Pseudonyms, page_tokens: pagination.PageTokens
    ) -> None:
        self._db = database
        self._gate = gate
        self._pseudonyms = pseudonyms
        self._page_tokens = page_tokens
        self._queue: list[_Delivery] = []
        self._task: asyncio.Task[None] | None = None

    async def deliver(self, delivery: _Delivery) -> list[pb.AppointmentChange]:
        """Queue ``delivery``; return its events once its records are committed (or raise why not)."""
        delivery.future = asyncio.get_running_loop().create_future()
        self._queue.append(delivery)
        if self._task is None or self._task.done():
            # A fresh context: the group belongs to no one call (its deadline, its span).
            self._task = asyncio.create_task(self._run(), name="apptgate-feed-ledger", context=contextvars.Context())
        return await delivery.future

    async def _run(self) -> None:
        # Runs after every stream woken with the first one has queued its delivery.
        while self._queue:
            taken, changes = 0, 0
            while taken < len(self._queue) and (
                taken == 0 or changes + len(self._queue[taken].batch) <= _GROUP_CHANGES
            ):
                changes += len(self._queue[taken].batch)
                taken += 1
            group = [d for d in self._queue[:taken] if not d.future.done()]
            del self._queue[:taken]
            if not group:
                continue
            try:
                results = await self._commit(group)
            except asyncio.CancelledError:
                for d in [*group, *self._queue]:
                    d.future.cancel()
                raise
            except Exception as exc:  # the database failed: every stream of the group ends with it
                for d in group:
                    if not d.future.done():
                        d.future.set_exception(exc)
                continue
            for d in group:
                if not d.future.done():
                    result = results[id(d)]
                    if isinstance(result, BaseException):
                        d.future.set_exception(result)
                    else:
                        d.future.set_result(result)

    async def _commit(self, group: list[_Delivery]) -> dict[int, list[pb.AppointmentChange] | ApptgateError]:
        capped: dict[UUID, ApptgateError] = {}
        while True:
            try:
                return await self._commit_once(group, capped)
            except _CapReached as cap:
                capped.update(cap.refusals)

    async def _commit_once(
        self, group: list[_Delivery], capped: dict[UUID, ApptgateError]
    ) -> dict[int, list[pb.AppointmentChange] | ApptgateError]:
        results: dict[int, list[pb.AppointmentChange] | ApptgateError] = {}
        async with self._db.transaction() as conn:
            states = await store_feed.key_states(conn, sorted({d.principal.key_id for d in group}))
            policies: dict[UUID, PartnerPolicy] = {}
            allowed: dict[int, list[models.FeedChange]] = {}
            for d in group:
                partner_id = d.principal.partner_id
                state = states.get(d.principal.key_id)
                if state is None or state.revoked or state.partner_id != partner_id:
                    results[id(d)] = Unauthenticated("the key was revoked")
                    continue
                policy = policies.setdefault(partner_id, self._gate.guard.policy(state.overrides))
                granted = state.granted
                if policy.suspended:
                    results[id(d)] = SUSPENDED
                elif partner_id in capped:
                    results[id(d)] = capped[partner_id]
                elif d.sub.practitioner_id is not None and d.sub.practitioner_id not in granted:
                    results[id(d)] = PermissionDenied("the practitioner revoked access", reason="ACCESS_REVOKED")
                elif not granted:
                    results[id(d)] = PermissionDenied("no practitioner grants access any more", reason="ACCESS_REVOKED")
                else:
                    watched = d.sub.watched
                    allowed[id(d)] = [
                        c
                        for c in d.batch
                        if c.appointment.practitioner_id in granted and c.appointment.practitioner_id in watched
                    ]
            records: list[tuple[ledger.Entry, list[tuple[str, UUID | None, UUID | None]]]] = []
            events: dict[tuple[UUID, int], pb.AppointmentChange] = {}
            for d in group:
                if id(d) in results:
                    continue
                messages = [self._event(events, d.principal.partner_id, c, d.binding) for c in allowed[id(d)]]
                results[id(d)] = messages
                records.append(
                    (d.entry, [(m.appointment.appointment_id, c.appointment.id, c.appointment.patient_id)
                               for m, c in zip(messages, allowed[id(d)], strict=True)])
                )  # fmt: skip
            # One statement charges each partner once for all its streams (partners in order) and
            # records every stream's delivery, except a partner's that its charge just suspended.
            guard = self._gate.guard
            reached = {d.principal.partner_id for d in group if allowed.get(id(d))}
            try:
                outcomes = await ledger.record_many(conn, records, {p: guard.terms(policies[p]) for p in reached})
            except ledger.CapReached as over:
                raise _CapReached({over.partner_id: _refusal(guard, over.partner_id, over.cap)}) from None
            suspended = {p for p, o in outcomes.items() if not guard.settle(p, o)}
            for d in group:
                if d.principal.partner_id in suspended and isinstance(results[id(d)], list):
                    results[id(d)] = SUSPENDED
        return results

    def _event(
        self,
        events: dict[tuple[UUID, int], pb.AppointmentChange],
        partner_id: UUID,
        change: models.FeedChange,
        binding: bytes,
    ) -> pb.AppointmentChange:
        """The event of ``change`` for this partner: the same for all its streams, so built once per group."""
        event = events.get((partner_id, change.position))
        if event is None:
            event = events[(partner_id, change.position)] = pb.AppointmentChange(
                change_type=change.change_type,  # type: ignore[arg-type]
                appointment=views.basic_appointment(change.appointment, self._pseudonyms.for_partner(partner_id)),
                resume_token=self._page_tokens.seal(_POSITION.pack(change.position), binding),
            )
        return event
