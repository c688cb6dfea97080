"""Conversions between ``google.protobuf.Timestamp`` and timezone-aware datetimes. Pure: no I/O.

``Timestamp.FromDatetime`` is slow enough to dominate building a page of
messages; these do the arithmetic directly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from service.errors import FieldViolation

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The range PostgreSQL and datetime both hold, well inside the Timestamp range.
_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


def to_timestamp(value: datetime) -> Timestamp:
    """Return the Timestamp of an aware datetime (microsecond precision)."""
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def set_timestamp(target: Timestamp, value: datetime) -> None:
    """Set ``target`` (a message's Timestamp field) to an aware datetime."""
    delta = value - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def from_timestamp(value: Timestamp, field: str, problems: list[FieldViolation]) -> datetime | None:
    """Return the datetime of a Timestamp field, or record why it is invalid in ``problems``.

    Nanoseconds below a microsecond are truncated (PostgreSQL keeps microseconds).
    """
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos <= 999_999_999:
        problems.append(FieldViolation(field, "must be a valid timestamp between years 1 and 9999"))
        return None
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)
