"""The Python client's consent requests (ask, get, cancel, and their resumable feed) against real gateways.

The patient's answer comes through the internal ``ConsentService`` on the
harness's internal channel, as the platform's patient app sends it. Every
test has its own database, so the caps (3 requests per patient in 30 days)
start afresh.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import grpc
import harness
import pytest
from appointments.internal.v1 import consent_pb2 as internal_consent_pb2
from appointments.partner.v1.consent_request_pb2 import (
    CONSENT_REQUEST_STATE_APPROVED,
    CONSENT_REQUEST_STATE_CANCELLED,
    CONSENT_REQUEST_STATE_DENIED,
    CONSENT_REQUEST_STATE_PENDING,
    ConsentRequestEvent,
)
from appointments.type.v1.contact_pb2 import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_NAME,
    CONTACT_FIELD_PHONE,
    CONTACT_FIELD_SEX,
    CONTACT_FIELD_UNSPECIFIED,
)
from apptgate_client import (
    AlreadyExists,
    AsyncConsentRequestWatch,
    AsyncInternalClient,
    AsyncPartnerClient,
    ConsentRequestPending,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PartnerClient,
    QuotaViolation,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from apptgate_client.errors import error_from_status
from client_world import WEEK_END, WEEK_START, Agenda, approve, consent_requests, deny, patient_of_day
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=0.2)
PATIENT = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.2)
HOUR = timedelta(hours=1)
PURPOSE = "appointment reminders by email"


async def appointment_of_day(client: AsyncPartnerClient, day: int) -> str:
    """The partner-scoped id of the agenda's appointment on ``day`` (0 to 6) of the week."""
    week = [a async for a in client.iter_appointments(start_time=WEEK_START, end_time=WEEK_END)]
    assert len(week) == 7
    return week[day].appointment_id


async def event_of(events: AsyncConsentRequestWatch, consent_request_id: str) -> ConsentRequestEvent:
    """The next event of one request; events of others (none are expected) fail the test."""
    async with asyncio.timeout(10):
        async for event in events:
            assert event.consent_request.consent_request_id == consent_request_id, event
            return event
    raise AssertionError("the stream ended")


@pytest.fixture
async def aclient(partner_target: str, agenda: Agenda) -> AsyncIterator[AsyncPartnerClient]:
    async with AsyncPartnerClient(partner_target, agenda.partner.secret, timeout=5) as c:
        yield c


# Asking, and the answer on the feed


async def test_an_approved_request_carries_the_token_that_releases_the_contact(
    aclient: AsyncPartnerClient, agenda: Agenda, world: harness.World
) -> None:
    appointment_id = await appointment_of_day(aclient, 1)
    async with aclient.watch_consent_requests() as events:
        asked = await aclient.request_contact_access(
            appointment_id, [CONTACT_FIELD_EMAIL, CONTACT_FIELD_NAME], PURPOSE, HOUR, "Hello from the clinic app"
        )
        assert asked.consent_request_id.startswith("crq_")
        assert asked.appointment_id == appointment_id
        assert list(asked.fields) == [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL]  # enum order
        assert (asked.purpose, asked.state) == (PURPOSE, CONSENT_REQUEST_STATE_PENDING)
        assert asked.HasField("create_time") and asked.HasField("expire_time")
        assert not asked.consent_token and not asked.HasField("decide_time")

        made = await event_of(events, asked.consent_request_id)
        assert made.consent_request.state == CONSENT_REQUEST_STATE_PENDING
        assert made.resume_token and events.resume_token == made.resume_token

        answer = await approve(world, patient_of_day(agenda, 1), fields=[CONTACT_FIELD_EMAIL])
        assert answer.message == "Hello from the clinic app" and answer.purpose == PURPOSE
        approved = (await event_of(events, asked.consent_request_id)).consent_request

    assert approved.state == CONSENT_REQUEST_STATE_APPROVED
    assert list(approved.granted_fields) == [CONTACT_FIELD_EMAIL]
    assert approved.consent_token and approved.HasField("consent_expire_time") and approved.HasField("decide_time")
    assert await aclient.get_consent_request(asked.consent_request_id) == approved

    contact = await aclient.get_appointment_contact(appointment_id, approved.consent_token)
    assert contact.patient.email.startswith("leakcheck.")
    assert not contact.patient.HasField("given_name")
    assert CONTACT_FIELD_NAME in contact.withheld_fields


