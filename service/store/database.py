"""The connection pool, transactions, and the translation of database failures.

Every unit of work runs in ``async with database.transaction() as conn``.
Connection-level failures (the server unreachable, restarting or refusing
connections) become :class:`~service.errors.Unavailable`, so the caller gets
UNAVAILABLE with a retry delay instead of INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeAlias

import asyncpg

from service import deadlines
from service.errors import DeadlineExceeded, Unavailable
from service.store import migrations

Connection: TypeAlias = asyncpg.Connection
QueryObserver: TypeAlias = Callable[[str, float, BaseException | None], None]

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


class NotMigratedError(Exception):
    """The database lacks migrations this code needs; run ``python -m service migrate``."""


class Database:
    """An asyncpg pool with transaction helpers. Create it with :meth:`connect`."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, statement_timeout: float = 10.0) -> None:
        self._pool = pool
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
    ) -> Database:
        """Open a pool to ``dsn``. Raises :class:`Unavailable` when the server cannot be reached.

        ``on_query(statement, seconds, exception)`` is called after every
        statement (for tracing); it never receives the statement's parameters.
        ``statement_timeout`` bounds transactions run outside any call deadline.
        """

        async def init(conn: Connection) -> None:
            if on_query is not None:
                conn.add_query_logger(lambda q: on_query(q.query, q.elapsed, q.exception))

        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                # Connections are reset on release; nothing set in a request outlives it.
                max_inactive_connection_lifetime=300.0,
                init=init,
            )
        except UNREACHABLE as exc:
            raise Unavailable("the database is unreachable") from exc
        return cls(pool, dsn, statement_timeout)

    async def close(self) -> None:
        """Close the pool, waiting for connections in use to be released."""
        await self._pool.close()

    @asynccontextmanager
    async def _acquire(self, budget: float | None = None) -> AsyncIterator[Connection]:
        self._waiting += 1
        try:
            conn = await self._pool.acquire(timeout=budget)
        except TimeoutError as exc:
            if budget is not None:
                raise DeadlineExceeded("the deadline passed while waiting for a database connection") from exc
            raise
        finally:
            self._waiting -= 1
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Borrow a connection outside a transaction (for migrations and checks)."""
        try:
            async with self._acquire(deadlines.remaining()) as conn:
                yield conn
        except UNREACHABLE as exc:
            raise Unavailable("the database is unreachable") from exc

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False, role: str | None = None) -> AsyncIterator[Connection]:
        """Run a unit of work in one transaction: committed on success, rolled back on any error.

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
        try:
            async with self._acquire(budget) as conn, conn.transaction(readonly=readonly):
                await conn.execute(prelude)
                yield conn
        except asyncpg.QueryCanceledError as exc:
            raise DeadlineExceeded("the database work did not finish before the deadline") from exc
        except UNREACHABLE as exc:
            raise Unavailable("the database is unreachable") from exc

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
            async with asyncio.timeout(within), self._acquire(within) as conn:
                await conn.fetchval("SELECT 1")
        except (*UNREACHABLE, DeadlineExceeded, asyncpg.PostgresError):
            return False
        return True

    def pool_usage(self) -> tuple[int, int, int]:
        """Connections in use, idle, and callers waiting for one."""
        size, idle = int(self._pool.get_size()), int(self._pool.get_idle_size())
        return size - idle, idle, self._waiting
