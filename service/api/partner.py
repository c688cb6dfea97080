"""The partner servicer: ``appointments.partner.v1.PartnerAppointmentService``.

Each method validates its request, has the call admitted
(:class:`~service.access.gate.PartnerGate`: the key, the request rate), and
hands it to the read it asks for (:class:`~service.disclosure.reads.PartnerReads`)
or to the change feed (:class:`~service.feed.watch.Watches`). Requests are
validated before credentials, so a malformed request answers
INVALID_ARGUMENT whoever sends it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc.aio
from appointments.partner.v1 import appointment_pb2, consent_request_pb2, contact_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from appointments.partner.v1 import partner_appointment_service_pb2_grpc as pb_grpc

from service.access import credentials
from service.access.consent_tokens import ConsentKeyring
from service.access.gate import Caller, PartnerGate
from service.api import validation
from service.disclosure import views
from service.disclosure.consent_requests import ConsentRequests, NewRequest
from service.disclosure.pseudonyms import looks_like_appointment_id, looks_like_consent_request_id
from service.disclosure.reads import ListQuery, PartnerReads
from service.errors import FieldViolation, InvalidArgument
from service.feed.consent_requests import ConsentRequestWatches
from service.feed.watch import Watches

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PartnerAppointmentService"].full_name
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_WINDOW = timedelta(days=366)
#: The longest purpose and message of a consent request (the patient reads them on a phone).
PURPOSE_LENGTH = 200
MESSAGE_LENGTH = 280


def parse_list_request(request: pb.ListAppointmentsRequest) -> ListQuery:
    """Validate a ListAppointments request. Raises :class:`InvalidArgument` naming every bad field."""
    problems: list[FieldViolation] = []
    practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems, required=False)
    start = validation.timestamp(request, "start_time", problems)
    end = validation.timestamp(request, "end_time", problems)
    validation.window(start, end, problems, max_length=MAX_WINDOW)
    size = validation.page_size(request.page_size, problems, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
    validation.raise_if(problems)
    assert start is not None and end is not None
    return ListQuery(practitioner, start, end, size, request.page_token)


def _caller(context: grpc.aio.ServicerContext) -> Caller:
    """What the call presents: its metadata, its address without the port (``ipv4:10.0.0.7``, what failed
    authentications are counted by) and its connection's client certificate."""
    peer = str(context.peer() or "")
    return Caller(
        context.invocation_metadata(),
        peer.rpartition(":")[0] if peer.count(":") > 1 else peer,
        credentials.client_certificate(context.auth_context()),
    )


def parse_contact_request(request: pb.RequestContactAccessRequest, max_ttl: timedelta) -> NewRequest:
    """Validate a RequestContactAccess request. Raises :class:`InvalidArgument` naming every bad field."""
    problems: list[FieldViolation] = []
    if not request.appointment_id:
        problems.append(FieldViolation("appointment_id", "is required"))
    elif not looks_like_appointment_id(request.appointment_id):
        problems.append(FieldViolation("appointment_id", "not an appointment id"))
    fields = validation.contact_fields(list(request.fields), problems)
    purpose = validation.text(request.purpose, "purpose", problems, max_length=PURPOSE_LENGTH)
    message = validation.text(request.message, "message", problems, max_length=MESSAGE_LENGTH, required=False)
    ttl = timedelta(0)
    if request.HasField("ttl"):
        ttl = validation.ttl(request.ttl, problems, maximum=max_ttl)
    else:
        problems.append(FieldViolation("ttl", "is required"))
    validation.raise_if(problems)
    return NewRequest(request.appointment_id, fields, purpose, message, ttl)


def _check_request_id(value: str) -> None:
    if not value:
        raise InvalidArgument.field("consent_request_id", "is required")
    if not looks_like_consent_request_id(value):
        raise InvalidArgument.field("consent_request_id", "not a consent request id")


def _check_appointment_id(value: str) -> None:
    if not value:
        raise InvalidArgument.field("appointment_id", "is required")
    if not looks_like_appointment_id(value):
        raise InvalidArgument.field("appointment_id", "not an appointment id")


