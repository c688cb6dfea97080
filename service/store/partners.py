"""Partners, their keys and practitioners' grants (migrations 0002 and 0010)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from service import models
from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from service.store.database import Connection

_PARTNER_COLUMNS = "id, display_name, create_time"
_KEY_COLUMNS = "id, partner_id, secret_hash, client_cert_sha256, create_time, revoke_time, expire_time"
_GRANT_COLUMNS = "partner_id, practitioner_id, grant_time, revoke_time"
# A key as an operator lists it, never its hash. Its last use is its latest ledger record (one
# backward probe of disclosures_key_time_idx), and its state is judged by the statement's start,
# as partner_of_key (migration 0010) judges it.
_STANDING_COLUMNS = (
    "k.id, k.partner_id, k.client_cert_sha256, k.create_time, k.revoke_time, k.expire_time, "
    "(SELECT max(d.disclose_time) FROM disclosures d WHERE d.key_id = k.id), "
    f"CASE WHEN k.revoke_time IS NOT NULL THEN {models.KeyState.REVOKED:d} "
    f"WHEN k.expire_time <= statement_timestamp() THEN {models.KeyState.EXPIRED:d} "
    f"ELSE {models.KeyState.ACTIVE:d} END"
)


async def create_partner(conn: Connection, display_name: str) -> models.Partner:
    """Insert a partner. Raises :class:`AlreadyExists` for a taken display name."""
    try:
        row = await conn.fetchrow(
            "INSERT INTO partners (display_name) VALUES ($1) RETURNING id, display_name, create_time",
            display_name,
        )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists("a partner with this display name exists", reason="PARTNER_EXISTS") from exc
    return models.Partner(*row)


async def find_partner(conn: Connection, partner_id: UUID) -> models.Partner | None:
    """Return the partner with this id, if any."""
    row = await conn.fetchrow(f"SELECT {_PARTNER_COLUMNS} FROM partners WHERE id = $1", partner_id)
    return models.Partner(*row) if row else None


async def get_partner(conn: Connection, partner_id: UUID) -> models.Partner:
    """Return the partner with this id. Raises :class:`NotFound`."""
    partner = await find_partner(conn, partner_id)
    if partner is None:
        raise NotFound("partner not found", metadata={"partner_id": str(partner_id)})
    return partner


async def list_partners(conn: Connection, *, after: tuple[datetime, UUID] | None, limit: int) -> list[models.Partner]:
    """Up to ``limit`` partners in creation order, ``(create_time, id)``, strictly after the ``after`` cursor."""
    if after is None:
        rows = await conn.fetch(f"SELECT {_PARTNER_COLUMNS} FROM partners ORDER BY create_time, id LIMIT $1", limit)
    else:
        rows = await conn.fetch(
            f"SELECT {_PARTNER_COLUMNS} FROM partners WHERE (create_time, id) > ($1, $2) "
            "ORDER BY create_time, id LIMIT $3",
            after[0],
            after[1],
            limit,
        )
    return [models.Partner(*row) for row in rows]


async def find_partner_by_name(conn: Connection, display_name: str) -> models.Partner | None:
    """Return the partner with this display name, if any."""
    row = await conn.fetchrow(
        "SELECT id, display_name, create_time FROM partners WHERE display_name = $1", display_name
    )
    return models.Partner(*row) if row else None


async def insert_key(
    conn: Connection,
    key_id: str,
    partner_id: UUID,
    secret_hash: bytes,
    client_cert_sha256: bytes | None = None,
    expire_time: datetime | None = None,
) -> models.PartnerKey:
    """Store a new key's hash, the certificate it is bound to and when it lapses.

    Raises :class:`NotFound` for an unknown partner and :class:`InvalidArgument`
    for an ``expire_time`` that is not after the database's now.
    """
    try:
        row = await conn.fetchrow(
            "INSERT INTO partner_keys (id, partner_id, secret_hash, client_cert_sha256, expire_time) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING {_KEY_COLUMNS}",
            key_id,
            partner_id,
            secret_hash,
            client_cert_sha256,
            expire_time,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound("partner not found", metadata={"partner_id": str(partner_id)}) from exc
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name != "partner_keys_expire_check":
            raise
        raise InvalidArgument.field("expire_time", "must be in the future") from exc
    return models.PartnerKey(*row)


async def find_key(conn: Connection, key_id: str) -> models.PartnerKey | None:
    """Return a key by its public identifier, revoked or not."""
    row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM partner_keys WHERE id = $1", key_id)
    return models.PartnerKey(*row) if row else None


async def revoke_key(conn: Connection, key_id: str) -> models.PartnerKey:
    """Revoke a key. Raises :class:`NotFound` or, when already revoked, :class:`FailedPrecondition`."""
    row = await conn.fetchrow(
        f"UPDATE partner_keys SET revoke_time = now() WHERE id = $1 AND revoke_time IS NULL RETURNING {_KEY_COLUMNS}",
        key_id,
    )
    if row is not None:
        return models.PartnerKey(*row)
    if await find_key(conn, key_id) is None:
        raise NotFound("partner key not found", metadata={"key_id": key_id})
    raise FailedPrecondition("the key is already revoked", reason="KEY_ALREADY_REVOKED", metadata={"key_id": key_id})


async def key_standing(conn: Connection, key_id: str) -> models.KeyStanding | None:
    """A key's times and state (never its hash), or ``None`` for an unknown key."""
    row = await conn.fetchrow(f"SELECT {_STANDING_COLUMNS} FROM partner_keys k WHERE k.id = $1", key_id)
    return _standing(row) if row is not None else None


