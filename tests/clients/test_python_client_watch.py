"""The Python client's change feed (``watch_appointments``) against real gateways, restarts included."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from datetime import timedelta

import harness
import pytest
from appointments.internal.v1 import scheduling_service_pb2
from appointments.partner.v1.partner_appointment_service_pb2 import (
    CHANGE_TYPE_CANCELLED,
    CHANGE_TYPE_CREATED,
    AppointmentChange,
)
from apptgate_client import AsyncAppointmentWatch, AsyncPartnerClient, NotFound, PartnerClient, RetryPolicy
from client_world import WEEK_START, Agenda

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

PATIENT = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.2)


async def book(world: harness.World, agenda: Agenda, hours: int) -> str:
    """Book an appointment of the agenda's practitioner, ``hours`` after the week starts; return its start."""
    start = WEEK_START + timedelta(days=1, hours=hours)
    await world.appointment(agenda.practitioner_id, agenda.patient_ids[1], start=start)
    return f"{start:%Y-%m-%dT%H:%M:%SZ}"


def start_of(change: AppointmentChange) -> str:
    return change.appointment.start_time.ToJsonString()


#: The bookings of the agenda world, made before any test opens a stream.
AGENDA_STARTS = {f"{WEEK_START + timedelta(days=day, hours=9):%Y-%m-%dT%H:%M:%SZ}" for day in range(7)}


async def until(changes: AsyncAppointmentWatch, start: str) -> AppointmentChange:
    """The next change of the appointment starting at ``start``.

    A stream opened "from now" may first replay changes committed just before it
    opened (the gateway's feed hub can lag its database by a few milliseconds);
    those are skipped, and must be the agenda world's own bookings.
    """
    async with asyncio.timeout(10):
        async for change in changes:
            if start_of(change) == start:
                return change
            assert start_of(change) in AGENDA_STARTS, start_of(change)
    raise AssertionError("the stream ended")


async def test_watch_is_live_on_enter_and_yields_changes_with_resume_tokens(
    partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    async with (
        AsyncPartnerClient(partner_target, agenda.partner.secret) as client,
        client.watch_appointments() as changes,
    ):
        booked = await book(world, agenda, 14)
        change = await until(changes, booked)
    assert change.change_type == CHANGE_TYPE_CREATED
    assert start_of(change) == booked
    assert change.appointment.practitioner.practitioner_id == agenda.practitioner_id
    assert change.appointment.patient_ref.startswith("pat_")
    assert changes.resume_token == change.resume_token != ""


async def test_watch_resumes_after_a_stored_token_exactly_once(
    partner_target: str, agenda: Agenda, world: harness.World, internal_target: str
) -> None:
    async with AsyncPartnerClient(partner_target, agenda.partner.secret) as client:
        async with client.watch_appointments(practitioner_id=agenda.practitioner_id) as changes:
            first = await book(world, agenda, 13)
            await until(changes, first)
            stored = changes.resume_token
        later = [await book(world, agenda, 15), await book(world, agenda, 16)]
        async with client.watch_appointments(resume_token=stored) as resumed:
            replayed = [start_of(await asyncio.wait_for(anext(resumed), timeout=10)) for _ in later]
    assert replayed == later


async def test_blocking_watch_follows_a_cancellation(partner_target: str, agenda: Agenda, world: harness.World) -> None:
    live = threading.Event()
    seen: list[tuple[int, str]] = []

    def watcher() -> None:  # the blocking client, in a thread: the gateway serves from this test's event loop
        with PartnerClient(partner_target, agenda.partner.secret) as client, client.watch_appointments() as changes:
            live.set()
            for change in changes:
                seen.append((change.change_type, start_of(change)))
                if change.change_type == CHANGE_TYPE_CANCELLED:
                    return

    thread = threading.Thread(target=watcher)
    thread.start()
    try:
        assert await asyncio.to_thread(live.wait, 10)
        patient = await world.patient()
        booked = await world.appointment(agenda.practitioner_id, patient.patient_id)
        await world.scheduling.CancelAppointment(
            scheduling_service_pb2.CancelAppointmentRequest(appointment_id=booked.appointment_id),
            metadata=world.internal_metadata,
        )
    finally:
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    start = booked.start_time.ToJsonString()
    assert seen[-2:] == [(CHANGE_TYPE_CREATED, start), (CHANGE_TYPE_CANCELLED, start)]
    assert {s for _, s in seen[:-2]} <= AGENDA_STARTS  # see until()


def test_a_negative_resume_timeout_is_refused_before_anything_is_sent() -> None:
    with PartnerClient(f"127.0.0.1:{harness.free_port()}", "pk_x.y") as client:
        with pytest.raises(ValueError, match="resume_timeout"):
            client.watch_appointments(resume_timeout=-1)
        with pytest.raises(ValueError, match="resume_timeout"):
            client.watch_consent_requests(resume_timeout=float("nan"))


async def test_watching_a_practitioner_not_granted_raises_not_found(partner_target: str, agenda: Agenda) -> None:
    async with AsyncPartnerClient(partner_target, agenda.partner.secret) as client:
        with pytest.raises(NotFound):
            await client.watch_appointments(practitioner_id=agenda.hidden_practitioner_id).open()


def reopening(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether the client logged a failed attempt to reopen a watch (it retries after each)."""
    return any(r.name == "apptgate_client" and "reopening in" in r.getMessage() for r in caplog.records)


async def test_watch_resumes_across_a_server_restart_without_gap_or_repeat(
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
    secrets = Secrets(os.urandom(32), keyring, data_keys)  # the same secret on both: resume tokens survive the restart
    partner_settings = replace(settings, partner_addr=f"127.0.0.1:{port}", internal_addr="127.0.0.1:0")
    first = Gateway(partner_settings, database, secrets)
    await first.start()
    second: Gateway | None = None
    try:
        async with (
            AsyncPartnerClient(f"127.0.0.1:{port}", agenda.partner.secret, retry=PATIENT) as client,
            client.watch_appointments() as changes,
        ):
            before = await book(world, agenda, 11)
            await until(changes, before)

            await first.stop(1)  # the stream ends with UNAVAILABLE: "resume with the last token"
            during = await book(world, agenda, 12)  # committed while no server listens
            resumed = asyncio.create_task(anext(changes))
            # The client tried to reopen while nothing listens, and keeps trying (it logs each retry).
            assert await harness.eventually(lambda: reopening(caplog) or resumed.done())
            assert not resumed.done()
            second = Gateway(partner_settings, database, secrets)
            await second.start()

            assert start_of(await asyncio.wait_for(resumed, timeout=15)) == during
            after = await book(world, agenda, 17)
            assert start_of(await asyncio.wait_for(anext(changes), timeout=10)) == after
    finally:
        if second is not None:
            await second.stop(0)
