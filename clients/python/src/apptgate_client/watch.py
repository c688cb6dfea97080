"""Change-feed streams that resume by themselves.

:class:`AppointmentWatch` / :class:`AsyncAppointmentWatch` follow
``WatchAppointments``; :class:`ConsentRequestWatch` /
:class:`AsyncConsentRequestWatch` follow ``WatchConsentRequests``;
:class:`PrivacyEventWatch` / :class:`AsyncPrivacyEventWatch` follow the
internal ``WatchPrivacyEvents``. Each is a :class:`ResumableWatch` (blocking)
or :class:`AsyncResumableWatch` (asyncio) of its event type, and they behave
alike.

Get one from ``PartnerClient.watch_appointments()``,
``PartnerClient.watch_consent_requests()`` or
``InternalClient.watch_privacy_events()`` (or the async clients') and use it
as a context manager: entering returns once the stream is *live* (the server
sent its headers), so changes that commit from then on reach it. That is the
moment to list what you keep in sync (the appointments; the consent requests
you track); then iterate over the changes.

Resumption:

* opening retries ``UNAVAILABLE`` like a unary call (backoff, full jitter, ``RetryInfo``);
* a live stream that ends with ``UNAVAILABLE`` (a server restart, the database
  away) or ``RESOURCE_EXHAUSTED``/``STREAM_TOO_SLOW`` is reopened with the last
  :attr:`~ResumableWatch.resume_token`: the server replays every change after
  it, exactly once and in order, so the iteration goes on without a gap or a
  repeat. The retry budget starts again after each change received;
* a stream that ends before it delivered any change, when it was opened without
  a token, cannot resume without a gap: its error is raised (list again, then
  watch again); so is any other error (``PERMISSION_DENIED`` with reason
  ``ACCESS_REVOKED``, ``UNAUTHENTICATED``, ``OUT_OF_RANGE``, ...).

A watch has no deadline: it is meant to run for hours, and keepalive pings
(see ``_transport.channel_options``) detect a dead connection instead.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import grpc
import grpc.aio
from appointments.internal.v1 import audit_pb2
from appointments.internal.v1 import audit_service_pb2 as audit_pb
from appointments.partner.v1 import consent_request_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from google.protobuf.message import Message

from apptgate_client._transport import log
from apptgate_client.errors import ApptgateError, ResourceExhausted, Unavailable, from_rpc_error
from apptgate_client.retry import RetryPolicy, next_delay

STREAM_TOO_SLOW = "STREAM_TOO_SLOW"


class _Event(Protocol):
    """An event of a resumable stream: it carries the token to resume right after it."""

    @property
    def resume_token(self) -> str: ...


_E = TypeVar("_E", bound=_Event)

#: Builds a stream's request from the resume token to send.
RequestFactory = Callable[[str], Message]


def resumable(error: ApptgateError) -> bool:
    """True when a stream that ended with ``error`` may be reopened with its last resume token."""
    return isinstance(error, Unavailable) or (isinstance(error, ResourceExhausted) and error.reason == STREAM_TOO_SLOW)


class _Resumer(Generic[_E]):
    """The state a watch keeps across its streams: what to send, the last token, and the retry budget."""

    def __init__(
        self,
        name: str,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        request: RequestFactory,
        event_type: type[_E],
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        self.name = name
        self.method = method
        self.metadata = metadata
        self.build = request
        self.event_type = event_type
        self.resume_token = resume_token
        self.retry = retry
        self.attempt = 0
        self.rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def request(self) -> Message:
        return self.build(self.resume_token)

    def delay(self, error: ApptgateError, *, live: bool) -> float | None:
        """The wait before reopening after ``error``, or ``None`` to raise it."""
        if live and not self.resume_token:
            return None  # reopening "from now" would skip what committed meanwhile
        return next_delay(
            self.retry, error, attempt=self.attempt, remaining=math.inf, rng=self.rng, retryable=resumable(error)
        )

    def received(self, message: object) -> _E:
        if not isinstance(message, self.event_type):
            raise TypeError(f"expected {self.event_type.__name__}, got {type(message).__name__}")
        self.resume_token = message.resume_token
        self.attempt = 0
        return message


class ResumableWatch(Generic[_E]):
    """A live server stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get the events; :attr:`resume_token` is the token of the last
    one, to store once you applied it. Raises
    :class:`~apptgate_client.errors.ApptgateError` subclasses.
    """

    def __init__(
        self,
        name: str,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        request: RequestFactory,
        event_type: type[_E],
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        self._state = _Resumer(name, method, metadata, request, event_type, resume_token, retry)
        self._call: Any = None

    @property
    def resume_token(self) -> str:
        """The resume token of the last event received (or the one the watch started from)."""
        return self._state.resume_token

    def open(self) -> None:
        """Open the stream and wait until it is live. Retries ``UNAVAILABLE``; raises other errors."""
        state = self._state
        while True:
            state.attempt += 1
            call = state.method(state.request(), metadata=state.metadata)
            try:
                call.initial_metadata()  # returns when the server sent its headers, or ended the call
                if call.done() and call.code() != grpc.StatusCode.OK:
                    raise call  # the call is its own grpc.RpcError
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=state.attempt)
                delay = state.delay(error, live=False)
                if delay is None:
                    raise error from exc
                log.info("%s: %s; reopening in %.3f s", state.name, error, delay)
                time.sleep(delay)
            else:
                self._call = call
                return

    def close(self) -> None:
        """End the stream."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> _E:
        while True:
            if self._call is None:
                self.open()
            try:
                return self._state.received(next(self._call))
            except StopIteration:
                self.close()
                raise
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=self._state.attempt)
                delay = self._state.delay(error, live=True)
                if delay is None:
                    raise error from exc
                log.info("%s: %s; resuming in %.3f s", self._state.name, error, delay)
                self._call = None
                time.sleep(delay)


