"""Leases of partners' request tokens (``lease_request_tokens``): the request rate every process shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple
from uuid import UUID

from service.store.database import Connection, Database


class RequestLease(NamedTuple):
    """What the database granted: ``granted`` tokens, spendable for ``expire_in`` seconds.

    When ``granted`` is 0, ``retry_in`` is the seconds until a token may be granted again.
    """

    granted: int
    expire_in: float
    retry_in: float


async def lease(conn: Connection, partner_id: UUID, rate: float, burst: int, want: int) -> RequestLease:
    """Lease up to ``want`` of the partner's request tokens under a bucket of ``rate`` per second and ``burst``."""
    row = await conn.fetchrow("SELECT * FROM lease_request_tokens($1, $2, $3, $4)", partner_id, rate, burst, want)
    assert row is not None  # a function with OUT parameters returns one row
    return RequestLease(row["granted"], row["expire_in"], row["retry_in"])


def source(database: Database, budget: float) -> Callable[[UUID, float, int, int], Awaitable[RequestLease]]:
    """Ask ``database`` for leases, each question bounded by ``budget`` seconds (no one caller's deadline)."""

    async def ask(partner_id: UUID, rate: float, burst: int, want: int) -> RequestLease:
        async with database.statements(budget) as conn:
            return await lease(conn, partner_id, rate, burst, want)

    return ask
