"""The ledger's group commit (service.disclosure.record and .groups), driven directly on a real database.

What the API tests cannot pin down: which calls share a statement and when a
writer waits. A group's calls share a transaction, so ``disclosures.txid``
tells them apart.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import asyncpg
import grpc
import harness
import pytest

from service import models
from service.app import Gateway
from service.disclosure.groups import Grouping
from service.disclosure.record import (
    MIN_ITEMS,
    CountedPatients,
    DisclosureRecorder,
    RecordedResponses,
    fingerprint,
    write_basic,
)
from service.inflight import CallsInFlight
from service.store.database import Connection, Database


def _key(name: str) -> str:
    """A key id of the shape the ledger takes, from a name."""
    return "pk_" + (name.lower() + "a" * 16)[:16]


def _rpc(method: str) -> str:
    """A partner method's full name, as the ledger records it."""
    return f"/appointments.partner.v1.PartnerAppointmentService/{method}"


TERMS = models.ChargeTerms(1000, 1000, anomaly_factor=1000.0, anomaly_min=10**6, suspend_on_anomaly=False)


@pytest.fixture
async def db(database_dsn: str) -> AsyncIterator[Database]:
    database = await Database.connect(database_dsn, min_size=1, max_size=4)
    try:
        yield database
    finally:
        await database.close()


async def _partner(db: Database, name: str) -> tuple[UUID, models.LedgerEntry]:
    async with db.connection() as conn:
        partner = await conn.fetchval("INSERT INTO partners (display_name) VALUES ($1) RETURNING id", name)
    return partner, models.LedgerEntry(partner, _key(name), _rpc("GetAppointment"), "", models.View.BASIC)


