"""WatchConsentRequests: every change of a partner's consent requests, replayed from a token, then live.

Events are numbered per partner without gaps, in commit order (migration
0008), so a resume token is the sealed position of the last event sent, bound
to the partner, and "everything after it" is exact. A stream reads its
partner's events from the database as the partner role (each read verifies
the key), and waits between reads on the hub, which wakes it on each of its
partner's event notifications and ends it when its key is revoked. An event
carries the request as that change left it; nothing in it is a disclosure of
appointment data, so nothing is recorded in the ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from appointments.partner.v1 import consent_request_pb2

from service.access.gate import Caller, PartnerGate
from service.disclosure.consent_requests import ConsentRequests
from service.disclosure.pagination import PageTokens
from service.feed.delivery import POSITION
from service.feed.hub import FeedHub
from service.store import partner_path
from service.store.database import Database
from service.telemetry.tracing import Telemetry

#: Events read per statement.
_BATCH = 200


class ConsentRequestWatches:
    """Opens and runs ``WatchConsentRequests`` streams."""

    def __init__(
        self,
        database: Database,
        gate: PartnerGate,
        hub: FeedHub,
        requests: ConsentRequests,
        page_tokens: PageTokens,
        telemetry: Telemetry,
    ) -> None:
        self._db = database
        self._gate = gate
        self._hub = hub
        self._requests = requests
        self._page_tokens = page_tokens
        self._telemetry = telemetry

    async def watch(
        self, caller: Caller, resume_token: str, live: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[consent_request_pb2.ConsentRequestEvent]:
        """The stream's events; ``live`` is awaited once events from then on will reach it.

        Raises INVALID_ARGUMENT for a malformed or foreign resume token; the
        stream ends with UNAUTHENTICATED when its key is revoked, with
        UNAVAILABLE at shutdown.
        """
        principal, _ = await self._gate.admit_live(caller)
        binding = b"WatchConsentRequests|" + principal.partner_id.bytes
        resume = None
        if resume_token:
            resume = POSITION.unpack(self._page_tokens.open(resume_token, binding, field="resume_token"))[0]
        sub = self._hub.subscribe_consent_requests(principal.partner_id, principal.key_id)
        self._telemetry.active_streams.add(1)
        try:
            # Subscribed first: an event committed from here on wakes the stream, which reads it.
            async with self._db.partner_statements() as conn:
                try:
                    cursor = resume if resume is not None else await partner_path.consent_request_head(conn, principal)
                except partner_path.ReadRefused as refused:
                    raise self._gate.refused(refused, principal) from None
            await live()
            while True:
                async with self._db.partner_statements() as conn:
                    try:
                        events = await partner_path.consent_request_events(conn, principal, after=cursor, limit=_BATCH)
                    except partner_path.ReadRefused as refused:
                        raise self._gate.refused(refused, principal) from None
                for position, state, row in events:
                    yield consent_request_pb2.ConsentRequestEvent(
                        consent_request=self._requests.partner_view(principal.partner_id, row, state),
                        resume_token=self._page_tokens.seal(POSITION.pack(position), binding),
                    )
                    cursor = position
                if len(events) < _BATCH:
                    await sub.wait()
        finally:
            self._hub.unsubscribe(sub)
            self._telemetry.active_streams.add(-1)
