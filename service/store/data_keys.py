"""The check values of the data keys, as the database records them (migration 0001, ``data_key_checks``).

A check value is a fingerprint of a key (:func:`service.crypto.sealing.key_check`),
never the key: the first process that uses a key id records it, and every
later start compares its own key's against it. What to do on a difference is
decided by the caller (:func:`service.app.verify_data_keys`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from service.store.database import Connection


async def recorded(conn: Connection, key_ids: Collection[int]) -> dict[int, bytes]:
    """The recorded check value of each of ``key_ids`` that has one."""
    rows = await conn.fetch(
        "SELECT key_id, check_value FROM data_key_checks WHERE key_id = ANY($1::integer[])", list(key_ids)
    )
    return {row["key_id"]: row["check_value"] for row in rows}


async def record(conn: Connection, checks: Mapping[int, bytes]) -> dict[int, bytes]:
    """Record the check values of ids that have none yet; return what is recorded for these ids afterwards.

    An id recorded meanwhile by another process keeps its value (the first
    wins): the caller compares the returned values with its own, so two
    processes starting at once with different keys cannot both go on.
    """
    await conn.execute(
        "INSERT INTO data_key_checks (key_id, check_value) SELECT * FROM unnest($1::integer[], $2::bytea[]) "
        "ON CONFLICT (key_id) DO NOTHING",
        list(checks),
        list(checks.values()),
    )
    return await recorded(conn, checks)
