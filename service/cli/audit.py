"""``python -m service audit …``: the incident team's commands.

* ``audit verify`` walks the ledger's hash chain and its signed seals, checks
  the database against the witness (``APPTGATE_LEDGER_WITNESS``), prints every
  problem, exits 1 when any is found, and seals the intact chain: in the
  witness first, then in the database.
* ``audit breach-report --partner ID --since T --until T [--key KEY_ID] --format json|csv|html|pdf``
  writes what a partner's incident reached: the patients, their appointments
  (times, practitioners, specialties), the contact fields and views, hour by
  hour, with the ledger's verification. ``json`` is the JSON mapping of
  ``AuditService.BreachReport``'s response (the proto's field names), ``csv``
  one row per patient under the same names, ``html`` the dossier a DPO files
  and works from (:mod:`service.disclosure.breach_dossier`), ``pdf`` that page
  laid out by WeasyPrint. ``--include-contact`` adds the patients' names and
  emails for the notification letters, and records that use in the ledger
  first; ``--format csv --letters`` writes the letters' mail merge.
* ``audit patient-history --patient ID [--from T] [--to T] [--format json|csv|html] [--timezone ZONE]``
  answers a patient's subject-access request: which partners saw what of theirs,
  when and why, and what they were refused; ``html`` is the page the patient
  reads (:mod:`service.disclosure.patient_history_page`).

They print their progress on stderr when they run long; their results go to
stdout (or ``--output``), so they can be piped. A report names patients:
``--output FILE`` creates it with mode 0600 whatever the umask, and refuses a
symbolic link, or a file that is not a regular file of this user, at that
path (:func:`service.crypto.keyfiles.open_private_output`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from service import app, models
from service.access import credentials
from service.crypto.keyfiles import load_data_keys, load_server_secret, open_private_output
from service.crypto.sealing import SealError
from service.disclosure import (
    breach,
    breach_dossier,
    breach_letters,
    breach_scope,
    ledger_check,
    patient_history,
    patient_history_page,
    pdf,
    witness,
)
from service.disclosure.pseudonyms import derive_key
from service.errors import ConfigError
from service.settings import Settings
from service.store import breaches, chain, partners, privacy
from service.store.database import Connection, Database

PROGRESS_EVERY = 2.0  # seconds between progress lines
#: Entries of a patient's history read per statement.
HISTORY_PAGE = 1000
#: The window of a history without bounds: every record the ledger can hold.
_EVER = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``audit verify``, ``audit breach-report`` and ``audit patient-history``."""
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
    report.add_argument(
        "--format",
        choices=("json", "csv", "html", "pdf"),
        default="json",
        help="json: the BreachReport RPC's response; csv: a row per patient; html: the dossier for the DPO; "
        "pdf: the dossier as PDF (default json)",
    )
    report.add_argument(
        "--include-contact",
        action="store_true",
        help="add the patients' names and emails, for the notification letters; the ledger records that use",
    )
    report.add_argument(
        "--letters",
        action="store_true",
        help="with --format csv and --include-contact: one row per patient for a mail merge of the letters",
    )
    report.add_argument(
        "--no-verify",
        action="store_true",
        help="do not verify the ledger first (json, html and pdf verify it, and say what that found)",
    )
    report.add_argument(
        "--timezone",
        type=_zone,
        default=UTC,
        metavar="ZONE",
        help="the time zone of the dates written out in the letters, for example Europe/Paris (default UTC)",
    )
    report.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the report to FILE, created with mode 0600 (default, or -: stdout)",
    )
    history = sub.add_parser(
        "patient-history",
        help="a patient's history for a subject-access request: who saw what of theirs, when and why",
    )
    history.add_argument("--patient", required=True, type=uuid.UUID, metavar="ID", help="the patient id")
    history.add_argument(
        "--from",
        dest="start_time",
        type=_time,
        metavar="TIME",
        help="window start, RFC 3339 (inclusive; default: the first record)",
    )
    history.add_argument(
        "--to", dest="end_time", type=_time, metavar="TIME", help="window end, RFC 3339 (exclusive; default: now)"
    )
    history.add_argument(
        "--format",
        choices=("json", "csv", "html"),
        default="json",
        help="json or csv for staff and tools; html: the page for the patient, in French and English (default json)",
    )
    history.add_argument(
        "--timezone",
        type=_zone,
        default=UTC,
        metavar="ZONE",
        help="the time zone of the times on the html page, for example Europe/Paris (default UTC)",
    )
    history.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the history to FILE, created with mode 0600 (default, or -: stdout)",
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


