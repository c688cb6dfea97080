"""Checks of request fields, collecting every problem before failing. Pure: no I/O.

Usage::

    problems: list[FieldViolation] = []
    practitioner = parse_uuid(request.practitioner_id, "practitioner_id", problems)
    name = text(request.display_name, "display_name", problems, max_length=200)
    raise_if(problems)   # InvalidArgument naming every bad field
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from uuid import UUID

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from service.access.consent_tokens import CONTACT_FIELDS
from service.errors import FieldViolation, InvalidArgument
from service.timestamps import from_timestamp

#: The longest display name, specialty or patient name accepted (the schema's CHECK says the same).
NAME_LENGTH = 200
# Every pattern is matched against the whole value (fullmatch): `$` would also accept a final newline.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PHONE = re.compile(r"\+[1-9][0-9]{7,14}")
# Deliberately plain: one @, no spaces, a dot in the domain. Deliverability is not ours to check.
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
# A SHA-256 fingerprint as OpenSSL prints it (colon-separated pairs) or as plain hex.
_SHA256 = re.compile(r"[0-9a-fA-F]{64}|[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){31}")


def raise_if(problems: list[FieldViolation]) -> None:
    """Raise :class:`InvalidArgument` naming every collected problem, if any."""
    if problems:
        raise InvalidArgument(problems)


def parse_uuid(value: str, field: str, problems: list[FieldViolation], *, required: bool = True) -> UUID | None:
    """Return the UUID in ``value``; ``None`` when empty and optional."""
    if not value:
        if required:
            problems.append(FieldViolation(field, "is required"))
        return None
    if not _UUID.fullmatch(value):
        problems.append(FieldViolation(field, "must be a UUID"))
        return None
    return UUID(value)


def uuid_field(value: str, field: str) -> UUID:
    """Return the required UUID in ``value``; raise :class:`InvalidArgument` naming ``field`` otherwise."""
    problems: list[FieldViolation] = []
    parsed = parse_uuid(value, field, problems)
    raise_if(problems)
    assert parsed is not None
    return parsed


def page_size(value: int, problems: list[FieldViolation], *, default: int, maximum: int) -> int:
    """Resolve a requested ``page_size`` (AIP-158): 0 means ``default``; negative or above ``maximum`` is refused."""
    if value < 0:
        problems.append(FieldViolation("page_size", "must not be negative"))
    elif value > maximum:
        problems.append(FieldViolation("page_size", f"must be at most {maximum}"))
    return value or default


def text(value: str, field: str, problems: list[FieldViolation], *, max_length: int, required: bool = True) -> str:
    """Return ``value`` stripped, checking presence, length and control characters."""
    stripped = value.strip()
    if not stripped:
        if required:
            problems.append(FieldViolation(field, "is required"))
        return stripped
    if len(stripped) > max_length:
        problems.append(FieldViolation(field, f"must be at most {max_length} characters"))
    elif any(ord(ch) < 32 and ch not in "\t\n" for ch in stripped):
        problems.append(FieldViolation(field, "must not contain control characters"))
    return stripped


def phone(value: str, field: str, problems: list[FieldViolation]) -> str | None:
    """Return an E.164 phone number, ``None`` when empty."""
    if not value:
        return None
    if not _PHONE.fullmatch(value):
        problems.append(FieldViolation(field, "must be in E.164 form, for example +33612345678"))
    return value


def email(value: str, field: str, problems: list[FieldViolation]) -> str | None:
    """Return an email address, ``None`` when empty."""
    if not value:
        return None
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        problems.append(FieldViolation(field, "must be an email address"))
    return value


def sha256_hex(value: str, field: str, problems: list[FieldViolation]) -> bytes | None:
    """The 32 bytes of a SHA-256 fingerprint (hex, colons allowed); ``None`` when empty."""
    if not value:
        return None
    if not _SHA256.fullmatch(value):
        problems.append(FieldViolation(field, "must be a SHA-256 fingerprint: 64 hexadecimal digits"))
        return None
    return bytes.fromhex(value.replace(":", ""))


def timestamp(message: Message, name: str, problems: list[FieldViolation], *, required: bool = True) -> datetime | None:
    """Return the datetime of the Timestamp field ``name`` of ``message``; ``None`` when unset and optional."""
    if not message.HasField(name):
        if required:
            problems.append(FieldViolation(name, "is required"))
        return None
    value = getattr(message, name)
    assert isinstance(value, Timestamp)
    return from_timestamp(value, name, problems)


def window(
    start: datetime | None,
    end: datetime | None,
    problems: list[FieldViolation],
    *,
    max_length: timedelta | None = None,
    end_field: str = "end_time",
) -> None:
    """Check that ``[start, end)`` is non-empty and, when ``max_length`` is given, not longer."""
    if start is None or end is None:
        return
    if end <= start:
        problems.append(FieldViolation(end_field, "must be after start_time"))
    elif max_length is not None and end - start > max_length:
        problems.append(FieldViolation(end_field, f"must be at most {_span(max_length)} after start_time"))


def _span(length: timedelta) -> str:
    if length % timedelta(days=1) == timedelta(0) and length > timedelta(days=1):
        return f"{length.days} days"
    return f"{int(length.total_seconds() // 3600)} hours"


#: The largest Duration the protobuf type allows (10,000 years), in seconds.
_MAX_DURATION_SECONDS = 315_576_000_000
#: The shortest consent.
MIN_TTL = timedelta(seconds=1)


def ttl(value: Duration, problems: list[FieldViolation], *, maximum: timedelta, field: str = "ttl") -> timedelta:
    """A consent's duration: from 1 second up to ``maximum``, microseconds honoured."""
    if abs(value.seconds) > _MAX_DURATION_SECONDS or not -999_999_999 <= value.nanos <= 999_999_999:
        problems.append(FieldViolation(field, "must be a valid duration"))
        return timedelta(0)
    length = timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)
    if length < MIN_TTL:
        problems.append(FieldViolation(field, "must be at least 1 second"))
    elif length > maximum:
        problems.append(FieldViolation(field, f"must be at most {int(maximum.total_seconds())} seconds"))
    return length


def contact_fields(values: Sequence[int], problems: list[FieldViolation], *, required: bool = True) -> tuple[int, ...]:
    """Contact field numbers, sorted: at least one (when required), none unspecified or repeated."""
    if not values and required:
        problems.append(FieldViolation("fields", "at least one contact field is required"))
    seen: set[int] = set()
    for index, value in enumerate(values):
        if value not in CONTACT_FIELDS:
            problems.append(FieldViolation(f"fields[{index}]", "must be a contact field other than UNSPECIFIED"))
        elif value in seen:
            problems.append(FieldViolation(f"fields[{index}]", "is repeated"))
        seen.add(value)
    return tuple(sorted(seen & set(CONTACT_FIELDS)))
