"""What-if experiments: the gateway with in-process patches, to measure a change before making it.

Not a fix and not a variant to ship: it runs ``python -m service serve`` with
monkeypatches, so that the gain a recommendation in docs/performance.md could
bring at most is measured rather than guessed, before anyone edits service/.
Choose patches with ``APPTGATE_WHATIF`` (comma-separated; default
``norecord``):

* ``norecord``: a basic view's ledger record (``DisclosureRecorder.record``)
  answers "ok" at once; nothing is charged or recorded. No product can do
  without the record: this is the bound on what any cheaper record of
  ``ListAppointments`` and ``GetAppointment`` could gain (docs/performance.md,
  "the listing's gap is its record").
* ``nostatement``: the recorder keeps all its machinery (announcing calls,
  gathering, groups, the writer task, futures) but its group statement is
  replaced by a 0.3 ms sleep: what the grouping costs without its statement.
* ``gather``: groups of basic records wait up to ``WHATIF_GATHER`` seconds
  (default 0.02) for the calls underway when they form, instead of
  ``service.recorder.GATHER``: whether longer (or no) gathering pays.
* ``hold``: a group of basic records (and of contact views) holding fewer than
  ``WHATIF_HOLD_CALLS`` calls (default 8) waits ``WHATIF_HOLD`` seconds
  (default 0.002) more before it is written, whoever is underway: whether
  larger groups, bought with latency, pay at a given concurrency.
* ``groupstats``: nothing changed; at exit, the server logs how many calls
  each group of basic records held and how many calls were underway (announced,
  not yet submitted) when it formed.
* ``recordinread``: a listing's record and charge written by its read
  statement (``whatif_list_and_record``), no group statement for listings:
  what doing both in one statement costs in its simplest form
  (docs/performance.md).
* ``cold``: the listing's memos of built views (``service.views.BasicPages``)
  and of derived pseudonyms kept nothing: what building a page never listed
  before costs (the bench lists one page again and again, so every view is
  remembered; its ledger record is still a reference to the first).
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

The patches of the earlier recommendations (``ledger``, ``reset``, ``ids``)
are gone: each recommendation is in service/ now (migrations 0011–0018, the
pool resets, ``service/pseudonyms.py``).

    APPTGATE_WHATIF=norecord python bench/whatif.py serve   # env as for `python -m service serve`
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

#: Seconds the ``nostatement`` patch waits in place of a group statement (about its round trip here).
STATEMENT_STANDIN = 0.0003


async def _recorded_at_once(self: Any, entry: Any, items: Any, terms: Any, expected: Any = None) -> str:
    """``DisclosureRecorder.record`` answering "ok" at once (the call still counts as arrived for the groups)."""
    if expected is not None:
        expected.arrived()
    return "ok"


def patch_norecord() -> None:
    """Basic-view records answered "ok" at once (the call still counts as arrived for the groups)."""
    from service import recorder

    recorder.DisclosureRecorder.record = _recorded_at_once  # type: ignore[method-assign]


def patch_nostatement() -> None:
    """The recorder's group statement for basic views replaced by a sleep of :data:`STATEMENT_STANDIN`."""
    import asyncio

    from service import recorder

    async def record_basic(self: Any, conn: Any, requests: list[Any], terms: Any) -> list[str]:
        await asyncio.sleep(STATEMENT_STANDIN)
        return ["ok"] * len(requests)

    recorder.DisclosureRecorder._record_basic = record_basic  # type: ignore[method-assign]


def patch_gather() -> None:
    """Groups of basic records wait longer for the calls underway (``WHATIF_GATHER`` seconds)."""
    from service import recorder

    recorder.GATHER = float(os.environ.get("WHATIF_GATHER", "0.02"))


def patch_hold() -> None:
    """Groups of basic records smaller than ``WHATIF_HOLD_CALLS`` wait ``WHATIF_HOLD`` seconds for more calls."""
    import asyncio

    from service import recorder

    seconds = float(os.environ.get("WHATIF_HOLD", "0.002"))
    calls = int(os.environ.get("WHATIF_HOLD_CALLS", "8"))
    gather = recorder._Groups._gather

    async def held(self: Any) -> None:
        await gather(self)
        if len(self._queue) < calls:
            await asyncio.sleep(seconds)

    recorder._Groups._gather = held  # type: ignore[method-assign]


def patch_groupstats() -> None:
    """Log, at exit, how many calls each basic group held and how many were underway when it formed."""
    import atexit
    import collections

    from service import recorder

    sizes: collections.Counter[int] = collections.Counter()
    underway: collections.Counter[int] = collections.Counter()
    original = recorder._Groups._next_group

    async def next_group(self: Any) -> Any:
        before = self.underway
        group = await original(self)
        if self._write_group.__name__ == "_record_basic":
            sizes[len(group)] += 1
            underway[before] += 1
        return group

    def report() -> None:
        print(f"whatif groupstats: sizes {sorted(sizes.items())}", file=sys.stderr, flush=True)
        print(f"whatif groupstats: underway {sorted(underway.items())}", file=sys.stderr, flush=True)

    recorder._Groups._next_group = next_group  # type: ignore[method-assign]
    atexit.register(report)