def _zone(text: str) -> tzinfo:
    if text.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError("an IANA time zone, for example Europe/Paris") from None


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
    if args.audit_command == "patient-history":
        _check_window(args.start_time, args.end_time)
    elif args.audit_command == "breach-report":
        _check_breach_input(args)
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack)
        await database.ensure_migrated()
        out = sys.stdout
        if args.audit_command == "breach-report":
            async with database.transaction(readonly=True) as conn:
                await _check_breach_subjects(conn, args)
            if args.output is not None and str(args.output) != "-":
                # Opened once the input is known good: a refused report leaves an earlier file as it was.
                out = stack.enter_context(open_private_output(args.output, "--output"))
        if args.audit_command == "verify":
            return await _verify(settings, database, args)
        if args.audit_command == "patient-history":
            return await _patient_history(database, args)
        return await _breach_report(settings, database, args, out)
    raise AssertionError("unreachable")


def _seal_key(settings: Settings) -> bytes:
    return derive_key(load_server_secret(settings), b"ledger-seal")


async def _verify(settings: Settings, database: Database, args: argparse.Namespace) -> int:
    seal_key = _seal_key(settings)
    checked = await ledger_check.run(
        database, seal_key, settings.witness_path, max_lag=args.max_lag, progress=_Progress("records checked")
    )
    result, checkpoints = checked.result, checked.checkpoints
    for problem in result.problems:
        print(f"TAMPERED: {problem}", file=sys.stderr)
    if not result.intact:
        print(f"the ledger is NOT intact: {len(result.problems)} problem(s) in {result.records} records")
        return 1
    vouched = f", {len(checkpoints)} witnessed checkpoints matched" if checkpoints else ""
    sealed = ""
    if not args.no_seal and result.head_seq > 0:
        async with database.transaction() as conn:
            checkpoint = witness.Checkpoint(
                result.head_seq, result.head_hash, await chain.clock(conn), witness.key_id(seal_key)
            )
            if not checkpoints or checkpoints[-1].seq < checkpoint.seq:
                witness.append(settings.witness_path, checkpoint, seal_key)
            await chain.seal(conn, seal_key, checkpoint.seq, checkpoint.hash)
        sealed = f", sealed at record {checkpoint.seq}"
    print(f"the ledger is intact: {result.records} records, {result.seals_checked} seals checked{vouched}{sealed}")
    return 0


def _check_breach_input(args: argparse.Namespace) -> None:
    """Refuse, before any database work, a window that is empty or reversed and a key id of the wrong shape."""
    problems = []
    if args.until <= args.since:
        problems.append(
            f"--until ({args.until.isoformat()}) is not after --since ({args.since.isoformat()}): "
            "the window is empty or ends before it starts"
        )
    if args.key is not None and not credentials.is_key_id(args.key):
        problems.append(f"--key: {args.key!r} is not a key id (pk_ and 16 characters)")
    if args.letters and (args.format != "csv" or not args.include_contact):
        problems.append(
            "--letters needs --format csv and --include-contact: the letters' rows hold the patients' names and "
            "emails, which are read only with --include-contact (and recorded in the ledger)"
        )
    if problems:
        raise ConfigError(problems)


async def _check_breach_subjects(conn: Connection, args: argparse.Namespace) -> None:
    """Refuse a partner or key the database does not know, so that an empty report always means "none reached"."""
    if await partners.find_partner(conn, args.partner) is None:
        raise ConfigError([f"--partner: no partner has the id {args.partner}"])
    if args.key is not None:
        key = await partners.find_key(conn, args.key)
        if key is None or key.partner_id != args.partner:
            raise ConfigError([f"--key: the partner {args.partner} has no key {args.key}"])


