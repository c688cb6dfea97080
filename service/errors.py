"""The service's errors, and the one mapping from them to a ``google.rpc.Status``.

Handlers and the store raise these; the API edge (:mod:`service.api.server`) turns
them into a gRPC status with details, and anything else into a fixed INTERNAL.
The tree::

    ApptgateError                  an expected failure with a status for the caller
    ├── InvalidArgument            INVALID_ARGUMENT + BadRequest (the fields at fault)
    ├── Unauthenticated            UNAUTHENTICATED
    ├── PermissionDenied           PERMISSION_DENIED (reason names the denial)
    │   └── PartnerSuspended       the partner is suspended until an operator lifts it
    ├── NotFound                   NOT_FOUND (also "exists but not yours")
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION
    ├── OutOfRange                 OUT_OF_RANGE
    ├── DeadlineExceeded           DEADLINE_EXCEEDED (the call's time ran out, database work included)
    ├── ResourceExhausted          RESOURCE_EXHAUSTED + RetryInfo
    └── Unavailable                UNAVAILABLE + RetryInfo (the database is unreachable)
        └── ServerShuttingDown     the server is draining before it stops: resume elsewhere
    ConfigError                    bad configuration at start; never reaches a caller

Every status carries one ``google.rpc.ErrorInfo`` with an UPPER_SNAKE reason
and the fixed domain :data:`DOMAIN`. Its metadata only echoes identifiers the
caller sent, never personal data; messages are fixed texts written here or at
the raise site, never built from stored values.

This module is pure: no I/O, no grpc import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "apptgate.dev"

#: The message every unexpected failure reaches the caller with.
INTERNAL_MESSAGE = "internal error; the failure was logged"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (``start_time``, ``fields[2]``) and why."""

    field: str
    description: str


class ApptgateError(Exception):
    """An expected failure, reported to the caller with a status code and details."""

    code: int = code_pb2.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        """Return the ``google.rpc`` detail messages carried by this error."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        """Return the ``google.rpc.Status`` the caller receives."""
        return status_pb2.Status(code=self.code, message=self.message, details=self.details())


class InvalidArgument(ApptgateError):
    """The request is malformed; ``violations`` name the fields at fault."""

    code = code_pb2.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Iterable[FieldViolation], *, reason: str | None = None) -> None:
        self.violations = list(violations)
        fields = ", ".join(v.field for v in self.violations)
        first = self.violations[0].description if self.violations else "invalid request"
        message = f"invalid {fields}: {first}" if len(self.violations) == 1 else f"invalid fields: {fields}"
        super().__init__(message, reason=reason)

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """Build the error for a single bad field."""
        return cls([FieldViolation(field, description)], reason=reason)

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [*super().details(), packed]


class Unauthenticated(ApptgateError):
    """The caller's credentials are missing, unknown or revoked."""

    code = code_pb2.UNAUTHENTICATED
    default_reason = "INVALID_CREDENTIALS"


class PermissionDenied(ApptgateError):
    """The caller is known but the request is refused (for example a consent denial)."""

    code = code_pb2.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class PartnerSuspended(PermissionDenied):
    """The partner is suspended (after a volume anomaly) until an operator lifts the suspension."""

    def __init__(self) -> None:
        super().__init__("the partner is suspended; an operator must lift the suspension", reason="PARTNER_SUSPENDED")


class NotFound(ApptgateError):
    """The resource does not exist, or is not visible to the caller: the two are never told apart."""

    code = code_pb2.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ApptgateError):
    """The resource to create exists already."""

    code = code_pb2.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ApptgateError):
    """The resource is not in a state that allows the request."""

    code = code_pb2.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(ApptgateError):
    """The request points past what the server still holds (an expired resume point)."""

    code = code_pb2.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class DeadlineExceeded(ApptgateError):
    """The call ran out of time (its own deadline, or the configured default)."""

    code = code_pb2.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class _Retryable(ApptgateError):
    """An error the caller should retry after ``retry_delay`` seconds."""

    def __init__(self, message: str, *, retry_delay: float = 1.0, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_delay = retry_delay

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_delay * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return [*super().details(), packed]


class ResourceExhausted(_Retryable):
    """A limit was reached; retry later."""

    code = code_pb2.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class QuotaExhausted(ResourceExhausted):
    """A quota was used up: ``google.rpc.QuotaFailure`` names it (``subject``, ``description``) beside RetryInfo."""

    def __init__(
        self, message: str, *, subject: str, description: str, retry_delay: float, reason: str | None = None
    ) -> None:
        super().__init__(message, retry_delay=retry_delay, reason=reason)
        self.subject = subject
        self.description = description

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=self.description)]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [*super().details(), packed]


class Unavailable(_Retryable):
    """A dependency (the database) is unreachable; retry later."""

    code = code_pb2.UNAVAILABLE
    default_reason = "DATABASE_UNAVAILABLE"


class ServerShuttingDown(Unavailable):
    """The server is stopping: it accepts no new call and ends its streams; the caller resumes elsewhere."""

    default_reason = "SERVER_SHUTTING_DOWN"

    def __init__(self, *, retry_delay: float) -> None:
        super().__init__("the server is shutting down; resume with the last token", retry_delay=retry_delay)


class ConfigError(Exception):
    """The configuration is invalid; raised at start, with every problem listed."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


def internal_status() -> status_pb2.Status:
    """Return the fixed status an unexpected failure reaches the caller with."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN)
    packed = any_pb2.Any()
    packed.Pack(info)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE, details=[packed])
