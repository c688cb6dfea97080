"""Named appointment reads grouped in one statement (service.disclosure.named_reads), on a real database.

What the API tests cannot pin down: which reads share a statement, and that a
group holding a refused key still answers everyone else. The statements are
counted by the pool's query observer, which sees every statement sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import harness
import pytest

from service import models
from service.access import credentials
from service.disclosure.named_reads import NamedReads, on_primary, on_replicas
from service.errors import DeadlineExceeded
from service.store import partner_path
from service.store.database import Database, partner_login_dsn
from service.store.replicas import Replicas


@pytest.fixture
async def observed(database_dsn: str) -> AsyncIterator[tuple[Database, list[str]]]:
    """Pools on the test's database, logged in as the partner role, and every statement they send."""
    statements: list[str] = []
    db = await Database.connect(
        database_dsn,
        min_size=1,
        max_size=4,
        partner_dsn=partner_login_dsn(database_dsn),
        require_partner_login=True,
        on_query=lambda statement, _seconds, _error: statements.append(statement),
    )
    try:
        yield db, statements
    finally:
        await db.close()


def _principal(partner: harness.PartnerHandle) -> models.Principal:
    return models.Principal(
        UUID(partner.partner_id), partner.key_id, credentials.credential(credentials.hash_secret(partner.secret), None)
    )


def _grouped(statements: list[str]) -> int:
    return sum("WITH ORDINALITY" in s and "partner_get_appointment" in s for s in statements)


async def test_concurrent_reads_share_one_statement_and_each_sees_only_what_its_grants_show(
    world: harness.World, observed: tuple[Database, list[str]]
) -> None:
    db, statements = observed
    seen, unseen = await world.practitioner("Dr. Groupread Seen"), await world.practitioner("Dr. Groupread Unseen")
    patient = await world.patient(given_name="Groupreadgiven")
    shown = [await world.appointment(seen, patient.patient_id) for _ in range(6)]
    hidden = await world.appointment(unseen, patient.patient_id)
    first, second = await world.partner("Groupread One", seen), await world.partner("Groupread Two", seen, unseen)
    reads = NamedReads(on_primary(db), budget=10.0)
    requests = [(_principal(first), UUID(a.appointment_id)) for a in shown]
    requests += [(_principal(first), UUID(hidden.appointment_id)), (_principal(second), UUID(hidden.appointment_id))]

    answers = await asyncio.gather(*(reads.read(principal, appointment) for principal, appointment in requests))

    assert [a.id if a else None for a in answers] == [UUID(a.appointment_id) for a in shown] + [
        None,  # not granted to the first partner: exactly like nonexistent
        UUID(hidden.appointment_id),
    ]
    assert _grouped(statements) == 1  # the eight reads, all asked before the first was sent, in one statement


async def test_a_refused_key_in_a_group_is_refused_alone(
    world: harness.World, observed: tuple[Database, list[str]]
) -> None:
    db, statements = observed
    practitioner = await world.practitioner("Dr. Groupread Refusal")
    patient = await world.patient(given_name="Grouprefusedgiven")
    appointment = UUID((await world.appointment(practitioner, patient.patient_id)).appointment_id)
    live, revoked = await world.partner("Groupread Live", practitioner), await world.partner("Groupread Revoked")
    await world.grant(revoked.partner_id, practitioner)
    await world.revoke_key(revoked.key_id)
    reads = NamedReads(on_primary(db), budget=10.0)

    answers = await asyncio.gather(
        reads.read(_principal(live), appointment),
        reads.read(_principal(revoked), appointment),
        reads.read(_principal(live), appointment),
        return_exceptions=True,
    )

    assert [a.id for a in answers if isinstance(a, models.BasicAppointment)] == [appointment, appointment]
    assert isinstance(answers[1], partner_path.ReadRefused)
    assert answers[1].refusal is partner_path.Refusal.KEY_INVALID
    assert _grouped(statements) == 1  # the group was refused, then its reads were sent one by one
    assert sum(s == partner_path.GET_SQL for s in statements) == 3


async def test_reads_a_replica_cannot_answer_whole_are_left_to_the_primary(
    world: harness.World, database_dsn: str
) -> None:
    practitioner = await world.practitioner("Dr. Groupread Standby")
    patient = await world.patient(given_name="Groupstandbygiven")
    appointment = UUID((await world.appointment(practitioner, patient.patient_id)).appointment_id)
    partner = await world.partner("Groupread Standby", practitioner)
    # The primary itself as the "replica": measured, it is no standby, so it serves no reads.
    replicas = Replicas((partner_login_dsn(database_dsn),), max_lag=5.0)
    try:
        [state] = await replicas.measure_all()
        assert not state.usable and state.problem == "not a standby (not in recovery)"
        reads = NamedReads(on_replicas(replicas), budget=10.0)

        answers = await asyncio.gather(*(reads.read(_principal(partner), appointment) for _ in range(3)))
    finally:
        await replicas.close()

    assert answers == [None, None, None]  # each call then reads on the primary, which decides


async def test_a_group_stuck_in_the_database_ends_at_its_budget_and_the_next_one_reads(
    world: harness.World, observed: tuple[Database, list[str]], database_dsn: str
) -> None:
    db, _ = observed
    practitioner = await world.practitioner("Dr. Groupread Stuck")
    patient = await world.patient(given_name="Groupstuckgiven")
    appointment = UUID((await world.appointment(practitioner, patient.patient_id)).appointment_id)
    partner = await world.partner("Groupread Stuck", practitioner)
    reads = NamedReads(on_primary(db), budget=0.5)
    locker = await asyncpg.connect(database_dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE appointments IN ACCESS EXCLUSIVE MODE")  # every read now waits
            # Well before the pool's own statement timeout (10 s), which would end them too.
            async with asyncio.timeout(5):
                stuck = await asyncio.gather(
                    *(reads.read(_principal(partner), appointment) for _ in range(2)), return_exceptions=True
                )
    finally:
        await locker.close()

    assert [type(error) for error in stuck] == [DeadlineExceeded, DeadlineExceeded]
    found = await reads.read(_principal(partner), appointment)  # its connection came back, the lock is gone
    assert found is not None and found.id == appointment
