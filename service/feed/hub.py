"""The change-feed hub: one listener per process fans committed changes out to the open streams.

Idle streams cost nothing: each waits on an event. On each NOTIFY (carrying
the position its transaction committed), the hub reads the new changes once —
only up to that position, which, positions being gapless and in commit order,
holds exactly what committed before it — into one ring of recent changes
shared by every stream, and wakes the streams watching those practitioners.
Each stream keeps only its cursor. Grant and key changes arrive on the same
connection, in commit order with the changes, so a stream learns of a
revocation before it is shown any change committed after it. A partner's
consent request events notify on a channel of their own and wake that
partner's ``WatchConsentRequests`` streams, which read them from the database.

Memory is bounded by the ring: a stream whose cursor falls behind the oldest
change still in the ring (a consumer that reads too slowly, or a burst larger
than the ring) is ended with RESOURCE_EXHAUSTED, and resumes from the database
with its last token.

When the server stops, :meth:`FeedHub.drain` ends every stream with
UNAVAILABLE (``SERVER_SHUTTING_DOWN``, a short RetryInfo delay) and refuses
new ones the same way: a stream's position is a sealed feed position, valid
on every process of the deployment, so its client resumes on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from service import models
from service.access.gate import key_refusal, stream_refusal
from service.errors import ApptgateError, ResourceExhausted, ServerShuttingDown
from service.store import changes, partners
from service.store.database import Database

log = logging.getLogger(__name__)

#: Changes read per statement when the hub catches up with a notification.
FETCH_BATCH = 1000
#: Seconds the hub waits for one catch-up read before giving up (the next notification retries).
_READ_TIMEOUT = 10.0
#: Seconds between two deletions of changes older than the retention.
_PRUNE_EVERY = 600
#: Where the internal listener's streams are kept among the partners' (no partner has this id).
_INTERNAL = UUID(int=0)
#: Seconds a stream ended by a shutdown is told to wait before resuming: short, as another process
#: (or this one, restarted) serves it, and the clients' jitter spreads them out from there.
SHUTDOWN_RETRY_DELAY = 0.2


@dataclass(eq=False)
class Subscription:
    """One open stream: who watches what, and why it ended, if it did."""

    partner_id: UUID
    key_id: str
    practitioner_id: UUID | None  # None: every granted practitioner
    watched: set[UUID]
    start_position: int
    #: A WatchConsentRequests stream: woken by its partner's consent request events, not by changes.
    consent_requests: bool = False
    #: A WatchPrivacyEvents stream (internal, of no partner): woken by every privacy event.
    privacy: bool = False
    ended: ApptgateError | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def end(self, error: ApptgateError) -> None:
        """End the stream with ``error`` (the next :meth:`wait` raises it)."""
        if self.ended is None:
            self.ended = error
            self._wake.set()

    def wake(self) -> None:
        """Tell the stream there may be something new."""
        self._wake.set()

    async def wait(self) -> None:
        """Wait to be woken; raise the error the stream ended with."""
        if self.ended is None:
            await self._wake.wait()
        self._wake.clear()
        if self.ended is not None:
            raise self.ended


class FeedHub:
    """Owns the process's feed listener and its subscriptions."""

    def __init__(
        self,
        database: Database,
        *,
        buffer: int = 1000,
        max_streams_per_partner: int = 20,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self._db = database
        self._max_streams = max_streams_per_partner
        self._retention = retention
        self._subscriptions: dict[UUID, set[Subscription]] = defaultdict(set)
        self._ring: deque[models.FeedChange] = deque(maxlen=buffer)
        self._events: deque[changes.Notification] = deque()
        self._events_ready = asyncio.Event()
        self._notifications = changes.ChangeNotifications(database.dsn, self._notified)
        self._position = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        #: Set on every consent request notification and after a reconnection (the expiry sweep waits on it).
        self.consent_request_activity = asyncio.Event()
        #: Set on every privacy event notification and after a reconnection (the consent expiry sweep waits on it).
        self.privacy_activity = asyncio.Event()

    @property
    def position(self) -> int:
        """The last position handed to the subscriptions."""
        return self._position

    async def start(self) -> None:
        """Listen, then start dispatching from the current head."""
        await self._notifications.start()
        async with self._db.transaction(readonly=True) as conn:
            self._position, _ = await changes.head(conn)
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="apptgate-feed-dispatch"),
            asyncio.create_task(self._prune(), name="apptgate-feed-prune"),
        ]

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: streams end, and new ones are refused."""
        return self._draining

    def drain(self) -> None:
        """End every stream with UNAVAILABLE (``SERVER_SHUTTING_DOWN``) and refuse new ones from now on.

        The hub goes on reading changes until :meth:`stop`, so a stream that was
        sending a batch finishes it before it ends.
        """
        self._draining = True
        for subs in self._subscriptions.values():
            for sub in subs:
                sub.end(ServerShuttingDown(retry_delay=SHUTDOWN_RETRY_DELAY))

    async def stop(self) -> None:
        """End every stream (:meth:`drain`), then stop listening."""
        self.drain()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._notifications.stop()

    def subscribe(
        self, partner_id: UUID, key_id: str, practitioner_id: UUID | None, granted: Collection[UUID]
    ) -> Subscription:
        """Register a stream; changes after :attr:`position` queue up for it from now on."""
        watched = {practitioner_id} if practitioner_id is not None else set(granted)
        sub = Subscription(partner_id, key_id, practitioner_id, watched, self._position)
        return self._add(sub, "streams per partner")

    def subscribe_consent_requests(self, partner_id: UUID, key_id: str) -> Subscription:
        """Register a WatchConsentRequests stream: woken by each of its partner's consent request events.

        It counts against the partner's streams, and ends like any stream when its key is revoked.
        """
        sub = Subscription(partner_id, key_id, None, set(), self._position, consent_requests=True)
        return self._add(sub, "streams per partner")

    def subscribe_privacy(self) -> Subscription:
        """Register a WatchPrivacyEvents stream: woken by every privacy event, of any patient.

        The internal listener's streams count against one limit of their own
        (``APPTGATE_FEED_MAX_STREAMS``), kept under a key no partner has.
        """
        sub = Subscription(_INTERNAL, "", None, set(), self._position, privacy=True)
        return self._add(sub, "privacy event streams")

    def _add(self, sub: Subscription, counted: str) -> Subscription:
        """Register ``sub`` unless its owner has ``APPTGATE_FEED_MAX_STREAMS`` open (RESOURCE_EXHAUSTED).

        Raises UNAVAILABLE (``SERVER_SHUTTING_DOWN``) once the hub drains.
        """
        if self._draining:
            raise ServerShuttingDown(retry_delay=SHUTDOWN_RETRY_DELAY)
        if len(self._subscriptions[sub.partner_id]) >= self._max_streams:
            raise ResourceExhausted(f"at most {self._max_streams} {counted}", reason="TOO_MANY_STREAMS", retry_delay=5)
        self._subscriptions[sub.partner_id].add(sub)
        return sub

    def pending(self, sub: Subscription, cursor: int) -> tuple[list[models.FeedChange], int]:
        """The changes after ``cursor`` that ``sub`` watches, and the position they were read up to.

        Raises :class:`ResourceExhausted` when changes after the cursor have
        already left the ring (the stream fell too far behind).
        """
        if sub.ended is not None:
            raise sub.ended
        if cursor >= self._position:
            return [], cursor
        if not self._ring or self._ring[0].position > cursor + 1:
            raise ResourceExhausted(
                "the stream fell too far behind; resume with the last token", reason="STREAM_TOO_SLOW", retry_delay=1
            )
        # Walk back from the newest change: a stream that keeps up looks at what is new to it,
        # not at the whole ring (1,000 streams woken by one change would otherwise scan
        # 1,000 ring entries each).
        found: list[models.FeedChange] = []
        for change in reversed(self._ring):
            if change.position <= cursor:
                break
            if change.appointment.practitioner_id in sub.watched:
                found.append(change)
        found.reverse()
        return found, self._position

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a stream."""
        subs = self._subscriptions.get(sub.partner_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscriptions[sub.partner_id]

    def _notified(self, notification: changes.Notification) -> None:
        self._events.append(notification)
        self._events_ready.set()

    async def _dispatch(self) -> None:
        while True:
            if not self._events:
                self._events_ready.clear()
                await self._events_ready.wait()
                continue
            channel, payload = self._events.popleft()
            try:
                if channel == changes.CHANGES_CHANNEL:
                    upto = int(payload)
                    # Coalesce the change notifications already queued (never across an
                    # access notification, whose place in commit order matters).
                    while self._events and self._events[0][0] == channel:
                        upto = max(upto, int(self._events.popleft()[1]))
                    await self._advance(upto)
                elif channel == changes.ACCESS_CHANNEL:
                    await self._access_changed(payload)
                elif channel == changes.CONSENT_REQUESTS_CHANNEL:
                    self._wake_consent_requests(UUID(payload))
                elif channel == changes.PRIVACY_CHANNEL:
                    self._wake_privacy()
                else:  # reconnected: notifications may have been lost
                    self.consent_request_activity.set()
                    self._wake_privacy()
                    partners_watching = [p for p in self._subscriptions if p != _INTERNAL]
                    for partner_id in partners_watching:
                        self._wake_consent_requests(partner_id)
                    await self._advance(None)
                    for partner_id in partners_watching:
                        await self._access_changed(f"partner:{partner_id}")
                        for key_id in {s.key_id for s in self._subscriptions.get(partner_id, ())}:
                            await self._access_changed(f"key:{key_id}")
            except Exception:
                # The listener reconnects and replays on its own; a lost wake-up
                # is recovered at the next notification, which reads from the position.
                log.exception("feed dispatch failed")

    async def _advance(self, upto: int | None) -> None:
        # Single statements, no transaction: positions up to ``upto`` are committed and never
        # change, and BEGIN, SET and COMMIT would be three more round trips before any wake-up.
        async with asyncio.timeout(_READ_TIMEOUT), self._db.connection() as conn:
            if upto is None:
                upto, _ = await changes.head(conn)
            while self._position < upto:
                batch = await changes.changes(conn, after=self._position, upto=upto, limit=FETCH_BATCH)
                if not batch:
                    break
                self._ring.extend(batch)
                self._position = batch[-1].position
                touched = {change.appointment.practitioner_id for change in batch}
                for subs in self._subscriptions.values():
                    for sub in subs:
                        if not sub.watched.isdisjoint(touched):
                            sub.wake()

    def _wake_privacy(self) -> None:
        self.privacy_activity.set()
        for sub in self._subscriptions.get(_INTERNAL, ()):
            sub.wake()

    def _wake_consent_requests(self, partner_id: UUID) -> None:
        self.consent_request_activity.set()
        for sub in self._subscriptions.get(partner_id, ()):
            if sub.consent_requests:
                sub.wake()

    async def _access_changed(self, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        if kind == "partner":
            partner_id = UUID(ident)
            # Grants decide what a change stream shows; a consent request stream follows none.
            subs = [s for s in self._subscriptions.get(partner_id, ()) if not s.consent_requests and not s.privacy]
            if not subs:
                return
            async with self._db.transaction(readonly=True) as conn:
                granted = await partners.granted_practitioners(conn, partner_id)
            for sub in subs:
                ended = stream_refusal(sub.practitioner_id, granted)
                if ended is not None:
                    sub.end(ended)
                elif sub.practitioner_id is None:
                    sub.watched = set(granted)
                    sub.wake()
        elif kind == "key":
            subs = [s for group in self._subscriptions.values() for s in group if s.key_id == ident and not s.privacy]
            if not subs:
                return
            async with self._db.transaction(readonly=True) as conn:
                access = (await partners.key_access(conn, [ident])).get(ident)
            for sub in subs:
                ended = key_refusal(access, sub.partner_id)
                if ended is not None:
                    sub.end(ended)

    async def _prune(self) -> None:
        while True:
            try:
                async with self._db.transaction() as conn:
                    deleted = await changes.prune(conn, self._retention)
                if deleted:
                    log.info("pruned %d feed changes older than the retention window", deleted)
            except ApptgateError:
                log.warning("feed pruning skipped: the database is unavailable")
            await asyncio.sleep(_PRUNE_EVERY)
