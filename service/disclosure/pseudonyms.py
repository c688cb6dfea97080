"""Partner-scoped opaque identifiers. Pure: no I/O.

Partners never see internal identifiers. For each partner, keys derived from
the server secret (HKDF-SHA256, one per partner and purpose) turn them into:

* appointment ids, ``apt_`` + base32 of AES-256 applied to the 16 bytes of the
  internal UUID. A single AES block is a keyed permutation: the id is stable
  for one partner, unrelated across partners, reversible only with the key,
  and a guessed or foreign id decrypts to a random UUID that matches nothing
  (so it answers NOT_FOUND, like any id that does not exist);
* patient references, ``pat_`` + base32 of HMAC-SHA256 truncated to 128 bits:
  one-way, so a partner can tell that two appointments share a patient and
  nothing more, and two partners' references cannot be joined;
* consent references, ``cns_`` + base32 of AES-256 of the consent's UUID, as
  appointment ids are made, under a key of their own: what a consent token
  names its consent by (``jti``), beside the patient reference (``sub``), so
  that a token, readable by whoever holds it, links nothing across partners;
* consent request ids, ``crq_`` + base32 of AES-256 of the request's UUID,
  made the same way under a key of their own.

Base32 of 16 bytes leaves 2 spare bits in the last character; an id is
accepted only in its one canonical spelling, with those bits zero.

The server secret must never change once partners hold ids: it is not a key
to rotate but part of the identifiers' definition.

A page of 50 derives 100 ids, each an AES block or an HMAC; agenda tools list
the same pages all day, so :class:`Pseudonyms` remembers the ids it derived
(:class:`Derived`: at most ``memo_size`` per kind across all partners, then
forgotten all at once). What it holds is what the process can recompute from
its keys at any time; nothing else.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections import OrderedDict
from uuid import UUID

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.memo import remember

APPOINTMENT_PREFIX = "apt_"
PATIENT_PREFIX = "pat_"
CONSENT_PREFIX = "cns_"
CONSENT_REQUEST_PREFIX = "crq_"
# 26 characters of base32, the last one's 2 spare bits zero (a, e, i, …: the values divisible by 4).
_BODY = re.compile(r"[a-z2-7]{25}[aeimquy4]")


_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
#: Every 10-bit value as its two base32 characters: 16 bytes encode as 13 table lookups.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_SHIFTS = tuple(range(120, -1, -10))


def _b32(raw: bytes) -> str:
    """Unpadded lower-case base32 of 16 bytes (26 characters), as ``base64.b32encode`` spells it."""
    bits = int.from_bytes(raw, "big") << 2  # 128 bits → 130, a multiple of 10
    return "".join([_PAIRS[(bits >> shift) & 1023] for shift in _SHIFTS])


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "======")


def looks_like_appointment_id(text: str) -> bool:
    """True when ``text`` has the shape of a partner appointment id (it may still match nothing)."""
    return _canonical(text, APPOINTMENT_PREFIX)


def looks_like_consent_request_id(text: str) -> bool:
    """True when ``text`` is shaped like a consent request id (``crq_`` and its canonical body)."""
    return _canonical(text, CONSENT_REQUEST_PREFIX)


def _canonical(text: str, prefix: str) -> bool:
    return text.startswith(prefix) and _BODY.fullmatch(text, len(prefix)) is not None


# Keyed by the id's bytes: hashing a UUID builds its 128-bit int first, several times the
# cost of hashing 16 bytes.
_Key = tuple["PartnerPseudonyms", bytes]


class Derived:
    """Ids already derived, shared by the codecs of one :class:`Pseudonyms`: bounded, cleared when full."""

    __slots__ = ("appointments", "patients", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.appointments: dict[_Key, str] = {}
        self.patients: dict[_Key, str] = {}

    def keep(self, table: dict[_Key, str], key: _Key, value: str) -> str:
        """Remember ``value`` under ``key`` in ``table`` (forgetting the whole table when full); return it."""
        return remember(table, key, value, self.size)


class PartnerPseudonyms:
    """The identifier codec of one partner."""

    __slots__ = ("_consents", "_decryptor", "_derived", "_encryptor", "_patient_key", "_requests")

    def __init__(
        self,
        appointment_key: bytes,
        patient_key: bytes,
        consent_key: bytes,
        request_key: bytes,
        derived: Derived | None = None,
    ) -> None:
        # ECB on exactly one block is the raw block cipher: a keyed permutation
        # of 128-bit values, which is what a reversible pseudonym needs. ECB keeps
        # no state between blocks, so one encryptor and one decryptor serve every call.
        cipher = Cipher(algorithms.AES(appointment_key), modes.ECB())  # noqa: S305
        self._encryptor = cipher.encryptor()
        self._decryptor = cipher.decryptor()
        self._patient_key = patient_key
        self._consents = Cipher(algorithms.AES(consent_key), modes.ECB())  # noqa: S305
        self._requests = Cipher(algorithms.AES(request_key), modes.ECB())  # noqa: S305
        self._derived = derived if derived is not None else Derived(0)

    def appointment_id(self, internal_id: UUID) -> str:
        """Return the partner's opaque id for an appointment."""
        raw = internal_id.bytes
        key = (self, raw)
        known = self._derived.appointments.get(key)
        if known is not None:
            return known
        value = APPOINTMENT_PREFIX + _b32(self._encryptor.update(raw))
        return self._derived.keep(self._derived.appointments, key, value)

    def parse_appointment_id(self, public_id: str) -> UUID:
        """Return the internal id behind a partner's appointment id.

        Raises ``ValueError`` when the text is not shaped like an id. A well
        shaped id that this partner was never given decodes to a UUID that
        matches no appointment.
        """
        if not looks_like_appointment_id(public_id):
            raise ValueError("not an appointment id")
        block = _unb32(public_id[len(APPOINTMENT_PREFIX) :])
        if len(block) != 16:  # never with the shape checked above; a partial block would stay in the decryptor
            raise ValueError("not an appointment id")
        return UUID(bytes=self._decryptor.update(block))

    def consent_ref(self, consent_id: UUID) -> str:
        """Return the partner's reference to a consent (what its tokens carry as ``jti``)."""
        encryptor = self._consents.encryptor()  # consents are rare: no cipher state kept between them
        return CONSENT_PREFIX + _b32(encryptor.update(consent_id.bytes) + encryptor.finalize())

    def parse_consent_ref(self, reference: str) -> UUID:
        """Return the consent behind a partner's consent reference; ``ValueError`` when it is not shaped like one."""
        if not _canonical(reference, CONSENT_PREFIX):
            raise ValueError("not a consent reference")
        decryptor = self._consents.decryptor()
        return UUID(bytes=decryptor.update(_unb32(reference[len(CONSENT_PREFIX) :])) + decryptor.finalize())

    def consent_request_id(self, request_id: UUID) -> str:
        """Return the partner's id of one of its consent requests."""
        encryptor = self._requests.encryptor()
        return CONSENT_REQUEST_PREFIX + _b32(encryptor.update(request_id.bytes) + encryptor.finalize())

    def parse_consent_request_id(self, public_id: str) -> UUID:
        """Return the request behind a partner's consent request id; ``ValueError`` when it is not shaped like one.

        A well-shaped id this partner was never given decodes to a UUID that
        matches none of its requests.
        """
        if not looks_like_consent_request_id(public_id):
            raise ValueError("not a consent request id")
        decryptor = self._requests.decryptor()
        return UUID(bytes=decryptor.update(_unb32(public_id[len(CONSENT_REQUEST_PREFIX) :])) + decryptor.finalize())

    def patient_ref(self, patient_id: UUID) -> str:
        """Return the partner's pseudonym for a patient (one-way)."""
        raw = patient_id.bytes
        key = (self, raw)
        known = self._derived.patients.get(key)
        if known is not None:
            return known
        value = PATIENT_PREFIX + _b32(hmac.digest(self._patient_key, raw, "sha256")[:16])
        return self._derived.keep(self._derived.patients, key, value)


