"""What-if experiments: the gateway with the profile's top recommendations applied as patches, in-process.

Not a fix and not a variant to ship: it runs ``python -m service serve`` with
monkeypatches so the expected gain of each recommendation in
docs/performance.md is measured rather than guessed, before anyone edits
service/. Choose patches with ``APPTGATE_WHATIF`` (comma-separated; default
all):

* ``ledger``: the disclosure records go to an unchained intake table in one
  ``INSERT … SELECT FROM unnest(…)`` (durable, in the same transaction, no
  global lock); a single sequencer would chain them afterwards (not run here:
  it is off the request path). Removes the ``ledger_head`` row lock that every
  partner transaction queues on.
* ``reset``: the pool releases connections without asyncpg's reset query
  (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``): the
  partner path only uses ``SET LOCAL``, so nothing outlives a transaction.
* ``ids``: the same pseudonyms, computed cheaper: one ECB encryptor per
  partner reused for every id (instead of a new context per id), one-shot
  ``hmac.digest`` (C) and a table-driven base32 for 16 bytes (instead of
  ``base64.b32encode``, pure Python). Outputs are checked equal at start.
* ``nodefense`` (the ``gateway-nodefense`` variant of ``bench/run.py``; not
  part of the default set): encryption at rest off on the contact path.
  ``service.sealing.open_consented_contact`` — the one decryption on the
  partner path — returns the stored values as they are, and fails the call if
  a sealed value reaches it. It is meant for a ``_nodefense`` world
  (``bench/datagen.py``), whose contact values are in clear and whose tables
  have row-level security disabled: those two together are "both defenses
  off"; auth, pseudonyms, ledger and limits are the gateway's own code. The
  patch is checked at start to give what the product's function gives for
  clear values. The harness checks the answers equal the gateway's.

    APPTGATE_WHATIF=ledger,reset,ids python bench/whatif.py serve   # env as for `python -m service serve`
"""

from __future__ import annotations

import base64
import hmac
import os
import sys
import uuid
from typing import Any

INTAKE_DDL = """
CREATE TABLE IF NOT EXISTS bench_disclosure_intake (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partner_id uuid NOT NULL, key_id text NOT NULL, requested_id text NOT NULL, appointment_id uuid,
    patient_id uuid, view smallint NOT NULL, contact_fields smallint[] NOT NULL, consent_id uuid, rpc text NOT NULL,
    trace_id text NOT NULL, disclose_time timestamptz NOT NULL, outcome smallint NOT NULL, denial_reason text NOT NULL
);
GRANT INSERT ON bench_disclosure_intake TO apptgate_partner;
"""

_INTAKE = (
    "INSERT INTO bench_disclosure_intake (partner_id, key_id, rpc, trace_id, view, outcome, denial_reason, "
    "requested_id, appointment_id, patient_id, contact_fields, consent_id, disclose_time) "
    "SELECT $1, $2, $3, $4, $5, $6, $7, u.r, u.a, u.p, $11, $12, statement_timestamp() "
    "FROM unnest($8::text[], $9::uuid[], $10::uuid[]) AS u(r, a, p)"
)

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_PAIRS = [_ALPHABET[i >> 5] + _ALPHABET[i & 31] for i in range(1024)]
_SHIFTS = tuple(range(120, -1, -10))


def b32_16(raw: bytes) -> str:
    """Unpadded lower-case base32 of 16 bytes (26 characters), as ``base64.b32encode`` gives it."""
    n = int.from_bytes(raw, "big") << 2  # 128 bits → 130, a multiple of 10
    pairs = _PAIRS
    return "".join([pairs[(n >> s) & 1023] for s in _SHIFTS])


