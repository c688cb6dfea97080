"""A partner's lifecycle over the internal API: partners listed and shown, keys listed, keys that lapse."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import partner_registry_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as partner_pb
from harness import MONDAY, PartnerHandle, World, registry_pb, ts

ACTIVE = partner_registry_pb2.PARTNER_KEY_STATE_ACTIVE
EXPIRED = partner_registry_pb2.PARTNER_KEY_STATE_EXPIRED
REVOKED = partner_registry_pb2.PARTNER_KEY_STATE_REVOKED
UNKNOWN_PARTNER = "00000000-0000-4000-8000-00000000fe11"


async def _fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def _keys(world: World, partner_id: str, page_size: int = 0, page_token: str = "") -> Any:
    return await world.registry.ListPartnerKeys(
        registry_pb.ListPartnerKeysRequest(partner_id=partner_id, page_size=page_size, page_token=page_token),
        metadata=world.internal_metadata,
    )


async def _issue(world: World, partner_id: str, expire_time: datetime | None = None) -> Any:
    request = registry_pb.IssuePartnerKeyRequest(partner_id=partner_id)
    if expire_time is not None:
        request.expire_time.CopyFrom(ts(expire_time))
    return await world.registry.IssuePartnerKey(request, metadata=world.internal_metadata)


async def _lapse(database_dsn: str, key_id: str) -> None:
    """Make a key reach its expire time now, as the database owner can: the clock passing, without the wait."""
    conn = await asyncpg.connect(database_dsn)
    try:
        assert await conn.execute("UPDATE partner_keys SET expire_time = clock_timestamp() WHERE id = $1", key_id) == (
            "UPDATE 1"
        )
    finally:
        await conn.close()


def _with_key(partner: PartnerHandle, key: Any) -> PartnerHandle:
    return PartnerHandle(partner.partner_id, key.key_id, key.secret, partner.stub)


async def test_partners_are_listed_in_creation_order_page_by_page(world: World) -> None:
    created = [await world.registry.CreatePartner(
        registry_pb.CreatePartnerRequest(display_name=f"Agenda Lifecycle {n}"), metadata=world.internal_metadata
    ) for n in range(5)]  # fmt: skip

    pages, token = [], ""
    while True:
        page = await world.registry.ListPartners(
            registry_pb.ListPartnersRequest(page_size=2, page_token=token), metadata=world.internal_metadata
        )
        pages.append(page.partners)
        token = page.next_page_token
        if not token:
            break

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [p for page in pages for p in page] == created
    whole = await world.registry.ListPartners(registry_pb.ListPartnersRequest(), metadata=world.internal_metadata)
    assert list(whole.partners) == created and whole.next_page_token == ""


async def test_list_partners_refuses_a_negative_size_and_a_token_of_another_query(world: World) -> None:
    partner = await world.partner("Agenda A")
    await _issue(world, partner.partner_id)
    keys_token = (await _keys(world, partner.partner_id, page_size=1)).next_page_token
    assert keys_token

    negative = world.registry.ListPartners(
        registry_pb.ListPartnersRequest(page_size=-1), metadata=world.internal_metadata
    )
    foreign = world.registry.ListPartners(
        registry_pb.ListPartnersRequest(page_token=keys_token), metadata=world.internal_metadata
    )

    assert harness.bad_fields(await _fails(negative, grpc.StatusCode.INVALID_ARGUMENT)) == {"page_size"}
    assert harness.bad_fields(await _fails(foreign, grpc.StatusCode.INVALID_ARGUMENT)) == {"page_token"}


async def test_get_partner_answers_the_partner_and_not_found_for_an_unknown_one(world: World) -> None:
    created = await world.registry.CreatePartner(
        registry_pb.CreatePartnerRequest(display_name="Agenda Shown"), metadata=world.internal_metadata
    )

    shown = await world.registry.GetPartner(
        registry_pb.GetPartnerRequest(partner_id=created.partner_id), metadata=world.internal_metadata
    )
    unknown = world.registry.GetPartner(
        registry_pb.GetPartnerRequest(partner_id=UNKNOWN_PARTNER), metadata=world.internal_metadata
    )
    malformed = world.registry.GetPartner(
        registry_pb.GetPartnerRequest(partner_id="agenda-shown"), metadata=world.internal_metadata
    )

    assert shown == created
    await _fails(unknown, grpc.StatusCode.NOT_FOUND)
    assert harness.bad_fields(await _fails(malformed, grpc.StatusCode.INVALID_ARGUMENT)) == {"partner_id"}


async def test_list_partner_keys_shows_times_and_states_and_never_a_secret_or_hash(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Agenda Keys", practitioner)
    lapsing = await _issue(world, partner.partner_id, datetime.now(UTC) + timedelta(days=30))
    revoked = await _issue(world, partner.partner_id)
    lapsed = await _issue(world, partner.partner_id, datetime.now(UTC) + timedelta(days=1))
    await world.revoke_key(revoked.key_id)
    await _lapse(database_dsn, lapsed.key_id)
    await partner.list()  # a disclosure made with the first key: its last use

    pages, token = [], ""
    while True:
        page = await _keys(world, partner.partner_id, page_size=3, page_token=token)
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    keys = [key for page in pages for key in page.keys]
    recorded = await world.disclosures(partner_id=partner.partner_id)

    assert [len(page.keys) for page in pages] == [3, 1]
    assert [key.key_id for key in keys] == [partner.key_id, lapsing.key_id, revoked.key_id, lapsed.key_id]
    assert [key.state for key in keys] == [ACTIVE, ACTIVE, REVOKED, EXPIRED]
    assert keys[0].last_use_time == recorded[-1].disclose_time
    assert [key.HasField("last_use_time") for key in keys] == [True, False, False, False]
    assert keys[1].expire_time == lapsing.expire_time and not keys[0].HasField("expire_time")
    assert keys[2].HasField("revoke_time") and not keys[1].HasField("revoke_time")
    secrets = [partner.secret, lapsing.secret, revoked.secret, lapsed.secret]
    wire = b"".join(page.SerializeToString() for page in pages)
    for secret in secrets:
        digest = hashlib.sha256(secret.encode()).digest()
        assert secret.split(".", 1)[1].encode() not in wire
        assert digest not in wire and digest.hex().encode() not in wire
    assert all(key.secret == "" for key in keys)


async def test_list_partner_keys_of_an_unknown_partner_is_not_found_and_of_a_keyless_one_empty(world: World) -> None:
    keyless = await world.registry.CreatePartner(
        registry_pb.CreatePartnerRequest(display_name="Agenda Keyless"), metadata=world.internal_metadata
    )

    empty = await _keys(world, keyless.partner_id)

    assert list(empty.keys) == [] and empty.next_page_token == ""
    await _fails(_keys(world, UNKNOWN_PARTNER), grpc.StatusCode.NOT_FOUND)
    assert harness.bad_fields(await _fails(_keys(world, "x"), grpc.StatusCode.INVALID_ARGUMENT)) == {"partner_id"}


async def test_a_keys_page_token_is_bound_to_its_partner(world: World) -> None:
    first, second = await world.partner("Agenda One"), await world.partner("Agenda Two")
    await _issue(world, first.partner_id)
    token = (await _keys(world, first.partner_id, page_size=1)).next_page_token

    error = await _fails(_keys(world, second.partner_id, page_token=token), grpc.StatusCode.INVALID_ARGUMENT)

    assert harness.bad_fields(error) == {"page_token"}


async def test_an_expire_time_in_the_past_is_invalid_and_one_in_the_future_is_kept(world: World) -> None:
    partner = await world.partner("Agenda Expiring")
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=90)

    error = await _fails(_issue(world, partner.partner_id, datetime.now(UTC) - timedelta(seconds=1)),
                         grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    issued = await _issue(world, partner.partner_id, later)

    assert harness.bad_fields(error) == {"expire_time"}
    assert issued.expire_time == ts(later) and issued.state == ACTIVE and issued.secret
    listed = [key.key_id for key in (await _keys(world, partner.partner_id)).keys]
    assert listed == [partner.key_id, issued.key_id]  # the refused one was never stored


async def test_an_expired_key_is_refused_everywhere_exactly_as_an_unknown_or_revoked_one(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Agenda Rotating", practitioner)
    old = _with_key(partner, await _issue(world, partner.partner_id, datetime.now(UTC) + timedelta(days=1)))
    revoked = _with_key(partner, await _issue(world, partner.partner_id))
    await world.revoke_key(revoked.key_id)
    unknown = PartnerHandle(partner.partner_id, "pk_" + "a" * 16, "pk_" + "a" * 16 + "." + "b" * 43, partner.stub)
    seen = (await old.list()).appointments[0].appointment_id  # the gateway now knows the key verified
    consent_keys = partner_pb.ListConsentKeysRequest()

    await _lapse(database_dsn, old.key_id)

    refusals = [
        await _fails(old.list(), grpc.StatusCode.UNAUTHENTICATED),
        await _fails(old.get(seen), grpc.StatusCode.UNAUTHENTICATED),
        await _fails(old.stub.ListConsentKeys(consent_keys, metadata=old.metadata), grpc.StatusCode.UNAUTHENTICATED),
        await _fails(revoked.list(), grpc.StatusCode.UNAUTHENTICATED),
        await _fails(unknown.list(), grpc.StatusCode.UNAUTHENTICATED),
    ]
    assert len({harness.status_of(error).SerializeToString() for error in refusals}) == 1
    assert (await partner.get(seen)).appointment_id == seen  # the partner's other key goes on


async def test_a_key_lapses_by_itself_at_its_expire_time(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Agenda Lapsing", practitioner)
    expire = datetime.now(UTC) + timedelta(seconds=3)
    lapsing = _with_key(partner, await _issue(world, partner.partner_id, expire))
    assert len((await lapsing.list()).appointments) == 1

    codes: list[grpc.StatusCode] = []

    async def refused() -> bool:
        try:
            await lapsing.list()
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
            return True
        return False

    assert await harness.eventually(refused, within=30, interval=0.25)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED]
    assert datetime.now(UTC) >= expire  # refused because its time came, not before
    states = {key.key_id: key.state for key in (await _keys(world, partner.partner_id)).keys}
    assert states == {partner.key_id: ACTIVE, lapsing.key_id: EXPIRED}


async def test_a_stream_opened_with_a_key_that_expires_ends_unauthenticated_before_its_next_change(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Agenda Streaming", practitioner)
    lapsing = _with_key(partner, await _issue(world, partner.partner_id, datetime.now(UTC) + timedelta(days=1)))
    stream = lapsing.stub.WatchAppointments(partner_pb.WatchAppointmentsRequest(), metadata=lapsing.metadata)
    await asyncio.wait_for(stream.initial_metadata(), timeout=10)

    await _lapse(database_dsn, lapsing.key_id)
    await world.appointment(practitioner, patient.patient_id, MONDAY)

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # a change read instead fails the test
        await asyncio.wait_for(stream.read(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
