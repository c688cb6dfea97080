"""WatchAppointments bookmarks (resume points that disclose nothing) and the drain of streams at shutdown."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import harness
import pytest
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from google.rpc import error_details_pb2
from harness import MONDAY, PartnerHandle, World

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

READ_TIMEOUT = 10
#: The bookmark interval of these tests' gateways, in seconds.
INTERVAL = 0.3


def watch(partner: PartnerHandle, practitioner_id: str = "", resume_token: str = "", *, bookmarks: bool = True) -> Any:
    return partner.stub.WatchAppointments(
        pb.WatchAppointmentsRequest(
            practitioner_id=practitioner_id, resume_token=resume_token, allow_bookmarks=bookmarks
        ),
        metadata=partner.metadata,
    )


async def read(stream: Any) -> pb.AppointmentChange:
    message = await asyncio.wait_for(stream.read(), timeout=READ_TIMEOUT)
    assert message is not grpc.aio.EOF
    return message  # type: ignore[no-any-return]


async def bookmark(stream: Any) -> pb.AppointmentChange:
    """The next message, which must be a bookmark: a token and nothing else."""
    message = await read(stream)
    assert message.change_type == pb.CHANGE_TYPE_BOOKMARK, message
    assert message.resume_token and not message.HasField("appointment")
    return message


async def change(stream: Any) -> pb.AppointmentChange:
    """The next change, skipping the bookmarks before it."""
    while (message := await read(stream)).change_type == pb.CHANGE_TYPE_BOOKMARK:
        pass
    return message


def hour_of(message: pb.AppointmentChange) -> int:
    return (message.appointment.start_time.ToDatetime() - MONDAY.replace(tzinfo=None)) // timedelta(hours=1)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a failed call, in seconds."""
    for detail in harness.status_of(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    raise AssertionError("no RetryInfo detail")


async def failure(stream: Any) -> grpc.aio.AioRpcError:
    """Read the stream until it fails; return the error (fail the test when a change arrives instead)."""
    try:
        while True:
            message = await read(stream)
            assert message.change_type == pb.CHANGE_TYPE_BOOKMARK, message
    except grpc.aio.AioRpcError as error:
        return error


@pytest.fixture
async def bookmarking(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[World]:
    """A gateway that sends a bookmark after ``INTERVAL`` seconds of quiet."""
    gateway = Gateway(
        replace(settings, watch_bookmark_interval=INTERVAL), database, Secrets(os.urandom(32), keyring, data_keys)
    )
    async with harness.serving(gateway) as world:
        yield world


async def test_a_quiet_stream_gets_a_bookmark_at_once_then_one_per_quiet_interval_and_none_is_recorded(
    bookmarking: World,
) -> None:
    world = bookmarking
    practitioner = await world.practitioner()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner)
    loop = asyncio.get_running_loop()

    first = await bookmark(stream)  # nothing to catch up with: at once
    after_first = loop.time()
    later = [await bookmark(stream), await bookmark(stream)]
    spacing = loop.time() - after_first
    stream.cancel()

    assert spacing >= 2 * INTERVAL * 0.9  # one per quiet interval, not a flood
    assert len({first.resume_token, *(b.resume_token for b in later)}) == 3  # sealed afresh each time
    assert [
        r for r in await world.disclosures(partner_id=partner.partner_id) if r.rpc.endswith("/WatchAppointments")
    ] == []


async def test_a_stream_that_did_not_ask_for_bookmarks_gets_none(bookmarking: World) -> None:
    world = bookmarking
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", practitioner)
    stream = watch(partner, bookmarks=False)
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)
    # Quiet for more than an interval, as a stream that asked sees: a bookmark would come first.
    asking = watch(partner)
    await bookmark(asking)
    await bookmark(asking)
    asking.cancel()
    await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=1))

    first = await read(stream)
    stream.cancel()
    assert first.change_type == pb.CHANGE_TYPE_CREATED