def patch_ids() -> None:
    from service import pseudonyms

    original_init = pseudonyms.PartnerPseudonyms.__init__
    slots_class = pseudonyms.PartnerPseudonyms

    class FastPseudonyms(slots_class):  # type: ignore[misc, valid-type]
        __slots__ = ("_encryptor",)

        def __init__(self, appointment_key: bytes, patient_key: bytes) -> None:
            original_init(self, appointment_key, patient_key)
            self._encryptor = self._cipher.encryptor()  # ECB: no state between blocks

        def appointment_id(self, internal_id: Any) -> str:
            return pseudonyms.APPOINTMENT_PREFIX + b32_16(self._encryptor.update(internal_id.bytes))

        def patient_ref(self, patient_id: Any) -> str:
            return pseudonyms.PATIENT_PREFIX + b32_16(hmac.digest(self._patient_key, patient_id.bytes, "sha256")[:16])

    key_a, key_p = os.urandom(32), os.urandom(32)
    slow, fast = slots_class(key_a, key_p), FastPseudonyms(key_a, key_p)
    for _ in range(200):
        u = uuid.uuid4()
        assert slow.appointment_id(u) == fast.appointment_id(u), "whatif ids: appointment ids differ"
        assert slow.patient_ref(u) == fast.patient_ref(u), "whatif ids: patient refs differ"
        raw = os.urandom(16)
        assert b32_16(raw) == base64.b32encode(raw).decode().rstrip("=").lower()
    pseudonyms.PartnerPseudonyms = FastPseudonyms  # type: ignore[misc]


def patch_ledger() -> None:
    from service.store import ledger

    async def append(conn: Any, entry: Any, items: Any) -> None:
        if not items:
            return
        await conn.execute(
            _INTAKE, entry.partner_id, entry.key_id, entry.rpc, entry.trace_id, entry.view, entry.outcome,
            entry.denial_reason, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
            list(entry.contact_fields), entry.consent_id,
        )  # fmt: skip

    ledger.append = append


def patch_reset() -> None:
    import asyncpg

    original = asyncpg.create_pool

    async def no_reset(conn: Any) -> None:
        return None

    def create_pool(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("reset", no_reset)
        return original(*args, **kwargs)

    asyncpg.create_pool = create_pool


def patch_nodefense() -> None:
    """Replace the contact path's decryption by a pass-through of clear values (patched before the service loads)."""
    import dataclasses

    from service import models, sealing

    original = sealing.open_consented_contact

    def open_consented_contact(keys: Any, patient_id: Any, stored: Any) -> Any:
        values = (stored.given_name, stored.family_name, stored.phone, stored.email)
        if any(isinstance(value, bytes | bytearray | memoryview) for value in values):
            raise sealing.SealError("whatif nodefense: a sealed value reached the contact path (not a clear world)")
        return models.ConsentedContact(
            stored.state, stored.fields, stored.given_name, stored.family_name, stored.sex, stored.phone, stored.email
        )

    # Same result as the product's function for values in clear (its not-yet-backfilled fallback).
    probe = models.StoredConsentedContact("live", (1, 2, 3, 4), "Ada", "Lovelace", 2, "+33 6 00", "ada@example.test")
    keys = sealing.DataKeyring.from_text(sealing.new_key_text(1))
    patient = uuid.uuid4()
    assert original(keys, patient, probe) == open_consented_contact(keys, patient, probe), "whatif nodefense differs"
    assert dataclasses.astuple(original(keys, patient, probe))[2:] == dataclasses.astuple(probe)[2:]
    sealing.open_consented_contact = open_consented_contact


def prepare_database(dsn: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(INTAKE_DDL)
        finally:
            await conn.close()

    asyncio.run(run())


def main() -> int:
    chosen = [p for p in os.environ.get("APPTGATE_WHATIF", "ledger,reset,ids").split(",") if p]
    unknown = set(chosen) - {"ledger", "reset", "ids", "nodefense"}
    if unknown:
        raise SystemExit(f"whatif: unknown patches {sorted(unknown)}")
    if "nodefense" in chosen:
        patch_nodefense()
    if "ledger" in chosen:
        prepare_database(os.environ["DATABASE_URL"])
        patch_ledger()
    if "reset" in chosen:
        patch_reset()
    if "ids" in chosen:
        patch_ids()
    print(f"whatif patches: {chosen}", file=sys.stderr, flush=True)
    from service.cli import main as service_main

    return service_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
