"""Credentials: partner keys and the internal token. Pure: no I/O.

A partner key is ``pk_<16 base32>.<43 base64url>``: the public key id, a dot,
and 256 random bits. Only the SHA-256 of the whole key is stored (the secret
has full entropy, so a slow hash would add nothing), and only the database
compares it with what a caller presents (migration 0007); the gateway
compares a presented key with one it saw verify, in constant time.

A key may be bound to a client certificate (mutual TLS): the database then
verifies it only over a connection that presented that certificate. What a
call presents is therefore its *credential*: the SHA-256 of its secret,
followed by the SHA-256 of its connection's client certificate when there is
one (:func:`credential`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from service.errors import Unauthenticated

_KEY = re.compile(r"(pk_[a-z2-7]{16})\.[A-Za-z0-9_-]{43}")
_KEY_ID = re.compile(r"pk_[a-z2-7]{16}")
_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly issued partner key. ``secret`` is shown once and never stored."""

    key_id: str
    secret: str
    secret_hash: bytes


def hash_secret(secret: str) -> bytes:
    """Return the stored form of a bearer secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def certificate_sha256(pem: bytes | str) -> bytes:
    """The SHA-256 of a PEM certificate's DER encoding: what a key is bound to. Raises ``ValueError``."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    try:
        der = ssl.PEM_cert_to_DER_cert(text.strip() + "\n")
    except (ValueError, IndexError) as exc:
        raise ValueError("not a PEM certificate") from exc
    return hashlib.sha256(der).digest()


def client_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> bytes | None:
    """The SHA-256 of the client certificate a connection presented (gRPC's auth context), ``None`` without one."""
    presented = auth_context.get("x509_pem_cert")
    return certificate_sha256(presented[0]) if presented else None


def credential(secret_hash: bytes, client_cert: bytes | None) -> bytes:
    """What the partner functions verify: the secret's hash, then the client certificate's when there is one."""
    return secret_hash + (client_cert or b"")


def new_partner_key() -> IssuedKey:
    """Create a fresh partner key."""
    key_id = "pk_" + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
    secret = f"{key_id}.{secrets.token_urlsafe(32)}"
    return IssuedKey(key_id, secret, hash_secret(secret))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Return the token of the ``authorization: Bearer …`` header. Raises :class:`Unauthenticated`."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            if value[: len(_BEARER)].lower() == _BEARER and len(value) > len(_BEARER):
                return value[len(_BEARER) :].strip()
            break
    raise Unauthenticated(
        "missing credentials: send the metadata `authorization: Bearer <key>`", reason="CREDENTIALS_MISSING"
    )


def is_key_id(text: str) -> bool:
    """True when ``text`` has the shape of a public key id (``pk_`` and 16 base32 letters)."""
    return _KEY_ID.fullmatch(text) is not None


def partner_key_id(token: str) -> str:
    """Return the key id of a partner key. Raises :class:`Unauthenticated` when it is not shaped like one."""
    match = _KEY.fullmatch(token)
    if match is None:
        raise Unauthenticated("invalid credentials")
    return match[1]


class InternalToken:
    """Verifies the internal listener's bearer token in constant time."""

    def __init__(self, token: str) -> None:
        self._hash = hash_secret(token)

    def verify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raise :class:`Unauthenticated` unless the metadata carries the internal token."""
        if not hmac.compare_digest(hash_secret(bearer_token(metadata)), self._hash):
            raise Unauthenticated("invalid credentials")
