"""Group commit for the ledger: the records of concurrent calls share one statement and one commit.

A partner call may send its response only once its usage charge and ledger
record are durable. Committing each one alone made every call pay a WAL
flush and hold its partner's counter lock until then, and under load the
flushes and the lock queued (migrations 0017 and 0019 have the figures).
:class:`DisclosureRecorder` instead records the responses of the calls
waiting at the same moment in one statement: basic views
(``ListAppointments``, ``GetAppointment``) with ``record_partner_disclosures``,
contact views (``GetAppointmentContact``) with ``disclose_consented_contacts``,
which also checks each consent and returns the released fields sealed.

For each of the two kinds:

* a call that finds a writer free is written at once, alone: no timer, no
  added latency when the gateway is quiet;
* calls that arrive while :data:`WRITERS` groups are in flight wait for the
  next group, which takes all of them (up to :data:`MAX_GROUP`): the busier
  the gateway, the larger the groups and the fewer the commits;
* before a group is written, the calls already underway (announced with
  :meth:`DisclosureRecorder.expect_basic` or ``expect_contact`` before their
  read) get up to :data:`GATHER` to join it: a call whose read is in flight
  will ask for its record a moment later, and written in the same group it
  shares the statement, the charge and the commit instead of paying for the
  next ones. With no call underway nothing waits;
* over a daily cap the statement records nothing; the group is written again
  without that partner, whose calls are then written one by one, so a cap
  stops exactly where it would have without grouping;
* a failure of the statement (database unreachable, too slow) is every
  waiting call's failure, as its own statement's would have been;
* a partner flagged by its charge is reported by one call of the group only.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar
from uuid import UUID

from service import models
from service.store import consents, ledger, repeats, usage
from service.store.database import Connection, Database, StatementSeries

#: Groups of one kind written at the same time. One: calls that arrive while a group is written
#: wait for the next, so groups grow with the load. Against two (bench/run.py, c=16 and c=64): 1.70
#: records per transaction instead of 1.33-1.42 for GetAppointment, 7-15% less PostgreSQL CPU per
#: call, throughput the same or better (docs/performance.md).
WRITERS = 1
#: Calls in one group at most (a page of 50 is ~3.6 KB of record).
MAX_GROUP = 64
#: Seconds a writer with nothing to write keeps its connection for the next call.
LINGER = 0.05
#: Seconds a group waits, at most, for the calls underway when it formed (their reads in flight).
GATHER = 0.005

Items = Sequence[tuple[str, UUID | None, UUID | None]]
Request = TypeVar("Request")
Answer = TypeVar("Answer")


@dataclass(slots=True)
class _Pending(Generic[Request, Answer]):
    partner_id: UUID
    request: Request
    terms: usage.ChargeTerms
    answer: asyncio.Future[Answer]


class Expected:
    """A call underway that will ask for one record soon, or fail first (a context manager).

    Leaving the block without submitting (an error, a refusal, a cancellation)
    tells the group not to wait for this call any longer.
    """

    __slots__ = ("_groups", "_pending")

    def __init__(self, groups: _Groups[Any, Any]) -> None:
        self._groups = groups
        self._pending = False

    def __enter__(self) -> Expected:
        self._pending = True
        self._groups.underway += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.arrived()

    def arrived(self) -> None:
        """Count this call as no longer underway (once)."""
        if self._pending:
            self._pending = False
            self._groups.resolved()


class _Groups(Generic[Request, Answer]):
    """Writes the requests of one kind many calls per statement, through ``write``.

    ``write(conn, requests, terms)`` writes a group in one statement and
    returns one answer per request, in order, or raises
    :class:`ledger.CapReached`; ``capped(cap)`` is the answer of a call refused
    over ``cap``; ``outcome(answer)`` is an answer's charge outcome, and
    ``relabel(answer, outcome)`` the same answer with another one.

    A writer keeps its connection while calls keep coming: after a group it
    waits up to :data:`LINGER` for the next one, and a call that finds a
    writer waiting wakes it instead of starting another. Before each group it
    waits up to :data:`GATHER` for the calls :class:`Expected` when it began.
    """

    def __init__(
        self,
        database: Database,
        budget: float,
        write: Callable[[Connection, list[Request], dict[UUID, usage.ChargeTerms]], Awaitable[list[Answer]]],
        capped: Callable[[str], Answer],
        outcome: Callable[[Answer], str],
        relabel: Callable[[Answer, str], Answer],
    ) -> None:
        self._db = database
        self._budget = budget
        self._write_group = write
        self._capped = capped
        self._outcome = outcome
        self._relabel = relabel
        self._queue: list[_Pending[Request, Answer]] = []
        self._writers = 0  # running or waiting for work (counted as they start and end, not by their tasks)
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: list[asyncio.Future[None]] = []  # one per writer waiting for work
        self.underway = 0  # calls Expected that have neither submitted nor given up
        self._settled = 0  # calls Expected that have, ever
        # The gathering writer's goal (a count of settled calls) and wake-up. One slot: with more
        # than one writer, a second gatherer would take it and the first would wait out GATHER.
        self._gathered: tuple[int, asyncio.Future[None]] | None = None

    def expect(self) -> Expected:
        """Announce a call that will submit a request soon (see :class:`Expected`)."""
        return Expected(self)

    def resolved(self) -> None:
        """One :class:`Expected` call submitted or gave up; wake a gathering writer whose goal it meets."""
        self.underway -= 1
        self._settled += 1
        if self._gathered is not None:
            goal, wake = self._gathered
            if (self._settled >= goal or len(self._queue) >= MAX_GROUP) and not wake.done():
                wake.set_result(None)

    async def submit(
        self, partner_id: UUID, request: Request, terms: usage.ChargeTerms, expected: Expected | None = None
    ) -> Answer:
        """Write ``request`` with the group it joins; return its answer once durable.

        A caller that goes away (cancelled, out of time) leaves its request to
        be written with its group: the ledger may then hold a disclosure that
        was not sent, never the reverse.
        """
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(partner_id, request, terms, answer))
        if expected is not None:
            expected.arrived()
        if self._waiting:
            waiting = self._waiting.pop()
            if not waiting.done():
                waiting.set_result(None)
        elif self._writers < WRITERS:
            self._writers += 1
            # A fresh context: the group's statement belongs to no one call (its deadline, its span).
            writer = asyncio.create_task(self._drain(), name="apptgate-ledger-writer", context=contextvars.Context())
            self._tasks.add(writer)
            writer.add_done_callback(self._tasks.discard)
        # A caller that goes away cancels its answer, not its request: the writer still
        # writes the request with its group and leaves the answer alone (see _settle).
        return await answer

    async def _next_group(self) -> list[_Pending[Request, Answer]]:
        """The next group, once the calls underway have joined it (:meth:`_gather`)."""
        await self._gather()
        group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
        return group

    async def _drain(self) -> None:
        try:
            while self._queue:
                group = await self._next_group()
                try:
                    async with self._db.statement_series(self._budget) as series:
                        while group:
                            await self._write(series, group)
                            group = []
                            if self._queue or await self._more(series):
                                group = await self._next_group()
                except Exception as exc:  # the group in hand fails; the next borrows a connection again
                    for pending in group:
                        if not pending.answer.done():
                            pending.answer.set_exception(exc)
                except BaseException:
                    for pending in group:
                        pending.answer.cancel()
                    raise
        finally:
            self._writers -= 1

    async def _gather(self) -> None:
        """Wait up to :data:`GATHER` for the calls underway now to submit or give up, unless the group is full."""
        if not self.underway or len(self._queue) >= MAX_GROUP:
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gathered = (self._settled + self.underway, wake)
        try:
            await _woken(wake, GATHER)
        finally:
            self._gathered = None

    async def _more(self, series: StatementSeries) -> bool:
        """Wait up to :data:`LINGER` for another call, keeping the connection; True when there is work."""
        series.pause()
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(wake)
        try:
            await _woken(wake, LINGER)
        finally:
            if wake in self._waiting:
                self._waiting.remove(wake)
        return bool(self._queue)

    async def _write(self, series: StatementSeries, group: list[_Pending[Request, Answer]]) -> None:
        """Write ``group`` in one statement; on a cap, write the rest again and the capped partner's calls alone."""
        terms = {p.partner_id: p.terms for p in group}
        try:
            answers = await self._write_group(series.next(), [p.request for p in group], terms)
        except ledger.CapReached as over:
            capped = [p for p in group if p.partner_id == over.partner_id]
            if len(capped) == 1:
                _settle(capped[0], self._capped(over.cap))
            else:
                for pending in capped:
                    await self._write(series, [pending])
            rest = [p for p in group if p.partner_id != over.partner_id]
            if rest:
                await self._write(series, rest)
            return
        reported: set[UUID] = set()
        for pending, answer in zip(group, answers, strict=True):
            if self._outcome(answer) == "flagged":
                if pending.partner_id in reported:
                    answer = self._relabel(answer, "ok")
                reported.add(pending.partner_id)
            _settle(pending, answer)


