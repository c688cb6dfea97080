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

* opening retries ``UNAVAILABLE`` (backoff with full jitter, never sooner than
  the server's ``RetryInfo``);
* a live stream that ends with ``UNAVAILABLE`` (a server restart or shutdown,
  reason ``SERVER_SHUTTING_DOWN``; the database away) or
  ``RESOURCE_EXHAUSTED``/``STREAM_TOO_SLOW`` is reopened with the last
  :attr:`~ResumableWatch.resume_token`, on whichever server the channel
  reaches: the server replays every change after it, exactly once and in
  order, so the iteration goes on without a gap or a repeat;
* a watch keeps trying for ``resume_timeout`` seconds (60 by default) without
  a live stream, however many attempts that takes, then raises the last error.
  The retry policy's backoffs shape the waits; its ``max_attempts`` bounds
  unary calls only. ``resume_timeout=0`` raises at the first failure;
* ``WatchAppointments`` streams ask for bookmarks: the server sends one as soon
  as the stream has caught up, then whenever it has been quiet for a while,
  and a last one when it shuts down. A bookmark is never yielded; its token
  becomes :attr:`~ResumableWatch.resume_token`, so even a watch opened without
  a token that has received no change yet resumes exactly;
* a stream that ends before it gave the watch any token (no change, no
  bookmark), when it was opened without one, cannot resume without a gap: its
  error is raised (list again, then watch again); so is any other error
  (``PERMISSION_DENIED`` with reason ``ACCESS_REVOKED``, ``UNAUTHENTICATED``,
  ``OUT_OF_RANGE``, ...).

To resume on another process when one stops, give the client a target that
reaches several: a load balancer's address, a DNS name with several addresses,
or a list such as ``ipv4:10.0.0.7:50051,10.0.0.8:50051``.

A watch has no deadline: it is meant to run for hours, and keepalive pings
(see ``_transport.channel_options``) detect a dead connection instead.
"""

from __future__ import annotations

import asyncio
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
from apptgate_client.retry import RetryPolicy, resume_delay

STREAM_TOO_SLOW = "STREAM_TOO_SLOW"
#: Seconds a watch keeps trying to get a live stream back before it raises, unless told otherwise.
DEFAULT_RESUME_TIMEOUT = 60.0


class _Event(Protocol):
    """An event of a resumable stream: it carries the token to resume right after it."""

    @property
    def resume_token(self) -> str: ...


_E = TypeVar("_E", bound=_Event)

#: Builds a stream's request from the resume token to send.
RequestFactory = Callable[[str], Message]
#: Tells the events a watch keeps to itself (bookmarks) from those it yields.
Skip = Callable[[Any], bool]


def check_resume_timeout(resume_timeout: float) -> float:
    """Return ``resume_timeout`` as a float. Raises ``ValueError`` unless it is a number of seconds >= 0."""
    if not resume_timeout >= 0:
        raise ValueError("resume_timeout must be a number of seconds, 0 or more")
    return float(resume_timeout)


def resumable(error: ApptgateError) -> bool:
    """True when a stream that ended with ``error`` may be reopened with its last resume token."""
    return isinstance(error, Unavailable) or (isinstance(error, ResourceExhausted) and error.reason == STREAM_TOO_SLOW)


class _Resumer(Generic[_E]):
    """The state a watch keeps across its streams: what to send, the last token, and the time budget.

    ``attempt`` counts the sends since the last event received (the backoff
    grows with it); ``outage_since`` is when the watch lost its last live
    stream, ``None`` while one is live.
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
        resume_timeout: float,
        skip: Skip | None = None,
    ) -> None:
        self.name = name
        self.method = method
        self.metadata = metadata
        self.build = request
        self.event_type = event_type
        self.resume_token = resume_token
        self.retry = retry
        self.resume_timeout = check_resume_timeout(resume_timeout)
        self.skip = skip
        self.attempt = 0
        self.outage_since: float | None = None
        self.rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def request(self) -> Message:
        return self.build(self.resume_token)

    def live(self) -> None:
        """A stream is live again: the outage is over."""
        self.outage_since = None

    def delay(self, error: ApptgateError, *, live: bool) -> float | None:
        """The wait before reopening after ``error``, or ``None`` to raise it."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
        if live and not self.resume_token:
            return None  # reopening "from now" would skip what committed meanwhile
        if not resumable(error):
            return None
        remaining = self.resume_timeout - (now - self.outage_since)
        return resume_delay(self.retry, error, attempt=max(self.attempt, 1), remaining=remaining, rng=self.rng)

    def received(self, message: object) -> _E | None:
        """Keep the token of ``message``; return it, or ``None`` for a bookmark (never shown to the caller)."""
        if not isinstance(message, self.event_type):
            raise TypeError(f"expected {self.event_type.__name__}, got {type(message).__name__}")
        self.resume_token = message.resume_token
        self.attempt = 0
        self.outage_since = None
        if self.skip is not None and self.skip(message):
            return None
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
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        skip: Skip | None = None,
    ) -> None:
        self._state = _Resumer(name, method, metadata, request, event_type, resume_token, retry, resume_timeout, skip)
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
                state.live()
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
                event = self._state.received(next(self._call))
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
                continue
            if event is not None:
                return event


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
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        skip: Skip | None = None,
    ) -> None:
        self._state = _Resumer(name, method, metadata, request, event_type, resume_token, retry, resume_timeout, skip)
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
                state.live()
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
            event = self._state.received(message)
            if event is not None:
                return event


def _appointments_request(practitioner_id: str) -> RequestFactory:
    return lambda token: pb.WatchAppointmentsRequest(
        practitioner_id=practitioner_id, resume_token=token, allow_bookmarks=True
    )


def is_bookmark(change: pb.AppointmentChange) -> bool:
    """Whether ``change`` is a bookmark: a resume point, with no appointment."""
    return change.change_type == pb.CHANGE_TYPE_BOOKMARK


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
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        super().__init__(
            "WatchAppointments",
            method,
            metadata,
            _appointments_request(practitioner_id),
            pb.AppointmentChange,
            resume_token,
            retry,
            resume_timeout=resume_timeout,
            skip=is_bookmark,
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
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        super().__init__(
            "WatchAppointments",
            method,
            metadata,
            _appointments_request(practitioner_id),
            pb.AppointmentChange,
            resume_token,
            retry,
            resume_timeout=resume_timeout,
            skip=is_bookmark,
        )


class ConsentRequestWatch(ResumableWatch[consent_request_pb2.ConsentRequestEvent]):
    """A live ``WatchConsentRequests`` stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get :class:`ConsentRequestEvent` messages: each carries one of
    your consent requests as a change left it (made, approved, denied,
    cancelled, expired, consent revoked).
    """

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        resume_token: str,
        retry: RetryPolicy,
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        super().__init__(
            "WatchConsentRequests",
            method,
            metadata,
            _consent_requests_request,
            consent_request_pb2.ConsentRequestEvent,
            resume_token,
            retry,
            resume_timeout=resume_timeout,
        )


class AsyncConsentRequestWatch(AsyncResumableWatch[consent_request_pb2.ConsentRequestEvent]):
    """The asyncio twin of :class:`ConsentRequestWatch`: ``async with`` and ``async for``."""

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        resume_token: str,
        retry: RetryPolicy,
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        super().__init__(
            "WatchConsentRequests",
            method,
            metadata,
            _consent_requests_request,
            consent_request_pb2.ConsentRequestEvent,
            resume_token,
            retry,
            resume_timeout=resume_timeout,
        )


class PrivacyEventWatch(ResumableWatch[audit_pb2.PrivacyEvent]):
    """A live ``WatchPrivacyEvents`` stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get :class:`PrivacyEvent` messages: what a patient is to be
    told of (a consent requested, granted, revoked or expired; a partner's
    first receipt of the patient's contact details; the suspension of a
    partner that received the patient's data), each once, in commit order.
    """

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        resume_token: str,
        retry: RetryPolicy,
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        super().__init__(
            "WatchPrivacyEvents",
            method,
            metadata,
            _privacy_events_request,
            audit_pb2.PrivacyEvent,
            resume_token,
            retry,
            resume_timeout=resume_timeout,
        )


class AsyncPrivacyEventWatch(AsyncResumableWatch[audit_pb2.PrivacyEvent]):
    """The asyncio twin of :class:`PrivacyEventWatch`: ``async with`` and ``async for``."""

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        resume_token: str,
        retry: RetryPolicy,
        *,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        super().__init__(
            "WatchPrivacyEvents",
            method,
            metadata,
            _privacy_events_request,
            audit_pb2.PrivacyEvent,
            resume_token,
            retry,
            resume_timeout=resume_timeout,
        )
