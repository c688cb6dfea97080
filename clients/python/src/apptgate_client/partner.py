"""Partner clients: :class:`PartnerClient` (blocking) and :class:`AsyncPartnerClient` (asyncio).

Both speak ``appointments.partner.v1.PartnerAppointmentService`` and behave
alike:

* the partner key is sent on every call as ``authorization: Bearer <key>``;
* every call has a deadline (``timeout``, 10 s by default) covering all its attempts;
* ``UNAVAILABLE`` is retried with exponential backoff and full jitter, honouring
  the server's ``RetryInfo`` (see :mod:`apptgate_client.retry`), for every call
  that only reads. The two writes, :meth:`~PartnerClient.request_contact_access`
  and :meth:`~PartnerClient.cancel_consent_request`, are sent once: one that
  failed with ``UNAVAILABLE`` may have been applied, and the caller decides (a
  request sent again answers :class:`~apptgate_client.errors.ConsentRequestPending`
  naming the one already made, if it was);
* a failed call raises an :class:`~apptgate_client.errors.ApptgateError` subclass
  carrying the server's ``ErrorInfo`` reason;
* :meth:`~PartnerClient.iter_appointments` walks every page of a window;
* :meth:`~PartnerClient.watch_appointments` follows the change feed and resumes it
  after a server restart without a gap (see :mod:`apptgate_client.watch`);
* contact details come only from :meth:`~PartnerClient.get_appointment_contact`,
  whose consent token is a required argument: no method reads contact details
  without one. To get a token, ask the patient with
  :meth:`~PartnerClient.request_contact_access`, then follow the request with
  :meth:`~PartnerClient.watch_consent_requests` (or poll
  :meth:`~PartnerClient.get_consent_request`) until it is approved.

Results are the generated protobuf messages of :mod:`appointments.partner.v1`.

Example::

    with PartnerClient("localhost:50051", key) as client:
        for appointment in client.iter_appointments(start_time=monday, end_time=monday + timedelta(days=7)):
            print(appointment.start_time.ToDatetime(), appointment.patient_ref)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime, timedelta
from types import TracebackType

import grpc
from appointments.partner.v1 import appointment_pb2, consent_request_pb2, contact_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from appointments.partner.v1 import partner_appointment_service_pb2_grpc as pb_grpc

from apptgate_client import _requests, _transport
from apptgate_client.retry import RetryPolicy
from apptgate_client.watch import (
    DEFAULT_RESUME_TIMEOUT,
    AppointmentWatch,
    AsyncAppointmentWatch,
    AsyncConsentRequestWatch,
    ConsentRequestWatch,
)


class PartnerClient:
    """A blocking client of the partner API over one gRPC channel. Use it as a context manager.

    Args:
        target: the partner listener, ``host:port`` (for example ``"localhost:50051"``), or any gRPC
            target, such as ``ipv4:10.0.0.7:50051,10.0.0.8:50051`` to reach several servers.
        key: the partner key (``pk_….…``), sent as a bearer token. Never logged or shown in ``repr``.
        credentials: TLS channel credentials (``grpc.ssl_channel_credentials()``); ``None`` for
            plaintext, which the gateway only accepts on loopback or behind a TLS proxy.
        timeout: the default deadline of a call in seconds, retries included.
        retry: how ``UNAVAILABLE`` is retried.
        options: extra gRPC channel arguments.

    Raises ``ValueError`` for an empty key or a non-positive timeout.
    """

    def __init__(
        self,
        target: str,
        key: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = _transport.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: _transport.ChannelOptions = (),
    ) -> None:
        retry = retry or RetryPolicy()
        self.target = target
        self._retry = retry
        self._metadata = _transport.bearer_metadata(key, "key")
        self._call = _transport.Caller(self._metadata, _transport.check_timeout(timeout), retry)
        self._channel = _transport.sync_channel(target, credentials, _transport.channel_options(retry, options))
        self._stub = pb_grpc.PartnerAppointmentServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"PartnerClient({self.target!r})"

    def __enter__(self) -> PartnerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def list_appointments(
        self,
        *,
        start_time: datetime,
        end_time: datetime,
        practitioner_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListAppointmentsResponse:
        """Return one page of the appointments starting in ``[start_time, end_time)``, in the basic view.

        ``practitioner_id`` empty means every practitioner granted to you.
        ``page_size`` 0 means the server's default (50); at most 500. Pass the
        previous page's ``next_page_token`` with the *same* other arguments to
        get the next page. Raises :class:`~apptgate_client.errors.InvalidArgument`
        for a bad window, size or token (reason ``INVALID_PAGE_TOKEN``), and
        :class:`~apptgate_client.errors.NotFound` for a practitioner not granted.
        ``ValueError`` for a naive datetime.
        """
        request = _requests.list_appointments(
            start_time=start_time,
            end_time=end_time,
            practitioner_id=practitioner_id,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(self._stub.ListAppointments, request, pb.ListAppointmentsResponse, timeout=timeout)

    def iter_appointments(
        self,
        *,
        start_time: datetime,
        end_time: datetime,
        practitioner_id: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[appointment_pb2.Appointment]:
        """Yield every appointment starting in ``[start_time, end_time)``, fetching pages as needed.

        Ordered by start time; each page is one call with its own deadline and
        retries. Raises like :meth:`list_appointments`, when the page that
        fails is fetched.
        """
        token = ""
        while True:
            page = self.list_appointments(
                start_time=start_time,
                end_time=end_time,
                practitioner_id=practitioner_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.appointments
            token = page.next_page_token
            if not token:
                return

    def get_appointment(self, appointment_id: str, *, timeout: float | None = None) -> appointment_pb2.Appointment:
        """Return one appointment in the basic view.

        Raises :class:`~apptgate_client.errors.NotFound` when it does not exist
        or is not (or no longer) visible to you.
        """
        request = pb.GetAppointmentRequest(appointment_id=appointment_id)
        return self._call(self._stub.GetAppointment, request, appointment_pb2.Appointment, timeout=timeout)

    def get_appointment_contact(
        self, appointment_id: str, consent_token: str, *, timeout: float | None = None
    ) -> contact_pb2.AppointmentContact:
        """Return the patient contact details that ``consent_token`` releases for this appointment.

        Only the fields the consent covers are set (test them with
        ``HasField``); the others are listed in ``withheld_fields``. Raises
        :class:`~apptgate_client.errors.ConsentDenied` (reason
        ``CONSENT_REQUIRED``, ``CONSENT_INVALID``, ``CONSENT_EXPIRED`` or
        ``CONSENT_REVOKED``) when the token does not allow it, and
        :class:`~apptgate_client.errors.NotFound` when the appointment is not
        visible.
        """
        request = pb.GetAppointmentContactRequest(appointment_id=appointment_id, consent_token=consent_token)
        return self._call(self._stub.GetAppointmentContact, request, contact_pb2.AppointmentContact, timeout=timeout)

    def list_consent_keys(self, *, timeout: float | None = None) -> list[contact_pb2.ConsentKey]:
        """Return the public keys (PASERK ``k4.public``) that verify consent tokens, the active one first."""
        reply = self._call(
            self._stub.ListConsentKeys, pb.ListConsentKeysRequest(), pb.ListConsentKeysResponse, timeout=timeout
        )
        return list(reply.keys)

    def watch_appointments(
        self,
        *,
        practitioner_id: str = "",
        resume_token: str = "",
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> AppointmentWatch:
        """Return the change feed of your granted practitioners (or one), to use as a context manager.

        ``with client.watch_appointments() as changes:`` returns once the stream
        is live; iterating yields ``AppointmentChange`` messages and resumes
        after a server restart or shutdown with the last token, on any server
        the channel reaches (see :mod:`apptgate_client.watch`). The server's
        bookmarks are never yielded, but keep ``changes.resume_token`` current,
        so store that (not only the last change's token). Pass a stored
        ``resume_token`` to continue after it. ``resume_timeout`` is how many
        seconds the watch keeps trying to get a live stream back before it
        raises the last error (0: at once). Raises ``ValueError`` for a negative
        ``resume_timeout``.
        """
        return AppointmentWatch(
            self._stub.WatchAppointments,
            self._metadata,
            practitioner_id,
            resume_token,
            self._retry,
            resume_timeout=resume_timeout,
        )

    def request_contact_access(
        self,
        appointment_id: str,
        fields: Iterable[int],
        purpose: str,
        ttl: timedelta,
        message: str = "",
        *,
        timeout: float | None = None,
    ) -> consent_request_pb2.ConsentRequest:
        """Ask the patient of an appointment to release ``fields`` to you for ``ttl``; return the request, PENDING.

        ``fields`` are ``appointments.type.v1.ContactField`` numbers (at least
        one, no duplicates); ``purpose`` (1 to 200 characters) and ``message``
        (at most 280) are shown to the patient, who may approve fewer fields or
        a shorter ``ttl``. Once approved, the request carries the consent token
        for :meth:`get_appointment_contact`. Not retried (see the module docstring).

        Raises :class:`~apptgate_client.errors.ConsentRequestPending` (an
        ``AlreadyExists``) when a request for the same patient and fields is
        pending, naming it in ``consent_request_id``;
        :class:`~apptgate_client.errors.ResourceExhausted` (``quota_violations``,
        ``retry_delay``) when your daily requests or the patient's are used up;
        :class:`~apptgate_client.errors.InvalidArgument` for a malformed field;
        :class:`~apptgate_client.errors.NotFound` when the appointment is not
        visible to you. ``ValueError`` unless ``ttl`` is a ``timedelta``.
        """
        request = _requests.request_contact_access(
            appointment_id=appointment_id, fields=fields, purpose=purpose, message=message, ttl=ttl
        )
        return self._call(
            self._stub.RequestContactAccess,
            request,
            consent_request_pb2.ConsentRequest,
            timeout=timeout,
            idempotent=False,
        )

    def get_consent_request(
        self, consent_request_id: str, *, timeout: float | None = None
    ) -> consent_request_pb2.ConsentRequest:
        """Return one of your consent requests; once approved it carries ``consent_token``.

        Raises :class:`~apptgate_client.errors.NotFound` for a request of
        another partner or none.
        """
        request = pb.GetConsentRequestRequest(consent_request_id=consent_request_id)
        return self._call(self._stub.GetConsentRequest, request, consent_request_pb2.ConsentRequest, timeout=timeout)

    def cancel_consent_request(
        self, consent_request_id: str, *, timeout: float | None = None
    ) -> consent_request_pb2.ConsentRequest:
        """Cancel one of your pending consent requests; return it, CANCELLED. Not retried.

        Raises :class:`~apptgate_client.errors.NotFound` as
        :meth:`get_consent_request` does, and
        :class:`~apptgate_client.errors.FailedPrecondition` when the request is
        no longer pending.
        """
        request = pb.CancelConsentRequestRequest(consent_request_id=consent_request_id)
        return self._call(
            self._stub.CancelConsentRequest,
            request,
            consent_request_pb2.ConsentRequest,
            timeout=timeout,
            idempotent=False,
        )

    def watch_consent_requests(
        self, resume_token: str = "", *, resume_timeout: float = DEFAULT_RESUME_TIMEOUT
    ) -> ConsentRequestWatch:
        """Return the changes of your consent requests, to use as a context manager.

        ``with client.watch_consent_requests() as events:`` returns once the
        stream is live; iterating yields ``ConsentRequestEvent`` messages (a
        request made, approved, denied, cancelled, expired, or its consent
        revoked) and resumes after a server restart with the last token, like
        :meth:`watch_appointments`. Pass a stored ``resume_token`` to continue
        after the event it came with; ``resume_timeout`` as for
        :meth:`watch_appointments`. A revoked key ends it with
        :class:`~apptgate_client.errors.Unauthenticated`.
        """
        return ConsentRequestWatch(
            self._stub.WatchConsentRequests,
            self._metadata,
            resume_token,
            self._retry,
            resume_timeout=resume_timeout,
        )


class AsyncPartnerClient:
    """The asyncio twin of :class:`PartnerClient`, over a ``grpc.aio`` channel.

    Create it inside a running event loop and use it as an async context
    manager (``async with AsyncPartnerClient(...) as client``). Arguments and
    errors are those of :class:`PartnerClient`.
    """

    def __init__(
        self,
        target: str,
        key: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = _transport.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: _transport.ChannelOptions = (),
    ) -> None:
        retry = retry or RetryPolicy()
        self.target = target
        self._retry = retry
        self._metadata = _transport.bearer_metadata(key, "key")
        self._call = _transport.AsyncCaller(self._metadata, _transport.check_timeout(timeout), retry)
        self._channel = _transport.aio_channel(target, credentials, _transport.channel_options(retry, options))
        self._stub = pb_grpc.PartnerAppointmentServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncPartnerClient({self.target!r})"

    async def __aenter__(self) -> AsyncPartnerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def list_appointments(
        self,
        *,
        start_time: datetime,
        end_time: datetime,
        practitioner_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListAppointmentsResponse:
        """Return one page of appointments; see :meth:`PartnerClient.list_appointments`."""
        request = _requests.list_appointments(
            start_time=start_time,
            end_time=end_time,
            practitioner_id=practitioner_id,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(self._stub.ListAppointments, request, pb.ListAppointmentsResponse, timeout=timeout)

    async def iter_appointments(
        self,
        *,
        start_time: datetime,
        end_time: datetime,
        practitioner_id: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[appointment_pb2.Appointment]:
        """Yield every appointment of a window, page after page; see :meth:`PartnerClient.iter_appointments`."""
        token = ""
        while True:
            page = await self.list_appointments(
                start_time=start_time,
                end_time=end_time,
                practitioner_id=practitioner_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
            )
            for appointment in page.appointments:
                yield appointment
            token = page.next_page_token
            if not token:
                return

    async def get_appointment(
        self, appointment_id: str, *, timeout: float | None = None
    ) -> appointment_pb2.Appointment:
        """Return one appointment in the basic view; see :meth:`PartnerClient.get_appointment`."""
        request = pb.GetAppointmentRequest(appointment_id=appointment_id)
        return await self._call(self._stub.GetAppointment, request, appointment_pb2.Appointment, timeout=timeout)

    async def get_appointment_contact(
        self, appointment_id: str, consent_token: str, *, timeout: float | None = None
    ) -> contact_pb2.AppointmentContact:
        """Return consented contact details; see :meth:`PartnerClient.get_appointment_contact`."""
        request = pb.GetAppointmentContactRequest(appointment_id=appointment_id, consent_token=consent_token)
        return await self._call(
            self._stub.GetAppointmentContact, request, contact_pb2.AppointmentContact, timeout=timeout
        )

    async def list_consent_keys(self, *, timeout: float | None = None) -> list[contact_pb2.ConsentKey]:
        """Return the consent-verifying public keys; see :meth:`PartnerClient.list_consent_keys`."""
        reply = await self._call(
            self._stub.ListConsentKeys, pb.ListConsentKeysRequest(), pb.ListConsentKeysResponse, timeout=timeout
        )
        return list(reply.keys)

    def watch_appointments(
        self,
        *,
        practitioner_id: str = "",
        resume_token: str = "",
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> AsyncAppointmentWatch:
        """Return the change feed, for ``async with``/``async for``; see :meth:`PartnerClient.watch_appointments`."""
        return AsyncAppointmentWatch(
            self._stub.WatchAppointments,
            self._metadata,
            practitioner_id,
            resume_token,
            self._retry,
            resume_timeout=resume_timeout,
        )

    async def request_contact_access(
        self,
        appointment_id: str,
        fields: Iterable[int],
        purpose: str,
        ttl: timedelta,
        message: str = "",
        *,
        timeout: float | None = None,
    ) -> consent_request_pb2.ConsentRequest:
        """Ask a patient for contact access; see :meth:`PartnerClient.request_contact_access`. Not retried."""
        request = _requests.request_contact_access(
            appointment_id=appointment_id, fields=fields, purpose=purpose, message=message, ttl=ttl
        )
        return await self._call(
            self._stub.RequestContactAccess,
            request,
            consent_request_pb2.ConsentRequest,
            timeout=timeout,
            idempotent=False,
        )

    async def get_consent_request(
        self, consent_request_id: str, *, timeout: float | None = None
    ) -> consent_request_pb2.ConsentRequest:
        """Return one of your consent requests; see :meth:`PartnerClient.get_consent_request`."""
        request = pb.GetConsentRequestRequest(consent_request_id=consent_request_id)
        return await self._call(
            self._stub.GetConsentRequest, request, consent_request_pb2.ConsentRequest, timeout=timeout
        )

    async def cancel_consent_request(
        self, consent_request_id: str, *, timeout: float | None = None
    ) -> consent_request_pb2.ConsentRequest:
        """Cancel a pending consent request; see :meth:`PartnerClient.cancel_consent_request`. Not retried."""
        request = pb.CancelConsentRequestRequest(consent_request_id=consent_request_id)
        return await self._call(
            self._stub.CancelConsentRequest,
            request,
            consent_request_pb2.ConsentRequest,
            timeout=timeout,
            idempotent=False,
        )

    def watch_consent_requests(
        self, resume_token: str = "", *, resume_timeout: float = DEFAULT_RESUME_TIMEOUT
    ) -> AsyncConsentRequestWatch:
        """Return your consent requests' changes, for ``async with``/``async for``.

        See :meth:`PartnerClient.watch_consent_requests`.
        """
        return AsyncConsentRequestWatch(
            self._stub.WatchConsentRequests,
            self._metadata,
            resume_token,
            self._retry,
            resume_timeout=resume_timeout,
        )
