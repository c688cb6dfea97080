"""The command line: ``apptgate`` (or ``python -m service``) ``{serve,migrate,audit,data-key,partners,demo}``.

Flags override the environment variables of the same meaning (see
:mod:`service.settings`); every problem with the configuration is reported at
start, before anything listens, with exit code 2.

No error shows a traceback: each is one line ``apptgate: …`` on stderr (a
configuration's problems one per line below it), with exit code 2 for bad
input (the configuration, a flag's value, an unknown partner: the errors of
:mod:`service.errors` that the operator's input caused) and 1 for an
operational failure (the database unreachable or refusing, not migrated, a
port in use, no database at all). Anything unexpected is named by its class
only, since an exception's text can quote SQL or stored values; ``--debug``
(or ``APPTGATE_LOG_LEVEL=DEBUG``) adds the traceback and the detail.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from service import __version__, app
from service import settings as settings_module
from service.api.server import BindError
from service.cli import audit, data_key, partners, workers
from service.crypto import keyfiles
from service.errors import (
    ApptgateError,
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from service.store import migrations
from service.store.database import NotMigratedError
from service.store.embedded import MissingDatabase
from service.telemetry.logs import configure_logging

log = logging.getLogger("service")

#: Where ``demo`` serves partners unless told otherwise: the address its printed commands use.
DEMO_PARTNER_ADDR = "localhost:50051"


def _program() -> str:
    """How the command was called, for usage lines: ``apptgate`` (the console script) or ``python -m service``."""
    return "apptgate" if Path(sys.argv[0]).name == "apptgate" else "python -m service"


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line like every other error (its subcommands' parsers too)."""

    def error(self, message: str) -> NoReturn:
        # "argument --partner: not a UUID" names its flag as the other errors do: "--partner: not a UUID".
        what = message.removeprefix("argument ") if message.startswith("argument -") else f"{self.prog}: {message}"
        self.exit(2, f"apptgate: {what} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog=_program(),
        description="apptgate: minimal-disclosure gRPC gateway for medical appointments.",
        epilog="Environment (docs/configuration.md): " + ", ".join(v.name for v in settings_module.variables()),
    )
    parser.add_argument("--version", action="version", version=f"apptgate {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, add its traceback and detail; log at DEBUG (also APPTGATE_LOG_LEVEL=DEBUG)",
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
    for command in commands.choices.values():
        _accept_debug(command)
    return parser


def _accept_debug(parser: argparse.ArgumentParser) -> None:
    """Let ``--debug`` come after a command too (``apptgate partners usage --debug``), at every level.

    Given there, it is stored as given at the top; absent, it leaves the top's value alone.
    """
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _accept_debug(sub)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "partner_addr", "internal_addr", "tls_cert", "tls_key", "tls_client_ca", "allow_insecure",
        "allow_insecure_internal",
    )  # fmt: skip
    return {name: getattr(args, name, None) for name in names}


async def _migrate(settings: settings_module.Settings) -> None:
    async with AsyncExitStack() as stack:
        database = await app.open_database(settings, stack, create=True)
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
    return f"apptgate: {len(exc.problems)} problems with the configuration:\n  " + "\n  ".join(exc.problems)


#: Commands that may create an embedded database; the others refuse to run without one (:func:`app.embedded_database`).
CREATING_COMMANDS = ("migrate", "demo")

_DEBUG_HINT = "rerun with --debug for the detail"


def _describe(exc: BaseException) -> tuple[str, int]:
    """The line (without ``apptgate: ``) and the exit code an error ends a command with; never a traceback.

    Messages of the service's own errors are fixed texts written where they are
    raised, and their metadata echoes identifiers the operator gave; anything
    else is named by its class only, its text being free to quote SQL or data.
    """
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])  # a task group's one failure
    if isinstance(exc, ConfigError):
        return _one_line(exc).removeprefix("apptgate: "), 2
    if isinstance(exc, MissingDatabase | NotMigratedError | migrations.MigrationError | BindError):
        return str(exc), 1
    if isinstance(exc, Unavailable):
        return f"{exc.message}; check DATABASE_URL", 1
    if isinstance(exc, InvalidArgument):
        return "; ".join(f"invalid {v.field}: {v.description}" for v in exc.violations) or exc.message, 2
    if isinstance(exc, ApptgateError):
        ids = ", ".join(f"{key} {value}" for key, value in sorted(exc.metadata.items()))
        operational = isinstance(exc, DeadlineExceeded | ResourceExhausted)
        return (f"{exc.message} ({ids})" if ids else exc.message), 1 if operational else 2
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        # A PostgreSQL error the store did not translate (asyncpg's classes carry their SQLSTATE): named by
        # class and code, since its message and detail can quote the row's values.
        named = f"{type(exc).__name__}, SQLSTATE {sqlstate}"
        if sqlstate[:2] in ("22", "23"):  # data exception, integrity constraint violation: the values given
            return f"the database refused the values given ({named}); {_DEBUG_HINT}", 2
        if sqlstate[:2] == "28" or sqlstate == "42501":  # invalid authorization, insufficient privilege
            return f"the database refused DATABASE_URL's role ({named}): check its privileges; {_DEBUG_HINT}", 1
        return f"the database failed ({named}); {_DEBUG_HINT}", 1
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"an address is in use: {exc.strerror}; stop what listens there or choose another", 1
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__}{where}", 1
    return f"unexpected {type(exc).__name__}; {_DEBUG_HINT}", 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return the process exit code. Every error ends it in one line (see the module docstring)."""
    args = _parser().parse_args(argv)
    debug = bool(args.debug) or settings_module.debug_requested()
    try:
        return _run(args, list(sys.argv[1:] if argv is None else argv), debug)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        line, code = _describe(exc)
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"apptgate: {line}", file=sys.stderr, flush=True)
        return code


def _run(args: argparse.Namespace, argv: list[str], debug: bool) -> int:
    """Run the command ``args`` names; raises what :func:`main` turns into its one line."""
    if args.command in ("serve", "demo"):
        _stop_on_hang_up()
    if getattr(args, "supervisor_pipe", None) is not None:
        workers.follow_supervisor(args.supervisor_pipe)
    defaults = {"partner_addr": DEMO_PARTNER_ADDR} if args.command == "demo" else None
    # The servers' own checks run with the settings' so that one run lists every problem.
    checks: tuple[Callable[[settings_module.Settings], list[str]], ...] = ()
    if args.command == "serve":
        checks = (settings_module.serving_problems, keyfiles.configured_problems)
    elif args.command == "demo":  # which makes up an internal token when none is given
        checks = (partial(settings_module.serving_problems, token_required=False), keyfiles.configured_problems)
    settings = settings_module.load(overrides=_overrides(args), defaults=defaults, checks=checks)
    configure_logging(settings_module.LogLevel.DEBUG if debug else settings.log_level, sys.stderr)
    if settings.database_url is None and args.command not in CREATING_COMMANDS:
        app.embedded_database(settings, create=False)  # before anything is created in the data directory
    if args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "serve":
        if settings.workers > 1:
            # The worker's flags: what follows `serve` (global flags come before it).
            flags = argv[argv.index("serve") + 1 :]
            return workers.supervise(settings, [*flags, "--debug"] if debug and "--debug" not in flags else flags)
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
    return 0


def run() -> None:
    """The ``apptgate`` console script: :func:`main`, its code the process's exit status."""
    sys.exit(main())
