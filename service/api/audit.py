"""The internal AuditService: the disclosure trail, the breach-scope report, a patient's history and events."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID

import grpc.aio
from appointments.internal.v1 import (
    audit_pb2,
)
from appointments.internal.v1 import (
    audit_service_pb2 as pb,
)
from appointments.internal.v1 import (
    audit_service_pb2_grpc as pb_grpc,
)

from service import models
from service.access import credentials
from service.api import validation
from service.disclosure import breach, breach_scope, pagination
from service.errors import FieldViolation, InvalidArgument, NotFound
from service.feed.privacy import PrivacyWatches
from service.store import breaches, disclosures, privacy
from service.store.database import Database
from service.timestamps import from_micros, set_timestamp, to_micros

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_CURSOR = struct.Struct(">qi")
#: ListPatientDisclosures: 50 entries a page by default, 500 at most.
HISTORY_PAGE_SIZE = 50
MAX_HISTORY_PAGE_SIZE = 500
#: A history page ends at (last time in microseconds, the entry's group key).
_HISTORY_CURSOR = struct.Struct(">q")
#: The window of a history without bounds: every record the ledger can hold.
_EVER = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


def _uuid_text(value: UUID | None) -> str:
    return str(value) if value is not None else ""


def disclosure_message(row: models.Disclosure) -> audit_pb2.Disclosure:
    """The internal message of a ledger record."""
    message = audit_pb2.Disclosure(
        disclosure_id=row.id,
        item=row.item,
        partner_id=str(row.partner_id),
        key_id=row.key_id,
        appointment_id=_uuid_text(row.appointment_id),
        patient_id=_uuid_text(row.patient_id),
        view=row.view,  # type: ignore[arg-type]
        contact_fields=list(row.contact_fields),  # type: ignore[arg-type]
        consent_id=_uuid_text(row.consent_id),
        rpc=row.rpc,
        trace_id=row.trace_id,
        outcome=row.outcome,  # type: ignore[arg-type]
        denial_reason=row.denial_reason,
        client_cert_sha256=row.client_cert,
    )
    set_timestamp(message.disclose_time, row.disclose_time)
    return message


def patient_disclosure_message(row: models.PatientDisclosure) -> audit_pb2.PatientDisclosure:
    """The internal message of one entry of a patient's history."""
    message = audit_pb2.PatientDisclosure(
        partner=audit_pb2.PartnerSummary(partner_id=str(row.partner_id), display_name=row.partner_display_name),
        appointment=audit_pb2.AppointmentSummary(
            appointment_id=_uuid_text(row.appointment_id),
            practitioner_display_name=row.practitioner_display_name,
            practitioner_specialty=row.practitioner_specialty,
        ),
        view=row.view.value,  # type: ignore[arg-type]
        fields=list(row.fields),  # type: ignore[arg-type]
        outcome=row.outcome.value,  # type: ignore[arg-type]
        denial_reason=row.denial_reason,
        consent_id=_uuid_text(row.consent_id),
        purpose=row.purpose,
        count=row.count,
    )
    if row.appointment_start_time is not None:
        set_timestamp(message.appointment.start_time, row.appointment_start_time)
    set_timestamp(message.first_time, row.first_time)
    set_timestamp(message.last_time, row.last_time)
    return message


