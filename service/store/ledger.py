"""The disclosure ledger: appends (one record per response), chaining, queries, the breach report, verification.

A record holds every appointment of the response it describes (migration
0016), or names the record of the same partner and day whose items the
response repeated (migration 0021, :mod:`service.store.repeats`), appended
without a lock, in the transaction of that response (migration 0011). The
sequencer (:func:`chain`, run every ~100 ms) then numbers and hash-chains the
committed records under the ``ledger_head`` lock, off the request path, into
``disclosure_chain`` (migration 0018; the record itself is never written
again). Queries read the ``disclosure_items`` view: one row per appointment,
whichever shape its record has. Verification recomputes every chained
record's digest in the database (``disclosure_digest``, the one definition),
walks the chain here, and checks that every reference still names the items
it was written for.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from service import models
from service.store import repeats, usage
from service.store.database import Connection

VIEW_BASIC = 1
VIEW_CONTACT = 2
OUTCOME_DISCLOSED = 1
OUTCOME_DENIED = 2
GENESIS_HASH = bytes(32)
#: Records chained per sequencer pass: ~0.3 s of work for pages of 50 (~275 µs each), so records wait ~one pass.
CHAIN_BATCH = 1000

_COLUMNS = (
    "id, item, partner_id, key_id, requested_id, appointment_id, patient_id, view, contact_fields, consent_id, rpc, "
    "trace_id, disclose_time, outcome, denial_reason"
)
_APPEND = (
    "SELECT append_disclosures($1, $2, $3, $4, $5::smallint, $6::smallint, $7, $8::text[], $9::uuid[], $10::uuid[], "
    "$11::smallint[], $12)"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """What one response disclosed (or was refused): the parts common to its records."""

    partner_id: UUID
    key_id: str
    rpc: str
    trace_id: str
    view: int
    outcome: int = OUTCOME_DISCLOSED
    denial_reason: str = ""
    contact_fields: Sequence[int] = ()
    consent_id: UUID | None = None


async def append(
    conn: Connection,
    entry: Entry,
    items: Sequence[tuple[str, UUID | None, UUID | None]],
) -> None:
    """Append one record holding every ``(requested_id, appointment_id, patient_id)`` of a response."""
    if not items:
        return
    await conn.execute(
        _APPEND,
        entry.partner_id,
        entry.key_id,
        entry.rpc,
        entry.trace_id,
        entry.view,
        entry.outcome,
        entry.denial_reason,
        [i[0] for i in items],
        [i[1] for i in items],
        [i[2] for i in items],
        list(entry.contact_fields),
        entry.consent_id,
    )


# Every array travels as an array literal (see array_literal).
_RECORD_MANY = (
    "SELECT partner_id, outcome, counted_since, record_ids FROM record_basic_disclosures($1::text::uuid[], "
    "$2::text::text[], $3::text::text[], $4::text::text[], $5::text::int[], $6::text::bigint[], $7::text::text[], "
    "$8::text::text[], $9::text::uuid[], $10::text::uuid[], $11::text::uuid[], $12::text::int[], $13::text::int[], "
    "$14::text::float8[], $15::text::bigint[], $16::text::bool[], $17::text::bigint[], $18::text::int[], "
    "$19::text::uuid[])"
)
#: The record statement refused a reference (migration 0021): the response must be written in full.
REFERENCE_REFUSED = "AG409"


def array_literal(values: Sequence[object]) -> str:
    """The PostgreSQL array literal of ``values`` (``None`` for NULL), every other element quoted.

    A group's per-appointment arrays hold ~50 elements per call, and asyncpg
    encodes an array parameter element by element, asking each whether it is
    itself a sequence: 12% of the gateway's instructions per ListAppointments
    call, and 6% of a GetAppointment call's for its one-element arrays
    (callgrind, ``bench/instructions.py``). As one text parameter each,
    PostgreSQL's ``array_in`` parses them instead. Numbers and booleans are
    written as Python prints them, which PostgreSQL reads back exactly.
    """
    return _literal(values, list(map(str, values)))


def _literal(values: Sequence[object], strings: list[str]) -> str:
    """:func:`array_literal` of ``values``, given their ``str`` already."""
    if not strings:
        return "{}"
    if "None" in strings and any(v is None for v in values):  # comparing strings is cheaper than ids to None
        return "{" + ",".join("NULL" if v is None else _quoted(str(v)) for v in values) + "}"
    plain = "".join(strings)
    if '"' in plain or "\\" in plain:
        return "{" + ",".join(map(_quoted, strings)) + "}"
    return '{"' + '","'.join(strings) + '"}'


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class CapReached(Exception):
    """A partner of a group went over a daily cap: nothing of the group was counted or recorded."""

    def __init__(self, partner_id: UUID, cap: str) -> None:
        super().__init__(cap)
        self.partner_id = partner_id
        self.cap = cap


async def record_many(
    conn: Connection,
    responses: Sequence[tuple[Entry, Sequence[tuple[str, UUID | None, UUID | None]]]],
    terms: dict[UUID, usage.ChargeTerms],
    counted: usage.CountedPatients | None = None,
    recorded: repeats.RecordedResponses | None = None,
) -> dict[UUID, str]:
    """Charge and record the basic-view responses of many calls in one statement.

    Each partner in ``terms`` is charged once for all its responses (in sorted
    order); each response with appointments becomes exactly the record
    :func:`append` writes. Returns each partner's charge outcome; a partner
    suspended by it has none of its responses recorded. Raises
    :class:`CapReached` when a partner goes over a daily cap, and then nothing
    at all is counted or recorded (migrations 0017, 0020 and 0021).

    With ``counted``, only the patients it does not hold are sent to be
    charged, and it learns those of the statement once it returns: the
    statement must commit on its own (no enclosing transaction). With
    ``recorded`` as well, a response whose items are those of a record it
    holds, under the counter row ``counted`` knows, is recorded as a reference
    to that record, and it learns the records the statement wrote in full.
    """
    for entry, _ in responses:
        if entry.view != VIEW_BASIC or entry.outcome != OUTCOME_DISCLOSED or entry.consent_id is not None:
            raise ValueError("record_many records disclosed basic views only")
    columns: tuple[list[str], list[str], list[str]] = ([], [], [])  # per response, its items' literals (inner)
    ends: list[int] = []  # per response, the position of its last item
    items_of: list[int | None] = []  # per response, the record it repeats
    digests: list[str | None] = []  # per reference, the SHA-256 of the items it repeats (hex)
    fingerprints: list[bytes | None] = []  # per response written in full, what `recorded` learns it by
    reached: dict[UUID, list[UUID]] = {partner: [] for partner in terms}
    total = 0
    for entry, items in responses:
        ref = fingerprint = None
        if items:
            ids, internal_ids, patient_ids = zip(*items, strict=True)
            strings = (list(ids), list(map(str, internal_ids)), list(map(str, patient_ids)))
            if recorded is not None and counted is not None:
                fingerprint = repeats.fingerprint(*strings)
                since = counted.since(entry.partner_id)
                if fingerprint is not None and since is not None:
                    ref = recorded.find(entry.partner_id, since, fingerprint)
            if ref is None:
                literals = map(_literal, (ids, internal_ids, patient_ids), strings)
                for column, literal in zip(columns, literals, strict=True):
                    column.append(literal[1:-1])
                total += len(items)
                if entry.partner_id in reached:
                    reached[entry.partner_id] += patient_ids
        ends.append(total)
        items_of.append(ref)
        digests.append(None if ref is None or fingerprint is None else fingerprint.hex())
        fingerprints.append(fingerprint if ref is None else None)
    charged = usage.charge_columns(terms)
    since_column: list[int | None] = []
    new_ends: list[int] = []
    new_patients: list[UUID] = []
    for partner in charged[0]:  # the patients to charge: those the memo does not know counted
        known = None if counted is None else counted.since(partner)
        since_column.append(known)
        if counted is not None and known is not None:
            new_patients += counted.unknown(partner, reached[partner])
        new_ends.append(len(new_patients))
    group: list[Sequence[object] | str] = [
        [e.partner_id for e, _ in responses],
        [e.key_id for e, _ in responses],
        [e.rpc for e, _ in responses],
        [e.trace_id for e, _ in responses],
        ends,
        items_of,
        digests,
        *("{" + ",".join(filter(None, column)) + "}" for column in columns),
        *charged,
        since_column,
        new_ends,
        new_patients,
    ]
    try:
        rows = await run_group_statement(conn, _RECORD_MANY, group)
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) != REFERENCE_REFUSED or recorded is None:
            raise
        recorded.clear()  # a record it held is not there (a failover lost it, say): write everything in full
        return await record_many(conn, responses, terms, counted)
    outcomes = {}
    for partner_id, outcome, counted_since, record_ids in rows:
        outcomes[partner_id] = str(outcome)
        if counted is not None:
            counted.add(partner_id, counted_since, reached[partner_id])
        if recorded is not None and counted_since is not None:
            for (entry, _), fingerprint, record_id in zip(responses, fingerprints, record_ids, strict=True):
                if entry.partner_id == partner_id and fingerprint is not None and record_id is not None:
                    recorded.add(partner_id, counted_since, fingerprint, record_id)
    return outcomes


async def run_group_statement(conn: Connection, statement: str, columns: Sequence[Sequence[object] | str]) -> list[Any]:
    """Run a group statement (migrations 0019 to 0021) with one array literal per column; return its rows.

    A column given as a string is taken to be its array literal already.

    Raises :class:`CapReached` when the statement refused a partner over a
    daily cap (AG429, the partner in HINT).
    """
    try:
        rows: list[Any] = await conn.fetch(statement, *(c if isinstance(c, str) else array_literal(c) for c in columns))
    except asyncpg.PostgresError as exc:
        cap = usage.cap_reached(exc)
        if cap is None:
            raise
        raise CapReached(UUID(str(getattr(exc, "hint", ""))), cap) from None
    return rows


def _disclosure(row: object) -> models.Disclosure:
    values = list(row)  # type: ignore[call-overload]
    values[8] = tuple(values[8])
    return models.Disclosure(*values)


async def list_disclosures(
    conn: Connection,
    *,
    partner_id: UUID | None,
    patient_id: UUID | None,
    start_time: datetime | None,
    end_time: datetime | None,
    after: tuple[int, int],
    limit: int,
) -> list[models.Disclosure]:
    """Appointments of the records matching every given filter, in the order written, after ``(id, item)``.

    Only the filters given become conditions, so each can use its index: a
    patient is found through ``disclosures_patient_ids_idx`` (records of one
    response), then ``disclosures_items_of_idx`` (the records repeating them,
    migration 0021), or ``disclosures_patient_time_idx`` (records written
    before 0016).
    """
    conditions = ["d.id >= $1", "(d.id, d.item) > ($1, $2)"]
    args: list[Any] = [after[0], after[1]]
    if partner_id is not None:
        args.append(partner_id)
        conditions.append(f"d.partner_id = ${len(args)}")
    if patient_id is not None:
        args.append(patient_id)
        conditions.append(
            f"d.patient_id = ${len(args)} AND d.id IN (SELECT r.id FROM disclosures r "
            f"WHERE r.patient_ids @> ARRAY[${len(args)}::uuid] OR r.patient_id = ${len(args)} "
            f"UNION ALL SELECT r.id FROM disclosures o JOIN disclosures r ON r.items_of = o.id "
            f"WHERE o.patient_ids @> ARRAY[${len(args)}::uuid])"
        )
    if start_time is not None:
        args.append(start_time)
        conditions.append(f"d.disclose_time >= ${len(args)}")
    if end_time is not None:
        args.append(end_time)
        conditions.append(f"d.disclose_time < ${len(args)}")
    args.append(limit)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM disclosure_items d WHERE {' AND '.join(conditions)} "
        f"ORDER BY d.id, d.item LIMIT ${len(args)}",
        *args,
    )
    return [_disclosure(row) for row in rows]


_BREACH = """
SELECT d.patient_id,
       array_agg(DISTINCT d.appointment_id) FILTER (WHERE d.appointment_id IS NOT NULL) AS appointment_ids,
       array_agg(DISTINCT f.field) FILTER (WHERE f.field IS NOT NULL) AS contact_fields,
       min(d.disclose_time) AS first_time,
       max(d.disclose_time) AS last_time
