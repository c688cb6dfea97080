"""Consent tokens (service.consent) and their keys (service.keyfiles.load_signing_keys)."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import stat
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pyseto
import pytest
from appointments.type.v1 import contact_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.access import consent_tokens
from service.access.consent_tokens import (
    CONTACT_FIELDS,
    MAX_TOKEN_LENGTH,
    ConsentClaims,
    ConsentDenial,
    ConsentDenied,
    ConsentKeyring,
    SigningKey,
)
from service.crypto.keyfiles import SIGNING_KEYS_FILE, load_signing_keys
from service.errors import ConfigError
from service.settings import Settings

PARTNER = UUID("0a11ce00-0000-4000-8000-00000000beef")
OTHER_PARTNER = UUID("0b0b0000-0000-4000-8000-00000000cafe")
PATIENT = UUID("9a7e0000-0000-4000-8000-0000000f00d5")
CONSENT = UUID("c0115e47-0000-4000-8000-000000000001")
# The partner's references to them, as service.disclosure.pseudonyms spells references.
PATIENT_REF = "pat_leakcheckpatientrefaaaaaaa"
CONSENT_REF = "cns_leakcheckconsentrefaaaaaaa"
NOW = datetime(2031, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
PURPOSE = "fake-purpose: follow-up call for test"
IMPLICIT = b"apptgate-consent-v1:"


def make_claims(**changes: Any) -> ConsentClaims:
    base = ConsentClaims(
        consent_ref=CONSENT_REF,
        patient_ref=PATIENT_REF,
        partner_id=PARTNER,
        fields=(1, 3),
        purpose=PURPOSE,
        issued_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(days=30, microseconds=7),
    )
    return replace(base, **changes)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def valid_payload(claims: ConsentClaims | None = None) -> dict[str, Any]:
    """The payload the keyring signs, built independently of the module."""
    c = claims or make_claims()
    return {
        "iss": "apptgate",
        "sub": c.patient_ref,
        "aud": str(c.partner_id),
        "jti": c.consent_ref,
        "iat": c.issued_at.isoformat(timespec="microseconds"),
        "exp": c.expires_at.isoformat(timespec="microseconds"),
        "fields": [CONTACT_FIELDS[f] for f in c.fields],
        "purpose": c.purpose,
    }


def forge(
    key: SigningKey,
    payload: dict[str, Any] | bytes,
    *,
    footer: dict[str, Any] | bytes | None = None,
    partner: UUID = PARTNER,
) -> str:
    """Sign arbitrary content with ``key`` through pyseto directly: a valid signature over whatever we like."""
    secret = pyseto.Key.from_paserk(key.secret_paserk())
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    foot = footer if isinstance(footer, bytes) else json.dumps({"kid": key.key_id} if footer is None else footer)
    token = pyseto.encode(secret, body, footer=foot, implicit_assertion=IMPLICIT + str(partner).encode())
    return str(token.decode("ascii"))


def denial(keyring: ConsentKeyring, token: str, *, partner: UUID = PARTNER, now: datetime = NOW) -> str:
    with pytest.raises(ConsentDenied) as info:
        keyring.verify(token, partner_id=partner, now=now)
    return info.value.reason


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def keyring(key: SigningKey) -> ConsentKeyring:
    return ConsentKeyring([key])


@pytest.fixture(scope="module")
def token(keyring: ConsentKeyring) -> str:
    return keyring.sign(make_claims())


# --- round trip and format ------------------------------------------------------------------------------------------


def test_round_trip_returns_the_signed_claims(keyring: ConsentKeyring) -> None:
    claims = make_claims(fields=(1, 2, 3, 4))
    verified = keyring.verify(keyring.sign(claims), partner_id=PARTNER, now=NOW)
    assert verified == claims
    assert verified.expires_at.microsecond == claims.expires_at.microsecond == 890130
    assert verified.expires_at.tzinfo is not None and verified.expires_at.utcoffset() == timedelta(0)
    assert verified.field_names == ("name", "sex", "phone", "email")


def test_token_format(keyring: ConsentKeyring, token: str) -> None:
    header, purpose, body, footer = token.split(".")
    assert (header, purpose) == ("v4", "public")
    assert json.loads(unb64(footer)) == {"kid": keyring.active_key_id}
    assert keyring.active_key_id.startswith("k4.pid.")
    payload = json.loads(unb64(body)[:-64])
    assert payload == {
        "iss": "apptgate",
        "sub": PATIENT_REF,
        "aud": str(PARTNER),
        "jti": CONSENT_REF,
        "iat": "2031-03-04T04:06:07.890123Z",
        "exp": "2031-04-03T05:06:07.890130Z",
        "fields": ["name", "phone"],
        "purpose": PURPOSE,
    }


def test_token_verifies_with_pyseto_and_the_partner_implicit_assertion(key: SigningKey, token: str) -> None:
    public = pyseto.Key.from_paserk(key.public_paserk)
    decoded = pyseto.decode(public, token, implicit_assertion=IMPLICIT + str(PARTNER).encode())
    assert isinstance(decoded.payload, bytes)
    assert json.loads(decoded.payload)["aud"] == str(PARTNER)
    with pytest.raises(pyseto.VerifyError):
        pyseto.decode(public, token, implicit_assertion=IMPLICIT + str(OTHER_PARTNER).encode())


def test_contact_fields_match_the_proto_enum() -> None:
    assert dict(CONTACT_FIELDS) == {
        contact_pb2.CONTACT_FIELD_NAME: "name",
        contact_pb2.CONTACT_FIELD_SEX: "sex",
        contact_pb2.CONTACT_FIELD_PHONE: "phone",
        contact_pb2.CONTACT_FIELD_EMAIL: "email",
    }


def test_claim_times_must_be_utc_and_plus_zero_offset_is_accepted(key: SigningKey, keyring: ConsentKeyring) -> None:
    with pytest.raises(ValueError, match="UTC"):
        make_claims(issued_at=datetime(2031, 3, 4, 6, 0, tzinfo=timezone(timedelta(hours=1))))
    token = forge(key, {**valid_payload(), "iat": "2031-03-04T04:06:07+00:00"})
    assert keyring.verify(token, partner_id=PARTNER, now=NOW).issued_at == datetime(2031, 3, 4, 4, 6, 7, tzinfo=UTC)


# --- denial reasons -------------------------------------------------------------------------------------------------


def test_empty_token_is_required(keyring: ConsentKeyring) -> None:
    assert denial(keyring, "") == ConsentDenial.REQUIRED


def test_expiry_is_exact(keyring: ConsentKeyring) -> None:
    exp = NOW + timedelta(minutes=5)
    token = keyring.sign(make_claims(expires_at=exp))
    assert keyring.verify(token, partner_id=PARTNER, now=exp - timedelta(microseconds=1)).expires_at == exp
    assert denial(keyring, token, now=exp) == ConsentDenial.EXPIRED
    assert denial(keyring, token, now=exp + timedelta(days=400)) == ConsentDenial.EXPIRED


def test_now_in_another_zone_compares_by_instant(keyring: ConsentKeyring) -> None:
    exp = NOW + timedelta(minutes=5)
    token = keyring.sign(make_claims(expires_at=exp))
    plus_two = timezone(timedelta(hours=2))
    keyring.verify(token, partner_id=PARTNER, now=(exp - timedelta(microseconds=1)).astimezone(plus_two))
    assert denial(keyring, token, now=exp.astimezone(plus_two)) == ConsentDenial.EXPIRED


def test_naive_now_is_a_programming_error(keyring: ConsentKeyring, token: str) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        keyring.verify(token, partner_id=PARTNER, now=NOW.replace(tzinfo=None))


def test_expired_token_with_a_bad_signature_is_invalid_not_expired(key: SigningKey, keyring: ConsentKeyring) -> None:
    payload = {**valid_payload(), "exp": "2001-01-01T00:00:00.000000Z", "iat": "2000-01-01T00:00:00.000000Z"}
    assert denial(keyring, forge(key, payload)) == ConsentDenial.EXPIRED
    forged = forge(SigningKey.generate(), payload, footer={"kid": key.key_id})
    assert denial(keyring, forged) == ConsentDenial.INVALID


def test_another_partners_token_is_invalid(keyring: ConsentKeyring) -> None:
    token = keyring.sign(make_claims(partner_id=OTHER_PARTNER))
    assert keyring.verify(token, partner_id=OTHER_PARTNER, now=NOW).partner_id == OTHER_PARTNER
    assert denial(keyring, token, partner=PARTNER) == ConsentDenial.INVALID


def test_signature_by_the_right_partner_assertion_but_wrong_aud_is_invalid(key: SigningKey) -> None:
    keyring = ConsentKeyring([key])
    forged = forge(key, {**valid_payload(), "aud": str(OTHER_PARTNER)}, partner=PARTNER)
    assert denial(keyring, forged) == ConsentDenial.INVALID


def test_tampered_payload_byte_is_invalid(keyring: ConsentKeyring, token: str) -> None:
    header, purpose, body, footer = token.split(".")
    raw = bytearray(unb64(body))
    index = raw.index(b"phone")
    raw[index : index + 5] = b"email"
    tampered = ".".join([header, purpose, b64(bytes(raw)), footer])
    assert denial(keyring, tampered) == ConsentDenial.INVALID
    raw[-1] ^= 1  # and a flipped signature bit
    assert denial(keyring, ".".join([header, purpose, b64(bytes(raw)), footer])) == ConsentDenial.INVALID


def test_non_canonical_base64_is_invalid_although_pyseto_accepts_it(
    key: SigningKey, keyring: ConsentKeyring, token: str
) -> None:
    header, purpose, body, footer = token.split(".")
    junk = ".".join([header, purpose, body[:20] + "!!!!" + body[20:], footer])
    public = pyseto.Key.from_paserk(key.public_paserk)
    assert pyseto.decode(public, junk, implicit_assertion=IMPLICIT + str(PARTNER).encode()).payload
    assert denial(keyring, junk) == ConsentDenial.INVALID
    padded = ".".join([header, purpose, body + "=" * (-len(body) % 4 or 4), footer])
    assert denial(keyring, padded) == ConsentDenial.INVALID
    # Unused trailing bits: another last character that decodes to the same bytes.
    variants = []
    for char in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_":
        if char != body[-1] and unb64(body[:-1] + char) == unb64(body):
            variants.append(f"{header}.{purpose}.{body[:-1]}{char}.{footer}")
        if char != footer[-1] and unb64(footer[:-1] + char) == unb64(footer):
            variants.append(f"{header}.{purpose}.{body}.{footer[:-1]}{char}")
    assert variants
    for variant in variants:
        assert pyseto.decode(public, variant, implicit_assertion=IMPLICIT + str(PARTNER).encode()).payload
        assert denial(keyring, variant) == ConsentDenial.INVALID


def test_unknown_kid_is_invalid(key: SigningKey, keyring: ConsentKeyring) -> None:
    stranger = SigningKey.generate()
    assert denial(keyring, forge(stranger, valid_payload())) == ConsentDenial.INVALID
    assert denial(keyring, forge(key, valid_payload(), footer={"kid": stranger.key_id})) == ConsentDenial.INVALID
    # the same token is fine for a keyring that knows the key
    assert ConsentKeyring([stranger]).verify(forge(stranger, valid_payload()), partner_id=PARTNER, now=NOW)


def test_rotation_old_tokens_verify_until_the_old_key_is_dropped() -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    old_token = ConsentKeyring([old]).sign(make_claims())
    rotated = ConsentKeyring([new, old.public_only()])
    assert rotated.active_key_id == new.key_id
    assert rotated.verify(old_token, partner_id=PARTNER, now=NOW) == make_claims()
    new_token = rotated.sign(make_claims())
    assert json.loads(unb64(new_token.split(".")[3]))["kid"] == new.key_id
    assert rotated.verify(new_token, partner_id=PARTNER, now=NOW) == make_claims()
    retired = ConsentKeyring([new])
    assert denial(retired, old_token) == ConsentDenial.INVALID
    assert retired.verify(new_token, partner_id=PARTNER, now=NOW) == make_claims()


def test_token_over_the_length_limit_is_invalid_without_parsing(
    keyring: ConsentKeyring, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_purpose = "p" * 2900
    token = forge(key, valid_payload(make_claims(purpose=long_purpose)))
    assert len(token) > MAX_TOKEN_LENGTH
    monkeypatch.setattr(pyseto, "decode", _explode)
    assert denial(keyring, token) == ConsentDenial.INVALID
    with pytest.raises(ValueError, match="too long"):
        keyring.sign(make_claims(purpose=long_purpose))


def _explode(*_args: object, **_kwargs: object) -> object:
    raise AssertionError("must not be called")


def test_a_token_verified_once_is_not_verified_again_but_its_expiry_is_checked_every_time(
    key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = ConsentKeyring([key])
    exp = NOW + timedelta(minutes=5)
    token = keyring.sign(make_claims(expires_at=exp))
    assert keyring.verify(token, partner_id=PARTNER, now=NOW).expires_at == exp

    monkeypatch.setattr(pyseto, "decode", _explode)  # from here on, no signature is verified

    assert keyring.verify(token, partner_id=PARTNER, now=NOW) == make_claims(expires_at=exp)
    assert denial(keyring, token, now=exp) == ConsentDenial.EXPIRED  # expiry against this call's now
    with pytest.raises(AssertionError, match="must not be called"):  # another partner: verified afresh
        keyring.verify(token, partner_id=OTHER_PARTNER, now=NOW)


def test_a_token_that_failed_is_not_remembered(key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = ConsentKeyring([key])
    token = keyring.sign(make_claims())
    assert denial(keyring, token, partner=OTHER_PARTNER) == ConsentDenial.INVALID

    monkeypatch.setattr(pyseto, "decode", _explode)

    with pytest.raises(AssertionError, match="must not be called"):  # checked again, not answered from memory
        keyring.verify(token, partner_id=OTHER_PARTNER, now=NOW)


def test_a_token_with_a_good_signature_but_a_bad_claim_is_not_remembered(
    key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = ConsentKeyring([key])
    forged = forge(key, {**valid_payload(), "iss": "someone-else"})
    assert denial(keyring, forged) == ConsentDenial.INVALID

    monkeypatch.setattr(pyseto, "decode", _explode)

    with pytest.raises(AssertionError, match="must not be called"):  # verified again, not answered from memory
        keyring.verify(forged, partner_id=PARTNER, now=NOW)


def test_the_memo_of_verified_tokens_is_bounded(key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consent_tokens, "VERIFIED_MEMO_SIZE", 3)
    keyring = ConsentKeyring([key])
    tokens = [keyring.sign(make_claims(purpose=f"purpose {n}")) for n in range(4)]
    for token in tokens:
        keyring.verify(token, partner_id=PARTNER, now=NOW)

    monkeypatch.setattr(pyseto, "decode", _explode)

    keyring.verify(tokens[3], partner_id=PARTNER, now=NOW)  # remembered after the memo was emptied
    with pytest.raises(AssertionError, match="must not be called"):
        keyring.verify(tokens[0], partner_id=PARTNER, now=NOW)  # forgotten when it was full


@pytest.mark.parametrize(
    "text",
    [
        "x",
        ".",
        "v4.public.",
        "v4.public..",
        "v4.public.AAAA",
        "v4.public.AAAA.AAAA.AAAA",
        "v4.local.AAAA.AAAA",
        "v2.public.AAAA.e30",
        " v4.public.AAAA.e30",
        "v4.public.ÄÄÄÄ.e30",
        "v4.public.AAAA.e30\n",
        "V4.PUBLIC.AAAA.e30",
    ],
)
def test_malformed_tokens_are_invalid(keyring: ConsentKeyring, text: str) -> None:
    assert denial(keyring, text) == ConsentDenial.INVALID


def test_wrong_version_with_a_real_signature_is_invalid(key: SigningKey, keyring: ConsentKeyring) -> None:
    raw = Ed25519Seed.of(key)
    v2_key = pyseto.Key.from_paserk("k2.secret." + b64(raw))
    foot = json.dumps({"kid": key.key_id})
    v2 = pyseto.encode(v2_key, json.dumps(valid_payload()).encode(), footer=foot).decode()
    assert v2.startswith("v2.public.")
    assert denial(keyring, v2) == ConsentDenial.INVALID
    assert denial(keyring, "v4" + v2[2:]) == ConsentDenial.INVALID


class Ed25519Seed:
    @staticmethod
    def of(key: SigningKey) -> bytes:
        return unb64(key.secret_paserk().removeprefix("k4.secret."))


# --- claims of a correctly signed token ------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "jti", "iat", "exp", "fields", "purpose"])
def test_missing_claim_is_invalid_even_with_a_valid_signature(key: SigningKey, claim: str) -> None:
    keyring = ConsentKeyring([key])
    payload = valid_payload()
    assert keyring.verify(forge(key, payload), partner_id=PARTNER, now=NOW) == make_claims()
    del payload[claim]
    assert denial(keyring, forge(key, payload)) == ConsentDenial.INVALID


def test_pyseto_alone_accepts_a_token_without_exp(key: SigningKey) -> None:
    """Why the module checks claims itself: pyseto's own claim checks let a token without exp through."""
    payload = valid_payload()
    del payload["exp"]
    forged = forge(key, payload)
    public = pyseto.Key.from_paserk(key.public_paserk)
    decoded = pyseto.decode(
        public, forged, implicit_assertion=IMPLICIT + str(PARTNER).encode(), deserializer=json, aud=str(PARTNER)
    )
    assert "exp" not in decoded.payload
    assert denial(ConsentKeyring([key]), forged) == ConsentDenial.INVALID


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("iss", "apptgate2"),
        ("iss", "APPTGATE"),
        ("iss", ["apptgate"]),
        ("iss", None),
        ("aud", str(OTHER_PARTNER)),
        ("aud", str(PARTNER).upper()),
        ("aud", [str(PARTNER)]),
        ("aud", PARTNER.int),
        ("sub", PATIENT_REF.upper()),
        ("sub", PATIENT_REF + "\n"),
        ("sub", str(PATIENT)),  # an internal id is never a reference
        ("sub", PATIENT.hex),
        ("sub", 12),
        ("jti", "not-a-reference"),
        ("jti", str(CONSENT)),
        ("jti", CONSENT_REF[:-1]),
        ("jti", None),
        ("fields", []),
        ("fields", ["name", "name"]),
        ("fields", ["name", "address"]),
        ("fields", ["phone", "name"]),
        ("fields", [1, 3]),
        ("fields", "name"),
        ("fields", {"name": True}),
        ("purpose", ""),
        ("purpose", 7),
        ("purpose", None),
        ("iat", "2031-03-04 04:06:07Z"),
        ("iat", "2031-03-04T04:06:07.1234567Z"),
        ("iat", "2031-02-30T04:06:07Z"),
        ("iat", "2031-03-04T04:06:07"),
        ("iat", 1930000000),
        ("exp", "2031-04-03T06:06:07.890130+01:00"),
        ("exp", "2031-04-03T05:06:60Z"),
        ("exp", "٢٠٣١-04-03T05:06:07Z"),
        ("exp", "tomorrow"),
        ("exp", None),
        ("exp", "2031-03-04T04:06:07.890123Z"),  # == iat
        ("exp", "2031-03-04T04:06:07.890122Z"),  # before iat
    ],
)
def test_bad_claim_is_invalid(key: SigningKey, claim: str, value: object) -> None:
    payload = {**valid_payload(), claim: value}
    assert denial(ConsentKeyring([key]), forge(key, payload)) == ConsentDenial.INVALID


