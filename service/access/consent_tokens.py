"""Consent tokens: a patient's permission for one partner to see chosen contact details. Pure: no I/O.

A consent token is a PASETO ``v4.public`` token (Ed25519) that releases some of
a patient's contact fields (:data:`CONTACT_FIELDS`) to ONE partner, for one
purpose, until it expires. Its parts::

    payload   {"iss": "apptgate", "sub": <patient ref>, "aud": <partner id>, "jti": <consent ref>,
               "iat": <RFC 3339>, "exp": <RFC 3339>, "fields": ["name", "phone", …], "purpose": <text>}
    footer    {"kid": "k4.pid.…"}            the PASERK id of the signing key's public half
    implicit  b"apptgate-consent-v1:" + <partner id>   signed, never sent

A v4.public payload is signed, not encrypted: whoever holds the token reads
it. So ``sub`` and ``jti`` are the partner's own references to the patient and
the consent (``pat_…``, ``cns_…``, from :mod:`service.disclosure.pseudonyms`),
never internal ids: two partners' tokens for one patient share no value but
the issuer. ``aud`` is the partner's id, which it knows. Times are UTC with
microseconds (``2030-01-31T12:00:00.000001Z``) and ``fields`` lists claim
names in the order of their numbers. The implicit assertion binds the token
to its partner: presented by another partner, it fails signature verification.

:meth:`ConsentKeyring.verify` fails closed. It parses the token itself
(strict base64url, exact claim set, exact types, duplicate JSON keys refused)
and does not use pyseto's claim checks, which skip a missing ``exp``, accept a
token up to a second after its ``exp`` and check ``aud`` only when asked.
Every failure is a :class:`ConsentDenied` whose message is a fixed text:
neither token text nor claim values ever reach a message or a log line.

Revocation is not decided here: the caller turns ``jti`` back into the
consent's id, looks it up in the database after a successful
:meth:`ConsentKeyring.verify`, and denies with :attr:`ConsentDenial.REVOKED`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, NoReturn
from uuid import UUID

import pyseto
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.memo import remember
from service.models import ContactField

#: Contact field number (the ``appointments.type.v1.ContactField`` enum value) → claim name.
CONTACT_FIELDS: Mapping[int, str] = MappingProxyType({field.value: field.label for field in ContactField})
_FIELD_NUMBERS: Mapping[str, int] = MappingProxyType({name: number for number, name in CONTACT_FIELDS.items()})

#: The ``iss`` claim of every consent token.
ISSUER = "apptgate"
#: Tokens longer than this are refused without being parsed.
MAX_TOKEN_LENGTH = 4096
#: Tokens a keyring remembers having verified (signature and claims), all forgotten at once when full;
#: each at most MAX_TOKEN_LENGTH, so the memo's memory is bounded.
VERIFIED_MEMO_SIZE = 2048


class ConsentDenial(enum.StrEnum):
    """Why contact details were refused: the ErrorInfo reason of the PERMISSION_DENIED a partner gets."""

    REQUIRED = "CONSENT_REQUIRED"
    INVALID = "CONSENT_INVALID"
    EXPIRED = "CONSENT_EXPIRED"
    REVOKED = "CONSENT_REVOKED"


_MESSAGES: Mapping[ConsentDenial, str] = MappingProxyType(
    {
        ConsentDenial.REQUIRED: "a consent token is required",
        ConsentDenial.INVALID: "the consent token is not valid",
        ConsentDenial.EXPIRED: "the consent token has expired",
        ConsentDenial.REVOKED: "the consent has been revoked",
    }
)

_HEADER = "v4.public."
_IMPLICIT_PREFIX = b"apptgate-consent-v1:"
_CLAIMS = frozenset({"iss", "sub", "aud", "jti", "iat", "exp", "fields", "purpose"})
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_PASERK = re.compile(r"k4\.(secret|public)\.([A-Za-z0-9_-]+)")
_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?(?:Z|\+00:00)")
_ED25519_KEY_SIZE = 32
#: The shape of a partner-scoped reference (``pat_…``, ``cns_…``): a prefix and 26 characters of base32.
_REFERENCE = re.compile(r"[a-z]{3}_[a-z2-7]{26}")


@dataclass(frozen=True, slots=True)
class ConsentClaims:
    """What a consent token grants: ``partner_id`` may see ``fields`` of the patient it knows as
    ``patient_ref`` until ``expires_at``, under the consent it knows as ``consent_ref``.

    The references are the partner's (:mod:`service.disclosure.pseudonyms`);
    ``fields`` are :data:`CONTACT_FIELDS` numbers, sorted and unique; both
    times are timezone-aware UTC and ``expires_at`` is after ``issued_at``.
    Construction raises ``ValueError`` otherwise.
    """

    consent_ref: str
    patient_ref: str
    partner_id: UUID
    fields: tuple[int, ...]
    purpose: str
    issued_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        for name in ("consent_ref", "patient_ref"):
            value = getattr(self, name)
            if not isinstance(value, str) or _REFERENCE.fullmatch(value) is None:
                raise ValueError(f"{name} must be a partner-scoped reference")
        if not isinstance(self.partner_id, UUID):
            raise ValueError("partner_id must be a UUID")
        if not isinstance(self.fields, tuple) or not self.fields:
            raise ValueError("fields must be a non-empty tuple")
        if any(isinstance(f, bool) or not isinstance(f, int) or f not in CONTACT_FIELDS for f in self.fields):
            raise ValueError("fields must be contact field numbers")
        if list(self.fields) != sorted(set(self.fields)):
            raise ValueError("fields must be sorted and unique")
        if not isinstance(self.purpose, str) or not self.purpose:
            raise ValueError("purpose must be a non-empty string")
        for name in ("issued_at", "expires_at"):
            value = getattr(self, name)
            if not isinstance(value, datetime) or value.utcoffset() != timedelta(0):
                raise ValueError(f"{name} must be a timezone-aware UTC datetime")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")

    @property
    def field_names(self) -> tuple[str, ...]:
        """Return the claim names of :attr:`fields` (``"name"``, ``"phone"``, …), in field order."""
        return tuple(CONTACT_FIELDS[f] for f in self.fields)


class ConsentDenied(Exception):
    """A consent token was missing, invalid, expired or revoked.

    ``reason`` is a :class:`ConsentDenial`; the message is a
    fixed text per reason. ``detail`` is a fixed text naming the failed check
    (``"bad signature"``), for logs only: it never holds token text or claim
    values, but tells a caller more than it should know.
    """

    def __init__(self, reason: ConsentDenial, detail: str = "") -> None:
        try:
            self.reason = ConsentDenial(reason)
        except ValueError:
            raise ValueError("unknown consent denial reason") from None
        self.message = _MESSAGES[self.reason]
        self.detail = detail or self.reason.lower()
        super().__init__(self.message)

    def __reduce__(self) -> tuple[type[ConsentDenied], tuple[ConsentDenial, str]]:
        return (ConsentDenied, (self.reason, self.detail))


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    """Decode unpadded base64url strictly: the alphabet only, and the one canonical encoding of the bytes.

    Python's decoder drops characters outside the alphabet and ignores unused
    trailing bits, so many strings decode alike; PASETO must not be malleable.
    Raises ``ValueError``.
    """
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None
    if _b64encode(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key for consent tokens: a key pair, or the public key alone of a key that only verifies.

    Build it with :meth:`from_paserk` or :meth:`generate`. ``key_id`` is the
    PASERK id of the public key (``k4.pid.…``), the ``kid`` of the tokens it
    signs. The secret is never part of ``repr`` or equality.
    """

    key_id: str
    public_paserk: str
    can_sign: bool
    _secret: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.can_sign != (self._secret is not None):
            raise ValueError("a signing key needs its secret, and only a signing key has one")

    @classmethod
    def from_paserk(cls, text: str) -> SigningKey:
        """Parse ``k4.secret.…`` (signs and verifies) or ``k4.public.…`` (verifies only).

        Raises ``ValueError``; the message never repeats the key text.
        """
        match = _PASERK.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError("not a k4.secret or k4.public PASERK")
        kind, body = match.groups()
        try:
            raw = _b64decode(body)
        except ValueError:
            raise ValueError("the PASERK key is not canonical base64url") from None
        if kind == "public":
            if len(raw) != _ED25519_KEY_SIZE:
                raise ValueError("a k4.public PASERK holds 32 bytes")
            try:
                Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                raise ValueError("the k4.public PASERK is not an Ed25519 public key") from None
            return cls._from_public_bytes(raw, secret=None)
        if len(raw) != 2 * _ED25519_KEY_SIZE:
            raise ValueError("a k4.secret PASERK holds 64 bytes")
        seed, public = raw[:_ED25519_KEY_SIZE], raw[_ED25519_KEY_SIZE:]
        # pyseto keeps the seed and ignores the public half: check that the two belong together.
        if Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw() != public:
            raise ValueError("the k4.secret PASERK's public half does not match its secret")
        return cls._from_public_bytes(public, secret="k4.secret." + body)

    @classmethod
    def generate(cls) -> SigningKey:
        """Return a new Ed25519 key pair."""
        private = Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes_raw()
        return cls._from_public_bytes(public, secret="k4.secret." + _b64encode(private.private_bytes_raw() + public))

    @classmethod
    def _from_public_bytes(cls, public: bytes, *, secret: str | None) -> SigningKey:
        public_paserk = "k4.public." + _b64encode(public)
        key_id = str(pyseto.Key.from_paserk(public_paserk).to_paserk_id())
        return cls(key_id=key_id, public_paserk=public_paserk, can_sign=secret is not None, _secret=secret)

    def secret_paserk(self) -> str:
        """Return the ``k4.secret.…`` PASERK, to store the key. Raises ``ValueError`` for a public-only key."""
        if self._secret is None:
            raise ValueError("this key has no secret: it only verifies")
        return self._secret

    def public_only(self) -> SigningKey:
        """Return this key without its secret."""
        return SigningKey(key_id=self.key_id, public_paserk=self.public_paserk, can_sign=False)