FROM disclosure_items d
LEFT JOIN LATERAL unnest(d.contact_fields) AS f(field) ON true
WHERE d.partner_id = $1 AND d.disclose_time >= $2 AND d.disclose_time < $3
  AND d.outcome = 1 AND d.patient_id IS NOT NULL AND ($4::text IS NULL OR d.key_id = $4)
GROUP BY d.patient_id
ORDER BY d.patient_id
"""


async def breach_report(
    conn: Connection, *, partner_id: UUID, start_time: datetime, end_time: datetime, key_id: str | None
) -> AsyncIterator[models.AffectedPatient]:
    """Yield every patient the partner was shown something about in the window, with what was shown.

    Streams through a server-side cursor (the connection must be in a
    transaction), so a report over a large ledger does not sit in memory twice.
    """
    async for row in conn.cursor(_BREACH, partner_id, start_time, end_time, key_id, prefetch=2000):
        yield models.AffectedPatient(
            row["patient_id"],
            tuple(row["appointment_ids"] or ()),
            tuple(sorted(row["contact_fields"] or ())),
            row["first_time"],
            row["last_time"],
        )


@dataclass
class Verification:
    """The result of walking the chain."""

    records: int = 0
    problems: list[str] = field(default_factory=list)
    head_seq: int = 0
    head_hash: bytes = GENESIS_HASH
    seals_checked: int = 0

    @property
    def intact(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def seal_signature(key: bytes, seq: int, chain_hash: bytes) -> bytes:
    """The HMAC that seals the chain at ``seq``."""
    return hmac.new(key, seq.to_bytes(8, "big") + chain_hash, hashlib.sha256).digest()


async def chain(conn: Connection, *, batch: int = CHAIN_BATCH) -> int:
    """Chain committed records not chained yet, up to ``batch``.

    Returns how many records the pass went over: 0 once none is waiting (or
    while another process is at it). Only right after migration 0018 can that
    count include records found chained already.
    """
    return int(await conn.fetchval("SELECT chain_disclosures($1)", batch))


async def chain_all(conn: Connection) -> int:
    """Chain every record committed so far (for verification and sealing); return how many the passes went over."""
    total = 0
    while chained := await chain(conn):
        total += chained
    return total


async def verify(
    conn: Connection, seal_key: bytes, *, batch: int = 5000, progress: Callable[[int], None] | None = None
) -> Verification:
    """Recompute every digest, check the links, the head and the seals; report every problem found."""
    result = Verification()
    seals = {row["seq"]: (row["hash"], row["signature"]) for row in await conn.fetch("SELECT * FROM ledger_seals")}
    expected_seq, previous = 1, GENESIS_HASH
    last_seq = 0
    while True:
        rows = await conn.fetch(
            "SELECT c.seq, c.prev_hash, c.hash, d.id IS NOT NULL AS present, "
            "disclosure_digest(d, c.seq, c.prev_hash) = c.hash AS intact "
            "FROM disclosure_chain c LEFT JOIN disclosures d ON d.id = c.id "
            "WHERE c.seq > $1 ORDER BY c.seq LIMIT $2",
            last_seq,
            batch,
        )
        for row in rows:
            seq = row["seq"]
            if seq != expected_seq:
                result.problems.append(f"records {expected_seq}..{seq - 1} are missing")
            if row["prev_hash"] != previous:
                result.problems.append(f"record {seq} does not link to the record before it")
            if not row["present"]:
                result.problems.append(f"record {seq} is missing (its place in the chain is left)")
            elif not row["intact"]:
                result.problems.append(f"record {seq} was altered (its digest does not match)")
            if seq in seals:
                sealed_hash, signature = seals.pop(seq)
                result.seals_checked += 1
                if not hmac.compare_digest(signature, seal_signature(seal_key, seq, sealed_hash)):
                    result.problems.append(f"the seal at record {seq} has a bad signature")
                elif sealed_hash != row["hash"]:
                    result.problems.append(f"the chain was rewritten before the seal at record {seq}")
            previous, expected_seq, last_seq = row["hash"], seq + 1, seq
            result.records += 1
        if progress is not None:
            progress(result.records)
        if len(rows) < batch:
            break
    for seq in sorted(seals):
        result.problems.append(f"the sealed record {seq} is missing")
    head = await conn.fetchrow("SELECT seq, hash, chained_txid, chained_id FROM ledger_head")
    result.head_seq, result.head_hash = head["seq"], head["hash"]
    if head["seq"] != last_seq or head["hash"] != previous:
        result.problems.append(f"the ledger head ({head['seq']}) does not match the last record ({last_seq})")
    for row in await conn.fetch(_BROKEN_REFERENCES, _REFERENCE_PROBLEMS):
        place = f"record {row['seq']}" if row["seq"] is not None else f"the unchained record {row['id']}"
        result.problems.append(f"{place} {_REFERENCE_MESSAGES[row['problem']]}")
    unchained = await conn.fetchval(_PASSED_OVER, head["chained_txid"], head["chained_id"])
    if unchained == 1:
        result.problems.append("1 record the sequencer has passed is not in the chain")
    elif unchained:
        result.problems.append(f"{unchained} records the sequencer has passed are not in the chain")
    return result


# Reference records (migration 0021) whose record named is missing, another partner's, a reference itself,
# holds other items than those digested when the reference was written, or is of another UTC day (which the
# record statement refuses). Each named record is digested once.
_BROKEN_REFERENCES = """
WITH named AS (
    SELECT o.id, o.partner_id, o.items_of IS NULL AS original, disclosure_items_digest(o) AS items_digest,
           (o.disclose_time AT TIME ZONE 'UTC')::date AS day
    FROM disclosures o
    WHERE o.id IN (SELECT r.items_of FROM disclosures r WHERE r.items_of IS NOT NULL)
)
SELECT seq, id, problem
FROM (
    SELECT c.seq, r.id,
           CASE WHEN n.id IS NULL THEN 'missing'
                WHEN n.partner_id <> r.partner_id OR NOT n.original
                     OR n.items_digest IS DISTINCT FROM r.items_digest THEN 'items'
                WHEN n.day <> (r.disclose_time AT TIME ZONE 'UTC')::date THEN 'day'
           END AS problem
    FROM disclosures r
    LEFT JOIN named n ON n.id = r.items_of
    LEFT JOIN disclosure_chain c ON c.id = r.id
    WHERE r.items_of IS NOT NULL
) checked
WHERE problem IS NOT NULL
ORDER BY id
LIMIT $1
"""
_REFERENCE_MESSAGES = {
    "missing": "repeats the items of a record that is missing",
    "items": "repeats items that are not those of the record it names",
    "day": "repeats the items of a record of another day",
}
#: Broken references listed by name at most; verification of a ledger that has more is failed all the same.
_REFERENCE_PROBLEMS = 100

# Records at or before the sequencer's cursor that have no place in the chain (migration 0018).
_PASSED_OVER = (
    "SELECT count(*) FROM disclosures d WHERE (d.txid, d.id) <= ($1::xid8, $2::bigint) "
    "AND NOT EXISTS (SELECT 1 FROM disclosure_chain c WHERE c.id = d.id)"
)


async def seal(conn: Connection, seal_key: bytes) -> int:
    """Seal the chain at its current head; return the sealed position (0 when the ledger is empty)."""
    head = await conn.fetchrow("SELECT seq, hash FROM ledger_head")
    if head["seq"] == 0:
        return 0
    await conn.execute(
        "INSERT INTO ledger_seals (seq, hash, signature) VALUES ($1, $2, $3) ON CONFLICT (seq) DO NOTHING",
        head["seq"],
        head["hash"],
        seal_signature(seal_key, head["seq"], head["hash"]),
    )
    return int(head["seq"])
