"""The connection pool, transactions, and the translation of database failures.

Every unit of work runs in ``async with database.transaction() as conn``.
Connection-level failures (the server unreachable, restarting or refusing
connections) become :class:`~service.errors.Unavailable`, so the caller gets
UNAVAILABLE with a retry delay instead of INTERNAL. At start,
:meth:`Database.connect` also turns a connection URL that cannot work (not a
URL, a bad port or ``sslmode``, a login or database the server refuses) into
a :class:`~service.errors.ConfigError` of one line that never quotes the URL
or its password.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from service import deadlines
from service.errors import ConfigError, DeadlineExceeded, InvalidArgument, Unavailable
from service.store import migrations

log = logging.getLogger(__name__)

Connection: TypeAlias = asyncpg.Connection
QueryObserver: TypeAlias = Callable[[str, float, BaseException | None], None]
T = TypeVar("T")

#: The role every partner-path transaction runs as (migration 0006): basic-view
#: columns only, no contact column, no visit reason, no UPDATE or DELETE on the ledger.
PARTNER_ROLE = "apptgate_partner"
_SET_ROLE = {PARTNER_ROLE: f"SET LOCAL ROLE {PARTNER_ROLE}; "}

#: Failures that mean "the database cannot be reached right now", by class.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
)


#: The ``sslmode`` values asyncpg accepts (libpq's).
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

#: How the settings name the two connection URLs in the errors of :meth:`Database.connect`.
_MAIN_LOGIN = "DATABASE_URL"
_PARTNER_LOGIN = "the partner login (APPTGATE_PARTNER_DATABASE_URL, else DATABASE_URL as apptgate_partner)"


def _url_problem(dsn: str) -> str | None:
    """What makes ``dsn`` unusable as a connection URL, in words that never quote it; None when nothing shows.

    Checked before asyncpg sees it: asyncpg reports these cases as an error
    that looks like an unreachable server, or as a bare ``ValueError``, and
    some of its messages quote parts of the URL.
    """
    scheme, separator, _ = dsn.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        return "is not a postgresql://user:password@host:port/database URL"
    parts = urlsplit(dsn)
    for host in parts.netloc.rpartition("@")[2].split(","):
        after_address = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, port = after_address.rpartition(":")
        if colon and port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return "has a port that is not a number from 1 to 65535"
    try:
        query = parse_qs(parts.query, strict_parsing=True) if parts.query else {}
    except ValueError:
        return "has a malformed query string (after ?)"
    sslmode = query.get("sslmode")
    if sslmode and sslmode[-1] not in _SSL_MODES:
        return "has an sslmode that is not one of " + ", ".join(_SSL_MODES)
    return None


def _has_password(dsn: str) -> bool:
    """True when ``dsn`` carries a password, in its user part or its query string."""
    parts = urlsplit(dsn)
    return parts.password is not None or "password" in parse_qs(parts.query)


def _unreachable(exc: BaseException) -> Unavailable:
    """The error of a first connection that found no server to talk to, with the reason in words."""
    if isinstance(exc, asyncio.TimeoutError):
        reason = "no answer in time"
    elif isinstance(exc, socket.gaierror):
        reason = "the host name does not resolve"
    elif isinstance(exc, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(exc, asyncpg.PostgresError):  # starting, shutting down, or out of connections
        reason = str(exc)
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = type(exc).__name__
    return Unavailable(f"the database is unreachable ({reason})")


def _start_failure(exc: Exception, login: str, dsn: str) -> Unavailable | ConfigError | None:
    """What a failed first connection to ``dsn`` becomes: :class:`Unavailable`, or a :class:`ConfigError` of ``login``.

    None for a failure of another kind (a defect, left as it is). The server's
    own messages (a refused password, a database that does not exist) name
    roles and databases, never a password; asyncpg's client-side ones may quote
    the URL, so they are shown only for a URL without one.
    """
    if isinstance(exc, asyncpg.ClientConfigurationError):
        detail = str(exc) if not _has_password(dsn) else "check its query parameters (sslrootcert, sslcert, …)"
        return ConfigError([f"{login}: asyncpg cannot use it: {detail}"])
    if isinstance(exc, UNREACHABLE):
        return _unreachable(exc)
    if isinstance(exc, asyncpg.PostgresError):
        return ConfigError([f"{login}: the server refused the connection: {exc}"])
    if isinstance(exc, ValueError | OverflowError):
        return ConfigError([f"{login}: asyncpg cannot use it ({type(exc).__name__})"])
    return None


def partner_login_dsn(dsn: str) -> str:
    """``dsn`` with the user replaced by the partner role and any password removed."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{PARTNER_ROLE}@{host}", parts.path, parts.query, parts.fragment))