async def test_asking_again_while_pending_raises_consent_request_pending_naming_it(
    aclient: AsyncPartnerClient,
) -> None:
    appointment_id = await appointment_of_day(aclient, 2)
    first = await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_PHONE], PURPOSE, HOUR)
    # Another appointment of the same patient, the same fields: the same pending request.
    other_day = await appointment_of_day(aclient, 5)
    with pytest.raises(ConsentRequestPending) as caught:
        await aclient.request_contact_access(other_day, [CONTACT_FIELD_PHONE], "another purpose", 2 * HOUR)
    assert isinstance(caught.value, AlreadyExists)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.reason == "CONSENT_REQUEST_PENDING"
    assert caught.value.consent_request_id == first.consent_request_id
    assert caught.value.attempts == 1


async def test_cancel_ends_a_pending_request_once(aclient: AsyncPartnerClient, agenda: Agenda) -> None:
    appointment_id = await appointment_of_day(aclient, 1)
    asked = await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_NAME], PURPOSE, HOUR)
    cancelled = await aclient.cancel_consent_request(asked.consent_request_id)
    assert cancelled.state == CONSENT_REQUEST_STATE_CANCELLED
    assert cancelled.HasField("decide_time") and not cancelled.consent_token
    with pytest.raises(FailedPrecondition) as again:
        await aclient.cancel_consent_request(asked.consent_request_id)
    assert again.value.reason == "CONSENT_REQUEST_NOT_PENDING"
    assert again.value.attempts == 1
    # No longer pending: the same question may be asked again, as a new request.
    renewed = await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_NAME], PURPOSE, HOUR)
    assert renewed.consent_request_id != asked.consent_request_id


async def test_requests_of_another_partner_and_unknown_appointments_are_not_found(
    aclient: AsyncPartnerClient, partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    asked = await aclient.request_contact_access(
        await appointment_of_day(aclient, 1), [CONTACT_FIELD_SEX], PURPOSE, HOUR
    )
    stranger = await world.partner("Stranger", agenda.practitioner_id)
    async with AsyncPartnerClient(partner_target, stranger.secret) as other:
        with pytest.raises(NotFound):
            await other.get_consent_request(asked.consent_request_id)
        with pytest.raises(NotFound):
            await other.cancel_consent_request(asked.consent_request_id)
    assert (await aclient.get_consent_request(asked.consent_request_id)).state == CONSENT_REQUEST_STATE_PENDING
    with pytest.raises(NotFound):
        await aclient.request_contact_access("apt_" + "a" * 26, [CONTACT_FIELD_NAME], PURPOSE, HOUR)


async def test_malformed_requests_name_their_fields(aclient: AsyncPartnerClient) -> None:
    appointment_id = await appointment_of_day(aclient, 1)
    with pytest.raises(InvalidArgument) as bad:
        await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_UNSPECIFIED], "", HOUR)
    assert any(f.startswith("fields") for f in bad.value.fields)
    assert "purpose" in bad.value.fields
    with pytest.raises(InvalidArgument) as no_id:
        await aclient.get_consent_request("")
    assert no_id.value.fields == ("consent_request_id",)
    with pytest.raises(ValueError, match="ttl"):
        await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_NAME], PURPOSE, 3600)  # type: ignore[arg-type]