async def _transactions(db: Database, partner: UUID) -> dict[str, int]:
    """Each recorded request id with the number of its transaction, in order of first appearance."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT requested_ids[1] AS shown, txid::text AS txid FROM disclosures WHERE partner_id = $1 ORDER BY id",
            partner,
        )
    numbers: dict[str, int] = {}
    return {row["shown"]: numbers.setdefault(row["txid"], len(numbers)) for row in rows}


async def test_a_ledger_writer_keeps_its_connection_while_calls_come_and_returns_it_when_they_stop(
    db: Database,
) -> None:
    partner, entry = await _partner(db, "Lingering")
    recorder = DisclosureRecorder(db, budget=5.0)
    in_use_during = []
    for n in range(5):  # one call at a time, as a quiet gateway gets them
        assert await recorder.record(entry, [(f"shown-{n}", None, None)], TERMS) == "ok"
        in_use, _, _ = db.pool_usage()
        in_use_during.append(in_use)
    # The writer gives the connection back LINGER after the last group; giving it back takes a
    # round trip of its own, so wait for the pool to show it rather than for a fixed time.
    await harness.eventually(lambda: db.pool_usage()[0] == 0, within=10)
    in_use_after, _, _ = db.pool_usage()

    assert in_use_during == [1] * 5  # the writer held one connection from the first group to the fifth
    assert in_use_after == 0  # and gave it back once no call came for a while
    assert len(await _transactions(db, partner)) == 5


async def test_a_group_waits_for_the_call_whose_read_is_underway(db: Database) -> None:
    # The group waits for the call underway, not for the 5 ms of gathering to run out first
    # (a busy machine can pause this process longer than that between two steps of the loop).
    partner, entry = await _partner(db, "Gathering")
    recorder = DisclosureRecorder(db, budget=5.0, grouping=Grouping(gather=60.0))
    async with asyncio.timeout(10):
        with recorder.expect_basic() as underway:
            first = asyncio.create_task(recorder.record(entry, [("shown-first", None, None)], TERMS))
            for _ in range(3):  # the writer starts and, with a call underway, gathers
                await asyncio.sleep(0)
            second = await recorder.record(entry, [("shown-second", None, None)], TERMS, underway)
        assert (await first, second) == ("ok", "ok")

    # Written alone, the first would have had its own transaction.
    assert await _transactions(db, partner) == {"shown-first": 0, "shown-second": 0}


async def test_a_quiet_call_and_a_call_that_gives_up_hold_no_group_back(db: Database) -> None:
    partner, entry = await _partner(db, "Hurried")
    # Were the group to wait its gathering out, the test would time out.
    recorder = DisclosureRecorder(db, budget=5.0, grouping=Grouping(gather=60.0))
    async with asyncio.timeout(10):
        assert await recorder.record(entry, [("shown-alone", None, None)], TERMS) == "ok"  # nothing underway

        with recorder.expect_basic():
            waiting = asyncio.create_task(recorder.record(entry, [("shown-waiting", None, None)], TERMS))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not waiting.done()  # gathering for the call underway
        # That call failed before asking for its record (left the block): the group goes at once.
        assert await waiting == "ok"

    assert await _transactions(db, partner) == {"shown-alone": 0, "shown-waiting": 1}


async def test_a_group_waits_no_longer_than_gather_for_a_call_that_never_comes(db: Database) -> None:
    partner, entry = await _partner(db, "Stalled")
    recorder = DisclosureRecorder(db, budget=5.0)
    with recorder.expect_basic():  # underway for the whole test, never asking for a record
        async with asyncio.timeout(Grouping().gather + 5):
            assert await recorder.record(entry, [("shown-anyway", None, None)], TERMS) == "ok"

    assert await _transactions(db, partner) == {"shown-anyway": 0}


def _in_flight(count: int) -> CallsInFlight:
    """A count of calls in their handlers, as the partner listener keeps it."""
    calls = CallsInFlight()
    calls.count = count
    return calls


async def test_a_group_holds_for_the_calls_in_flight_while_their_records_keep_coming(db: Database) -> None:
    partner, entry = await _partner(db, "Holding")
    # Three calls in their handlers; a group waits for the other two, however long they take.
    grouping = Grouping(hold=60.0, hold_gap=60.0)
    recorder = DisclosureRecorder(db, budget=5.0, grouping=grouping, in_flight=_in_flight(3))
    async with asyncio.timeout(10):
        first = asyncio.create_task(recorder.record(entry, [("shown-held-1", None, None)], TERMS))
        for _ in range(3):  # the writer starts and, with two more calls in flight, holds
            await asyncio.sleep(0)
        second = asyncio.create_task(recorder.record(entry, [("shown-held-2", None, None)], TERMS))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not first.done() and not second.done()  # one call is still in flight
        third = await recorder.record(entry, [("shown-held-3", None, None)], TERMS)
        assert (await first, await second, third) == ("ok", "ok", "ok")

    # Not held, the first would have been written alone as soon as it came.
    assert await _transactions(db, partner) == {"shown-held-1": 0, "shown-held-2": 0, "shown-held-3": 0}


async def test_a_call_alone_in_flight_is_written_at_once(db: Database) -> None:
    partner, entry = await _partner(db, "Unheld")
    recorder = DisclosureRecorder(db, budget=5.0, grouping=Grouping(hold=60.0, hold_gap=60.0), in_flight=_in_flight(1))
    async with asyncio.timeout(10):  # were it held, the test would time out
        for n in range(2):
            assert await recorder.record(entry, [(f"shown-unheld-{n}", None, None)], TERMS) == "ok"

    assert await _transactions(db, partner) == {"shown-unheld-0": 0, "shown-unheld-1": 1}


@pytest.mark.parametrize(
    ("name", "grouping"),
    [("Quietened", Grouping(hold=60.0, hold_gap=0.05)), ("Outheld", Grouping(hold=0.05, hold_gap=60.0))],
    ids=["records-stop-coming", "hold-runs-out"],
)
async def test_a_holding_group_is_written_when_records_stop_coming_or_its_hold_runs_out(
    db: Database, name: str, grouping: Grouping
) -> None:
    partner, entry = await _partner(db, name)
    # Four other calls in flight that never bring a record (a refusal, a consent grant, a slow read).
    recorder = DisclosureRecorder(db, budget=5.0, grouping=grouping, in_flight=_in_flight(5))
    async with asyncio.timeout(10):  # well under the 60 s that the other bound would allow
        assert await recorder.record(entry, [("shown-unheld", None, None)], TERMS) == "ok"

    assert await _transactions(db, partner) == {"shown-unheld": 0}


async def test_the_partner_listener_counts_its_calls_while_their_handlers_run(
    gateway: Gateway, world: harness.World, database_dsn: str
) -> None:
    practitioner = await world.practitioner("Dr. Inflight Counted")
    patient = await world.patient(given_name="Inflightgiven")
    await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Inflight Counted", practitioner)
    assert gateway.calls_in_flight == 0  # the internal listener's calls that built the world are not counted

    locker = await asyncpg.connect(database_dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE appointments IN ACCESS EXCLUSIVE MODE")  # every read now waits
            listing = [asyncio.create_task(partner.list()) for _ in range(2)]
            counted = await harness.eventually(lambda: gateway.calls_in_flight == 2, within=10)
    finally:
        await locker.close()
    pages = await asyncio.gather(*listing)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await partner.get("apt_" + "a" * 26)  # well shaped, matching nothing: read, recorded and refused

    assert counted
    assert [len(page.appointments) for page in pages] == [1, 1]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert gateway.calls_in_flight == 0  # answered or refused, every call left the count


async def test_basic_and_contact_calls_underway_are_waited_for_apart(db: Database) -> None:
    partner, entry = await _partner(db, "Apart")
    recorder = DisclosureRecorder(db, budget=5.0, grouping=Grouping(gather=60.0))
    with recorder.expect_contact():  # a contact call underway does not hold basic groups back
        async with asyncio.timeout(10):
            assert await recorder.record(entry, [("shown-basic", None, None)], TERMS) == "ok"

    assert await _transactions(db, partner) == {"shown-basic": 0}


async def test_a_caller_that_goes_away_leaves_its_record_to_be_written(db: Database) -> None:
    partner, entry = await _partner(db, "Gone")
    # The group gathers until the call underway comes.
    recorder = DisclosureRecorder(db, budget=5.0, grouping=Grouping(gather=60.0))
    async with asyncio.timeout(10):
        with recorder.expect_basic() as underway:  # the group gathers, so the caller is cancelled before it is written
            gone = asyncio.create_task(recorder.record(entry, [("shown-gone", None, None)], TERMS))
            await asyncio.sleep(0)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            stayed = await recorder.record(entry, [("shown-stayed", None, None)], TERMS, underway)

    assert stayed == "ok"
    # The ledger may hold a disclosure that was not sent, never the reverse.
    assert await _transactions(db, partner) == {"shown-gone": 0, "shown-stayed": 0}


async def _counted(db: Database, partner: UUID) -> tuple[set[UUID], int]:
    """The partner's patients of the day, and its count of them."""
    async with db.connection() as conn:
        patients = {r["patient_id"] for r in await conn.fetch(_TODAY_PATIENTS, partner)}
        reached = await conn.fetchval(_TODAY_REACHED, partner)
    return patients, int(reached or 0)