class AsyncResumableWatch(Generic[_E]):
    """The asyncio twin of :class:`ResumableWatch`: ``async with`` and ``async for``."""

    def __init__(
        self,
        name: str,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        request: RequestFactory,
        event_type: type[_E],
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        self._state = _Resumer(name, method, metadata, request, event_type, resume_token, retry)
        self._call: Any = None

    @property
    def resume_token(self) -> str:
        """The resume token of the last event received (or the one the watch started from)."""
        return self._state.resume_token

    async def open(self) -> None:
        """Open the stream and wait until it is live. Retries ``UNAVAILABLE``; raises other errors."""
        state = self._state
        while True:
            state.attempt += 1
            call = state.method(state.request(), metadata=state.metadata)
            try:
                await call.initial_metadata()
                if call.done():
                    await call.wait_for_connection()  # raises AioRpcError when the call failed
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=state.attempt)
                delay = state.delay(error, live=False)
                if delay is None:
                    raise error from exc
                log.info("%s: %s; reopening in %.3f s", state.name, error, delay)
                await asyncio.sleep(delay)
            else:
                self._call = call
                return

    async def close(self) -> None:
        """End the stream."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _E:
        while True:
            if self._call is None:
                await self.open()
            try:
                message = await self._call.read()
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=self._state.attempt)
                delay = self._state.delay(error, live=True)
                if delay is None:
                    raise error from exc
                log.info("%s: %s; resuming in %.3f s", self._state.name, error, delay)
                self._call = None
                await asyncio.sleep(delay)
                continue
            if message is grpc.aio.EOF:
                await self.close()
                raise StopAsyncIteration
            return self._state.received(message)


def _appointments_request(practitioner_id: str) -> RequestFactory:
    return lambda token: pb.WatchAppointmentsRequest(practitioner_id=practitioner_id, resume_token=token)


def _consent_requests_request(token: str) -> pb.WatchConsentRequestsRequest:
    return pb.WatchConsentRequestsRequest(resume_token=token)


def _privacy_events_request(token: str) -> audit_pb.WatchPrivacyEventsRequest:
    return audit_pb.WatchPrivacyEventsRequest(resume_token=token)


class AppointmentWatch(ResumableWatch[pb.AppointmentChange]):
    """A live ``WatchAppointments`` stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get :class:`AppointmentChange` messages.
    """

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        practitioner_id: str,
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        super().__init__(
            "WatchAppointments",
            method,
            metadata,
            _appointments_request(practitioner_id),
            pb.AppointmentChange,
            resume_token,
            retry,
        )


class AsyncAppointmentWatch(AsyncResumableWatch[pb.AppointmentChange]):
    """The asyncio twin of :class:`AppointmentWatch`: ``async with`` and ``async for``."""

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        practitioner_id: str,
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        super().__init__(
            "WatchAppointments",
            method,
            metadata,
            _appointments_request(practitioner_id),
            pb.AppointmentChange,
            resume_token,
            retry,
        )


class ConsentRequestWatch(ResumableWatch[consent_request_pb2.ConsentRequestEvent]):
    """A live ``WatchConsentRequests`` stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get :class:`ConsentRequestEvent` messages: each carries one of
    your consent requests as a change left it (made, approved, denied,
    cancelled, expired, consent revoked).
    """

    def __init__(
        self, method: Any, metadata: tuple[tuple[str, str], ...], resume_token: str, retry: RetryPolicy
    ) -> None:
        super().__init__(
            "WatchConsentRequests",
            method,
            metadata,
            _consent_requests_request,
            consent_request_pb2.ConsentRequestEvent,
            resume_token,
            retry,
        )


class AsyncConsentRequestWatch(AsyncResumableWatch[consent_request_pb2.ConsentRequestEvent]):
    """The asyncio twin of :class:`ConsentRequestWatch`: ``async with`` and ``async for``."""

    def __init__(
        self, method: Any, metadata: tuple[tuple[str, str], ...], resume_token: str, retry: RetryPolicy
    ) -> None:
        super().__init__(
            "WatchConsentRequests",
            method,
            metadata,
            _consent_requests_request,
            consent_request_pb2.ConsentRequestEvent,
            resume_token,
            retry,
        )


class PrivacyEventWatch(ResumableWatch[audit_pb2.PrivacyEvent]):
    """A live ``WatchPrivacyEvents`` stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get :class:`PrivacyEvent` messages: what a patient is to be
    told of (a consent requested, granted, revoked or expired; a partner's
    first receipt of the patient's contact details; the suspension of a
    partner that received the patient's data), each once, in commit order.
    """

    def __init__(
        self, method: Any, metadata: tuple[tuple[str, str], ...], resume_token: str, retry: RetryPolicy
    ) -> None:
        super().__init__(
            "WatchPrivacyEvents",
            method,
            metadata,
            _privacy_events_request,
            audit_pb2.PrivacyEvent,
            resume_token,
            retry,
        )


class AsyncPrivacyEventWatch(AsyncResumableWatch[audit_pb2.PrivacyEvent]):
    """The asyncio twin of :class:`PrivacyEventWatch`: ``async with`` and ``async for``."""

    def __init__(
        self, method: Any, metadata: tuple[tuple[str, str], ...], resume_token: str, retry: RetryPolicy
    ) -> None:
        super().__init__(
            "WatchPrivacyEvents",
            method,
            metadata,
            _privacy_events_request,
            audit_pb2.PrivacyEvent,
            resume_token,
            retry,
        )
