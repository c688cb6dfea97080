"""Reads of named appointments: the concurrent calls' in one statement.

``GetAppointment``, ``GetAppointmentContact`` and ``RequestContactAccess``
each read the one appointment their caller named, as the partner role
(:func:`service.store.partner_path.get_appointment`). Under load those reads
arrive together, and one statement per read made each call pay a round trip,
a connection borrowed and returned, and PostgreSQL a statement of its own.
:class:`NamedReads` reads them as :mod:`service.disclosure.groups` writes
records: a read that finds no statement in flight is sent at once, alone;
reads arriving while one is in flight wait for it and go together in the
next (:func:`service.store.partner_path.get_appointments`), so the busier the
gateway, the larger the groups. Each caller is still verified by its own key
and sees only what its own grants show: the statement calls the same partner
function once per request.

Two places read: the primary (:func:`on_primary`), where a refused key fails
a group's statement and its reads are then sent one by one, so that only the
refused caller is refused; and the read replicas (:func:`on_replicas`), where
anything but an answer found (nothing found, a refusal, no replica within the
lag bound, a failure) answers ``None`` for the whole group: those calls read
again on the primary, which decides.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID

from service import deadlines, models
from service.store import partner_path
from service.store.database import Database
from service.store.replicas import Replicas

#: Reads in one statement at most, which bounds its size.
MAX_GROUP = 64

Request = tuple[models.Principal, UUID]
Answer = models.BasicAppointment | None | partner_path.ReadRefused
#: Reads a group's appointments, one answer per request, in order.
GroupRead = Callable[[Sequence[Request]], Awaitable[Sequence[Answer]]]


def on_primary(database: Database) -> GroupRead:
    """Reads on the primary's partner path; a refused key is refused alone."""

    async def read(requests: Sequence[Request]) -> Sequence[Answer]:
        async with database.partner_statements() as conn:
            try:
                return await partner_path.get_appointments(conn, requests)
            except partner_path.ReadRefused as refused:
                if len(requests) == 1:
                    return [refused]
            answers: list[Answer] = []
            for principal, appointment_id in requests:  # one caller is refused: find which, alone
                try:
                    answers.append(await partner_path.get_appointment(conn, principal, appointment_id))
                except partner_path.ReadRefused as refused:
                    answers.append(refused)
            return answers

    return read


def on_replicas(replicas: Replicas) -> GroupRead:
    """Reads on a replica within the lag bound; ``None`` for every request it cannot answer whole."""

    async def read(requests: Sequence[Request]) -> Sequence[Answer]:
        replicated = await replicas.read(lambda conn: partner_path.get_appointments(conn, requests))
        return [None] * len(requests) if replicated is None else replicated.value

    return read


class NamedReads:
    """Reads the appointments that calls name, as the partner role, many calls per statement."""

    def __init__(self, read: GroupRead, *, budget: float, max_group: int = MAX_GROUP) -> None:
        """``budget``: the seconds each group's statement may take, as a call of its own would have."""
        self._read = read
        self._budget = budget
        self._max_group = max_group
        self._queue: list[tuple[models.Principal, UUID, asyncio.Future[Answer]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def read(self, principal: models.Principal, appointment_id: UUID) -> models.BasicAppointment | None:
        """The appointment if it exists and the caller's partner may see it, else ``None``.

        Raises :class:`partner_path.ReadRefused` for a key refused or a partner
        suspended, and the database's failures as a statement of its own would.
        """
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((principal, appointment_id, answer))
        if self._reader is None:
            # A fresh context: the group's statement belongs to no one call (its deadline, its span).
            self._reader = asyncio.create_task(
                self._drain(), name="apptgate-named-reads", context=contextvars.Context()
            )
        found = await answer
        if isinstance(found, partner_path.ReadRefused):
            raise found
        return found

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
                try:
                    with deadlines.bounded(self._budget):  # a group outlives any one caller's deadline
                        answers = await self._read(
                            [(principal, appointment_id) for principal, appointment_id, _ in group]
                        )
                except Exception as exc:  # the database failed: every read of the group fails with it
                    for _, _, answer in group:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                except BaseException:
                    for _, _, answer in group:
                        answer.cancel()
                    raise
                for (_, _, answer), found in zip(group, answers, strict=True):
                    if not answer.done():  # a caller that went away left its answer cancelled
                        answer.set_result(found)
        finally:
            self._reader = None
