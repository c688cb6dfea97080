"""What a patient is told: the privacy events stream and the sweep that announces expired consents.

Privacy events are written by triggers (migration 0009) in the transaction
that makes them true, numbered without gaps in commit order, so a resume
token is the sealed position of the last event sent. A stream replays from
the database what it has not seen and waits on the hub between reads; the hub
wakes it on each event notification. Only a consent's expiry commits nothing
by itself: every gateway process runs :func:`run_expiry_announcements`, which
announces each expired consent once and sleeps until the next one is due or
a privacy event is written anywhere (a new consent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from appointments.internal.v1 import audit_pb2

from service import models
from service.disclosure.pagination import PageTokens
from service.errors import ApptgateError
from service.feed.delivery import POSITION
from service.feed.hub import FeedHub
from service.store import privacy
from service.store.database import Database
from service.timestamps import set_timestamp

log = logging.getLogger(__name__)

#: Events read per statement.
_BATCH = 500
_BINDING = b"WatchPrivacyEvents"
#: Consents announced per statement, and the longest the sweep sleeps without being woken.
_SWEEP_BATCH = 500
_SWEEP_IDLE = 60.0


def event_message(event: models.PrivacyEvent, resume_token: str) -> audit_pb2.PrivacyEvent:
    """The internal message of one privacy event: ids and field numbers, never a value."""
    message = audit_pb2.PrivacyEvent(
        event_id=event.position,
        type=event.type.value,  # type: ignore[arg-type]
        patient_id=str(event.patient_id),
        partner=audit_pb2.PartnerSummary(partner_id=str(event.partner_id), display_name=event.partner_display_name),
        consent_id=str(event.consent_id) if event.consent_id is not None else "",
        consent_request_id=str(event.consent_request_id) if event.consent_request_id is not None else "",
        fields=list(event.fields),  # type: ignore[arg-type]
        resume_token=resume_token,
    )
    set_timestamp(message.event_time, event.event_time)
    return message


class PrivacyWatches:
    """Opens and runs ``WatchPrivacyEvents`` streams (internal listener)."""

    def __init__(self, database: Database, hub: FeedHub, page_tokens: PageTokens) -> None:
        self._db = database
        self._hub = hub
        self._page_tokens = page_tokens

    async def watch(
        self, resume_token: str, live: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[audit_pb2.PrivacyEvent]:
        """The stream's events; ``live`` is awaited once events from then on will reach it.

        Raises INVALID_ARGUMENT for a malformed or foreign resume token; the
        stream ends with UNAVAILABLE at shutdown (resume with the last token).
        """
        resume = None
        if resume_token:
            resume = POSITION.unpack(self._page_tokens.open(resume_token, _BINDING, field="resume_token"))[0]
        sub = self._hub.subscribe_privacy()
        try:
            # Subscribed first: an event committed from here on wakes the stream, which reads it.
            if resume is None:
                async with self._db.transaction(readonly=True) as conn:
                    resume = await privacy.event_head(conn)
            cursor = resume
            await live()
            while True:
                async with self._db.transaction(readonly=True) as conn:
                    batch = await privacy.events(conn, after=cursor, limit=_BATCH)
                for event in batch:
                    yield event_message(event, self._page_tokens.seal(POSITION.pack(event.position), _BINDING))
                    cursor = event.position
                if len(batch) < _BATCH:
                    await sub.wait()
        finally:
            self._hub.unsubscribe(sub)


async def run_expiry_announcements(database: Database, activity: asyncio.Event) -> None:
    """Announce each consent that expires, once across processes, as it expires; until cancelled.

    Sleeps until the next consent expires, or until ``activity`` is set (a
    privacy event was written anywhere, a new consent among them), so an idle
    gateway runs no query for it.
    """
    while True:
        activity.clear()  # before reading: an event from here on wakes the wait below
        delay = 1.0
        try:
            async with database.transaction() as conn:
                announced = await privacy.announce_expired_consents(conn, limit=_SWEEP_BATCH)
                following = await privacy.seconds_to_next_consent_expiry(conn)
            if announced == _SWEEP_BATCH:
                continue
            delay = _SWEEP_IDLE if following is None else min(max(following, 0.0), _SWEEP_IDLE)
        except ApptgateError:
            log.warning("consent expiry announcements skipped: the database is unavailable")
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that comes
        # as the event is set, and the gateway's stop would wait for this task for ever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await activity.wait()
