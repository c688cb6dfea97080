"""Sync a week of a practitioner's agenda from apptgate and print it: an example partner program.

Usage::

    APPTGATE_PARTNER_KEY=pk_… python sync_week.py [--practitioner ID] [--from 2030-03-04] [--json]

Environment (read here, in one place):

* ``APPTGATE_PARTNER_ADDR``: the partner listener, default ``localhost:50051`` (what ``make run`` serves).
* ``APPTGATE_PARTNER_KEY``: the partner key (required; ``make run`` prints one).

The week starts at 00:00 UTC of ``--from`` (default: today) and lasts 7 days.
Without ``--practitioner``, every practitioner granted to the partner is
synced. Appointments come in the basic view: times, practitioner, status and
the partner-scoped patient pseudonym, nothing that identifies the patient.
Exit status: 0 on success, 1 when the gateway refuses or fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta

from appointments.partner.v1 import appointment_pb2
from apptgate_client import ApptgateError, PartnerClient

DEFAULT_ADDR = "localhost:50051"


def _week_start(text: str | None) -> datetime:
    day = date.fromisoformat(text) if text else datetime.now(UTC).date()
    return datetime.combine(day, time(0), tzinfo=UTC)


def _record(appointment: appointment_pb2.Appointment) -> dict[str, str]:
    return {
        "appointment_id": appointment.appointment_id,
        "start_time": appointment.start_time.ToDatetime(tzinfo=UTC).isoformat(),
        "end_time": appointment.end_time.ToDatetime(tzinfo=UTC).isoformat(),
        "practitioner_id": appointment.practitioner.practitioner_id,
        "practitioner": appointment.practitioner.display_name,
        "status": appointment_pb2.AppointmentStatus.Name(appointment.status).removeprefix("APPOINTMENT_STATUS_"),
        "patient_ref": appointment.patient_ref,
    }


def _print_agenda(records: list[dict[str, str]], start: datetime, end: datetime) -> None:
    last_day = end - timedelta(days=1)
    print(f"Agenda {start:%Y-%m-%d} to {last_day:%Y-%m-%d} (UTC): {len(records)} appointments")
    day = ""
    for record in records:
        starts = datetime.fromisoformat(record["start_time"])
        if f"{starts:%Y-%m-%d}" != day:
            day = f"{starts:%Y-%m-%d}"
            print(f"\n{starts:%A %Y-%m-%d}")
        ends = datetime.fromisoformat(record["end_time"])
        print(
            f"  {starts:%H:%M}-{ends:%H:%M}  {record['practitioner']:<24} {record['status']:<9} "
            f"patient {record['patient_ref']}  ({record['appointment_id']})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; return its exit status."""
    parser = argparse.ArgumentParser(description="Sync a week of agenda from apptgate.")
    parser.add_argument("--practitioner", default="", help="a practitioner id (default: every granted one)")
    parser.add_argument("--from", dest="start", help="first day of the week, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    address = os.environ.get("APPTGATE_PARTNER_ADDR") or DEFAULT_ADDR
    key = os.environ.get("APPTGATE_PARTNER_KEY", "")
    if not key:
        print("sync_week: set APPTGATE_PARTNER_KEY to your partner key", file=sys.stderr)
        return 2
    try:
        start = _week_start(args.start)
    except ValueError:
        print("sync_week: --from must be a date, YYYY-MM-DD", file=sys.stderr)
        return 2
    end = start + timedelta(days=7)
    try:
        with PartnerClient(address, key) as client:
            records = [
                _record(appointment)
                for appointment in client.iter_appointments(
                    start_time=start, end_time=end, practitioner_id=args.practitioner, page_size=100
                )
            ]
    except ApptgateError as exc:
        # The server's message and reason are fixed texts: safe to show.
        print(f"sync_week: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump({"start_time": start.isoformat(), "end_time": end.isoformat(), "appointments": records}, sys.stdout)
        print()
    else:
        _print_agenda(records, start, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
