"""The disclosure ledger: a record per response and per refusal, append-only, verifiable."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import audit_pb2
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE
from harness import World

from service.disclosure.record import MIN_ITEMS
from service.store import ledger

LIST_RPC = "/appointments.partner.v1.PartnerAppointmentService/ListAppointments"
CONTACT_RPC = "/appointments.partner.v1.PartnerAppointmentService/GetAppointmentContact"


@pytest.fixture
async def admin(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the test database, for tampering as an attacker with database access would."""
    conn = await asyncpg.connect(database_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _three_appointments(world: World) -> tuple[str, list[Any], harness.PartnerHandle]:
    practitioner = await world.practitioner()
    patients = [await world.patient() for _ in range(3)]
    for patient in patients:
        await world.appointment(practitioner, patient.patient_id)
    return practitioner, patients, await world.partner("A", practitioner)


async def test_every_listed_appointment_gets_one_basic_record(world: World) -> None:
    _, patients, partner = await _three_appointments(world)

    listed = await partner.list_all()
    records = await world.disclosures(partner_id=partner.partner_id)

    assert len(records) == len(listed) == 3
    assert {r.patient_id for r in records} == {p.patient_id for p in patients}
    assert {r.appointment_id for r in records}.isdisjoint({a.appointment_id for a in listed})  # internal ids
    for record in records:
        assert record.view == audit_pb2.DISCLOSURE_VIEW_BASIC
        assert record.outcome == audit_pb2.DISCLOSURE_OUTCOME_DISCLOSED
        assert record.key_id == partner.key_id
        assert record.rpc == LIST_RPC
        assert list(record.contact_fields) == []


async def test_a_page_is_one_record_holding_its_appointments_in_order(world: World, admin: asyncpg.Connection) -> None:
    _, _, partner = await _three_appointments(world)

    listed = await partner.list_all()
    rows = await admin.fetch("SELECT id, appointment_ids, patient_ids, requested_ids FROM disclosures")
    items = await world.disclosures(partner_id=partner.partner_id)

    [row] = rows
    assert [str(a) for a in row["appointment_ids"]] == [r.appointment_id for r in items]
    assert [str(p) for p in row["patient_ids"]] == [r.patient_id for r in items]
    assert list(row["requested_ids"]) == [a.appointment_id for a in listed]  # what the partner was shown
    assert [(r.disclosure_id, r.item) for r in items] == [(row["id"], 0), (row["id"], 1), (row["id"], 2)]


@pytest.mark.parametrize(
    ("cast", "values"),
    [
        ("text[]", ["apt_plain", 'a "quoted" id', "back\\slash", "NULL", "", "comma, {brace}", "été"]),
        ("text[]", ["apt_one", None, "apt_two"]),
        ("uuid[]", [uuid.UUID(int=1), uuid.UUID(int=2**128 - 1)]),
        ("int[]", [1, 2, 50]),
        ("bigint[]", [0, 2**62]),
        ("float8[]", [3.0, 0.1, 1e-300, float("inf")]),
        ("bool[]", [True, False]),
        ("uuid[]", []),
    ],
)
async def test_group_records_pass_their_arrays_as_literals_postgresql_reads_back_exactly(
    admin: asyncpg.Connection, cast: str, values: list[object]
) -> None:
    literal = ledger.array_literal(values)

    assert await admin.fetchval(f"SELECT $1::text::{cast}", literal) == values


async def test_a_contact_disclosure_records_its_fields_and_consent(world: World) -> None:
    _, patients, partner = await _three_appointments(world)
    [first, *_] = await partner.list_all()
    first_record = (await world.disclosures())[0]  # the ledger knows the internal patient of the first row
    [owner] = [p for p in patients if p.patient_id == first_record.patient_id]
    consent = await world.consent(owner.patient_id, partner.partner_id, [CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE])

    await partner.contact(first.appointment_id, consent.token)

    [record] = [r for r in await world.disclosures(patient_id=owner.patient_id) if r.rpc == CONTACT_RPC]
    assert record.view == audit_pb2.DISCLOSURE_VIEW_CONTACT
    assert list(record.contact_fields) == [CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]
    assert record.consent_id == consent.consent_id


async def test_refused_attempts_are_recorded_as_denied(world: World) -> None:
    _, _, partner = await _three_appointments(world)
    [first, *_] = await partner.list_all()
    probe = "apt_" + "a" * 26

    for call in (partner.contact(first.appointment_id, ""), partner.get(probe)):
        with pytest.raises(grpc.aio.AioRpcError):
            await call

    denied = [r for r in await world.disclosures() if r.outcome == audit_pb2.DISCLOSURE_OUTCOME_DENIED]
    assert {r.denial_reason for r in denied} == {"CONSENT_REQUIRED", "NOT_FOUND"}
    not_found = next(r for r in denied if r.denial_reason == "NOT_FOUND")
    assert not_found.appointment_id == "" and not_found.patient_id == ""


async def test_listing_a_practitioner_not_granted_is_recorded_as_denied(world: World) -> None:
    _, _, partner = await _three_appointments(world)
    stranger = await world.practitioner()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.list(practitioner_id=stranger)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    [record] = [r for r in await world.disclosures() if r.outcome == audit_pb2.DISCLOSURE_OUTCOME_DENIED]
    assert (record.rpc, record.denial_reason, record.appointment_id) == (LIST_RPC, "NOT_FOUND", "")


async def test_list_disclosures_filters_and_pages_without_gaps(world: World) -> None:
    _, patients, partner = await _three_appointments(world)
    for _ in range(4):
        await partner.list_all()

    everything = await world.disclosures(page_size=5)
    one_patient = await world.disclosures(patient_id=patients[0].patient_id, page_size=1)

    # One record per response, one message per appointment; pages of 5 cut records in the middle.
    assert [(r.disclosure_id, r.item) for r in everything] == [(d, i) for d in range(1, 5) for i in range(3)]
    assert len(one_patient) == 4
    assert {r.patient_id for r in one_patient} == {patients[0].patient_id}


async def test_the_ledger_refuses_updates_and_deletes_even_from_its_owner(
    world: World, admin: asyncpg.Connection
) -> None:
    _, _, partner = await _three_appointments(world)
    await partner.list_all()

    await admin.execute("SELECT chain_disclosures(1000)")
    assert await harness.eventually(lambda: harness.all_chained(admin))
    assert await admin.fetchval("SELECT count(*) FROM disclosure_chain") == 1

    for statement in (
        "UPDATE disclosures SET denial_reason = 'x'",
        "DELETE FROM disclosures",
        "TRUNCATE disclosures",
        "UPDATE disclosure_chain SET hash = prev_hash",
        "DELETE FROM disclosure_chain",
        "TRUNCATE disclosure_chain",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await admin.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO disclosures (partner_id) VALUES (gen_random_uuid())",
        "UPDATE disclosures SET denial_reason = 'x'",
        "DELETE FROM disclosures",
        "SELECT given_name FROM patients",
        "SELECT email FROM patients",
        "SELECT reason FROM appointments",
        "SELECT * FROM appointments",
        "UPDATE ledger_head SET seq = 0",
        "SELECT * FROM disclosure_chain",
        "DELETE FROM disclosure_chain",
        "SELECT chain_disclosures(10)",
    ],
)
async def test_the_partner_role_cannot_touch_contact_reason_or_ledger(
    admin: asyncpg.Connection, statement: str
) -> None:
    async with admin.transaction():
        await admin.execute("SET LOCAL ROLE apptgate_partner")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await admin.execute(statement)