@pytest.mark.parametrize("extra", [{"nbf": "2099-01-01T00:00:00Z"}, {"fields_extra": ["email"]}, {"kid": "x"}])
def test_unexpected_claim_is_invalid(key: SigningKey, extra: dict[str, Any]) -> None:
    assert denial(ConsentKeyring([key]), forge(key, {**valid_payload(), **extra})) == ConsentDenial.INVALID


def test_duplicate_json_keys_are_invalid(key: SigningKey) -> None:
    body = json.dumps(valid_payload())[:-1] + ', "aud": "' + str(OTHER_PARTNER) + '"}'
    assert json.loads(body)["aud"] == str(OTHER_PARTNER)
    assert denial(ConsentKeyring([key]), forge(key, body.encode(), partner=OTHER_PARTNER), partner=OTHER_PARTNER) == (
        ConsentDenial.INVALID
    )


@pytest.mark.parametrize(
    "body",
    [b"[]", b'"apptgate"', b"null", b"{", b"\xff\xfe{}", b'{"exp": NaN}', b"[" * 2500, b'{"a":' * 500],
)
def test_payload_that_is_not_a_json_object_is_invalid(key: SigningKey, body: bytes) -> None:
    token = forge(key, body)
    assert len(token) <= MAX_TOKEN_LENGTH  # so the parser, not the length cap, refuses it
    assert denial(ConsentKeyring([key]), token) == ConsentDenial.INVALID


