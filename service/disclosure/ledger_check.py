"""The ledger's verification as the incident team runs it: ``audit verify``, and the breach dossier's header.

:func:`run` chains what has committed and is not chained yet, then, in one
snapshot, recomputes every digest and link of the whole chain, checks the
seals (:func:`service.store.chain.verify`) and compares the database with the
witness file (:mod:`service.disclosure.witness`). The whole chain, not the
window alone: a record's digest covers the one before it, so a window's
records are vouched for only by the chain up to them and the seals after.
With a window, it also counts that window's records and those the sequencer
had not chained yet (which the verification cannot vouch for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from service.disclosure import breach, witness
from service.store import breaches, chain
from service.store.database import Database


@dataclass
class Checked:
    """A verification's result, the witness's checkpoints it matched, and the window's records."""

    result: chain.Verification
    checkpoints: list[witness.Checkpoint]
    verify_time: datetime
    window_records: int = 0
    window_unchained_records: int = 0

    def for_report(self) -> breach.Verification:
        """What a breach report states of it."""
        return breach.Verification(
            state=breach.VerificationState.INTACT if self.result.intact else breach.VerificationState.NOT_INTACT,
            verify_time=self.verify_time,
            records=self.result.records,
            head_seq=self.result.head_seq,
            seals_checked=self.result.seals_checked,
            witnessed_checkpoints=len(self.checkpoints),
            window_records=self.window_records,
            window_unchained_records=self.window_unchained_records,
            problems=tuple(self.result.problems),
        )


async def run(
    database: Database,
    seal_key: bytes,
    witness_path: Path,
    *,
    max_lag: timedelta = chain.MAX_CHAIN_LAG,
    progress: Callable[[int], None] | None = None,
    window: breaches.Window | None = None,
) -> Checked:
    """Chain what waits, then verify the whole chain and the witness.

    Raises ``ConfigError`` for a witness file that cannot be read.
    """
    witnessed = witness.read(witness_path, seal_key)
    async with database.transaction() as conn:  # chain what committed but is not chained yet
        await chain.chain_all(conn)
    async with database.transaction(readonly=True, snapshot=True) as conn:  # the chain and head as of one instant
        verify_time = await chain.clock(conn)
        result = await chain.verify(conn, seal_key, max_lag=max_lag, progress=progress)
        result.problems += witnessed.problems
        result.problems += await witness.check(conn, witnessed.checkpoints, result.head_seq)
        records, unchained = await breaches.window_records(conn, window) if window is not None else (0, 0)
    return Checked(result, witnessed.checkpoints, verify_time, records, unchained)
