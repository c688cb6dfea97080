"""The command line: ``python -m service {serve,migrate,audit,data-key,partners,demo}``.

Flags override the environment variables of the same meaning (see
:mod:`service.settings`); every problem with the configuration is reported at
start, before anything listens, with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from service import __version__, app
from service import settings as settings_module
from service.cli import audit, data_key, partners, workers
from service.errors import ConfigError, Unavailable
from service.store import migrations
from service.store.database import NotMigratedError
from service.telemetry.logs import configure_logging

log = logging.getLogger("service")

#: Where ``demo`` serves partners unless told otherwise: the address its printed commands use.
DEMO_PARTNER_ADDR = "localhost:50051"


def _program() -> str:
    """How the command was called, for usage lines: ``apptgate`` (the console script) or ``python -m service``."""
    return "apptgate" if Path(sys.argv[0]).name == "apptgate" else "python -m service"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_program(),
        description="apptgate: minimal-disclosure gRPC gateway for medical appointments.",
        epilog="Environment (docs/configuration.md): " + ", ".join(v.name for v in settings_module.variables()),
    )
    parser.add_argument("--version", action="version", version=f"apptgate {__version__}")
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
            help="allow a plaintext partner listener off loopback, outside production (APPTGATE_ALLOW_INSECURE)",
        )
        command.add_argument(
            "--allow-insecure-internal",
            action="store_const",
            const=True,
            help="allow the internal listener off loopback, behind a TLS proxy (APPTGATE_ALLOW_INSECURE_INTERNAL)",
        )

    serve = commands.add_parser("serve", help="serve both listeners until SIGTERM, SIGINT or SIGHUP")
    server_flags(serve)
    # Given by a supervisor to its workers only (service/cli/workers.py), hence not in --help.
    serve.add_argument(workers.SUPERVISOR_PIPE_FLAG, type=int, help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="apply pending database migrations")
    audit.add_commands(commands)
    data_key.add_commands(commands)
    partners.add_commands(commands)
    server_flags(
        commands.add_parser(
            "demo", help="migrate, load demo data, print grpcurl commands and serve (what `make run` does)"
        )
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "partner_addr", "internal_addr", "tls_cert", "tls_key", "tls_client_ca", "allow_insecure",
        "allow_insecure_internal",
    )  # fmt: skip
    return {name: getattr(args, name, None) for name in names}


async def _migrate(settings: settings_module.Settings) -> None:
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack)
        async with database.connection() as conn:
            applied = await migrations.migrate(conn)
    for migration in applied:
        log.info("applied migration %04d_%s", migration.version, migration.name)
    log.info("database is up to date (%d applied now)", len(applied))


def run_loop(settings: settings_module.Settings, main: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine on the configured event loop (``APPTGATE_EVENT_LOOP``)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.event_loop == settings_module.EventLoop.UVLOOP:
        import uvloop  # only the server commands need it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def _stop_on_hang_up() -> None:
    """Make SIGHUP stop a server as SIGTERM does (drain, exit 0), at every stage of its life.

    The configuration is read once, at start: there is nothing to reload, and a
    hang-up (a closed terminal, an operator expecting a reload) must not kill the
    process without draining. Whatever handles SIGTERM at that moment handles it:
    before the event loop runs, that is still the default (the process had no calls).
    """
    signal.signal(signal.SIGHUP, lambda _signum, _frame: signal.raise_signal(signal.SIGTERM))


def _one_line(exc: ConfigError) -> str:
    """What the command line prints for a configuration error: one line when there is one problem."""
    if len(exc.problems) == 1:
        return f"apptgate: {exc.problems[0]}"
    return f"apptgate: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return the process exit code."""
    args = _parser().parse_args(argv)
    if args.command in ("serve", "demo"):
        _stop_on_hang_up()
    if getattr(args, "supervisor_pipe", None) is not None:
        workers.follow_supervisor(args.supervisor_pipe)
    try:
        defaults = {"partner_addr": DEMO_PARTNER_ADDR} if args.command == "demo" else None
        settings = settings_module.load(overrides=_overrides(args), defaults=defaults)
        configure_logging(settings.log_level, sys.stderr)
        if args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "serve":
            if settings.workers > 1:
                return workers.supervise(settings, list(argv[1:] if argv is not None else sys.argv[2:]))
            run_loop(settings, app.serve(settings))
        elif args.command == "partners":
            return asyncio.run(partners.run(settings, args))
        elif args.command == "audit":
            return asyncio.run(audit.run(settings, args))
        elif args.command == "data-key":
            return asyncio.run(data_key.run(settings, args))
        elif args.command == "demo":
            # The demo lives outside the service package (demo/): only this command imports it.
            from demo import serve as demo

            run_loop(settings, demo.serve(settings))
    except ConfigError as exc:
        print(_one_line(exc), file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"apptgate: {exc.message}; check DATABASE_URL", file=sys.stderr)
        return 1
    except (NotMigratedError, migrations.MigrationError) as exc:
        print(f"apptgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> None:
    """The ``apptgate`` console script: :func:`main`, its code the process's exit status."""
    sys.exit(main())
