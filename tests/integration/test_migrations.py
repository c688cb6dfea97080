"""Migrations: ordered, recorded, idempotent, safe when two migrators race, and never edited."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import harness
import pytest

from service.store import ledger, migrations
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


async def test_0018_keeps_the_chain_written_before_it_and_chains_what_was_pending(
    empty_dsn: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in migrations.MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) < 18:
            shutil.copy(path, before / path.name)
    append = (
        "SELECT append_disclosures(gen_random_uuid(), 'pk_migration', 'ListAppointments', '', 1::smallint, "
        "1::smallint, '', ARRAY['apt_a', 'apt_b'], ARRAY[gen_random_uuid(), gen_random_uuid()], "
        "ARRAY[gen_random_uuid(), gen_random_uuid()], '{}'::smallint[], NULL)"
    )
    conn = await asyncpg.connect(empty_dsn)
    other = await asyncpg.connect(empty_dsn)
    try:
        await migrations.migrate(conn, before)
        # The old sequencer chained in id order: a record of an older transaction, written
        # last, is left pending behind two chained ones. The new sequencer's cursor starts
        # before it, so its first pass meets the two chained records again and skips them.
        await other.execute("BEGIN; SELECT pg_current_xact_id()")
        for _ in range(2):
            await conn.execute(append)
        await other.execute(append)
        await other.execute("COMMIT")
        assert await conn.fetchval("SELECT chain_disclosures(2)") == 2
        chained_before = await conn.fetch("SELECT id, seq, hash FROM disclosures WHERE seq IS NOT NULL ORDER BY seq")

        await migrations.migrate(conn)
        await conn.execute(append)
        assert await ledger.chain_all(conn) == 4  # two found chained already, the pending record, the new one
        chain = await conn.fetch("SELECT id, seq, hash FROM disclosure_chain ORDER BY seq")
        result = await ledger.verify(conn, b"k" * 32)
    finally:
        await other.close()
        await conn.close()

    assert [tuple(r) for r in chain[:2]] == [tuple(r) for r in chained_before]  # same places, same hashes
    assert [r["seq"] for r in chain] == [1, 2, 3, 4]
    assert len({r["id"] for r in chain}) == 4
    assert result.intact, result.problems
    assert result.records == 4
