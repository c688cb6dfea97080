"""Serving on every core: a supervisor that runs N worker processes sharing the listening ports.

``python -m service serve`` with ``APPTGATE_WORKERS`` > 1 (default: the number
of CPUs) becomes a supervisor: it checks the configuration, creates the development
keys once, starts the embedded PostgreSQL when there is no ``DATABASE_URL``
(one ``migrate`` created: it creates none), connects to the database once (so that a refused login or a missing
migration is reported once, in one line), then starts the workers (each
``python -m service serve`` with one worker, ``SO_REUSEPORT`` on and its own
connection pool) and the kernel spreads connections across them.

Stopping. SIGTERM or SIGINT is passed on; each worker drains its calls; the
supervisor exits 0 when they all did. SIGHUP is a clean stop too, passed on
as SIGTERM: the service reads its configuration once, at start, so there is
nothing to reload in place, and a hang-up (a closed terminal, or an operator
expecting a reload) must neither kill the supervisor silently nor leave the
workers serving with the old configuration; the process manager starts the
service again. A worker that dies takes the others down with it (exit code
1), so the process manager above restarts a whole, consistent service.

Workers never outlive their supervisor, however it ends (SIGKILL included).
Each worker reads a pipe whose write end only the supervisor holds: end of
file means the supervisor is gone, and the worker drains and exits as on
SIGTERM. On Linux the kernel also sends a worker SIGTERM when its supervisor
dies (``PR_SET_PDEATHSIG``). And a supervisor refuses to start on a port
another process listens on, so it never serves beside the workers of an
earlier one (which, with ``SO_REUSEPORT``, would share its connections with
their old configuration and internal token). With ``OTEL_METRICS_EXPORTER=prometheus``,
worker N serves ``/metrics`` on ``OTEL_EXPORTER_PROMETHEUS_PORT`` + N, each port checked free
before any worker starts. An embedded PostgreSQL started
by a supervisor killed with SIGKILL keeps running; the next start joins it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import replace

from service.api.server import BindError
from service.app import check_transport_security, embedded_database, listened_on, load_secrets, open_database
from service.errors import ConfigError
from service.settings import Exporter, Settings, child_environment, split_address

log = logging.getLogger(__name__)

#: The ``serve`` flag that makes a process a worker: the descriptor of its supervisor's pipe (not in --help).
SUPERVISOR_PIPE_FLAG = "--supervisor-pipe"

#: ``prctl`` option from ``<linux/prctl.h>``: the signal sent to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def supervise(settings: Settings, argv: list[str]) -> int:
    """Run ``settings.workers`` worker processes until a signal; return the exit code."""
    check_transport_security(settings)
    _check_ports(settings)
    load_secrets(settings)  # creates the development keys once, before the workers race to

    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        # SIGHUP stops the whole service (see the module docstring): the workers drain as on SIGTERM.
        forwarded = signal.SIGTERM if signum == signal.SIGHUP else signum
        for child in children:
            if child.poll() is None:
                child.send_signal(forwarded)

    # Handled before anything starts, so a stop that comes early still stops what did start.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    env = child_environment({"APPTGATE_WORKERS": "1", "APPTGATE_REUSE_PORT": "true"})
    embedded = None
    if settings.database_url is None:
        embedded = embedded_database(settings, create=False)
    try:
        if embedded is not None:
            env["DATABASE_URL"] = embedded.start()
        # Connected to once here, as each worker will: a database problem (a refused login, a
        # missing migration) is reported once, in one line, before any worker starts.
        asyncio.run(_check_database(replace(settings, database_url=env["DATABASE_URL"])))
        # Only this process holds the write end (os.pipe makes both ends non-inheritable, and
        # pass_fds hands the workers the read end alone): when it closes, this process is gone.
        read_end, write_end = os.pipe()
        try:
            try:
                for index in range(settings.workers):
                    if stopping:
                        break
                    command = [sys.executable, "-m", "service", "serve", *argv, SUPERVISOR_PIPE_FLAG, str(read_end)]
                    children.append(
                        subprocess.Popen(command, env=_worker_environment(env, settings, index), pass_fds=(read_end,))  # noqa: S603 (our own module)
                    )
            finally:
                os.close(read_end)
            log.info("supervising %d workers: %s", len(children), ", ".join(str(c.pid) for c in children))
            while True:
                codes = [child.poll() for child in children]
                if all(code is not None for code in codes):
                    # A worker still importing when the signal came dies of it: it had no calls to drain.
                    clean = (0, -signal.SIGTERM, -signal.SIGINT)
                    return 0 if stopping and all(code in clean for code in codes) else 1
                if not stopping and any(code is not None for code in codes):
                    log.error("a worker exited (codes %s); stopping the others", codes)
                    stop(signal.SIGTERM, None)
                    stopping = False  # an unplanned stop: exit 1 once they are down
                    for child in children:
                        child.wait()
                    return 1
                time.sleep(0.2)
        finally:
            # Workers still running (this process is leaving on an error) see end of file and stop.
            os.close(write_end)
    finally:
        if embedded is not None:
            embedded.stop()


def _worker_environment(env: dict[str, str], settings: Settings, index: int) -> dict[str, str]:
    """What worker ``index`` (from 0) is started with: ``env``, and with Prometheus its own metrics port.

    Each worker has its own meter provider and counts its own calls; one port
    cannot be served by several processes (a scrape would reach one worker at
    random), so worker N serves ``/metrics`` on ``OTEL_EXPORTER_PROMETHEUS_PORT``
    + N, and Prometheus scrapes each as a target of its own.
    """
    if settings.otel_metrics_exporter != Exporter.PROMETHEUS or settings.otel_sdk_disabled:
        return env
    return {**env, "OTEL_EXPORTER_PROMETHEUS_PORT": str(settings.otel_prometheus_port + index)}


def _metrics_addresses(settings: Settings) -> list[str]:
    """The ``host:port`` each worker serves ``/metrics`` on, none without Prometheus."""
    if settings.otel_metrics_exporter != Exporter.PROMETHEUS or settings.otel_sdk_disabled:
        return []
    host = settings.otel_prometheus_host
    host = f"[{host}]" if ":" in host else host
    return [f"{host}:{settings.otel_prometheus_port + index}" for index in range(settings.workers)]


def _check_ports(settings: Settings) -> None:
    """Refuse a port chosen by the kernel (workers must share one) and a port someone listens on already."""
    problems = []
    busy = []  # an operational failure (exit 1), not a bad value
    for variable, address in (
        ("APPTGATE_PARTNER_ADDR", settings.partner_addr),
        ("APPTGATE_INTERNAL_ADDR", settings.internal_addr),
    ):
        if split_address(address)[1] == 0:
            problems.append(f"{variable}: several workers need a fixed port, not 0")
        elif listened_on(address):
            busy.append(
                f"{variable}: {address} is in use by another process (a server, or the workers of an "
                "earlier supervisor); stop it first"
            )
    last = settings.otel_prometheus_port + settings.workers - 1
    if _metrics_addresses(settings) and last > 65535:
        problems.append(
            f"OTEL_EXPORTER_PROMETHEUS_PORT: worker N serves /metrics on this port + N, and {last} is no port"
        )
    elif metrics := [address for address in _metrics_addresses(settings) if listened_on(address)]:
        busy.append(
            f"OTEL_EXPORTER_PROMETHEUS_PORT: {', '.join(metrics)} in use by another process (worker N serves /metrics "
            f"on this port + N, here up to {last}); stop it or choose another port"
        )
    if problems:
        raise ConfigError(problems)
    if busy:
        raise BindError("; ".join(busy))


async def _check_database(settings: Settings) -> None:
    """Connect as a worker does and check the migrations; raises what a worker would fail with."""
    async with AsyncExitStack() as stack:
        database = await open_database(settings, stack)
        await database.ensure_migrated()


def follow_supervisor(pipe: int) -> None:
    """Make this worker stop as on SIGTERM (draining its calls) once its supervisor is gone.

    ``pipe`` is the read end of the supervisor's pipe (:data:`SUPERVISOR_PIPE_FLAG`).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); the pipe still stops it", ctypes.get_errno())
    # Watched only now, after prctl: a supervisor that died before prctl took effect has
    # closed its end already, so the watcher sees end of file at once and that race is closed.
    threading.Thread(target=_stop_at_end_of_file, args=(pipe,), name="supervisor-pipe", daemon=True).start()


def _stop_at_end_of_file(pipe: int) -> None:
    """Wait for end of file on ``pipe`` (the supervisor never writes), then send this process SIGTERM."""
    try:
        while os.read(pipe, 64):
            pass
    except OSError:
        pass  # a pipe that cannot be read tells of no supervisor either
    log.warning("the supervisor is gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)
