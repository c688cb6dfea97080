"""``python -m service data-key …``: the operator's commands for the data keys (encryption at rest).

* ``data-key status [--open-all]`` counts, per data key id, the values sealed
  under it, and the values still stored in clear (as an import of existing
  data loads them); then tries each configured key on one row sealed under it
  per table (a few index probes), or with ``--open-all`` opens every sealed
  value (a full scan). It exits 1 when a value does not open, or is sealed
  under a key that is not configured.
* ``data-key reencrypt [--batch-size N]`` re-seals every value that is not
  under the active key and seals every value left in clear (clearing its
  clear-text column): the second step of a key rotation, and the end of an
  import. It works in batches, one transaction each, so it can be
  interrupted and run again: it resumes where work is left, and a second run
  finds nothing to do.

Rotating the data key: put a new key in front of ``APPTGATE_DATA_KEY``
(``"2:…,1:…"``) on every server, run ``data-key reencrypt``, check
``data-key status`` shows nothing under key 1, then remove key 1. A new key
takes a new id: the database records each id's check value on first use
(:func:`service.app.verify_data_keys`), and both commands exit 2, before
reading or writing a value, when a configured key is not the one recorded
under its id.

Progress goes to stderr, results to stdout. Neither ever holds a value or a key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from uuid import UUID

from service import app
from service.crypto import sealing
from service.crypto.keyfiles import load_data_keys
from service.settings import Settings
from service.store import sealed_columns
from service.store.database import Database

DEFAULT_BATCH_SIZE = 500
PROGRESS_EVERY = 2.0  # seconds between progress lines


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``data-key status`` and ``data-key reencrypt``."""
    data_key = commands.add_parser("data-key", help="encryption at rest: key usage, re-encryption under the active key")
    sub = data_key.add_subparsers(dest="data_key_command", required=True)
    status = sub.add_parser(
        "status", help="count the values per data key id and the values still in clear; check the keys open them"
    )
    status.add_argument(
        "--open-all",
        action="store_true",
        help="open every sealed value (a full scan) instead of one row per data key id and table",
    )
    reencrypt = sub.add_parser(
        "reencrypt", help="re-seal every value under the active key and seal what is left in clear (resumable)"
    )
    reencrypt.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help=f"rows per transaction ({DEFAULT_BATCH_SIZE})"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@dataclass
class TableTotals:
    """What ``reencrypt`` did to one table."""

    rows: int = 0
    resealed: int = 0  # sealed values moved to the active key
    sealed_from_clear: int = 0  # values left in clear, now sealed
    unreadable: list[tuple[UUID, str]] = field(default_factory=list)  # (row id, column) that did not open


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one data-key command; return the exit code."""
    keys = load_data_keys(settings)
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack)
        await database.ensure_migrated()
        if args.data_key_command == "status":
            # A report changes nothing: it checks the recorded check values without recording new ones.
            await app.verify_data_keys(database, keys, record=False)
            return await _status(database, keys, open_all=args.open_all)
        # Re-sealing uses the active key: it is checked, and recorded on first use, before any value is written.
        await app.verify_data_keys(database, keys)
        return await _reencrypt(database, keys, args.batch_size)
    raise AssertionError("unreachable")


async def _status(database: Database, keys: sealing.DataKeyring, *, open_all: bool) -> int:
    async with database.transaction(readonly=True) as conn:
        counts = await sealed_columns.count_values(conn)
    per_key: dict[int, int] = {}
    unknown_format = clear = 0
    for count in counts:
        clear += count.clear
        if count.sealed == 0:
            continue
        version, key_id = sealing.parse_header(count.header or b"")
        if version != sealing.VERSION:
            unknown_format += count.sealed
        else:
            per_key[key_id] = per_key.get(key_id, 0) + count.sealed
    print(f"active data key: {keys.active_key_id}; configured: {', '.join(map(str, keys.key_ids))}")
    for key_id in sorted(set(per_key) | set(keys.key_ids)):
        notes = []
        if key_id == keys.active_key_id:
            notes.append("active")
        if key_id not in keys.key_ids:
            notes.append("NOT CONFIGURED: these values cannot be opened")
        suffix = f"  ({'; '.join(notes)})" if notes else ""
        print(f"data key {key_id}: {per_key.get(key_id, 0):,} values{suffix}")
    if unknown_format:
        print(f"unknown format: {unknown_format:,} values")
    print(f"in clear: {clear:,} values")
    for table, columns in sealing.SEALED_COLUMNS.items():
        for column in columns:
            here = [c for c in counts if c.table == table and c.column == column]
            active = sealing.header(keys.active_key_id)
            print(
                f"  {table}.{column}: {sum(c.sealed for c in here if c.header == active):,} under the active key, "
                f"{sum(c.sealed for c in here if c.header != active):,} under others, "
                f"{sum(c.clear for c in here):,} in clear"
            )
    left = clear + unknown_format + sum(n for key_id, n in per_key.items() if key_id != keys.active_key_id)
    print("nothing to re-encrypt" if not left else f"{left:,} values to re-encrypt: run `data-key reencrypt`")
    in_use = sorted(per_key)
    problems = [
        f"{per_key[key_id]:,} values are sealed under data key {key_id}, which is not configured: they cannot be "
        "opened; add the key after the active one"
        for key_id in in_use
        if key_id not in keys.key_ids
    ]
    if unknown_format:
        problems.append(f"{unknown_format:,} values have an unknown format: they cannot be opened")
    configured = [key_id for key_id in in_use if key_id in keys.key_ids]
    if open_all:
        unreadable = await _open_every_value(database, keys)
        print(f"opened every sealed value: {len(unreadable):,} do not open")
    else:
        unreadable = await _open_one_row_per_key(database, keys, configured)
        tried = ", ".join(map(str, configured)) or "none in use"
        print(f"opened one row per data key and table (keys {tried}): {len(unreadable):,} values do not open")
    problems += [f"{table} {row_id} {column}: the sealed value does not open" for table, row_id, column in unreadable]
    for problem in problems:
        print(f"apptgate: {problem}", file=sys.stderr)
    return 1 if problems else 0


async def _open_one_row_per_key(
    database: Database, keys: sealing.DataKeyring, key_ids: list[int]
) -> list[tuple[str, UUID, str]]:
    """(table, row id, column) of the values that do not open, in one row per key id and table (index probes).

    A wrong key fails on any of its values; a value altered on its own is
    found by ``--open-all`` or by ``reencrypt``, which opens what it re-seals.
    """
    unreadable: list[tuple[str, UUID, str]] = []
    async with database.transaction(readonly=True) as conn:
        for key_id in key_ids:
            for table in sealing.SEALED_COLUMNS:
                row = await sealed_columns.row_sealed_under(conn, table, sealing.header(key_id))
                if row is not None:
                    failed = sealing.columns_not_opening(keys, table, row.id, row.sealed, key_id)
                    unreadable += [(table, row.id, column) for column in failed]
    return unreadable


async def _open_every_value(database: Database, keys: sealing.DataKeyring) -> list[tuple[str, UUID, str]]:
    """(table, row id, column) of every sealed value under a configured key that does not open (a full scan)."""
    unreadable: list[tuple[str, UUID, str]] = []
    for table in sealing.SEALED_COLUMNS:
        after: UUID | None = None
        while True:
            async with database.transaction(readonly=True) as conn:
                rows = await sealed_columns.sealed_rows(conn, table, after=after, limit=DEFAULT_BATCH_SIZE)
            for row in rows:
                for key_id in keys.key_ids:  # values under keys not configured are counted by the report
                    failed = sealing.columns_not_opening(keys, table, row.id, row.sealed, key_id)
                    unreadable += [(table, row.id, column) for column in failed]
            if len(rows) < DEFAULT_BATCH_SIZE:
                break
            after = rows[-1].id
    return unreadable


class _Progress:
    """Prints ``table: N rows`` to stderr at most every PROGRESS_EVERY seconds."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def __call__(self, table: str, totals: TableTotals, *, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._last >= PROGRESS_EVERY:
            print(
                f"{table}: {totals.rows:,} rows re-sealed so far" if not final else f"{table}: done",
                file=sys.stderr,
                flush=True,
            )
            self._last = now


