"""The exceptions every client method raises, and the one translation from gRPC errors to them.

A failed call raises a subclass of :class:`ApptgateError`, chosen by the gRPC
status code, and carries what the server put in the ``google.rpc.Status``
details: the ``ErrorInfo`` reason (an UPPER_SNAKE word such as
``CONSENT_EXPIRED``), its domain and metadata, the ``BadRequest`` field
violations, the ``QuotaFailure`` violations and the ``RetryInfo`` delay. The tree::

    ApptgateError                   any failed call: code, message, reason, domain, metadata, attempts
    ├── InvalidArgument             INVALID_ARGUMENT; ``field_violations`` name the fields at fault
    │   └── OutOfRange              OUT_OF_RANGE: a position past what the server still holds
    ├── Unauthenticated             UNAUTHENTICATED: key or token missing, unknown or revoked
    ├── PermissionDenied            PERMISSION_DENIED
    │   └── ConsentDenied           PERMISSION_DENIED with a CONSENT_* reason: no contact data was sent
    ├── NotFound                    NOT_FOUND: does not exist *or* is not visible to you (never told apart)
    ├── AlreadyExists               ALREADY_EXISTS
    │   └── ConsentRequestPending   ALREADY_EXISTS naming the pending ``consent_request_id``
    ├── FailedPrecondition          FAILED_PRECONDITION
    ├── ResourceExhausted           RESOURCE_EXHAUSTED; ``retry_delay`` from RetryInfo, ``quota_violations``
    ├── Unavailable                 UNAVAILABLE, after the client's retries ran out; ``retry_delay``
    ├── DeadlineExceeded            DEADLINE_EXCEEDED: the call's deadline passed
    ├── Cancelled                   CANCELLED
    └── ServerError                 INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED and anything else

Catch :class:`ConsentDenied` to handle a refused consent token, and branch on
:attr:`ApptgateError.reason` (one of the ``CONSENT_*`` constants below) to tell
an expired consent from a revoked one. Catch :class:`ConsentRequestPending`
when asking for contact access twice: its :attr:`~ConsentRequestPending.consent_request_id`
is the request already pending. The original ``grpc.RpcError`` is kept as
``__cause__``.

This module does no I/O and keeps no state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

#: The ``ErrorInfo.domain`` of every error the gateway sends.
DOMAIN = "apptgate.dev"

#: The trailing-metadata key of the binary ``google.rpc.Status``.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# ErrorInfo reasons the gateway sends (the server's contract, see docs/partners.md).
CREDENTIALS_MISSING = "CREDENTIALS_MISSING"
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
NOT_FOUND = "NOT_FOUND"
INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # noqa: S105 - a reason, not a secret
CONSENT_REQUIRED = "CONSENT_REQUIRED"
CONSENT_INVALID = "CONSENT_INVALID"
CONSENT_EXPIRED = "CONSENT_EXPIRED"
CONSENT_REVOKED = "CONSENT_REVOKED"
#: The reason of an ``UNAVAILABLE`` from a server that is stopping: resume, on another process or once it is back.
SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
#: The reasons of :class:`ConsentDenied`.
CONSENT_REASONS = frozenset({CONSENT_REQUIRED, CONSENT_INVALID, CONSENT_EXPIRED, CONSENT_REVOKED})
#: The ``ErrorInfo`` metadata key naming the pending consent request of an ``ALREADY_EXISTS``.
CONSENT_REQUEST_ID = "consent_request_id"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, as named by the server's ``google.rpc.BadRequest``."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class QuotaViolation:
    """One limit reached, as named by the server's ``google.rpc.QuotaFailure``."""

    subject: str
    description: str


