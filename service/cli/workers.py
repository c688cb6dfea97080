"""Serving on every core: a supervisor that runs N worker processes sharing the listening ports.

``python -m service serve`` with ``APPTGATE_WORKERS`` > 1 (default: the number
of CPUs) becomes a supervisor: it checks the configuration, starts the
embedded PostgreSQL when there is no ``DATABASE_URL``, creates the
development keys once, then starts the workers (each ``python -m service serve``
with one worker, ``SO_REUSEPORT`` on and its own connection pool) and the
kernel spreads connections across them. SIGTERM or SIGINT is passed on; each
worker drains its calls; the supervisor exits 0 when they all did. A worker
that dies takes the others down with it (exit code 1), so the process
manager above restarts a whole, consistent service.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from service.app import check_transport_security, load_secrets
from service.errors import ConfigError
from service.settings import Settings, child_environment, split_address
from service.store.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)


def supervise(settings: Settings, argv: list[str]) -> int:
    """Run ``settings.workers`` worker processes until a signal; return the exit code."""
    check_transport_security(settings)
    for variable, address in (
        ("APPTGATE_PARTNER_ADDR", settings.partner_addr),
        ("APPTGATE_INTERNAL_ADDR", settings.internal_addr),
    ):
        if split_address(address)[1] == 0:
            raise ConfigError([f"{variable}: several workers need a fixed port, not 0"])
    load_secrets(settings)  # creates the development keys once, before the workers race to
    env = child_environment({"APPTGATE_WORKERS": "1", "APPTGATE_REUSE_PORT": "true"})
    embedded = None
    if settings.database_url is None:
        if settings.production:
            raise ConfigError(["DATABASE_URL is required in production"])
        embedded = EmbeddedPostgres(settings.data_dir / "pgdata")
        env["DATABASE_URL"] = embedded.start()
    children = [
        subprocess.Popen([sys.executable, "-m", "service", "serve", *argv], env=env)  # noqa: S603 (our own module)
        for _ in range(settings.workers)
    ]
    log.info("supervising %d workers: %s", len(children), ", ".join(str(c.pid) for c in children))
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
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
        if embedded is not None:
            embedded.stop()