async def _reencrypt(database: Database, keys: sealing.DataKeyring, batch_size: int) -> int:
    async with database.transaction(readonly=True) as conn:
        headers, _ = await sealed_columns.headers_in_use(conn)
    missing = sorted(sealing.key_ids_in_use(headers) - set(keys.key_ids))
    if missing:
        print(
            f"apptgate: values are sealed under data key(s) {', '.join(map(str, missing))}, which the configuration "
            "lacks: add them after the active key and run again",
            file=sys.stderr,
        )
        return 1
    progress = _Progress()
    results: dict[str, TableTotals] = {}
    try:
        for table in sealing.SEALED_COLUMNS:
            results[table] = totals = TableTotals()
            await _reencrypt_table(database, keys, table, batch_size, totals, progress)
            progress(table, totals, final=True)
    except asyncio.CancelledError:
        print("interrupted: the batches done so far are committed; run the command again to finish", file=sys.stderr)
        _print_results(keys, results)
        raise
    _print_results(keys, results)
    unreadable = [(table, row_id, column) for table, t in results.items() for row_id, column in t.unreadable]
    for table, row_id, column in unreadable:
        print(f"apptgate: {table} {row_id} {column}: the sealed value does not open", file=sys.stderr)
    return 1 if unreadable else 0


async def _reencrypt_table(
    database: Database,
    keys: sealing.DataKeyring,
    table: str,
    batch_size: int,
    totals: TableTotals,
    progress: _Progress,
) -> None:
    """Re-seal one table, ``batch_size`` rows per transaction, in id order."""
    active = sealing.header(keys.active_key_id)
    columns = sealing.SEALED_COLUMNS[table]
    after: UUID | None = None
    while True:
        async with database.transaction() as conn:
            rows = await sealed_columns.rows_to_reseal(conn, table, active_header=active, after=after, limit=batch_size)
            updates: list[tuple[UUID, dict[str, bytes | None]]] = []
            for row in rows:
                values: dict[str, bytes | None] = {}
                for column in columns:
                    try:
                        values[column] = sealing.reseal(
                            keys, table, column, row.id, row.sealed[column], row.clear[column]
                        )
                    except sealing.SealError:
                        totals.unreadable.append((row.id, column))
                if len(values) < len(columns):
                    continue  # the row is left as it is, and reported at the end
                updates.append((row.id, values))
                totals.sealed_from_clear += sum(1 for c in columns if row.clear[c] is not None)
                totals.resealed += sum(
                    1
                    for c in columns
                    if row.clear[c] is None and (s := row.sealed[c]) is not None and keys.needs_rotation(s)
                )
            await sealed_columns.write_sealed(conn, table, updates)
        totals.rows += len(updates)
        if len(rows) < batch_size:
            return
        after = rows[-1].id
        progress(table, totals)


def _print_results(keys: sealing.DataKeyring, results: dict[str, TableTotals]) -> None:
    for table, totals in results.items():
        print(
            f"{table}: {totals.resealed:,} values re-sealed under data key {keys.active_key_id}, "
            f"{totals.sealed_from_clear:,} sealed from clear ({totals.rows:,} rows)"
            + (f", {len(totals.unreadable):,} values that do not open" if totals.unreadable else "")
        )