@pytest.mark.parametrize(
    "footer",
    [b"", b"not json", b"{}", b'{"kid": 5}', b'{"kid": null}', b"[]", b'"k4.pid.x"', b"[" * 2000, b'{"a":' * 400],
)
def test_footer_without_a_string_kid_is_invalid(key: SigningKey, footer: bytes) -> None:
    token = forge(key, valid_payload(), footer=footer)
    assert len(token) <= MAX_TOKEN_LENGTH  # so the parser, not the length cap, refuses it
    assert denial(ConsentKeyring([key]), token) == ConsentDenial.INVALID


def test_footer_with_extra_keys_is_invalid(key: SigningKey) -> None:
    footer = {"kid": key.key_id, "wpk": "fake"}
    assert denial(ConsentKeyring([key]), forge(key, valid_payload(), footer=footer)) == ConsentDenial.INVALID


def test_footer_with_duplicate_kid_is_invalid(key: SigningKey) -> None:
    footer = ('{"kid": "k4.pid.fake", "kid": "' + key.key_id + '"}').encode()
    assert denial(ConsentKeyring([key]), forge(key, valid_payload(), footer=footer)) == ConsentDenial.INVALID


# --- the denial itself ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(ConsentDenial))
def test_denials_carry_fixed_messages(reason: ConsentDenial) -> None:
    denied = ConsentDenied(reason)
    assert denied.reason == reason
    assert str(denied) == denied.message
    assert denied.message and reason not in denied.message
    copy = pickle.loads(pickle.dumps(denied))  # noqa: S301 (our own object)
    assert (copy.reason, copy.message) == (reason, denied.message)


