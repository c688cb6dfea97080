"""``python -m service partners …``: an operator's view of partners' extraction limits.

* ``partners usage --partner ID``: today's counters against the limits in force, the norm, the flag;
* ``partners set-limits --partner ID [--rps R] [--burst B] [--contact-cap N] [--patient-cap N]``;
* ``partners lift --partner ID``: lift a suspension;
* ``partners issue-key --partner ID [--cert FILE]``: issue a key, bound to the client certificate in
  ``FILE`` (PEM) when given: the key then verifies only over mutual TLS with that certificate.

The same operations are RPCs of ``PartnerRegistryService`` for internal tools.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

from service import app
from service.access import credentials
from service.access.limits import ExtractionGuard
from service.errors import ConfigError, NotFound
from service.settings import Settings
from service.store import partners as partner_store
from service.store import usage
from service.telemetry.tracing import Telemetry


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``partners usage``, ``partners set-limits`` and ``partners lift``."""
    partners = commands.add_parser("partners", help="show a partner's usage, change its limits, lift a suspension")
    sub = partners.add_subparsers(dest="partners_command", required=True)
    show = sub.add_parser("usage", help="today's counters against the limits in force")
    show.add_argument("--partner", required=True, type=uuid.UUID)
    change = sub.add_parser("set-limits", help="override some limits of a partner")
    change.add_argument("--partner", required=True, type=uuid.UUID)
    change.add_argument("--rps", type=float, help="calls per second per process")
    change.add_argument("--burst", type=int, help="calls in a burst per process")
    change.add_argument("--contact-cap", type=int, help="contact disclosures per UTC day")
    change.add_argument("--patient-cap", type=int, help="distinct patients per UTC day")
    lift = sub.add_parser("lift", help="lift a partner's suspension")
    lift.add_argument("--partner", required=True, type=uuid.UUID)
    issue = sub.add_parser("issue-key", help="issue a key (its secret is printed once), bound to a certificate")
    issue.add_argument("--partner", required=True, type=uuid.UUID)
    issue.add_argument("--cert", type=Path, help="the client certificate (PEM) the key verifies over, and no other")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``partners`` command; print JSON; return the exit code."""
    if args.partners_command == "issue-key":
        return await _issue_key(settings, args)
    guard = ExtractionGuard(settings, Telemetry())
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack)
        await database.ensure_migrated()
        async with database.transaction() as conn:
            if args.partners_command == "set-limits":
                overrides = await usage.set_limits(
                    conn,
                    args.partner,
                    requests_per_second=args.rps,
                    burst=args.burst,
                    contact_daily_cap=args.contact_cap,
                    patient_daily_cap=args.patient_cap,
                )
            elif args.partners_command == "lift":
                overrides = await usage.lift_suspension(conn, args.partner)
            else:
                overrides = await usage.overrides(conn, args.partner)
            today = await usage.today(conn, args.partner)
    policy = guard.policy(overrides)
    print(
        json.dumps(
            {
                "partner_id": str(args.partner),
                "day": today.day,
                "disclosures": today.disclosures,
                "contact_disclosures": today.contact_disclosures,
                "patients_reached": today.patients_reached,
                "recent_daily_average": round(today.recent_daily_average, 1),
                "flagged": today.flag_time.isoformat() if today.flag_time else None,
                "limits": {
                    "requests_per_second": policy.requests_per_second,
                    "burst": policy.burst,
                    "contact_daily_cap": policy.contact_daily_cap,
                    "patient_daily_cap": policy.patient_daily_cap,
                },
                "suspended": overrides.suspend_time.isoformat() if overrides.suspend_time else None,
                "suspend_reason": overrides.suspend_reason or None,
            },
            indent=2,
        )
    )
    return 0


async def _issue_key(settings: Settings, args: argparse.Namespace) -> int:
    bound = None
    if args.cert is not None:
        try:
            bound = credentials.certificate_sha256(args.cert.read_bytes())
        except OSError as exc:
            raise ConfigError([f"--cert: cannot read {args.cert}: {exc.strerror}"]) from exc
        except ValueError as exc:
            raise ConfigError([f"--cert: {args.cert} holds no PEM certificate"]) from exc
    issued = credentials.new_partner_key()
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack)
        await database.ensure_migrated()
        try:
            async with database.transaction() as conn:
                row = await partner_store.insert_key(conn, issued.key_id, args.partner, issued.secret_hash, bound)
        except NotFound:
            print(f"apptgate: no partner {args.partner}", file=sys.stderr)
            return 1
    print(
        json.dumps(
            {
                "key_id": row.id,
                "partner_id": str(row.partner_id),
                "secret": issued.secret,
                "client_cert_sha256": bound.hex() if bound is not None else None,
            },
            indent=2,
        )
    )
    return 0
