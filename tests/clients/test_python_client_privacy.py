"""The Python client's patient view (issue 25): a patient's history and the privacy events, against a real gateway.

``InternalClient.list_patient_disclosures`` / ``iter_patient_disclosures`` and
``watch_privacy_events`` (and their asyncio twins) over real channels to a real
:class:`~service.app.Gateway` on a real database. The gateway runs in the
test's event loop, so the blocking client is driven from a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta

import harness
import pytest
from appointments.internal.v1.audit_pb2 import (
    DISCLOSURE_OUTCOME_DISCLOSED,
    DISCLOSURE_VIEW_BASIC,
    DISCLOSURE_VIEW_CONTACT,
    PRIVACY_EVENT_TYPE_CONSENT_GRANTED,
    PRIVACY_EVENT_TYPE_CONSENT_REVOKED,
    PRIVACY_EVENT_TYPE_CONTACT_FIRST_DISCLOSED,
    PrivacyEvent,
)
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_NAME, CONTACT_FIELD_PHONE
from apptgate_client import (
    AsyncInternalClient,
    AsyncPartnerClient,
    AsyncPrivacyEventWatch,
    InternalClient,
    InvalidArgument,
    NotFound,
)
from client_world import WEEK_END, WEEK_START, Agenda

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
#: The agenda world books its consented patient on days 0, 3 and 6 of the week with the partner's practitioner.
CONSENTED_PATIENT_DAYS = 3


async def next_event(events: AsyncPrivacyEventWatch) -> PrivacyEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


async def read_the_patient(partner_target: str, agenda: Agenda) -> str:
    """The partner lists the week twice (the second page recorded by reference) and reads one contact in between.

    Returns the partner-scoped id of the consented patient's first appointment.
    """
    async with AsyncPartnerClient(partner_target, agenda.partner.secret) as partner:
        listed = [a async for a in partner.iter_appointments(start_time=WEEK_START, end_time=WEEK_END)]
        first = listed[0].appointment_id  # the consented patient's, on the first day
        await partner.get_appointment_contact(first, agenda.consent_token)
        again = [a async for a in partner.iter_appointments(start_time=WEEK_START, end_time=WEEK_END)]
    assert [a.appointment_id for a in again] == [a.appointment_id for a in listed]
    return first


async def test_a_patients_history_pages_newest_first_with_names_purposes_and_counts(
    internal_target: str, partner_target: str, agenda: Agenda
) -> None:
    await read_the_patient(partner_target, agenda)
    async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
        first = await internal.list_patient_disclosures(agenda.consented_patient_id, page_size=3)
        second = await internal.list_patient_disclosures(
            agenda.consented_patient_id, page_size=3, page_token=first.next_page_token
        )
        whole = [d async for d in internal.iter_patient_disclosures(agenda.consented_patient_id, page_size=1)]

    assert len(first.disclosures) == 3 and first.next_page_token
    assert len(second.disclosures) == 1 and not second.next_page_token
    entries = [*first.disclosures, *second.disclosures]
    assert [e.SerializeToString() for e in whole] == [e.SerializeToString() for e in entries]
    last_times = [e.last_time.ToDatetime() for e in entries]
    assert last_times == sorted(last_times, reverse=True)  # newest first
    assert {e.partner.partner_id for e in entries} == {agenda.partner.partner_id}
    assert {e.partner.display_name for e in entries} == {"Agenda Sync"}  # the name, never a pseudonym
    assert {e.appointment.practitioner_display_name for e in entries} == {"Dr. Agenda"}
    assert {e.appointment.practitioner_specialty for e in entries} == {"Dermatology"}

    basic = [e for e in entries if e.view == DISCLOSURE_VIEW_BASIC]
    (contact,) = [e for e in entries if e.view == DISCLOSURE_VIEW_CONTACT]
    assert len(basic) == CONSENTED_PATIENT_DAYS  # one entry per appointment of the patient the partner saw
    assert len({e.appointment.appointment_id for e in basic}) == CONSENTED_PATIENT_DAYS
    assert all(e.count == 2 and e.outcome == DISCLOSURE_OUTCOME_DISCLOSED and not e.fields for e in basic)
    assert all(e.first_time.ToDatetime() < e.last_time.ToDatetime() for e in basic)
    assert entries[-1] == contact  # read between the two listings: older than their last time
    assert list(contact.fields) == [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL]
    assert (contact.consent_id, contact.purpose, contact.count) == (agenda.consent_id, "reminders", 1)
    assert contact.outcome == DISCLOSURE_OUTCOME_DISCLOSED
    assert contact.appointment.start_time.ToDatetime(tzinfo=WEEK_START.tzinfo) == WEEK_START + timedelta(hours=9)


async def test_the_blocking_client_iterates_a_history_and_a_window_narrows_it(
    internal_target: str, partner_target: str, agenda: Agenda
) -> None:
    await read_the_patient(partner_target, agenda)

    def scenario() -> tuple[int, int, int]:
        with InternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
            everything = list(internal.iter_patient_disclosures(agenda.consented_patient_id, page_size=2))
            newest = everything[0].last_time.ToDatetime(tzinfo=WEEK_START.tzinfo)
            # Only the second listing's responses: from its time on, the basic entries alone, counted once.
            since = list(internal.iter_patient_disclosures(agenda.consented_patient_id, start_time=newest))
            nothing = internal.list_patient_disclosures(agenda.patient_ids[1], end_time=LONG_AGO)
            return len(everything), sum(e.count for e in since), len(nothing.disclosures)

    assert await asyncio.to_thread(scenario) == (CONSENTED_PATIENT_DAYS + 1, CONSENTED_PATIENT_DAYS, 0)


async def test_history_errors_are_typed(internal_target: str) -> None:
    async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
        with pytest.raises(NotFound):
            await internal.list_patient_disclosures(str(uuid.uuid4()))
        with pytest.raises(InvalidArgument) as bad:
            await internal.list_patient_disclosures("not-a-patient", page_size=-1)
    assert set(bad.value.fields) == {"patient_id", "page_size"}


async def test_privacy_events_tell_of_a_consent_granted_first_contact_and_revoked(
    internal_target: str, partner_target: str, agenda: Agenda
) -> None:
    patient = agenda.consented_patient_id
    async with (
        AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal,
        internal.watch_privacy_events() as events,
        AsyncPartnerClient(partner_target, agenda.partner.secret) as partner,
    ):
        consent = await internal.grant_consent(
            patient, agenda.partner.partner_id, [CONTACT_FIELD_PHONE], timedelta(hours=1), "text reminders"
        )
        granted = await next_event(events)
        (appointment, *_) = [a async for a in partner.iter_appointments(start_time=WEEK_START, end_time=WEEK_END)]
        for _ in range(2):  # only the first read is news
            await partner.get_appointment_contact(appointment.appointment_id, consent.token)
        first_contact = await next_event(events)
        await internal.revoke_consent(consent.consent_id)
        revoked = await next_event(events)

    assert granted.type == PRIVACY_EVENT_TYPE_CONSENT_GRANTED
    assert (granted.patient_id, granted.consent_id, list(granted.fields)) == (
        patient,
        consent.consent_id,
        [CONTACT_FIELD_PHONE],
    )
    assert (granted.partner.partner_id, granted.partner.display_name) == (agenda.partner.partner_id, "Agenda Sync")
    assert first_contact.type == PRIVACY_EVENT_TYPE_CONTACT_FIRST_DISCLOSED
    assert (first_contact.patient_id, first_contact.consent_id) == (patient, consent.consent_id)
    assert revoked.type == PRIVACY_EVENT_TYPE_CONSENT_REVOKED  # not a second CONTACT_FIRST_DISCLOSED
    assert (revoked.patient_id, revoked.consent_id) == (patient, consent.consent_id)
    assert [granted.event_id, first_contact.event_id, revoked.event_id] == [granted.event_id + n for n in range(3)]
    assert all(e.resume_token for e in (granted, first_contact, revoked))
    assert events.resume_token == revoked.resume_token


async def test_privacy_events_resume_after_a_stored_token_without_loss_or_repetition(
    internal_target: str, agenda: Agenda
) -> None:
    patient = agenda.patient_ids[1]
    async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
        async with internal.watch_privacy_events() as events:
            first = await internal.grant_consent(
                patient, agenda.partner.partner_id, [CONTACT_FIELD_EMAIL], timedelta(hours=1), "first"
            )
            seen = await next_event(events)
            stored = events.resume_token
        assert (seen.consent_id, stored) == (first.consent_id, seen.resume_token)

        # Committed while nobody watches.
        missed = await internal.grant_consent(
            patient, agenda.partner.partner_id, [CONTACT_FIELD_NAME], timedelta(hours=1), "missed"
        )
        await internal.revoke_consent(missed.consent_id)

        async with internal.watch_privacy_events(resume_token=stored) as resumed:
            replayed = [await next_event(resumed) for _ in range(2)]
            live = await internal.grant_consent(
                patient, agenda.partner.partner_id, [CONTACT_FIELD_PHONE], timedelta(hours=1), "live"
            )
            after = await next_event(resumed)

    assert [(e.type, e.consent_id) for e in replayed] == [
        (PRIVACY_EVENT_TYPE_CONSENT_GRANTED, missed.consent_id),
        (PRIVACY_EVENT_TYPE_CONSENT_REVOKED, missed.consent_id),
    ]
    assert (after.type, after.consent_id) == (PRIVACY_EVENT_TYPE_CONSENT_GRANTED, live.consent_id)
    assert [e.event_id for e in (seen, *replayed, after)] == [seen.event_id + n for n in range(4)]


async def test_a_foreign_resume_token_is_refused(internal_target: str) -> None:
    async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
        with pytest.raises(InvalidArgument) as bad:
            await internal.watch_privacy_events(resume_token="not-a-token").open()
    assert bad.value.fields == ("resume_token",)


async def test_the_blocking_privacy_watch_follows_a_grant_and_a_revocation(
    internal_target: str, agenda: Agenda
) -> None:
    live = threading.Event()
    seen: list[PrivacyEvent] = []

    def watcher() -> None:  # the blocking client, in a thread: the gateway serves from this test's event loop
        with (
            InternalClient(internal_target, harness.INTERNAL_TOKEN) as internal,
            internal.watch_privacy_events() as events,
        ):
            live.set()
            for event in events:
                seen.append(event)
                if event.type == PRIVACY_EVENT_TYPE_CONSENT_REVOKED:
                    return

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(live.wait, 10)
        async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
            consent = await internal.grant_consent(
                agenda.patient_ids[2], agenda.partner.partner_id, [CONTACT_FIELD_NAME], timedelta(hours=1), "x"
            )
            await internal.revoke_consent(consent.consent_id)
    finally:
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert [(e.type, e.consent_id, e.patient_id) for e in seen] == [
        (PRIVACY_EVENT_TYPE_CONSENT_GRANTED, consent.consent_id, agenda.patient_ids[2]),
        (PRIVACY_EVENT_TYPE_CONSENT_REVOKED, consent.consent_id, agenda.patient_ids[2]),
    ]
