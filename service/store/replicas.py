"""Streaming replicas for partners' basic reads (``APPTGATE_READ_REPLICA_URLS``), and how far each lags.

Each replica gets a pool logged in as the partner role, opened lazily, so
that a replica down at start or later only sends reads back to the primary.
:meth:`Replicas.measure_all` measures every replica's lag (the gateway calls it
once a second, :data:`WATCH_INTERVAL`); a replica
that does not answer, is not in recovery, logs in as another role or lags
more than ``APPTGATE_REPLICA_MAX_LAG`` serves nothing until it is back within
bounds. What a replica answers is never trusted alone: the partner path
authorises it again on the primary (:mod:`service.disclosure.reads`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg

from service import deadlines
from service.store import partner_path
from service.store.database import (
    PARTNER_ROLE,
    UNREACHABLE,
    Connection,
    QueryObserver,
    observed_connection_class,
    open_partner_pool,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
#: What a read on a replica may fail with and leave to the primary.
_FAILURES: tuple[type[BaseException], ...] = (*UNREACHABLE, asyncpg.PostgresError, partner_path.ReadRefused)

#: Seconds between two measures of each replica's lag.
WATCH_INTERVAL = 1.0
# The replay lag: 0 when everything received is replayed (an idle primary sends nothing), else
# the age of the last transaction replayed. NULL lag: not a standby.
_LAG = (
    "SELECT current_user::text, pg_is_in_recovery(), CASE "
    "WHEN NOT pg_is_in_recovery() THEN NULL "
    "WHEN pg_last_wal_receive_lsn() IS NULL OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 END"
)


@dataclass(slots=True)
class ReplicaState:
    """What the last measure of one replica found: ``lag`` in seconds, ``None`` when it could not be read."""

    index: int
    lag: float | None = None
    usable: bool = False
    problem: str = "not measured yet"


@dataclass(frozen=True, slots=True)
class Replicated(Generic[T]):
    """What a replica answered (``value`` may itself be ``None``: nothing found)."""

    value: T


class Replicas:
    """The replicas, their pools and their last measured lag."""

    def __init__(
        self,
        urls: tuple[str, ...],
        *,
        max_lag: float,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        on_query: QueryObserver | None = None,
    ) -> None:
        self._urls = urls
        self._connection_class = asyncpg.Connection if on_query is None else observed_connection_class(on_query)
        self._max_lag = max_lag
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._pools: list[asyncpg.Pool | None] = [None] * len(urls)
        self.states = [ReplicaState(n) for n in range(len(urls))]
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self._urls)

    async def measure_all(self) -> list[ReplicaState]:
        """Measure every replica now, together; return their states."""
        return list(await asyncio.gather(*(self.measure(n) for n in range(len(self._urls)))))

    async def measure(self, n: int) -> ReplicaState:
        """Measure replica ``n`` now; return its state."""
        state = self.states[n]
        was_usable = state.usable
        try:
            async with asyncio.timeout(WATCH_INTERVAL * 5):
                pool = await self._pool(n)
                user, recovering, lag = await pool.fetchrow(_LAG)
        except (*UNREACHABLE, asyncpg.PostgresError) as exc:
            state.lag, state.usable, state.problem = None, False, f"unreachable ({type(exc).__name__})"
        else:
            state.lag = lag
            if user != PARTNER_ROLE:
                state.usable, state.problem = False, f"logs in as another role than {PARTNER_ROLE}"
            elif not recovering:
                state.usable, state.problem = False, "not a standby (not in recovery)"
            elif lag > self._max_lag:
                state.usable, state.problem = False, f"lags more than {self._max_lag:g} s"
            else:
                state.usable, state.problem = True, ""
        if state.usable != was_usable:
            if state.usable:
                log.warning("read replica %d serves reads again", n)
            else:
                log.warning("read replica %d serves no reads: %s", n, state.problem)
        return state

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Connection | None]:
        """A connection to a replica within the lag bound (each in turn), or ``None`` when none is.

        The call's remaining deadline bounds the wait for the connection; a
        replica that cannot give one in time yields ``None`` too, and is
        measured again at once.
        """
        usable = [state.index for state in self.states if state.usable]
        if not usable:
            yield None
            return
        n = usable[next(self._turn) % len(usable)]
        pool = self._pools[n]
        assert pool is not None  # measured usable: its pool is open
        budget = deadlines.remaining()
        try:
            conn = await pool.acquire(timeout=self._connect_timeout if budget is None else max(budget / 2, 0.001))
        except UNREACHABLE:
            self.states[n].usable = False
            self.states[n].problem = "no connection"
            yield None
            return
        try:
            yield conn
        finally:
            await pool.release(conn)

    async def read(self, statement: Callable[[Connection], Awaitable[T]]) -> Replicated[T] | None:
        """Run ``statement`` on a replica within the lag bound; ``None`` when none is, or it failed there.

        A failure there (the replica gone, a query cancelled by a recovery
        conflict, a partner function's refusal on a copy that lags the
        primary's keys and grants) is not the caller's: it reads on the
        primary instead, which decides.
        """
        async with self.reader() as conn:
            if conn is None:
                return None
            try:
                return Replicated(await statement(conn))
            except _FAILURES:
                return None

    async def close(self) -> None:
        """Close every pool opened."""
        for pool in self._pools:
            if pool is not None:
                await pool.close()

    async def _pool(self, n: int) -> asyncpg.Pool:
        pool = self._pools[n]
        if pool is None:
            pool = self._pools[n] = await open_partner_pool(
                self._urls[n],
                min_size=0,  # opened lazily: a replica down at start only sends reads to the primary
                max_size=self._max_size,
                connect_timeout=self._connect_timeout,
                statement_timeout=self._statement_timeout,
                connection_class=self._connection_class,
            )
        return pool
