"""The consent-gated contact view: each denial reason, partial consent, revocation, rotation."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.type.v1.contact_pb2 import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_NAME,
    CONTACT_FIELD_PHONE,
    CONTACT_FIELD_SEX,
    CONTACT_FIELD_UNSPECIFIED,
)
from harness import PartnerHandle, World

from service import models
from service.access.consent_tokens import ConsentKeyring, SigningKey
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store import ledger
from service.store.database import Database

ALL = [CONTACT_FIELD_NAME, CONTACT_FIELD_SEX, CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]


async def _denied(call: Any, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert harness.error_info(caught.value).reason == reason
    return caught.value


class Scene:
    """One practitioner, one patient with one appointment, and a partner granted access."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def build(self) -> Scene:
        self.practitioner = await self.world.practitioner()
        self.patient = await self.world.patient()
        self.partner = await self.world.partner("Agenda A", self.practitioner)
        await self.world.appointment(self.practitioner, self.patient.patient_id)
        [listed] = await self.partner.list_all()
        self.appointment_id = listed.appointment_id
        return self

    async def token(self, fields: list[int] = ALL, ttl: float = 3600, partner: PartnerHandle | None = None) -> str:
        target = partner or self.partner
        return (await self.world.consent(self.patient.patient_id, target.partner_id, fields, ttl)).token


@pytest.fixture
async def scene(world: World) -> Scene:
    return await Scene(world).build()


async def test_a_full_consent_releases_every_contact_field(scene: Scene) -> None:
    contact = await scene.partner.contact(scene.appointment_id, await scene.token())

    assert contact.appointment_id == scene.appointment_id
    assert contact.patient.given_name == scene.patient.given_name
    assert contact.patient.family_name == scene.patient.family_name
    assert contact.patient.sex == scene.patient.sex
    assert contact.patient.phone == scene.patient.phone
    assert contact.patient.email == scene.patient.email
    assert list(contact.withheld_fields) == []


async def test_an_email_only_consent_releases_only_the_email(scene: Scene) -> None:
    contact = await scene.partner.contact(scene.appointment_id, await scene.token([CONTACT_FIELD_EMAIL]))

    assert contact.patient.email == scene.patient.email
    for withheld in ("given_name", "family_name", "sex", "phone"):
        assert not contact.patient.HasField(withheld)
    assert list(contact.withheld_fields) == [CONTACT_FIELD_NAME, CONTACT_FIELD_SEX, CONTACT_FIELD_PHONE]
    assert scene.patient.phone.encode() not in contact.SerializeToString()


async def test_no_token_is_consent_required(scene: Scene) -> None:
    error = await _denied(scene.partner.contact(scene.appointment_id, ""), "CONSENT_REQUIRED")

    assert scene.patient.email not in str(harness.status_of(error))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "v4.public.garbage",
        lambda t: t[:-5] + ("AAAAA" if not t.endswith("AAAAA") else "BBBBB"),
        lambda t: t.replace("v4.public.", "v4.local.", 1),
        lambda t: t[: len(t) // 2],
        lambda t: "x" * 5000,
    ],
)
async def test_malformed_or_tampered_tokens_are_consent_invalid(scene: Scene, mangle: Callable[[str], str]) -> None:
    token = await scene.token()

    await _denied(scene.partner.contact(scene.appointment_id, mangle(token)), "CONSENT_INVALID")


async def test_an_expired_token_is_consent_expired(scene: Scene) -> None:
    # Long enough for the first use to come before the expiry even on a busy machine.
    consent = await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, ALL, ttl=3)
    await scene.partner.contact(scene.appointment_id, consent.token)

    # Then wait until the expiry has passed, by the clock the server compares it with.
    expires = consent.expire_time.ToDatetime(tzinfo=UTC)
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    assert datetime.now(UTC) > expires

    await _denied(scene.partner.contact(scene.appointment_id, consent.token), "CONSENT_EXPIRED")


