"""Bad input, paging, and the error boundary of the partner API."""

from __future__ import annotations

import io
import json
import logging
import random
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from google.rpc import code_pb2
from harness import MONDAY, PartnerHandle, World, ts

from service.errors import INTERNAL_MESSAGE
from service.telemetry.logs import JsonFormatter

LIST = "/appointments.partner.v1.PartnerAppointmentService/ListAppointments"


async def _invalid(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value


@pytest.fixture
async def partner(world: World) -> PartnerHandle:
    practitioner = await world.practitioner()
    patient = await world.patient()
    for hour in range(5):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    return await world.partner("A", practitioner)


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"page_size": -1}, {"page_size"}),
        ({"page_size": 501}, {"page_size"}),
        ({"start_time": None}, {"start_time"}),
        ({"end_time": None}, {"end_time"}),
        ({"end_time": ts(MONDAY - timedelta(days=31))}, {"end_time"}),
        ({"start_time": ts(MONDAY), "end_time": ts(MONDAY)}, {"end_time"}),
        ({"start_time": ts(MONDAY), "end_time": ts(MONDAY + timedelta(days=367))}, {"end_time"}),
        ({"practitioner_id": "not-a-uuid"}, {"practitioner_id"}),
        ({"page_token": "garbage"}, {"page_token"}),
        ({"page_size": -5, "practitioner_id": "x"}, {"page_size", "practitioner_id"}),
    ],
)
async def test_malformed_list_requests_name_the_fields(
    partner: PartnerHandle, fields: dict[str, Any], bad: set[str]
) -> None:
    if fields.get("start_time", 0) is None:
        fields = {k: v for k, v in fields.items() if k != "start_time"}
        request = harness.partner_pb.ListAppointmentsRequest(end_time=ts(MONDAY), **fields)
        error = await _invalid(partner.stub.ListAppointments(request, metadata=partner.metadata))
    elif fields.get("end_time", 0) is None:
        fields = {k: v for k, v in fields.items() if k != "end_time"}
        request = harness.partner_pb.ListAppointmentsRequest(start_time=ts(MONDAY), **fields)
        error = await _invalid(partner.stub.ListAppointments(request, metadata=partner.metadata))
    else:
        error = await _invalid(partner.list(**fields))

    assert harness.bad_fields(error) == bad
    assert harness.error_info(error).domain == "apptgate.dev"


async def test_a_window_of_exactly_366_days_is_accepted(partner: PartnerHandle) -> None:
    page = await partner.list(start_time=ts(MONDAY), end_time=ts(MONDAY + timedelta(days=366)))

    assert len(page.appointments) == 5


async def test_page_size_zero_means_fifty_and_500_is_allowed(world: World, partner: PartnerHandle) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    for minute in range(55):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(days=1, minutes=minute))
    await world.grant(partner.partner_id, practitioner)

    assert len((await partner.list(page_size=0)).appointments) == 50
    assert len((await partner.list(page_size=500)).appointments) == 60


async def test_a_tampered_page_token_is_invalid(partner: PartnerHandle) -> None:
    token = (await partner.list(page_size=2)).next_page_token
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]

    error = await _invalid(partner.list(page_size=2, page_token=flipped))

    assert harness.bad_fields(error) == {"page_token"}
    assert harness.error_info(error).reason == "INVALID_PAGE_TOKEN"


async def test_another_partners_page_token_is_invalid(world: World, partner: PartnerHandle) -> None:
    practitioner = (await partner.list()).appointments[0].practitioner.practitioner_id
    other = await world.partner("B", practitioner)
    token = (await partner.list(page_size=2)).next_page_token

    await _invalid(other.list(page_size=2, page_token=token))


async def test_a_page_token_of_another_query_is_invalid(partner: PartnerHandle) -> None:
    token = (await partner.list(page_size=2)).next_page_token

    await _invalid(partner.list(page_size=2, page_token=token, end_time=ts(MONDAY + timedelta(days=100))))


