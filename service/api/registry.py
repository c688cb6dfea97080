"""The internal PartnerRegistryService: partners, their keys, practitioners' grants, and their limits.

It runs on the internal listener only, behind the internal token. A change of
a partner's limits applies at once in this process and within
:data:`~service.access.limits.POLICY_TTL` in the others.
"""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime
from typing import cast
from uuid import UUID

import grpc.aio
from appointments.internal.v1 import partner_registry_pb2
from appointments.internal.v1 import partner_registry_service_pb2 as registry_pb
from appointments.internal.v1 import partner_registry_service_pb2_grpc as registry_grpc

from service import models
from service.access import credentials
from service.access.limits import ExtractionGuard, PartnerPolicy
from service.api import validation
from service.disclosure import pagination
from service.errors import FieldViolation, InvalidArgument
from service.store import partners, usage
from service.store.database import Database
from service.timestamps import from_micros, set_timestamp, to_micros

SERVICE_NAME = registry_pb.DESCRIPTOR.services_by_name["PartnerRegistryService"].full_name
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
#: A page of keys ends at (create time in microseconds, then the key id's ASCII).
_KEY_CURSOR = struct.Struct(">q")
_LIST_PARTNERS = b"ListPartners"


def partner_message(row: models.Partner) -> partner_registry_pb2.Partner:
    """The message of a partner, as GetPartner and ListPartners answer it."""
    message = partner_registry_pb2.Partner(partner_id=str(row.id), display_name=row.display_name)
    set_timestamp(message.create_time, row.create_time)
    return message


def key_message(row: models.KeyStanding, secret: str = "") -> partner_registry_pb2.PartnerKey:
    """The message of a key; ``secret`` only in IssuePartnerKey's answer, and never a hash."""
    message = partner_registry_pb2.PartnerKey(
        key_id=row.id,
        partner_id=str(row.partner_id),
        secret=secret,
        client_cert_sha256=row.client_cert_sha256.hex() if row.client_cert_sha256 is not None else "",
        state=row.state.value,  # type: ignore[arg-type]
    )
    set_timestamp(message.create_time, row.create_time)
    for name in ("revoke_time", "expire_time", "last_use_time"):
        value = getattr(row, name)
        if value is not None:
            set_timestamp(getattr(message, name), value)
    return message


def limits_message(
    partner_id: UUID, policy: PartnerPolicy, overrides: models.PartnerOverrides
) -> partner_registry_pb2.PartnerLimits:
    """The message of a partner's limits in force (``policy``) and its suspension (``overrides``)."""
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


def usage_message(
    partner_id: UUID, today: models.PartnerUsage, limits: partner_registry_pb2.PartnerLimits
) -> partner_registry_pb2.PartnerUsage:
    """The message of a partner's use of its limits today."""
    message = partner_registry_pb2.PartnerUsage(
        partner_id=str(partner_id),
        day=today.day,
        disclosures=today.disclosures,
        contact_disclosures=today.contact_disclosures,
        patients_reached=today.patients_reached,
        recent_daily_average=today.recent_daily_average,
        limits=limits,
    )
    if today.flag_time is not None:
        set_timestamp(message.flag_time, today.flag_time)
    return message


def grant_message(row: models.PractitionerGrant) -> partner_registry_pb2.PractitionerGrant:
    """The message of a practitioner's grant to a partner."""
    message = partner_registry_pb2.PractitionerGrant(
        partner_id=str(row.partner_id), practitioner_id=str(row.practitioner_id)
    )
    set_timestamp(message.grant_time, row.grant_time)
    if row.revoke_time is not None:
        set_timestamp(message.revoke_time, row.revoke_time)
    return message


def _limit_values(values: dict[str, float | None], problems: list[FieldViolation]) -> dict[str, float | None]:
    """Check limit overrides (``None`` keeps the current value): a positive rate and burst, caps of zero or more."""
    for name, value in values.items():
        positive = name in ("requests_per_second", "burst")
        if value is not None and (not math.isfinite(value) or not (value > 0 if positive else value >= 0)):
            problems.append(FieldViolation(name, "must be positive" if positive else "must be zero or more"))
    return values


