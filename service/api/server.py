"""The gRPC edge: servers, the one error boundary, reflection, health and TLS.

Handlers raise :class:`~service.errors.ApptgateError`; :class:`ErrorBoundary`
turns those into a status with ``google.rpc`` details, and anything else into
a fixed INTERNAL whose detail goes to the log only (grpc.aio would otherwise
send the exception's text to the caller). Request bytes that do not decode
answer INVALID_ARGUMENT instead of grpc.aio's UNKNOWN.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from service import deadlines
from service.api.reflection import DocumentedPool
from service.errors import ApptgateError, DeadlineExceeded, InvalidArgument, internal_status
from service.inflight import CallsInFlight
from service.settings import TlsFiles, TransportLimits
from service.telemetry.logs import exception_fields
from service.telemetry.tracing import Telemetry, current_trace_id

log = logging.getLogger(__name__)

#: A check run before every method of the guarded services (for example the internal token).
Guard = Callable[[Sequence[tuple[str, str | bytes]] | None], None]


class _Undecodable:
    """Marks a request whose bytes did not decode, so the boundary can answer INVALID_ARGUMENT."""


_UNDECODABLE = _Undecodable()


async def _abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    await context.abort_with_status(rpc_status.to_status(status))


def _log_unexpected(method: str, exc: BaseException) -> None:
    # One line an INTERNAL can be diagnosed from: the method, the call's trace, the exception's
    # class and frames along its causes; never its text, which can quote stored values.
    fields: dict[str, str | None] = {
        "event": "unexpected_error",
        "method": method,
        "trace_id": current_trace_id() or None,
    }
    fields.update(exception_fields(exc))
    log.error("unexpected error", extra=fields)


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


def _code_name(code: int) -> str:
    return str(code_pb2.Code.Name(code))


def _wrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    guard: Guard | None,
    telemetry: Telemetry,
    listener: str,
    default_deadline: float,
    in_flight: CallsInFlight,
) -> grpc.RpcMethodHandler:
    """Return ``handler`` behind the error boundary, in a server span (unary-unary and unary-stream methods).

    A unary call gets the caller's deadline, or ``default_deadline`` when the
    caller set none; a stream only the caller's. The store bounds its database
    work by what remains. A unary call is counted in ``in_flight`` while its
    handler runs.
    """

    def enter(request: Any, context: grpc.aio.ServicerContext) -> None:
        if request is _UNDECODABLE:
            raise InvalidArgument.field("request", "the request message does not decode", reason="MALFORMED_REQUEST")
        if guard is not None:
            guard(context.invocation_metadata())

    async def fail(context: grpc.aio.ServicerContext, exc: BaseException, outcome: list[str]) -> None:
        """Answer with the error's status (expected) or a fixed INTERNAL (unexpected); abort raises."""
        if isinstance(exc, ApptgateError):
            outcome[:] = [_code_name(exc.code), exc.reason]
            await _abort(context, exc.to_status())
        else:
            _log_unexpected(method, exc)
            outcome[:] = ["INTERNAL", "INTERNAL"]
            await _abort(context, internal_status())

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            outcome = ["OK", ""]
            remaining = context.time_remaining()
            budget = default_deadline if remaining is None else min(remaining, default_deadline)
            with telemetry.server_call(listener, method, context.invocation_metadata()) as call:
                in_flight.count += 1
                try:
                    enter(request, context)
                    with deadlines.bounded(budget):
                        try:
                            async with asyncio.timeout(budget):
                                return await behavior(request, context)
                        except TimeoutError as exc:
                            raise DeadlineExceeded("the call did not finish before its deadline") from exc
                except asyncio.CancelledError:
                    outcome[0] = "CANCELLED"
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc, outcome)
                finally:
                    in_flight.count -= 1
                    telemetry.finish_call(call, outcome[0], started, outcome[1])
            raise AssertionError("unreachable: abort raises")

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    if handler.unary_stream is not None:
        stream_behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            outcome = ["OK", ""]
            with telemetry.server_call(listener, method, context.invocation_metadata()) as call:
                try:
                    enter(request, context)
                    with deadlines.bounded(context.time_remaining()):
                        result = stream_behavior(request, context)
                        if inspect.isasyncgen(result):
                            async for item in result:
                                yield item
                        else:
                            await result
                except asyncio.CancelledError:
                    outcome[0] = "CANCELLED"
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc, outcome)
                finally:
                    telemetry.finish_call(call, outcome[0], started, outcome[1])

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    raise TypeError(f"{method}: client-streaming methods are not supported by the error boundary")