def test_unknown_denial_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        ConsentDenied("CONSENT_MAYBE")


def test_denial_text_never_holds_token_or_claim_values(key: SigningKey) -> None:
    keyring = ConsentKeyring([key])
    cases = [
        forge(key, {**valid_payload(), "purpose": 9}),
        forge(key, {**valid_payload(), "aud": str(OTHER_PARTNER)}),
        keyring.sign(make_claims())[:-3],
        keyring.sign(make_claims(expires_at=NOW)),
    ]
    for token in cases:
        with pytest.raises(ConsentDenied) as info:
            keyring.verify(token, partner_id=PARTNER, now=NOW)
        text = f"{info.value} {info.value.message} {info.value.detail} {info.value.args}"
        for secret in (token, token.split(".")[2][:12], PATIENT_REF, CONSENT_REF, str(OTHER_PARTNER), PURPOSE):
            assert secret not in text


# --- fuzzing: verify() only ever raises ConsentDenied ----------------------------------------------------------------

_TOKEN_CHARS = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=!+/ \n\x00é😀")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _mutated(draw: st.DrawFn, base: str) -> str:
    text = base
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "append"]))
        char = draw(_TOKEN_CHARS)
        if op == "replace":
            text = text[:position] + char + text[position + 1 :]
        elif op == "insert":
            text = text[:position] + char + text[position:]
        elif op == "delete":
            text = text[:position] + text[position + 1 :]
        elif op == "truncate":
            text = text[:position]
        else:
            text += draw(st.text(_TOKEN_CHARS, max_size=20))
    return text


_FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _only_denied(keyring: ConsentKeyring, text: str, partner: UUID = PARTNER) -> ConsentClaims | None:
    """Return the claims, or None when verify() denied; any other exception fails the test."""
    reason = None
    try:
        return keyring.verify(text, partner_id=partner, now=NOW)
    except ConsentDenied as denied:
        reason = denied.reason
    assert reason in {ConsentDenial.REQUIRED, ConsentDenial.INVALID, ConsentDenial.EXPIRED}
    return None


@_FUZZ
@given(text=st.text(max_size=300) | st.text(_TOKEN_CHARS, max_size=300).map(lambda t: "v4.public." + t))
def test_fuzz_random_text_is_denied(keyring: ConsentKeyring, text: str) -> None:
    assert _only_denied(keyring, text) is None


@_FUZZ
@given(data=st.data())
def test_fuzz_mutated_token_is_denied_or_unchanged(keyring: ConsentKeyring, token: str, data: st.DataObject) -> None:
    mutated = data.draw(_mutated(token))
    result = _only_denied(keyring, mutated)
    # Canonical base64 means no other string carries the same signed content.
    assert result is None or mutated == token


@_FUZZ
@given(
    overrides=st.dictionaries(st.sampled_from([*valid_payload(), "nbf", "x"]), _JSON, max_size=3),
    dropped=st.sets(st.sampled_from(list(valid_payload())), max_size=2),
    footer=st.none() | _JSON.map(lambda v: json.dumps(v).encode()),
)
def test_fuzz_signed_garbage_claims_are_denied(
    key: SigningKey, overrides: dict[str, Any], dropped: set[str], footer: bytes | None
) -> None:
    payload = {k: v for k, v in {**valid_payload(), **overrides}.items() if k not in dropped}
    forged = forge(key, payload, footer=footer)
    result = _only_denied(ConsentKeyring([key]), forged)
    if result is not None:  # only an all-valid token passes; then it says exactly what was signed
        assert not dropped and footer is None
        assert payload["aud"] == str(PARTNER) and result.partner_id == PARTNER
        assert result.patient_ref == payload["sub"] and result.purpose == payload["purpose"]