async def key_standings(
    conn: Connection, partner_id: UUID, *, after: tuple[datetime, str] | None, limit: int
) -> list[models.KeyStanding]:
    """Up to ``limit`` of a partner's keys in issue order, ``(create_time, id)``, strictly after ``after``.

    Raises :class:`NotFound` for an unknown partner (a partner without keys
    answers an empty list).
    """
    await get_partner(conn, partner_id)
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_STANDING_COLUMNS} FROM partner_keys k WHERE k.partner_id = $1 "
            "ORDER BY k.create_time, k.id LIMIT $2",
            partner_id,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {_STANDING_COLUMNS} FROM partner_keys k WHERE k.partner_id = $1 "
            "AND (k.create_time, k.id) > ($2, $3) ORDER BY k.create_time, k.id LIMIT $4",
            partner_id,
            after[0],
            after[1],
            limit,
        )
    return [_standing(row) for row in rows]


def _standing(row: asyncpg.Record) -> models.KeyStanding:
    return models.KeyStanding(row[0], row[1], row[2], row[3], row[4], row[5], row[6], models.KeyState(row[7]))


async def grant_access(conn: Connection, partner_id: UUID, practitioner_id: UUID) -> models.PractitionerGrant:
    """Grant a partner access to a practitioner's appointments.

    Raises :class:`NotFound` for an unknown partner or practitioner and
    :class:`AlreadyExists` when an active grant exists.
    """
    ids = {"partner_id": str(partner_id), "practitioner_id": str(practitioner_id)}
    try:
        row = await conn.fetchrow(
            f"INSERT INTO practitioner_grants (partner_id, practitioner_id) VALUES ($1, $2) RETURNING {_GRANT_COLUMNS}",
            partner_id,
            practitioner_id,
        )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists("the access is already granted", reason="GRANT_EXISTS", metadata=ids) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        what = "partner" if exc.constraint_name == "practitioner_grants_partner_id_fkey" else "practitioner"
        raise NotFound(f"{what} not found", metadata=ids) from exc
    return models.PractitionerGrant(*row)


async def revoke_access(conn: Connection, partner_id: UUID, practitioner_id: UUID) -> models.PractitionerGrant:
    """Revoke an active grant. Raises :class:`NotFound` when there is none."""
    row = await conn.fetchrow(
        "UPDATE practitioner_grants SET revoke_time = now() "
        "WHERE partner_id = $1 AND practitioner_id = $2 AND revoke_time IS NULL "
        f"RETURNING {_GRANT_COLUMNS}",
        partner_id,
        practitioner_id,
    )
    if row is None:
        raise NotFound(
            "no such access is granted",
            metadata={"partner_id": str(partner_id), "practitioner_id": str(practitioner_id)},
        )
    return models.PractitionerGrant(*row)


# Who granted a partner access, the one query of it: every reader of grants in Python goes
# through this text (the partner-path functions and the row-level security policies of
# migration 0007 hold the same condition in SQL). {partner} is a column or a parameter.
_GRANTED = (
    "SELECT g.practitioner_id FROM practitioner_grants g WHERE g.partner_id = {partner} AND g.revoke_time IS NULL"
)


async def granted_practitioners(conn: Connection, partner_id: UUID) -> frozenset[UUID]:
    """The practitioners with an active grant to the partner (the partner role may ask, for its own partner)."""
    rows = await conn.fetch(_GRANTED.format(partner="$1"), partner_id)
    return frozenset(row[0] for row in rows)


async def key_access(conn: Connection, key_ids: Sequence[str]) -> dict[str, models.KeyAccess]:
    """Each existing key of ``key_ids`` with its partner's limits and grants, in one statement (owner path).

    What a change-feed delivery re-checks for many streams at once, without
    binding a partner (a delivery's transaction spans partners). A key past its
    expire time counts as revoked, as the partner functions judge it.
    """
    rows = await conn.fetch(
        "SELECT k.id, k.partner_id, k.revoke_time IS NOT NULL OR k.expire_time <= statement_timestamp(), "
        "l.requests_per_second, l.burst, l.contact_daily_cap, l.patient_daily_cap, l.suspend_time, "
        f"ARRAY({_GRANTED.format(partner='k.partner_id')}) "
        "FROM partner_keys k LEFT JOIN partner_limits l ON l.partner_id = k.partner_id WHERE k.id = ANY($1::text[])",
        list(key_ids),
    )
    return {
        row[0]: models.KeyAccess(row[1], row[2], models.PartnerOverrides(*row[3:8]), frozenset(row[8])) for row in rows
    }


async def key_is_live(conn: Connection, key_id: str, partner_id: UUID, secret_hash: bytes) -> bool:
    """True when ``key_id`` is ``partner_id``'s, with this secret's hash, bound to no certificate, and verifies now.

    What a tool keeping a key between runs (the demo) asks before it uses it again.
    """
    found = await conn.fetchval(
        "SELECT true FROM partner_keys WHERE id = $1 AND partner_id = $2 AND secret_hash = $3 "
        "AND client_cert_sha256 IS NULL AND revoke_time IS NULL "
        "AND (expire_time IS NULL OR expire_time > statement_timestamp())",
        key_id,
        partner_id,
        secret_hash,
    )
    return found is True


async def revoke_keys_except(conn: Connection, partner_id: UUID, kept: str) -> list[str]:
    """Revoke every live key of ``partner_id`` but ``kept``; return the ids revoked."""
    rows = await conn.fetch(
        "UPDATE partner_keys SET revoke_time = now() WHERE partner_id = $1 AND id <> $2 AND revoke_time IS NULL "
        "RETURNING id",
        partner_id,
        kept,
    )
    return sorted(row[0] for row in rows)