async def test_paging_through_1200_appointments_neither_skips_nor_repeats(world: World) -> None:
    practitioners = [await world.practitioner() for _ in range(3)]
    patients = [await world.patient() for _ in range(4)]
    internal = world.internal_metadata
    rng = random.Random(7)
    requests = []
    for n in range(1200):
        # Few distinct start times, so ties on start_time are common and the id breaks them.
        start = MONDAY + timedelta(minutes=15 * rng.randrange(40))
        requests.append(
            harness.scheduling_pb.CreateAppointmentRequest(
                practitioner_id=practitioners[n % 3],
                patient_id=patients[n % 4].patient_id,
                start_time=ts(start),
                end_time=ts(start + timedelta(minutes=15)),
            )
        )
    for chunk in range(0, len(requests), 100):
        await _gather([world.scheduling.CreateAppointment(r, metadata=internal) for r in requests[chunk : chunk + 100]])
    partner = await world.partner("A", *practitioners)

    for page_size in (7, 500):
        seen = await partner.list_all(page_size=page_size)
        ids = [a.appointment_id for a in seen]
        assert len(ids) == 1200
        assert len(set(ids)) == 1200
        starts = [a.start_time.ToDatetime() for a in seen]
        assert starts == sorted(starts)
    # One row per page over the last hour of the window: the cursor between every pair of rows.
    tail_start = MONDAY + timedelta(hours=9)
    tail = await partner.list_all(page_size=1, start_time=ts(tail_start))
    expected = sum(1 for r in requests if r.start_time.ToDatetime().replace(tzinfo=tail_start.tzinfo) >= tail_start)
    assert len(tail) == expected > 0
    assert len({a.appointment_id for a in tail}) == expected


async def _gather(calls: list[Any]) -> None:
    import asyncio

    await asyncio.gather(*calls)


async def test_request_bytes_that_do_not_decode_are_invalid_argument(
    partner: PartnerHandle, partner_channel: grpc.aio.Channel
) -> None:
    raw = partner_channel.unary_unary(LIST, request_serializer=None, response_deserializer=None)
    # Field 5 (page_token, a string) holding bytes that are not UTF-8.
    undecodable = b"\x2a\x02\xff\xfe"

    error = await _invalid(raw(undecodable, metadata=partner.metadata))

    assert harness.error_info(error).reason == "MALFORMED_REQUEST"


async def test_an_unexpected_failure_is_a_fixed_internal_error(partner: PartnerHandle, database_dsn: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute("ALTER TABLE practitioners RENAME COLUMN specialty TO specialty_gone")
    finally:
        await conn.close()

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("service.api.server").addHandler(handler)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await partner.list()
    finally:
        logging.getLogger("service.api.server").removeHandler(handler)

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_MESSAGE
    status = harness.status_of(caught.value)
    assert status.code == code_pb2.INTERNAL
    assert "specialty" not in str(status) and "SELECT" not in str(status)
    # The log line says what failed and where, without the error's text (which names the column).
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "unexpected_error" and line["method"] == LIST
    assert line["exception_type"].startswith("UndefinedColumnError")
    assert "service/store/partner_path.py" in line["stack"] and "line " in line["stack"]
    assert "specialty" not in stream.getvalue() and "does not exist" not in stream.getvalue()


async def test_a_malformed_appointment_id_is_invalid_and_a_missing_one_too(partner: PartnerHandle) -> None:
    for value in ("", "apt_short", "apt_" + "0" * 26, "x" * 10_000):
        error = await _invalid(partner.get(value))
        assert harness.bad_fields(error) == {"appointment_id"}


@pytest.mark.parametrize("edge", ["\n", "\r\n", " ", "\t", "\x00", "\u2028"])
async def test_a_well_formed_id_with_whitespace_or_a_control_character_is_invalid_never_internal(
    world: World, partner: PartnerHandle, edge: str
) -> None:
    [listed, *_] = await partner.list_all()
    practitioner = listed.practitioner.practitioner_id
    patient = await world.patient()
    meta = world.internal_metadata

    for value in (listed.appointment_id + edge, edge + listed.appointment_id):
        assert harness.bad_fields(await _invalid(partner.get(value))) == {"appointment_id"}
    for value in (practitioner + edge, edge + practitioner):
        assert harness.bad_fields(await _invalid(partner.list(practitioner_id=value))) == {"practitioner_id"}
    for value in (patient.patient_id + edge, edge + patient.patient_id):  # the internal listener, too
        request = harness.consent_pb.ListConsentsRequest(patient_id=value)
        assert harness.bad_fields(await _invalid(world.consents.ListConsents(request, metadata=meta))) == {"patient_id"}
    phone = harness.scheduling_pb.CreatePatientRequest(
        given_name="Edge", family_name="Case", phone="+33612345678" + edge
    )
    assert harness.bad_fields(await _invalid(world.scheduling.CreatePatient(phone, metadata=meta))) == {"phone"}
