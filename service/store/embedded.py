"""An embedded PostgreSQL (the ``pgserver`` package) for machines without a database server.

Used by ``make run`` and ``make test`` when ``DATABASE_URL`` is unset. The
server listens on a Unix socket inside its data directory only, and stops when
the last process using it exits cleanly. A process killed (SIGKILL) leaves it
running, and pgserver counts that process as a user still, so no later exit
stops it: ``pg_ctl -D <data dir>/pgdata stop`` does.

What the server sees of this process. PostgreSQL runs programs for its
superuser (``COPY … FROM PROGRAM``) with its own environment, which pgserver
takes from the calling process: the service's secrets and database URLs would
be there. The server is therefore started (``initdb``, ``pg_ctl``) with only
the variables of :data:`KEPT_VARIABLES` and the locale's ``LC_*``: this
process's environment is replaced for the time pgserver runs, under a lock,
and restored. A server already running (started by an earlier process) is
joined as it is.

Directories it opens. Run as root, pgserver runs PostgreSQL as its own
unprivileged user (``pgserver``, created when missing), and would make every
directory above the data directory and above its programs readable and
searchable by everyone (``g+rx,o+rx``), a home directory included, and run
the server in root's groups. Instead: the server runs in its user's own
group (its programs started by :func:`service.store.accounts.as_account`,
which no gRPC thread of this process can crash); the directory that holds
the database (``APPTGATE_DATA_DIR``) gets the one bit that user needs to
cross it (``o+x``, or ``g+x``/``u+x`` when the directory is its group's or
its own); any other directory on the way that user cannot cross is refused
with a :class:`~service.errors.ConfigError` naming it, and nothing is
changed; and so is a data directory whose path is too long for a socket
inside it (pgserver would move the socket to a directory it makes writable
by everyone). Without root, pgserver changes no mode.

Where its logs go. The server writes its own log to ``<pgdata>/log``
(``pg_ctl -l``, as pgserver starts it); pgserver's Python log lines (every
``initdb`` and ``pg_ctl`` it runs, with their output) go to
``<data dir>/pgserver.log`` (mode 0600), not to the service's stderr, where
they would crowd a terminal. :func:`log_files` names both.

Only ``migrate`` and ``demo`` create a database (:meth:`EmbeddedPostgres.require`
is what the other commands ask first): see :func:`service.app.embedded_database`.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import ConfigError
from service.store.accounts import as_account

log = logging.getLogger(__name__)

#: The variables of this process the embedded PostgreSQL is started with (with every ``LC_*``):
#: where programs are, the locale and time zone it takes its defaults from, where temporary
#: files go, and the runtime directory pgserver keeps its lock in. Nothing secret.
KEPT_VARIABLES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_RUNTIME_DIR"})

#: Held while this process's environment is replaced (two servers starting at once would restore each other's).
_ENVIRONMENT_LOCK = threading.Lock()


def server_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environment`` the embedded PostgreSQL is started with."""
    return {name: value for name, value in environment.items() if name in KEPT_VARIABLES or name.startswith("LC_")}


@contextmanager
def _environment_for_the_server() -> Iterator[None]:
    """This process's environment reduced to :func:`server_environment` for the block, then restored.

    pgserver starts ``initdb`` and ``pg_ctl`` with the calling process's
    environment and takes no other. Other threads reading the environment
    meanwhile see the reduced one; the service starts the database before
    it starts anything that reads it.
    """
    with _ENVIRONMENT_LOCK:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(server_environment(saved))
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)


#: The user pgserver runs PostgreSQL as when started by root (PostgreSQL refuses to run as root).
SERVER_USER = "pgserver"

#: The file, beside the database's directory, that pgserver's own log lines go to.
PGSERVER_LOG = "pgserver.log"


class MissingDatabase(Exception):
    """There is no ``DATABASE_URL`` and no embedded database where one was looked for (an operational failure)."""


def log_files(pgdata: Path) -> tuple[Path, Path]:
    """Where the embedded PostgreSQL in ``pgdata`` logs: the server's own log, and pgserver's."""
    return pgdata / "log", pgdata.parent / PGSERVER_LOG


def _log_pgserver_to_file(path: Path) -> None:
    """Send the ``pgserver`` logger's lines to ``path`` (mode 0600, appended), and nowhere else."""
    logger = logging.getLogger("pgserver")
    for handler in logger.handlers:
        if getattr(handler, "baseFilename", None) == str(path.absolute()):
            return  # this process logs there already (a second server, a second start)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)  # created with its mode; the handler opens it by name
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _search_bit(info: os.stat_result, account: pwd.struct_passwd) -> int:
    """The mode bit that lets ``account`` (in its own group only) search a directory with ``info``."""
    if info.st_uid == account.pw_uid:
        return stat.S_IXUSR
    if info.st_gid == account.pw_gid:
        return stat.S_IXGRP
    return stat.S_IXOTH


