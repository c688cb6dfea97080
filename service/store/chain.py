"""The ledger's hash chain: the sequencer, verification and seals.

The sequencer (:func:`chain`, run by :class:`service.app.Gateway` every
:data:`~service.app.LEDGER_CHAIN_INTERVAL` when it has caught up) numbers and
hash-chains committed records into ``disclosure_chain`` under the
``ledger_head`` lock, off the request path (``chain_disclosures``, migration
0005). Verification recomputes every chained record's digest in the database
(``disclosure_digest``, the one definition), walks the chain here, checks the
seals and that every reference still names the items it was written for. A
seal is an HMAC of the head under a key derived from the server secret, which
the database never sees; ``service.disclosure.witness`` keeps a copy of every
seal outside the database.

Times are the database's: a record's ``disclose_time`` is stamped by a trigger
as it is inserted, its ``chain_time`` by the sequencer, and the digest covers
both. A record is never chained before it was written, the sequencer's times
never go back, and a record chained more than ``max_lag`` after it was written
was back-dated (or held back that long by a transaction left open in the
cluster, which is worth knowing too).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from service.store.database import Connection

GENESIS_HASH = bytes(32)
#: Records chained per sequencer pass: a pass is one statement, and a bounded one keeps its lock short.
CHAIN_BATCH = 1000
#: How long after it was written a record may be chained before verification calls it back-dated: the
#: sequencer chains within a second, unless a transaction stays open in the cluster (it waits for those).
MAX_CHAIN_LAG = timedelta(hours=1)


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
    """Chain committed records not chained yet, up to ``batch``; return how many.

    0 once none is waiting, or while another process is at it.
    """
    return int(await conn.fetchval("SELECT chain_disclosures($1)", batch))


async def chain_all(conn: Connection) -> int:
    """Chain every record committed so far (for verification and sealing); return how many."""
    total = 0
    while chained := await chain(conn):
        total += chained
    return total


async def verify(
    conn: Connection,
    seal_key: bytes,
    *,
    batch: int = 5000,
    max_lag: timedelta = MAX_CHAIN_LAG,
    progress: Callable[[int], None] | None = None,
) -> Verification:
    """Recompute every digest, check the links, the times, the head and the seals; report every problem found."""
    result = Verification()
    seals = {row["seq"]: (row["hash"], row["signature"]) for row in await conn.fetch("SELECT * FROM ledger_seals")}
    expected_seq, previous = 1, GENESIS_HASH
    last_seq = 0
    last_chained: datetime | None = None
    last_order: tuple[int, int] = (0, 0)
    while True:
        rows = await conn.fetch(
            "SELECT c.seq, c.prev_hash, c.hash, c.chain_time, d.id, d.txid::text AS txid, d.disclose_time, "
            "disclosure_digest(d, c.seq, c.prev_hash, c.chain_time) = c.hash AS intact "
            "FROM disclosure_chain c LEFT JOIN disclosures d ON d.id = c.id "
            "WHERE c.seq > $1 ORDER BY c.seq LIMIT $2",
            last_seq,
            batch,
        )
        for row in rows:
            seq, chained = row["seq"], row["chain_time"]
            if seq != expected_seq:
                result.problems.append(f"records {expected_seq}..{seq - 1} are missing")
            if row["prev_hash"] != previous:
                result.problems.append(f"record {seq} does not link to the record before it")
            if row["id"] is None:
                result.problems.append(f"record {seq} is missing (its place in the chain is left)")
            elif not row["intact"]:
                result.problems.append(f"record {seq} was altered (its digest does not match)")
            else:
                order = (int(row["txid"]), row["id"])
                written = row["disclose_time"]
                if order <= last_order:
                    result.problems.append(f"record {seq} is out of the order the sequencer chains in")
                if written > chained:
                    result.problems.append(f"record {seq} is dated after it was chained")
                elif chained - written > max_lag:
                    result.problems.append(
                        f"record {seq} is dated {chained - written} before it was chained: back-dated, "
                        "or held back by a transaction open that long"
                    )
                last_order = order
            if last_chained is not None and chained < last_chained:
                result.problems.append(f"record {seq} was chained before the record ahead of it")
            last_chained = max(chained, last_chained or chained)
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


# Reference records whose record named is missing, another partner's, a reference itself, holds other
# items than those digested when the reference was written, or is of another UTC day (which the record
# statement refuses). Each named record is digested once.
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

# Records at or before the sequencer's cursor that have no place in the chain.
_PASSED_OVER = (
    "SELECT count(*) FROM disclosures d WHERE (d.txid, d.id) <= ($1::xid8, $2::bigint) "
    "AND NOT EXISTS (SELECT 1 FROM disclosure_chain c WHERE c.id = d.id)"
)


async def seal(conn: Connection, seal_key: bytes, seq: int, chain_hash: bytes) -> None:
    """Seal the chain at ``seq``, whose hash verification found to be ``chain_hash``."""
    await conn.execute(
        "INSERT INTO ledger_seals (seq, hash, signature) VALUES ($1, $2, $3) ON CONFLICT (seq) DO NOTHING",
        seq,
        chain_hash,
        seal_signature(seal_key, seq, chain_hash),
    )


async def clock(conn: Connection) -> datetime:
    """The database's clock, which stamps records and chains them."""
    return await conn.fetchval("SELECT clock_timestamp()")  # type: ignore[no-any-return]


async def hashes_at(conn: Connection, seqs: Sequence[int]) -> dict[int, bytes]:
    """The chain's hash at each of ``seqs`` it holds."""
    rows = await conn.fetch("SELECT seq, hash FROM disclosure_chain WHERE seq = ANY($1::bigint[])", list(seqs))
    return {row["seq"]: row["hash"] for row in rows}
