"""The ledger's witness: every seal, copied to a file outside the database.

Seals in ``ledger_seals`` stop whoever writes the tables from rewriting history
*before* a seal, but not from removing the seals with it: a ledger rolled back,
or emptied with its seals, verifies as intact. So every seal is first appended
to the witness (``APPTGATE_LEDGER_WITNESS``), one signed checkpoint per line::

    {"seq": 120, "hash": "<hex>", "time": "2031-01-01T08:00:00.000000Z", "key_id": "ls_…", "signature": "<hex>"}

``seq`` and ``hash`` are the chain's position and digest there, ``time`` the
database's clock at the seal, ``key_id`` names the seal key (derived from the
server secret, which the database never sees) and ``signature`` is its HMAC of
the four. The file is only ever appended to and synced; an operator points it
at storage the database owner cannot rewrite (another host, a WORM bucket
mounted append-only, a log shipper that keeps every line).

:func:`check` compares the database with every line: a position the witness
vouches for must still be in the chain with the same hash, so records removed,
altered, reordered or rolled back — the whole ledger included — are reported.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.errors import ConfigError
from service.store import chain
from service.store.database import Connection

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_DOMAIN = b"apptgate-ledger-witness-v1"


def key_id(seal_key: bytes) -> str:
    """The public name of a seal key: a prefix of its SHA-256, which reveals nothing of it."""
    return "ls_" + hashlib.sha256(_DOMAIN + seal_key).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """The chain at one position, as a seal vouched for it."""

    seq: int
    hash: bytes
    time: datetime
    key_id: str

    def signed_text(self) -> bytes:
        """The bytes the signature covers: the domain and each field, newline-separated."""
        fields = (str(self.seq), self.hash.hex(), self.time.astimezone(UTC).strftime(_TIME_FORMAT), self.key_id)
        return b"\n".join((_DOMAIN, *(field.encode() for field in fields)))

    def signature(self, seal_key: bytes) -> bytes:
        """The HMAC-SHA256 of :meth:`signed_text` under the seal key."""
        return hmac.new(seal_key, self.signed_text(), hashlib.sha256).digest()

    def line(self, seal_key: bytes) -> str:
        """The checkpoint as one line of the witness, newline included."""
        return (
            json.dumps(
                {
                    "seq": self.seq,
                    "hash": self.hash.hex(),
                    "time": self.time.astimezone(UTC).strftime(_TIME_FORMAT),
                    "key_id": self.key_id,
                    "signature": self.signature(seal_key).hex(),
                },
                separators=(",", ":"),
            )
            + "\n"
        )


def append(path: Path, checkpoint: Checkpoint, seal_key: bytes) -> None:
    """Append ``checkpoint`` to the witness at ``path`` and sync it to disk before returning.

    The file is created readable by its owner only. A failure to write is a configuration error: the
    seal it would witness is not written either.
    """
    data = checkpoint.line(seal_key).encode()
    try:
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)  # one write of one short line: appends never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's directory entry must survive a crash too
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except OSError as exc:
        raise ConfigError([f"APPTGATE_LEDGER_WITNESS: cannot append to {path}: {exc.strerror}"]) from exc


@dataclass
class Reading:
    """The witness as read: its valid checkpoints, and what is wrong with the rest."""

    checkpoints: list[Checkpoint]
    problems: list[str]


def read(path: Path, seal_key: bytes) -> Reading:
    """Read and authenticate every line of the witness (no file: no checkpoint yet)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Reading([], [])
    except OSError as exc:
        raise ConfigError([f"APPTGATE_LEDGER_WITNESS: cannot read {path}: {exc.strerror}"]) from exc
    ours = key_id(seal_key)
    reading = Reading([], [])
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            fields = json.loads(raw)
            checkpoint = Checkpoint(
                seq=_positive(fields["seq"]),
                hash=bytes.fromhex(fields["hash"]),
                time=datetime.strptime(fields["time"], _TIME_FORMAT).replace(tzinfo=UTC),
                key_id=str(fields["key_id"]),
            )
            signature = bytes.fromhex(fields["signature"])
        except (ValueError, KeyError, TypeError):
            reading.problems.append(f"witness line {number} is not a checkpoint")
            continue
        if checkpoint.key_id != ours:
            reading.problems.append(f"witness line {number} is signed by another key ({checkpoint.key_id})")
        elif not hmac.compare_digest(signature, checkpoint.signature(seal_key)):
            reading.problems.append(f"witness line {number} has a bad signature")
        elif reading.checkpoints and checkpoint.seq < reading.checkpoints[-1].seq:
            reading.problems.append(f"witness line {number} goes back to record {checkpoint.seq}")
        else:
            reading.checkpoints.append(checkpoint)
    return reading


def _positive(value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError("not a position")
    return value


async def check(conn: Connection, checkpoints: Sequence[Checkpoint], head_seq: int) -> list[str]:
    """What the database holds against what the witness vouches for; one line per problem."""
    if not checkpoints:
        return []
    problems = []
    last = checkpoints[-1]
    if head_seq < last.seq:
        problems.append(
            f"the ledger was rolled back: the witness vouches for {last.seq} records "
            f"(sealed {last.time.strftime(_TIME_FORMAT)}), the database chains {head_seq}"
        )
    hashes = await chain.hashes_at(conn, sorted({c.seq for c in checkpoints}))
    for checkpoint in checkpoints:
        found = hashes.get(checkpoint.seq)
        if found is not None and found != checkpoint.hash:
            problems.append(
                f"the chain up to record {checkpoint.seq} is not the one the witness vouches for "
                "(records before it were altered, removed or reordered)"
            )
        elif found is None and checkpoint.seq <= head_seq:
            problems.append(f"record {checkpoint.seq}, which the witness vouches for, is missing from the chain")
    return problems