#: The read statement that also records (``recordinread``): created in the world on first use.
_RECORD_IN_READ = """
CREATE OR REPLACE FUNCTION whatif_record_page(
    p_partner_id uuid, p_key_id text, p_rpc text, p_requested_ids text[], p_appointment_ids uuid[],
    p_patient_ids uuid[]
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF p_appointment_ids IS NULL THEN
        RETURN 'ok';
    END IF;
    INSERT INTO disclosures (partner_id, key_id, view, rpc, disclose_time, outcome, requested_ids,
                             appointment_ids, patient_ids)
    VALUES (p_partner_id, p_key_id, 1, p_rpc, statement_timestamp(), 1, p_requested_ids, p_appointment_ids,
            p_patient_ids);
    RETURN charge_partner_usage(p_partner_id, p_patient_ids, cardinality(p_patient_ids), 0, 1000000000,
                                1000000000, 1000.0, 1000000000000, false);
END
$$;
GRANT EXECUTE ON FUNCTION whatif_record_page(uuid, text, text, text[], uuid[], uuid[]) TO apptgate_partner;
CREATE OR REPLACE FUNCTION whatif_list_and_record(
    p_key_id text, p_partner_id uuid, p_practitioner_id uuid, p_start timestamptz, p_end timestamptz,
    p_after_time timestamptz, p_after_id uuid, p_limit integer
) RETURNS TABLE (
    id uuid, patient_id uuid, start_time timestamptz, end_time timestamptz, status text,
    update_time timestamptz, practitioner_id uuid, display_name text, specialty text
)
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH page AS MATERIALIZED (
        SELECT * FROM partner_list_appointments(p_key_id, p_partner_id, p_practitioner_id, p_start, p_end,
                                                p_after_time, p_after_id, p_limit)
    ), shown AS (
        SELECT * FROM page p ORDER BY p.start_time, p.id LIMIT p_limit - 1
    ), recorded AS (
        SELECT whatif_record_page(p_partner_id, p_key_id,
                                  '/appointments.partner.v1.PartnerAppointmentService/ListAppointments',
                                  array_agg('apt_' || replace(s.id::text, '-', '') ORDER BY s.start_time, s.id),
                                  array_agg(s.id ORDER BY s.start_time, s.id),
                                  array_agg(s.patient_id ORDER BY s.start_time, s.id)) AS outcome
        FROM shown s
    )
    SELECT p.* FROM page p CROSS JOIN recorded r ORDER BY p.start_time, p.id;
END
$$;
GRANT EXECUTE ON FUNCTION whatif_list_and_record(text, uuid, uuid, timestamptz, timestamptz, timestamptz, uuid,
    integer) TO apptgate_partner;
"""


def patch_recordinread() -> None:
    """A listing's record written by its read statement; the recorder is skipped for listings only.

    Recommendation 2's "listing and ledger insert in one statement" in its
    simplest form (docs/performance.md): the read, run as the partner role as
    always, also inserts the page's record in full (the pseudonyms stood in
    for by ids of the same length, so the record weighs the same; no
    reference) and charges all its patients, in the statement's own
    transaction, which autocommit makes durable before it returns
    (``WHATIF_READ_CHARGE=0``: without the charge, to split the two). Not a
    design: no refusal over a cap, no memo. The two functions are created in
    the world on the first listing (``whatif_*``, executable by the partner
    role).
    """
    import asyncio

    import asyncpg
    from service import recorder
    from service.store import partner_reads

    original_list = partner_reads.list_appointments
    original_record = recorder.DisclosureRecorder.record
    creating = asyncio.Lock()  # bound to the server's loop on first use (Python 3.10+)

    async def create() -> None:
        """The two functions, in the world (once), and the read statement switched to them."""
        async with creating:
            if "whatif_list_and_record(" in partner_reads._LIST:
                return
            sql = _RECORD_IN_READ
            if os.environ.get("WHATIF_READ_CHARGE", "1") == "0":  # the record alone, no charge
                sql = sql.replace("RETURN charge_partner_usage(", "RETURN 'ok'; PERFORM charge_partner_usage(")
            conn = await asyncpg.connect(os.environ["DATABASE_URL"])
            try:
                await conn.execute(sql)
            finally:
                await conn.close()
            partner_reads._LIST = partner_reads._LIST.replace("partner_list_appointments(", "whatif_list_and_record(")

    async def list_appointments(conn: Any, **kwargs: Any) -> Any:
        if "whatif_list_and_record(" not in partner_reads._LIST:
            await create()
        return await original_list(conn, **kwargs)

    async def record(self: Any, entry: Any, items: Any, terms: Any, expected: Any = None) -> str:
        if entry.rpc.endswith("/ListAppointments"):
            return await _recorded_at_once(self, entry, items, terms, expected)
        return str(await original_record(self, entry, items, terms, expected))

    partner_reads.list_appointments = list_appointments  # type: ignore[assignment]
    recorder.DisclosureRecorder.record = record  # type: ignore[method-assign]


def patch_cold() -> None:
    """The view memo and the pseudonym memo created empty and kept so (size 0: nothing remembered)."""
    from service import pseudonyms

    os.environ["APPTGATE_VIEW_MEMO"] = "0"
    assert pseudonyms.Pseudonyms.__init__.__kwdefaults__ is not None
    pseudonyms.Pseudonyms.__init__.__kwdefaults__["memo_size"] = 0


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


def main() -> int:
    chosen = [p for p in os.environ.get("APPTGATE_WHATIF", "norecord").split(",") if p]
    patches = {
        "norecord": patch_norecord,
        "nostatement": patch_nostatement,
        "nodefense": patch_nodefense,
        "gather": patch_gather,
        "groupstats": patch_groupstats,
        "recordinread": patch_recordinread,
        "cold": patch_cold,
        "hold": patch_hold,
    }
    unknown = set(chosen) - set(patches)
    if unknown:
        raise SystemExit(f"whatif: unknown patches {sorted(unknown)}")
    for name in chosen:
        patches[name]()
    print(f"whatif patches: {chosen}", file=sys.stderr, flush=True)
    from service.cli import main as service_main

    return service_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