async def test_a_revoked_consent_is_refused_on_the_next_use(scene: Scene) -> None:
    consent = await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, ALL)
    await scene.partner.contact(scene.appointment_id, consent.token)

    await scene.world.consents.RevokeConsent(
        harness.consent_pb.RevokeConsentRequest(consent_id=consent.consent_id), metadata=scene.world.internal_metadata
    )

    await _denied(scene.partner.contact(scene.appointment_id, consent.token), "CONSENT_REVOKED")


async def test_a_token_issued_to_another_partner_is_invalid(scene: Scene) -> None:
    other = await scene.world.partner("Agenda B", scene.practitioner)
    their_token = await scene.token(partner=other)

    await _denied(scene.partner.contact(scene.appointment_id, their_token), "CONSENT_INVALID")


async def test_a_token_for_another_patient_is_invalid(scene: Scene) -> None:
    other_patient = await scene.world.patient()
    token = (await scene.world.consent(other_patient.patient_id, scene.partner.partner_id, ALL)).token

    await _denied(scene.partner.contact(scene.appointment_id, token), "CONSENT_INVALID")


async def test_an_appointment_the_partner_cannot_see_is_not_found_even_with_a_valid_token(scene: Scene) -> None:
    token = await scene.token()
    await scene.world.revoke_grant(scene.partner.partner_id, scene.practitioner)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scene.partner.contact(scene.appointment_id, token)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_consent_keys_are_published_to_partners_without_secrets(scene: Scene, keyring: ConsentKeyring) -> None:
    reply = await scene.partner.stub.ListConsentKeys(
        harness.partner_pb.ListConsentKeysRequest(), metadata=scene.partner.metadata
    )

    [key] = reply.keys
    assert key.key_id == keyring.active_key_id and key.active
    assert key.public_key.startswith("k4.public.")
    assert "secret" not in str(reply)


@pytest.mark.parametrize(
    ("fields", "ttl", "purpose", "bad"),
    [
        ([], 60, "reminders", "fields"),
        ([CONTACT_FIELD_UNSPECIFIED], 60, "reminders", "fields[0]"),
        ([CONTACT_FIELD_EMAIL, CONTACT_FIELD_EMAIL], 60, "reminders", "fields[1]"),
        ([CONTACT_FIELD_EMAIL], 0.5, "reminders", "ttl"),
        ([CONTACT_FIELD_EMAIL], 366 * 86400, "reminders", "ttl"),
        ([CONTACT_FIELD_EMAIL], 60, "", "purpose"),
    ],
)
async def test_bad_consent_grants_are_invalid_argument(
    scene: Scene, fields: list[int], ttl: float, purpose: str, bad: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, fields, ttl, purpose)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.bad_fields(caught.value) == {bad}


async def test_a_consent_for_an_unknown_patient_is_not_found(scene: Scene) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scene.world.consent("00000000-0000-4000-8000-00000000000a", scene.partner.partner_id, ALL)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_consent_expires_exactly_ttl_after_it_was_granted(scene: Scene) -> None:
    consent = await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, ALL, ttl=90.25)

    lifetime = consent.expire_time.ToDatetime() - consent.create_time.ToDatetime()
    assert lifetime.total_seconds() == 90.25


async def test_list_consents_is_newest_first_without_tokens_and_revoking_twice_fails(scene: Scene) -> None:
    first = await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, [CONTACT_FIELD_EMAIL])
    second = await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, [CONTACT_FIELD_PHONE])
    revoke = harness.consent_pb.RevokeConsentRequest(consent_id=first.consent_id)
    meta = scene.world.internal_metadata
    revoked = await scene.world.consents.RevokeConsent(revoke, metadata=meta)

    listed = await scene.world.consents.ListConsents(
        harness.consent_pb.ListConsentsRequest(patient_id=scene.patient.patient_id), metadata=meta
    )

    assert [c.consent_id for c in listed.consents] == [second.consent_id, first.consent_id]
    assert all(c.token == "" for c in listed.consents)
    assert revoked.HasField("revoke_time") and listed.consents[1].HasField("revoke_time")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scene.world.consents.RevokeConsent(revoke, metadata=meta)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@asynccontextmanager