_TODAY = "(statement_timestamp() AT TIME ZONE 'UTC')::date"
_TODAY_PATIENTS = f"SELECT patient_id FROM partner_daily_patients WHERE partner_id = $1 AND day = {_TODAY}"
_TODAY_REACHED = f"SELECT patients_reached FROM partner_daily_usage WHERE partner_id = $1 AND day = {_TODAY}"


async def test_patients_counted_today_are_not_charged_again_until_the_counters_start_over(db: Database) -> None:
    partner, _ = await _partner(db, "Recounted")
    entry = models.LedgerEntry(partner, _key("recounted"), _rpc("ListAppointments"), "", models.View.BASIC)
    first, second, third, later = (uuid4() for _ in range(4))
    page = [(f"shown-{n}", uuid4(), patient) for n, patient in enumerate((first, second, third))]
    memo, terms = CountedPatients(), {partner: TERMS}
    async with db.statements(5.0) as conn:
        await write_basic(conn, [(entry, page)], terms, memo)
        # Behind the memo's back, one counted patient is forgotten while the counter row stands:
        # only a patient the memo sent is counted again.
        await conn.execute("DELETE FROM partner_daily_patients WHERE patient_id = $1", first)
        await write_basic(conn, [(entry, [*page, ("shown-later", uuid4(), later)])], terms, memo)
        after_memo = await _counted(db, partner)
        await write_basic(conn, [(entry, page)], terms, CountedPatients())  # a memo that knows nothing
        after_empty_memo = await _counted(db, partner)
        # The day's counters started over: the memo's knowledge is of the old row.
        for table in ("partner_daily_patients", "partner_daily_usage"):
            await conn.execute(f"DELETE FROM {table} WHERE partner_id = $1", partner)
        await write_basic(conn, [(entry, page)], terms, memo)
        after_restart = await _counted(db, partner)

    assert after_memo == ({second, third, later}, 4)
    assert after_empty_memo == ({first, second, third, later}, 5)
    assert after_restart == ({first, second, third}, 3)
    async with db.connection() as conn:  # every record holds its whole page all the same
        pages = await conn.fetch("SELECT patient_ids FROM disclosures WHERE partner_id = $1 ORDER BY id", partner)
    assert [len(row["patient_ids"]) for row in pages] == [3, 4, 3, 3]


