"""Who may call the partner service, and whether a call or a stream may go on: the one place access is decided.

A partner call presents its key, and its connection perhaps a client
certificate (:class:`Caller`). The database alone verifies a key's
credential (migration 0007: every partner statement takes the key id, the
SHA-256 of the secret presented and that of the certificate, verifies them
— a key bound to a certificate verifies only over it — and derives the
partner from the key).
:meth:`PartnerGate.admit` admits a call before its statement: it compares the
presented key with one it saw verify, in constant time, and applies the
partner's request rate; anything else — an unknown key, a wrong secret, a
key not seen yet — goes to the database, so the two kinds of failure take the
same path. A key that failed is answered from memory for a while, and a peer
that fails too often is refused before any query. The call's statement then
verifies the key again and re-checks the partner's suspension and grants, so
a revocation bites on the next call; its refusal comes back through
:meth:`PartnerGate.refused`, which forgets what was remembered.

What a partner may *see* of an appointment is decided by
:mod:`service.disclosure.views`; whether a contact field may be seen, by a
consent (:mod:`service.access.consent_tokens` and the record statement that
checks it). A change-feed stream is judged again whenever access changes
(:func:`stream_refusal`, :func:`key_refusal`), by the hub when it is told of a
change and by every delivery, which re-reads the key and the grants in the
transaction that records it.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from uuid import UUID

from service import models
from service.access import credentials
from service.access.limits import ExtractionGuard, PartnerPolicy, TokenBuckets
from service.access.request_rate import FleetRate
from service.errors import ApptgateError, PartnerSuspended, PermissionDenied, ResourceExhausted, Unauthenticated
from service.store import partner_path
from service.store.database import Database
from service.store.partner_path import ReadRefused, Refusal
from service.telemetry.tracing import annotate

Metadata = Iterable[tuple[str, str | bytes]] | None

#: Keys a process remembers having seen verify, least recently used out first.
_MAX_KEYS = 10_000
#: Seconds a key that failed to verify is answered from memory, without a query.
_FAILED_FOR = 60.0
#: Failed keys remembered at most, least recent out first.
_MAX_FAILED = 10_000
#: Failed authentications a peer may make per second, and in a burst, before it is refused unheard.
_FAILURES_PER_SECOND = 5.0
_FAILURE_BURST = 20


@dataclass(frozen=True, slots=True)
class Caller:
    """What a call presents to be admitted.

    ``peer`` is its network address, which failed authentications are limited
    by; ``client_cert`` the SHA-256 of its connection's client certificate
    (mutual TLS), ``None`` without one.
    """

    metadata: Metadata
    peer: str
    client_cert: bytes | None = None


class PartnerGate:
    """Admits partner calls: the key, the partner's limits, and what the database refuses later."""

    def __init__(
        self,
        database: Database,
        guard: ExtractionGuard,
        rate: FleetRate,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.guard = guard
        self._rate = rate
        self._db = database
        self._clock = clock
        # Key id → a principal whose key the database verified. What is kept never changes for a
        # key (its partner, its secret's hash); what does (revocation, the partner's suspension)
        # is checked by every statement, whose refusal drops the entry (refused).
        self._keys: OrderedDict[str, models.Principal] = OrderedDict()
        # (key id, secret hash) → when a failed verification stops being answered from memory.
        self._failed: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._failures = TokenBuckets(clock=clock)

    async def admit(self, caller: Caller) -> tuple[models.Principal, PartnerPolicy]:
        """Verify the call's key and apply its partner's request rate; return who calls and its limits.

        The partner-path statement that follows verifies the key again. Raises
        :class:`~service.errors.Unauthenticated`, :class:`PartnerSuspended` or
        RESOURCE_EXHAUSTED.
        """
        key_id, presented = self._presented(caller)
        peer = caller.peer
        known = self._keys.get(key_id)
        policy = self.guard.known_policy(known.partner_id) if known is not None else None
        if known is not None and policy is not None and hmac.compare_digest(presented, known.credential):
            principal = known
            self._keys.move_to_end(key_id)
        else:
            principal, policy = await self._authenticate(key_id, presented, peer)
            if policy.suspended:
                raise PartnerSuspended()
        _annotate(principal)
        await self._rate.take(principal.partner_id, policy)
        return principal, policy

    async def admit_live(self, caller: Caller) -> tuple[models.Principal, PartnerPolicy]:
        """:meth:`admit` with the key verified by the database now: for a call with no statement of its own."""
        key_id, presented = self._presented(caller)
        principal, policy = await self._authenticate(key_id, presented, caller.peer)
        _annotate(principal)
        self.guard.admit(policy)
        await self._rate.take(principal.partner_id, policy)
        return principal, policy

    async def open_stream(self, caller: Caller) -> tuple[models.Principal, partner_path.Opening]:
        """Admit a stream: its key verified, its partner's limits applied, its grants and the feed's head read."""
        key_id, presented = self._presented(caller)
        peer = caller.peer
        self._refuse_known_failure(key_id, presented, peer)
        async with self._db.partner_statements() as conn:
            opening = await partner_path.open_stream(conn, key_id, presented)
        if opening is None:
            raise self._failure(key_id, presented, peer)
        principal = models.Principal(opening.partner_id, key_id, presented)
        _annotate(principal)
        policy = self.guard.learn(principal.partner_id, opening.overrides)
        self.guard.admit(policy)
        await self._rate.take(principal.partner_id, policy)
        return principal, opening

    def refused(self, refused: ReadRefused, principal: models.Principal) -> ApptgateError:
        """The answer to a statement's refusal of a key that looked live (revoked or suspended since it was seen)."""
        self._keys.pop(principal.key_id, None)
        self.guard.forget(principal.partner_id)
        if refused.refusal is Refusal.PARTNER_SUSPENDED:
            return PartnerSuspended()
        return Unauthenticated("invalid credentials")

    @staticmethod
    def _presented(caller: Caller) -> tuple[str, bytes]:
        """The key id and credential of the call's bearer key. Raises :class:`Unauthenticated`."""
        token = credentials.bearer_token(caller.metadata)
        return credentials.partner_key_id(token), credentials.credential(
            credentials.hash_secret(token), caller.client_cert
        )

    async def _authenticate(self, key_id: str, presented: bytes, peer: str) -> tuple[models.Principal, PartnerPolicy]:
        """Have the database verify the key; remember it when it does, and the failure when it does not."""
        self._refuse_known_failure(key_id, presented, peer)
        async with self._db.partner_statements() as conn:
            found = await partner_path.authenticate(conn, key_id, presented)
        if found is None:
            raise self._failure(key_id, presented, peer)
        partner_id, overrides = found
        principal = models.Principal(partner_id, key_id, presented)
        self._keys[key_id] = principal
        self._keys.move_to_end(key_id)
        if len(self._keys) > _MAX_KEYS:
            self._keys.popitem(last=False)
        return principal, self.guard.learn(partner_id, overrides)

    def _refuse_known_failure(self, key_id: str, presented: bytes, peer: str) -> None:
        """Refuse, without a query, a key that failed lately, or a peer that fails too often."""
        until = self._failed.get((key_id, presented))
        if until is not None and self._clock() < until:
            raise self._failure(key_id, presented, peer, known=True)
        wait = self._failures.peek(peer, _FAILURES_PER_SECOND, _FAILURE_BURST)
        if wait > 0:
            raise ResourceExhausted(
                "too many failed authentications from this address", reason="AUTHENTICATION_RATE_LIMITED",
                retry_delay=wait,
            )  # fmt: skip

    def _failure(self, key_id: str, presented: bytes, peer: str, *, known: bool = False) -> Unauthenticated:
        """Count a failed authentication against ``peer``, remember the key as failed; the error to answer."""
        self._failures.take(peer, _FAILURES_PER_SECOND, _FAILURE_BURST)
        if not known:
            self._failed[(key_id, presented)] = self._clock() + _FAILED_FOR
            if len(self._failed) > _MAX_FAILED:
                self._failed.popitem(last=False)
        return Unauthenticated("invalid credentials")


def _annotate(principal: models.Principal) -> None:
    annotate(partner_id=str(principal.partner_id), key_id=principal.key_id, client_cert=principal.client_cert or None)


def key_refusal(access: models.KeyAccess | None, partner_id: UUID) -> ApptgateError | None:
    """What ends a stream of ``partner_id`` opened with a key now worth ``access`` (``None``: gone), if anything."""
    if access is None or access.revoked or access.partner_id != partner_id:
        return Unauthenticated("the key was revoked")
    return None


def stream_refusal(watched: UUID | None, granted: Collection[UUID]) -> ApptgateError | None:
    """What ends a stream watching ``watched`` (``None``: every granted practitioner) now that ``granted`` are.

    ``None`` when it may go on.
    """
    if watched is not None:
        if watched not in granted:
            return PermissionDenied("the practitioner revoked access", reason="ACCESS_REVOKED")
    elif not granted:
        return PermissionDenied("no practitioner grants access any more", reason="ACCESS_REVOKED")
    return None
