"""Leases of partners' request tokens (``lease_request_tokens``): the request rate every process shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple
from uuid import UUID

from service.store.database import Connection, Database


class RequestLease(NamedTuple):
    """What the database granted: ``granted`` tokens, spendable for ``expire_in`` seconds.

    ``tenth`` names the lease when its unspent tokens are returned. When
    ``granted`` is 0, ``retry_in`` is the seconds until a token may be granted again.
    """

    granted: int
    tenth: int
    expire_in: float
    retry_in: float


class Unspent(NamedTuple):
    """Tokens a process returns: ``tokens`` left of its lease of ``tenth``."""

    tokens: int = 0
    tenth: int = 0


async def lease(
    conn: Connection, partner_id: UUID, rate: float, burst: int, want: int, unspent: Unspent
) -> RequestLease:
    """Lease up to ``want`` of the partner's request tokens under a bucket of ``rate`` per second and ``burst``.

    ``unspent`` goes back to the bucket and out of the window first.
    """
    row = await conn.fetchrow(
        "SELECT granted, tenth, expire_in, retry_in FROM lease_request_tokens($1, $2, $3, $4, $5, $6)",
        partner_id,
        rate,
        burst,
        want,
        unspent.tokens,
        unspent.tenth,
    )
    assert row is not None  # a function with OUT parameters returns one row
    return RequestLease(row[0], row[1], row[2], row[3])


def source(database: Database, budget: float) -> Callable[[UUID, float, int, int, Unspent], Awaitable[RequestLease]]:
    """Ask ``database`` for leases, each question bounded by ``budget`` seconds (no one caller's deadline)."""

    async def ask(partner_id: UUID, rate: float, burst: int, want: int, unspent: Unspent) -> RequestLease:
        async with database.statements(budget) as conn:
            return await lease(conn, partner_id, rate, burst, want, unspent)

    return ask