async def _running(
    settings: Settings, database: Database, keyring: ConsentKeyring, secret: bytes, data_keys: DataKeyring
) -> AsyncIterator[World]:
    gateway = Gateway(replace(settings), database, Secrets(secret, keyring, data_keys))
    async with harness.serving(gateway) as world:
        yield world


async def test_signing_key_rotation_keeps_old_tokens_until_the_key_is_retired(
    settings: Settings, database: Database, data_keys: DataKeyring
) -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    secret = os.urandom(32)
    async with _running(settings, database, ConsentKeyring([old]), secret, data_keys) as world:
        scene = await Scene(world).build()
        old_token = await scene.token()

    async with _running(settings, database, ConsentKeyring([new, old.public_only()]), secret, data_keys) as world:
        scene.world, scene.partner.stub = (
            world,
            harness.partner_grpc.PartnerAppointmentServiceStub(world.partner_channel),
        )
        assert (await scene.partner.contact(scene.appointment_id, old_token)).patient.email == scene.patient.email
        new_token = await scene.token()
        assert new_token != old_token

    async with _running(settings, database, ConsentKeyring([new]), secret, data_keys) as world:
        scene.world, scene.partner.stub = (
            world,
            harness.partner_grpc.PartnerAppointmentServiceStub(world.partner_channel),
        )
        await _denied(scene.partner.contact(scene.appointment_id, old_token), "CONSENT_INVALID")
        assert (await scene.partner.contact(scene.appointment_id, new_token)).patient.email == scene.patient.email


