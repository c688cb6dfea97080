"""Deliveries of the change feed: what a stream may be sent, recorded before it is sent.

Each batch of changes a stream is about to send is delivered the way a read
discloses: the key and the grants are checked again, the usage is counted and
the ledger records it, in a transaction that commits before the events are
sent. The streams woken by one change share that transaction: one change
watched by 1,000 streams wakes them all at once, each hands its batch to
:class:`Deliveries` and waits, and one task takes every batch queued so far
and, in one transaction of two statements whatever its size, re-reads the
keys, the partners' limits and the grants of every partner concerned
(:func:`service.store.partners.key_access`), then charges each partner once
for all its streams and records every stream's batch
(:func:`service.disclosure.record.write_basic`). Batches queued meanwhile form
the next group. A partner over a daily cap rolls the group back; it is retried
without that partner, whose streams end with RESOURCE_EXHAUSTED.

The transaction spans partners, so it runs on the owner path (like the hub's
reads of the outbox) and filters by the grants it reads itself. Events are
built by the same view code as ``ListAppointments``.
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
from dataclasses import dataclass, field
from uuid import UUID

from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import models
from service.access.gate import PartnerGate, key_refusal, stream_refusal
from service.access.limits import PartnerPolicy, refusal
from service.disclosure import views
from service.disclosure.pagination import PageTokens
from service.disclosure.pseudonyms import Pseudonyms
from service.disclosure.record import write_basic
from service.errors import ApptgateError, PartnerSuspended
from service.feed.hub import Subscription
from service.store import ledger, partners
from service.store.database import Database

#: A resume token's cursor: the position of the last change sent.
POSITION = struct.Struct(">q")
#: Most changes recorded in one transaction, over all its deliveries: a bound on its size, not a
#: wait. A delivery larger than this (a replay batch) still goes alone.
_GROUP_CHANGES = 20_000


@dataclass(eq=False)
class Delivery:
    """One stream's batch of changes waiting for its record."""

    principal: models.Principal
    sub: Subscription
    batch: list[models.FeedChange]
    #: What the stream's resume tokens are bound to.
    binding: bytes
    #: The batch's ledger entry, made in the stream's context (its trace id).
    entry: models.LedgerEntry
    future: asyncio.Future[list[pb.AppointmentChange]] = field(init=False)


class _CapReached(Exception):
    """Partners reached a daily cap while a group was charged: roll the group back, retry without them."""

    def __init__(self, refusals: dict[UUID, ApptgateError]) -> None:
        super().__init__(len(refusals))
        self.refusals = refusals


class Deliveries:
    """Records the batches of many streams in one transaction (group commit), then hands each its events."""

    def __init__(self, database: Database, gate: PartnerGate, ids: Pseudonyms, page_tokens: PageTokens) -> None:
        self._db = database
        self._guard = gate.guard
        self._ids = ids
        self._page_tokens = page_tokens
        self._queue: list[Delivery] = []
        self._task: asyncio.Task[None] | None = None

    async def deliver(self, delivery: Delivery) -> list[pb.AppointmentChange]:
        """Queue ``delivery``; return its events once its record is committed (or raise why not)."""
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

    async def _commit(self, group: list[Delivery]) -> dict[int, list[pb.AppointmentChange] | ApptgateError]:
        capped: dict[UUID, ApptgateError] = {}
        while True:
            try:
                return await self._commit_once(group, capped)
            except _CapReached as cap:
                capped.update(cap.refusals)

    async def _commit_once(
        self, group: list[Delivery], capped: dict[UUID, ApptgateError]
    ) -> dict[int, list[pb.AppointmentChange] | ApptgateError]:
        results: dict[int, list[pb.AppointmentChange] | ApptgateError] = {}
        async with self._db.transaction() as conn:
            access = await partners.key_access(conn, sorted({d.principal.key_id for d in group}))
            policies: dict[UUID, PartnerPolicy] = {}
            allowed: dict[int, list[models.FeedChange]] = {}
            for d in group:
                partner_id = d.principal.partner_id
                key = access.get(d.principal.key_id)
                ended = key_refusal(key, partner_id)
                if ended is not None:
                    results[id(d)] = ended
                    continue
                assert key is not None
                policy = policies.setdefault(partner_id, self._guard.policy(key.overrides))
                ended = stream_refusal(d.sub.practitioner_id, key.granted)
                if policy.suspended:
                    results[id(d)] = PartnerSuspended()
                elif partner_id in capped:
                    results[id(d)] = capped[partner_id]
                elif ended is not None:
                    results[id(d)] = ended
                else:
                    granted, watched = key.granted, d.sub.watched
                    allowed[id(d)] = [
                        c
                        for c in d.batch
                        if c.appointment.practitioner_id in granted and c.appointment.practitioner_id in watched
                    ]
            records: list[tuple[models.LedgerEntry, ledger.Items]] = []
            events: dict[tuple[UUID, int], pb.AppointmentChange] = {}
            for d in group:
                if id(d) in results:
                    continue
                messages = [self._event(events, d.principal.partner_id, c, d.binding) for c in allowed[id(d)]]
                results[id(d)] = messages
                records.append(
                    (d.entry,
                     [(m.appointment.appointment_id, c.appointment.id, c.appointment.patient_id)
                      for m, c in zip(messages, allowed[id(d)], strict=True)])
                )  # fmt: skip
            # One statement charges each partner once for all its streams (partners in order) and
            # records every stream's delivery, except a partner's that its charge just suspended.
            reached = {d.principal.partner_id for d in group if allowed.get(id(d))}
            try:
                outcomes = await write_basic(conn, records, {p: self._guard.terms(policies[p]) for p in reached})
            except ledger.CapReached as over:
                refused = refusal(over.cap)
                assert refused is not None
                raise _CapReached({over.partner_id: refused}) from None
            suspended = set()
            for partner_id, outcome in outcomes.items():
                try:
                    self._guard.settle(partner_id, outcome)
                except PartnerSuspended:
                    suspended.add(partner_id)
            for d in group:
                if d.principal.partner_id in suspended and isinstance(results[id(d)], list):
                    results[id(d)] = PartnerSuspended()
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
                appointment=views.basic_appointment(change.appointment, self._ids.for_partner(partner_id)),
                resume_token=self._page_tokens.seal(POSITION.pack(change.position), binding),
            )
        return event