class DisclosureRecorder:
    """Charges and records partner responses, many calls per statement: basic views and contact views apart."""

    def __init__(self, database: Database, *, budget: float) -> None:
        # Patients known counted today, by partner: each basic record charges only the others.
        self._counted = usage.CountedPatients()
        # Records of responses written in full, by their items: a response repeating one is recorded by reference.
        self._recorded = repeats.RecordedResponses()
        self._basic: _Groups[tuple[ledger.Entry, Items], str] = _Groups(
            database, budget, self._record_basic, capped=str, outcome=str, relabel=lambda _, outcome: outcome
        )
        self._contact: _Groups[consents.ContactRequest, models.StoredConsentedContact] = _Groups(
            database,
            budget,
            consents.disclose_many,
            capped=lambda cap: models.StoredConsentedContact(cap, (), None, None, None, None, None),
            outcome=lambda stored: stored.state,
            relabel=lambda stored, outcome: replace(stored, state=outcome),
        )

    def expect_basic(self) -> Expected:
        """Announce a basic-view call before its read, so that groups formed meanwhile wait for it."""
        return self._basic.expect()

    def expect_contact(self) -> Expected:
        """Announce a contact-view call before its read, so that groups formed meanwhile wait for it."""
        return self._contact.expect()

    async def _record_basic(
        self, conn: Connection, requests: list[tuple[ledger.Entry, Items]], terms: dict[UUID, usage.ChargeTerms]
    ) -> list[str]:
        outcomes = await ledger.record_many(conn, requests, terms, self._counted, self._recorded)
        return [outcomes[entry.partner_id] for entry, _ in requests]

    async def record(
        self, entry: ledger.Entry, items: Items, terms: usage.ChargeTerms, expected: Expected | None = None
    ) -> str:
        """Charge and record one basic-view response; return the charge's outcome once it is durable.

        The outcome is ``charge_partner_usage``'s: ``ok``; ``flagged`` (given to
        one call of the partner's group only, so the anomaly is reported once);
        ``suspended`` (nothing recorded: send nothing); ``contact_cap`` or
        ``patient_cap`` (nothing counted or recorded).
        """
        return await self._basic.submit(entry.partner_id, (entry, items), terms, expected)

    async def disclose_contact(
        self, request: consents.ContactRequest, terms: usage.ChargeTerms, expected: Expected | None = None
    ) -> models.StoredConsentedContact:
        """Check the consent, charge and record one contact view; return what it releases once durable.

        The answer is :func:`consents.disclose_many`'s for this request: a
        consent that is not live in ``state`` (nothing recorded), else the
        charge's outcome as for :meth:`record`, with the released fields sealed.
        """
        return await self._contact.submit(request.entry.partner_id, request, terms, expected)


async def _woken(wake: asyncio.Future[None], seconds: float) -> None:
    """Wait for ``wake`` to be set, or ``seconds`` to pass."""
    try:
        async with asyncio.timeout(seconds):
            await wake
    except TimeoutError:
        pass


def _settle(pending: _Pending[Request, Answer], answer: Answer) -> None:
    if not pending.answer.done():
        pending.answer.set_result(answer)
