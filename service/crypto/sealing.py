"""Encryption at rest of contact details and the visit reason. Pure: no I/O.

Each value is sealed on its own with AES-256-GCM under a data key of a small
keyring; the first key of the ring seals, every key opens. A sealed value::

    version (1 byte) | key id (2 bytes, big-endian) | nonce (12 random bytes) | ciphertext and tag

The associated data binds the value to its table, column and row id (and to
the header), so a value copied to another row or another column does not
open. The key id travels with the value: rotating the data key is adding a
new key in front of the ring, re-sealing every value under it
(``python -m service data-key reencrypt``), then retiring the old key.
AES-GCM hides the content, not the length.

A wrong key configured under an id that sealed values would seal new values
no real key opens and fail every read of the old ones. Each key therefore has
a check value (:func:`key_check`), a one-way fingerprint that tells nothing of
the key, which the database records for its id on first use
(``service/store/data_keys.py``); a key whose check value differs from the
recorded one is refused at start.

Which columns are sealed is decided here too (:data:`SEALED_COLUMNS`), so the
API layer that seals, the partner path that opens and the operator command
that re-seals agree on the names bound into the associated data.

Every failure is a :class:`SealError` with a fixed message: no plaintext, no
sealed bytes and no key text ever reach a message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service import models

VERSION = 1
KEY_SIZE = 32
MAX_KEY_ID = 65535
_HEADER = struct.Struct(">BH")
_NONCE_SIZE = 12
_TAG_SIZE = 16
_AAD_PREFIX = b"apptgate-sealed|"
#: The message a key's check value authenticates, and the bytes of the check value kept.
_CHECK_MESSAGE = b"apptgate-data-key-check"
CHECK_SIZE = 16

PATIENTS = "patients"
APPOINTMENTS = "appointments"
CONSENT_REQUESTS = "consent_requests"
#: Table → the columns whose values are stored sealed, in ``sealed_<column>``.
#: The names are bound into every sealed value: they never change. ``sex`` is
#: sealed as the decimal text of its enum number (:func:`sex_text`). A consent
#: request's purpose and message are a partner's text, shown to the patient.
SEALED_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        PATIENTS: ("given_name", "family_name", "sex", "phone", "email"),
        APPOINTMENTS: ("reason",),
        CONSENT_REQUESTS: ("purpose", "message"),
    }
)
#: The tables with clear-text columns of the same names, where an import of existing data
#: loads values for ``data-key reencrypt`` to seal; the service writes only sealed values.
IMPORTED_TABLES = frozenset({PATIENTS, APPOINTMENTS})


class SealError(Exception):
    """A sealed value could not be opened, or key configuration is unusable. The message is fixed text."""


def header(key_id: int) -> bytes:
    """The first bytes of every value sealed under ``key_id`` (version and key id)."""
    return _HEADER.pack(VERSION, key_id)


def key_id_of(blob: bytes) -> int:
    """The id of the data key ``blob`` was sealed under. Raises :class:`SealError` when it is not a sealed value."""
    if len(blob) < _HEADER.size + _NONCE_SIZE + _TAG_SIZE or blob[0] != VERSION:
        raise SealError("not a sealed value of a known format")
    return int(_HEADER.unpack_from(blob)[1])


def key_check(key: bytes) -> bytes:
    """The check value of a data key: HMAC-SHA256(key, "apptgate-data-key-check"), its first 16 bytes.

    A keyed hash of a fixed message: it tells whether two keys are the same
    without revealing either (finding the key from it is as hard as breaking
    HMAC-SHA256 under a random 256-bit key). It is never used to seal.
    """
    return hmac.new(key, _CHECK_MESSAGE, hashlib.sha256).digest()[:CHECK_SIZE]


def _associated_data(head: bytes, table: str, column: str, row_id: UUID) -> bytes:
    return _AAD_PREFIX + head + table.encode() + b"|" + column.encode() + b"|" + row_id.bytes


class DataKeyring:
    """Data keys by integer id; the first seals, every key opens. Build it from configuration with :meth:`from_text`."""

    def __init__(self, keys: Sequence[tuple[int, bytes]]) -> None:
        """Raise ``ValueError`` (naming a key id or position, never key bytes) on a bad ring."""
        if not keys:
            raise ValueError("at least one data key is required")
        ciphers: dict[int, AESGCM] = {}
        checks: dict[int, bytes] = {}
        for position, (key_id, key) in enumerate(keys, start=1):
            if not isinstance(key_id, int) or not 1 <= key_id <= MAX_KEY_ID:
                raise ValueError(f"data key {position}: the key id must be an integer from 1 to {MAX_KEY_ID}")
            if len(key) != KEY_SIZE:
                raise ValueError(f"data key {key_id}: must be {KEY_SIZE} bytes (got {len(key)})")
            if key_id in ciphers:
                raise ValueError(f"data key {key_id}: the key id appears twice")
            ciphers[key_id] = AESGCM(key)
            checks[key_id] = key_check(key)
        self._ciphers = ciphers
        self._checks = checks
        self._active = keys[0][0]

    @classmethod
    def from_text(cls, text: str) -> DataKeyring:
        """Parse ``<id>:<base64 key>`` entries, separated by commas or new lines; the first is active.

        Blank lines and ``#`` comments are ignored; keys are base64 (standard or
        URL-safe, padding optional) of exactly 32 bytes. Raises ``ValueError``
        naming the position or id of a bad entry, never its text.
        """
        entries: list[str] = []
        for line in text.splitlines():
            entries.extend(part.strip() for part in line.split("#", 1)[0].split(","))
        keys: list[tuple[int, bytes]] = []
        for position, entry in enumerate((e for e in entries if e), start=1):
            id_text, separator, key_text = entry.partition(":")
            id_text, key_text = id_text.strip(), key_text.strip()
            if not separator or not id_text.isascii() or not id_text.isdigit():
                raise ValueError(f"data key {position}: expected <key id>:<base64 key>")
            if not 1 <= int(id_text) <= MAX_KEY_ID:
                raise ValueError(f"data key {position}: the key id must be an integer from 1 to {MAX_KEY_ID}")
            keys.append((int(id_text), _decode_key(key_text, position)))
        if not keys:
            raise ValueError("no data key given")
        return cls(keys)

    @property
    def active_key_id(self) -> int:
        """The id of the key that seals new values."""
        return self._active

    @property
    def key_ids(self) -> tuple[int, ...]:
        """Every key id of the ring, the active one first."""
        return tuple(self._ciphers)

    def check_value(self, key_id: int) -> bytes:
        """The check value (:func:`key_check`) of the key ``key_id``. Raises ``KeyError`` for an id not in the ring."""
        return self._checks[key_id]

    def __repr__(self) -> str:
        return f"DataKeyring(key_ids={self.key_ids!r})"

    def seal(self, plaintext: str, *, table: str, column: str, row_id: UUID) -> bytes:
        """Seal ``plaintext`` under the active key, bound to ``table``, ``column`` and ``row_id``."""
        head = header(self._active)
        nonce = os.urandom(_NONCE_SIZE)
        aad = _associated_data(head, table, column, row_id)
        return head + nonce + self._ciphers[self._active].encrypt(nonce, plaintext.encode(), aad)

    def open(self, blob: bytes, *, table: str, column: str, row_id: UUID) -> str:
        """Return the text sealed in ``blob`` for this table, column and row.

        Raises :class:`SealError` when the format is unknown, the key id is not
        in the ring, or the value was altered or sealed for another place.
        """
        key_id = key_id_of(blob)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise SealError(f"the value was sealed under data key {key_id}, which is not configured")
        head, nonce = blob[: _HEADER.size], blob[_HEADER.size : _HEADER.size + _NONCE_SIZE]
        try:
            plaintext = cipher.decrypt(
                nonce, blob[_HEADER.size + _NONCE_SIZE :], _associated_data(head, table, column, row_id)
            )
            return plaintext.decode()
        except (InvalidTag, UnicodeDecodeError):
            raise SealError("the sealed value does not open: altered, or sealed for another row or column") from None

    def needs_rotation(self, blob: bytes) -> bool:
        """True when ``blob`` is not sealed under the active key in the current format."""
        return blob[: _HEADER.size] != header(self._active)


def _decode_key(text: str, position: int) -> bytes:
    standard = text.replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"data key {position}: not base64") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"data key {position}: must be {KEY_SIZE} bytes (got {len(key)})")
    return key


def new_key_text(key_id: int = 1) -> str:
    """A fresh ``<id>:<base64 key>`` entry (for the development key file)."""
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_SIZE)).decode()}"


def sex_text(sex: int) -> str:
    """The text a sex is sealed as: its enum number in decimal, one digit, so every sealed sex has the same length."""
    if not 0 <= sex <= 9:
        raise ValueError("a sex is an enum number of one digit")
    return str(sex)


def seal_patient_contact(
    keys: DataKeyring,
    patient_id: UUID,
    *,
    given_name: str,
    family_name: str,
    sex: int,
    phone: str | None,
    email: str | None,
) -> models.SealedPatientContact:
    """Seal a new patient's contact details for its row.

    The sex is sealed even when it is 0 (not recorded), so that a dump cannot
    tell which patients have one.
    """

    def seal(column: str, value: str) -> bytes:
        return keys.seal(value, table=PATIENTS, column=column, row_id=patient_id)

    return models.SealedPatientContact(
        seal("given_name", given_name),
        seal("family_name", family_name),
        seal("sex", sex_text(sex)),
        seal("phone", phone) if phone is not None else None,
        seal("email", email) if email is not None else None,
    )


def seal_reason(keys: DataKeyring, appointment_id: UUID, reason: str) -> bytes:
    """Seal an appointment's visit reason for its row."""
    return keys.seal(reason, table=APPOINTMENTS, column="reason", row_id=appointment_id)


