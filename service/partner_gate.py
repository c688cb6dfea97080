"""What every partner call does around its read: authenticate, admit, audit entry, disclosure metrics.

Shared by the unary calls (:mod:`service.partner_api`) and the change feed
(:mod:`service.watch_api`), so both decide who calls, and record what left,
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from service import auth
from service.consent import CONTACT_FIELDS
from service.extraction import ExtractionGuard
from service.limits import PartnerPolicy
from service.store import ledger, partners
from service.store.database import Connection
from service.telemetry import Telemetry, annotate, current_trace_id

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PartnerAppointmentService"].full_name
_RPC_PREFIX = f"/{SERVICE_NAME}/"


class PartnerGate:
    """Authenticates partner calls and describes their disclosures."""

    def __init__(self, guard: ExtractionGuard, telemetry: Telemetry) -> None:
        self.guard = guard
        self._telemetry = telemetry

    async def authenticate(self, conn: Connection, token: str, key_id: str) -> tuple[auth.Principal, PartnerPolicy]:
        """Verify the key, then refuse a suspended or too eager partner; return who calls and its limits."""
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