async def test_a_patients_fourth_request_in_30_days_raises_resource_exhausted_with_quota_failure(
    aclient: AsyncPartnerClient,
) -> None:
    appointment_id = await appointment_of_day(aclient, 2)
    for field in (CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE):
        await aclient.request_contact_access(appointment_id, [field], PURPOSE, HOUR)
    with pytest.raises(ResourceExhausted) as caught:
        await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_SEX], PURPOSE, HOUR)
    assert caught.value.reason == "CONSENT_REQUEST_PATIENT_CAP"
    assert caught.value.retry_delay is not None and caught.value.retry_delay >= 1.0
    assert [v.subject for v in caught.value.quota_violations] == ["patient"]
    assert caught.value.quota_violations[0].description
    assert caught.value.attempts == 1  # RESOURCE_EXHAUSTED is not retried


def test_typed_errors_of_consent_requests_from_a_status() -> None:
    """The translation alone: ALREADY_EXISTS naming a request, QuotaFailure violations."""

    def status(code: grpc.StatusCode, *details: object) -> status_pb2.Status:
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)  # type: ignore[arg-type]
            packed.append(any_detail)
        return status_pb2.Status(code=code.value[0], message="m", details=packed)

    info = error_details_pb2.ErrorInfo(
        reason="CONSENT_REQUEST_PENDING", domain="apptgate.dev", metadata={"consent_request_id": "crq_x"}
    )
    pending = error_from_status(
        grpc.StatusCode.ALREADY_EXISTS, "m", status(grpc.StatusCode.ALREADY_EXISTS, info), attempts=1
    )
    assert type(pending) is ConsentRequestPending and pending.consent_request_id == "crq_x"
    plain = error_from_status(grpc.StatusCode.ALREADY_EXISTS, "m", None)
    assert type(plain) is AlreadyExists

    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject="partner", description="daily cap")]
    )
    exhausted = error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "m", status(grpc.StatusCode.RESOURCE_EXHAUSTED, quota)
    )
    assert isinstance(exhausted, ResourceExhausted)
    assert exhausted.quota_violations == (QuotaViolation("partner", "daily cap"),)


# The feed


async def test_consent_request_feed_resumes_after_a_stored_token_exactly_once(
    aclient: AsyncPartnerClient, agenda: Agenda, world: harness.World
) -> None:
    async with aclient.watch_consent_requests() as events:
        first = await aclient.request_contact_access(
            await appointment_of_day(aclient, 1), [CONTACT_FIELD_EMAIL], PURPOSE, HOUR
        )
        await event_of(events, first.consent_request_id)
        stored = events.resume_token
    second = await aclient.request_contact_access(
        await appointment_of_day(aclient, 2), [CONTACT_FIELD_NAME], PURPOSE, HOUR
    )
    await deny(world, patient_of_day(agenda, 1))
    await aclient.cancel_consent_request(second.consent_request_id)

    async with aclient.watch_consent_requests(stored) as resumed:
        replayed = [(await asyncio.wait_for(anext(resumed), timeout=10)).consent_request for _ in range(3)]
        assert [(r.consent_request_id, r.state) for r in replayed] == [
            (second.consent_request_id, CONSENT_REQUEST_STATE_PENDING),
            (first.consent_request_id, CONSENT_REQUEST_STATE_DENIED),
            (second.consent_request_id, CONSENT_REQUEST_STATE_CANCELLED),
        ]
        # Then live: nothing else was pending in the replay.
        third = await aclient.request_contact_access(
            await appointment_of_day(aclient, 4), [CONTACT_FIELD_PHONE], PURPOSE, HOUR
        )
        assert (await event_of(resumed, third.consent_request_id)).consent_request.state == (
            CONSENT_REQUEST_STATE_PENDING
        )


async def test_blocking_consent_request_feed_follows_a_denial(
    partner_target: str, aclient: AsyncPartnerClient, agenda: Agenda, world: harness.World
) -> None:
    live = threading.Event()
    seen: list[tuple[str, int]] = []

    def watcher() -> None:  # the blocking client, in a thread: the gateway serves from this test's event loop
        with (
            PartnerClient(partner_target, agenda.partner.secret) as client,
            client.watch_consent_requests() as events,
        ):
            live.set()
            for event in events:
                seen.append((event.consent_request.consent_request_id, event.consent_request.state))
                if event.consent_request.state == CONSENT_REQUEST_STATE_DENIED:
                    return

    thread = threading.Thread(target=watcher)
    thread.start()
    try:
        assert await asyncio.to_thread(live.wait, 10)
        asked = await aclient.request_contact_access(
            await appointment_of_day(aclient, 1), [CONTACT_FIELD_NAME], PURPOSE, HOUR
        )
        await harness.eventually(lambda: bool(seen), within=10)
        await deny(world, patient_of_day(agenda, 1))
    finally:
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert seen == [
        (asked.consent_request_id, CONSENT_REQUEST_STATE_PENDING),
        (asked.consent_request_id, CONSENT_REQUEST_STATE_DENIED),
    ]


