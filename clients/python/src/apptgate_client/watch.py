"""Change-feed streams that resume by themselves: :class:`AppointmentWatch` and :class:`AsyncAppointmentWatch`.

Get one from ``PartnerClient.watch_appointments()`` (or the async client's)
and use it as a context manager: entering returns once the stream is *live*
(the server sent its headers), so changes that commit from then on reach it.
That is the moment to list the appointments you keep in sync; then iterate
over the changes.

Resumption:

* opening retries ``UNAVAILABLE`` like a unary call (backoff, full jitter, ``RetryInfo``);
* a live stream that ends with ``UNAVAILABLE`` (a server restart, the database
  away) or ``RESOURCE_EXHAUSTED``/``STREAM_TOO_SLOW`` is reopened with the last
  :attr:`~AppointmentWatch.resume_token`: the server replays every change after
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
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from appointments.partner.v1 import partner_appointment_service_pb2 as pb

from apptgate_client._transport import log
from apptgate_client.errors import ApptgateError, ResourceExhausted, Unavailable, from_rpc_error
from apptgate_client.retry import RetryPolicy, next_delay

STREAM_TOO_SLOW = "STREAM_TOO_SLOW"


def resumable(error: ApptgateError) -> bool:
    """True when a stream that ended with ``error`` may be reopened with its last resume token."""
    return isinstance(error, Unavailable) or (isinstance(error, ResourceExhausted) and error.reason == STREAM_TOO_SLOW)


def _change(message: object) -> pb.AppointmentChange:
    if not isinstance(message, pb.AppointmentChange):
        raise TypeError(f"expected AppointmentChange, got {type(message).__name__}")
    return message


class _Resumer:
    """The state both watches share: what to send, the last token, and the retry budget."""

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        practitioner_id: str,
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.practitioner_id = practitioner_id
        self.resume_token = resume_token
        self.retry = retry
        self.attempt = 0
        self.rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def request(self) -> pb.WatchAppointmentsRequest:
        return pb.WatchAppointmentsRequest(practitioner_id=self.practitioner_id, resume_token=self.resume_token)

    def delay(self, error: ApptgateError, *, live: bool) -> float | None:
        """The wait before reopening after ``error``, or ``None`` to raise it."""
        if live and not self.resume_token:
            return None  # reopening "from now" would skip what committed meanwhile
        return next_delay(
            self.retry, error, attempt=self.attempt, remaining=math.inf, rng=self.rng, retryable=resumable(error)
        )

    def received(self, change: pb.AppointmentChange) -> pb.AppointmentChange:
        self.resume_token = change.resume_token
        self.attempt = 0
        return change


class AppointmentWatch:
    """A live ``WatchAppointments`` stream (blocking) that resumes after transient ends. See the module docstring.

    Iterate to get :class:`AppointmentChange` messages; :attr:`resume_token` is
    the token of the last one, to store once you applied it. Raises
    :class:`~apptgate_client.errors.ApptgateError` subclasses.
    """

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        practitioner_id: str,
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        self._state = _Resumer(method, metadata, practitioner_id, resume_token, retry)
        self._call: Any = None

    @property
    def resume_token(self) -> str:
        """The resume token of the last change received (or the one the watch started from)."""
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
                log.info("WatchAppointments: %s; reopening in %.3f s", error, delay)
                time.sleep(delay)
            else:
                self._call = call
                return

    def close(self) -> None:
        """End the stream."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def __enter__(self) -> AppointmentWatch:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> AppointmentWatch:
        return self

    def __next__(self) -> pb.AppointmentChange:
        while True:
            if self._call is None:
                self.open()
            try:
                return self._state.received(_change(next(self._call)))
            except StopIteration:
                self.close()
                raise
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=self._state.attempt)
                delay = self._state.delay(error, live=True)
                if delay is None:
                    raise error from exc
                log.info("WatchAppointments: %s; resuming in %.3f s", error, delay)
                self._call = None
                time.sleep(delay)


class AsyncAppointmentWatch:
    """The asyncio twin of :class:`AppointmentWatch`: ``async with`` and ``async for``."""

    def __init__(
        self,
        method: Any,
        metadata: tuple[tuple[str, str], ...],
        practitioner_id: str,
        resume_token: str,
        retry: RetryPolicy,
    ) -> None:
        self._state = _Resumer(method, metadata, practitioner_id, resume_token, retry)
        self._call: Any = None

    @property
    def resume_token(self) -> str:
        """The resume token of the last change received (or the one the watch started from)."""
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
                log.info("WatchAppointments: %s; reopening in %.3f s", error, delay)
                await asyncio.sleep(delay)
            else:
                self._call = call
                return

    async def close(self) -> None:
        """End the stream."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __aenter__(self) -> AsyncAppointmentWatch:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncAppointmentWatch:
        return self

    async def __anext__(self) -> pb.AppointmentChange:
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
                log.info("WatchAppointments: %s; resuming in %.3f s", error, delay)
                self._call = None
                await asyncio.sleep(delay)
                continue
            if message is grpc.aio.EOF:
                await self.close()
                raise StopAsyncIteration
            return self._state.received(_change(message))