class ErrorBoundary(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every method of the services under ``prefix`` in the error boundary (and ``guard``)."""

    def __init__(
        self,
        prefix: str,
        telemetry: Telemetry,
        *,
        listener: str,
        default_deadline: float = 10.0,
        guard: Guard | None = None,
        in_flight: CallsInFlight | None = None,
    ) -> None:
        self._prefix = prefix
        self._in_flight = in_flight if in_flight is not None else CallsInFlight()  # :mod:`service.inflight`
        self._default_deadline = default_deadline
        self._guard = guard
        self._telemetry = telemetry
        self._listener = listener
        # Method → (its registered handler, that handler wrapped): grpc asks for every call,
        # and the registered methods are a fixed set once the server runs.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            wrapped = _wrap(
                handler, method, self._guard, self._telemetry, self._listener, self._default_deadline, self._in_flight
            )
            cached = self._wrapped[method] = (handler, wrapped)
        return cached[1]


@dataclass
class Listener:
    """One started grpc.aio server with its health service and bound port."""

    name: str
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        """Report every service of the listener SERVING or NOT_SERVING (the database is down)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service_name in ("", *self.service_names):
            await self.health.set(service_name, status)

    async def set_component(self, name: str, serving: bool) -> None:
        """Report one component (a read replica: ``apptgate.replica.N``) SERVING or NOT_SERVING, and nothing else."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, status)

    async def begin_stop(self, grace: float) -> asyncio.Future[None]:
        """Report NOT_SERVING and refuse new calls; the future returned ends once in-flight calls have
        finished, ``grace`` seconds at most (then they are cancelled)."""
        await self.health.enter_graceful_shutdown()
        stopping: asyncio.Future[None] = asyncio.ensure_future(self.server.stop(grace))
        # One turn of the loop: grpc.aio's stop has the core refuse new calls before it first waits.
        await asyncio.sleep(0)
        return stopping

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to ``grace`` seconds."""
        await (await self.begin_stop(grace))


def _credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    root = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


class BindError(Exception):
    """A listener could not bind its address."""


async def start_listener(
    name: str,
    address: str,
    *,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    boundary: ErrorBoundary,
    limits: TransportLimits,
    tls: TlsFiles | None = None,
    reuse_port: bool = False,
    documented: Mapping[str, descriptor_pb2.FileDescriptorProto] | None = None,
) -> Listener:
    """Start a server on ``address`` with the services ``register`` adds (it returns their full names).

    Reflection and ``grpc.health.v1`` are added and answer without credentials.
    Raises :class:`BindError` when the address cannot be bound.
    """
    server = grpc.aio.server(
        interceptors=[boundary],
        options=limits.options(reuse_port=reuse_port),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    names = tuple(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    served = (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    # Scoped to this listener's services: reflection answers without credentials.
    pool = DocumentedPool(documented or {}, served, files=[error_details_pb2.DESCRIPTOR.name])
    reflection.enable_server_reflection(served, server, pool=pool)
    try:
        port = server.add_secure_port(address, _credentials(tls)) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise BindError(f"{name} listener cannot bind {address}: is the port in use?") from exc
    if port == 0:
        raise BindError(f"{name} listener cannot bind {address}")
    await server.start()
    for service_name in ("", *names):
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    return Listener(name, server, health_servicer, port, names)
