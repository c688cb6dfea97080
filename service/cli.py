"""The command line: ``python -m service {serve,migrate,audit,data-key,demo}``.

Flags override the environment variables of the same meaning (see
``service.settings``); every problem with the configuration is reported at
start, before anything listens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

from service import app, audit_cli, data_key_cli, demo, partners_cli, walkthrough, workers
from service import settings as settings_module
from service.errors import ConfigError, Unavailable
from service.store import migrations
from service.store.database import Database, NotMigratedError
from service.telemetry import configure_logging

log = logging.getLogger("service")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="apptgate: minimal-disclosure gRPC gateway for medical appointments.",
        epilog="Environment: " + ", ".join(settings_module.ENVIRONMENT_VARIABLES),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def server_flags(command: argparse.ArgumentParser) -> None:
        command.add_argument("--partner-addr", help="partner listener host:port (APPTGATE_PARTNER_ADDR)")
        command.add_argument("--internal-addr", help="internal listener host:port (APPTGATE_INTERNAL_ADDR)")
        command.add_argument("--tls-cert", help="PEM certificate for the partner listener (APPTGATE_TLS_CERT)")
        command.add_argument("--tls-key", help="PEM private key for the partner listener (APPTGATE_TLS_KEY)")
        command.add_argument(
            "--tls-client-ca",
            help="PEM CA of partner client certificates: turns on mutual TLS (APPTGATE_TLS_CLIENT_CA)",
        )
        command.add_argument(
            "--allow-insecure",
            action="store_const",
            const=True,
            help="allow plaintext on a non-loopback address (APPTGATE_ALLOW_INSECURE)",
        )

    server_flags(commands.add_parser("serve", help="serve both listeners until SIGTERM/SIGINT"))
    commands.add_parser("migrate", help="apply pending database migrations")
    audit_cli.add_commands(commands)
    data_key_cli.add_commands(commands)
    partners_cli.add_commands(commands)
    server_flags(
        commands.add_parser(
            "demo", help="migrate, load demo data, print grpcurl commands and serve (what `make run` does)"
        )
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("partner_addr", "internal_addr", "tls_cert", "tls_key", "tls_client_ca", "allow_insecure")
    return {name: getattr(args, name, None) for name in names}


async def _migrate(settings: settings_module.Settings) -> None:
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack)
        async with database.connection() as conn:
            applied = await migrations.migrate(conn)
    for migration in applied:
        log.info("applied migration %04d_%s", migration.version, migration.name)
    log.info("database is up to date (%d applied now)", len(applied))


def _print_walkthrough(gateway: app.Gateway, world: demo.DemoWorld, internal_token: str) -> None:
    assert gateway.partner and gateway.internal
    values = walkthrough.DemoValues(
        partner_address=f"localhost:{gateway.partner.port}",
        internal_address=f"localhost:{gateway.internal.port}",
        partner_key=world.partner_key,
        internal_token=internal_token,
        partner_id=str(world.partner_id),
        practitioner_id=str(world.practitioner_id),
        patient_id=str(world.patient_id),
        appointment_id=gateway.partner_appointment_id(world.partner_id, world.appointment_id),
        week_start=world.week_start,
    )
    print(walkthrough.render(values), flush=True)


async def _demo(settings: settings_module.Settings) -> None:
    worlds: list[demo.DemoWorld] = []

    async def prepare(database: Database, secrets: app.Secrets) -> None:
        async with database.connection() as conn:
            await migrations.migrate(conn)
        worlds.append(await demo.seed(database, secrets.data_keys))

    async def ready(gateway: app.Gateway) -> None:
        assert settings.internal_token
        _print_walkthrough(gateway, worlds[0], settings.internal_token)

    await app.serve(settings, prepare=prepare, on_ready=ready)


def _run_loop(settings: settings_module.Settings, main: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine on the configured event loop (``APPTGATE_EVENT_LOOP``)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.event_loop == "uvloop":
        import uvloop  # only the server commands need it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return the process exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = settings_module.load(os.environ, _overrides(args))
        configure_logging(settings.log_level, sys.stderr)
        if args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "serve":
            if settings.workers > 1:
                return workers.supervise(settings, os.environ, list(argv if argv is not None else sys.argv[2:]))
            _run_loop(settings, app.serve(settings))
        elif args.command == "partners":
            return asyncio.run(partners_cli.run(settings, args))
        elif args.command == "audit":
            return asyncio.run(audit_cli.run(settings, args))
        elif args.command == "data-key":
            return asyncio.run(data_key_cli.run(settings, args))
        elif args.command == "demo":
            if "APPTGATE_PARTNER_ADDR" not in os.environ and args.partner_addr is None:
                settings = replace(settings, partner_addr="localhost:50051")
            if not settings.internal_token:
                settings = replace(settings, internal_token=secrets.token_urlsafe(32))
            _run_loop(settings, _demo(settings))
    except ConfigError as exc:
        print(f"apptgate: {exc}", file=sys.stderr)
        return 2
    except Unavailable:
        print("apptgate: the database is unreachable (check DATABASE_URL)", file=sys.stderr)
        return 1
    except (NotMigratedError, migrations.MigrationError) as exc:
        print(f"apptgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
