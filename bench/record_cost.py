"""What one ledger record costs inside PostgreSQL: a page written in full against a page recorded by reference.

Runs on a scratch database migrated from the source tree (dropped at the
end), with one client and nothing else, so that the figures are PostgreSQL's
own and as little of this shared machine's noise as a loop can leave:

* the record statement (``record_basic_disclosures``, migration 0005) timed
  inside the server by a ``DO`` loop (no round trip, no commit), with and
  without its ``INSERT``, for a page of 50 written in full and for the same
  page recorded by reference; minimum and median of ``--rounds`` loops;
* per record, the heap row's size, the WAL written (1,000 statements, one
  commit each, ``synchronous_commit`` off) and the sequencer's chaining of
  those 1,000 records;
* the whole statement as the gateway sends it (one client, autocommit,
  ``synchronous_commit`` off): the CPU its backend process spends per
  statement (``/proc``, so PostgreSQL must run on this machine); when a later
  migration redefines the function, the latest definition against the first,
  alternated in one run (the first created in a schema of its own, found
  first on the search path), so that a change is measured side by side with
  what it replaced.

The timed function is the latest migration's ``record_basic_disclosures``.

    .venv/bin/python bench/record_cost.py [--rounds 10] [--calls 150]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from service.disclosure.record import fingerprint  # noqa: E402
from service.store import ledger  # noqa: E402

import datagen  # noqa: E402
from common import admin_dsn, process_cpu_seconds, source, with_database  # noqa: E402

DATABASE = "apptgate_bench_record_cost"
PAGE = 50
_RPC = "/appointments.partner.v1.PartnerAppointmentService/ListAppointments"
#: The schema the first definition of the function is created in, to compare it with the latest.
_BASELINE_SCHEMA = "record_cost_baseline"


def _literal(values: list[Any]) -> str:
    return ledger.array_literal(values).replace("'", "''")


class Page:
    """One partner's page of 50, its first record's id, and the arguments of both kinds of statement."""

    def __init__(self, partner: uuid.UUID, since: int, record_id: int, items: list[tuple[str, uuid.UUID, uuid.UUID]]):
        self.partner, self.since, self.record_id = partner, since, record_id
        ids, appointments, patients = (list(column) for column in zip(*items, strict=True))
        self.columns = (ids, appointments, patients)
        digest = fingerprint(ids, [str(a) for a in appointments], [str(p) for p in patients])
        assert digest is not None
        self.digest = digest.hex()

    def arguments(self, reference: bool) -> list[Any]:
        """The statement's 20 arrays, as ``ledger.record_basic`` takes them."""
        ids, appointments, patients = self.columns
        items: list[Any] = [[None], [None], ids, appointments, patients] if not reference else []
        if reference:
            items = [[self.record_id], [self.digest], [], [], []]
        return [
            [self.partner], ["pk_recordcostaaaaaa"], [_RPC], [""], [0 if reference else PAGE], *items,
            [self.partner], [10**9], [10**9], [1000.0], [10**9], [False], [self.since], [0], [], [""],
        ]  # fmt: skip


async def _page(conn: asyncpg.Connection) -> Page:
    partner = await conn.fetchval("INSERT INTO partners (display_name) VALUES ('record cost') RETURNING id")
    items = [(f"apt_{n:022d}", uuid.uuid4(), uuid.uuid4()) for n in range(PAGE)]
    first = Page(partner, 0, 0, items)
    first_args = first.arguments(False)
    first_args[-4] = [None]  # no counter row known yet: the first record charges every patient
    [row] = await ledger.record_basic(conn, first_args)
    assert row.counted_since is not None and row.record_ids[0] is not None
    return Page(partner, row.counted_since, row.record_ids[0], items)


_DEFINES = "FUNCTION record_basic_disclosures("


def _definitions() -> list[str]:
    """The migrations that define record_basic_disclosures, in order."""
    return sorted(p.name for p in (source() / "migrations").glob("*.sql") if _DEFINES in p.read_text())


def _function(without_insert: bool, name: str = "record_cost_probe", migration: str | None = None) -> str:
    """record_basic_disclosures as ``migration`` defines it (by default the latest migration that does),
    created as ``name``, its INSERT removed if asked."""
    text = (source() / "migrations" / (migration or _definitions()[-1])).read_text()
    start = text.index(_DEFINES) + len(_DEFINES)
    body = text[start : text.index("\n$$;", start) + len("\n$$;")]
    if without_insert:
        body = body[: body.index("    INSERT INTO disclosures")] + body[body.index("    RETURN QUERY") :]
    return f"CREATE OR REPLACE FUNCTION {name}(" + body


