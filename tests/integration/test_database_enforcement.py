"""PostgreSQL itself refuses what the partner path must never do, whatever SQL it is sent.

Each test runs deliberately wrong SQL as the partner-path role, the way a bug
in a query would, and shows the database returns nothing or refuses —
independent of the service's own checks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from harness import MONDAY, World

from service.store.database import PARTNER_ROLE, Database


@pytest.fixture
async def owner(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _as_partner(conn: asyncpg.Connection, partner_id: str | None, query: str) -> list[asyncpg.Record]:
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE apptgate_partner")
        if partner_id is not None:
            await conn.execute("SELECT set_config('apptgate.partner_id', $1, true)", partner_id)
        return await conn.fetch(query)


@pytest.fixture
async def two_partners(world: World) -> tuple[str, str, str, str]:
    mine, theirs = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    for practitioner in (mine, theirs):
        await world.appointment(practitioner, patient.patient_id, MONDAY)
    partner_a = await world.partner("A", mine)
    partner_b = await world.partner("B", theirs)
    return partner_a.partner_id, partner_b.partner_id, mine, theirs


async def test_an_unfiltered_select_returns_only_the_bound_partners_rows(
    owner: asyncpg.Connection, two_partners: tuple[str, str, str, str]
) -> None:
    partner_a, _, mine, _ = two_partners

    rows = await _as_partner(owner, partner_a, "SELECT practitioner_id FROM appointments")
    changes = await _as_partner(owner, partner_a, "SELECT practitioner_id FROM appointment_changes")
    grants = await _as_partner(owner, partner_a, "SELECT partner_id FROM practitioner_grants")

    assert {str(r[0]) for r in rows} == {mine}
    assert {str(r[0]) for r in changes} == {mine}
    assert {str(r[0]) for r in grants} == {partner_a}


async def test_no_bound_partner_sees_nothing(
    owner: asyncpg.Connection, two_partners: tuple[str, str, str, str]
) -> None:
    assert await _as_partner(owner, None, "SELECT id FROM appointments") == []
    assert await _as_partner(owner, None, "SELECT position FROM appointment_changes") == []
    assert await _as_partner(owner, None, "SELECT partner_id FROM practitioner_grants") == []


async def test_the_binding_does_not_outlive_its_transaction_on_a_reused_connection(
    owner: asyncpg.Connection, two_partners: tuple[str, str, str, str]
) -> None:
    partner_a, _, _, _ = two_partners
    assert await _as_partner(owner, partner_a, "SELECT id FROM appointments")

    leftover = await owner.fetchval("SELECT current_setting('apptgate.partner_id', true)")
    assert leftover == ""
    assert await _as_partner(owner, None, "SELECT id FROM appointments") == []


async def test_a_revoked_grant_hides_the_rows_at_the_database_too(
    owner: asyncpg.Connection, two_partners: tuple[str, str, str, str], world: World
) -> None:
    partner_a, _, mine, _ = two_partners
    await world.revoke_grant(partner_a, mine)

    assert await _as_partner(owner, partner_a, "SELECT id FROM appointments") == []


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO appointments (id) VALUES (gen_random_uuid())",
        "UPDATE appointments SET status = 'cancelled'",
        "DELETE FROM appointments",
        "SELECT reason FROM appointments",
        "SELECT given_name, phone, email FROM patients",
        "SELECT * FROM consents",
        "INSERT INTO practitioner_grants (partner_id, practitioner_id) "
        "SELECT partner_id, practitioner_id FROM practitioner_grants",
        "SELECT * FROM partners",
    ],
)
async def test_writes_contact_columns_and_other_tables_are_refused(
    owner: asyncpg.Connection, two_partners: tuple[str, str, str, str], statement: str
) -> None:
    partner_a, _, _, _ = two_partners

    with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.InvalidParameterValueError)):
        await _as_partner(owner, partner_a, statement)


async def test_the_service_role_is_neither_superuser_nor_owner(owner: asyncpg.Connection) -> None:
    async with owner.transaction():
        await owner.execute("SET LOCAL ROLE apptgate_partner")
        superuser = await owner.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        bypass = await owner.fetchval("SELECT rolbypassrls FROM pg_roles WHERE rolname = current_user")
        owns = await owner.fetchval("SELECT count(*) FROM pg_tables WHERE tableowner = current_user")
    assert (superuser, bypass, owns) == (False, False, 0)


async def test_the_partner_pool_cannot_switch_back_to_a_privileged_role(database: Database) -> None:
    assert database.partner_logins
    async with database.transaction(role=PARTNER_ROLE) as conn:
        session_user = await conn.fetchval("SELECT session_user")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET ROLE postgres")
    assert session_user == PARTNER_ROLE
