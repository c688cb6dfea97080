"""The appointment change feed (migration 0006): reads of the outbox, retention, and the notifications."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from uuid import UUID

import asyncpg

from service import models
from service.store.database import UNREACHABLE, Connection
from service.timestamps import to_micros

log = logging.getLogger(__name__)

CHANGES_CHANNEL = "apptgate_appointment_changes"
ACCESS_CHANNEL = "apptgate_access_changes"
#: Carries the partner id of a consent request event (migration 0008).
CONSENT_REQUESTS_CHANNEL = "apptgate_consent_requests"
#: Carries the position of the last privacy event a transaction wrote (migration 0009).
PRIVACY_CHANNEL = "apptgate_privacy_events"

_CHANGE_COLUMNS = (
    "c.position, c.change_type, c.appointment_id, c.patient_id, c.start_time, c.end_time, c.status::text, "
    "c.update_time, p.id, p.display_name, p.specialty"
)
_CHANGES = (
    f"SELECT {_CHANGE_COLUMNS} FROM appointment_changes c JOIN practitioners p ON p.id = c.practitioner_id "
    "WHERE c.position > $1 AND c.position <= $2 ORDER BY c.position LIMIT $3"
)
_CHANGES_OF = (
    f"SELECT {_CHANGE_COLUMNS} FROM appointment_changes c JOIN practitioners p ON p.id = c.practitioner_id "
    "WHERE c.position > $1 AND c.position <= $2 AND c.practitioner_id = ANY($4::uuid[]) ORDER BY c.position LIMIT $3"
)


def _change(row: asyncpg.Record) -> models.FeedChange:
    appointment = models.BasicAppointment(
        row[2], row[3], to_micros(row[4]), to_micros(row[5]), row[6], to_micros(row[7]), row[8], row[9], row[10]
    )
    return models.FeedChange(row[0], row[1], appointment)


async def head(conn: Connection) -> tuple[int, int]:
    """The last position written, and the last position deleted by retention."""
    row = await conn.fetchrow("SELECT position, pruned_through FROM change_feed_head")
    return int(row["position"]), int(row["pruned_through"])


async def changes(
    conn: Connection, *, after: int, upto: int, limit: int, practitioners: Sequence[UUID] | None = None
) -> list[models.FeedChange]:
    """Changes in ``(after, upto]``, in commit order, optionally only of some practitioners."""
    if practitioners is None:
        rows = await conn.fetch(_CHANGES, after, upto, limit)
    else:
        rows = await conn.fetch(_CHANGES_OF, after, upto, limit, list(practitioners))
    return [_change(row) for row in rows]


async def prune(conn: Connection, retention: timedelta) -> int:
    """Delete changes older than ``retention``; return how many. Resume tokens before them become OUT_OF_RANGE."""
    deleted = await conn.fetchval(
        "WITH gone AS (DELETE FROM appointment_changes WHERE commit_time < now() - $1::interval RETURNING position) "
        "UPDATE change_feed_head "
        "SET pruned_through = greatest(pruned_through, coalesce((SELECT max(position) FROM gone), 0)) "
        "RETURNING (SELECT count(*) FROM gone)",
        retention,
    )
    return int(deleted or 0)


Notification = tuple[str, str]  # (channel, payload)


class ChangeNotifications:
    """One dedicated connection LISTENing for the feed's, access, consent request and privacy notifications.

    It reconnects on failure.

    ``deliver`` receives every notification in commit order; after a reconnection
    it receives ``("reconnected", "")`` first, since notifications sent while
    disconnected are lost and the consumer must catch up from the database.
    """

    def __init__(self, dsn: str, deliver: Callable[[Notification], None]) -> None:
        self._dsn = dsn
        self._deliver = deliver
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        """Connect and listen; return once listening (raise when the first connection fails)."""
        self._task = asyncio.create_task(self._run(), name="apptgate-feed-listener")
        connected = asyncio.create_task(self._connected.wait())
        done, _ = await asyncio.wait([self._task, connected], return_when="FIRST_COMPLETED")
        connected.cancel()
        if self._task in done:
            self._task.result()

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        first = True
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
            except UNREACHABLE:
                if first and not self._connected.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())

                def forward(_conn: object, _pid: int, channel: str, payload: str) -> None:
                    self._deliver((channel, payload))

                await conn.add_listener(CHANGES_CHANNEL, forward)
                await conn.add_listener(ACCESS_CHANNEL, forward)
                await conn.add_listener(CONSENT_REQUESTS_CHANNEL, forward)
                await conn.add_listener(PRIVACY_CHANNEL, forward)
                if not first:
                    self._deliver(("reconnected", ""))
                first, delay = False, 0.1
                self._connected.set()
                while not lost.is_set():
                    try:
                        async with asyncio.timeout(5):  # not wait_for, which can lose a cancellation
                            await lost.wait()
                    except TimeoutError:
                        await conn.execute("SELECT 1")  # notices a silently dead connection
            except UNREACHABLE:
                log.warning("feed listener lost its database connection; reconnecting")
            finally:
                if not conn.is_closed():
                    await conn.close()
