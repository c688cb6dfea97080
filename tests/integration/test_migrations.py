"""Migrations: ordered, recorded, idempotent, safe when two migrators race, and never edited."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import harness
import pytest

from service.store import chain, migrations
from service.store.database import Database, NotMigratedError


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    dsn = await harness.create_database(admin_dsn, None)
    try:
        yield dsn
    finally:
        await harness.drop_database(admin_dsn, dsn)


async def _applied(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        await conn.close()


async def test_migrate_applies_every_file_once_and_then_nothing(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        first = await migrations.migrate(conn)
        second = await migrations.migrate(conn)
    finally:
        await conn.close()

    expected = [m.version for m in migrations.discover()]
    assert [m.version for m in first] == expected
    assert second == []
    assert await _applied(empty_dsn) == expected


async def test_two_migrators_started_at_once_apply_each_file_exactly_once(empty_dsn: str) -> None:
    async def run() -> list[migrations.Migration]:
        conn = await asyncpg.connect(empty_dsn)
        try:
            return await migrations.migrate(conn)
        finally:
            await conn.close()

    results = await asyncio.gather(*(run() for _ in range(4)))

    expected = [m.version for m in migrations.discover()]
    assert sorted(m.version for result in results for m in result) == expected
    assert await _applied(empty_dsn) == expected


async def test_serve_refuses_an_unmigrated_database(empty_dsn: str) -> None:
    database = await Database.connect(empty_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(NotMigratedError, match="python -m service migrate"):
            await database.ensure_migrated()
    finally:
        await database.close()


async def test_a_migration_edited_after_it_was_applied_is_refused(database_dsn: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS_DIR, copy)
    first = sorted(copy.glob("0001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an innocent-looking edit\n")
    conn = await asyncpg.connect(database_dsn)
    try:
        with pytest.raises(migrations.MigrationError, match="edited"):
            await migrations.migrate(conn, copy)
    finally:
        await conn.close()


def test_a_gap_in_numbering_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_create_things.sql").write_text("SELECT 1;")
    (tmp_path / "0003_create_more.sql").write_text("SELECT 1;")

    with pytest.raises(migrations.MigrationError, match="0002"):
        migrations.discover(tmp_path)


def test_migration_names_follow_the_convention() -> None:
    names = [p.name for p in migrations.MIGRATIONS_DIR.glob("*.sql")]

    assert names
    assert all(migrations._NAME.match(name) for name in names)


async def test_a_failing_migration_leaves_nothing_half_applied(empty_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "0001_create_widgets.sql").write_text("CREATE TABLE widgets (id int);")
    (tmp_path / "0002_break_things.sql").write_text("CREATE TABLE gadgets (id int); SELECT no_such_function();")
    conn = await asyncpg.connect(empty_dsn)
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrations.migrate(conn, tmp_path)
        gadgets = await conn.fetchval("SELECT to_regclass('gadgets') IS NOT NULL")
        widgets = await conn.fetchval("SELECT to_regclass('widgets') IS NOT NULL")
    finally:
        await conn.close()

    assert widgets
    assert not gadgets
    assert await _applied(empty_dsn) == [1]


async def _past_the_horizon(conn: asyncpg.Connection) -> bool:
    """Whether every record's transaction is older than all still running: what the sequencer chains.

    Its horizon is the cluster's oldest running transaction, in any database: another test
    run on a shared server can hold it back, for as long as one of its transactions lasts.
    """
    return bool(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot()) > max(txid) FROM disclosures"))


async def test_the_sequencer_waits_for_an_older_transaction_and_chains_its_record_first(database_dsn: str) -> None:
    append = (
        "INSERT INTO disclosures (partner_id, key_id, view, rpc, outcome, requested_ids, "
        "appointment_ids, patient_ids) VALUES (gen_random_uuid(), 'pk_sequenceraaaaaaa', 1, "
        "'/appointments.partner.v1.PartnerAppointmentService/ListAppointments', 1, "
        "ARRAY['apt_a', 'apt_b'], ARRAY[gen_random_uuid(), gen_random_uuid()], ARRAY[gen_random_uuid(), "
        "gen_random_uuid()])"
    )
    conn = await asyncpg.connect(database_dsn)
    older = await asyncpg.connect(database_dsn)
    try:
        await older.execute("BEGIN; SELECT pg_current_xact_id()")
        for _ in range(2):
            await conn.execute(append)
        # Two records committed after the older transaction began: none may be chained while it runs,
        # or its record, committed later, would have to go before them.
        while_older_runs = await conn.fetchval("SELECT chain_disclosures(10)")
        await older.execute(append)
        await older.execute("COMMIT")
        assert await harness.eventually(lambda: _past_the_horizon(conn))
        chained = await chain.chain_all(conn)
        order = await conn.fetch(
            "SELECT c.seq, d.txid::text::bigint AS txid FROM disclosure_chain c JOIN disclosures d ON d.id = c.id "
            "ORDER BY c.seq"
        )
        result = await chain.verify(conn, b"k" * 32)
    finally:
        await older.close()
        await conn.close()

    assert while_older_runs == 0
    assert chained == 3
    assert [r["seq"] for r in order] == [1, 2, 3]
    assert order[0]["txid"] < order[1]["txid"] < order[2]["txid"]  # the older transaction's record first
    assert result.intact, result.problems