async def _statement_loop(conn: asyncpg.Connection, page: Page, reference: bool, calls: int) -> float:
    """Microseconds per call of record_cost_probe over ``calls`` calls, timed inside the server."""
    casts = ["uuid", "text", "text", "text", "int", "bigint", "text", "text", "uuid", "uuid",
             "uuid", "int", "int", "float8", "bigint", "bool", "bigint", "int", "uuid", "text"]  # fmt: skip
    arguments = ", ".join(f"'{_literal(a)}'::{c}[]" for a, c in zip(page.arguments(reference), casts, strict=True))
    notices: list[str] = []

    def listen(_: object, message: Any) -> None:
        notices.append(message.message)

    conn.add_log_listener(listen)
    try:
        await conn.execute(f"""DO $$ DECLARE t0 timestamptz; BEGIN
            FOR i IN 1 .. 10 LOOP PERFORM * FROM record_cost_probe({arguments}); END LOOP;
            t0 := clock_timestamp();
            FOR i IN 1 .. {calls} LOOP PERFORM * FROM record_cost_probe({arguments}); END LOOP;
            RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - t0) * 1e6 / {calls};
        END $$""")
        await asyncio.sleep(0.05)  # the notice arrives after the command completes
    finally:
        conn.remove_log_listener(listen)
    return float(notices[-1])


def _backend_seconds(pid: int) -> float:
    """CPU seconds the backend ``pid`` has used (it serves this script's connection, so it is alive)."""
    used = process_cpu_seconds(pid)
    assert used is not None, f"backend {pid} is gone"
    return used


async def _backend_cpu(
    conn: asyncpg.Connection, page: Page, rounds: int, calls: int, first: str | None
) -> dict[str, list[float]]:
    """Backend CPU µs per statement, full page and reference; the latest function against ``first``, alternated."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    paths = {"latest, {}": "public"}
    if first is not None:
        paths[first[:4] + "'s, {}"] = f"{_BASELINE_SCHEMA}, public"
    figures: dict[str, list[float]] = {}
    for n in range(rounds):
        for label, path in paths.items() if n % 2 == 0 else reversed(paths.items()):
            await conn.execute(f"SET search_path = {path}")
            for reference in (False, True):
                arguments = page.arguments(reference)
                used = _backend_seconds(pid)
                for _ in range(calls):
                    await ledger.record_basic(conn, arguments)
                kind = label.format("reference" if reference else "full page")
                figures.setdefault(kind, []).append((_backend_seconds(pid) - used) / calls * 1e6)
    await conn.execute("SET search_path = public")
    return figures


async def _per_record(conn: asyncpg.Connection, page: Page, reference: bool, records: int) -> dict[str, float]:
    """Row bytes, WAL bytes per record and chaining milliseconds per 1,000 records, ``records`` statements."""
    await conn.execute("SELECT chain_disclosures(100000)")
    start = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
    for _ in range(records):
        await ledger.record_basic(conn, page.arguments(reference))
    wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1)", start)
    began = time.perf_counter()
    await conn.execute(f"SELECT chain_disclosures({records})")
    chained = time.perf_counter() - began
    row = await conn.fetchval("SELECT pg_column_size(d.*) FROM disclosures d ORDER BY id DESC LIMIT 1")
    return {"row": row, "wal": float(wal) / records, "chain": chained * 1e3 * 1000 / records}


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=150, help="statements per timed DO loop")
    parser.add_argument("--records", type=int, default=1000, help="statements per WAL and chaining measure")
    args = parser.parse_args(argv)
    await datagen.create_database(DATABASE)
    dsn = with_database(admin_dsn(), DATABASE)
    datagen.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET synchronous_commit = off")
        page = await _page(conn)
        timings: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for without_insert in (False, True):
                await conn.execute(_function(without_insert))
                for reference in (False, True):
                    key = ("reference" if reference else "full page", "without INSERT" if without_insert else "all")
                    timings.setdefault(key, []).append(await _statement_loop(conn, page, reference, args.calls))
        print(f"record statement inside PostgreSQL, µs per call (min / median of {args.rounds} loops of {args.calls}):")
        for (kind, part), values in timings.items():
            print(f"  {kind:10} {part:15} {min(values):7.1f} / {statistics.median(values):7.1f}")
        print(f"backend CPU per statement sent by the client, µs (min / median of {args.rounds} runs of "
              f"{args.records}):")  # fmt: skip
        definitions = _definitions()
        first = definitions[0] if len(definitions) > 1 else None
        if first is not None:
            await conn.execute(f"CREATE SCHEMA {_BASELINE_SCHEMA}")
            await conn.execute(_function(False, f"{_BASELINE_SCHEMA}.record_basic_disclosures", first))
        for kind, cpu in (await _backend_cpu(conn, page, args.rounds, args.records, first)).items():
            print(f"  {kind:30} {min(cpu):7.1f} / {statistics.median(cpu):7.1f}")
        print(f"per record ({args.records} statements each, three rounds):")
        for _ in range(3):
            for reference in (False, True):
                figures = await _per_record(conn, page, reference, args.records)
                kind = "reference" if reference else "full page"
                print(f"  {kind:10} row {figures['row']:5.0f} B  WAL {figures['wal']:6.0f} B  "
                      f"chaining {figures['chain']:5.1f} ms per 1,000")  # fmt: skip
    finally:
        await conn.close()
        await datagen.drop_database(DATABASE)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
