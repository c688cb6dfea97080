"""Channels and the call loop shared by every client: credentials, deadline, retries, error translation.

One logical call gets one deadline (``timeout`` seconds from its start) that
covers every attempt; each attempt is sent with the time that remains. A
failure is translated to its :mod:`apptgate_client.errors` type at once;
:func:`apptgate_client.retry.next_delay` decides whether to send again.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import random
import re
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from apptgate_client.errors import from_rpc_error
from apptgate_client.retry import RetryPolicy, next_delay

try:
    __version__ = importlib.metadata.version("apptgate-client")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

#: The deadline of a call when the client and the method are given none, in seconds.
DEFAULT_TIMEOUT = 10.0
USER_AGENT = f"apptgate-client-python/{__version__}"
KEEPALIVE_TIME_MS = 60_000

log = logging.getLogger("apptgate_client")

_T = TypeVar("_T", bound=Message)
# A header value: visible ASCII, no spaces (a partner key or token never has any).
_CREDENTIAL = re.compile(r"[\x21-\x7e]+")

ChannelOptions = Sequence[tuple[str, Any]]


def bearer_metadata(secret: str, what: str) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying ``secret``. Raises ``ValueError`` for an empty or malformed secret."""
    if not isinstance(secret, str) or not _CREDENTIAL.fullmatch(secret):
        # The message never repeats the secret.
        raise ValueError(f"{what} must be a non-empty string of visible ASCII characters")
    return (("authorization", f"Bearer {secret}"),)


def check_timeout(timeout: float) -> float:
    """Return ``timeout`` as a float. Raises ``ValueError`` unless it is positive."""
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return float(timeout)


def channel_options(retry: RetryPolicy, extra: ChannelOptions) -> list[tuple[str, Any]]:
    """The channel arguments: a user agent, keepalive, and reconnect backoffs in step with the retry policy.

    Without the latter, a channel whose connection failed would wait its own
    default backoff (1 s, growing) before reconnecting, and the client's
    retries in between would fail at once without reaching the server.
    """
    return [
        ("grpc.primary_user_agent", USER_AGENT),
        ("grpc.initial_reconnect_backoff_ms", max(1, round(retry.initial_backoff * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, round(retry.max_backoff * 1000))),
        # Keepalive pings while a call is open (a change-feed stream, which has no deadline), so a
        # dead connection is noticed. The gateway accepts a ping every 10 s at most, only during calls.
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        *extra,
    ]


def sync_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> grpc.Channel:
    """A sync channel: TLS with ``credentials``, plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def aio_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """An asyncio channel: TLS with ``credentials``, plaintext without."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def _checked(result: object, response_type: type[_T]) -> _T:
    if not isinstance(result, response_type):
        raise TypeError(f"expected {response_type.__name__}, got {type(result).__name__}")
    return result


class Caller:
    """Sends unary calls on a sync channel with credentials, a deadline and retries."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout: float, retry: RetryPolicy) -> None:
        self._metadata = metadata
        self.timeout = timeout
        self.retry = retry
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography

    def __call__(
        self,
        method: Any,
        request: Message,
        response_type: type[_T],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> _T:
        """Call ``method`` (a stub attribute) with ``request``; raise an ``ApptgateError`` when it fails."""
        deadline = time.monotonic() + (self.timeout if timeout is None else check_timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                result = method(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
                delay = None
                if idempotent:
                    remaining = deadline - time.monotonic()
                    delay = next_delay(self.retry, error, attempt=attempt, remaining=remaining, rng=self._rng)
                if delay is None:
                    raise error from exc
                log.info("%s: %s; retrying in %.3f s", type(request).__name__, error, delay)
                time.sleep(delay)
            else:
                return _checked(result, response_type)


class AsyncCaller:
    """Sends unary calls on a ``grpc.aio`` channel with credentials, a deadline and retries."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout: float, retry: RetryPolicy) -> None:
        self._metadata = metadata
        self.timeout = timeout
        self.retry = retry
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography

    async def __call__(
        self,
        method: Any,
        request: Message,
        response_type: type[_T],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
    ) -> _T:
        """Call ``method`` (a stub attribute) with ``request``; raise an ``ApptgateError`` when it fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else check_timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await method(request, timeout=max(deadline - loop.time(), 0.0), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
                delay = None
                if idempotent:
                    remaining = deadline - loop.time()
                    delay = next_delay(self.retry, error, attempt=attempt, remaining=remaining, rng=self._rng)
                if delay is None:
                    raise error from exc
                log.info("%s: %s; retrying in %.3f s", type(request).__name__, error, delay)
                await asyncio.sleep(delay)
            else:
                return _checked(result, response_type)
