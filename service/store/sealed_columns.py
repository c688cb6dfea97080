"""The sealed columns as a whole: what re-sealing and the key-usage reports read and write.

Only ``python -m service data-key …`` and the checks at ``serve`` start use
this module; the service's own writes go through :mod:`service.store.scheduling`.
Values stay opaque bytes here: opening and sealing happen in
:mod:`service.crypto.sealing`, never in SQL. Table and column names come from
:data:`service.crypto.sealing.SEALED_COLUMNS`, never from input.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from service import models
from service.crypto.sealing import IMPORTED_TABLES, SEALED_COLUMNS
from service.store.database import Connection

#: The column whose seal header stands for its row in the data-key index (migration 0001)
#: (every writer seals a row's values together, under one key).
_INDEXED_COLUMN = {"patients": "family_name", "appointments": "reason", "consent_requests": "purpose"}


def _header(column: str) -> str:
    return f"substring(sealed_{column} FROM 1 FOR 3)"


def _any_clear(table: str) -> str:
    if table not in IMPORTED_TABLES:
        return "false"
    return " OR ".join(f"{column} IS NOT NULL" for column in SEALED_COLUMNS[table])


def _clear(table: str, column: str) -> str:
    # Clear values are read as text, the text that is sealed: the sex column is a smallint,
    # whose text is the one digit service.crypto.sealing.sex_text seals. A table without
    # import columns has no clear value to read.
    return f"{column}::text" if table in IMPORTED_TABLES else "NULL::text"


def _select(table: str) -> str:
    columns = SEALED_COLUMNS[table]
    return ", ".join(["id", *(f"sealed_{c}" for c in columns), *(f"{_clear(table, c)} AS {c}" for c in columns)])


def _batch_statements(table: str) -> tuple[str, str]:
    columns = SEALED_COLUMNS[table]
    select = _select(table)
    # Work left: a value in clear, or a seal whose header is not the active key's ($1).
    work = " OR ".join([_any_clear(table), *(f"{_header(c)} <> $1" for c in columns)])
    tail = "ORDER BY id LIMIT $2 FOR NO KEY UPDATE"
    return (
        f"SELECT {select} FROM {table} WHERE ({work}) {tail}",
        f"SELECT {select} FROM {table} WHERE id > $3 AND ({work}) {tail}",
    )


_BATCH = {table: _batch_statements(table) for table in SEALED_COLUMNS}
#: One row whose indexed column carries a given seal header: a probe of the data-key index (migration 0001).
_SAMPLE = {
    table: f"SELECT {_select(table)} FROM {table} WHERE {_header(column)} = $1 LIMIT 1"
    for table, column in _INDEXED_COLUMN.items()
}


def _sealed_statements(table: str) -> tuple[str, str]:
    any_sealed = " OR ".join(f"sealed_{c} IS NOT NULL" for c in SEALED_COLUMNS[table])
    select = _select(table)
    return (
        f"SELECT {select} FROM {table} WHERE ({any_sealed}) ORDER BY id LIMIT $1",
        f"SELECT {select} FROM {table} WHERE id > $2 AND ({any_sealed}) ORDER BY id LIMIT $1",
    )


_SEALED = {table: _sealed_statements(table) for table in SEALED_COLUMNS}
_WRITE = {
    table: f"UPDATE {table} SET "
    + ", ".join(
        [
            *(f"sealed_{c} = ${i}" for i, c in enumerate(columns, start=2)),
            *(f"{c} = NULL" for c in columns if table in IMPORTED_TABLES),
        ]
    )
    + " WHERE id = $1"
    for table, columns in SEALED_COLUMNS.items()
}


async def rows_to_reseal(
    conn: Connection, table: str, *, active_header: bytes, after: UUID | None, limit: int
) -> list[models.SealableRow]:
    """The next ``limit`` rows of ``table`` (in id order, after ``after``) with a value in clear or under another key.

    The rows are locked until the transaction ends, so a concurrent re-sealer
    waits rather than writing over them.
    """
    first, following = _BATCH[table]
    if after is None:
        rows = await conn.fetch(first, active_header, limit)
    else:
        rows = await conn.fetch(following, active_header, limit, after)
    return [_sealable(table, row) for row in rows]


def _sealable(table: str, row: asyncpg.Record) -> models.SealableRow:
    columns = SEALED_COLUMNS[table]
    return models.SealableRow(row["id"], {c: row[f"sealed_{c}"] for c in columns}, {c: row[c] for c in columns})


async def row_sealed_under(conn: Connection, table: str, header: bytes) -> models.SealableRow | None:
    """One row of ``table`` sealed under the seal header ``header`` (one index probe), or None when there is none.

    The row stands for every value sealed under that header (the gateway seals
    a row's values together): opening it tests the key without opening them all.
    """
    row = await conn.fetchrow(_SAMPLE[table], header)
    return None if row is None else _sealable(table, row)


async def sealed_rows(conn: Connection, table: str, *, after: UUID | None, limit: int) -> list[models.SealableRow]:
    """The next ``limit`` rows of ``table`` (in id order, after ``after``) holding any sealed value."""
    first, following = _SEALED[table]
    rows = await conn.fetch(first, limit) if after is None else await conn.fetch(following, limit, after)
    return [_sealable(table, row) for row in rows]


async def write_sealed(conn: Connection, table: str, rows: list[tuple[UUID, dict[str, bytes | None]]]) -> None:
    """Store re-sealed values (every column of :data:`SEALED_COLUMNS`) and clear what was left in clear."""
    columns = SEALED_COLUMNS[table]
    await conn.executemany(_WRITE[table], [(row_id, *(sealed[c] for c in columns)) for row_id, sealed in rows])


async def count_values(conn: Connection) -> list[models.SealedValueCount]:
    """Count every sealed value by table, column and seal header, and the values left in clear (a full scan)."""
    counts: list[models.SealedValueCount] = []
    for table, columns in SEALED_COLUMNS.items():
        values = ", ".join(f"('{c}', sealed_{c}, {_clear(table, c)})" for c in columns)
        rows = await conn.fetch(
            "SELECT v.name, CASE WHEN length(v.sealed) >= 3 THEN substring(v.sealed FROM 1 FOR 3) END AS header, "
            "count(v.sealed) AS sealed, count(v.clear) AS clear "
            f"FROM {table}, LATERAL (VALUES {values}) AS v(name, sealed, clear) "
            "WHERE v.sealed IS NOT NULL OR v.clear IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"
        )
        counts.extend(
            models.SealedValueCount(table, row["name"], row["header"], row["sealed"], row["clear"]) for row in rows
        )
    return counts


async def headers_in_use(conn: Connection) -> tuple[set[bytes], bool]:
    """The seal headers in use, and whether any value is left in clear: a few index probes (migration 0001).

    Each row's headers stand for its row (see :data:`_INDEXED_COLUMN`); for an
    exact count of every value, use :func:`count_values`.
    """
    headers: set[bytes] = set()
    clear = False
    for table, column in _INDEXED_COLUMN.items():
        header = _header(column)
        # A loose index scan: one probe per distinct header, however many rows.
        rows = await conn.fetch(
            "WITH RECURSIVE h(header) AS ("
            f"(SELECT {header} FROM {table} WHERE {header} IS NOT NULL ORDER BY 1 LIMIT 1) "
            f"UNION ALL SELECT (SELECT {header} FROM {table} WHERE {header} > h.header ORDER BY 1 LIMIT 1) "
            "FROM h WHERE h.header IS NOT NULL"
            ") SELECT header FROM h WHERE header IS NOT NULL"
        )
        headers.update(row["header"] for row in rows)
        clear = clear or await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {_any_clear(table)})")
    return headers, clear