async def _records(db: Database, partner: UUID) -> list[tuple[int, int | None, int]]:
    """The partner's records, in order: id, the record it repeats, and how many items it reads as."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            "SELECT d.id, d.items_of, (SELECT count(*) FROM disclosure_items i WHERE i.id = d.id) AS items "
            "FROM disclosures d WHERE d.partner_id = $1 ORDER BY d.id",
            partner,
        )
    return [(row["id"], row["items_of"], row["items"]) for row in rows]


async def test_a_repeated_page_is_a_reference_that_still_counts_its_patients_once_the_counters_start_over(
    db: Database,
) -> None:
    partner, _ = await _partner(db, "Repeating")
    bystander, bystander_entry = await _partner(db, "Bystander")
    entry = models.LedgerEntry(partner, _key("repeating"), _rpc("ListAppointments"), "", models.View.BASIC)
    patients = [uuid4() for _ in range(MIN_ITEMS)]
    page = [(f"shown-{n}", uuid4(), patient) for n, patient in enumerate(patients)]
    other_page = [*page[1:], ("shown-other", uuid4(), uuid4())]
    memo, recorded, terms = CountedPatients(), RecordedResponses(), {partner: TERMS}
    async with db.statements(5.0) as conn:
        for listed in (page, page, other_page, page):
            await write_basic(conn, [(entry, listed)], terms, memo, recorded)
        before_restart = await _counted(db, partner)
        # The day's counters started over: the page repeated is charged again, from the record it names
        # (in a group with another partner's call, so the patients are sorted out by partner).
        for table in ("partner_daily_patients", "partner_daily_usage"):
            await conn.execute(f"DELETE FROM {table} WHERE partner_id = $1", partner)
        group = [(bystander_entry, [("shown-bystander", uuid4(), uuid4())]), (entry, page)]
        await write_basic(conn, group, {**terms, bystander: TERMS}, memo, recorded)
        after_restart = await _counted(db, partner)
        await write_basic(conn, [(entry, page)], terms, memo, recorded)  # a new day's record in full

    [(first, *_), *_] = records = await _records(db, partner)
    assert [(items_of, items) for _, items_of, items in records] == [
        (None, len(page)),
        (first, len(page)),
        (None, len(other_page)),
        (first, len(page)),
        (first, len(page)),  # after the restart: a reference still, its patients charged from the record named
        (None, len(page)),  # the new counter row's first record of the page
    ]
    assert before_restart == ({*patients, other_page[-1][2]}, len(patients) + 1)
    assert after_restart == (set(patients), len(patients))


async def test_a_reference_the_database_refuses_is_written_in_full_and_the_memo_forgotten(db: Database) -> None:
    partner, _ = await _partner(db, "Refused")
    stranger, stranger_entry = await _partner(db, "Stranger")
    entry = models.LedgerEntry(partner, _key("refused"), _rpc("ListAppointments"), "", models.View.BASIC)
    page = [(f"shown-{n}", uuid4(), uuid4()) for n in range(MIN_ITEMS)]
    memo, recorded = CountedPatients(), RecordedResponses()
    async with db.statements(5.0) as conn:
        await write_basic(conn, [(stranger_entry, page)], {stranger: TERMS})
        await write_basic(conn, [(entry, page)], {partner: TERMS}, memo, recorded)
        [(mine, _, _)] = await _records(db, partner)
        [(theirs, _, _)] = await _records(db, stranger)
        printed = fingerprint(*([str(v) for v in column] for column in zip(*page, strict=True)))
        assert printed is not None
        since = memo.since(partner)
        assert since is not None and recorded.find(partner, since, printed) == mine
        # A record of the partner's from the day before (what the memo names right after midnight), written
        # past the trigger that stamps the time of the insert.
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            yesterday = await conn.fetchval(
                "INSERT INTO disclosures (partner_id, key_id, view, rpc, disclose_time, outcome, requested_ids, "
                "appointment_ids, patient_ids) SELECT partner_id, key_id, view, rpc, "
                "disclose_time - interval '1 day', outcome, requested_ids, appointment_ids, patient_ids "
                "FROM disclosures WHERE id = $1 RETURNING id",
                mine,
            )
        # The memo now names the other partner's record (as a bug would), a record that is not there (as
        # after a failover that lost it), then yesterday's: each time the page is written in full.
        for wrong in (theirs, mine + 10**6, yesterday):
            recorded.add(partner, since, printed, wrong)
            assert await write_basic(conn, [(entry, page)], {partner: TERMS}, memo, recorded) == {partner: "ok"}
            assert len(recorded) == 0

    records = [r for r in await _records(db, partner) if r[0] != yesterday]
    assert [(items_of, items) for _, items_of, items in records] == [(None, len(page))] * 4


async def _statistic(conn: Connection, query: str) -> int:
    """A cumulative statistic read by ``query``, this connection's activity included (PostgreSQL 15 statistics)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # the flush happens as this statement's transaction ends
    return int(await conn.fetchval(query) or 0)


