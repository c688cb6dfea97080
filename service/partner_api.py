"""The partner servicer: validate → authenticate → authorize and query → view.

Each call reads in one transaction whose statements join the caller's active
grants, so revoking a key or a grant takes effect on the next call. Anything
the caller may not see answers NOT_FOUND, whatever the reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import grpc.aio
from appointments.partner.v1 import (
    appointment_pb2,
)
from appointments.partner.v1 import (
    partner_appointment_service_pb2 as pb,
)
from appointments.partner.v1 import (
    partner_appointment_service_pb2_grpc as pb_grpc,
)

from service import auth, pagination, validation, views
from service.errors import FieldViolation, InvalidArgument, NotFound
from service.pseudonyms import Pseudonyms, looks_like_appointment_id
from service.store import partner_reads, partners
from service.store.database import Database

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_WINDOW = timedelta(days=366)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PartnerAppointmentService"].full_name


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ListAppointments request."""

    practitioner_id: UUID | None
    start_time: datetime
    end_time: datetime
    page_size: int
    page_token: str

    def binding(self, partner_id: UUID) -> bytes:
        """The bytes a page token of this query is bound to: the caller and every filter."""
        practitioner = self.practitioner_id.bytes if self.practitioner_id else b""
        window = struct.pack(">dd", self.start_time.timestamp(), self.end_time.timestamp())
        return b"ListAppointments|" + partner_id.bytes + b"|" + practitioner + b"|" + window


def parse_list_request(request: pb.ListAppointmentsRequest) -> ListQuery:
    """Validate a ListAppointments request. Raises :class:`InvalidArgument` naming every bad field."""
    problems: list[FieldViolation] = []
    practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems, required=False)
    start = validation.timestamp(request, "start_time", problems)
    end = validation.timestamp(request, "end_time", problems)
    validation.window(start, end, problems, max_length=MAX_WINDOW)
    try:
        size = pagination.page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    except InvalidArgument as exc:
        problems.extend(exc.violations)
        size = 0
    validation.raise_if(problems)
    assert start is not None and end is not None
    return ListQuery(practitioner, start, end, size, request.page_token)


def _check_appointment_id(value: str) -> None:
    if not value:
        raise InvalidArgument.field("appointment_id", "is required")
    if not looks_like_appointment_id(value):
        raise InvalidArgument.field("appointment_id", "not an appointment id")


class PartnerAppointmentApi(pb_grpc.PartnerAppointmentServiceServicer):
    """Serves ``appointments.partner.v1.PartnerAppointmentService``."""

    def __init__(self, database: Database, pseudonyms: Pseudonyms, page_tokens: pagination.PageTokens) -> None:
        self._db = database
        self._pseudonyms = pseudonyms
        self._page_tokens = page_tokens

    async def ListAppointments(
        self, request: pb.ListAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAppointmentsResponse:
        query = parse_list_request(request)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        async with self._db.transaction(readonly=True) as conn:
            principal = auth.verify_partner_key(token, await partners.find_key(conn, key_id))
            binding = query.binding(principal.partner_id)
            after = None
            if query.page_token:
                cursor = self._page_tokens.open(query.page_token, binding)
                try:
                    after = pagination.unpack_time_cursor(cursor)
                except ValueError as exc:  # sealed by us, so only a format change gets here
                    raise InvalidArgument.field("page_token", "unsupported page token") from exc
            rows = await partner_reads.list_appointments(
                conn,
                partner_id=principal.partner_id,
                practitioner_id=query.practitioner_id,
                start_time=query.start_time,
                end_time=query.end_time,
                after=after,
                limit=query.page_size + 1,
            )
            if (
                not rows
                and query.practitioner_id is not None
                and not await partner_reads.is_granted(conn, principal.partner_id, query.practitioner_id)
            ):
                raise NotFound("practitioner not found")
        ids = self._pseudonyms.for_partner(principal.partner_id)
        page = rows[: query.page_size]
        response = pb.ListAppointmentsResponse(appointments=[views.basic_appointment(row, ids) for row in page])
        if len(rows) > query.page_size:
            last = page[-1]
            response.next_page_token = self._page_tokens.seal(
                pagination.pack_time_cursor(last.start_time, last.id), binding
            )
        return response

    async def GetAppointment(
        self, request: pb.GetAppointmentRequest, context: grpc.aio.ServicerContext
    ) -> appointment_pb2.Appointment:
        _check_appointment_id(request.appointment_id)
        token = auth.bearer_token(context.invocation_metadata())
        key_id = auth.partner_key_id(token)
        async with self._db.transaction(readonly=True) as conn:
            principal = auth.verify_partner_key(token, await partners.find_key(conn, key_id))
            ids = self._pseudonyms.for_partner(principal.partner_id)
            appointment_id = ids.parse_appointment_id(request.appointment_id)
            row = await partner_reads.get_appointment(conn, principal.partner_id, appointment_id)
        if row is None:
            # No metadata: "does not exist", "not yours" and "no longer granted"
            # must be byte-for-byte the same answer.
            raise NotFound("appointment not found")
        return views.basic_appointment(row, ids)