class ApptgateError(Exception):
    """A call failed. The base of every exception the clients raise for a failed call.

    Attributes:
        code: the gRPC status code.
        message: the status message, a fixed text written by the server (never personal data).
        reason: the ``ErrorInfo`` reason, for example ``"CONSENT_EXPIRED"``; ``""`` when the
            server sent none (a transport failure, a deadline).
        domain: the ``ErrorInfo`` domain, :data:`DOMAIN` for the gateway's own errors.
        metadata: the ``ErrorInfo`` metadata: identifiers the request carried, never personal data.
        retry_delay: the ``RetryInfo`` delay in seconds, or ``None`` when the server sent none.
        field_violations: the ``BadRequest`` field violations (for ``INVALID_ARGUMENT``).
        quota_violations: the ``QuotaFailure`` violations: which limits were reached (for
            ``RESOURCE_EXHAUSTED``).
        attempts: how many times the client sent the request (more than 1 after retries).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
        field_violations: Iterable[FieldViolation] = (),
        attempts: int = 1,
        quota_violations: Iterable[QuotaViolation] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_delay = retry_delay
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.quota_violations: tuple[QuotaViolation, ...] = tuple(quota_violations)
        self.attempts = attempts

    def __str__(self) -> str:
        name = getattr(self.code, "name", str(self.code))
        text = f"{name}: {self.message}" if self.message else name
        if self.reason:
            text += f" (reason {self.reason})"
        if self.attempts > 1:
            text += f" after {self.attempts} attempts"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self!s})"


class InvalidArgument(ApptgateError):
    """The request is malformed; :attr:`field_violations` name the fields at fault.

    A page token that the server refuses (altered, from another query or
    partner) has reason :data:`INVALID_PAGE_TOKEN`: restart from the first page.
    """

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the fields at fault, in the server's order."""
        return tuple(v.field for v in self.field_violations)


class OutOfRange(InvalidArgument):
    """The request points past what the server still holds (for example an expired resume point)."""


class Unauthenticated(ApptgateError):
    """The key (or internal token) is missing, unknown or revoked."""


class PermissionDenied(ApptgateError):
    """The caller is known but the request is refused."""


class ConsentDenied(PermissionDenied):
    """A consent token was missing, malformed, expired, revoked or issued for someone else.

    :attr:`reason` is one of :data:`CONSENT_REQUIRED`, :data:`CONSENT_INVALID`,
    :data:`CONSENT_EXPIRED` and :data:`CONSENT_REVOKED`. No contact data was sent.
    """


class NotFound(ApptgateError):
    """The resource does not exist or is not visible to the caller; the server never tells which."""


class AlreadyExists(ApptgateError):
    """The resource to create exists already."""


class ConsentRequestPending(AlreadyExists):
    """A consent request for the same patient and fields is pending already: no new one was made.

    :attr:`consent_request_id` names it (from the ``ErrorInfo`` metadata): get it,
    watch it, or cancel it before asking again.
    """

    @property
    def consent_request_id(self) -> str:
        """The partner-scoped identifier (``crq_…``) of the pending request."""
        return self.metadata.get(CONSENT_REQUEST_ID, "")


class FailedPrecondition(ApptgateError):
    """The resource is not in a state that allows the request (for example already revoked)."""


class ResourceExhausted(ApptgateError):
    """A limit was reached; retry after :attr:`retry_delay` seconds. :attr:`quota_violations` name the limits."""


class Unavailable(ApptgateError):
    """The server (or its database) could not be reached, and the client's retries ran out."""


class DeadlineExceeded(ApptgateError):
    """The call's deadline passed before the server answered."""


class Cancelled(ApptgateError):
    """The call was cancelled."""


class ServerError(ApptgateError):
    """The server failed unexpectedly (INTERNAL, UNKNOWN, DATA_LOSS) or does not offer the method."""


_BY_CODE: Mapping[grpc.StatusCode, type[ApptgateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _rich_status(trailing_metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` in the trailing metadata, or ``None`` when absent or undecodable."""
    for item in trailing_metadata or ():
        key, value = item
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a garbled detail must not hide the status code itself
                return None
    return None


def error_from_status(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None, *, attempts: int = 1
) -> ApptgateError:
    """Build the typed exception of a failed call from its code, message and rich status (if any)."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    violations: list[FieldViolation] = []
    quotas: list[QuotaViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            quotas.extend(QuotaViolation(v.subject, v.description) for v in quota.violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = max(0.0, retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9)
    cls = _BY_CODE.get(code, ServerError)
    if cls is PermissionDenied and reason in CONSENT_REASONS:
        cls = ConsentDenied
    elif cls is AlreadyExists and metadata.get(CONSENT_REQUEST_ID):
        cls = ConsentRequestPending
    return cls(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_delay=retry_delay,
        field_violations=violations,
        attempts=attempts,
        quota_violations=quotas,
    )


def from_rpc_error(error: grpc.RpcError, *, attempts: int = 1) -> ApptgateError:
    """Translate a failed call (a sync ``grpc.RpcError`` or a ``grpc.aio.AioRpcError``) to its typed exception.

    Useful with the raw generated stubs too::

        try:
            stub.GetAppointment(request, metadata=..., timeout=5)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else ""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_from_status(code, str(message or ""), _rich_status(trailing), attempts=attempts)
