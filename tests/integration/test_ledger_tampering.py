"""The ledger against its own database owner: every tampering is done as the owner, past the triggers.

Each test first shows the ledger verifying, then rewrites it as someone who owns the
tables would (``session_replication_role = replica`` turns the triggers off; a
constraint can be dropped), then runs ``python -m service audit verify`` and
expects it to exit 1 and say what was done, in one line per problem.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import harness
import pytest
from harness import World

from service.store.chain import GENESIS_HASH


@pytest.fixture
async def owner(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the rights of the ledger's owner (a superuser here)."""
    conn = await asyncpg.connect(database_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _listed(world: World, owner: asyncpg.Connection, times: int) -> harness.PartnerHandle:
    """A partner that listed three appointments ``times`` times, every record chained."""
    practitioner = await world.practitioner()
    for _ in range(3):
        await world.appointment(practitioner, (await world.patient()).patient_id)
    partner = await world.partner("Agenda", practitioner)
    for _ in range(times):
        await partner.list_all()
    assert await harness.eventually(lambda: harness.all_chained(owner))
    return partner


async def _verify(database_dsn: str, tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    code, out, err = await harness.audit_cli(database_dsn, tmp_path / "data", "verify", *args, **env)
    assert "Traceback" not in err
    return code, out, err


async def _verified(database_dsn: str, tmp_path: Path, records: int) -> None:
    """Verify and seal the ledger, which must be intact and hold ``records`` records."""
    code, out, err = await _verify(database_dsn, tmp_path)
    assert code == 0, err
    assert f"intact: {records} records" in out and f"sealed at record {records}" in out


async def _refused(database_dsn: str, tmp_path: Path, *args: str) -> str:
    """Run ``audit verify``, check that it fails, and return its one line per problem."""
    code, out, err = await _verify(database_dsn, tmp_path, *args)
    assert code == 1, (out, err)
    assert "NOT intact" in out
    return err


async def _rechain(conn: asyncpg.Connection) -> None:
    """Recompute every link of the chain and the head, as the owner can (the digest needs no secret)."""
    previous = GENESIS_HASH
    rows = await conn.fetch("SELECT id, seq FROM disclosure_chain ORDER BY seq")
    for row in rows:
        previous = await conn.fetchval(
            "UPDATE disclosure_chain c SET prev_hash = $1, hash = disclosure_digest(d, c.seq, $1, c.chain_time) "
            "FROM disclosures d WHERE d.id = c.id AND c.id = $2 RETURNING c.hash",
            previous,
            row["id"],
        )
    await conn.execute("UPDATE ledger_head SET seq = $1, hash = $2", rows[-1]["seq"] if rows else 0, previous)


# The record digest as it was: fields joined by 0x1f with concat_ws, which skips NULLs.
_CONCAT_WS_DIGEST = r"""
SELECT sha256(c.prev_hash || convert_to(concat_ws(E'\x1f',
    c.seq::text, d.partner_id::text, d.key_id, d.view::text, array_to_string(d.contact_fields, ','),
    coalesce(d.consent_id::text, ''), d.rpc, d.trace_id,
    to_char(d.disclose_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), d.outcome::text, d.denial_reason,
    array_to_string(d.requested_ids, E'\x1e', ''), array_to_string(d.appointment_ids, E'\x1e', ''),
    array_to_string(d.patient_ids, E'\x1e', ''),
    'items_of=' || d.items_of::text, 'items_digest=' || encode(d.items_digest, 'hex')), 'UTF8'))
FROM disclosures d JOIN disclosure_chain c ON c.id = d.id WHERE c.seq = 1
"""

# Items moved into the free-text column after them, and the arrays emptied: the breach report no
# longer finds the record's patients.
_ITEMS_INTO_TEXT = r"""
UPDATE disclosures SET
    denial_reason = E'\x1f' || array_to_string(requested_ids, E'\x1e', '') || E'\x1f'
        || array_to_string(appointment_ids, E'\x1e', '') || E'\x1f' || array_to_string(patient_ids, E'\x1e', ''),
    requested_ids = NULL, appointment_ids = NULL, patient_ids = NULL
WHERE id = (SELECT id FROM disclosure_chain WHERE seq = 1)
"""


async def test_items_moved_into_a_text_field_are_refused_then_caught(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    await _listed(world, owner, 1)
    await _verified(database_dsn, tmp_path, 1)
    before = await owner.fetchval(_CONCAT_WS_DIGEST)

    with pytest.raises(asyncpg.CheckViolationError):  # a shape no record has
        async with harness.owner_tampering(owner) as conn:
            await conn.execute(_ITEMS_INTO_TEXT)
    async with harness.owner_tampering(owner) as conn:  # the owner sets the shapes' trigger aside first
        await conn.execute("ALTER TABLE disclosures DISABLE TRIGGER disclosures_checked")
        await conn.execute(_ITEMS_INTO_TEXT)
    after = await owner.fetchval(_CONCAT_WS_DIGEST)

    assert after == before  # what concat_ws could not tell apart
    assert "record 1 was altered" in await _refused(database_dsn, tmp_path)


async def test_null_empty_the_text_null_and_arrays_are_encoded_apart(owner: asyncpg.Connection) -> None:
    encodings = await owner.fetch(
        "SELECT ledger_field(v) AS e FROM unnest(ARRAY[NULL, '', 'NULL', ARRAY[NULL]::text[]::text, "
        "ARRAY['NULL']::text[]::text, ARRAY['a,b']::text[]::text, ARRAY['a', 'b']::text[]::text]) AS v"
    )

    assert len({row["e"] for row in encodings}) == 7


async def test_a_ledger_emptied_with_its_seals_is_caught_by_the_witness(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    await _listed(world, owner, 3)
    await _verified(database_dsn, tmp_path, 3)

    async with harness.owner_tampering(owner) as conn:
        await conn.execute("DELETE FROM disclosure_chain; DELETE FROM disclosures; DELETE FROM ledger_seals")
        await conn.execute(
            "UPDATE ledger_head SET seq = 0, hash = $1, chained_txid = '0', chained_id = 0", GENESIS_HASH
        )
    without_witness = await _verify(database_dsn, tmp_path, "--no-seal", APPTGATE_LEDGER_WITNESS="/nonexistent")

    assert without_witness[0] == 0 and "intact: 0 records" in without_witness[1]  # the database alone cannot tell
    err = await _refused(database_dsn, tmp_path)
    assert "the ledger was rolled back: the witness vouches for 3 records" in err
    assert "the database chains 0" in err


async def test_a_ledger_rolled_back_to_an_earlier_head_is_caught(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    await _listed(world, owner, 3)
    await _verified(database_dsn, tmp_path, 3)

    async with harness.owner_tampering(owner) as conn:
        last = await conn.fetchval("SELECT id FROM disclosure_chain WHERE seq = 3")
        await conn.execute("DELETE FROM disclosure_chain WHERE seq = 3")
        await conn.execute("DELETE FROM disclosures WHERE id = $1", last)
        await conn.execute("DELETE FROM ledger_seals")
        await conn.execute(
            "UPDATE ledger_head h SET seq = c.seq, hash = c.hash, chained_txid = d.txid, chained_id = d.id "
            "FROM disclosure_chain c JOIN disclosures d ON d.id = c.id WHERE c.seq = 2"
        )

    assert "the ledger was rolled back: the witness vouches for 3 records" in await _refused(database_dsn, tmp_path)


async def test_records_reordered_and_chained_again_are_caught(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    await _listed(world, owner, 3)
    await _verified(database_dsn, tmp_path, 3)

    async with harness.owner_tampering(owner) as conn:
        await conn.execute("UPDATE disclosure_chain SET seq = -seq WHERE seq IN (1, 2)")
        await conn.execute("UPDATE disclosure_chain SET seq = CASE seq WHEN -1 THEN 2 ELSE 1 END WHERE seq < 0")
        await _rechain(conn)
        await conn.execute("DELETE FROM ledger_seals")
    err = await _refused(database_dsn, tmp_path)

    assert "record 1 was altered" not in err and "record 2 was altered" not in err  # consistent in the database
    assert "record 2 is out of the order the sequencer chains in" in err
    assert "the chain up to record 3 is not the one the witness vouches for" in err


async def test_times_are_the_databases_and_a_back_dated_record_is_caught(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    partner = await _listed(world, owner, 1)
    await _verified(database_dsn, tmp_path, 1)
    copy = (
        "INSERT INTO disclosures (partner_id, key_id, view, rpc, disclose_time, txid, outcome, requested_ids, "
        "appointment_ids, patient_ids) SELECT partner_id, key_id, view, rpc, $1, '1', outcome, requested_ids, "
        "appointment_ids, patient_ids FROM disclosures WHERE id = (SELECT min(id) FROM disclosures) RETURNING id"
    )
    three_days_ago = datetime.now(UTC) - timedelta(days=3)

    stamped = await owner.fetchval(copy, three_days_ago)  # with the triggers on, the database stamps the insert
    row = await owner.fetchrow("SELECT disclose_time, txid::text AS txid FROM disclosures WHERE id = $1", stamped)
    assert datetime.now(UTC) - row["disclose_time"] < timedelta(minutes=5)
    assert row["txid"] != "1"
    assert await harness.eventually(lambda: harness.all_chained(owner))
    await _verified(database_dsn, tmp_path, 2)

    # Past the triggers, with a transaction id the sequencer has not passed: the sequencer chains it, now.
    async with harness.owner_tampering(owner) as conn:
        await conn.execute(copy.replace("'1'", "pg_current_xact_id()"), three_days_ago)
    assert await harness.eventually(lambda: harness.all_chained(owner))
    err = await _refused(database_dsn, tmp_path)
    assert "record 3 is dated 3 days" in err and "before it was chained" in err

    # Chained by hand with a back-dated chain time as well, after the last record: the times go back.
    async with harness.owner_tampering(owner) as conn:
        forged = await conn.fetchval(copy.replace("'1'", "pg_current_xact_id()"), three_days_ago)
        await conn.execute(
            "INSERT INTO disclosure_chain (id, seq, prev_hash, chain_time, hash) "
            "SELECT $1, h.seq + 1, h.hash, $2, disclosure_digest(d, h.seq + 1, h.hash, $2) "
            "FROM ledger_head h, disclosures d WHERE d.id = $1",
            forged,
            three_days_ago + timedelta(seconds=1),
        )
        await conn.execute(
            "UPDATE ledger_head h SET seq = c.seq, hash = c.hash, chained_txid = d.txid, chained_id = d.id "
            "FROM disclosure_chain c JOIN disclosures d ON d.id = c.id WHERE c.id = $1",
            forged,
        )
    err = await _refused(database_dsn, tmp_path)
    assert "record 4 was chained before the record ahead of it" in err
    assert "record 4 was altered" not in err and partner.key_id not in err


async def test_the_witness_refuses_lines_forged_or_reordered(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path
) -> None:
    partner = await _listed(world, owner, 1)
    await _verified(database_dsn, tmp_path, 1)
    await partner.list_all()
    assert await harness.eventually(lambda: harness.all_chained(owner))
    await _verified(database_dsn, tmp_path, 2)
    path = tmp_path / "data" / "ledger-witness.jsonl"
    first, second = path.read_text().splitlines()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [json.loads(line)["seq"] for line in (first, second)] == [1, 2]

    forged = json.loads(second) | {"seq": 1}
    for lines, reason in (
        ([first, json.dumps(forged)], "witness line 2 has a bad signature"),
        ([second, first], "witness line 2 goes back to record 1"),
        ([first, second, "{not json"], "witness line 3 is not a checkpoint"),
    ):
        path.write_text("\n".join(lines) + "\n")
        assert reason in await _refused(database_dsn, tmp_path, "--no-seal")


@pytest.mark.parametrize(
    "statement",
    [
        "TRUNCATE ledger_seals",
        "DELETE FROM ledger_seals",
        "UPDATE ledger_head SET seq = 0",
        "UPDATE ledger_head SET hash = prev_hash FROM disclosure_chain WHERE disclosure_chain.seq = 1",
        "DELETE FROM ledger_head",
        "TRUNCATE ledger_head",
    ],
)
async def test_the_head_and_the_seals_refuse_the_owner_while_the_triggers_are_on(
    world: World, owner: asyncpg.Connection, database_dsn: str, tmp_path: Path, statement: str
) -> None:
    await _listed(world, owner, 1)
    await _verified(database_dsn, tmp_path, 1)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute(statement)