#: Partners whose codecs a process keeps: each holds two derived keys, small; more partners than this rarely call.
CODECS = 4096
#: Ids remembered per kind, across partners: the pages polled in a day, a few megabytes.
DERIVED_IDS = 65_536


class Pseudonyms:
    """Derives and caches the codecs of each partner from the server secret."""

    def __init__(self, secret: bytes, *, cache_size: int = CODECS, memo_size: int = DERIVED_IDS) -> None:
        if len(secret) < 32:
            raise ValueError("the server secret must be at least 32 bytes")
        self._secret = secret
        self._cache: OrderedDict[UUID, PartnerPseudonyms] = OrderedDict()
        self._cache_size = cache_size
        self._derived = Derived(memo_size)

    def for_partner(self, partner_id: UUID) -> PartnerPseudonyms:
        """Return the codec of one partner."""
        codec = self._cache.get(partner_id)
        if codec is not None:
            self._cache.move_to_end(partner_id)
            return codec
        codec = PartnerPseudonyms(
            derive_key(self._secret, b"appointment-id", partner_id.bytes),
            derive_key(self._secret, b"patient-ref", partner_id.bytes),
            derive_key(self._secret, b"consent-ref", partner_id.bytes),
            derive_key(self._secret, b"consent-request-id", partner_id.bytes),
            self._derived,
        )
        self._cache[partner_id] = codec
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return codec


def derive_key(secret: bytes, purpose: bytes, context: bytes = b"") -> bytes:
    """Derive a 256-bit key for one purpose (and context) from the server secret."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"apptgate/v1/" + purpose + b"/" + context)
    return hkdf.derive(secret)
