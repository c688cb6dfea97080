"""Request messages built from Python values, shared by the sync and asyncio clients. Pure: no I/O.

Times are timezone-aware ``datetime`` objects: a naive one is refused with
``ValueError`` rather than guessed, since an agenda shifted by a time zone is
a silent, expensive bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from appointments.partner.v1 import partner_appointment_service_pb2 as partner_pb
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(value: datetime, name: str) -> Timestamp:
    """A ``Timestamp`` of an aware datetime. Raises ``ValueError`` for a naive one."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def duration(value: timedelta, name: str) -> Duration:
    """A ``Duration`` of a timedelta. Raises ``ValueError`` unless it is a ``timedelta``."""
    if not isinstance(value, timedelta):
        raise ValueError(f"{name} must be a timedelta")
    result = Duration()
    result.FromTimedelta(value)
    return result


def list_appointments(
    *,
    start_time: datetime,
    end_time: datetime,
    practitioner_id: str,
    page_size: int,
    page_token: str,
) -> partner_pb.ListAppointmentsRequest:
    """The request of one ListAppointments page."""
    return partner_pb.ListAppointmentsRequest(
        practitioner_id=practitioner_id,
        start_time=timestamp(start_time, "start_time"),
        end_time=timestamp(end_time, "end_time"),
        page_size=page_size,
        page_token=page_token,
    )


def contact_fields(fields: Iterable[int]) -> list[int]:
    """The ``ContactField`` numbers of ``fields``, as given (the server checks them)."""
    return [int(f) for f in fields]


def request_contact_access(
    *, appointment_id: str, fields: Iterable[int], purpose: str, message: str, ttl: timedelta
) -> partner_pb.RequestContactAccessRequest:
    """The request of RequestContactAccess (``fields``: ``ContactField`` numbers)."""
    return partner_pb.RequestContactAccessRequest(
        appointment_id=appointment_id,
        fields=contact_fields(fields),  # type: ignore[arg-type]  # ContactField numbers
        purpose=purpose,
        message=message,
        ttl=duration(ttl, "ttl"),
    )