class PartnerAppointmentApi(pb_grpc.PartnerAppointmentServiceServicer):
    """Serves ``appointments.partner.v1.PartnerAppointmentService``."""

    def __init__(
        self,
        gate: PartnerGate,
        reads: PartnerReads,
        watches: Watches,
        keyring: ConsentKeyring,
        requests: ConsentRequests,
        request_watches: ConsentRequestWatches,
        max_ttl: timedelta,
    ) -> None:
        self._gate = gate
        self._reads = reads
        self._watches = watches
        self._keyring = keyring
        self._requests = requests
        self._request_watches = request_watches
        self._max_ttl = max_ttl

    async def ListAppointments(
        self, request: pb.ListAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAppointmentsResponse:
        query = parse_list_request(request)
        principal, policy = await self._gate.admit(_caller(context))
        return await self._reads.list_appointments(principal, policy, query, request.practitioner_id)

    async def GetAppointment(
        self, request: pb.GetAppointmentRequest, context: grpc.aio.ServicerContext
    ) -> appointment_pb2.Appointment:
        _check_appointment_id(request.appointment_id)
        principal, policy = await self._gate.admit(_caller(context))
        return await self._reads.get_appointment(principal, policy, request.appointment_id)

    async def GetAppointmentContact(
        self, request: pb.GetAppointmentContactRequest, context: grpc.aio.ServicerContext
    ) -> contact_pb2.AppointmentContact:
        _check_appointment_id(request.appointment_id)
        principal, policy = await self._gate.admit(_caller(context))
        return await self._reads.get_contact(principal, policy, request.appointment_id, request.consent_token)

    async def WatchAppointments(
        self, request: pb.WatchAppointmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AppointmentChange]:
        problems: list[FieldViolation] = []
        practitioner = validation.parse_uuid(request.practitioner_id, "practitioner_id", problems, required=False)
        validation.raise_if(problems)

        async def live() -> None:
            # Headers now tell the caller the stream is live: changes from here on reach it.
            await context.send_initial_metadata(())

        changes = self._watches.watch(
            _caller(context),
            practitioner,
            request.practitioner_id,
            request.resume_token,
            live,
            bookmarks=request.allow_bookmarks,
        )
        async for change in changes:
            yield change

    async def ListConsentKeys(
        self, request: pb.ListConsentKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConsentKeysResponse:
        await self._gate.admit_live(_caller(context))
        active = self._keyring.active_key_id
        return pb.ListConsentKeysResponse(
            keys=[views.consent_key(key, active=key.key_id == active) for key in self._keyring.public_keys()]
        )

    async def RequestContactAccess(
        self, request: pb.RequestContactAccessRequest, context: grpc.aio.ServicerContext
    ) -> consent_request_pb2.ConsentRequest:
        new = parse_contact_request(request, self._max_ttl)
        principal, _ = await self._gate.admit(_caller(context))
        return await self._requests.request(principal, new)

    async def GetConsentRequest(
        self, request: pb.GetConsentRequestRequest, context: grpc.aio.ServicerContext
    ) -> consent_request_pb2.ConsentRequest:
        _check_request_id(request.consent_request_id)
        principal, _ = await self._gate.admit(_caller(context))
        return await self._requests.get(principal, request.consent_request_id)

    async def CancelConsentRequest(
        self, request: pb.CancelConsentRequestRequest, context: grpc.aio.ServicerContext
    ) -> consent_request_pb2.ConsentRequest:
        _check_request_id(request.consent_request_id)
        principal, _ = await self._gate.admit(_caller(context))
        return await self._requests.cancel(principal, request.consent_request_id)

    async def WatchConsentRequests(
        self, request: pb.WatchConsentRequestsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[consent_request_pb2.ConsentRequestEvent]:
        async def live() -> None:
            await context.send_initial_metadata(())

        async for event in self._request_watches.watch(_caller(context), request.resume_token, live):
            yield event
