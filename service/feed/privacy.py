"""What a patient is told: the privacy events stream.

Privacy events are written by triggers (migration 0009) in the transaction
that makes them true, numbered without gaps in commit order, so a resume
token is the sealed position of the last event sent. A stream replays from
the database what it has not seen and waits on the hub between reads; the hub
wakes it on each event notification. Only a consent's expiry commits nothing
by itself: a sweep in every process (:mod:`service.sweeps`, with
:func:`service.store.privacy.announce_expired_consents`) announces each
expired consent once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from appointments.internal.v1 import audit_pb2

from service import models
from service.disclosure.pagination import PageTokens
from service.feed.delivery import POSITION
from service.feed.hub import FeedHub
from service.store import privacy
from service.store.database import Database
from service.timestamps import set_timestamp

#: Events read per statement.
_BATCH = 500
_BINDING = b"WatchPrivacyEvents"


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
