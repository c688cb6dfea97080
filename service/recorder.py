"""Group commit for the ledger: the records of concurrent basic reads share one statement and one commit.

A basic read (``ListAppointments``, ``GetAppointment``) may send its response
only once its usage charge and ledger record are durable. Committing each one
alone made every call pay a WAL flush, and under load the flushes queued
(migration 0017 has the figures). :class:`DisclosureRecorder` instead records
the responses of the calls waiting at the same moment in one statement
(``record_partner_disclosures``):

* a call that finds a writer free is written at once, alone: no timer, no
  added latency when the gateway is quiet;
* calls that arrive while :data:`WRITERS` groups are in flight wait for the
  next group, which takes all of them (up to :data:`MAX_GROUP`): the busier
  the gateway, the larger the groups and the fewer the commits;
* over a daily cap the statement records nothing; the group is written again
  without that partner, whose calls are then written one by one, so a cap
  stops exactly where it would have without grouping;
* a failure of the statement (database unreachable, too slow) is every
  waiting call's failure, as its own statement's would have been.

Contact disclosures are not grouped: their one statement also checks the
consent and returns the sealed fields (``disclose_consented_contact``).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from service.store import ledger, usage
from service.store.database import Database

#: Groups written at the same time. Two keep the database busy while a group's commit is flushed.
WRITERS = 2
#: Responses in one group at most (a page of 50 is ~3.6 KB of record).
MAX_GROUP = 64

Items = Sequence[tuple[str, UUID | None, UUID | None]]


@dataclass(slots=True)
class _Pending:
    entry: ledger.Entry
    items: Items
    terms: usage.ChargeTerms
    outcome: asyncio.Future[str]


class DisclosureRecorder:
    """Charges and records basic-view responses, many calls per statement."""

    def __init__(self, database: Database, *, budget: float) -> None:
        self._db = database
        self._budget = budget
        self._queue: list[_Pending] = []
        self._writers: set[asyncio.Task[None]] = set()

    async def record(self, entry: ledger.Entry, items: Items, terms: usage.ChargeTerms) -> str:
        """Charge and record one response; return the charge's outcome once it is durable.

        The outcome is ``charge_partner_usage``'s: ``ok``; ``flagged`` (given to
        one call of the partner's group only, so the anomaly is reported once);
        ``suspended`` (nothing recorded: send nothing); ``contact_cap`` or
        ``patient_cap`` (nothing counted or recorded). A caller that goes away
        (cancelled, out of time) leaves its record to be written with its group:
        the ledger may then hold a disclosure that was not sent, never the reverse.
        """
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(entry, items, terms, outcome))
        if len(self._writers) < WRITERS:
            # A fresh context: the group's statement belongs to no one call (its deadline, its span).
            writer = asyncio.create_task(self._drain(), name="apptgate-ledger-writer", context=contextvars.Context())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            outcome.add_done_callback(_unclaimed)  # nobody will read its result or failure
            raise

    async def _drain(self) -> None:
        while self._queue:
            group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            try:
                await self._write(group)
            except Exception as exc:
                for pending in group:
                    if not pending.outcome.done():
                        pending.outcome.set_exception(exc)
            except BaseException:
                for pending in group:
                    pending.outcome.cancel()
                raise

    async def _write(self, group: list[_Pending]) -> None:
        """Write ``group`` in one statement; on a cap, write the rest again and the capped partner's calls alone."""
        terms = {p.entry.partner_id: p.terms for p in group}
        try:
            async with self._db.statements(self._budget) as conn:
                outcomes = await ledger.record_many(conn, [(p.entry, p.items) for p in group], terms)
        except ledger.CapReached as over:
            capped = [p for p in group if p.entry.partner_id == over.partner_id]
            if len(capped) == 1:
                _settle(capped[0], over.cap)
            else:
                for pending in capped:
                    await self._write([pending])
            rest = [p for p in group if p.entry.partner_id != over.partner_id]
            if rest:
                await self._write(rest)
            return
        for pending in group:
            outcome = outcomes[pending.entry.partner_id]
            if outcome == "flagged":
                outcomes[pending.entry.partner_id] = "ok"  # reported once, by this call
            _settle(pending, outcome)


def _unclaimed(outcome: asyncio.Future[str]) -> None:
    if not outcome.cancelled():
        outcome.exception()  # retrieved, so asyncio does not report it as lost


def _settle(pending: _Pending, outcome: str) -> None:
    if not pending.outcome.done():
        pending.outcome.set_result(outcome)
