"""WatchAppointments: a stream opened, replayed from its resume token, then followed live from the hub.

Opening a stream is one statement as the partner role: the key verified, the
partner's limits and grants and the feed's head read together. A stream then replays
from the database what committed between its resume token and the moment it
subscribed, and follows the hub's shared ring after that; each batch goes
through :class:`~service.feed.delivery.Deliveries`, which records it before it
is sent. A resume token is the sealed position of the last change sent, bound
to the partner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import models
from service.access.gate import Caller, PartnerGate
from service.disclosure.pagination import PageTokens
from service.disclosure.record import entry
from service.errors import NotFound, OutOfRange, PermissionDenied
from service.feed.delivery import POSITION, Deliveries, Delivery
from service.feed.hub import FeedHub, Subscription
from service.store import partner_path
from service.store.database import Database
from service.telemetry.tracing import Telemetry, annotate

#: Changes read from the database per statement while a stream replays.
_REPLAY_BATCH = 500


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
    ) -> None:
        self._db = database
        self._gate = gate
        self._hub = hub
        self._deliveries = deliveries
        self._page_tokens = page_tokens
        self._telemetry = telemetry

    async def watch(
        self,
        caller: Caller,
        practitioner: UUID | None,
        practitioner_text: str,
        resume_token: str,
        live: Callable[[], Awaitable[None]],
    ) -> AsyncIterator[pb.AppointmentChange]:
        """The stream's events; ``live`` is awaited once changes from then on will reach it.

        Raises NOT_FOUND (recorded) for a practitioner not granted,
        PERMISSION_DENIED when nothing is granted, OUT_OF_RANGE for a resume
        token older than the retention; the stream ends with the error of a
        revocation, a cap, a stream that fell behind, or a shutdown.
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
        try:
            await live()
            # "From now" is the database's head, which the hub may not have read yet.
            cursor = max(head, sub.start_position) if resume is None else min(resume, sub.start_position)
            while cursor < sub.start_position:  # replay what committed before the subscription
                async with self._db.partner_statements() as conn:
                    try:
                        batch = await partner_path.changes(
                            conn,
                            principal,
                            after=cursor,
                            upto=sub.start_position,
                            limit=_REPLAY_BATCH,
                            practitioners=list(sub.watched),
                        )
                    except partner_path.ReadRefused as refused:
                        raise self._gate.refused(refused, principal) from None
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
        self, principal: models.Principal, sub: Subscription, batch: list[models.FeedChange], binding: bytes
    ) -> list[pb.AppointmentChange]:
        """The batch's events, once the key and grants are checked again and the batch recorded."""
        if not batch:
            return []
        record = entry(principal, "WatchAppointments", models.View.BASIC)
        messages = await self._deliveries.deliver(Delivery(principal, sub, batch, binding, record))
        self._telemetry.disclosed(models.View.BASIC, len(messages))
        return messages