async def test_resuming_from_a_bookmark_replays_exactly_the_changes_the_stream_had_not_passed(
    bookmarking: World,
) -> None:
    world = bookmarking
    watched, other = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Sync", watched, other)
    stream = watch(partner, practitioner_id=watched)
    opening = await bookmark(stream)  # a stream that has received nothing yet

    await world.appointment(watched, patient.patient_id, MONDAY + timedelta(hours=1))
    assert hour_of(await change(stream)) == 1
    for hour in (2, 3):  # not watched by this stream: its cursor passes them
        await world.appointment(other, patient.patient_id, MONDAY + timedelta(hours=hour))
    passed = await bookmark(stream)  # after a quiet interval, past hours 1 to 3
    stream.cancel()
    for hour in (4, 5):
        await world.appointment(watched, patient.patient_id, MONDAY + timedelta(hours=hour))

    from_opening = watch(partner, practitioner_id=watched, resume_token=opening.resume_token)
    replayed = [hour_of(await read(from_opening)) for _ in range(3)]
    caught_up = await bookmark(from_opening)  # replay done: a bookmark, not a repeat
    from_opening.cancel()
    from_passed = watch(partner, practitioner_id=watched, resume_token=passed.resume_token)
    replayed_after_passed = [hour_of(await read(from_passed)) for _ in range(2)]
    await bookmark(from_passed)
    from_passed.cancel()
    # Everything over all grants after the first bookmark: the changes not watched then, too.
    everything = watch(partner, resume_token=opening.resume_token)
    replayed_everything = [hour_of(await read(everything)) for _ in range(5)]
    everything.cancel()
    # The caught-up bookmark resumes after hour 5: only what comes next.
    resumed = watch(partner, practitioner_id=watched, resume_token=caught_up.resume_token)
    await bookmark(resumed)
    await world.appointment(watched, patient.patient_id, MONDAY + timedelta(hours=6))
    next_hour = hour_of(await change(resumed))
    resumed.cancel()

    assert replayed == [1, 4, 5]
    assert replayed_after_passed == [4, 5]
    assert replayed_everything == [1, 2, 3, 4, 5]
    assert next_hour == 6


async def test_stopping_the_server_ends_streams_unavailable_server_shutting_down_with_retry_info(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    secrets = Secrets(os.urandom(32), keyring, data_keys)  # both gateways: tokens are valid on either
    first = Gateway(replace(settings, watch_bookmark_interval=60), database, secrets)
    await first.start()
    assert first.partner and first.internal
    port = first.partner.port
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as partner_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{first.internal.port}") as internal_channel,
    ):
        world = World(partner_channel, internal_channel)
        practitioner = await world.practitioner()
        patient = await world.patient()
        partner = await world.partner("Sync", practitioner)
        with_bookmarks, without = watch(partner), watch(partner, bookmarks=False)
        await bookmark(with_bookmarks)
        await asyncio.wait_for(without.initial_metadata(), timeout=READ_TIMEOUT)
        requests = partner.stub.WatchConsentRequests(pb.WatchConsentRequestsRequest(), metadata=partner.metadata)
        await asyncio.wait_for(requests.initial_metadata(), timeout=READ_TIMEOUT)

        # A grace far longer than the test: the stop returns early only because the streams ended.
        async with asyncio.timeout(30):
            await first.stop(600)
        last = await bookmark(with_bookmarks)  # where the stream stood, sent before it ended
        errors = [await failure(with_bookmarks), await failure(without), await failure(requests)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await partner.list()  # the listener is gone

    # Changes committed while no server runs reach the stream resumed from its last bookmark, on another.
    async with harness.serving(Gateway(replace(settings), database, secrets)) as second:
        for hour in (1, 2):
            await second.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
        resumed = watch(replace(partner, stub=type(partner.stub)(second.partner_channel)), "", last.resume_token)
        replayed = [hour_of(await read(resumed)) for _ in range(2)]
        await bookmark(resumed)
        resumed.cancel()

    for error in errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        info = harness.error_info(error)
        assert (info.reason, info.domain) == ("SERVER_SHUTTING_DOWN", "apptgate.dev")
        assert 0 < retry_delay(error) <= 1
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert replayed == [1, 2]


async def test_a_stream_opened_while_the_feed_drains_is_told_to_resume_elsewhere(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    gateway = Gateway(replace(settings), database, Secrets(os.urandom(32), keyring, data_keys))
    async with harness.serving(gateway) as world:
        practitioner = await world.practitioner()
        partner = await world.partner("Sync", practitioner)
        # A call the listener accepted just before it stopped accepting reaches a draining feed.
        gateway.feed.drain()
        error = await failure(watch(partner))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert harness.error_info(error).reason == "SERVER_SHUTTING_DOWN"
    assert retry_delay(error) > 0