def _refuse_closed_ancestors(path: Path, account: pwd.struct_passwd) -> None:
    """Raise :class:`ConfigError` naming the first directory above ``path`` that ``account`` cannot search."""
    for directory in path.parents:
        info = os.stat(directory)
        if not info.st_mode & _search_bit(info, account):
            raise ConfigError(
                [
                    f"the embedded PostgreSQL runs as the user {account.pw_name} (the service runs as root), and "
                    f"{directory} keeps it from {path}: set DATABASE_URL, run the service as another user, or open "
                    f"that directory yourself (chmod o+x {directory}) if it holds nothing private"
                ]
            )


def _as_its_account(name: str, command: Callable[..., str], account: pwd.struct_passwd) -> Callable[..., str]:
    """pgserver's ``initdb`` or ``pg_ctl`` (``name``), run as ``account`` in its own group alone.

    pgserver would run it with :mod:`subprocess`'s ``user`` in root's groups, from
    a ``fork()`` that gRPC's threads can crash (see :mod:`service.store.accounts`).
    Its output goes to pgserver's log, as pgserver's own runs do.
    """
    from pgserver._commands import POSTGRES_BIN_PATH

    pgserver_log = logging.getLogger("pgserver")

    def run(args: list[str], pgdata: Path | None = None, **kwargs: Any) -> str:
        if kwargs.pop("user", None) is None:
            return command(args, pgdata=pgdata, **kwargs)
        data = ["-D", str(pgdata)] if pgdata is not None else []
        line = as_account(account, [POSTGRES_BIN_PATH / name, *data, *args])
        # Files rather than pipes, as pgserver does: the server pg_ctl starts would hold pipes open.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            done = subprocess.run(line, check=False, stdout=out, stderr=err, text=True, **kwargs)  # noqa: S603 (our programs)
            out.seek(0)
            err.seek(0)
            output, error = out.read(), err.read()
        level = logging.ERROR if done.returncode else logging.INFO
        pgserver_log.log(level, "%s %s as %s: exit %d\nstdout:\n%s\nstderr:\n%s", name, args, account.pw_name,
                         done.returncode, output, error)  # fmt: skip
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, line, output, error)
        return output

    return run


def _prepare_as_root(data: Path, programs: Path) -> None:
    """Let PostgreSQL's own user reach its data and programs, opening nothing else (see the module docstring).

    Raises :class:`ConfigError` when that would take opening a directory the
    service does not own for this purpose.
    """
    import pgserver.postgres_server
    import pgserver.utils

    pgserver.utils.ensure_user_exists(SERVER_USER)  # as pgserver would: created when missing
    account = pwd.getpwnam(SERVER_USER)
    _refuse_closed_ancestors(programs, account)
    _refuse_closed_ancestors(data.parent, account)
    if not pgserver.utils.socket_name_length_ok(data / ".s.PGSQL.5432"):
        # pgserver would put the socket in a directory it makes writable by everyone.
        raise ConfigError([f"APPTGATE_DATA_DIR: {data} is too long a path for the embedded PostgreSQL's socket"])
    holder = data.parent
    info = holder.stat()
    holder.chmod(stat.S_IMODE(info.st_mode) | _search_bit(info, account))
    module: Any = pgserver.postgres_server
    if not getattr(module, "_apptgate_prepared", False):
        # Where pgserver would widen directories, it now finds them open enough or refuses;
        # the database runs as its own user in that user's group instead of root's.
        module.ensure_prefix_permissions = lambda path: _refuse_closed_ancestors(path, account)
        module.initdb = _as_its_account("initdb", module.initdb, account)
        module.pg_ctl = _as_its_account("pg_ctl", module.pg_ctl, account)
        module._apptgate_prepared = True


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, started on :meth:`start` and stopped on :meth:`stop`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: object | None = None

    def exists(self) -> bool:
        """True when ``data_dir`` holds a database (initialised: it has its ``PG_VERSION``)."""
        return (self.data_dir / "PG_VERSION").is_file()

    def require(self) -> None:
        """Raise :class:`MissingDatabase` unless :meth:`exists`, saying where it looked and what to do."""
        if not self.exists():
            raise MissingDatabase(
                f"no database: DATABASE_URL is unset and there is no embedded database in {self.data_dir.absolute()}; "
                "set DATABASE_URL (or APPTGATE_DATA_DIR to the data directory `make run` used), or create one "
                "there with `apptgate migrate`"
            )

    def start(self) -> str:
        """Start (or attach to) the server and return an asyncpg-compatible DSN for ``postgres``.

        Raises :class:`ConfigError` when, run as root, PostgreSQL's own user
        could not reach its files without opening a directory to everyone.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if "XDG_RUNTIME_DIR" not in os.environ:
            # platformdirs (imported by pgserver, which keeps its lock there) warns without a runtime
            # directory, and with one whose mode is not exactly 0700: this one is the service's own. Absolute,
            # since the XDG rules have a relative one ignored (`make run`'s data directory is relative).
            runtime = (self.data_dir.parent / "pgserver-run").absolute()
            runtime.mkdir(mode=0o700, exist_ok=True)
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        import pgserver  # imported lazily: only needed without DATABASE_URL
        from pgserver._commands import POSTGRES_BIN_PATH

        _log_pgserver_to_file(log_files(self.data_dir)[1])
        if os.name == "posix" and os.geteuid() == 0:
            _prepare_as_root(self.data_dir.resolve(), POSTGRES_BIN_PATH)
        with _environment_for_the_server():
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
