"""``python -m service audit …``: the incident team's commands.

* ``audit verify`` walks the ledger's hash chain and its signed seals, checks
  the database against the witness (``APPTGATE_LEDGER_WITNESS``), prints every
  problem, exits 1 when any is found, and seals the intact chain: in the
  witness first, then in the database.
* ``audit breach-report --partner ID --since T --until T [--key KEY_ID] --format json|csv``
  writes the list of patients a partner reached, and what of theirs was disclosed.

Both print their progress on stderr when they run long; their results go to
stdout (or ``--output``), so they can be piped. A report names patients:
``--output FILE`` creates it with mode 0600 whatever the umask, and refuses a
symbolic link, or a file that is not a regular file of this user, at that
path (:func:`service.crypto.keyfiles.open_private_output`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from service import app
from service.crypto.keyfiles import load_server_secret, open_private_output
from service.disclosure import breach, witness
from service.disclosure.pseudonyms import derive_key
from service.settings import Settings
from service.store import chain, disclosures
from service.store.database import Database

PROGRESS_EVERY = 2.0  # seconds between progress lines


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``audit verify`` and ``audit breach-report``."""
    audit = commands.add_parser("audit", help="verify the disclosure ledger; report a breach's scope")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = sub.add_parser("verify", help="check the hash chain and seals; seal it when intact")
    verify.add_argument("--no-seal", action="store_true", help="only check; do not add a seal")
    verify.add_argument(
        "--max-lag",
        type=_seconds,
        default=chain.MAX_CHAIN_LAG,
        metavar="SECONDS",
        help=f"a record chained longer than this after it was written is reported as back-dated "
        f"(default {int(chain.MAX_CHAIN_LAG.total_seconds())})",
    )
    report = sub.add_parser("breach-report", help="the patients a partner reached in a window, and what was seen")
    report.add_argument("--partner", required=True, type=uuid.UUID, help="the partner id")
    report.add_argument("--since", required=True, type=_time, help="window start, RFC 3339 (inclusive)")
    report.add_argument("--until", required=True, type=_time, help="window end, RFC 3339 (exclusive)")
    report.add_argument("--key", help="only disclosures made with this key id (for example the stolen one)")
    report.add_argument("--format", choices=("json", "csv"), default="json")
    report.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the report to FILE, created with mode 0600 (default, or -: stdout)",
    )


def _seconds(text: str) -> timedelta:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError("a number of seconds above 0")
    return timedelta(seconds=value)


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, for example 2031-01-01T00:00:00Z")
    return value.astimezone(UTC)


class _Progress:
    """Prints ``label: N`` to stderr at most every PROGRESS_EVERY seconds, once the work runs long."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._last = time.monotonic()

    def __call__(self, count: int) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY:
            print(f"{self._label}: {count:,}", file=sys.stderr, flush=True)
            self._last = now


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one audit command; return the exit code."""
    async with AsyncExitStack() as stack:
        out = sys.stdout
        if args.audit_command == "breach-report" and args.output is not None and str(args.output) != "-":
            # Opened first: a path refused costs no database work, and exits 2 like any bad option.
            out = stack.enter_context(open_private_output(args.output, "--output"))
        database = await app.open_database(settings, stack)
        await database.ensure_migrated()
        if args.audit_command == "verify":
            return await _verify(settings, database, args)
        return await _breach_report(database, args, out)
    raise AssertionError("unreachable")


async def _verify(settings: Settings, database: Database, args: argparse.Namespace) -> int:
    seal_key = derive_key(load_server_secret(settings), b"ledger-seal")
    witnessed = witness.read(settings.witness_path, seal_key)
    async with database.transaction() as conn:  # chain what committed but is not chained yet
        await chain.chain_all(conn)
    async with database.transaction(readonly=True, snapshot=True) as conn:  # the chain and head as of one instant
        result = await chain.verify(conn, seal_key, max_lag=args.max_lag, progress=_Progress("records checked"))
        result.problems += witnessed.problems
        result.problems += await witness.check(conn, witnessed.checkpoints, result.head_seq)
    for problem in result.problems:
        print(f"TAMPERED: {problem}", file=sys.stderr)
    if not result.intact:
        print(f"the ledger is NOT intact: {len(result.problems)} problem(s) in {result.records} records")
        return 1
    vouched = f", {len(witnessed.checkpoints)} witnessed checkpoints matched" if witnessed.checkpoints else ""
    sealed = ""
    if not args.no_seal and result.head_seq > 0:
        async with database.transaction() as conn:
            checkpoint = witness.Checkpoint(
                result.head_seq, result.head_hash, await chain.clock(conn), witness.key_id(seal_key)
            )
            if not witnessed.checkpoints or witnessed.checkpoints[-1].seq < checkpoint.seq:
                witness.append(settings.witness_path, checkpoint, seal_key)
            await chain.seal(conn, seal_key, checkpoint.seq, checkpoint.hash)
        sealed = f", sealed at record {checkpoint.seq}"
    print(f"the ledger is intact: {result.records} records, {result.seals_checked} seals checked{vouched}{sealed}")
    return 0


async def _breach_report(database: Database, args: argparse.Namespace, out: TextIO) -> int:
    progress = _Progress("patients reported")
    totals = breach.Totals()
    writer = csv.writer(out) if args.format == "csv" else None
    if writer is not None:
        writer.writerow(breach.CSV_HEADER)
    else:
        out.write('{"patients": [')
    async with database.transaction(readonly=True) as conn:
        async for patient in disclosures.breach_report(
            conn, partner_id=args.partner, start_time=args.since, end_time=args.until, key_id=args.key
        ):
            if writer is not None:
                writer.writerow(breach.csv_row(patient))
            else:
                out.write(("," if totals.patients else "") + "\n  " + json.dumps(breach.json_patient(patient)))
            totals.add(patient)
            progress(totals.patients)
    if writer is None:
        out.write('\n], "totals": ' + json.dumps(breach.json_totals(totals)) + "}\n")
    out.flush()
    summary = breach.json_totals(totals)
    print(f"breach report: {json.dumps(summary)}", file=sys.stderr)
    return 0
