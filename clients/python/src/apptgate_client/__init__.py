"""apptgate_client: Python clients of the apptgate partner and internal gRPC APIs.

* :class:`PartnerClient` / :class:`AsyncPartnerClient`: the partner API
  (appointments in the basic view, their change feed, consent requests and
  their feed, consent-gated contact details, consent keys).
* :class:`InternalClient` / :class:`AsyncInternalClient`: the platform's internal
  services (scheduling, partner registry, consents, audit, a patient's history
  and privacy events).
* :mod:`apptgate_client.errors`: the exceptions every failed call raises.
* :class:`RetryPolicy`: how ``UNAVAILABLE`` is retried.

The generated messages and stubs are in the ``appointments`` package of the
same distribution (``apptgate-client``). This package never imports the
server.
"""

from apptgate_client._transport import DEFAULT_TIMEOUT, __version__
from apptgate_client.errors import (
    AlreadyExists,
    ApptgateError,
    Cancelled,
    ConsentDenied,
    ConsentRequestPending,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from apptgate_client.internal import AsyncInternalClient, InternalClient
from apptgate_client.partner import AsyncPartnerClient, PartnerClient
from apptgate_client.retry import NO_RETRY, RetryPolicy
from apptgate_client.watch import (
    DEFAULT_RESUME_TIMEOUT,
    AppointmentWatch,
    AsyncAppointmentWatch,
    AsyncConsentRequestWatch,
    AsyncPrivacyEventWatch,
    AsyncResumableWatch,
    ConsentRequestWatch,
    PrivacyEventWatch,
    ResumableWatch,
)

__all__ = [
    "DEFAULT_RESUME_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AlreadyExists",
    "AppointmentWatch",
    "ApptgateError",
    "AsyncAppointmentWatch",
    "AsyncConsentRequestWatch",
    "AsyncInternalClient",
    "AsyncPartnerClient",
    "AsyncPrivacyEventWatch",
    "AsyncResumableWatch",
    "Cancelled",
    "ConsentDenied",
    "ConsentRequestPending",
    "ConsentRequestWatch",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InternalClient",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PartnerClient",
    "PermissionDenied",
    "PrivacyEventWatch",
    "QuotaViolation",
    "ResourceExhausted",
    "ResumableWatch",
    "RetryPolicy",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "from_rpc_error",
]
