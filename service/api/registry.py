"""The internal PartnerRegistryService: partners, their keys, practitioners' grants, and their limits.

It runs on the internal listener only, behind the internal token. A change of
a partner's limits applies at once in this process and within
:data:`~service.access.limits.POLICY_TTL` in the others.
"""

from __future__ import annotations

import math
from uuid import UUID

import grpc.aio
from appointments.internal.v1 import partner_registry_pb2
from appointments.internal.v1 import partner_registry_service_pb2 as registry_pb
from appointments.internal.v1 import partner_registry_service_pb2_grpc as registry_grpc

from service import models
from service.access import credentials
from service.access.limits import ExtractionGuard
from service.api import validation
from service.errors import FieldViolation, InvalidArgument
from service.store import partners, usage
from service.store.database import Database
from service.timestamps import set_timestamp

SERVICE_NAME = registry_pb.DESCRIPTOR.services_by_name["PartnerRegistryService"].full_name


def _key_message(row: models.PartnerKey, secret: str = "") -> partner_registry_pb2.PartnerKey:
    message = partner_registry_pb2.PartnerKey(
        key_id=row.id,
        partner_id=str(row.partner_id),
        secret=secret,
        client_cert_sha256=row.client_cert_sha256.hex() if row.client_cert_sha256 is not None else "",
    )
    set_timestamp(message.create_time, row.create_time)
    if row.revoke_time is not None:
        set_timestamp(message.revoke_time, row.revoke_time)
    return message


def _grant_message(row: models.PractitionerGrant) -> partner_registry_pb2.PractitionerGrant:
    message = partner_registry_pb2.PractitionerGrant(
        partner_id=str(row.partner_id), practitioner_id=str(row.practitioner_id)
    )
    set_timestamp(message.grant_time, row.grant_time)
    if row.revoke_time is not None:
        set_timestamp(message.revoke_time, row.revoke_time)
    return message


def _pair(
    request: registry_pb.GrantPractitionerAccessRequest | registry_pb.RevokePractitionerAccessRequest,
) -> tuple[UUID, UUID]:
    problems: list[FieldViolation] = []
    partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
    practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems)
    validation.raise_if(problems)
    assert partner is not None and practitioner is not None
    return partner, practitioner


class PartnerRegistryApi(registry_grpc.PartnerRegistryServiceServicer):
    """Serves ``appointments.internal.v1.PartnerRegistryService``."""

    def __init__(self, database: Database, guard: ExtractionGuard) -> None:
        self._db = database
        self._guard = guard

    def _limits_message(
        self, partner_id: UUID, overrides: models.PartnerOverrides
    ) -> partner_registry_pb2.PartnerLimits:
        policy = self._guard.policy(overrides)
        message = partner_registry_pb2.PartnerLimits(
            partner_id=str(partner_id),
            requests_per_second=policy.requests_per_second,
            burst=policy.burst,
            contact_daily_cap=policy.contact_daily_cap,
            patient_daily_cap=policy.patient_daily_cap,
            suspend_reason=overrides.suspend_reason,
        )
        if overrides.suspend_time is not None:
            set_timestamp(message.suspend_time, overrides.suspend_time)
        return message

    async def SetPartnerLimits(
        self, request: registry_pb.SetPartnerLimitsRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerLimits:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        values = {
            name: getattr(request, name) if request.HasField(name) else None
            for name in ("requests_per_second", "burst", "contact_daily_cap", "patient_daily_cap")
        }
        for name, value in values.items():
            positive = value is None or (value > 0 if name in ("requests_per_second", "burst") else value >= 0)
            if not positive or (value is not None and not math.isfinite(value)):
                problems.append(FieldViolation(name, "must be positive"))
        validation.raise_if(problems)
        assert partner is not None
        async with self._db.transaction() as conn:
            overrides = await usage.set_limits(conn, partner, **values)
        self._guard.forget(partner)  # this process applies them at once; others within POLICY_TTL
        return self._limits_message(partner, overrides)

    async def GetPartnerUsage(
        self, request: registry_pb.GetPartnerUsageRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerUsage:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        async with self._db.transaction(readonly=True) as conn:
            overrides = await usage.overrides(conn, partner)
            today = await usage.today(conn, partner)
        message = partner_registry_pb2.PartnerUsage(
            partner_id=str(partner),
            day=today.day,
            disclosures=today.disclosures,
            contact_disclosures=today.contact_disclosures,
            patients_reached=today.patients_reached,
            recent_daily_average=today.recent_daily_average,
            limits=self._limits_message(partner, overrides),
        )
        if today.flag_time is not None:
            set_timestamp(message.flag_time, today.flag_time)
        return message

    async def LiftPartnerSuspension(
        self, request: registry_pb.LiftPartnerSuspensionRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerLimits:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        async with self._db.transaction() as conn:
            overrides = await usage.lift_suspension(conn, partner)
        self._guard.forget(partner)
        return self._limits_message(partner, overrides)

    async def CreatePartner(
        self, request: registry_pb.CreatePartnerRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.Partner:
        problems: list[FieldViolation] = []
        name = validation.text(request.display_name, "display_name", problems, max_length=validation.NAME_LENGTH)
        validation.raise_if(problems)
        async with self._db.transaction() as conn:
            row = await partners.create_partner(conn, name)
        message = partner_registry_pb2.Partner(partner_id=str(row.id), display_name=row.display_name)
        set_timestamp(message.create_time, row.create_time)
        return message

    async def IssuePartnerKey(
        self, request: registry_pb.IssuePartnerKeyRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerKey:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        bound = validation.sha256_hex(request.client_cert_sha256, "client_cert_sha256", problems)
        validation.raise_if(problems)
        assert partner is not None
        issued = credentials.new_partner_key()
        async with self._db.transaction() as conn:
            row = await partners.insert_key(conn, issued.key_id, partner, issued.secret_hash, bound)
        return _key_message(row, issued.secret)

    async def RevokePartnerKey(
        self, request: registry_pb.RevokePartnerKeyRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerKey:
        if not request.key_id:
            raise InvalidArgument.field("key_id", "is required")
        if not credentials.is_key_id(request.key_id):
            raise InvalidArgument.field("key_id", "not a key id")
        async with self._db.transaction() as conn:
            return _key_message(await partners.revoke_key(conn, request.key_id))

    async def GrantPractitionerAccess(
        self, request: registry_pb.GrantPractitionerAccessRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PractitionerGrant:
        partner, practitioner = _pair(request)
        async with self._db.transaction() as conn:
            return _grant_message(await partners.grant_access(conn, partner, practitioner))

    async def RevokePractitionerAccess(
        self, request: registry_pb.RevokePractitionerAccessRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PractitionerGrant:
        partner, practitioner = _pair(request)
        async with self._db.transaction() as conn:
            return _grant_message(await partners.revoke_access(conn, partner, practitioner))