class AuditApi(pb_grpc.AuditServiceServicer):
    """Serves ``appointments.internal.v1.AuditService``."""

    def __init__(self, database: Database, page_tokens: pagination.PageTokens, privacy_watches: PrivacyWatches) -> None:
        self._db = database
        self._page_tokens = page_tokens
        self._privacy_watches = privacy_watches

    async def ListDisclosures(
        self, request: pb.ListDisclosuresRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDisclosuresResponse:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems, required=False)
        patient = validation.parse_uuid(request.patient_id, "patient_id", problems, required=False)
        start = validation.timestamp(request, "start_time", problems, required=False)
        end = validation.timestamp(request, "end_time", problems, required=False)
        validation.window(start, end, problems)
        size = validation.page_size(request.page_size, problems, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        validation.raise_if(problems)
        binding = b"|".join(
            [b"ListDisclosures", request.partner_id.encode(), request.patient_id.encode(),
             request.start_time.SerializeToString(), request.end_time.SerializeToString()]
        )  # fmt: skip
        after = (0, 0)
        if request.page_token:
            try:
                after = _CURSOR.unpack(self._page_tokens.open(request.page_token, binding))
            except struct.error as exc:  # sealed by us, so only a format change gets here
                raise InvalidArgument.field("page_token", "unsupported page token") from exc
        async with self._db.transaction(readonly=True) as conn:
            rows = await disclosures.list_disclosures(
                conn,
                partner_id=partner,
                patient_id=patient,
                start_time=start,
                end_time=end,
                after=after,
                limit=size + 1,
            )
        response = pb.ListDisclosuresResponse(disclosures=[disclosure_message(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = self._page_tokens.seal(_CURSOR.pack(last.id, last.item), binding)
        return response

    async def BreachReport(
        self, request: pb.BreachReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.BreachReportResponse:
        problems: list[FieldViolation] = []
        partner = validation.parse_uuid(request.partner_id, "partner_id", problems)
        start = validation.timestamp(request, "start_time", problems)
        end = validation.timestamp(request, "end_time", problems)
        validation.window(start, end, problems)
        key_id = request.key_id if request.HasField("key_id") else None
        if key_id is not None and not credentials.is_key_id(key_id):
            problems.append(FieldViolation("key_id", "must be a key id"))
        validation.raise_if(problems)
        assert partner is not None and start is not None and end is not None
        # The ledger is not verified here (a walk of the whole chain): the response says so, and the
        # command line's report, which does verify it, says what it found.
        report = await breach_scope.read(self._db, breaches.Window(partner, start, end, key_id))
        return breach.response_message(report)

    async def ListPatientDisclosures(
        self, request: pb.ListPatientDisclosuresRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPatientDisclosuresResponse:
        problems: list[FieldViolation] = []
        patient = validation.parse_uuid(request.patient_id, "patient_id", problems)
        start = validation.timestamp(request, "start_time", problems, required=False)
        end = validation.timestamp(request, "end_time", problems, required=False)
        validation.window(start, end, problems)
        size = validation.page_size(
            request.page_size, problems, default=HISTORY_PAGE_SIZE, maximum=MAX_HISTORY_PAGE_SIZE
        )
        validation.raise_if(problems)
        assert patient is not None
        binding = b"|".join(
            [b"ListPatientDisclosures", patient.bytes, request.start_time.SerializeToString(),
             request.end_time.SerializeToString()]
        )  # fmt: skip
        before = None
        if request.page_token:
            cursor = self._page_tokens.open(request.page_token, binding)
            (micros,) = _HISTORY_CURSOR.unpack_from(cursor)
            before = (from_micros(micros), cursor[_HISTORY_CURSOR.size :].decode())
        async with self._db.transaction(readonly=True) as conn:
            if not await privacy.patient_exists(conn, patient):
                raise NotFound("patient not found", metadata={"patient_id": str(patient)})
            rows = await privacy.patient_disclosures(
                conn,
                patient,
                start_time=start or _EVER[0],
                end_time=end or _EVER[1],
                before=before,
                limit=size + 1,
            )
        response = pb.ListPatientDisclosuresResponse(disclosures=[patient_disclosure_message(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = self._page_tokens.seal(
                _HISTORY_CURSOR.pack(to_micros(last.last_time)) + last.group_key.encode(), binding
            )
        return response

    async def WatchPrivacyEvents(
        self, request: pb.WatchPrivacyEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audit_pb2.PrivacyEvent]:
        async def live() -> None:
            await context.send_initial_metadata(())

        async for event in self._privacy_watches.watch(request.resume_token, live):
            yield event
