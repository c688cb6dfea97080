"""PostgreSQL itself refuses what the partner path must never do, whatever the partner role sends.

Each test logs in as ``apptgate_partner``, the way a stolen partner database
login or an SQL injection on the partner path would, and shows the database
returns nothing, refuses, or serves only the partner whose key and secret were
presented — independent of the service's own checks.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import harness
import pytest
from harness import MONDAY, PartnerHandle, World

from service.store.database import PARTNER_ROLE, Database, partner_login_dsn

# Every table of the schema: the partner role may read or write none of them.
_TABLES = (
    "practitioners",
    "patients",
    "appointments",
    "partners",
    "partner_keys",
    "practitioner_grants",
    "consents",
    "partner_limits",
    "partner_daily_usage",
    "partner_daily_patients",
    "partner_events",
    "disclosures",
    "disclosure_chain",
    "ledger_head",
    "ledger_seals",
    "change_feed_head",
    "appointment_changes",
)


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@pytest.fixture
async def as_partner(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection logged in as the partner role, as the partner pool's are."""
    conn = await asyncpg.connect(partner_login_dsn(database_dsn))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def owner(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def two_partners(world: World) -> tuple[PartnerHandle, PartnerHandle, str, str]:
    mine, theirs = await world.practitioner(), await world.practitioner()
    patient = await world.patient()
    for practitioner in (mine, theirs):
        await world.appointment(practitioner, patient.patient_id, MONDAY)
    return await world.partner("A", mine), await world.partner("B", theirs), mine, theirs


async def _forge_every_setting(conn: asyncpg.Connection, partner_id: str) -> None:
    """Set, for the session, every setting a policy could read, to another partner."""
    for name in ("apptgate.partner_id", "apptgate.key_id", "app.partner_id"):
        await conn.execute("SELECT set_config($1, $2, false)", name, partner_id)


@pytest.mark.parametrize("table", _TABLES)
async def test_the_role_reads_and_writes_no_table_whatever_it_sets(
    as_partner: asyncpg.Connection, two_partners: tuple[PartnerHandle, PartnerHandle, str, str], table: str
) -> None:
    _, theirs, _, _ = two_partners
    await _forge_every_setting(as_partner, theirs.partner_id)

    for statement in (f"SELECT * FROM {table} LIMIT 1", f"DELETE FROM {table}", f"TRUNCATE {table}"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_partner.fetch(statement)


async def test_the_role_cannot_create_an_object_that_would_shadow_a_function(as_partner: asyncpg.Connection) -> None:
    for statement in (
        "CREATE FUNCTION public.partner_of_key(text, bytea) RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'",
        "CREATE TABLE public.partner_keys_copy (id text)",
        "CREATE SCHEMA shadow",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_partner.execute(statement)


async def test_a_read_serves_only_the_partner_of_the_key_and_secret_presented(
    as_partner: asyncpg.Connection, two_partners: tuple[PartnerHandle, PartnerHandle, str, str]
) -> None:
    mine_partner, theirs, mine, _ = two_partners
    await _forge_every_setting(as_partner, theirs.partner_id)
    window = "'2000-01-01', '2100-01-01'"
    listing = f"SELECT practitioner_id FROM partner_list_appointments($1, $2, NULL, {window}, NULL, NULL, 100)"

    rows = await as_partner.fetch(listing, mine_partner.key_id, _hash(mine_partner.secret))
    # Another partner's key id with my secret: not a key at all.
    with pytest.raises(asyncpg.PostgresError) as refused:
        await as_partner.fetch(listing, theirs.key_id, _hash(mine_partner.secret))

    assert {str(r[0]) for r in rows} == {mine}
    assert refused.value.sqlstate == "AG401"


async def test_unknown_wrong_and_revoked_keys_are_refused_alike(
    as_partner: asyncpg.Connection, two_partners: tuple[PartnerHandle, PartnerHandle, str, str], world: World
) -> None:
    partner, _, _, _ = two_partners
    revoked = await world.issue_key(partner.partner_id)
    await world.revoke_key(revoked.key_id)
    attempts = [
        ("pk_" + "a" * 16, _hash(partner.secret)),  # unknown key id
        (partner.key_id, _hash(partner.secret + "x")),  # wrong secret
        (revoked.key_id, _hash(revoked.secret)),  # revoked key
    ]
    authenticated, reads = [], []
    for key_id, secret_hash in attempts:
        authenticated.append(await as_partner.fetch("SELECT * FROM partner_authenticate($1, $2)", key_id, secret_hash))
        with pytest.raises(asyncpg.PostgresError) as refused:
            await as_partner.fetch(
                "SELECT * FROM partner_get_appointment($1, $2, $3)", key_id, secret_hash, uuid.uuid4()
            )
        reads.append((refused.value.sqlstate, str(refused.value)))

    assert authenticated == [[], [], []]
    assert reads == [("AG401", "invalid credentials")] * 3


async def test_a_key_verifies_without_its_hash_ever_leaving_the_database(
    as_partner: asyncpg.Connection, two_partners: tuple[PartnerHandle, PartnerHandle, str, str]
) -> None:
    partner, _, _, _ = two_partners

    [row] = await as_partner.fetch("SELECT * FROM partner_authenticate($1, $2)", partner.key_id, _hash(partner.secret))

    assert str(row["partner_id"]) == partner.partner_id
    assert _hash(partner.secret) not in [v for v in row.values() if isinstance(v, bytes)]
    assert "secret_hash" not in list(row.keys())


async def test_the_role_records_refusals_for_its_own_partner_only_and_writes_nothing_else(
    as_partner: asyncpg.Connection,
    owner: asyncpg.Connection,
    two_partners: tuple[PartnerHandle, PartnerHandle, str, str],
) -> None:
    mine, theirs, _, _ = two_partners
    await _forge_every_setting(as_partner, theirs.partner_id)
    refuse = (
        "SELECT partner_record_refusal($1, $2, '/x/GetAppointment', '', 1::smallint, $3, ARRAY['apt_probe'], "
        "ARRAY[NULL::uuid], ARRAY[NULL::uuid], NULL)"
    )
    await as_partner.execute(refuse, mine.key_id, _hash(mine.secret), "NOT_FOUND")
    with pytest.raises(asyncpg.PostgresError) as forged:  # the other partner's key, without its secret
        await as_partner.execute(refuse, theirs.key_id, _hash(mine.secret), "NOT_FOUND")
    with pytest.raises(asyncpg.CheckViolationError):  # a "refusal" with no reason would read as a disclosure
        await as_partner.execute(refuse, mine.key_id, _hash(mine.secret), "")
    record_functions = (
        "SELECT record_basic_disclosures(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        "SELECT * FROM disclose_consented_contacts(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL, NULL, NULL, NULL, NULL)",
        "SELECT chain_disclosures(10)",
    )
    for statement in record_functions:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_partner.execute(statement)

    records = await owner.fetch("SELECT partner_id, outcome, denial_reason FROM disclosures")
    assert forged.value.sqlstate == "AG401"
    assert [(str(r["partner_id"]), r["outcome"], r["denial_reason"]) for r in records] == [
        (mine.partner_id, 2, "NOT_FOUND")
    ]


async def test_the_role_cannot_charge_usage_with_caps_of_its_choosing(
    as_partner: asyncpg.Connection, two_partners: tuple[PartnerHandle, PartnerHandle, str, str]
) -> None:
    mine, _, _, _ = two_partners

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_partner.execute(
            "SELECT charge_partner_usage($1, ARRAY[gen_random_uuid()], 0, 1000000, 1000000, 1000.0, 1000000, false)",
            uuid.UUID(mine.partner_id),
        )


async def test_the_service_role_is_neither_superuser_nor_owner(as_partner: asyncpg.Connection) -> None:
    superuser = await as_partner.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    bypass = await as_partner.fetchval("SELECT rolbypassrls FROM pg_roles WHERE rolname = current_user")
    owns = await as_partner.fetchval("SELECT count(*) FROM pg_tables WHERE tableowner = current_user")
    assert (superuser, bypass, owns) == (False, False, 0)


async def test_the_partner_pool_cannot_switch_back_to_a_privileged_role(database: Database) -> None:
    assert database.partner_logins
    async with database.transaction(role=PARTNER_ROLE) as conn:
        session_user = await conn.fetchval("SELECT session_user")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET ROLE postgres")
    assert session_user == PARTNER_ROLE


async def test_a_stream_replays_only_changes_made_while_the_grant_was_held(
    as_partner: asyncpg.Connection, world: World
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    partner = await world.partner("Regranted", practitioner)
    await world.appointment(practitioner, patient.patient_id, MONDAY)  # granted: seen
    await world.revoke_grant(partner.partner_id, practitioner)
    await world.appointment(practitioner, patient.patient_id, MONDAY)  # revoked: never seen
    await world.grant(partner.partner_id, practitioner)
    await world.appointment(practitioner, patient.patient_id, MONDAY)  # granted again: seen

    rows = await as_partner.fetch(
        "SELECT position FROM partner_changes($1, $2, 0, 1000, 100, $3::uuid[])",
        partner.key_id,
        _hash(partner.secret),
        [harness.uuid_of(practitioner)],
    )

    assert [r["position"] for r in rows] == [1, 3]