#: At most this much of a call's deadline is kept for cancelling its statement (see partner_statements).
_CANCEL_MARGIN = 0.1


def _late(*, connected: bool) -> DeadlineExceeded:
    """The error of a block whose timer ran out, before or after it had its connection."""
    if connected:
        return DeadlineExceeded("the database work did not finish before the deadline")
    return DeadlineExceeded("the deadline passed while waiting for a database connection")


@asynccontextmanager
async def _translated_failures() -> AsyncIterator[None]:
    """Turn the database's failures of a unit of work into the service's errors."""
    try:
        yield
    except asyncpg.QueryCanceledError as exc:  # statement_timeout, from the call's deadline
        raise _late(connected=True) from exc
    except asyncpg.DataError as exc:
        # A value the database cannot hold (a NUL character, a number out of range) that
        # validation let through: still the caller's input, never INTERNAL. Fields are
        # validated one by one before this; this is the net under them.
        raise InvalidArgument.field("request", "a value cannot be stored", reason="INVALID_VALUE") from exc
    except UNREACHABLE as exc:
        raise Unavailable("the database is unreachable") from exc


async def _keep_session(conn: Connection) -> None:
    """A partner pool's reset on release: nothing to undo (see :func:`open_partner_pool`)."""


class _ObservedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection that reports each statement to the tracing observer: text, duration, failure.

    Never its arguments. Used by a traced gateway's pools instead of asyncpg's
    query logger, which for every statement (traced or not) entered a
    generator context manager, built a record holding the arguments and
    scheduled a loop callback. :func:`observed_connection_class` binds the
    observer; an untraced gateway's pools use asyncpg's own class.
    """

    __slots__ = ()
    _observe: QueryObserver

    async def _observed(self, query: str, statement: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await statement
        except BaseException as exc:
            self._observe(query, time.perf_counter() - started, exc)
            raise
        self._observe(query, time.perf_counter() - started, None)
        return result

    # asyncpg's signatures, timeouts included (hence ASYNC109).
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        return await self._observed(query, super().execute(query, *args, timeout=timeout))

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._observed(command, super().executemany(command, args, timeout=timeout))

    async def fetch(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        return await self._observed(query, super().fetch(query, *args, timeout=timeout, record_class=record_class))

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> Any:  # noqa: ASYNC109
        return await self._observed(query, super().fetchrow(query, *args, timeout=timeout, record_class=record_class))

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        return await self._observed(query, super().fetchval(query, *args, column=column, timeout=timeout))


def observed_connection_class(observe: QueryObserver) -> type[asyncpg.Connection]:
    """A connection class whose statements are reported to ``observe``."""
    return type("ObservedConnection", (_ObservedConnection,), {"__slots__": (), "_observe": staticmethod(observe)})


class _SessionReset:
    """The main pool's reset on release: asyncpg's, except after :meth:`Database.statements`.

    asyncpg resets every released connection with one more round trip
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``). Single
    statements run in their own transactions, as the group records of every
    basic read are, leave no session state to undo; they paid that round trip
    for nothing, once per group (once per call when the gateway is quiet).
    Connections lent to such work are marked, by backend pid, and skip it once.
    """

    def __init__(self) -> None:
        self._unchanged: set[int] = set()

    def skip_next(self, conn: Connection) -> int:
        """Mark ``conn`` as changing no session state until its release; return the mark."""
        pid = int(conn.get_server_pid())
        self._unchanged.add(pid)
        return pid

    def forget(self, pid: int) -> None:
        """Drop a mark its release did not consume (the connection broke and was never reset)."""
        self._unchanged.discard(pid)

    async def __call__(self, conn: Connection) -> None:
        pid = conn.get_server_pid()
        if pid in self._unchanged:
            self._unchanged.discard(pid)
            return
        query = conn.get_reset_query()
        if query:
            await conn.execute(query)


@dataclass(slots=True)
class StatementSeries:
    """A connection lent by :meth:`Database.statement_series`, and the budget of its next statement."""

    conn: Connection
    _timer: asyncio.Timeout
    _budget: float

    def next(self) -> Connection:
        """The connection, with a full budget for the statement about to run."""
        self._timer.reschedule(asyncio.get_running_loop().time() + self._budget)
        return self.conn

    def pause(self) -> None:
        """No budget while the series waits for work (an idle wait is not a statement)."""
        self._timer.reschedule(None)


class NotMigratedError(Exception):
    """The database lacks migrations this code needs; run ``python -m service migrate``."""


#: Seconds an idle pooled connection is kept before it is closed.
_INACTIVE_LIFETIME = 300.0


async def open_partner_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    connect_timeout: float,
    statement_timeout: float,
    connection_class: type[asyncpg.Connection] = asyncpg.Connection,
) -> asyncpg.Pool:
    """A pool of sessions logged in as the partner role: the primary's partner path, or a read replica's."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        max_inactive_connection_lifetime=_INACTIVE_LIFETIME,
        connection_class=connection_class,
        # The partner role cannot change its session (it may only run its functions and
        # transaction-local settings), so the reset query's round trip is skipped; an open
        # transaction is still rolled back by asyncpg on release.
        reset=_keep_session,
        # The backstop for a statement run outside a call deadline; within a call, the
        # deadline cancels the statement from the client side.
        server_settings={"statement_timeout": str(int(statement_timeout * 1000))},
    )