# --- claims, keys and keyrings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"fields": ()},
        {"fields": (3, 1)},
        {"fields": (1, 1)},
        {"fields": (0,)},
        {"fields": (5,)},
        {"fields": (True,)},
        {"fields": [1]},
        {"purpose": ""},
        {"issued_at": NOW.replace(tzinfo=None)},
        {"expires_at": NOW - timedelta(hours=1)},
        {"patient_ref": str(PATIENT)},
        {"consent_ref": "cns_" + "A" * 26},
    ],
)
def test_claims_refuse_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        make_claims(**changes)


def test_signing_key_round_trips_through_paserk() -> None:
    key = SigningKey.generate()
    secret = key.secret_paserk()
    assert secret.startswith("k4.secret.")
    assert key.public_paserk.startswith("k4.public.") and key.key_id.startswith("k4.pid.")
    again = SigningKey.from_paserk(secret)
    assert again == key and again.can_sign and again.secret_paserk() == secret
    public = SigningKey.from_paserk(key.public_paserk)
    assert (public.key_id, public.public_paserk, public.can_sign) == (key.key_id, key.public_paserk, False)
    assert public == key.public_only() != key
    with pytest.raises(ValueError, match="only verifies"):
        public.secret_paserk()
    assert SigningKey.generate().key_id != key.key_id
    assert secret not in repr(key) and secret.split(".")[2] not in repr(key)


def test_signing_key_cannot_claim_to_sign_without_a_secret() -> None:
    key = SigningKey.generate()
    with pytest.raises(ValueError, match="secret"):
        SigningKey(key_id=key.key_id, public_paserk=key.public_paserk, can_sign=True)


_FAKE_BODY = "ZZfake-key-material-zz" * 2


