"""What the ledger record of a listing costs the gateway's process: Python CPU per record, by group size.

``bench/record_cost.py`` measures PostgreSQL's side of a record; this
measures the other side, in one process and without gRPC: the gateway's own
:class:`service.recorder.DisclosureRecorder` on a scratch database migrated
from the source tree (dropped at the end), fed by ``W`` concurrent callers
that each record a page of 50 over and over, as ``ListAppointments`` does
(announce the call, then record; after the first, every page is recorded by
reference). Each caller waits for its record before the next, so a group
holds at most ``W`` records and, with the database quick to answer, about
that many. Reported per ``W``: records per second and the process's CPU per
record (user + system, so the system calls of each round trip count), and
records per transaction (``disclosures.txid``) to show the group size. The
event loop is uvloop, the gateway's default.

Two costs come apart: what each group pays once (its statement's round trip
through asyncpg, the writer's wake-ups and timers) and what each record
pays (its items' text and fingerprint, its answer). With CPU per record
``c(W) = group / W + record``, ``W = 1`` and ``W = 16`` give both.

    .venv/bin/python bench/recorder_cost.py [--callers 1,3,16] [--records 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from uuid import UUID

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from service import models  # noqa: E402
from service.disclosure.record import DisclosureRecorder  # noqa: E402
from service.store.database import Database  # noqa: E402

import datagen  # noqa: E402
from common import admin_dsn, with_database  # noqa: E402

DATABASE = "apptgate_bench_recorder_cost"
PAGE = 50
TERMS = models.ChargeTerms(10**9, 10**9, anomaly_factor=1000.0, anomaly_min=10**12, suspend_on_anomaly=False)


async def _run(recorder: DisclosureRecorder, entry: models.LedgerEntry, page: list[tuple[str, UUID, UUID]],
               callers: int, records: int) -> tuple[float, float]:  # fmt: skip
    """Records per second and CPU µs per record, ``callers`` at a time, ``records`` in all."""

    async def caller(count: int) -> None:
        for _ in range(count):
            with recorder.expect_basic() as expected:
                await asyncio.sleep(0)  # the call's read, reduced to a turn of the loop
                assert await recorder.record(entry, page, TERMS, expected) == "ok"

    each = records // callers
    used, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(each) for _ in range(callers)))
    wall, cpu = time.perf_counter() - started, time.process_time() - used
    return each * callers / wall, cpu / (each * callers) * 1e6


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", default="1,3,16", help="concurrent callers, one figure each (comma-separated)")
    parser.add_argument("--records", type=int, default=3000, help="records per measured run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per caller count, alternated")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.callers.split(",")]
    await datagen.create_database(DATABASE)
    dsn = with_database(admin_dsn(), DATABASE)
    datagen.migrate(dsn)
    database = await Database.connect(dsn, min_size=2, max_size=4)
    try:
        async with database.connection() as conn:
            partner = await conn.fetchval("INSERT INTO partners (display_name) VALUES ('recorder cost') RETURNING id")
            # Ids as the gateway holds them: asyncpg's UUID type, read from a row (str() of the standard
            # library's uuid.UUID is several times slower, and the record converts 100 of them).
            rows = await conn.fetch("SELECT gen_random_uuid() AS a, gen_random_uuid() AS p FROM generate_series(1, $1)",
                                    PAGE)  # fmt: skip
        entry = models.LedgerEntry(
            partner,
            "pk_recordercostaaaa",
            "/appointments.partner.v1.PartnerAppointmentService/ListAppointments",
            "",
            models.View.BASIC,
        )
        page = [(f"apt_{n:022d}", row["a"], row["p"]) for n, row in enumerate(rows)]
        recorder = DisclosureRecorder(database, budget=10.0)
        await _run(recorder, entry, page, max(counts), 20 * max(counts))  # the first record, plans, connections
        figures: dict[int, list[tuple[float, float, float]]] = {}
        for n in range(args.rounds):
            for callers in counts if n % 2 == 0 else reversed(counts):
                async with database.connection() as conn:
                    since = await conn.fetchval("SELECT coalesce(max(id), 0) FROM disclosures")
                rate, cpu = await _run(recorder, entry, page, callers, args.records)
                async with database.connection() as conn:
                    grouped = await conn.fetchval(
                        "SELECT count(*)::float8 / count(DISTINCT txid) FROM disclosures WHERE id > $1", since
                    )
                figures.setdefault(callers, []).append((rate, cpu, grouped))
        print(f"a page of 50 recorded by reference, {args.records} records per run, median of {args.rounds} runs:")
        for callers, runs in sorted(figures.items()):
            rate, cpu, grouped = (statistics.median(column) for column in zip(*runs, strict=True))
            print(f"  {callers:3} callers: {rate:6.0f} records/s, {cpu:6.1f} µs of CPU per record "
                  f"(range {min(r[1] for r in runs):.1f}-{max(r[1] for r in runs):.1f}), "
                  f"{grouped:5.2f} records per transaction")  # fmt: skip
        if 1 in figures and len(figures) > 1:
            widest = max(figures)
            one, many = (statistics.median(r[1] for r in figures[c]) for c in (1, widest))
            grouped = statistics.median(r[2] for r in figures[widest])
            record = (many * grouped - one) / (grouped - 1)
            print(f"  so, from 1 and {widest} callers: ~{one - record:.0f} µs per group, ~{record:.0f} µs per record")
    finally:
        await database.close()
        await datagen.drop_database(DATABASE)
    return 0


if __name__ == "__main__":
    import uvloop  # the gateway's default event loop (APPTGATE_EVENT_LOOP)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main()))
