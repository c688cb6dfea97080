"""Background sweeps: changes that time makes due (a request lapsing, a consent expiring), made once.

Every gateway process runs each sweep; a sweep's statement takes the due rows
``FOR UPDATE SKIP LOCKED``, so whichever process gets there first makes each
change, once. Between passes a sweep sleeps until the next change is due, by
the database's clock, or until its ``activity`` event is set (the feed hub sets
it on the notifications that can bring a new due time, and after a lost
connection), so an idle gateway runs no query for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from service.errors import ApptgateError
from service.store.database import Connection, Database

log = logging.getLogger(__name__)

#: Rows changed per statement; a full batch is followed at once by another.
BATCH = 500
#: The longest a sweep sleeps without being woken.
IDLE = 60.0

#: A sweep's statement: changes up to ``limit`` due rows, returns how many.
Sweep = Callable[..., Awaitable[int]]
#: Seconds until the next row falls due, ``None`` when none will.
NextDue = Callable[[Connection], Awaitable[float | None]]


async def run(database: Database, activity: asyncio.Event, sweep: Sweep, next_due: NextDue, *, what: str) -> None:
    """Make ``what`` due changes with ``sweep`` as they fall due, until cancelled."""
    while True:
        activity.clear()  # before reading: an event from here on wakes the wait below
        delay = 1.0
        try:
            async with database.transaction() as conn:
                changed = await sweep(conn, limit=BATCH)
                following = await next_due(conn)
            if changed:
                log.info("%s: %d", what, changed)
            if changed == BATCH:
                continue
            delay = IDLE if following is None else min(max(following, 0.0), IDLE)
        except ApptgateError:
            log.warning("%s skipped: the database is unavailable", what)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that comes
        # as the event is set, and the gateway's stop would wait for this task for ever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await activity.wait()
