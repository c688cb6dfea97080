"""Consent requests: a partner asks, the patient app answers, the partner learns of it and reads what was released."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import audit_service_pb2 as audit_pb
from appointments.internal.v1 import consent_pb2
from appointments.internal.v1 import consent_service_pb2 as consent_pb
from appointments.internal.v1.audit_pb2 import DISCLOSURE_OUTCOME_DENIED
from appointments.partner.v1 import consent_request_pb2 as request_pb
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from appointments.type.v1.contact_pb2 import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_NAME,
    CONTACT_FIELD_PHONE,
)
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from harness import PartnerHandle, World

from service import models
from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

READ_TIMEOUT = 10
PURPOSE = "LEAKCHECK-PURPOSE reminders by text message"
MESSAGE = "LEAKCHECK-MESSAGE we would like to text you the day before"


def _duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


async def _ask(
    partner: PartnerHandle, appointment_id: str, fields: list[int], ttl: float = 86400, purpose: str = PURPOSE
) -> request_pb.ConsentRequest:
    return await partner.stub.RequestContactAccess(  # type: ignore[no-any-return]
        pb.RequestContactAccessRequest(
            appointment_id=appointment_id, fields=fields, purpose=purpose, message=MESSAGE, ttl=_duration(ttl)
        ),
        metadata=partner.metadata,
    )


async def _get(partner: PartnerHandle, request_id: str) -> request_pb.ConsentRequest:
    return await partner.stub.GetConsentRequest(  # type: ignore[no-any-return]
        pb.GetConsentRequestRequest(consent_request_id=request_id), metadata=partner.metadata
    )


async def _cancel(partner: PartnerHandle, request_id: str) -> request_pb.ConsentRequest:
    return await partner.stub.CancelConsentRequest(  # type: ignore[no-any-return]
        pb.CancelConsentRequestRequest(consent_request_id=request_id), metadata=partner.metadata
    )


def _watch(partner: PartnerHandle, resume_token: str = "") -> Any:
    return partner.stub.WatchConsentRequests(
        pb.WatchConsentRequestsRequest(resume_token=resume_token), metadata=partner.metadata
    )


async def _next(stream: Any) -> request_pb.ConsentRequestEvent:
    event = await asyncio.wait_for(stream.read(), timeout=READ_TIMEOUT)
    assert event is not grpc.aio.EOF
    return event  # type: ignore[no-any-return]


async def _listed(world: World, patient_id: str, *states: int) -> list[consent_pb2.PatientConsentRequest]:
    reply = await world.consents.ListConsentRequests(
        consent_pb.ListConsentRequestsRequest(patient_id=patient_id, states=list(states)),
        metadata=world.internal_metadata,
    )
    return list(reply.consent_requests)


async def _approve(world: World, request_id: str, fields: list[int] | None = None, ttl: float | None = None) -> Any:
    request = consent_pb.ApproveConsentRequestRequest(consent_request_id=request_id, fields=fields or [])
    if ttl is not None:
        request.ttl.CopyFrom(_duration(ttl))
    return await world.consents.ApproveConsentRequest(request, metadata=world.internal_metadata)


async def _deny(world: World, request_id: str) -> Any:
    return await world.consents.DenyConsentRequest(
        consent_pb.DenyConsentRequestRequest(consent_request_id=request_id), metadata=world.internal_metadata
    )


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


class Scene:
    """A practitioner granting partner A, a patient with one appointment A lists."""

    world: World
    partner: PartnerHandle
    patient_id: str
    appointment_id: str

    @classmethod
    async def build(cls, world: World) -> Scene:
        scene = cls()
        scene.world = world
        practitioner = await world.practitioner("Dr. Request", "Dermatology")
        patient = await world.patient()
        scene.patient_id = patient.patient_id
        scene.partner = await world.partner("Agenda Requests", practitioner)
        await world.appointment(practitioner, patient.patient_id)
        [listed] = await scene.partner.list_all()
        scene.appointment_id = listed.appointment_id
        return scene


async def test_a_partner_asks_the_patient_approves_narrower_and_the_partner_reads_only_that(world: World) -> None:
    scene = await Scene.build(world)
    stream = _watch(scene.partner)
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)

    asked = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL], ttl=86400)
    made = await _next(stream)
    [shown] = await _listed(world, scene.patient_id)
    approved = await _approve(world, shown.consent_request_id, [CONTACT_FIELD_PHONE], ttl=3600)
    decided = await _next(stream)
    fetched = await _get(scene.partner, asked.consent_request_id)
    contact = await scene.partner.contact(scene.appointment_id, fetched.consent_token)
    consent_id = approved.consent_id
    await world.consents.RevokeConsent(
        consent_pb.RevokeConsentRequest(consent_id=consent_id), metadata=world.internal_metadata
    )
    revoked_event = await _next(stream)
    refused = await _refused(scene.partner.contact(scene.appointment_id, fetched.consent_token))
    after = await _get(scene.partner, asked.consent_request_id)
    stream.cancel()

    assert asked.consent_request_id.startswith("crq_") and asked.state == request_pb.CONSENT_REQUEST_STATE_PENDING
    assert asked.appointment_id == scene.appointment_id and asked.purpose == PURPOSE and not asked.consent_token
    assert made.consent_request.consent_request_id == asked.consent_request_id
    assert made.consent_request.state == request_pb.CONSENT_REQUEST_STATE_PENDING
    assert shown.partner_display_name == "Agenda Requests" and shown.practitioner_specialty == "Dermatology"
    assert shown.purpose == PURPOSE and shown.message == MESSAGE
    assert list(shown.fields) == [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]
    assert approved.state == consent_pb2.CONSENT_REQUEST_STATE_APPROVED and approved.consent_id
    assert decided.consent_request.state == request_pb.CONSENT_REQUEST_STATE_APPROVED
    assert list(decided.consent_request.granted_fields) == [CONTACT_FIELD_PHONE]
    assert decided.consent_request.consent_token == fetched.consent_token
    lasts = fetched.consent_expire_time.ToDatetime(UTC) - fetched.decide_time.ToDatetime(UTC)
    assert abs(lasts - timedelta(hours=1)) < timedelta(seconds=1)
    assert contact.patient.HasField("phone") and not contact.patient.HasField("email")
    assert CONTACT_FIELD_EMAIL in contact.withheld_fields
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert harness.error_info(refused).reason == "CONSENT_REVOKED"
    assert revoked_event.consent_request.HasField("consent_revoke_time")
    assert not revoked_event.consent_request.consent_token
    assert after.state == request_pb.CONSENT_REQUEST_STATE_APPROVED and after.HasField("consent_revoke_time")
    assert not after.consent_token


async def test_not_yours_answers_like_nothing_and_another_partner_sees_nothing(world: World) -> None:
    scene = await Scene.build(world)
    other_practitioner = await world.practitioner()
    other = await world.partner("Other Agenda", other_practitioner)
    stranger = await world.partner("Stranger Agenda")
    stream = _watch(other)
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)

    asked = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE])
    probe = await _refused(_ask(stranger, scene.appointment_id, [CONTACT_FIELD_PHONE]))
    forged = scene.appointment_id[:-2] + ("aa" if not scene.appointment_id.endswith("aa") else "ba")
    missing = await _refused(_ask(stranger, forged, [CONTACT_FIELD_PHONE]))
    foreign = await _refused(_get(other, asked.consent_request_id))
    foreign_cancel = await _refused(_cancel(other, asked.consent_request_id))
    # The other partner's own event comes first on its stream: nothing of the first partner's came before it.
    other_patient = await world.patient()
    await world.appointment(other_practitioner, other_patient.patient_id)
    [mine] = await other.list_all()
    own = await _ask(other, mine.appointment_id, [CONTACT_FIELD_EMAIL])
    first_seen = await _next(stream)
    stream.cancel()

    assert probe.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert probe.details() == missing.details()
    assert harness.status_of(probe) == harness.status_of(missing)
    assert foreign.code() == foreign_cancel.code() == grpc.StatusCode.NOT_FOUND
    assert first_seen.consent_request.consent_request_id == own.consent_request_id
    assert (await _get(scene.partner, asked.consent_request_id)).state == request_pb.CONSENT_REQUEST_STATE_PENDING


async def test_a_second_pending_request_for_the_same_fields_already_exists(world: World) -> None:
    scene = await Scene.build(world)

    first = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE])
    again = await _refused(_ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]))
    other_fields = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_NAME])

    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    assert harness.error_info(again).metadata["consent_request_id"] == first.consent_request_id
    assert other_fields.state == request_pb.CONSENT_REQUEST_STATE_PENDING


async def test_only_narrowing_is_accepted_and_a_settled_request_takes_no_decision(world: World) -> None:
    scene = await Scene.build(world)
    asked = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE], ttl=600)
    [shown] = await _listed(world, scene.patient_id)

    wider = await _refused(_approve(world, shown.consent_request_id, [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]))
    longer = await _refused(_approve(world, shown.consent_request_id, ttl=601))
    still = await _get(scene.partner, asked.consent_request_id)
    denied = await _deny(world, shown.consent_request_id)
    approve_after = await _refused(_approve(world, shown.consent_request_id))
    deny_after = await _refused(_deny(world, shown.consent_request_id))
    cancel_after = await _refused(_cancel(scene.partner, asked.consent_request_id))
    seen = await _get(scene.partner, asked.consent_request_id)

    assert wider.code() == longer.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.bad_fields(wider) == {"fields"} and harness.bad_fields(longer) == {"ttl"}
    assert still.state == request_pb.CONSENT_REQUEST_STATE_PENDING
    assert denied.state == consent_pb2.CONSENT_REQUEST_STATE_DENIED
    for error in (approve_after, deny_after, cancel_after):
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert seen.state == request_pb.CONSENT_REQUEST_STATE_DENIED and not seen.consent_token


async def test_a_cancelled_request_cannot_be_approved(world: World) -> None:
    scene = await Scene.build(world)
    asked = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE])

    cancelled = await _cancel(scene.partner, asked.consent_request_id)
    [shown] = await _listed(world, scene.patient_id, consent_pb2.CONSENT_REQUEST_STATE_CANCELLED)
    refused = await _refused(_approve(world, shown.consent_request_id))
    pending = await _listed(world, scene.patient_id, consent_pb2.CONSENT_REQUEST_STATE_PENDING)

    assert cancelled.state == request_pb.CONSENT_REQUEST_STATE_CANCELLED and cancelled.HasField("decide_time")
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert pending == []


async def test_three_requests_per_patient_in_thirty_days(world: World) -> None:
    scene = await Scene.build(world)
    for fields in ([CONTACT_FIELD_PHONE], [CONTACT_FIELD_EMAIL], [CONTACT_FIELD_NAME]):
        made = await _ask(scene.partner, scene.appointment_id, fields)
        await _cancel(scene.partner, made.consent_request_id)

    fourth = await _refused(_ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]))

    assert fourth.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert harness.error_info(fourth).reason == "CONSENT_REQUEST_PATIENT_CAP"
    details = harness.status_of(fourth).details
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert any(d.Unpack(quota) for d in details) and quota.violations[0].subject == "patient"
    assert any(d.Unpack(retry) for d in details)
    assert timedelta(days=29) < retry.retry_delay.ToTimedelta() <= timedelta(days=30)


@pytest.fixture
async def two_processes(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[tuple[World, World]]:
    """Two gateways, each with its own pools, over one database, with a daily cap of 3 requests."""
    capped = replace(settings, consent_request_daily_cap=3)
    secret = os.urandom(32)
    pools = [
        await Database.connect(database_dsn, min_size=1, max_size=4, partner_dsn=None, require_partner_login=False)
        for _ in range(2)
    ]
    try:
        async with (
            harness.serving(Gateway(capped, pools[0], Secrets(secret, keyring, data_keys))) as one,
            harness.serving(Gateway(capped, pools[1], Secrets(secret, keyring, data_keys))) as two,
        ):
            yield one, two
    finally:
        for pool in pools:
            await pool.close()


async def test_the_daily_cap_holds_across_processes(two_processes: tuple[World, World]) -> None:
    one, two = two_processes
    practitioner = await one.practitioner()
    partner = await one.partner("Capped Agenda", practitioner)
    patients = [await one.patient() for _ in range(6)]
    for patient in patients:
        await one.appointment(practitioner, patient.patient_id)
    listed = [a.appointment_id for a in await partner.list_all()]
    via_two = replace(partner, stub=harness.partner_grpc.PartnerAppointmentServiceStub(two.partner_channel))

    asks = [_ask(partner if i % 2 else via_two, item, [CONTACT_FIELD_PHONE]) for i, item in enumerate(listed)]
    results = await asyncio.gather(
        *asks,
        return_exceptions=True,
    )

    made = [r for r in results if isinstance(r, request_pb.ConsentRequest)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(made) == 3 and len(refused) == 3
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert harness.error_info(error).reason == "CONSENT_REQUEST_DAILY_CAP"
    records = await one.disclosures(partner_id=partner.partner_id)
    assert sorted(r.outcome for r in records).count(DISCLOSURE_OUTCOME_DENIED) == 3


async def test_requests_and_approvals_are_in_the_ledger_and_the_text_is_sealed_at_rest(
    world: World, database_dsn: str
) -> None:
    scene = await Scene.build(world)
    asked = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE])
    await _refused(_ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE]))
    [shown] = await _listed(world, scene.patient_id)
    approved = await _approve(world, shown.consent_request_id)

    records = await world.disclosures(partner_id=scene.partner.partner_id)
    now = datetime.now(UTC)
    report = await world.audit.BreachReport(
        audit_pb.BreachReportRequest(
            partner_id=scene.partner.partner_id,
            start_time=harness.ts(now - timedelta(hours=1)),
            end_time=harness.ts(now + timedelta(hours=1)),
        ),
        metadata=world.internal_metadata,
    )
    conn = await asyncpg.connect(database_dsn)
    try:
        dumped = await conn.fetchval("SELECT string_agg(t::text, ' ') FROM consent_requests t")
        as_partner_role = await conn.fetchval(
            "SELECT has_function_privilege('apptgate_partner', 'request_contact_access(uuid, uuid, text, uuid, uuid, "
            "text, smallint[], bytea, bytea, interval, interval, integer, integer, interval, text, text, text)', "
            "'EXECUTE')"
        )
    finally:
        await conn.close()

    methods = ("RequestContactAccess", "ApproveConsentRequest")
    by_outcome = {int(r.outcome): r for r in records if r.rpc.endswith(methods)}
    requested = by_outcome[int(models.Outcome.REQUESTED)]
    granted = by_outcome[int(models.Outcome.CONSENT_GRANTED)]
    duplicate = by_outcome[int(models.Outcome.DENIED)]
    assert requested.key_id == scene.partner.key_id and list(requested.contact_fields) == [CONTACT_FIELD_PHONE]
    assert requested.patient_id == scene.patient_id and not requested.consent_id
    assert duplicate.denial_reason == "CONSENT_REQUEST_PENDING"
    assert granted.consent_id == approved.consent_id and granted.key_id == scene.partner.key_id
    assert asked.consent_request_id  # the partner's id, never stored
    [reached] = report.patients  # listed, then asked: the listing is a disclosure, the request counted beside it
    assert reached.patient_id == scene.patient_id and reached.consent_requests == 1
    assert report.totals.consent_request_patients == 1 and not reached.contact_fields
    assert "LEAKCHECK" not in dumped
    assert as_partner_role is False


async def test_a_resumed_stream_replays_each_event_once(world: World) -> None:
    scene = await Scene.build(world)
    stream = _watch(scene.partner)
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)
    first = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE])
    made = await _next(stream)
    stream.cancel()

    await _cancel(scene.partner, first.consent_request_id)
    second = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_EMAIL])
    resumed = _watch(scene.partner, made.resume_token)
    replayed = [await _next(resumed), await _next(resumed)]
    foreign = await _refused(_watch(await world.partner("Foreign"), made.resume_token).read())
    resumed.cancel()

    assert [(e.consent_request.consent_request_id, e.consent_request.state) for e in replayed] == [
        (first.consent_request_id, request_pb.CONSENT_REQUEST_STATE_CANCELLED),
        (second.consent_request_id, request_pb.CONSENT_REQUEST_STATE_PENDING),
    ]
    assert foreign.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def lapsing(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[World]:
    """A gateway whose consent requests lapse after one second."""
    gateway = Gateway(
        replace(settings, consent_request_ttl=timedelta(seconds=1)),
        database,
        Secrets(os.urandom(32), keyring, data_keys),
    )
    async with harness.serving(gateway) as world:
        yield world


async def test_an_unanswered_request_expires_and_the_stream_says_so(lapsing: World) -> None:
    scene = await Scene.build(lapsing)
    stream = _watch(scene.partner)
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)

    asked = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE])
    made = await _next(stream)
    lapsed = await _next(stream)  # the sweep records the lapse once the second is over
    [shown] = await _listed(lapsing, scene.patient_id)
    approve = await _refused(_approve(lapsing, shown.consent_request_id))
    again = await _ask(scene.partner, scene.appointment_id, [CONTACT_FIELD_PHONE])
    stream.cancel()

    assert made.consent_request.state == request_pb.CONSENT_REQUEST_STATE_PENDING
    assert lapsed.consent_request.consent_request_id == asked.consent_request_id
    assert lapsed.consent_request.state == request_pb.CONSENT_REQUEST_STATE_EXPIRED
    assert lapsed.consent_request.decide_time == asked.expire_time
    assert shown.state == consent_pb2.CONSENT_REQUEST_STATE_EXPIRED
    assert approve.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert again.state == request_pb.CONSENT_REQUEST_STATE_PENDING  # a lapsed request is no duplicate
    assert asked.expire_time.ToDatetime(UTC) - asked.create_time.ToDatetime(UTC) == timedelta(seconds=1)
    assert datetime.now(UTC) >= asked.expire_time.ToDatetime(UTC)


async def test_bad_requests_name_every_bad_field(world: World) -> None:
    scene = await Scene.build(world)

    bad = await _refused(
        scene.partner.stub.RequestContactAccess(
            pb.RequestContactAccessRequest(appointment_id="apt_nope\n", fields=[0, 0], purpose="", message="m" * 281),
            metadata=scene.partner.metadata,
        )
    )
    bad_id = await _refused(_get(scene.partner, "crq_x"))

    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.bad_fields(bad) == {"appointment_id", "fields[0]", "fields[1]", "purpose", "message", "ttl"}
    assert bad_id.code() == grpc.StatusCode.INVALID_ARGUMENT and harness.bad_fields(bad_id) == {"consent_request_id"}