@pytest.mark.parametrize(
    "text",
    [
        "",
        "k4.local." + _FAKE_BODY,
        "k3.secret." + _FAKE_BODY,
        "k4.secret-pw." + _FAKE_BODY,
        "k4.secret." + _FAKE_BODY,
        "k4.public." + _FAKE_BODY,
        "k4.public." + _FAKE_BODY + "!",
        "-----BEGIN PRIVATE KEY-----" + _FAKE_BODY,
    ],
)
def test_bad_paserk_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(ValueError, match="PASERK") as info:
        SigningKey.from_paserk(text)
    assert _FAKE_BODY[:10] not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_secret_paserk_with_a_mismatched_public_half_is_refused() -> None:
    a, b = Ed25519Seed.of(SigningKey.generate()), Ed25519Seed.of(SigningKey.generate())
    with pytest.raises(ValueError, match="does not match"):
        SigningKey.from_paserk("k4.secret." + b64(a[:32] + b[32:]))
    with pytest.raises(ValueError, match="64 bytes"):
        SigningKey.from_paserk("k4.secret." + b64(a[:32] + b"fakefake"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda a, b: [], "at least one"),
        (lambda a, b: [a.public_only(), b], "active"),
        (lambda a, b: [a, b, a.public_only()], "twice"),
        (lambda a, b: [a, replace(b.public_only(), key_id=a.key_id[:-4] + "fake")], "id does not match"),
    ],
)
def test_keyring_refuses_bad_key_lists(
    make: Callable[[SigningKey, SigningKey], list[SigningKey]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ConsentKeyring(make(SigningKey.generate(), SigningKey.generate()))


def test_keyring_from_text_accepts_lines_commas_and_comments() -> None:
    a, b, c = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    text = f"# rotated 2031-03\n\n  {a.secret_paserk()}  # active\n{b.public_paserk} , {c.secret_paserk()}\n"
    keyring = ConsentKeyring.from_text(text)
    assert keyring.active_key_id == a.key_id
    assert [k.key_id for k in keyring.public_keys()] == [a.key_id, b.key_id, c.key_id]
    assert ConsentKeyring.from_text(f"{a.secret_paserk()},{b.public_paserk}").active_key_id == a.key_id


def test_keyring_from_text_names_the_bad_position_not_the_text() -> None:
    good = SigningKey.generate().secret_paserk()
    with pytest.raises(ValueError, match="signing key 2") as info:
        ConsentKeyring.from_text(f"{good}\nk4.secret.{_FAKE_BODY}\n")
    assert _FAKE_BODY[:10] not in str(info.value)
    with pytest.raises(ValueError, match="at least one"):
        ConsentKeyring.from_text("# nothing here\n\n")


def test_public_keys_never_expose_secrets() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    keyring = ConsentKeyring([a, b])
    published = keyring.public_keys()
    assert [k.key_id for k in published] == [a.key_id, b.key_id]
    for shown, original in zip(published, (a, b), strict=True):
        assert not shown.can_sign
        assert shown.public_paserk == original.public_paserk
        with pytest.raises(ValueError, match="only verifies"):
            shown.secret_paserk()
        body = original.secret_paserk().split(".")[2]
        assert body not in repr(shown) and body not in repr(vars(shown) if hasattr(shown, "__dict__") else shown)
    published.clear()
    assert len(keyring.public_keys()) == 2


def test_keyring_keeps_parsed_keys(keyring: ConsentKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = ConsentKeyring([SigningKey.generate(), SigningKey.generate().public_only()])
    monkeypatch.setattr(pyseto.Key, "from_paserk", _explode)
    token = fresh.sign(make_claims())
    assert fresh.verify(token, partner_id=PARTNER, now=NOW) == make_claims()


def test_module_has_no_mutable_globals() -> None:
    for name, value in vars(consent_tokens).items():
        if not name.startswith("__"):
            assert not isinstance(value, dict | list | set | bytearray), name


# --- keyfiles.load_signing_keys ---------------------------------------------------------------------------------------


def test_dev_key_is_created_once_private_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="service.keyfiles"):
        first = load_signing_keys(settings)
    path = tmp_path / "data" / SIGNING_KEYS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "development" in caplog.records[0].getMessage()
    content = path.read_text()
    assert content.count("k4.secret.") == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [SIGNING_KEYS_FILE]  # no temporary left behind
    caplog.clear()
    second = load_signing_keys(settings)
    assert second.active_key_id == first.active_key_id
    assert path.read_text() == content
    assert not caplog.records
    assert second.verify(first.sign(make_claims()), partner_id=PARTNER, now=NOW) == make_claims()


def test_dev_key_already_present_is_not_overwritten(tmp_path: Path) -> None:
    existing = SigningKey.generate()
    (tmp_path / SIGNING_KEYS_FILE).write_text(existing.secret_paserk() + "\n")
    assert load_signing_keys(Settings(data_dir=tmp_path)).active_key_id == existing.key_id


def test_production_without_a_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="APPTGATE_SIGNING_KEY or APPTGATE_SIGNING_KEY_FILE is required"):
        load_signing_keys(Settings(env="production", data_dir=tmp_path))
    assert not (tmp_path / SIGNING_KEYS_FILE).exists()


def test_env_key_with_two_keys_first_is_active_and_both_verify(tmp_path: Path) -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    old_token = ConsentKeyring([b]).sign(make_claims())
    for separator in (",", "\n"):
        keyring = load_signing_keys(
            Settings(env="production", data_dir=tmp_path, signing_key=a.secret_paserk() + separator + b.secret_paserk())
        )
        assert keyring.active_key_id == a.key_id
        assert keyring.verify(old_token, partner_id=PARTNER, now=NOW) == make_claims()
        assert keyring.verify(keyring.sign(make_claims()), partner_id=PARTNER, now=NOW) == make_claims()
    assert not (tmp_path / SIGNING_KEYS_FILE).exists()


def test_key_file_is_used_and_env_wins_over_it(tmp_path: Path) -> None:
    from_file, from_env = SigningKey.generate(), SigningKey.generate()
    path = tmp_path / "keys.txt"
    path.write_text(f"# managed\n{from_file.secret_paserk()}\n")
    assert load_signing_keys(Settings(env="production", signing_key_file=path)).active_key_id == from_file.key_id
    both = Settings(env="production", signing_key_file=path, signing_key=from_env.secret_paserk())
    assert load_signing_keys(both).active_key_id == from_env.key_id


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_signing_keys(Settings(signing_key_file=tmp_path / "absent"))


@pytest.mark.parametrize("where", ["env", "file"])
def test_bad_key_text_is_a_config_error_without_the_text(tmp_path: Path, where: str) -> None:
    bad = f"k4.secret.{_FAKE_BODY}"
    path = tmp_path / "keys.txt"
    path.write_text(bad)
    settings = Settings(signing_key=bad) if where == "env" else Settings(signing_key_file=path)
    with pytest.raises(ConfigError) as info:
        load_signing_keys(settings)
    assert "signing key 1" in str(info.value)
    assert _FAKE_BODY[:10] not in str(info.value) and _FAKE_BODY[:10] not in repr(info.value.problems)
    assert info.value.__cause__ is None


def test_public_only_key_cannot_be_the_active_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="active"):
        load_signing_keys(Settings(signing_key=SigningKey.generate().public_paserk))