async def test_one_statement_answers_each_contact_of_a_group_and_records_only_the_live_ones(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patients = [await world.patient() for _ in range(3)]
    booked = [await world.appointment(practitioner, p.patient_id) for p in patients]
    first = await world.partner("Agenda A", practitioner)
    second = await world.partner("Agenda B", practitioner)
    email_only = await world.consent(patients[0].patient_id, first.partner_id, [CONTACT_FIELD_EMAIL])
    everything = await world.consent(patients[1].patient_id, second.partner_id, ALL)
    revoked = await world.consent(patients[2].patient_id, first.partner_id, ALL)
    await world.consents.RevokeConsent(
        harness.consent_pb.RevokeConsentRequest(consent_id=revoked.consent_id), metadata=world.internal_metadata
    )

    def request(partner: PartnerHandle, consent: Any, n: int, token_fields: list[int]) -> ledger.ContactRequest:
        entry = models.LedgerEntry(
            harness.uuid_of(partner.partner_id),
            partner.key_id,
            "/appointments.partner.v1.PartnerAppointmentService/GetAppointmentContact",
            "",
            models.View.CONTACT,
            consent_id=harness.uuid_of(consent.consent_id),
        )
        return ledger.ContactRequest(
            entry,
            f"shown-{n}",
            harness.uuid_of(booked[n].appointment_id),
            harness.uuid_of(patients[n].patient_id),
            token_fields,
        )

    def terms(contact_cap: int) -> models.ChargeTerms:
        return models.ChargeTerms(contact_cap, 1000, anomaly_factor=1000.0, anomaly_min=10**6, suspend_on_anomaly=False)

    group = [
        request(first, email_only, 0, [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]),  # the token names more
        request(second, everything, 1, [CONTACT_FIELD_EMAIL, CONTACT_FIELD_NAME]),  # the consent covers more
        request(first, revoked, 2, ALL),
    ]
    both = {harness.uuid_of(first.partner_id): terms(10), harness.uuid_of(second.partner_id): terms(10)}
    conn = await asyncpg.connect(database_dsn)
    try:
        answers = await ledger.disclose_contacts(conn, group, both)
        # Over the first partner's cap now (one contact used, cap 1): the whole group is refused.
        with pytest.raises(ledger.CapReached) as over:
            await ledger.disclose_contacts(conn, group, {**both, harness.uuid_of(first.partner_id): terms(1)})
        # A new patient for the second partner, under terms that suspend at the first one: nothing is sent.
        again = await world.consent(patients[0].patient_id, second.partner_id, ALL)
        suspending = replace(terms(10), anomaly_factor=0.0, anomaly_min=1, suspend_on_anomaly=True)
        withheld = await ledger.disclose_contacts(
            conn,
            [request(second, again, 0, ALL), request(second, everything, 1, ALL)],
            {harness.uuid_of(second.partner_id): suspending},
        )
    finally:
        await conn.close()

    email, name_and_email, refused = answers
    assert (email.consent, email.charge, email.fields) == ("live", "ok", (CONTACT_FIELD_EMAIL,))
    assert isinstance(email.email, bytes) and email.phone is None and email.given_name is None
    assert (name_and_email.consent, name_and_email.charge) == ("live", "ok")
    assert name_and_email.fields == (CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL)
    assert isinstance(name_and_email.given_name, bytes) and isinstance(name_and_email.email, bytes)
    assert name_and_email.phone is None and name_and_email.sex is None
    assert (refused.consent, refused.charge, refused.fields) == ("revoked", None, tuple(ALL))
    assert (refused.given_name, refused.sex, refused.phone, refused.email) == (None, None, None, None)
    assert (over.value.partner_id, over.value.cap) == (harness.uuid_of(first.partner_id), "contact_cap")
    assert [(w.consent, w.charge, w.fields, w.given_name, w.sex, w.phone, w.email) for w in withheld] == [
        ("live", "suspended", (), None, None, None, None)
    ] * 2
    released = [
        (first, email_only, [CONTACT_FIELD_EMAIL]),
        (second, everything, [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL]),
    ]
    for partner, consent, fields in released:
        recorded = [r for r in await world.disclosures(partner_id=partner.partner_id) if r.view == models.View.CONTACT]
        assert [(r.consent_id, list(r.contact_fields)) for r in recorded] == [(consent.consent_id, fields)]
    usage = await world.registry.GetPartnerUsage(
        harness.registry_pb.GetPartnerUsageRequest(partner_id=first.partner_id), metadata=world.internal_metadata
    )
    assert usage.contact_disclosures == 1  # the refused group counted nothing


def _claims(token: str) -> dict[str, Any]:
    """The payload of a v4.public token, as anyone holding it can read it (it is signed, not encrypted)."""
    body = token.split(".")[2]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))[:-64]))


async def test_a_token_names_the_patient_and_consent_as_its_partner_knows_them_and_links_nothing(
    scene: Scene,
) -> None:
    other = await scene.world.partner("Agenda B", scene.practitioner)
    [listed_by_other] = await other.list_all()
    [listed] = await scene.partner.list_all()
    mine = await scene.world.consent(scene.patient.patient_id, scene.partner.partner_id, ALL, 3600)
    theirs = await scene.world.consent(scene.patient.patient_id, other.partner_id, ALL, 3600)
    claims, other_claims = _claims(mine.token), _claims(theirs.token)

    # The partner can match the token to the appointments it lists, and to nothing else.
    assert claims["sub"] == listed.patient_ref and other_claims["sub"] == listed_by_other.patient_ref
    assert claims["jti"].startswith("cns_")
    internal = {scene.patient.patient_id, mine.consent_id, theirs.consent_id, other.partner_id}
    assert not internal & {str(value) for value in claims.values()}
    shared = {k for k in claims if k != "iss" and claims[k] == other_claims[k]}
    assert shared <= {"fields", "purpose"}  # what both were granted, never an identifier
    assert claims["sub"] != other_claims["sub"] and claims["jti"] != other_claims["jti"]
    # And it still releases the contact details, to its partner only.
    assert (await scene.partner.contact(scene.appointment_id, mine.token)).patient.email == scene.patient.email
    await _denied(other.contact(listed_by_other.appointment_id, mine.token), "CONSENT_INVALID")
