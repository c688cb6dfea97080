"""Internal clients: :class:`InternalClient` (blocking) and :class:`AsyncInternalClient` (asyncio).

For the platform's own services, on the internal listener (``127.0.0.1:50052``
by default), with the internal token sent as ``authorization: Bearer <token>``.
They cover ``appointments.internal.v1``: ``SchedulingService``,
``PartnerRegistryService``, ``ConsentService`` and ``AuditService``.

Deadlines and errors work as in :mod:`apptgate_client.partner`. Retries
differ: only reads (``list_consents``, ``list_consent_requests``,
``iter_consent_requests``, ``list_disclosures``, ``iter_disclosures``,
``breach_report``, ``list_patient_disclosures``, ``iter_patient_disclosures``)
are retried on ``UNAVAILABLE``, and ``watch_privacy_events`` resumes like the
partner's change feed (see :mod:`apptgate_client.watch`). A
write that failed with ``UNAVAILABLE`` may or may not have been applied, and
sending it again could, for example, book an appointment twice; the caller
decides (a retried create may answer ``ALREADY_EXISTS``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime, timedelta
from types import TracebackType

import grpc
from appointments.internal.v1 import audit_pb2, consent_pb2, partner_registry_pb2, scheduling_pb2
from appointments.internal.v1 import audit_service_pb2 as audit_pb
from appointments.internal.v1 import audit_service_pb2_grpc as audit_grpc
from appointments.internal.v1 import consent_service_pb2 as consent_pb
from appointments.internal.v1 import consent_service_pb2_grpc as consent_grpc
from appointments.internal.v1 import partner_registry_service_pb2 as registry_pb
from appointments.internal.v1 import partner_registry_service_pb2_grpc as registry_grpc
from appointments.internal.v1 import scheduling_service_pb2 as scheduling_pb
from appointments.internal.v1 import scheduling_service_pb2_grpc as scheduling_grpc

from apptgate_client import _requests, _transport
from apptgate_client.retry import RetryPolicy
from apptgate_client.watch import DEFAULT_RESUME_TIMEOUT, AsyncPrivacyEventWatch, PrivacyEventWatch


def _create_patient(
    given_name: str, family_name: str, sex: int, phone: str, email: str
) -> scheduling_pb.CreatePatientRequest:
    return scheduling_pb.CreatePatientRequest(
        given_name=given_name,
        family_name=family_name,
        sex=sex,  # type: ignore[arg-type]  # a Sex enum number
        phone=phone,
        email=email,
    )


def _create_appointment(
    practitioner_id: str, patient_id: str, start_time: datetime, end_time: datetime, reason: str
) -> scheduling_pb.CreateAppointmentRequest:
    return scheduling_pb.CreateAppointmentRequest(
        practitioner_id=practitioner_id,
        patient_id=patient_id,
        start_time=_requests.timestamp(start_time, "start_time"),
        end_time=_requests.timestamp(end_time, "end_time"),
        reason=reason,
    )


def _grant_consent(
    patient_id: str, partner_id: str, fields: Iterable[int], ttl: timedelta, purpose: str
) -> consent_pb.GrantConsentRequest:
    return consent_pb.GrantConsentRequest(
        patient_id=patient_id,
        partner_id=partner_id,
        fields=_requests.contact_fields(fields),  # type: ignore[arg-type]  # ContactField numbers
        ttl=_requests.duration(ttl, "ttl"),
        purpose=purpose,
    )


def _list_consent_requests(
    patient_id: str, states: Iterable[int], page_size: int, page_token: str
) -> consent_pb.ListConsentRequestsRequest:
    return consent_pb.ListConsentRequestsRequest(
        patient_id=patient_id,
        states=[int(s) for s in states],  # type: ignore[misc]  # ConsentRequestState numbers
        page_size=page_size,
        page_token=page_token,
    )


def _approve_consent_request(
    consent_request_id: str, fields: Iterable[int], ttl: timedelta | None
) -> consent_pb.ApproveConsentRequestRequest:
    request = consent_pb.ApproveConsentRequestRequest(
        consent_request_id=consent_request_id,
        fields=_requests.contact_fields(fields),  # type: ignore[arg-type]  # ContactField numbers
    )
    if ttl is not None:
        request.ttl.CopyFrom(_requests.duration(ttl, "ttl"))
    return request


def _list_disclosures(
    partner_id: str,
    patient_id: str,
    start_time: datetime | None,
    end_time: datetime | None,
    page_size: int,
    page_token: str,
) -> audit_pb.ListDisclosuresRequest:
    request = audit_pb.ListDisclosuresRequest(
        partner_id=partner_id, patient_id=patient_id, page_size=page_size, page_token=page_token
    )
    if start_time is not None:
        request.start_time.CopyFrom(_requests.timestamp(start_time, "start_time"))
    if end_time is not None:
        request.end_time.CopyFrom(_requests.timestamp(end_time, "end_time"))
    return request


def _list_patient_disclosures(
    patient_id: str, start_time: datetime | None, end_time: datetime | None, page_size: int, page_token: str
) -> audit_pb.ListPatientDisclosuresRequest:
    request = audit_pb.ListPatientDisclosuresRequest(patient_id=patient_id, page_size=page_size, page_token=page_token)
    if start_time is not None:
        request.start_time.CopyFrom(_requests.timestamp(start_time, "start_time"))
    if end_time is not None:
        request.end_time.CopyFrom(_requests.timestamp(end_time, "end_time"))
    return request


def _breach_report(
    partner_id: str, start_time: datetime, end_time: datetime, key_id: str | None
) -> audit_pb.BreachReportRequest:
    request = audit_pb.BreachReportRequest(
        partner_id=partner_id,
        start_time=_requests.timestamp(start_time, "start_time"),
        end_time=_requests.timestamp(end_time, "end_time"),
    )
    if key_id is not None:
        request.key_id = key_id
    return request


class InternalClient:
    """A blocking client of the internal services over one gRPC channel. Use it as a context manager.

    Args:
        target: the internal listener, ``host:port`` (for example ``"127.0.0.1:50052"``).
        token: the internal token (``APPTGATE_INTERNAL_TOKEN``). Never logged or shown in ``repr``.
        credentials, timeout, retry, options: as for :class:`~apptgate_client.PartnerClient`.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = _transport.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: _transport.ChannelOptions = (),
    ) -> None:
        retry = retry or RetryPolicy()
        self.target = target
        self._retry = retry
        self._metadata = _transport.bearer_metadata(token, "token")
        self._call = _transport.Caller(self._metadata, _transport.check_timeout(timeout), retry)
        self._channel = _transport.sync_channel(target, credentials, _transport.channel_options(retry, options))
        self._scheduling = scheduling_grpc.SchedulingServiceStub(self._channel)
        self._registry = registry_grpc.PartnerRegistryServiceStub(self._channel)
        self._consents = consent_grpc.ConsentServiceStub(self._channel)
        self._audit = audit_grpc.AuditServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"InternalClient({self.target!r})"

    def __enter__(self) -> InternalClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    # SchedulingService

    def create_practitioner(self, display_name: str, specialty: str) -> scheduling_pb2.Practitioner:
        """Create a practitioner. Not retried."""
        request = scheduling_pb.CreatePractitionerRequest(display_name=display_name, specialty=specialty)
        return self._call(self._scheduling.CreatePractitioner, request, scheduling_pb2.Practitioner, idempotent=False)

    def create_patient(
        self, given_name: str, family_name: str, *, sex: int = 0, phone: str = "", email: str = ""
    ) -> scheduling_pb2.Patient:
        """Create a patient (``sex`` is an ``appointments.type.v1.Sex`` number). Not retried."""
        request = _create_patient(given_name, family_name, sex, phone, email)
        return self._call(self._scheduling.CreatePatient, request, scheduling_pb2.Patient, idempotent=False)

    def create_appointment(
        self, practitioner_id: str, patient_id: str, start_time: datetime, end_time: datetime, *, reason: str = ""
    ) -> scheduling_pb2.Appointment:
        """Book an appointment in ``[start_time, end_time)``. Not retried."""
        request = _create_appointment(practitioner_id, patient_id, start_time, end_time, reason)
        return self._call(self._scheduling.CreateAppointment, request, scheduling_pb2.Appointment, idempotent=False)

    def cancel_appointment(self, appointment_id: str) -> scheduling_pb2.Appointment:
        """Cancel a booked appointment. Not retried."""
        request = scheduling_pb.CancelAppointmentRequest(appointment_id=appointment_id)
        return self._call(self._scheduling.CancelAppointment, request, scheduling_pb2.Appointment, idempotent=False)

    # PartnerRegistryService

    def create_partner(self, display_name: str) -> partner_registry_pb2.Partner:
        """Create a partner. Not retried."""
        request = registry_pb.CreatePartnerRequest(display_name=display_name)
        return self._call(self._registry.CreatePartner, request, partner_registry_pb2.Partner, idempotent=False)

    def issue_partner_key(self, partner_id: str) -> partner_registry_pb2.PartnerKey:
        """Issue a key; its ``secret`` is in this response only. Not retried."""
        request = registry_pb.IssuePartnerKeyRequest(partner_id=partner_id)
        return self._call(self._registry.IssuePartnerKey, request, partner_registry_pb2.PartnerKey, idempotent=False)

    def revoke_partner_key(self, key_id: str) -> partner_registry_pb2.PartnerKey:
        """Revoke a key; its next call answers UNAUTHENTICATED. Not retried."""
        request = registry_pb.RevokePartnerKeyRequest(key_id=key_id)
        return self._call(self._registry.RevokePartnerKey, request, partner_registry_pb2.PartnerKey, idempotent=False)

    def grant_practitioner_access(
        self, partner_id: str, practitioner_id: str
    ) -> partner_registry_pb2.PractitionerGrant:
        """Let a partner read a practitioner's appointments. Not retried."""
        request = registry_pb.GrantPractitionerAccessRequest(partner_id=partner_id, practitioner_id=practitioner_id)
        return self._call(
            self._registry.GrantPractitionerAccess, request, partner_registry_pb2.PractitionerGrant, idempotent=False
        )

    def revoke_practitioner_access(
        self, partner_id: str, practitioner_id: str
    ) -> partner_registry_pb2.PractitionerGrant:
        """Stop a partner reading a practitioner's appointments. Not retried."""
        request = registry_pb.RevokePractitionerAccessRequest(partner_id=partner_id, practitioner_id=practitioner_id)
        return self._call(
            self._registry.RevokePractitionerAccess, request, partner_registry_pb2.PractitionerGrant, idempotent=False
        )

    # ConsentService

    def grant_consent(
        self, patient_id: str, partner_id: str, fields: Iterable[int], ttl: timedelta, purpose: str
    ) -> consent_pb2.Consent:
        """Record a consent and return it with its signed ``token`` (``fields``: ``ContactField`` numbers).

        Not retried.
        """
        request = _grant_consent(patient_id, partner_id, fields, ttl, purpose)
        return self._call(self._consents.GrantConsent, request, consent_pb2.Consent, idempotent=False)

    def revoke_consent(self, consent_id: str) -> consent_pb2.Consent:
        """Revoke a consent; its token is refused from the next use on. Not retried."""
        request = consent_pb.RevokeConsentRequest(consent_id=consent_id)
        return self._call(self._consents.RevokeConsent, request, consent_pb2.Consent, idempotent=False)

    def list_consents(self, patient_id: str) -> list[consent_pb2.Consent]:
        """Return a patient's consents, newest first, without tokens."""
        request = consent_pb.ListConsentsRequest(patient_id=patient_id)
        return list(self._call(self._consents.ListConsents, request, consent_pb.ListConsentsResponse).consents)

    def list_consent_requests(
        self, patient_id: str, *, states: Iterable[int] = (), page_size: int = 0, page_token: str = ""
    ) -> consent_pb.ListConsentRequestsResponse:
        """Return one page of the consent requests partners made to a patient, newest first.

        ``states``: ``ConsentRequestState`` numbers to keep (empty keeps every state).
        """
        request = _list_consent_requests(patient_id, states, page_size, page_token)
        return self._call(self._consents.ListConsentRequests, request, consent_pb.ListConsentRequestsResponse)

    def iter_consent_requests(
        self, patient_id: str, *, states: Iterable[int] = (), page_size: int = 0
    ) -> Iterator[consent_pb2.PatientConsentRequest]:
        """Yield every consent request made to a patient (newest first), page after page."""
        states = list(states)
        token = ""
        while True:
            page = self.list_consent_requests(patient_id, states=states, page_size=page_size, page_token=token)
            yield from page.consent_requests
            token = page.next_page_token
            if not token:
                return

    def approve_consent_request(
        self, consent_request_id: str, *, fields: Iterable[int] = (), ttl: timedelta | None = None
    ) -> consent_pb2.PatientConsentRequest:
        """Approve a pending request, as asked or narrower (``fields`` a subset, ``ttl`` shorter). Not retried.

        Empty ``fields`` releases every field asked for; ``ttl`` ``None`` grants the ``ttl`` asked for.
        """
        request = _approve_consent_request(consent_request_id, fields, ttl)
        return self._call(
            self._consents.ApproveConsentRequest, request, consent_pb2.PatientConsentRequest, idempotent=False
        )

    def deny_consent_request(self, consent_request_id: str) -> consent_pb2.PatientConsentRequest:
        """Deny a pending request. Not retried."""
        request = consent_pb.DenyConsentRequestRequest(consent_request_id=consent_request_id)
        return self._call(
            self._consents.DenyConsentRequest, request, consent_pb2.PatientConsentRequest, idempotent=False
        )

    # AuditService

    def list_disclosures(
        self,
        *,
        partner_id: str = "",
        patient_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> audit_pb.ListDisclosuresResponse:
        """Return one page of audit records, oldest first (every filter optional)."""
        request = _list_disclosures(partner_id, patient_id, start_time, end_time, page_size, page_token)
        return self._call(self._audit.ListDisclosures, request, audit_pb.ListDisclosuresResponse)

    def iter_disclosures(
        self,
        *,
        partner_id: str = "",
        patient_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> Iterator[audit_pb2.Disclosure]:
        """Yield every audit record matching the filters, page after page."""
        token = ""
        while True:
            page = self.list_disclosures(
                partner_id=partner_id,
                patient_id=patient_id,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=token,
            )
            yield from page.disclosures
            token = page.next_page_token
            if not token:
                return

    def breach_report(
        self, partner_id: str, start_time: datetime, end_time: datetime, *, key_id: str | None = None
    ) -> audit_pb.BreachReportResponse:
        """Return the patients a partner reached in ``[start_time, end_time)`` and what was disclosed."""
        request = _breach_report(partner_id, start_time, end_time, key_id)
        return self._call(self._audit.BreachReport, request, audit_pb.BreachReportResponse)

    def list_patient_disclosures(
        self,
        patient_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> audit_pb.ListPatientDisclosuresResponse:
        """Return one page of a patient's history: who saw or tried to see what of theirs, newest first.

        Each ``PatientDisclosure`` aggregates one partner's responses about one
        appointment for one view, field set and outcome (with the partner's
        name, the consent's purpose, the first and last time and the count).
        ``start_time`` and ``end_time`` bound the responses counted (both
        optional); ``page_size`` 0 means 50, at most 500. Pass the previous
        page's ``next_page_token`` with the same other arguments for the next
        page. Raises :class:`~apptgate_client.errors.NotFound` for an unknown
        patient and :class:`~apptgate_client.errors.InvalidArgument` for a
        malformed id, window, size or token. ``ValueError`` for a naive datetime.
        """
        request = _list_patient_disclosures(patient_id, start_time, end_time, page_size, page_token)
        return self._call(self._audit.ListPatientDisclosures, request, audit_pb.ListPatientDisclosuresResponse)

    def iter_patient_disclosures(
        self,
        patient_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> Iterator[audit_pb2.PatientDisclosure]:
        """Yield a patient's whole history (newest first), page after page; see :meth:`list_patient_disclosures`."""
        token = ""
        while True:
            page = self.list_patient_disclosures(
                patient_id, start_time=start_time, end_time=end_time, page_size=page_size, page_token=token
            )
            yield from page.disclosures
            token = page.next_page_token
            if not token:
                return

    def watch_privacy_events(
        self, resume_token: str = "", *, resume_timeout: float = DEFAULT_RESUME_TIMEOUT
    ) -> PrivacyEventWatch:
        """Return the privacy events stream, to use as a context manager.

        ``with client.watch_privacy_events() as events:`` returns once the
        stream is live: every event that commits from then on reaches it.
        Iterating yields ``PrivacyEvent`` messages (what a patient is to be told
        of: consents requested, granted, revoked or expired, a partner's first
        receipt of their contact details, a partner suspended), each once and in
        commit order, and resumes after a server restart with the last token
        (see :mod:`apptgate_client.watch`). Store ``resume_token`` once an event
        is handled; pass it here to continue right after that event, with every
        event committed meanwhile replayed first. A malformed or foreign token
        raises :class:`~apptgate_client.errors.InvalidArgument`. ``resume_timeout``
        is how many seconds the watch keeps trying to get a live stream back
        before it raises the last error.
        """
        return PrivacyEventWatch(
            self._audit.WatchPrivacyEvents, self._metadata, resume_token, self._retry, resume_timeout=resume_timeout
        )


class AsyncInternalClient:
    """The asyncio twin of :class:`InternalClient`, over a ``grpc.aio`` channel.

    Create it inside a running event loop; use it as an async context manager.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = _transport.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: _transport.ChannelOptions = (),
    ) -> None:
        retry = retry or RetryPolicy()
        self.target = target
        self._retry = retry
        self._metadata = _transport.bearer_metadata(token, "token")
        self._call = _transport.AsyncCaller(self._metadata, _transport.check_timeout(timeout), retry)
        self._channel = _transport.aio_channel(target, credentials, _transport.channel_options(retry, options))
        self._scheduling = scheduling_grpc.SchedulingServiceStub(self._channel)
        self._registry = registry_grpc.PartnerRegistryServiceStub(self._channel)
        self._consents = consent_grpc.ConsentServiceStub(self._channel)
        self._audit = audit_grpc.AuditServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncInternalClient({self.target!r})"

    async def __aenter__(self) -> AsyncInternalClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def create_practitioner(self, display_name: str, specialty: str) -> scheduling_pb2.Practitioner:
        """See :meth:`InternalClient.create_practitioner`."""
        request = scheduling_pb.CreatePractitionerRequest(display_name=display_name, specialty=specialty)
        return await self._call(
            self._scheduling.CreatePractitioner, request, scheduling_pb2.Practitioner, idempotent=False
        )

    async def create_patient(
        self, given_name: str, family_name: str, *, sex: int = 0, phone: str = "", email: str = ""
    ) -> scheduling_pb2.Patient:
        """See :meth:`InternalClient.create_patient`."""
        request = _create_patient(given_name, family_name, sex, phone, email)
        return await self._call(self._scheduling.CreatePatient, request, scheduling_pb2.Patient, idempotent=False)

    async def create_appointment(
        self, practitioner_id: str, patient_id: str, start_time: datetime, end_time: datetime, *, reason: str = ""
    ) -> scheduling_pb2.Appointment:
        """See :meth:`InternalClient.create_appointment`."""
        request = _create_appointment(practitioner_id, patient_id, start_time, end_time, reason)
        return await self._call(
            self._scheduling.CreateAppointment, request, scheduling_pb2.Appointment, idempotent=False
        )

    async def cancel_appointment(self, appointment_id: str) -> scheduling_pb2.Appointment:
        """See :meth:`InternalClient.cancel_appointment`."""
        request = scheduling_pb.CancelAppointmentRequest(appointment_id=appointment_id)
        return await self._call(
            self._scheduling.CancelAppointment, request, scheduling_pb2.Appointment, idempotent=False
        )

    async def create_partner(self, display_name: str) -> partner_registry_pb2.Partner:
        """See :meth:`InternalClient.create_partner`."""
        request = registry_pb.CreatePartnerRequest(display_name=display_name)
        return await self._call(self._registry.CreatePartner, request, partner_registry_pb2.Partner, idempotent=False)

    async def issue_partner_key(self, partner_id: str) -> partner_registry_pb2.PartnerKey:
        """See :meth:`InternalClient.issue_partner_key`."""
        request = registry_pb.IssuePartnerKeyRequest(partner_id=partner_id)
        return await self._call(
            self._registry.IssuePartnerKey, request, partner_registry_pb2.PartnerKey, idempotent=False
        )

    async def revoke_partner_key(self, key_id: str) -> partner_registry_pb2.PartnerKey:
        """See :meth:`InternalClient.revoke_partner_key`."""
        request = registry_pb.RevokePartnerKeyRequest(key_id=key_id)
        return await self._call(
            self._registry.RevokePartnerKey, request, partner_registry_pb2.PartnerKey, idempotent=False
        )

    async def grant_practitioner_access(
        self, partner_id: str, practitioner_id: str
    ) -> partner_registry_pb2.PractitionerGrant:
        """See :meth:`InternalClient.grant_practitioner_access`."""
        request = registry_pb.GrantPractitionerAccessRequest(partner_id=partner_id, practitioner_id=practitioner_id)
        return await self._call(
            self._registry.GrantPractitionerAccess, request, partner_registry_pb2.PractitionerGrant, idempotent=False
        )

    async def revoke_practitioner_access(
        self, partner_id: str, practitioner_id: str
    ) -> partner_registry_pb2.PractitionerGrant:
        """See :meth:`InternalClient.revoke_practitioner_access`."""
        request = registry_pb.RevokePractitionerAccessRequest(partner_id=partner_id, practitioner_id=practitioner_id)
        return await self._call(
            self._registry.RevokePractitionerAccess, request, partner_registry_pb2.PractitionerGrant, idempotent=False
        )

    async def grant_consent(
        self, patient_id: str, partner_id: str, fields: Iterable[int], ttl: timedelta, purpose: str
    ) -> consent_pb2.Consent:
        """See :meth:`InternalClient.grant_consent`."""
        request = _grant_consent(patient_id, partner_id, fields, ttl, purpose)
        return await self._call(self._consents.GrantConsent, request, consent_pb2.Consent, idempotent=False)

    async def revoke_consent(self, consent_id: str) -> consent_pb2.Consent:
        """See :meth:`InternalClient.revoke_consent`."""
        request = consent_pb.RevokeConsentRequest(consent_id=consent_id)
        return await self._call(self._consents.RevokeConsent, request, consent_pb2.Consent, idempotent=False)

    async def list_consents(self, patient_id: str) -> list[consent_pb2.Consent]:
        """See :meth:`InternalClient.list_consents`."""
        request = consent_pb.ListConsentsRequest(patient_id=patient_id)
        reply = await self._call(self._consents.ListConsents, request, consent_pb.ListConsentsResponse)
        return list(reply.consents)

    async def list_consent_requests(
        self, patient_id: str, *, states: Iterable[int] = (), page_size: int = 0, page_token: str = ""
    ) -> consent_pb.ListConsentRequestsResponse:
        """See :meth:`InternalClient.list_consent_requests`."""
        request = _list_consent_requests(patient_id, states, page_size, page_token)
        return await self._call(self._consents.ListConsentRequests, request, consent_pb.ListConsentRequestsResponse)

    async def iter_consent_requests(
        self, patient_id: str, *, states: Iterable[int] = (), page_size: int = 0
    ) -> AsyncIterator[consent_pb2.PatientConsentRequest]:
        """See :meth:`InternalClient.iter_consent_requests`."""
        states = list(states)
        token = ""
        while True:
            page = await self.list_consent_requests(patient_id, states=states, page_size=page_size, page_token=token)
            for consent_request in page.consent_requests:
                yield consent_request
            token = page.next_page_token
            if not token:
                return

    async def approve_consent_request(
        self, consent_request_id: str, *, fields: Iterable[int] = (), ttl: timedelta | None = None
    ) -> consent_pb2.PatientConsentRequest:
        """See :meth:`InternalClient.approve_consent_request`."""
        request = _approve_consent_request(consent_request_id, fields, ttl)
        return await self._call(
            self._consents.ApproveConsentRequest, request, consent_pb2.PatientConsentRequest, idempotent=False
        )

    async def deny_consent_request(self, consent_request_id: str) -> consent_pb2.PatientConsentRequest:
        """See :meth:`InternalClient.deny_consent_request`."""
        request = consent_pb.DenyConsentRequestRequest(consent_request_id=consent_request_id)
        return await self._call(
            self._consents.DenyConsentRequest, request, consent_pb2.PatientConsentRequest, idempotent=False
        )

    async def list_disclosures(
        self,
        *,
        partner_id: str = "",
        patient_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> audit_pb.ListDisclosuresResponse:
        """See :meth:`InternalClient.list_disclosures`."""
        request = _list_disclosures(partner_id, patient_id, start_time, end_time, page_size, page_token)
        return await self._call(self._audit.ListDisclosures, request, audit_pb.ListDisclosuresResponse)

    async def iter_disclosures(
        self,
        *,
        partner_id: str = "",
        patient_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[audit_pb2.Disclosure]:
        """See :meth:`InternalClient.iter_disclosures`."""
        token = ""
        while True:
            page = await self.list_disclosures(
                partner_id=partner_id,
                patient_id=patient_id,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=token,
            )
            for disclosure in page.disclosures:
                yield disclosure
            token = page.next_page_token
            if not token:
                return

    async def breach_report(
        self, partner_id: str, start_time: datetime, end_time: datetime, *, key_id: str | None = None
    ) -> audit_pb.BreachReportResponse:
        """See :meth:`InternalClient.breach_report`."""
        request = _breach_report(partner_id, start_time, end_time, key_id)
        return await self._call(self._audit.BreachReport, request, audit_pb.BreachReportResponse)

    async def list_patient_disclosures(
        self,
        patient_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> audit_pb.ListPatientDisclosuresResponse:
        """See :meth:`InternalClient.list_patient_disclosures`."""
        request = _list_patient_disclosures(patient_id, start_time, end_time, page_size, page_token)
        return await self._call(self._audit.ListPatientDisclosures, request, audit_pb.ListPatientDisclosuresResponse)

    async def iter_patient_disclosures(
        self,
        patient_id: str,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[audit_pb2.PatientDisclosure]:
        """See :meth:`InternalClient.iter_patient_disclosures`."""
        token = ""
        while True:
            page = await self.list_patient_disclosures(
                patient_id, start_time=start_time, end_time=end_time, page_size=page_size, page_token=token
            )
            for disclosure in page.disclosures:
                yield disclosure
            token = page.next_page_token
            if not token:
                return

    def watch_privacy_events(
        self, resume_token: str = "", *, resume_timeout: float = DEFAULT_RESUME_TIMEOUT
    ) -> AsyncPrivacyEventWatch:
        """Return the privacy events stream, for ``async with``/``async for``.

        See :meth:`InternalClient.watch_privacy_events`.
        """
        return AsyncPrivacyEventWatch(
            self._audit.WatchPrivacyEvents, self._metadata, resume_token, self._retry, resume_timeout=resume_timeout
        )
