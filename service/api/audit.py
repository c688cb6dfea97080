"""The internal AuditService: the disclosure trail and the breach-scope report."""

from __future__ import annotations

import struct
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
from service.disclosure import breach, pagination
from service.errors import FieldViolation, InvalidArgument
from service.store import disclosures
from service.store.database import Database
from service.timestamps import set_timestamp

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_CURSOR = struct.Struct(">qi")


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


def affected_patient_message(patient: models.AffectedPatient) -> audit_pb2.AffectedPatient:
    """The internal message of one patient of a breach report."""
    message = audit_pb2.AffectedPatient(
        patient_id=str(patient.patient_id),
        appointment_ids=[str(a) for a in patient.appointment_ids],
        contact_fields=list(patient.contact_fields),  # type: ignore[arg-type]
        consent_requests=patient.consent_requests,
    )
    set_timestamp(message.first_disclosure_time, patient.first_disclosure_time)
    set_timestamp(message.last_disclosure_time, patient.last_disclosure_time)
    return message


def totals_message(value: breach.Totals) -> audit_pb2.BreachTotals:
    """The internal message of a breach report's totals."""
    return audit_pb2.BreachTotals(
        patients=value.patients,
        appointments=value.appointments,
        contact_patients=value.contact_patients,
        consent_request_patients=value.consent_request_patients,
        fields=[audit_pb2.ContactFieldTotal(field=n, patients=c) for n, c in value.per_field.items()],  # type: ignore[arg-type]
    )


class AuditApi(pb_grpc.AuditServiceServicer):
    """Serves ``appointments.internal.v1.AuditService``."""

    def __init__(self, database: Database, page_tokens: pagination.PageTokens) -> None:
        self._db = database
        self._page_tokens = page_tokens

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
        response = pb.BreachReportResponse()
        totals = breach.Totals()
        async with self._db.transaction(readonly=True) as conn:
            async for patient in disclosures.breach_report(
                conn, partner_id=partner, start_time=start, end_time=end, key_id=key_id
            ):
                totals.add(patient)
                response.patients.append(affected_patient_message(patient))
        response.totals.CopyFrom(totals_message(totals))
        return response