def test_the_data_directory_is_created_0700_and_the_key_0600_even_at_umask_000(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        load_signing_keys(Settings(data_dir=tmp_path / "parent" / "data"))
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "parent" / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "parent" / "data" / SIGNING_KEYS_FILE).stat().st_mode) == 0o600


def test_a_data_directory_other_users_can_write_is_refused_before_its_key_is_used(tmp_path: Path) -> None:
    # What umask 000 left behind: anyone could have put their own key in it.
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    (data / SIGNING_KEYS_FILE).write_text(SigningKey.generate().secret_paserk() + "\n")

    with pytest.raises(ConfigError) as caught:
        load_signing_keys(Settings(data_dir=data))

    assert caught.value.problems == [
        f"APPTGATE_DATA_DIR: {data} can be written by other users (mode 0777): chmod 700 {data}"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_development_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    planted = data / SIGNING_KEYS_FILE
    planted.write_text(SigningKey.generate().secret_paserk() + "\n")
    planted.chmod(0o600)
    os.chown(planted, 65534, 65534)

    with pytest.raises(ConfigError) as caught:
        load_signing_keys(Settings(data_dir=data))

    [problem] = caught.value.problems
    assert problem.startswith(
        f"the development consent-signing key (APPTGATE_SIGNING_KEY unset): {planted} is owned by"
    )
    assert problem.endswith(f"chown root {planted}")


@pytest.mark.parametrize("where", ["APPTGATE_SIGNING_KEY_FILE", "development file"])
def test_a_signing_key_behind_a_symbolic_link_is_refused(tmp_path: Path, where: str) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(SigningKey.generate().secret_paserk() + "\n")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    link = data / SIGNING_KEYS_FILE
    link.symlink_to(target)
    settings = Settings(data_dir=data, signing_key_file=link if where != "development file" else None)

    with pytest.raises(ConfigError) as caught:
        load_signing_keys(settings)

    [problem] = caught.value.problems
    assert problem.endswith(f"{link} is a symbolic link: name the file itself")


def test_a_dangling_link_in_place_of_the_development_key_is_refused_not_followed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "created-through-the-link"
    (data / SIGNING_KEYS_FILE).symlink_to(target)

    with pytest.raises(ConfigError, match="is a symbolic link"):
        load_signing_keys(Settings(data_dir=data))

    assert not target.exists()
