"""Limits on bulk extraction: rate, daily caps across processes, anomaly flag, suspension and its lifting."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL
from google.rpc import error_details_pb2
from harness import MONDAY, World


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _limits(world: World, partner_id: str, **limits: Any) -> Any:
    return await world.registry.SetPartnerLimits(
        harness.registry_pb.SetPartnerLimitsRequest(partner_id=partner_id, **limits), metadata=world.internal_metadata
    )


async def _usage(world: World, partner_id: str) -> Any:
    return await world.registry.GetPartnerUsage(
        harness.registry_pb.GetPartnerUsageRequest(partner_id=partner_id), metadata=world.internal_metadata
    )


async def _agenda(world: World, appointments: int, *partners: str) -> list[harness.PartnerHandle]:
    """One practitioner with ``appointments`` of as many patients, 10 minutes apart, and partners granted it."""
    practitioner = await world.practitioner()
    for n in range(appointments):
        patient = await world.patient()
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(minutes=10 * n))
    return [await world.partner(name, practitioner) for name in partners]


async def test_a_partner_over_its_rate_gets_resource_exhausted_with_retry_info(world: World) -> None:
    partner = await world.partner("Eager", await world.practitioner())
    # A token every 100 s: the fourth call finds the bucket empty however slowly the first three went.
    await _limits(world, partner.partner_id, requests_per_second=0.01, burst=3)

    codes = [await _code(partner.list()) for _ in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.list()

    assert codes == [grpc.StatusCode.OK] * 3
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert harness.error_info(caught.value).reason == "RATE_LIMITED"
    retry = [d for d in harness.status_of(caught.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1


async def test_the_daily_contact_cap_refuses_the_next_contact_and_sends_nothing(world: World) -> None:
    practitioner = await world.practitioner()
    patients = [await world.patient() for _ in range(3)]
    for n, patient in enumerate(patients):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=n))
    partner = await world.partner("Collector", practitioner)
    await _limits(world, partner.partner_id, contact_daily_cap=2)
    tokens = {
        p.patient_id: (await world.consent(p.patient_id, partner.partner_id, [CONTACT_FIELD_EMAIL])).token
        for p in patients
    }
    records = await world.disclosures(partner_id=partner.partner_id)  # nothing yet
    listed = await partner.list_all()
    owners = [r.patient_id for r in await world.disclosures(partner_id=partner.partner_id)][len(records) :]

    results = [
        await _code(partner.contact(a.appointment_id, tokens[owner])) for a, owner in zip(listed, owners, strict=True)
    ]

    assert results == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    usage = await _usage(world, partner.partner_id)
    assert usage.contact_disclosures == 2
    contact_records = [r for r in await world.disclosures(partner_id=partner.partner_id) if r.view == 2]
    assert len(contact_records) == 2


async def test_the_daily_patient_cap_refuses_new_patients_but_not_ones_already_reached(world: World) -> None:
    practitioner = await world.practitioner()
    patients = [await world.patient() for _ in range(4)]
    for n, patient in enumerate(patients):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=n))
    partner = await world.partner("Wide", practitioner)
    await _limits(world, partner.partner_id, patient_daily_cap=2)

    first_two = await partner.list(page_size=2)
    again = await partner.list(page_size=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.list(page_size=2, page_token=first_two.next_page_token)

    assert len(again.appointments) == 2
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert harness.error_info(caught.value).reason == "PATIENT_CAP_REACHED"
    assert (await _usage(world, partner.partner_id)).patients_reached == 2


async def test_concurrent_reads_recorded_together_stop_exactly_at_the_patient_cap(
    world: World, database_dsn: str
) -> None:
    partner, bystander = await _agenda(world, 24, "Crowd", "Bystander")
    appointments = await partner.list_all()  # the partner's ids for them; this reaches every patient, so:
    conn = await asyncpg.connect(database_dsn)
    try:  # start the day again, as if the listing had been yesterday's
        for table in ("partner_daily_patients", "partner_daily_usage"):
            await conn.execute(f"DELETE FROM {table} WHERE partner_id = $1", harness.uuid_of(partner.partner_id))
    finally:
        await conn.close()
    await _limits(world, partner.partner_id, patient_daily_cap=10)
    before = len(await world.disclosures(partner_id=partner.partner_id))

    # 24 reads of different patients at once (the gateway records concurrent ones in shared
    # statements), with another partner's listings in between.
    codes = await asyncio.gather(
        *(_code(partner.get(a.appointment_id)) for a in appointments),
        *(_code(bystander.list()) for _ in range(8)),
    )

    assert codes.count(grpc.StatusCode.OK) == 10 + 8
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 14
    assert (await _usage(world, partner.partner_id)).patients_reached == 10
    recorded = (await world.disclosures(partner_id=partner.partner_id))[before:]
    assert len(recorded) == 10
    assert len({r.patient_id for r in recorded}) == 10
    listed = await world.disclosures(partner_id=bystander.partner_id)
    assert len(listed) == 8 * 24  # each listing its own record of every appointment
    assert len({r.disclosure_id for r in listed}) == 8


async def test_concurrent_contacts_recorded_together_stop_exactly_at_the_contact_cap(world: World) -> None:
    capped, bystander = await _agenda(world, 12, "Caller", "Neighbour")
    calls = []
    for partner, how_many in ((capped, 12), (bystander, 6)):
        before = len(await world.disclosures(partner_id=partner.partner_id))
        listed = await partner.list_all()
        owners = [r.patient_id for r in await world.disclosures(partner_id=partner.partner_id)][before:]
        for shown, owner in list(zip(listed, owners, strict=True))[:how_many]:
            token = (await world.consent(owner, partner.partner_id, [CONTACT_FIELD_EMAIL])).token
            calls.append((partner, shown.appointment_id, token))
    await _limits(world, capped.partner_id, contact_daily_cap=5)

    # 18 contact calls at once: the gateway checks, counts and records concurrent ones in shared statements.
    codes = await asyncio.gather(*(_code(partner.contact(shown, token)) for partner, shown, token in calls))

    assert codes[:12].count(grpc.StatusCode.OK) == 5
    assert codes[:12].count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 7
    assert codes[12:] == [grpc.StatusCode.OK] * 6
    for partner, expected in ((capped, 5), (bystander, 6)):
        assert (await _usage(world, partner.partner_id)).contact_disclosures == expected
        recorded = [r for r in await world.disclosures(partner_id=partner.partner_id) if r.view == 2]
        assert len(recorded) == expected


async def test_an_anomalous_volume_is_flagged_suspends_the_partner_until_an_operator_lifts_it(
    watchful: World, database_dsn: str
) -> None:
    world = watchful
    practitioner = await world.practitioner()
    for hour in range(6):
        patient = await world.patient()
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner = await world.partner("Spiking", practitioner)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.list()  # 6 new patients at once: over the threshold of 5
    suspended_usage = await _usage(world, partner.partner_id)
    refused_again = await _code(partner.list(page_size=1))
    lifted = await world.registry.LiftPartnerSuspension(
        harness.registry_pb.LiftPartnerSuspensionRequest(partner_id=partner.partner_id),
        metadata=world.internal_metadata,
    )
    after = await partner.list()

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert harness.error_info(caught.value).reason == "PARTNER_SUSPENDED"
    assert suspended_usage.HasField("flag_time") and suspended_usage.limits.HasField("suspend_time")
    assert refused_again == grpc.StatusCode.PERMISSION_DENIED
    assert not lifted.HasField("suspend_time")
    assert len(after.appointments) == 6  # flagged once a day: the lifted partner is not suspended again today
    conn = await asyncpg.connect(database_dsn)
    try:
        events = [r["kind"] for r in await conn.fetch("SELECT kind FROM partner_events ORDER BY id")]
        sent_before_suspension = await conn.fetchval("SELECT count(*) FROM disclosure_items WHERE outcome = 1")
    finally:
        await conn.close()
    assert events == ["anomaly", "suspended", "lifted"]
    assert sent_before_suspension == 6  # only the listing after the lift: the suspending call sent nothing


async def test_daily_caps_hold_in_total_across_two_server_processes(database_dsn: str, tmp_path: Path) -> None:
    processes = []
    ports = []
    data_key = harness.data_key_text()
    for _ in range(2):
        partner_port, internal_port = harness.free_port(), harness.free_port()
        env = harness.environment(
            DATABASE_URL=database_dsn,
            APPTGATE_DATA_DIR=str(tmp_path / "data"),
            APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
            APPTGATE_PARTNER_ADDR=f"127.0.0.1:{partner_port}",
            APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{internal_port}",
            APPTGATE_PATIENT_DAILY_CAP="7",
            APPTGATE_PARTNER_RPS="1000",
            APPTGATE_PARTNER_BURST="1000",
            APPTGATE_DATA_KEY=data_key,
            APPTGATE_WORKERS="1",
            APPTGATE_SERVER_SECRET="c2VydmVyLXNlY3JldC1mb3ItdGhlLWNhcC10ZXN0LTAxMjM0NQ",
        )
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
            )
        )
        ports.append((partner_port, internal_port))
    try:
        for partner_port, internal_port in ports:
            await harness.wait_for_port(partner_port)
            await harness.wait_for_port(internal_port)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for pair in ports for p in pair]
        worlds = [World(channels[0], channels[1]), World(channels[2], channels[3])]
        practitioner = await worlds[0].practitioner()
        patients = [await worlds[0].patient() for _ in range(20)]
        for n, patient in enumerate(patients):
            await worlds[0].appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=n))
        partner = await worlds[0].partner("Twice", practitioner)
        via = [
            harness.PartnerHandle(
                partner.partner_id,
                partner.key_id,
                partner.secret,
                harness.partner_grpc.PartnerAppointmentServiceStub(channels[i]),
            )
            for i in (0, 2)
        ]
        results = await asyncio.gather(
            *(
                via[n % 2].list(
                    page_size=1,
                    start_time=harness.ts(MONDAY + timedelta(hours=n)),
                    end_time=harness.ts(MONDAY + timedelta(hours=n + 1)),
                )
                for n in range(20)
            ),
            return_exceptions=True,
        )
        usage = await _usage(worlds[1], partner.partner_id)
        for channel in channels:
            await channel.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.wait_for(process.wait(), timeout=30)

    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [
        r for r in results if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    assert len(served) == 7 and len(refused) == 13
    assert usage.patients_reached == 7