async def _ledger_scans(conn: Connection) -> int:
    """Sequential scans of ``disclosures`` so far."""
    return await _statistic(conn, "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'disclosures'")


async def test_recording_never_scans_the_ledger_even_with_statements_planned_while_it_was_empty(db: Database) -> None:
    partner, _ = await _partner(db, "Planned")
    bystander, _ = await _partner(db, "Bulk")
    entry = models.LedgerEntry(partner, _key("planned"), _rpc("ListAppointments"), "", models.View.BASIC)
    page = [(f"shown-{n}", uuid4(), uuid4()) for n in range(MIN_ITEMS)]
    memo, recorded, terms = CountedPatients(), RecordedResponses(), {partner: TERMS}
    async with db.statements(5.0) as conn:
        await write_basic(conn, [(entry, page)], terms, memo, recorded)
        await conn.execute("ANALYZE disclosures")  # as autovacuum does while the ledger is new and small
        for _ in range(8):  # the function's statements are planned, and their plans kept, on that small ledger
            await write_basic(conn, [(entry, page)], terms, memo, recorded)
        await conn.execute(
            "INSERT INTO disclosures (partner_id, key_id, view, rpc, outcome, requested_ids, "
            "appointment_ids, patient_ids) SELECT $1, 'pk_bulkaaaaaaaaaaaa', 1, $2, 1, ARRAY['shown'], "
            "ARRAY[gen_random_uuid()], ARRAY[gen_random_uuid()] FROM generate_series(1, 5000)",
            bystander,
            _rpc("ListAppointments"),
        )
        before = await _ledger_scans(conn)
        for _ in range(10):  # references checked, and patients charged from the record they name
            await write_basic(conn, [(entry, page)], terms, memo, recorded)
        await conn.execute("DELETE FROM partner_daily_usage WHERE partner_id = $1", partner)
        await write_basic(conn, [(entry, page)], terms, memo, recorded)
        after = await _ledger_scans(conn)

    assert [items_of for _, items_of, _ in await _records(db, partner)].count(None) == 1  # the rest are references
    assert after == before


