"""Group commit: the records of concurrent calls written by one statement and one commit.

A partner call may send its response only once its record is durable;
committing each record alone made every call pay a WAL flush and hold its
partner's counter lock until then. A :class:`GroupWriter` writes the requests
of the calls waiting at the same moment in one statement instead, through a
:class:`RecordKind` that knows the statement (:mod:`service.disclosure.record`
has two: basic views and contact views). How groups form:

* a call that finds a writer free is written at once, alone: no timer, no
  added latency when the gateway is quiet;
* calls that arrive while ``writers`` groups are in flight wait for the next
  group, which takes all of them (up to ``max_group``): the busier the
  gateway, the larger the groups and the fewer the commits;
* before a group is written, the calls already underway (announced with
  :meth:`GroupWriter.expect` before their read) get up to ``gather`` seconds
  to join it: such a call will ask for its record a moment later, and in the
  same group it shares the statement and the commit. With no call underway
  nothing waits;
* then, while the listener serves more calls than the group holds (some may
  still come to be recorded) and records keep arriving, each within
  ``hold_gap`` of the last, the group waits for them, ``hold`` seconds at
  most. Under load the process is busy with those other calls meanwhile, so
  the wait costs no throughput and the groups grow several times larger (one
  statement and one commit on the primary for many calls); a call alone, or
  one whose fellows are all waiting already, is written at once;
* a writer keeps its connection for ``linger`` seconds after a group, for
  the next one;
* over a daily cap the statement records nothing; the group is written again
  without that partner, whose calls are then written one by one, so a cap
  stops exactly where it would have without grouping;
* answers read on a replica that the primary does not authorise are refused
  by the statement, which then records nothing; their calls are told so
  (they read again on the primary) and the group is written again without them;
* a failure of the statement (database unreachable, too slow) is every
  waiting call's failure, as its own statement's would have been;
* a partner flagged by its charge is reported by one call of the group only.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from uuid import UUID

from service import models
from service.inflight import CallsInFlight
from service.store import ledger
from service.store.database import Connection, Database, StatementSeries

Request = TypeVar("Request")
Answer = TypeVar("Answer")


@dataclass(frozen=True, slots=True)
class Grouping:
    """How groups form (see the module docstring)."""

    #: Groups of one kind in flight at once: with one, calls arriving meanwhile wait for the
    #: next group, so groups grow with the load and PostgreSQL does fewer commits.
    writers: int = 1
    #: Calls in one group at most, which bounds a statement's size.
    max_group: int = 64
    #: Seconds a writer with nothing to write keeps its connection for the next call.
    linger: float = 0.05
    #: Seconds a group waits, at most, for the calls underway when it formed.
    gather: float = 0.005
    #: Seconds a group waits, at most, for more records while calls that may bring them are in flight.
    hold: float = 0.01
    #: Seconds without a new record after which a holding group is written.
    hold_gap: float = 0.002


class RecordKind(abc.ABC, Generic[Request, Answer]):
    """One kind of record: the statement that writes a group of its requests, and what its answers say."""

    @abc.abstractmethod
    async def write(
        self, conn: Connection, requests: list[Request], terms: Mapping[UUID, models.ChargeTerms]
    ) -> list[Answer]:
        """Write ``requests`` in one statement; one answer per request, in order.

        Raises :class:`ledger.CapReached` or :class:`ledger.ReplicaAnswersRefused`, and then nothing was written.
        """

    @abc.abstractmethod
    def capped(self, cap: models.ChargeOutcome) -> Answer:
        """The answer of a call refused over ``cap``."""

    @abc.abstractmethod
    def refused(self) -> Answer:
        """The answer of a call whose answer, read on a replica, the primary did not authorise."""

    @abc.abstractmethod
    def outcome(self, answer: Answer) -> models.ChargeOutcome | None:
        """The charge outcome an answer carries (``None``: the call was not charged)."""

    @abc.abstractmethod
    def unflagged(self, answer: Answer) -> Answer:
        """``answer`` with a ``FLAGGED`` outcome turned ``OK`` (another call of its group reports the anomaly)."""


@dataclass(slots=True)
class _Pending(Generic[Request, Answer]):
    partner_id: UUID
    request: Request
    terms: models.ChargeTerms
    answer: asyncio.Future[Answer]


class Expected:
    """A call underway that will ask for one record soon, or fail first (a context manager).

    Leaving the block without submitting (an error, a refusal, a cancellation)
    tells the group not to wait for this call any longer.
    """

    __slots__ = ("_pending", "_writer")

    def __init__(self, writer: GroupWriter[Any, Any]) -> None:
        self._writer = writer
        self._pending = False

    def __enter__(self) -> Expected:
        self._pending = True
        self._writer.underway += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.arrived()

    def arrived(self) -> None:
        """Count this call as no longer underway (once)."""
        if self._pending:
            self._pending = False
            self._writer.resolved()


class GroupWriter(Generic[Request, Answer]):
    """Writes the requests of one :class:`RecordKind`, many calls per statement."""

    def __init__(
        self,
        database: Database,
        budget: float,
        kind: RecordKind[Request, Answer],
        grouping: Grouping,
        in_flight: CallsInFlight | None = None,
    ) -> None:
        self._db = database
        self._budget = budget
        self._kind = kind
        self._grouping = grouping
        self._in_flight = in_flight  # None: no hold (nothing tells whether other calls are coming)
        self._arrival: asyncio.Future[None] | None = None  # a holding writer's wake-up at the next request
        self._queue: list[_Pending[Request, Answer]] = []
        self._writers = 0  # running or waiting for work (counted as they start and end, not by their tasks)
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: list[asyncio.Future[None]] = []  # one per writer waiting for work
        self.underway = 0  # calls Expected that have neither submitted nor given up
        self._settled = 0  # calls Expected that have, ever
        # The gathering writer's goal (a count of settled calls) and wake-up. One slot: with more
        # than one writer, a second gatherer would take it and the first would wait out its gather.
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
            if (self._settled >= goal or len(self._queue) >= self._grouping.max_group) and not wake.done():
                wake.set_result(None)

    async def submit(
        self, partner_id: UUID, request: Request, terms: models.ChargeTerms, expected: Expected | None = None
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
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)
        if self._waiting:
            waiting = self._waiting.pop()
            if not waiting.done():
                waiting.set_result(None)
        elif self._writers < self._grouping.writers:
            self._writers += 1
            # A fresh context: the group's statement belongs to no one call (its deadline, its span).
            writer = asyncio.create_task(self._drain(), name="apptgate-ledger-writer", context=contextvars.Context())
            self._tasks.add(writer)
            writer.add_done_callback(self._tasks.discard)
        # A caller that goes away cancels its answer, not its request: the writer still
        # writes the request with its group and leaves the answer alone (see _settle).
        return await answer

    async def _next_group(self) -> list[_Pending[Request, Answer]]:
        """The next group, once the calls underway have joined it (:meth:`_gather`, :meth:`_hold`)."""
        await self._gather()
        await self._hold()
        size = self._grouping.max_group
        group, self._queue = self._queue[:size], self._queue[size:]
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
        """Wait up to ``gather`` for the calls underway now to submit or give up, unless the group is full."""
        if not self.underway or len(self._queue) >= self._grouping.max_group:
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gathered = (self._settled + self.underway, wake)
        try:
            await _woken(wake, self._grouping.gather)
        finally:
            self._gathered = None

    async def _hold(self) -> None:
        """Wait while other calls in flight may bring records and they keep coming (see the module docstring)."""
        in_flight, grouping = self._in_flight, self._grouping
        if in_flight is None or grouping.hold <= 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + grouping.hold
        while len(self._queue) < min(grouping.max_group, in_flight.count):
            left = min(until - loop.time(), grouping.hold_gap)
            if left <= 0:
                return
            self._arrival = loop.create_future()
            try:
                if not await _woken(self._arrival, left):
                    return
            finally:
                self._arrival = None

    async def _more(self, series: StatementSeries) -> bool:
        """Wait up to ``linger`` for another call, keeping the connection; True when there is work."""
        series.pause()
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(wake)
        try:
            await _woken(wake, self._grouping.linger)
        finally:
            if wake in self._waiting:
                self._waiting.remove(wake)
        return bool(self._queue)

    async def _write(self, series: StatementSeries, group: list[_Pending[Request, Answer]]) -> None:
        """Write ``group`` in one statement; on a cap, write the rest again and the capped partner's calls alone."""
        terms = {p.partner_id: p.terms for p in group}
        try:
            answers = await self._kind.write(series.next(), [p.request for p in group], terms)
        except ledger.ReplicaAnswersRefused as refused:
            for position in refused.positions:
                _settle(group[position], self._kind.refused())
            rest = [p for n, p in enumerate(group) if n not in refused.positions]
            if rest:
                await self._write(series, rest)
            return
        except ledger.CapReached as over:
            capped = [p for p in group if p.partner_id == over.partner_id]
            if len(capped) == 1:
                _settle(capped[0], self._kind.capped(over.cap))
            else:
                for pending in capped:
                    await self._write(series, [pending])
            rest = [p for p in group if p.partner_id != over.partner_id]
            if rest:
                await self._write(series, rest)
            return
        reported: set[UUID] = set()
        for pending, answer in zip(group, answers, strict=True):
            if self._kind.outcome(answer) is models.ChargeOutcome.FLAGGED:
                if pending.partner_id in reported:
                    answer = self._kind.unflagged(answer)
                reported.add(pending.partner_id)
            _settle(pending, answer)


async def _woken(wake: asyncio.Future[None], seconds: float) -> bool:
    """Wait for ``wake`` to be set, or ``seconds`` to pass; True when it was set."""
    try:
        async with asyncio.timeout(seconds):
            await wake
    except TimeoutError:
        return False
    return True


def _settle(pending: _Pending[Request, Answer], answer: Answer) -> None:
    if not pending.answer.done():
        pending.answer.set_result(answer)