class Database:
    """An asyncpg pool with transaction helpers. Create it with :meth:`connect`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        statement_timeout: float = 10.0,
        partner_pool: asyncpg.Pool | None = None,
        session_reset: _SessionReset | None = None,
    ) -> None:
        self._pool = pool
        self._partner_pool = partner_pool
        self._session_reset = session_reset
        self._waiting = 0
        self._statement_timeout = statement_timeout
        self.dsn = dsn

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        on_query: QueryObserver | None = None,
        partner_dsn: str | None = None,
        require_partner_login: bool = False,
    ) -> Database:
        """Open a pool to ``dsn``. Raises :class:`Unavailable` when the server cannot be reached.

        Raises :class:`ConfigError` (one problem, which never quotes the URL or a
        password) when ``dsn`` or ``partner_dsn`` cannot work: not a URL, a bad
        port or ``sslmode``, a login or a database the server refuses.

        With ``partner_dsn`` (a login as the ``apptgate_partner`` role), the
        partner path gets a pool of its own whose session cannot switch to a
        more privileged role; without it, partner transactions switch role on
        the main pool (``SET LOCAL ROLE``). A ``partner_dsn`` the server
        refuses to log in is an error when ``require_partner_login``, else a
        warning and the fallback.

        ``on_query(statement, seconds, exception)`` is called after every
        statement (for tracing); it never receives the statement's parameters.
        ``statement_timeout`` bounds transactions run outside any call deadline.
        """

        connection_class = asyncpg.Connection if on_query is None else observed_connection_class(on_query)
        session_reset = _SessionReset()

        async def open_pool(target: str, *, partner: bool = False) -> asyncpg.Pool:
            if partner:
                return await open_partner_pool(
                    target,
                    min_size=min_size,
                    max_size=max_size,
                    connect_timeout=connect_timeout,
                    statement_timeout=statement_timeout,
                    connection_class=connection_class,
                )
            return await asyncpg.create_pool(
                target,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                max_inactive_connection_lifetime=_INACTIVE_LIFETIME,
                connection_class=connection_class,
                # The main pool runs asyncpg's reset query on release, unless the
                # connection only ran single statements (_SessionReset).
                reset=session_reset,
            )

        for login, target in ((_MAIN_LOGIN, dsn), (_PARTNER_LOGIN, partner_dsn)):
            problem = _url_problem(target) if target else None
            if problem is not None:
                raise ConfigError([f"{login} {problem}"])
        try:
            pool = await open_pool(dsn)
        except Exception as exc:
            failure = _start_failure(exc, _MAIN_LOGIN, dsn)
            if failure is None:
                raise
            raise failure from exc
        partner_pool = None
        try:
            if partner_dsn:
                partner_pool = await open_pool(partner_dsn, partner=True)
        except Exception as exc:
            refused = isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError)
            if refused and not require_partner_login:
                log.warning(
                    "the partner path cannot log in as %s; it switches role on the main pool instead",
                    PARTNER_ROLE,
                )
            else:
                await pool.close()
                failure = _start_failure(exc, _PARTNER_LOGIN, partner_dsn or "")
                if failure is None:
                    raise
                raise failure from exc
        except BaseException:
            await pool.close()
            raise
        return cls(pool, dsn, statement_timeout, partner_pool, session_reset)

    async def close(self) -> None:
        """Close the pools, waiting for connections in use to be released."""
        await self._pool.close()
        if self._partner_pool is not None:
            await self._partner_pool.close()

    @property
    def partner_logins(self) -> bool:
        """True when the partner path has its own pool, logged in as the partner role."""
        return self._partner_pool is not None

    @asynccontextmanager
    async def _acquire(
        self, budget: float | None = None, *, partner: bool = False, timed: bool = False
    ) -> AsyncIterator[Connection]:
        """Borrow a connection, waiting up to ``budget`` seconds.

        ``timed``: an enclosing timer already bounds the block, so the wait gets
        no timeout of its own (asyncpg runs a timed acquire as a task of its own,
        one more per call).
        """
        pool = self._partner_pool if partner and self._partner_pool is not None else self._pool
        self._waiting += 1
        try:
            conn = await pool.acquire(timeout=None if timed else budget)
        except TimeoutError as exc:
            if budget is not None:
                raise _late(connected=False) from exc
            raise
        finally:
            self._waiting -= 1
        try:
            yield conn
        finally:
            await pool.release(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Borrow a connection outside a transaction (for migrations and checks)."""
        try:
            async with self._acquire(deadlines.remaining()) as conn:
                yield conn
        except UNREACHABLE as exc:
            raise Unavailable("the database is unreachable") from exc

    @asynccontextmanager
    async def partner_statements(self) -> AsyncIterator[Connection]:
        """Borrow a partner-path connection on which every statement is its own transaction.

        The partner path's reads and records are single statements (functions
        of migration 0007 that bind the partner for row-level security
        themselves), so they need no BEGIN, no prelude and no COMMIT: each is
        durable when it returns. The call's remaining deadline bounds the whole
        block; when it passes, the running statement is cancelled and
        :class:`DeadlineExceeded` raised. Without a partner login (the fallback
        of :meth:`connect`), the block runs in one transaction that switches
        role, which is stricter and slower.
        """
        if self._partner_pool is None:
            async with self.transaction(role=PARTNER_ROLE) as conn:
                yield conn
            return
        budget = deadlines.remaining()
        if budget is not None and budget <= 0:
            raise DeadlineExceeded("the deadline passed before the database was reached")
        # Give up a little before the caller does, so that the cancelled statement has
        # left the server (the pool's release waits for that) by the time the caller
        # reads DEADLINE_EXCEEDED.
        timer = asyncio.timeout(None if budget is None else budget - min(_CANCEL_MARGIN, budget / 5))
        connected = False
        try:
            async with timer, _translated_failures(), self._acquire(budget, partner=True, timed=True) as conn:
                connected = True
                yield conn
        except TimeoutError as exc:  # the timer's: connection timeouts became Unavailable inside
            raise _late(connected=connected) from exc

    @asynccontextmanager
    async def statements(self, budget: float) -> AsyncIterator[Connection]:
        """Borrow an owner-path connection on which every statement is its own transaction.

        For work the gateway does on behalf of several calls at once (the
        group records of :mod:`service.disclosure.record`), so no one caller's deadline
        applies: ``budget`` seconds bound the wait for a connection and the
        statements, after which the running statement is cancelled and
        :class:`DeadlineExceeded` raised. The block must leave no session
        state behind (no SET, LISTEN or session lock): the connection goes
        back to the pool without asyncpg's reset query.
        """
        async with self.statement_series(budget) as series:
            yield series.conn

    @asynccontextmanager
    async def statement_series(self, budget: float) -> AsyncIterator[StatementSeries]:
        """:meth:`statements` for a series of statements, each given ``budget`` seconds by :meth:`StatementSeries.next`.

        A writer that keeps its connection between groups pays for borrowing
        it once, not once per group.
        """
        mark = None
        timer = asyncio.timeout(budget)
        connected = False
        try:
            async with timer, _translated_failures(), self._acquire(budget, timed=True) as conn:
                connected = True
                if self._session_reset is not None:
                    mark = self._session_reset.skip_next(conn)
                yield StatementSeries(conn, timer, budget)
        except TimeoutError as exc:
            raise _late(connected=connected) from exc
        finally:
            if mark is not None and self._session_reset is not None:
                self._session_reset.forget(mark)

    @asynccontextmanager
    async def transaction(
        self, *, readonly: bool = False, snapshot: bool = False, role: str | None = None
    ) -> AsyncIterator[Connection]:
        """Run a unit of work in one transaction: committed on success, rolled back on any error.

        With ``snapshot``, every statement sees the database as the first one did (REPEATABLE READ),
        for work that reads in several statements what others keep writing.

        With ``role`` (only :data:`PARTNER_ROLE`), the transaction runs as that
        role; the switch is transaction-local, so it cannot outlive the unit of
        work on a pooled connection. The wait for a connection and every
        statement are bounded by the call's remaining deadline (or the default
        statement timeout); running out raises :class:`DeadlineExceeded`.
        """
        budget = deadlines.remaining()
        if budget is not None and budget <= 0:
            raise DeadlineExceeded("the deadline passed before the database was reached")
        timeout_ms = max(1, int((budget if budget is not None else self._statement_timeout) * 1000))
        # One round trip: an integer we computed, and a role from a fixed table; never caller input.
        prelude = (_SET_ROLE[role] if role is not None else "") + f"SET LOCAL statement_timeout = {timeout_ms}"
        async with (
            _translated_failures(),
            self._acquire(budget, partner=role is not None) as conn,
            conn.transaction(readonly=readonly, isolation="repeatable_read" if snapshot else "read_committed"),
        ):
            await conn.execute(prelude)
            yield conn

    async def ensure_migrated(self) -> None:
        """Raise :class:`NotMigratedError` unless every migration has been applied."""
        async with self.connection() as conn:
            missing = await migrations.pending(conn)
        if missing:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
            raise NotMigratedError(
                f"the database is not migrated (missing: {names}); run `python -m service migrate` first"
            )

    async def ping(self, within: float) -> bool:
        """True when the database answers a trivial query within ``within`` seconds."""
        try:
            async with asyncio.timeout(within), self._acquire(within, timed=True) as conn:
                await conn.fetchval("SELECT 1")
        except (*UNREACHABLE, DeadlineExceeded, asyncpg.PostgresError):
            return False
        return True

    def pool_usage(self) -> tuple[int, int, int]:
        """Connections in use, idle, and callers waiting for one."""
        pools = [p for p in (self._pool, self._partner_pool) if p is not None]
        size = sum(int(p.get_size()) for p in pools)
        idle = sum(int(p.get_idle_size()) for p in pools)
        return size - idle, idle, self._waiting