async def _charge_calls(conn: Connection) -> int:
    """Calls of ``charge_partner_usage`` so far, counted while ``track_functions`` is on."""
    return await _statistic(
        conn,
        "SELECT calls FROM pg_stat_user_functions WHERE funcname = 'charge_partner_usage' AND schemaname = 'public'",
    )


async def test_a_group_with_no_patient_left_to_charge_does_not_call_the_charge(db: Database) -> None:
    partner, _ = await _partner(db, "Uncharged")
    entry = models.LedgerEntry(partner, _key("uncharged"), _rpc("ListAppointments"), "", models.View.BASIC)
    page = [(f"shown-{n}", uuid4(), uuid4()) for n in range(MIN_ITEMS)]
    newcomer = ("shown-new", uuid4(), uuid4())
    memo, recorded, terms = CountedPatients(), RecordedResponses(), {partner: TERMS}
    async with db.statements(5.0) as conn:
        await conn.execute("SET track_functions = 'pl'")
        calls = [await _charge_calls(conn)]
        # The page's first record charges its patients; the page again (a reference) and its first item
        # alone (written in full, a patient counted already) have none left; a new patient has.
        for listed in (page, page, page[:1], [newcomer]):
            outcome = await write_basic(conn, [(entry, listed)], terms, memo, recorded)
            assert outcome == {partner: "ok"}
            calls.append(await _charge_calls(conn))

    assert [after - before for before, after in itertools.pairwise(calls)] == [1, 0, 0, 1]
    assert await _counted(db, partner) == ({p for _, _, p in [*page, newcomer]}, len(page) + 1)
    assert [(items_of is None, items) for _, items_of, items in await _records(db, partner)] == [
        (True, len(page)),
        (False, len(page)),
        (True, 1),
        (True, 1),
    ]


async def test_an_answer_read_on_a_replica_that_the_primary_does_not_authorise_is_refused_alone(db: Database) -> None:
    partner, entry = await _partner(db, "Replicated")
    async with db.connection() as conn:
        granted, ungranted = [
            await conn.fetchval(
                "INSERT INTO practitioners (display_name, specialty) VALUES ($1, 'General practice') RETURNING id", name
            )
            for name in ("Dr. Granted", "Dr. Revoked")
        ]
        await conn.execute(
            "INSERT INTO partner_keys (id, partner_id, secret_hash) VALUES ($1, $2, $3)",
            entry.key_id,
            partner,
            b"k" * 32,
        )
        await conn.execute(
            "INSERT INTO practitioner_grants (partner_id, practitioner_id) VALUES ($1, $2)", partner, granted
        )
    recorder = DisclosureRecorder(db, budget=5.0, grouping=Grouping(gather=60.0))

    async with asyncio.timeout(10):
        with recorder.expect_basic() as second, recorder.expect_basic() as third:
            # The first starts a group, which then waits for the two calls underway: one statement for all three.
            refused = asyncio.create_task(
                recorder.record(entry, [("shown-refused", None, None)], TERMS, shown=(granted, ungranted))
            )
            for _ in range(3):
                await asyncio.sleep(0)
            answers = await asyncio.gather(
                recorder.record(entry, [("shown-authorised", None, None)], TERMS, second, shown=(granted,)),
                recorder.record(entry, [("shown-from-primary", None, None)], TERMS, third),
            )
        answers.insert(0, await refused)

    assert answers == [None, "ok", "ok"]
    # The refused answer left nothing; the other two were written together, once.
    assert await _transactions(db, partner) == {"shown-authorised": 0, "shown-from-primary": 0}
