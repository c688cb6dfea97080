"""Opaque page tokens (AIP-158). Pure: no I/O.

A page token is the cursor of the last row returned, sealed with AES-256-GCM.
The associated data binds it to the caller and the query, so a token that was
altered, comes from another partner or another query fails to open and
answers INVALID_ARGUMENT. The cursor is encrypted, so it reveals no internal
identifier. A token grants nothing: the query checks access again on every page.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.errors import InvalidArgument
from service.timestamps import Micros

_VERSION = b"\x01"
_NONCE_SIZE = 12
_TIME_CURSOR = struct.Struct(">q16s")
MAX_TOKEN_LENGTH = 512


class PageTokens:
    """Seals and opens page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, cursor: bytes, binding: bytes) -> str:
        """Return the opaque token for ``cursor``, bound to ``binding`` (caller and query)."""
        nonce = os.urandom(_NONCE_SIZE)
        sealed = _VERSION + nonce + self._aead.encrypt(nonce, cursor, _VERSION + binding)
        return base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")

    def open(self, token: str, binding: bytes, *, field: str = "page_token") -> bytes:
        """Return the cursor in ``token``.

        Raises :class:`InvalidArgument` unless the token is genuine and bound to ``binding``.
        """
        invalid = InvalidArgument.field(
            field, "not a page token of this query; restart from the first page", reason="INVALID_PAGE_TOKEN"
        )
        if len(token) > MAX_TOKEN_LENGTH:
            raise invalid
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid from None
        if len(raw) <= 1 + _NONCE_SIZE or raw[:1] != _VERSION:
            raise invalid
        nonce, sealed = raw[1 : 1 + _NONCE_SIZE], raw[1 + _NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, sealed, _VERSION + binding)
        except InvalidTag:
            raise invalid from None


def pack_time_cursor(time: Micros, row_id: UUID) -> bytes:
    """Encode a ``(time, id)`` keyset cursor (time in microseconds since the epoch)."""
    return _TIME_CURSOR.pack(time, row_id.bytes)


def unpack_time_cursor(cursor: bytes) -> tuple[Micros, UUID]:
    """Decode a cursor made by :func:`pack_time_cursor`. Raises ``ValueError`` when malformed."""
    if len(cursor) != _TIME_CURSOR.size:
        raise ValueError("bad cursor")
    micros, raw_id = _TIME_CURSOR.unpack(cursor)
    return micros, UUID(bytes=raw_id)
