"""Who may call the partner service, and whether a call or a stream may go on: the one place access is decided.

A partner call is admitted in two steps. :meth:`PartnerGate.admit` verifies
the bearer key in constant time against its cached hash and applies the
request rate; then the call's read statement (:mod:`service.store.partner_reads`,
as the partner role) re-checks the facts that change — the key revoked, the
partner suspended — and joins the caller's active grants, so a revocation
bites on the next call. A refusal of that statement comes back through
:meth:`PartnerGate.refused`, which forgets what was cached. What a partner may
*see* of an appointment is decided by :mod:`service.disclosure.views`; whether
a contact field may be seen, by a consent (:mod:`service.access.consent_tokens`
and the record statement that checks it).

A change-feed stream is judged again whenever access changes
(:func:`stream_refusal`, :func:`key_refusal`), by the hub when it is told of a
change and by every delivery, which re-reads the key and the grants in the
transaction that records it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from uuid import UUID

from service import models
from service.access import credentials
from service.access.limits import ExtractionGuard, PartnerPolicy
from service.errors import ApptgateError, PartnerSuspended, PermissionDenied, Unauthenticated
from service.store import partners
from service.store.database import PARTNER_ROLE, Connection, Database
from service.store.partner_reads import ReadRefused, Refusal
from service.telemetry.tracing import annotate

Metadata = Iterable[tuple[str, str | bytes]] | None

#: Keys a process keeps verified, least recently used out first.
_MAX_KEYS = 10_000


class PartnerGate:
    """Admits partner calls: the key, the partner's limits, and what the database refuses later."""

    def __init__(self, database: Database, guard: ExtractionGuard) -> None:
        self.guard = guard
        self._db = database
        # Key id → the key as stored. What is cached never changes for a key (its partner and
        # secret hash); what does (revocation, the partner's suspension) is checked by every
        # read statement, whose refusal drops the entry (refused).
        self._keys: OrderedDict[str, models.PartnerKey] = OrderedDict()

    async def admit(self, metadata: Metadata) -> tuple[credentials.Principal, PartnerPolicy]:
        """Verify the call's key and apply its partner's request rate; return who calls and its limits.

        The partner-path statement that follows must re-check that the key is
        live (the functions of migration 0007 do). Reads the key and the
        partner's limits only when they are not cached, or the limits are older
        than :data:`~service.access.limits.POLICY_TTL`. Raises
        :class:`~service.errors.Unauthenticated`, :class:`PartnerSuspended` or
        RESOURCE_EXHAUSTED.
        """
        token = credentials.bearer_token(metadata)
        key_id = credentials.partner_key_id(token)
        key = self._keys.get(key_id)
        policy = self.guard.known_policy(key.partner_id) if key is not None else None
        if key is None or policy is None:
            async with self._db.partner_statements() as conn:
                stored, overrides = await partners.authenticate_key(conn, key_id)
            principal = credentials.verify_partner_key(token, stored)
            assert stored is not None
            policy = self.guard.learn(principal.partner_id, overrides)
            if policy.suspended:
                raise PartnerSuspended()
            self._keys[key_id] = stored
            if len(self._keys) > _MAX_KEYS:
                self._keys.popitem(last=False)
        else:
            principal = credentials.verify_partner_key(token, key)
            self._keys.move_to_end(key_id)
        annotate(partner_id=str(principal.partner_id), key_id=principal.key_id)
        self.guard.throttle(principal.partner_id, policy)
        return principal, policy

    async def admit_in(self, conn: Connection, metadata: Metadata) -> tuple[credentials.Principal, PartnerPolicy]:
        """:meth:`admit` inside ``conn``'s transaction, reading the key and limits afresh.

        Binds the partner for row-level security for the rest of the
        transaction; for paths that run several statements in one transaction
        (opening a stream).
        """
        token = credentials.bearer_token(metadata)
        key, overrides = await partners.authenticate_key(conn, credentials.partner_key_id(token))
        principal = credentials.verify_partner_key(token, key)
        annotate(partner_id=str(principal.partner_id), key_id=principal.key_id)
        policy = self.guard.policy(overrides)
        self.guard.admit(principal.partner_id, policy)
        return principal, policy

    async def admit_live(self, metadata: Metadata) -> tuple[credentials.Principal, PartnerPolicy]:
        """:meth:`admit_in` a transaction of its own: for a call with no read statement to re-check the key."""
        async with self._db.transaction(role=PARTNER_ROLE, readonly=True) as conn:
            return await self.admit_in(conn, metadata)

    def refused(self, refused: ReadRefused, principal: credentials.Principal) -> ApptgateError:
        """The answer to a read statement's refusal of a key that looked live (revoked or suspended since cached)."""
        self._keys.pop(principal.key_id, None)
        self.guard.forget(principal.partner_id)
        if refused.refusal is Refusal.PARTNER_SUSPENDED:
            return PartnerSuspended()
        return Unauthenticated("invalid credentials")


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