def _deny(reason: ConsentDenial, detail: str) -> NoReturn:
    raise ConsentDenied(reason, detail)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate JSON key")
    return result


def _refuse_constant(_name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def _json_object(raw: bytes) -> dict[str, Any]:
    """Parse strict JSON (UTF-8, no duplicate keys, no NaN) that must be an object. Raises ``ValueError``."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(value: object) -> datetime:
    """Parse an RFC 3339 UTC time (``Z`` or ``+00:00``, up to microseconds). Raises ``ValueError``."""
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError("not an RFC 3339 UTC time")
    year, month, day, hour, minute, second, fraction = match.groups()
    micro = int((fraction or "").ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=UTC)


def _parse_fields(value: object) -> tuple[int, ...]:
    """Parse the ``fields`` claim: a non-empty list of known names, unique, in field order. Raises ``ValueError``."""
    if not isinstance(value, list) or not value:
        raise ValueError("fields must be a non-empty list")
    if not all(isinstance(name, str) and name in _FIELD_NUMBERS for name in value):
        raise ValueError("unknown contact field")
    numbers = [_FIELD_NUMBERS[name] for name in value]
    if numbers != sorted(set(numbers)):
        raise ValueError("fields must be unique and in field order")
    return tuple(numbers)


def _implicit_assertion(partner_id: UUID) -> bytes:
    return _IMPLICIT_PREFIX + str(partner_id).encode("utf-8")


class ConsentKeyring:
    """The keys that sign and verify consent tokens.

    ``keys[0]`` is the active key: it signs every new token and must hold its
    secret. The others only verify: after a rotation, keep the old key (its
    public half is enough) until the last token it signed has expired, then
    drop it, and its tokens are refused. Raises ``ValueError`` for no keys, a
    public-only active key or a key listed twice.

    A keyring remembers the tokens it has verified for a partner, so that a
    partner presenting the same token again does not pay for the Ed25519
    verification again (the larger part of a contact call's own work) nor
    for parsing its claims again: what is remembered
    is what the same bytes, key and partner always give, the signature's
    outcome and the checked claims; the expiry is checked on every call,
    against that call's ``now``. A failed verification is never remembered,
    and a new keyring (a rotation) starts with none.
    """

    __slots__ = ("_keys", "_signer", "_verified", "_verifiers")

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ValueError("at least one signing key is required")
        if not keys[0].can_sign:
            raise ValueError("the first (active) key must hold its secret")
        verifiers: dict[str, Any] = {}
        for key in keys:
            if key.key_id in verifiers:
                raise ValueError("a signing key is listed twice")
            try:
                verifier = pyseto.Key.from_paserk(key.public_paserk)
            except (ValueError, pyseto.PysetoError):
                raise ValueError("a signing key's public PASERK is not valid") from None
            if not key.public_paserk.startswith("k4.public.") or verifier.to_paserk_id() != key.key_id:
                raise ValueError("a signing key's id does not match its public key")
            verifiers[key.key_id] = verifier
        signer = pyseto.Key.from_paserk(keys[0].secret_paserk())
        if signer.to_peer_paserk_id() != keys[0].key_id:
            raise ValueError("the active key's secret does not match its public key")
        self._keys = tuple(keys)
        self._signer = signer
        self._verifiers: Mapping[str, Any] = MappingProxyType(verifiers)
        self._verified: dict[tuple[str, UUID], ConsentClaims] = {}

    @classmethod
    def from_text(cls, text: str) -> ConsentKeyring:
        """Parse PASERKs, one per line or separated by commas; the first is active.

        Blank lines and ``#`` comments are ignored. Raises ``ValueError`` naming
        the position of a bad key, never its text.
        """
        entries: list[str] = []
        for line in text.splitlines():
            entries.extend(part.strip() for part in line.split("#", 1)[0].split(","))
        keys: list[SigningKey] = []
        for position, entry in enumerate((e for e in entries if e), start=1):
            try:
                keys.append(SigningKey.from_paserk(entry))
            except ValueError as exc:
                raise ValueError(f"signing key {position}: {exc}") from None
        return cls(keys)

    @property
    def active_key_id(self) -> str:
        """The PASERK id (``k4.pid.…``) of the key that signs new tokens."""
        return self._keys[0].key_id

    def public_keys(self) -> list[SigningKey]:
        """Return every key without its secret, the active key first (to publish for verifiers)."""
        return [key.public_only() for key in self._keys]

    def sign(self, claims: ConsentClaims) -> str:
        """Return a consent token for ``claims``, signed with the active key.

        Raises ``ValueError`` when the token would be longer than :data:`MAX_TOKEN_LENGTH`.
        """
        payload = {
            "iss": ISSUER,
            "sub": claims.patient_ref,
            "aud": str(claims.partner_id),
            "jti": claims.consent_ref,
            "iat": _format_time(claims.issued_at),
            "exp": _format_time(claims.expires_at),
            "fields": list(claims.field_names),
            "purpose": claims.purpose,
        }
        token = pyseto.encode(
            self._signer,
            json.dumps(payload, separators=(",", ":")).encode("utf-8"),
            footer=json.dumps({"kid": self.active_key_id}, separators=(",", ":")).encode("utf-8"),
            implicit_assertion=_implicit_assertion(claims.partner_id),
        ).decode("ascii")
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError("the consent token would be too long; shorten the purpose")
        return token

    def verify(self, token: str, *, partner_id: UUID, now: datetime) -> ConsentClaims:
        """Return the claims of ``token`` if it is a valid, unexpired consent for ``partner_id`` at ``now``.

        Raises :class:`ConsentDenied`: ``CONSENT_REQUIRED`` for an empty token,
        ``CONSENT_EXPIRED`` when ``now >= exp`` (no leeway) for a token that is
        otherwise valid, ``CONSENT_INVALID`` for anything else. Revocation is
        the caller's check. ``now`` must be timezone-aware (``ValueError``).
        """
        if not isinstance(now, datetime) or now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        if not token:
            _deny(ConsentDenial.REQUIRED, "empty token")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            _deny(ConsentDenial.INVALID, "token too long")
        key = (token, partner_id)
        claims = self._verified.get(key)
        if claims is None:
            # Signature and claims are facts of the token for this partner: checked once, kept only
            # when both pass. The expiry depends on ``now`` and is checked on every call.
            claims = self._check_claims(self._verify_signature(token, partner_id), partner_id)
            remember(self._verified, key, claims, VERIFIED_MEMO_SIZE)
        if now >= claims.expires_at:
            _deny(ConsentDenial.EXPIRED, "expired")
        return claims

    def _verify_signature(self, token: str, partner_id: UUID) -> bytes:
        """Return the payload of ``token`` if its signature verifies for ``partner_id``.

        Raises :class:`ConsentDenied` (``CONSENT_INVALID``) otherwise.
        """
        parts = token.split(".")
        if len(parts) != 4 or not token.startswith(_HEADER):
            _deny(ConsentDenial.INVALID, "not a v4.public token with a footer")
        try:
            _b64decode(parts[2])
            footer = _json_object(_b64decode(parts[3]))
        except ValueError:
            _deny(ConsentDenial.INVALID, "malformed token or footer")
        kid = footer.get("kid")
        if set(footer) != {"kid"} or not isinstance(kid, str):
            _deny(ConsentDenial.INVALID, "footer without a kid")
        verifier = self._verifiers.get(kid)
        if verifier is None:
            _deny(ConsentDenial.INVALID, "unknown key id")
        try:
            # No deserializer: pyseto checks the signature only, and none of the claims.
            raw = pyseto.decode(verifier, token, implicit_assertion=_implicit_assertion(partner_id)).payload
        except (pyseto.PysetoError, ValueError):
            _deny(ConsentDenial.INVALID, "bad signature")
        if not isinstance(raw, bytes):
            _deny(ConsentDenial.INVALID, "bad signature")
        return raw

    @staticmethod
    def _check_claims(raw: bytes, partner_id: UUID) -> ConsentClaims:
        try:
            payload = _json_object(raw)
        except ValueError:
            _deny(ConsentDenial.INVALID, "payload is not a JSON object")
        if set(payload) != _CLAIMS:
            _deny(ConsentDenial.INVALID, "missing or unexpected claims")
        if not isinstance(payload["iss"], str) or payload["iss"] != ISSUER:
            _deny(ConsentDenial.INVALID, "wrong issuer")
        if not isinstance(payload["aud"], str) or payload["aud"] != str(partner_id):
            _deny(ConsentDenial.INVALID, "wrong audience")
        try:
            fields = _parse_fields(payload["fields"])
        except ValueError:
            _deny(ConsentDenial.INVALID, "bad fields")
        purpose = payload["purpose"]
        if not isinstance(purpose, str) or not purpose:
            _deny(ConsentDenial.INVALID, "bad purpose")
        try:
            issued_at = _parse_time(payload["iat"])
            expires_at = _parse_time(payload["exp"])
        except ValueError:
            _deny(ConsentDenial.INVALID, "bad iat or exp")
        if expires_at <= issued_at:
            _deny(ConsentDenial.INVALID, "exp not after iat")
        try:
            return ConsentClaims(payload["jti"], payload["sub"], partner_id, fields, purpose, issued_at, expires_at)
        except ValueError:
            _deny(ConsentDenial.INVALID, "bad claims")
