"""The internal ConsentService: records consents and issues their signed tokens."""

from __future__ import annotations

import struct
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

from service import models
from service.access.consent_tokens import ConsentClaims, ConsentKeyring
from service.api import validation
from service.disclosure.consent_requests import ConsentRequests, Decision
from service.disclosure.pagination import PageTokens
from service.disclosure.pseudonyms import Pseudonyms
from service.errors import FieldViolation
from service.store import consents
from service.store.database import Database
from service.timestamps import from_micros, set_timestamp, to_micros

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConsentService"].full_name
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
#: A page of consent requests ends at (create time in microseconds, request id).
_CURSOR = struct.Struct(">q16s")
#: ``ConsentRequestState`` numbers of the internal API, to the stored states.
_STATES = {state.number: state for state in models.ConsentRequestState}


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


class ConsentApi(pb_grpc.ConsentServiceServicer):
    """Serves ``appointments.internal.v1.ConsentService``."""

    def __init__(
        self,
        database: Database,
        keyring: ConsentKeyring,
        pseudonyms: Pseudonyms,
        max_ttl: timedelta,
        requests: ConsentRequests,
        page_tokens: PageTokens,
    ) -> None:
        self._db = database
        self._keyring = keyring
        self._pseudonyms = pseudonyms
        self._max_ttl = max_ttl
        self._requests = requests
        self._page_tokens = page_tokens

    async def GrantConsent(
        self, request: pb.GrantConsentRequest, context: grpc.aio.ServicerContext
    ) -> consent_pb2.Consent:
        problems: list[FieldViolation] = []
        patient = validation.parse_uuid(request.patient_id, "patient_id", problems)
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        fields = validation.contact_fields(list(request.fields), problems)
        if request.HasField("ttl"):
            ttl = validation.ttl(request.ttl, problems, maximum=self._max_ttl)
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

    async def ListConsentRequests(
        self, request: pb.ListConsentRequestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentRequestsResponse:
        problems: list[FieldViolation] = []
        patient = validation.parse_uuid(request.patient_id, "patient_id", problems)
        states = []
        for index, value in enumerate(request.states):
            if value not in _STATES:
                problems.append(FieldViolation(f"states[{index}]", "must be a state other than UNSPECIFIED"))
            else:
                states.append(_STATES[value])
        size = validation.page_size(request.page_size, problems, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        validation.raise_if(problems)
        assert patient is not None
        binding = b"ListConsentRequests|" + patient.bytes + b"|" + ",".join(sorted(s.value for s in states)).encode()
        before = None
        if request.page_token:
            cursor = self._page_tokens.open(request.page_token, binding)
            micros, raw_id = _CURSOR.unpack(cursor)
            before = (from_micros(micros), uuid.UUID(bytes=raw_id))
        rows = await self._requests.list_for_patient(patient, tuple(states), before, size + 1)
        response = pb.ListConsentRequestsResponse(consent_requests=[self._patient_message(row) for row in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = self._page_tokens.seal(
                _CURSOR.pack(to_micros(last.create_time), last.id.bytes), binding
            )
        return response

    async def ApproveConsentRequest(
        self, request: pb.ApproveConsentRequestRequest, context: grpc.aio.ServicerContext
    ) -> consent_pb2.PatientConsentRequest:
        problems: list[FieldViolation] = []
        request_id = validation.parse_uuid(request.consent_request_id, "consent_request_id", problems)
        fields = validation.contact_fields(list(request.fields), problems, required=False) or None
        ttl = validation.ttl(request.ttl, problems, maximum=self._max_ttl) if request.HasField("ttl") else None
        validation.raise_if(problems)
        assert request_id is not None
        row = await self._requests.approve(Decision(request_id, fields, ttl))
        return self._patient_message(row)

    async def DenyConsentRequest(
        self, request: pb.DenyConsentRequestRequest, context: grpc.aio.ServicerContext
    ) -> consent_pb2.PatientConsentRequest:
        request_id = validation.uuid_field(request.consent_request_id, "consent_request_id")
        return self._patient_message(await self._requests.deny(request_id))

    def _patient_message(self, row: models.PatientConsentRequest) -> consent_pb2.PatientConsentRequest:
        purpose, text = self._requests.opened_text(row)
        message = consent_pb2.PatientConsentRequest(
            consent_request_id=str(row.id),
            partner_id=str(row.partner_id),
            partner_display_name=row.partner_display_name,
            appointment_id=str(row.appointment_id),
            practitioner_display_name=row.practitioner_display_name,
            practitioner_specialty=row.practitioner_specialty,
            fields=list(row.fields),  # type: ignore[arg-type]
            purpose=purpose,
            message=text,
            state=row.state.number,  # type: ignore[arg-type]
            granted_fields=list(row.granted_fields),  # type: ignore[arg-type]
            consent_id=str(row.consent_id) if row.consent_id is not None else "",
        )
        set_timestamp(message.appointment_start_time, row.appointment_start_time)
        set_timestamp(message.create_time, row.create_time)
        set_timestamp(message.expire_time, row.expire_time)
        message.ttl.FromTimedelta(row.ttl)
        if row.decide_time is not None:
            set_timestamp(message.decide_time, row.decide_time)
        return message