def _expire_time(value: datetime | None, problems: list[FieldViolation]) -> datetime | None:
    """Check a new key's expire time: unset, or in the future (by this process's clock)."""
    if value is not None and value <= datetime.now(UTC):
        problems.append(FieldViolation("expire_time", "must be in the future"))
    return value


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

    def __init__(self, database: Database, guard: ExtractionGuard, page_tokens: pagination.PageTokens) -> None:
        self._db = database
        self._guard = guard
        self._page_tokens = page_tokens

    def _limits_message(
        self, partner_id: UUID, overrides: models.PartnerOverrides
    ) -> partner_registry_pb2.PartnerLimits:
        return limits_message(partner_id, self._guard.policy(overrides), overrides)

    async def SetPartnerLimits(
        self, request: registry_pb.SetPartnerLimitsRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerLimits:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        values = _limit_values(
            {
                name: getattr(request, name) if request.HasField(name) else None
                for name in ("requests_per_second", "burst", "contact_daily_cap", "patient_daily_cap")
            },
            problems,
        )
        validation.raise_if(problems)
        assert partner is not None
        async with self._db.transaction() as conn:
            overrides = await usage.set_limits(
                conn,
                partner,
                requests_per_second=values["requests_per_second"],
                burst=cast(int | None, values["burst"]),
                contact_daily_cap=cast(int | None, values["contact_daily_cap"]),
                patient_daily_cap=cast(int | None, values["patient_daily_cap"]),
            )
        self._guard.forget(partner)  # this process applies them at once; others within POLICY_TTL
        return self._limits_message(partner, overrides)

    async def GetPartnerUsage(
        self, request: registry_pb.GetPartnerUsageRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerUsage:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        async with self._db.transaction(readonly=True) as conn:
            overrides = await usage.overrides(conn, partner)
            today = await usage.today(conn, partner)
        return usage_message(partner, today, self._limits_message(partner, overrides))

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
        return partner_message(row)

    async def ListPartners(
        self, request: registry_pb.ListPartnersRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb.ListPartnersResponse:
        problems: list[FieldViolation] = []
        size = validation.page_size(request.page_size, problems, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        validation.raise_if(problems)
        after = None
        if request.page_token:
            micros, last = pagination.unpack_time_cursor(self._page_tokens.open(request.page_token, _LIST_PARTNERS))
            after = (from_micros(micros), last)
        async with self._db.transaction(readonly=True) as conn:
            rows = await partners.list_partners(conn, after=after, limit=size + 1)
        response = registry_pb.ListPartnersResponse(partners=[partner_message(row) for row in rows[:size]])
        if len(rows) > size:
            cursor = pagination.pack_time_cursor(to_micros(rows[size - 1].create_time), rows[size - 1].id)
            response.next_page_token = self._page_tokens.seal(cursor, _LIST_PARTNERS)
        return response

    async def GetPartner(
        self, request: registry_pb.GetPartnerRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.Partner:
        partner = validation.uuid_field(request.partner_id, "partner_id")
        async with self._db.transaction(readonly=True) as conn:
            return partner_message(await partners.get_partner(conn, partner))

    async def IssuePartnerKey(
        self, request: registry_pb.IssuePartnerKeyRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerKey:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        bound = validation.sha256_hex(request.client_cert_sha256, "client_cert_sha256", problems)
        lapse = validation.timestamp(request, "expire_time", problems, required=False)
        _expire_time(lapse, problems)
        validation.raise_if(problems)
        assert partner is not None
        issued = credentials.new_partner_key()
        async with self._db.transaction() as conn:
            await partners.insert_key(conn, issued.key_id, partner, issued.secret_hash, bound, lapse)
            standing = await partners.key_standing(conn, issued.key_id)
        assert standing is not None
        return key_message(standing, issued.secret)

    async def ListPartnerKeys(
        self, request: registry_pb.ListPartnerKeysRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb.ListPartnerKeysResponse:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        size = validation.page_size(request.page_size, problems, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        validation.raise_if(problems)
        assert partner is not None
        binding = b"ListPartnerKeys|" + partner.bytes
        after = None
        if request.page_token:
            cursor = self._page_tokens.open(request.page_token, binding)
            (micros,) = _KEY_CURSOR.unpack_from(cursor)
            after = (from_micros(micros), cursor[_KEY_CURSOR.size :].decode("ascii"))
        async with self._db.transaction(readonly=True) as conn:
            rows = await partners.key_standings(conn, partner, after=after, limit=size + 1)
        response = registry_pb.ListPartnerKeysResponse(keys=[key_message(row) for row in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            cursor = _KEY_CURSOR.pack(to_micros(last.create_time)) + last.id.encode("ascii")
            response.next_page_token = self._page_tokens.seal(cursor, binding)
        return response

    async def RevokePartnerKey(
        self, request: registry_pb.RevokePartnerKeyRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PartnerKey:
        if not request.key_id:
            raise InvalidArgument.field("key_id", "is required")
        if not credentials.is_key_id(request.key_id):
            raise InvalidArgument.field("key_id", "not a key id")
        async with self._db.transaction() as conn:
            await partners.revoke_key(conn, request.key_id)
            standing = await partners.key_standing(conn, request.key_id)
        assert standing is not None  # revoke_key found it in this transaction; keys are never deleted
        return key_message(standing)

    async def GrantPractitionerAccess(
        self, request: registry_pb.GrantPractitionerAccessRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PractitionerGrant:
        partner, practitioner = _pair(request)
        async with self._db.transaction() as conn:
            return grant_message(await partners.grant_access(conn, partner, practitioner))

    async def RevokePractitionerAccess(
        self, request: registry_pb.RevokePractitionerAccessRequest, context: grpc.aio.ServicerContext
    ) -> partner_registry_pb2.PractitionerGrant:
        partner, practitioner = _pair(request)
        async with self._db.transaction() as conn:
            return grant_message(await partners.revoke_access(conn, partner, practitioner))