async def test_a_revoked_key_ends_the_consent_request_feed_with_unauthenticated(
    partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    async with (
        AsyncPartnerClient(partner_target, agenda.partner.secret, retry=FAST_RETRY) as client,
        client.watch_consent_requests() as events,
    ):
        asked = await client.request_contact_access(
            await appointment_of_day(client, 1), [CONTACT_FIELD_NAME], PURPOSE, HOUR
        )
        await event_of(events, asked.consent_request_id)
        await world.revoke_key(agenda.partner.key_id)
        with pytest.raises(Unauthenticated):
            await asyncio.wait_for(anext(events), timeout=15)


def reopening(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether the client logged a failed attempt to reopen the consent request feed."""
    return any(
        r.name == "apptgate_client"
        and r.getMessage().startswith("WatchConsentRequests:")
        and "reopening in" in r.getMessage()
        for r in caplog.records
    )


async def test_consent_request_feed_resumes_across_a_server_restart_without_gap_or_repeat(
    settings: Settings,
    database: Database,
    keyring: ConsentKeyring,
    data_keys: DataKeyring,
    agenda: Agenda,
    world: harness.World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="apptgate_client")
    port = harness.free_port()
    secrets = Secrets(os.urandom(32), keyring, data_keys)  # the same secret on both: ids and tokens survive
    partner_settings = replace(settings, partner_addr=f"127.0.0.1:{port}", internal_addr="127.0.0.1:0")
    first = Gateway(partner_settings, database, secrets)
    await first.start()
    second: Gateway | None = None
    try:
        async with (
            AsyncPartnerClient(f"127.0.0.1:{port}", agenda.partner.secret, retry=PATIENT) as client,
            client.watch_consent_requests() as events,
        ):
            asked = await client.request_contact_access(
                await appointment_of_day(client, 1), [CONTACT_FIELD_EMAIL], PURPOSE, HOUR
            )
            await event_of(events, asked.consent_request_id)

            await first.stop(1)  # the stream ends with UNAVAILABLE: "resume with the last token"
            await approve(world, patient_of_day(agenda, 1))  # decided while no partner listener runs
            resumed = asyncio.create_task(anext(events))
            assert await harness.eventually(lambda: reopening(caplog) or resumed.done())
            assert not resumed.done()
            second = Gateway(partner_settings, database, secrets)
            await second.start()

            approved = (await asyncio.wait_for(resumed, timeout=15)).consent_request
            assert (approved.consent_request_id, approved.state) == (
                asked.consent_request_id,
                CONSENT_REQUEST_STATE_APPROVED,
            )
            assert approved.consent_token
            later = await client.request_contact_access(
                await appointment_of_day(client, 2), [CONTACT_FIELD_NAME], PURPOSE, HOUR
            )
            assert (await event_of(events, later.consent_request_id)).consent_request.state == (
                CONSENT_REQUEST_STATE_PENDING
            )
    finally:
        if second is not None:
            await second.stop(0)


# Retries: reads only


async def test_contact_requests_and_cancels_are_sent_once_but_gets_and_the_feed_retry() -> None:
    async with AsyncPartnerClient(f"127.0.0.1:{harness.free_port()}", "pk_x.y", retry=FAST_RETRY) as client:
        with pytest.raises(Unavailable) as ask:
            await client.request_contact_access("apt_" + "a" * 26, [CONTACT_FIELD_NAME], PURPOSE, HOUR)
        with pytest.raises(Unavailable) as cancel:
            await client.cancel_consent_request("crq_x")
        with pytest.raises(Unavailable) as get:
            await client.get_consent_request("crq_x")
        started = time.monotonic()
        with pytest.raises(Unavailable) as watch:
            await client.watch_consent_requests(resume_timeout=1.0).open()
        waited = time.monotonic() - started
    assert (ask.value.attempts, cancel.value.attempts) == (1, 1)
    assert get.value.attempts == FAST_RETRY.max_attempts
    # A watch is bounded by its time, not by the policy's count: it gives up only when the next
    # wait (at most max_backoff) would outlast resume_timeout, so after more sends than the count.
    assert watch.value.attempts > FAST_RETRY.max_attempts
    assert 1.0 - FAST_RETRY.max_backoff <= waited < 1.0 + 1.0


def test_the_blocking_client_sends_a_contact_request_once() -> None:
    with PartnerClient(f"127.0.0.1:{harness.free_port()}", "pk_x.y", retry=FAST_RETRY) as client:
        with pytest.raises(Unavailable) as ask:
            client.request_contact_access("apt_" + "a" * 26, [CONTACT_FIELD_NAME], PURPOSE, HOUR, "hi")
        with pytest.raises(Unavailable) as get:
            client.get_consent_request("crq_x")
    assert ask.value.attempts == 1
    assert get.value.attempts == FAST_RETRY.max_attempts


# The internal client: the patient app's side


async def test_internal_client_lists_approves_and_denies_consent_requests(
    aclient: AsyncPartnerClient, internal_target: str, agenda: Agenda, world: harness.World
) -> None:
    patient_id = patient_of_day(agenda, 1)
    appointment_id = await appointment_of_day(aclient, 1)
    email = await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_EMAIL], PURPOSE, 2 * HOUR, "hi")
    phone = await aclient.request_contact_access(appointment_id, [CONTACT_FIELD_PHONE], PURPOSE, HOUR)

    async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
        listed = [r async for r in internal.iter_consent_requests(patient_id, page_size=1)]
        assert len(listed) == 2
        newest, oldest = listed
        assert [list(newest.fields), list(oldest.fields)] == [[CONTACT_FIELD_PHONE], [CONTACT_FIELD_EMAIL]]
        assert oldest.partner_id == agenda.partner.partner_id and oldest.partner_display_name == "Agenda Sync"
        assert (oldest.purpose, oldest.message) == (PURPOSE, "hi")
        assert oldest.practitioner_display_name == "Dr. Agenda"
        assert oldest.ttl.ToTimedelta() == 2 * HOUR

        with pytest.raises(InvalidArgument):
            await internal.approve_consent_request(oldest.consent_request_id, ttl=3 * HOUR)  # longer than asked
        approved = await internal.approve_consent_request(oldest.consent_request_id, ttl=HOUR)
        assert approved.state == internal_consent_pb2.CONSENT_REQUEST_STATE_APPROVED
        assert list(approved.granted_fields) == [CONTACT_FIELD_EMAIL] and approved.consent_id
        denied = await internal.deny_consent_request(newest.consent_request_id)
        assert denied.state == internal_consent_pb2.CONSENT_REQUEST_STATE_DENIED
        with pytest.raises(FailedPrecondition):
            await internal.deny_consent_request(newest.consent_request_id)

        only_denied = await internal.list_consent_requests(
            patient_id, states=[internal_consent_pb2.CONSENT_REQUEST_STATE_DENIED]
        )
        assert [r.consent_request_id for r in only_denied.consent_requests] == [newest.consent_request_id]
        consents = await internal.list_consents(patient_id)
        assert [c.consent_id for c in consents] == [approved.consent_id]

    assert (await aclient.get_consent_request(email.consent_request_id)).state == CONSENT_REQUEST_STATE_APPROVED
    assert (await aclient.get_consent_request(phone.consent_request_id)).state == CONSENT_REQUEST_STATE_DENIED
    assert len(await consent_requests(world, patient_id)) == 2
