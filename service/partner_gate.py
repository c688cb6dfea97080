"""What every partner call does around its read: authenticate, admit, audit entry, disclosure metrics.

Shared by the unary calls (:mod:`service.partner_api`) and the change feed
(:mod:`service.watch_api`), so both decide who calls, and record what left,
the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from uuid import UUID

from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import auth, models
from service.consent import CONTACT_FIELDS
from service.errors import ApptgateError, Unauthenticated
from service.extraction import SUSPENDED, ExtractionGuard
from service.limits import PartnerPolicy
from service.store import ledger, partner_reads, partners
from service.store.database import Connection, Database
from service.telemetry import Telemetry, annotate, current_trace_id

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PartnerAppointmentService"].full_name
_RPC_PREFIX = f"/{SERVICE_NAME}/"
_MAX_KEYS = 10_000


class PartnerGate:
    """Authenticates partner calls and describes their disclosures."""

    def __init__(self, database: Database, guard: ExtractionGuard, telemetry: Telemetry) -> None:
        self.guard = guard
        self._db = database
        self._telemetry = telemetry
        # Key id → the key as stored. What is cached never changes for a key (its
        # partner and secret hash); what does (revocation, the partner's
        # suspension) is checked by every read statement, which refuses with
        # KEY_INVALID or SUSPENDED (then :meth:`refused` drops the entry).
        self._keys: OrderedDict[str, models.PartnerKey] = OrderedDict()

    async def admit(self, token: str, key_id: str) -> tuple[auth.Principal, PartnerPolicy]:
        """Verify the key against its cached hash and apply the rate limit; return who calls and its limits.

        The partner-path statement that follows must re-check that the key is
        live (the functions of migration 0013 do). Reads the key and the
        partner's limits from the database only when they are not cached, or
        the limits are older than :data:`~service.extraction.POLICY_TTL`.
        """
        key = self._keys.get(key_id)
        policy = self.guard.known_policy(key.partner_id) if key is not None else None
        if key is None or policy is None:
            async with self._db.partner_statements() as conn:
                stored, overrides = await partners.authenticate_key(conn, key_id)
            principal = auth.verify_partner_key(token, stored)
            assert stored is not None
            policy = self.guard.learn(principal.partner_id, overrides)
            if policy.suspended:
                raise SUSPENDED
            self._keys[key_id] = stored
            if len(self._keys) > _MAX_KEYS:
                self._keys.popitem(last=False)
        else:
            principal = auth.verify_partner_key(token, key)
            self._keys.move_to_end(key_id)
        annotate(partner_id=str(principal.partner_id), key_id=principal.key_id)
        self.guard.throttle(principal.partner_id, policy)
        return principal, policy

    def refused(self, refusal: partner_reads.Refusal, principal: auth.Principal) -> ApptgateError:
        """The answer to a read statement's refusal of a live-looking key (revoked or suspended since cached)."""
        self._keys.pop(principal.key_id, None)
        self.guard.forget(principal.partner_id)
        if refusal.kind == partner_reads.SUSPENDED:
            return SUSPENDED
        return Unauthenticated("invalid credentials")

    async def authenticate(self, conn: Connection, token: str, key_id: str) -> tuple[auth.Principal, PartnerPolicy]:
        """Verify the key in ``conn``'s transaction, then refuse a suspended or too eager partner.

        Binds the partner for row-level security for the rest of the
        transaction; for paths that run several statements in one transaction.
        """
        key, overrides = await partners.authenticate_key(conn, key_id)
        principal = auth.verify_partner_key(token, key)
        annotate(partner_id=str(principal.partner_id), key_id=principal.key_id)
        policy = self.guard.policy(overrides)
        self.guard.admit(principal.partner_id, policy)
        return principal, policy

    def disclosed(self, view: str, count: int, fields: Sequence[int] = ()) -> None:
        """Annotate the call's span and count what it disclosed, by view and contact field."""
        annotate(view=view, appointments=count)
        if view == "basic":
            self._telemetry.disclosures.add(count, {"view": view, "contact_field": "none"})
        for number in fields:
            self._telemetry.disclosures.add(count, {"view": view, "contact_field": CONTACT_FIELDS[number]})

    @staticmethod
    def entry(
        principal: auth.Principal,
        rpc: str,
        view: int,
        *,
        denial_reason: str = "",
        contact_fields: Sequence[int] = (),
        consent_id: UUID | None = None,
    ) -> ledger.Entry:
        """The ledger entry of this call; a ``denial_reason`` marks a refused attempt."""
        return ledger.Entry(
            principal.partner_id,
            principal.key_id,
            _RPC_PREFIX + rpc,
            current_trace_id(),
            view,
            outcome=ledger.OUTCOME_DENIED if denial_reason else ledger.OUTCOME_DISCLOSED,
            denial_reason=denial_reason,
            contact_fields=contact_fields,
            consent_id=consent_id,
        )
