"""An embedded PostgreSQL (the ``pgserver`` package) for machines without a database server.

Used by ``make run`` and ``make test`` when ``DATABASE_URL`` is unset. The
server listens on a Unix socket inside its data directory only, and stops when
the process that started it exits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, started on :meth:`start` and stopped on :meth:`stop`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: object | None = None

    def start(self) -> str:
        """Start (or attach to) the server and return an asyncpg-compatible DSN for ``postgres``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # platformdirs (imported by pgserver) warns without a runtime directory.
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir.parent))
        import pgserver  # imported lazily: only needed without DATABASE_URL

        server = pgserver.get_server(self.data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        self._server = server
        uri: str = server.get_uri()
        log.info("embedded PostgreSQL running", extra={"data_dir": str(self.data_dir)})
        return uri

    def stop(self) -> None:
        """Stop the server if this process started it."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]
