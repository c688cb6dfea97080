"""The patient's own view: who saw what of theirs (ListPatientDisclosures), what to tell them (WatchPrivacyEvents)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import audit_pb2
from appointments.internal.v1 import audit_service_pb2 as audit_pb
from appointments.internal.v1 import audit_service_pb2_grpc as audit_grpc
from appointments.internal.v1 import consent_service_pb2 as consent_pb
from appointments.partner.v1 import partner_appointment_service_pb2 as pb
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE
from google.protobuf.duration_pb2 import Duration
from harness import MONDAY, World

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

READ_TIMEOUT = 10
T = audit_pb2


async def _history(world: World, patient_id: str, page_size: int = 0, **window: Any) -> list[Any]:
    found: list[Any] = []
    token = ""
    while True:
        page = await world.audit.ListPatientDisclosures(
            audit_pb.ListPatientDisclosuresRequest(
                patient_id=patient_id, page_size=page_size, page_token=token, **window
            ),
            metadata=world.internal_metadata,
        )
        found.extend(page.disclosures)
        token = page.next_page_token
        if not token:
            return found


def _watch(world: World, resume_token: str = "") -> Any:
    return world.audit.WatchPrivacyEvents(
        audit_pb.WatchPrivacyEventsRequest(resume_token=resume_token), metadata=world.internal_metadata
    )


async def _next(stream: Any) -> audit_pb2.PrivacyEvent:
    event = await asyncio.wait_for(stream.read(), timeout=READ_TIMEOUT)
    assert event is not grpc.aio.EOF
    return event  # type: ignore[no-any-return]


async def _live(stream: Any) -> None:
    await asyncio.wait_for(stream.initial_metadata(), timeout=READ_TIMEOUT)


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_the_history_shows_who_saw_what_and_who_was_refused(world: World) -> None:
    practitioner = await world.practitioner("Dr. Historia", "Cardiology")
    patient = await world.patient()
    other = await world.patient()  # listed too: none of it may appear in the first patient's history
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    await world.appointment(practitioner, other.patient_id, MONDAY + timedelta(hours=1))
    reader = await world.partner("Agenda Lecteur", practitioner)
    prober = await world.partner("Agenda Curieux", practitioner)
    consent = await world.consent(patient.patient_id, reader.partner_id, [CONTACT_FIELD_EMAIL], purpose="rappels")
    mine = {}
    for partner in (reader, prober):
        listed = await partner.list_all()
        mine[partner.partner_id] = next(a.appointment_id for a in listed if a.patient_ref == listed[0].patient_ref)
    await reader.list_all()  # listed twice: one entry, counted twice
    await reader.contact(mine[reader.partner_id], consent.token)
    await _refused(prober.contact(mine[prober.partner_id], ""))

    history = await _history(world, patient.patient_id)

    entries = {(e.partner.display_name, e.view, tuple(e.fields), e.outcome, e.denial_reason): e for e in history}
    assert set(entries) == {
        ("Agenda Lecteur", T.DISCLOSURE_VIEW_BASIC, (), T.DISCLOSURE_OUTCOME_DISCLOSED, ""),
        ("Agenda Lecteur", T.DISCLOSURE_VIEW_CONTACT, (CONTACT_FIELD_EMAIL,), T.DISCLOSURE_OUTCOME_DISCLOSED, ""),
        ("Agenda Curieux", T.DISCLOSURE_VIEW_BASIC, (), T.DISCLOSURE_OUTCOME_DISCLOSED, ""),
        ("Agenda Curieux", T.DISCLOSURE_VIEW_CONTACT, (), T.DISCLOSURE_OUTCOME_DENIED, "CONSENT_REQUIRED"),
    }
    listing = entries["Agenda Lecteur", T.DISCLOSURE_VIEW_BASIC, (), T.DISCLOSURE_OUTCOME_DISCLOSED, ""]
    read = entries[
        "Agenda Lecteur", T.DISCLOSURE_VIEW_CONTACT, (CONTACT_FIELD_EMAIL,), T.DISCLOSURE_OUTCOME_DISCLOSED, ""
    ]
    assert listing.count == 2 and listing.first_time.ToDatetime() < listing.last_time.ToDatetime()
    assert read.count == 1 and read.purpose == "rappels" and read.consent_id == consent.consent_id
    for entry in history:
        assert entry.appointment.practitioner_display_name == "Dr. Historia"
        assert entry.appointment.practitioner_specialty == "Cardiology"
        assert entry.appointment.start_time == harness.ts(MONDAY)
        assert entry.partner.partner_id in (reader.partner_id, prober.partner_id)
    assert [e.last_time.ToDatetime() for e in history] == sorted(
        (e.last_time.ToDatetime() for e in history), reverse=True
    )
    assert await _history(world, patient.patient_id, page_size=1) == history  # paging loses and repeats nothing


async def test_the_history_counts_exactly_what_the_ledger_holds_references_included(
    world: World, database_dsn: str
) -> None:
    practitioner = await world.practitioner()
    patients = [await world.patient() for _ in range(9)]
    for hour, patient in enumerate(patients):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner = await world.partner("Agenda Repetitif", practitioner)
    for _ in range(3):  # a page of 9 listed again: recorded by reference
        await partner.list_all()
    conn = await asyncpg.connect(database_dsn)
    try:
        references = await conn.fetchval("SELECT count(*) FROM disclosures WHERE items_of IS NOT NULL")
        ledger = await conn.fetch(
            "SELECT partner_id, appointment_id, view, outcome, count(*) AS n FROM disclosure_items "
            "WHERE patient_id = $1 GROUP BY 1, 2, 3, 4",
            harness.uuid_of(patients[4].patient_id),
        )
    finally:
        await conn.close()

    history = await _history(world, patients[4].patient_id)

    assert references >= 1
    assert Counter(
        {(e.partner.partner_id, e.appointment.appointment_id, e.view, e.outcome): e.count for e in history}
    ) == Counter({(str(r["partner_id"]), str(r["appointment_id"]), r["view"], r["outcome"]): r["n"] for r in ledger})
    assert sum(e.count for e in history) == 3


async def test_a_window_a_missing_patient_and_a_partner_are_refused_precisely(world: World) -> None:
    patient = await world.patient()

    backwards = await _refused(
        world.audit.ListPatientDisclosures(
            audit_pb.ListPatientDisclosuresRequest(
                patient_id=patient.patient_id, start_time=harness.ts(MONDAY), end_time=harness.ts(MONDAY)
            ),
            metadata=world.internal_metadata,
        )
    )
    unknown = await _refused(_history(world, "00000000-0000-4000-8000-000000000000"))
    partner = await world.partner("Agenda Indiscret")
    from_partner_listener = await _refused(
        audit_grpc.AuditServiceStub(world.partner_channel).ListPatientDisclosures(
            audit_pb.ListPatientDisclosuresRequest(patient_id=patient.patient_id), metadata=partner.metadata
        )
    )
    empty = await _history(world, patient.patient_id)

    assert backwards.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert from_partner_listener.code() == grpc.StatusCode.UNIMPLEMENTED
    assert empty == []


async def test_the_events_tell_of_a_consent_its_first_use_and_its_revocation_once_each(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    partner = await world.partner("Agenda Notifie", practitioner)
    [listed] = await partner.list_all()
    stream = _watch(world)
    await _live(stream)

    consent = await world.consent(patient.patient_id, partner.partner_id, [CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE])
    await partner.contact(listed.appointment_id, consent.token)
    await partner.contact(listed.appointment_id, consent.token)  # the second read is no first
    await world.consents.RevokeConsent(
        consent_pb.RevokeConsentRequest(consent_id=consent.consent_id), metadata=world.internal_metadata
    )
    events = [await _next(stream) for _ in range(3)]
    stream.cancel()

    assert [e.type for e in events] == [
        T.PRIVACY_EVENT_TYPE_CONSENT_GRANTED,
        T.PRIVACY_EVENT_TYPE_CONTACT_FIRST_DISCLOSED,
        T.PRIVACY_EVENT_TYPE_CONSENT_REVOKED,
    ]
    for event in events:
        assert event.patient_id == patient.patient_id and event.consent_id == consent.consent_id
        assert event.partner.partner_id == partner.partner_id and event.partner.display_name == "Agenda Notifie"
    assert list(events[1].fields) == [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)


async def test_a_cut_stream_resumes_with_nothing_lost_or_repeated(world: World) -> None:
    patients = [await world.patient() for _ in range(4)]
    partner = await world.partner("Agenda Reprise")
    stream = _watch(world)
    await _live(stream)
    await world.consent(patients[0].patient_id, partner.partner_id, [CONTACT_FIELD_EMAIL])
    first = await _next(stream)
    stream.cancel()

    granted = [await world.consent(p.patient_id, partner.partner_id, [CONTACT_FIELD_EMAIL]) for p in patients[1:]]
    resumed = _watch(world, first.resume_token)
    replayed = [await _next(resumed) for _ in range(3)]
    later = await world.consent(patients[0].patient_id, partner.partner_id, [CONTACT_FIELD_PHONE])
    live = await _next(resumed)
    resumed.cancel()
    forged = await _refused(_watch(world, first.resume_token[:-4] + "AAAA").read())

    assert [e.consent_id for e in replayed] == [c.consent_id for c in granted]
    assert live.consent_id == later.consent_id
    ids = [first.event_id, *(e.event_id for e in replayed), live.event_id]
    assert ids == list(range(first.event_id, first.event_id + 5))
    assert forged.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_consent_requests_and_expiries_are_told_too(world: World) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    partner = await world.partner("Agenda Demandeur", practitioner)
    [listed] = await partner.list_all()
    stream = _watch(world)
    await _live(stream)

    asked = await partner.stub.RequestContactAccess(
        pb.RequestContactAccessRequest(
            appointment_id=listed.appointment_id,
            fields=[CONTACT_FIELD_PHONE],
            purpose="rappels",
            ttl=Duration(seconds=60),
        ),
        metadata=partner.metadata,
    )
    requested = await _next(stream)
    short = await world.consent(patient.patient_id, partner.partner_id, [CONTACT_FIELD_EMAIL], ttl=1)
    granted = await _next(stream)
    expired = await _next(stream)  # announced by the sweep once the second is over
    stream.cancel()

    assert requested.type == T.PRIVACY_EVENT_TYPE_CONSENT_REQUESTED and requested.consent_request_id
    assert asked.consent_request_id.startswith("crq_") and list(requested.fields) == [CONTACT_FIELD_PHONE]
    assert granted.type == T.PRIVACY_EVENT_TYPE_CONSENT_GRANTED and granted.consent_id == short.consent_id
    assert expired.type == T.PRIVACY_EVENT_TYPE_CONSENT_EXPIRED and expired.consent_id == short.consent_id
    assert expired.event_time.ToDatetime() >= short.expire_time.ToDatetime()


async def test_a_suspension_is_told_to_the_patients_the_partner_was_sent_that_day(watchful: World) -> None:
    world = watchful
    practitioner = await world.practitioner()
    seen = [await world.patient() for _ in range(3)]
    for hour, patient in enumerate(seen):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    partner = await world.partner("Agenda Aspirateur", practitioner)
    await partner.list_all()  # 3 patients: under the threshold of 5
    unseen = [await world.patient() for _ in range(3)]
    for hour, patient in enumerate(unseen, start=3):
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=hour))
    stream = _watch(world)
    await _live(stream)

    crossing = await _refused(partner.list())  # 6 patients: suspended, this page sent nothing
    events = [await _next(stream) for _ in range(3)]
    stream.cancel()

    assert harness.error_info(crossing).reason == "PARTNER_SUSPENDED"
    assert {e.type for e in events} == {T.PRIVACY_EVENT_TYPE_PARTNER_SUSPENDED}
    assert sorted(e.patient_id for e in events) == sorted(p.patient_id for p in seen)
    assert all(e.partner.display_name == "Agenda Aspirateur" for e in events)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE privacy_events SET type = 3",
        "DELETE FROM privacy_events",
        "TRUNCATE privacy_events",
        "UPDATE consent_request_events SET state = 'pending'",
        "DELETE FROM consent_request_events",
    ],
)
async def test_what_was_told_cannot_be_rewritten(world: World, database_dsn: str, statement: str) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id, MONDAY)
    partner = await world.partner("Agenda Immuable", practitioner)
    [listed] = await partner.list_all()
    await partner.stub.RequestContactAccess(
        pb.RequestContactAccessRequest(
            appointment_id=listed.appointment_id,
            fields=[CONTACT_FIELD_EMAIL],
            purpose="rappels",
            ttl=Duration(seconds=60),
        ),
        metadata=partner.metadata,
    )
    conn = await asyncpg.connect(database_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
        kept = await conn.fetchval(
            "SELECT (SELECT count(*) FROM privacy_events) + (SELECT count(*) FROM consent_request_events)"
        )
    finally:
        await conn.close()
    assert kept == 2


async def test_stop_ends_the_sweeps_even_when_they_are_woken_as_they_are_cancelled(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    # The sweeps wait on events the hub sets; a cancellation arriving as an event is set must
    # still end them (asyncio.wait_for in Python 3.11 lost it, and stop() waited for ever).
    for attempt in range(20):
        gateway = Gateway(settings, database, Secrets(os.urandom(32), keyring, data_keys))
        await gateway.start()

        async def wake_all_the_time(running: Gateway) -> None:
            while True:
                running.feed.consent_request_activity.set()
                running.feed.privacy_activity.set()
                await asyncio.sleep(0)

        waking = asyncio.create_task(wake_all_the_time(gateway))
        try:
            await asyncio.sleep(0.02 * (1 + attempt % 5))  # the sweeps in their waits, at various points
            async with asyncio.timeout(30):
                await gateway.stop(0)
        finally:
            waking.cancel()