def seal_request_text(keys: DataKeyring, request_id: UUID, purpose: str, message: str) -> tuple[bytes, bytes | None]:
    """Seal a consent request's purpose and message (``None`` for no message) for its row."""

    def seal(column: str, value: str) -> bytes:
        return keys.seal(value, table=CONSENT_REQUESTS, column=column, row_id=request_id)

    return seal("purpose", purpose), seal("message", message) if message else None


def open_request_text(keys: DataKeyring, request_id: UUID, column: str, sealed: bytes | None) -> str:
    """Open a consent request's ``purpose`` or ``message`` ('' for none). Raises :class:`SealError`."""
    if sealed is None:
        return ""
    return keys.open(sealed, table=CONSENT_REQUESTS, column=column, row_id=request_id)


def open_consented_contact(
    keys: DataKeyring, patient_id: UUID, stored: models.StoredConsentedContact
) -> models.ConsentedContact:
    """Open the fields a consent released (the only decryption on the partner path). Raises :class:`SealError`.

    A ``str`` (an ``int`` for the sex) is a value an import left in clear; it
    passes as it is until ``data-key reencrypt`` has sealed it.
    """

    def opened(column: str, value: bytes | str | None) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return keys.open(value, table=PATIENTS, column=column, row_id=patient_id)

    def opened_sex(value: bytes | int | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = keys.open(value, table=PATIENTS, column="sex", row_id=patient_id)
        if not (text.isascii() and text.isdigit()):
            raise SealError("the sealed sex is not an enum number")
        return int(text)

    return models.ConsentedContact(
        stored.fields,
        opened("given_name", stored.given_name),
        opened("family_name", stored.family_name),
        opened_sex(stored.sex),
        opened("phone", stored.phone),
        opened("email", stored.email),
    )


def open_notice_contact(keys: DataKeyring, stored: models.StoredNoticeContact) -> models.NoticeContact:
    """Open a patient's name and email for a breach notification letter. Raises :class:`SealError`.

    As in :func:`open_consented_contact`, a ``str`` is a value an import left
    in clear. A missing name reads as ``""``, a missing email too.
    """

    def opened(column: str, value: bytes | str | None) -> str:
        if value is None or isinstance(value, str):
            return value or ""
        return keys.open(value, table=PATIENTS, column=column, row_id=stored.patient_id)

    given_name, family_name = opened("given_name", stored.given_name), opened("family_name", stored.family_name)
    return models.NoticeContact(given_name, family_name, opened("email", stored.email))


def reseal(
    keys: DataKeyring, table: str, column: str, row_id: UUID, sealed: bytes | None, clear: str | None
) -> bytes | None:
    """The value a column should hold: ``clear`` sealed, or ``sealed`` re-sealed under the active key.

    A leftover ``clear`` value wins over ``sealed``: the service never writes
    clear text and re-sealing clears it, so clear text next to a seal was
    written after it. Returns ``sealed`` itself when it already uses the
    active key, ``None`` when both are ``None``. Raises :class:`SealError`.
    """
    if clear is not None:
        return keys.seal(clear, table=table, column=column, row_id=row_id)
    if sealed is None or not keys.needs_rotation(sealed):
        return sealed
    return keys.seal(
        keys.open(sealed, table=table, column=column, row_id=row_id), table=table, column=column, row_id=row_id
    )


def columns_not_opening(
    keys: DataKeyring, table: str, row_id: UUID, sealed: Mapping[str, bytes | None], key_id: int
) -> list[str]:
    """The columns of one stored row whose value sealed under ``key_id`` does not open (how a key is tried on data).

    Values sealed under other keys, and absent ones, are left out.
    """
    failed = []
    for column, value in sealed.items():
        if value is None or value[: _HEADER.size] != header(key_id):
            continue
        try:
            keys.open(value, table=table, column=column, row_id=row_id)
        except SealError:
            failed.append(column)
    return failed


def parse_header(head: bytes) -> tuple[int, int]:
    """The (version, key id) of a seal header (the first 3 bytes of a sealed value)."""
    if len(head) != _HEADER.size:
        return (0, 0)
    version, key_id = _HEADER.unpack(head)
    return int(version), int(key_id)


def key_ids_in_use(headers: Iterable[bytes]) -> set[int]:
    """The data key ids named by seal headers of the current format."""
    return {key_id for version, key_id in map(parse_header, headers) if version == VERSION}


def usage_problems(keys: DataKeyring, headers: Iterable[bytes], clear: bool) -> list[str]:
    """What stands between the stored values and "everything sealed under the active key", in fixed texts."""
    problems: list[str] = []
    headers = list(headers)
    parsed = [parse_header(head) for head in headers]
    in_use = sorted(key_ids_in_use(headers))
    if clear:
        problems.append("contact details or visit reasons are still stored in clear")
    if older := [k for k in in_use if k != keys.active_key_id]:
        problems.append(f"values are sealed under data key(s) {_ids(older)}, not the active key {keys.active_key_id}")
    if missing := [k for k in in_use if k not in keys.key_ids]:
        problems.append(f"values sealed under data key(s) {_ids(missing)} cannot be opened: the key is not configured")
    if any(version != VERSION for version, _ in parsed):
        problems.append("some sealed values have an unknown format")
    return problems


def _ids(key_ids: Iterable[int]) -> str:
    return ", ".join(str(k) for k in key_ids)
