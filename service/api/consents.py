"""The internal ConsentService: records consents and issues their signed tokens."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc.aio
from appointments.internal.v1 import (
    consent_pb2,
)
from appointments.internal.v1 import (
    consent_service_pb2 as pb,
)
from appointments.internal.v1 import (
    consent_service_pb2_grpc as pb_grpc,
)
from google.protobuf.duration_pb2 import Duration

from service import models
from service.access.consent_tokens import CONTACT_FIELDS, ConsentClaims, ConsentKeyring
from service.api import validation
from service.disclosure.pseudonyms import Pseudonyms
from service.errors import FieldViolation
from service.store import consents
from service.store.database import Database
from service.timestamps import set_timestamp

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConsentService"].full_name
MIN_TTL = timedelta(seconds=1)
_MAX_DURATION_SECONDS = 315_576_000_000


def consent_message(row: models.Consent, token: str = "") -> consent_pb2.Consent:
    """The internal message of a consent; ``token`` only in GrantConsent's answer."""
    message = consent_pb2.Consent(
        consent_id=str(row.id),
        patient_id=str(row.patient_id),
        partner_id=str(row.partner_id),
        fields=list(row.fields),  # type: ignore[arg-type]
        purpose=row.purpose,
        token=token,
        signing_key_id=row.signing_key_id,
    )
    set_timestamp(message.create_time, row.create_time)
    set_timestamp(message.expire_time, row.expire_time)
    if row.revoke_time is not None:
        set_timestamp(message.revoke_time, row.revoke_time)
    return message


def _ttl(value: Duration, max_ttl: timedelta, problems: list[FieldViolation]) -> timedelta:
    if abs(value.seconds) > _MAX_DURATION_SECONDS or not -999_999_999 <= value.nanos <= 999_999_999:
        problems.append(FieldViolation("ttl", "must be a valid duration"))
        return timedelta(0)
    ttl = timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)
    if ttl < MIN_TTL:
        problems.append(FieldViolation("ttl", "must be at least 1 second"))
    elif ttl > max_ttl:
        problems.append(FieldViolation("ttl", f"must be at most {int(max_ttl.total_seconds())} seconds"))
    return ttl


def _fields(values: list[int], problems: list[FieldViolation]) -> tuple[int, ...]:
    if not values:
        problems.append(FieldViolation("fields", "at least one contact field is required"))
    seen: set[int] = set()
    for index, value in enumerate(values):
        if value not in CONTACT_FIELDS:
            problems.append(FieldViolation(f"fields[{index}]", "must be a contact field other than UNSPECIFIED"))
        elif value in seen:
            problems.append(FieldViolation(f"fields[{index}]", "is repeated"))
        seen.add(value)
    return tuple(sorted(seen & set(CONTACT_FIELDS)))


class ConsentApi(pb_grpc.ConsentServiceServicer):
    """Serves ``appointments.internal.v1.ConsentService``."""

    def __init__(self, database: Database, keyring: ConsentKeyring, pseudonyms: Pseudonyms, max_ttl: timedelta) -> None:
        self._db = database
        self._keyring = keyring
        self._pseudonyms = pseudonyms
        self._max_ttl = max_ttl

    async def GrantConsent(
        self, request: pb.GrantConsentRequest, context: grpc.aio.ServicerContext
    ) -> consent_pb2.Consent:
        problems: list[FieldViolation] = []
        patient = validation.parse_uuid(request.patient_id, "patient_id", problems)
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        fields = _fields(list(request.fields), problems)
        if request.HasField("ttl"):
            ttl = _ttl(request.ttl, self._max_ttl, problems)
        else:
            problems.append(FieldViolation("ttl", "is required"))
        purpose = validation.text(request.purpose, "purpose", problems, max_length=200)
        validation.raise_if(problems)
        assert patient is not None and partner is not None
        now = datetime.now(UTC)
        consent_id, ids = uuid.uuid4(), self._pseudonyms.for_partner(partner)
        # The token names the patient and the consent as this partner knows them, never by internal id.
        claims = ConsentClaims(
            ids.consent_ref(consent_id), ids.patient_ref(patient), partner, fields, purpose, now, now + ttl
        )
        token = self._keyring.sign(claims)
        row = models.Consent(
            consent_id, patient, partner, fields, purpose, self._keyring.active_key_id, now, now + ttl, None
        )
        async with self._db.transaction() as conn:
            await consents.insert(conn, row)
        return consent_message(row, token)

    async def RevokeConsent(
        self, request: pb.RevokeConsentRequest, context: grpc.aio.ServicerContext
    ) -> consent_pb2.Consent:
        consent_id = validation.uuid_field(request.consent_id, "consent_id")
        async with self._db.transaction() as conn:
            return consent_message(await consents.revoke(conn, consent_id))

    async def ListConsents(
        self, request: pb.ListConsentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentsResponse:
        patient = validation.uuid_field(request.patient_id, "patient_id")
        async with self._db.transaction(readonly=True) as conn:
            rows = await consents.list_for_patient(conn, patient)
        return pb.ListConsentsResponse(consents=[consent_message(row) for row in rows])
