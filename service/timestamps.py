"""Conversions between ``google.protobuf.Timestamp``, timezone-aware datetimes and microseconds. Pure: no I/O.

``Timestamp.FromDatetime`` is slow enough to dominate building a page of
messages; these do the arithmetic directly. The partner path's rows carry
their times as integer microseconds since the Unix epoch (:data:`Micros`):
asyncpg builds a datetime through a timedelta for each timestamptz it
decodes, a large share of a listing's work for the 150 times of a page,
where PostgreSQL hands over the integer for almost nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from service.errors import FieldViolation

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Microseconds since 1970-01-01T00:00:00Z: how the partner path's rows carry times.
Micros = int
# The range PostgreSQL and datetime both hold, well inside the Timestamp range.
_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


def to_timestamp(value: datetime) -> Timestamp:
    """Return the Timestamp of an aware datetime (microsecond precision)."""
    stamp = Timestamp()
    set_timestamp_micros(stamp, to_micros(value))
    return stamp


def set_timestamp(target: Timestamp, value: datetime) -> None:
    """Set ``target`` (a message's Timestamp field) to an aware datetime."""
    set_timestamp_micros(target, to_micros(value))


def set_timestamp_micros(target: Timestamp, value: Micros) -> None:
    """Set ``target`` (a message's Timestamp field) to a time in microseconds since the epoch."""
    seconds, micros = divmod(value, 1_000_000)
    target.seconds = seconds
    target.nanos = micros * 1000


def to_micros(value: datetime) -> Micros:
    """Return an aware datetime as microseconds since the epoch."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: Micros) -> datetime:
    """Return the aware datetime (UTC) of a time in microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=value)


def from_timestamp(value: Timestamp, field: str, problems: list[FieldViolation]) -> datetime | None:
    """Return the datetime of a Timestamp field, or record why it is invalid in ``problems``.

    Nanoseconds below a microsecond are truncated (PostgreSQL keeps microseconds).
    """
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos <= 999_999_999:
        problems.append(FieldViolation(field, "must be a valid timestamp between years 1 and 9999"))
        return None
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)
