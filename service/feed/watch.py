"""WatchAppointments: a stream opened, replayed from its resume token, then followed live from the hub.

Opening a stream is one statement as the partner role: the key verified, the
partner's limits and grants and the feed's head read together. A stream then replays
from the database what committed between its resume token and the moment it
subscribed, and follows the hub's shared ring after that; each batch goes
through :class:`~service.feed.delivery.Deliveries`, which records it before it
is sent. A resume token is the sealed position of the last change sent, bound
to the partner.

The replay reads each batch on a read replica within the lag bound when that
replica has replayed the feed up to the batch's upper bound
(:func:`~service.store.partner_path.replayed_changes`), else on the primary.
Its copy of the grants is then new enough: a change counts only if it was made
while the partner held its practitioner's grant, so it committed after that
grant, and a replica replays in commit order. (The grant's and the change's
times are their transactions' start times, so a change whose transaction
overlapped its grant's, and committed first, can count on the primary and not
on a copy that has not replayed the grant yet; the live stream, which learns of
a grant when it commits, sends such a change or not by timing too.) A
revocation the replica has not replayed yet still holds: the deliveries check
the key and the grants again on the primary before recording and sending.

A stream that asked for bookmarks is also sent, outside the deliveries (a
bookmark discloses nothing, so nothing is recorded), its cursor sealed the
same way: once it has caught up, whenever it has sent nothing for the bookmark
interval, and once more when the server shuts down. The cursor is the feed
position up to which the stream has looked at every change, sent or not
watched, so a bookmark's token resumes exactly where the stream stands,
whichever process opens it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import models
from service.access.gate import Caller, PartnerGate
from service.disclosure.pagination import PageTokens
from service.disclosure.record import entry
from service.errors import NotFound, OutOfRange, PermissionDenied, ServerShuttingDown
from service.feed.delivery import POSITION, Deliveries, Delivery
from service.feed.hub import FeedHub, Subscription
from service.store import partner_path
from service.store.database import Database
from service.store.replicas import Replicas
from service.telemetry.tracing import Telemetry, annotate

#: Changes read from the database per statement while a stream replays.
_REPLAY_BATCH = 500


def starting_cursor(resume: int | None, head: int, subscribed_at: int) -> int:
    """Where a stream starts: every change up to this position counts as sent (or not watched).

    Without a token (``resume`` None) it is "from now": the database's ``head``
    when the stream opened, or the hub's position at subscription
    (``subscribed_at``) if the hub is further. With one, it is the token's
    position, even ahead of this process's hub (another process sealed it and
    its listener was further along): the stream then waits for the hub to
    reach it instead of sending what the token had passed.
    """
    return max(head, subscribed_at) if resume is None else resume


class Watches:
    """Opens and runs ``WatchAppointments`` streams."""

    def __init__(
        self,
        database: Database,
        gate: PartnerGate,
        hub: FeedHub,
        deliveries: Deliveries,
        page_tokens: PageTokens,
        telemetry: Telemetry,
        *,
        bookmark_interval: float = 30.0,
        replicas: Replicas | None = None,
    ) -> None:
        self._db = database
        self._gate = gate
        self._hub = hub
        self._deliveries = deliveries
        self._page_tokens = page_tokens
        self._telemetry = telemetry
        self._bookmark_interval = bookmark_interval
        self._replicas = replicas

    async def watch(
        self,
        caller: Caller,
        practitioner: UUID | None,
        practitioner_text: str,
        resume_token: str,
        live: Callable[[], Awaitable[None]],
        *,
        bookmarks: bool = False,
    ) -> AsyncIterator[pb.AppointmentChange]:
        """The stream's events; ``live`` is awaited once changes from then on will reach it.

        With ``bookmarks``, bookmarks are sent too (see the module docstring).
        Raises NOT_FOUND (recorded) for a practitioner not granted,
        PERMISSION_DENIED when nothing is granted, OUT_OF_RANGE for a resume
        token older than the retention; the stream ends with the error of a
        revocation, a cap, a stream that fell behind, or a shutdown
        (UNAVAILABLE, ``SERVER_SHUTTING_DOWN``, after a last bookmark).
        """
        principal, opening = await self._gate.open_stream(caller)
        granted, head, pruned = opening.granted, opening.head, opening.pruned_through
        if practitioner is not None and practitioner not in granted:
            denial = entry(principal, "WatchAppointments", models.View.BASIC, denial_reason="NOT_FOUND")
            async with self._db.partner_statements() as conn:
                await partner_path.record_refusal(conn, principal, denial, [(practitioner_text, None, None)])
        binding = b"WatchAppointments|" + principal.partner_id.bytes
        resume = None
        if resume_token:
            resume = POSITION.unpack(self._page_tokens.open(resume_token, binding, field="resume_token"))[0]
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
        cursor = starting_cursor(resume, head, sub.start_position)
        loop = asyncio.get_running_loop()
        try:
            await live()
            while cursor < sub.start_position:  # replay what committed before the subscription
                if sub.ended is not None:
                    raise sub.ended
                batch = await self._replayed(principal, after=cursor, upto=sub.start_position, watched=sub.watched)
                for message in await self._deliver(principal, sub, batch, binding):
                    yield message
                cursor = batch[-1].position if len(batch) == _REPLAY_BATCH else sub.start_position
            if bookmarks:  # caught up
                yield self._bookmark(cursor, binding)
            quiet_since = loop.time()
            while True:  # then live, from the hub's shared ring
                batch, upto = self._hub.pending(sub, cursor)
                if batch:
                    messages = await self._deliver(principal, sub, batch, binding)
                    for message in messages:
                        yield message
                    if messages:
                        quiet_since = loop.time()
                cursor = upto
                if batch:
                    continue
                if not bookmarks:
                    await sub.wait()
                    continue
                quiet_for = loop.time() - quiet_since
                if quiet_for >= self._bookmark_interval:
                    yield self._bookmark(cursor, binding)
                    quiet_since = loop.time()
                    continue
                try:
                    async with asyncio.timeout(self._bookmark_interval - quiet_for):
                        await sub.wait()
                except TimeoutError:
                    pass
        except ServerShuttingDown:
            # The stream is exactly at its cursor: a last bookmark lets a client that received
            # nothing since its last token resume from here, on another process.
            if bookmarks:
                yield self._bookmark(cursor, binding)
            raise
        finally:
            self._hub.unsubscribe(sub)
            self._telemetry.active_streams.add(-1)

    async def _replayed(
        self, principal: models.Principal, *, after: int, upto: int, watched: set[UUID]
    ) -> list[models.FeedChange]:
        """The next replay batch in ``(after, upto]``: on a replica that has replayed up to ``upto``, else the primary.

        A replica behind ``upto``, not knowing the key live yet, refusing or
        failing sends the batch to the primary, whose refusal ends the stream.
        """
        practitioners = list(watched)
        if self._replicas is not None:
            replicated = await self._replicas.read(
                lambda conn: partner_path.replayed_changes(
                    conn, principal, after=after, upto=upto, limit=_REPLAY_BATCH, practitioners=practitioners
                )
            )
            if replicated is not None and replicated.value is not None:
                return replicated.value
        async with self._db.partner_statements() as conn:
            try:
                return await partner_path.changes(
                    conn, principal, after=after, upto=upto, limit=_REPLAY_BATCH, practitioners=practitioners
                )
            except partner_path.ReadRefused as refused:
                raise self._gate.refused(refused, principal) from None

    def _bookmark(self, cursor: int, binding: bytes) -> pb.AppointmentChange:
        """A bookmark: the stream's cursor sealed like a change's token, and nothing else."""
        token = self._page_tokens.seal(POSITION.pack(cursor), binding)
        return pb.AppointmentChange(change_type=pb.CHANGE_TYPE_BOOKMARK, resume_token=token)

    async def _deliver(
        self, principal: models.Principal, sub: Subscription, batch: list[models.FeedChange], binding: bytes
    ) -> list[pb.AppointmentChange]:
        """The batch's events, once the key and grants are checked again and the batch recorded."""
        if not batch:
            return []
        record = entry(principal, "WatchAppointments", models.View.BASIC)
        messages = await self._deliveries.deliver(Delivery(principal, sub, batch, binding, record))
        self._telemetry.disclosed(models.View.BASIC, len(messages))
        return messages