async def test_a_response_is_not_sent_when_its_audit_record_cannot_be_written(
    world: World, admin: asyncpg.Connection
) -> None:
    _, _, partner = await _three_appointments(world)
    # Every insert into the ledger now fails, whichever path writes it.
    await admin.execute(
        "CREATE TRIGGER refuse_all BEFORE INSERT ON disclosures FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change()"
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await partner.list_all()

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert await admin.fetchval("SELECT count(*) FROM disclosures") == 0


async def _audit_cli(database_dsn: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return await harness.audit_cli(database_dsn, tmp_path / "data", *args)


_tampering = harness.owner_tampering


async def _verify_refuses(database_dsn: str, tmp_path: Path, *args: str) -> str:
    """Run ``audit verify``, check that it fails, and return what it reported."""
    code, _, err = await _audit_cli(database_dsn, tmp_path, "verify", *args)
    assert code == 1, err
    return err


async def test_audit_verify_passes_then_catches_a_record_altered_in_the_database(
    world: World, admin: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    _, _, partner = await _three_appointments(world)
    for _ in range(3):
        await partner.list_all()
    assert await harness.eventually(lambda: harness.all_chained(admin))
    code, out, err = await _audit_cli(database_dsn, tmp_path, "verify")
    assert code == 0, err
    assert "intact: 3 records" in out

    async with _tampering(admin) as conn:
        # Hide a patient from any breach report by pointing the record's first appointment at another patient.
        await conn.execute(
            "UPDATE disclosures SET patient_ids[1] = patient_ids[2] "
            "WHERE id = (SELECT id FROM disclosure_chain WHERE seq = 2)"
        )

    assert "record 2 was altered" in await _verify_refuses(database_dsn, tmp_path)


async def test_audit_verify_catches_a_deleted_record_and_a_rewritten_chain(
    world: World, admin: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    _, _, partner = await _three_appointments(world)
    for _ in range(3):
        await partner.list_all()
    assert await harness.eventually(lambda: harness.all_chained(admin))
    assert (await _audit_cli(database_dsn, tmp_path, "verify"))[0] == 0  # seals record 3
    second = await admin.fetchval("SELECT id FROM disclosure_chain WHERE seq = 2")

    async with _tampering(admin) as conn:
        await conn.execute("DELETE FROM disclosures WHERE id = $1", second)
    assert "record 2 is missing" in await _verify_refuses(database_dsn, tmp_path)

    # Its place in the chain removed too: a gap.
    async with _tampering(admin) as conn:
        await conn.execute("DELETE FROM disclosure_chain WHERE id = $1", second)
    assert "records 2..2 are missing" in await _verify_refuses(database_dsn, tmp_path)

    # Rewrite the whole chain consistently, as someone who can write the tables could:
    # only the seal (keyed by a secret the database never sees) still tells.
    async with _tampering(admin) as conn:
        await conn.execute("UPDATE disclosure_chain SET seq = seq - 1 WHERE seq > 2")
        rows = await conn.fetch("SELECT id, seq FROM disclosure_chain ORDER BY seq")
        previous = bytes(32)
        for row in rows:
            previous = await conn.fetchval(
                "UPDATE disclosure_chain c SET prev_hash = $1, hash = disclosure_digest(d, c.seq, $1, c.chain_time) "
                "FROM disclosures d WHERE d.id = c.id AND c.id = $2 RETURNING c.hash",
                previous,
                row["id"],
            )
        await conn.execute("UPDATE ledger_head SET seq = $1, hash = $2", rows[-1]["seq"], previous)
    err = await _verify_refuses(database_dsn, tmp_path)
    assert "sealed record 3 is missing" in err
    assert "record 2 was altered" not in err  # the rewrite itself is consistent


async def test_a_page_listed_again_is_recorded_by_reference_and_reads_as_the_same_items_everywhere(
    world: World, admin: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    practitioner = await world.practitioner()
    patients = [await world.patient() for _ in range(MIN_ITEMS + 1)]
    for patient in patients:
        await world.appointment(practitioner, patient.patient_id)
    partner = await world.partner("Agenda", practitioner)
    second_key = await world.registry.IssuePartnerKey(
        harness.registry_pb.IssuePartnerKeyRequest(partner_id=partner.partner_id), metadata=world.internal_metadata
    )
    other_key = harness.PartnerHandle(partner.partner_id, second_key.key_id, second_key.secret, partner.stub)

    first = await partner.list_all()
    again = await other_key.list_all()  # the same page through the partner's other key (a stolen one, say)
    rows = await admin.fetch("SELECT id, key_id, items_of, patient_ids, items_digest FROM disclosures ORDER BY id")
    items = await world.disclosures(partner_id=partner.partner_id)
    one_patient = await world.disclosures(patient_id=patients[0].patient_id)
    report = await world.audit.BreachReport(
        harness.audit_pb.BreachReportRequest(
            partner_id=partner.partner_id,
            start_time=harness.ts(datetime(2000, 1, 1, tzinfo=UTC)),
            end_time=harness.ts(datetime(2100, 1, 1, tzinfo=UTC)),
            key_id=other_key.key_id,
        ),
        metadata=world.internal_metadata,
    )
    assert await harness.eventually(lambda: harness.all_chained(admin))
    code, out, err = await _audit_cli(database_dsn, tmp_path, "verify")

    assert [a.appointment_id for a in again] == [a.appointment_id for a in first]
    [original, reference] = rows
    assert len(original["patient_ids"]) == len(patients) and original["items_of"] is None
    assert reference["items_of"] == original["id"] and reference["patient_ids"] is None
    assert reference["key_id"] == other_key.key_id and reference["items_digest"] is not None
    by_record = {}
    for r in items:
        by_record.setdefault(r.disclosure_id, []).append((r.item, r.appointment_id, r.patient_id))
    assert by_record[reference["id"]] == by_record[original["id"]]
    assert [r.disclosure_id for r in one_patient] == [original["id"], reference["id"]]
    assert {p.patient_id for p in report.patients} == {p.patient_id for p in patients}  # the other key's alone
    assert code == 0, err
    assert "intact: 2 records" in out

    async with _tampering(admin) as conn:  # the page's first patient hidden in the record both name
        await conn.execute("UPDATE disclosures SET patient_ids[1] = patient_ids[2] WHERE id = $1", original["id"])
    err = await _verify_refuses(database_dsn, tmp_path)
    assert "record 1 was altered" in err
    assert "record 2 repeats items that are not those of the record it names" in err

    async with _tampering(admin) as conn:
        await conn.execute("DELETE FROM disclosures WHERE id = $1", original["id"])
    assert "record 2 repeats the items of a record that is missing" in await _verify_refuses(database_dsn, tmp_path)


async def test_audit_verify_catches_a_reference_written_past_the_statement_to_a_record_of_another_day(
    world: World, admin: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    practitioner = await world.practitioner()
    for _ in range(MIN_ITEMS):
        await world.appointment(practitioner, (await world.patient()).patient_id)
    partner = await world.partner("Agenda", practitioner)
    await partner.list_all()
    # A reference the record statement would refuse (it names a record of the day before), written
    # directly as someone with rights on the table could; its digest and the chain are consistent.
    async with _tampering(admin) as conn:
        await conn.execute(
            "INSERT INTO disclosures (partner_id, key_id, view, rpc, disclose_time, outcome, items_of, items_digest) "
            "SELECT partner_id, key_id, view, rpc, disclose_time + interval '1 day', outcome, id, "
            "disclosure_items_digest(d) FROM disclosures d"
        )
    assert await harness.eventually(lambda: harness.all_chained(admin))

    assert "record 2 repeats the items of a record of another day" in await _verify_refuses(database_dsn, tmp_path)


@pytest.mark.parametrize(
    ("shape", "columns"),
    [
        ("a reference with items of its own", "items_of, items_digest, requested_ids, appointment_ids, patient_ids"),
        ("a reference without its items digest", "items_of"),
        ("an items digest without a reference", "items_digest"),
    ],
)
async def test_the_ledger_refuses_a_record_half_a_reference(
    admin: asyncpg.Connection, shape: str, columns: str
) -> None:
    values = {"items_of": "1", "items_digest": "'\\x00'", "requested_ids": "ARRAY['shown']",
              "appointment_ids": "ARRAY[gen_random_uuid()]", "patient_ids": "ARRAY[gen_random_uuid()]"}  # fmt: skip
    chosen = columns.split(", ")
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await admin.execute(
            "INSERT INTO disclosures (partner_id, key_id, view, rpc, outcome, "
            f"{columns}) VALUES (gen_random_uuid(), 'pk_halfaaaaaaaaaaaa', 1, $1, 1, "
            f"{', '.join(values[c] for c in chosen)})",
            LIST_RPC,
        )
    assert refused.value.constraint_name == "disclosures_items_check"  # named as the constraint it replaced


async def test_audit_verify_catches_a_record_dropped_from_the_chain(
    world: World, admin: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    _, _, partner = await _three_appointments(world)
    for _ in range(2):
        await partner.list_all()
    assert await harness.eventually(lambda: harness.all_chained(admin))
    assert (await _audit_cli(database_dsn, tmp_path, "verify", "--no-seal"))[0] == 0

    # The last record's place in the chain removed and the head moved back: the chain
    # itself is consistent, but the sequencer has passed a record that is not in it.
    async with _tampering(admin) as conn:
        first_hash = await conn.fetchval("SELECT hash FROM disclosure_chain WHERE seq = 1")
        await conn.execute("DELETE FROM disclosure_chain WHERE seq = 2")
        await conn.execute("UPDATE ledger_head SET seq = 1, hash = $1", first_hash)

    err = await _verify_refuses(database_dsn, tmp_path, "--no-seal")
    assert "1 record the sequencer has passed is not in the chain" in err


async def test_breach_report_refuses_a_missing_partner_or_window(world: World) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.audit.BreachReport(harness.audit_pb.BreachReportRequest(), metadata=world.internal_metadata)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.bad_fields(caught.value) == {"partner_id", "start_time", "end_time"}


async def test_breach_report_as_csv_from_the_command_line(world: World, database_dsn: str, tmp_path: Path) -> None:
    _, patients, partner = await _three_appointments(world)
    await partner.list_all()

    code, out, err = await _audit_cli(
        database_dsn, tmp_path, "breach-report", "--partner", partner.partner_id,
        "--since", "2000-01-01T00:00:00Z", "--until", "2100-01-01T00:00:00Z", "--format", "csv",
    )  # fmt: skip

    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == (
        "patient_id,appointment_ids,contact_fields,first_disclosure_time,last_disclosure_time,consent_requests,views,"
        "appointments.start_time,appointments.practitioner_display_name,appointments.practitioner_specialty"
    )
    assert {line.split(",")[0] for line in lines[1:]} == {p.patient_id for p in patients}
    assert '"patients": "3"' in err  # the totals' JSON mapping: 64-bit integers as strings


async def test_a_breach_report_of_an_unknown_partner_or_key_or_a_reversed_window_is_refused_in_one_line(
    world: World, database_dsn: str, tmp_path: Path
) -> None:
    partner = await world.partner("Reported Agenda")
    other = await world.partner("Other Agenda")
    earlier = tmp_path / "earlier-report.csv"
    earlier.write_text("an earlier report\n")
    window = ("--since", "2000-01-01T00:00:00Z", "--until", "2100-01-01T00:00:00Z")

    async def refused(*args: str) -> str:
        code, out, err = await _audit_cli(database_dsn, tmp_path, "breach-report", *args, "--output", str(earlier))
        assert code == 2 and out == "" and "Traceback" not in err, err
        [line] = err.strip().splitlines()
        return line

    unknown = await refused("--partner", "00000000-0000-4000-8000-000000000000", *window)
    foreign_key = await refused("--partner", partner.partner_id, "--key", other.key_id, *window)
    not_a_key = await refused("--partner", partner.partner_id, "--key", "pk_nope", *window)
    backwards = await refused(
        "--partner", partner.partner_id, "--since", "2030-02-01T00:00:00Z", "--until", "2030-01-01T00:00:00Z"
    )
    code, _, err = await _audit_cli(
        database_dsn, tmp_path, "breach-report", "--partner", partner.partner_id, "--key", partner.key_id, *window
    )

    assert unknown == "apptgate: --partner: no partner has the id 00000000-0000-4000-8000-000000000000"
    assert foreign_key == f"apptgate: --key: the partner {partner.partner_id} has no key {other.key_id}"
    assert not_a_key.startswith("apptgate: --key: 'pk_nope' is not a key id")
    assert backwards.startswith("apptgate: --until (2030-01-01T00:00:00+00:00) is not after --since")
    assert earlier.read_text() == "an earlier report\n"  # a refused report leaves the file it would have replaced
    assert code == 0 and '"patients": "0"' in err  # its own key, nothing disclosed: an honest empty report