async def _breach_report(settings: Settings, database: Database, args: argparse.Namespace, out: TextIO) -> int:
    window = breaches.Window(args.partner, args.since, args.until, args.key)
    verification = breach.Verification()
    if args.format != "csv" and not args.no_verify:
        checked = await ledger_check.run(
            database, _seal_key(settings), settings.witness_path, progress=_Progress("records checked"), window=window
        )
        verification = checked.for_report()
    report = await breach_scope.read(database, window, progress=_Progress("patients reported"))
    report = replace(report, verification=verification)
    record_id = None
    if args.include_contact:
        keys = load_data_keys(settings)
        await app.verify_data_keys(database, keys, record=False)
        try:
            report, record_id = await breach_scope.read_contacts(database, keys, report)
        except SealError as exc:  # a fixed text, naming no value
            raise ConfigError([f"the data keys do not open the patients' contact details: {exc}"]) from None
    message = breach.response_message(report)
    if args.format == "pdf":
        try:
            out.buffer.write(pdf.render(_dossier(settings, report, args, record_id)))
        except pdf.PdfError as exc:
            print(f"apptgate: {exc}", file=sys.stderr, flush=True)
            return 1
    elif args.format == "html":
        out.write(_dossier(settings, report, args, record_id))
    elif args.format == "csv":
        writer = csv.writer(out)
        if args.letters:
            writer.writerow(breach_letters.LETTER_HEADER)
            writer.writerows(breach_letters.letter_row(report, p, args.timezone) for p in message.patients)
        else:
            writer.writerow(breach.CSV_HEADER)
            writer.writerows(breach.csv_row(p) for p in message.patients)
    else:
        out.write(breach.json_text(message))
    out.flush()
    print(f"breach report: {breach.json_text(message.totals, indent=None).strip()}", file=sys.stderr)
    if record_id is not None:
        print(
            f"breach report: the names and emails of {len(report.patients):,} patients were read; "
            f"ledger record {record_id} says so",
            file=sys.stderr,
        )
    if verification.state is breach.VerificationState.NOT_INTACT:
        print(
            f"breach report: the ledger is NOT intact ({len(verification.problems)} problems): "
            "the report may be incomplete; run audit verify",
            file=sys.stderr,
        )
    return 0


def _dossier(settings: Settings, report: breach.Report, args: argparse.Namespace, record_id: int | None) -> str:
    return breach_dossier.render(report, dpo_contact=settings.dpo_contact, zone=args.timezone, record_id=record_id)


def _check_window(start: datetime | None, end: datetime | None) -> None:
    if start is None or end is None:
        return
    if end < start:
        raise ConfigError(
            [f"--to ({end.isoformat()}) is before --from ({start.isoformat()}): the window ends before it starts"]
        )
    if end == start:
        raise ConfigError([f"--to and --from are the same instant ({start.isoformat()}): the window is empty"])


async def read_history(
    database: Database,
    patient_id: uuid.UUID,
    start_time: datetime | None,
    end_time: datetime | None,
    *,
    page_size: int = HISTORY_PAGE,
) -> patient_history.History:
    """A patient's whole history in ``[start_time, end_time)``, every page read in one snapshot.

    Raises :class:`ConfigError` when no patient has that id.
    """
    progress = _Progress("history entries read")
    entries: list[models.PatientDisclosure] = []
    # REPEATABLE READ: the existence check and every page see the ledger as of one instant.
    async with database.transaction(readonly=True, snapshot=True) as conn:
        generate_time = await chain.clock(conn)
        if not await privacy.patient_exists(conn, patient_id):
            raise ConfigError([f"--patient: no patient has the id {patient_id}"])
        before: tuple[datetime, str] | None = None
        while True:
            page = await privacy.patient_disclosures(
                conn,
                patient_id,
                start_time=start_time or _EVER[0],
                end_time=end_time or _EVER[1],
                before=before,
                limit=page_size,
            )
            entries.extend(page)
            progress(len(entries))
            if len(page) < page_size:
                break
            before = (page[-1].last_time, page[-1].group_key)
    return patient_history.History(patient_id, start_time, end_time, generate_time, tuple(entries))


async def _patient_history(database: Database, args: argparse.Namespace) -> int:
    history = await read_history(database, args.patient, args.start_time, args.end_time)
    if args.format == "html":
        text = patient_history_page.render(history, args.timezone)
    elif args.format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(patient_history.CSV_HEADER)
        writer.writerows(patient_history.csv_row(entry) for entry in history.entries)
        text = buffer.getvalue()
    else:
        text = json.dumps(patient_history.json_document(history), indent=2) + "\n"
    # Opened once the history is read: an unknown patient leaves no empty file behind.
    if args.output is not None and str(args.output) != "-":
        with open_private_output(args.output, "--output") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    summary = patient_history.json_totals(patient_history.totals(history.entries))
    print(f"patient history: {json.dumps(summary)}", file=sys.stderr)
    return 0
