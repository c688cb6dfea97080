"""Benchmark data: appointment worlds of 100k/1M/10M appointments and a 10M-record disclosure ledger.

Everything is loaded with PostgreSQL COPY (asyncpg ``copy_records_to_table``)
into dedicated databases that this module creates and drops:

* ``apptgate_bench_<size>`` (``apptgate_bench_100k``, ``_1m``, ``_10m``): a
  migrated schema holding practitioners, patients, appointments, partners,
  keys, grants and consents. Contact details and visit reasons are **sealed**
  exactly as the service stores them (``service.sealing.seal_patient_contact``
  and ``seal_reason`` under a data key derived from the world's seed,
  :func:`bench_data_key`; the plaintext columns stay NULL), so the gateway
  under test, started with that key, pays for decryption as in production.
* ``apptgate_bench_<size>_nodefense``: the same world (same seed, so the same
  ids, rows and order) with encryption at rest off: contact values and reasons
  in the plaintext columns (nothing sealed). That is its only difference: the
  schema, the partner role and its functions are as migrated in both (there is
  no row-level security to turn off since migration 0007 gave the role no table
  privilege). Served by the ``gateway-nodefense`` variant and by the naive
  baseline (which reads contact columns in clear). The shape does not change with the size, only the
  history does: 2,000 practitioners with 20 appointments a day each
  (40,000 a day), from the anchor day onwards, so 100k appointments cover 2.5
  days and 10M cover 250 days. The benchmark queries the anchor day, whose
  answer is the same at every size: what grows is the table, which is what
  "p50 at 10M vs 100k" measures.
* ``apptgate_bench_ledger``: a migrated schema whose ``disclosures`` hold a
  valid hash chain of records, one per call as the service writes them
  (migration 0005), disclosing N appointments in all (default 10M, ~282k
  records) over 30 days and 1,000 partners (Zipf-weighted, so the busiest
  partner has ~13% of the calls): ListAppointments pages of 50 basic items
  (half of them, by default, a page the partner listed earlier the same day,
  recorded by reference as the gateway does), single
  GetAppointment items, contact disclosures with consent ids, and refused
  attempts. Digests are computed in Python exactly as
  ``disclosure_digest`` (migration 0005) does, checked against the SQL
  function on a sample, and ``python -m service audit verify``
  passes on the result (``--verify`` runs it). Then the patients,
  appointments, practitioners and consents the records name, which a
  patient's history joins (:func:`ensure_ledger_scheduling`).

A database is reused when its ``bench_meta`` row matches the requested
parameters (``--regen`` drops and rebuilds it). Usage::

    .venv/bin/python bench/datagen.py world --size 100k
    .venv/bin/python bench/datagen.py world --size 10m
    .venv/bin/python bench/datagen.py world --size 100k --nodefense
    .venv/bin/python bench/datagen.py ledger --items 10m [--verify]
    .venv/bin/python bench/datagen.py drop --all
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Progress, admin_dsn, parse_size, service_env, size_label, source, source_migrations, with_database

# Bumped when what a world holds changes (8: the ledger digest's canonical encoding; 9: patients' sex sealed in
# sealed_sex, its clear column NULL, as the service now stores it; 10: the digest covers the client certificate).
GENERATOR_VERSION = 10
ANCHOR = datetime(2030, 1, 7, tzinfo=UTC)  # a Monday; the benchmark queries this day
LEDGER_START = datetime(2030, 2, 1, tzinfo=UTC)
CHUNK = 50_000
SPECIALTIES = [
    "general practice", "dermatology", "cardiology", "pediatrics", "gynecology", "ophthalmology",
    "dentistry", "psychiatry", "radiology", "physiotherapy", "ENT", "orthopedics",
]  # fmt: skip
GIVEN = ["Camille", "Louis", "Emma", "Jules", "Lea", "Hugo", "Chloe", "Lucas", "Manon", "Nathan", "Ines", "Adam"]
FAMILY = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau"]
REASONS = ["", "follow-up", "first visit", "vaccination", "annual check", "prescription renewal"]


@dataclass(frozen=True)
class WorldSpec:
    """The parameters of one appointment world (stored in ``bench_meta``)."""

    appointments: int
    practitioners: int = 2_000
    patients: int = 0  # 0: appointments / 5, at least 20,000
    partners: int = 1_000
    grants_per_partner: int = 20
    per_day: int = 20
    consents: int = 0  # 0: patients / 10
    seed: int = 8
    version: int = GENERATOR_VERSION
    # True: values sealed, as the internal API stores them. False: values in clear (the schema is the same).
    defended: bool = True

    def resolved(self) -> WorldSpec:
        patients = self.patients or max(20_000, self.appointments // 5)
        consents = self.consents or patients // 10
        return WorldSpec(
            self.appointments, self.practitioners, patients, self.partners, self.grants_per_partner,
            self.per_day, consents, self.seed, self.version, self.defended,
        )  # fmt: skip


def world_db_name(appointments: int, *, defended: bool = True) -> str:
    return f"apptgate_bench_{size_label(appointments)}" + ("" if defended else "_nodefense")


def bench_data_key(seed: int) -> str:
    """The data key (``APPTGATE_DATA_KEY`` text, key id 1) a world is sealed under, derived from its seed.

    Synthetic data, so a derived key is fine: a world can be reused, and the
    gateway started on it later, without storing the key anywhere.
    """
    key = hashlib.sha256(f"apptgate-bench-data-key|{seed}".encode()).digest()
    return f"1:{base64.b64encode(key).decode()}"


LEDGER_DB = "apptgate_bench_ledger"


# --------------------------------------------------------------------------- database plumbing


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(admin_dsn())


async def database_exists(name: str) -> bool:
    conn = await _admin()
    try:
        return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name))
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _wait_until_unused(conn: asyncpg.Connection, name: str, patience: float = 600.0) -> None:
    """Wait while other sessions use ``name`` (another benchmark run on this shared machine), then go on."""
    deadline = time.monotonic() + patience
    while True:
        users = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
        )
        if not users:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: still used by {users} session(s) after {patience:.0f}s; not dropping it")
        print(f"{name}: {users} session(s) still use it (another run?): waiting before rebuilding it",
              file=sys.stderr, flush=True)  # fmt: skip
        await asyncio.sleep(10)


async def create_database(name: str) -> None:
    conn = await _admin()
    try:
        await _wait_until_unused(conn, name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def migrate(dsn: str) -> None:
    """Apply the service's migrations with its own command (so schema changes land here too)."""
    env = service_env({**os.environ, "DATABASE_URL": dsn, "APPTGATE_LOG_LEVEL": "WARNING"})
    subprocess.run([sys.executable, "-m", "service", "migrate"], cwd=source(), env=env, check=True)


async def read_meta(dsn: str) -> dict[str, Any] | None:
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        return None
    try:
        exists = await conn.fetchval("SELECT to_regclass('public.bench_meta') IS NOT NULL")
        if not exists:
            return None
        raw = await conn.fetchval("SELECT value FROM bench_meta WHERE key = 'meta'")
        if not raw:
            return None
        meta: dict[str, Any] = json.loads(raw)
        applied = {r[0]: r[1] for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}
        # A database migrated by another tree than the one we run (a newer migration, or one whose
        # text differs) holds a schema this code does not expect: rebuild it rather than measure a mix.
        ours = source_migrations()
        foreign = sorted(v for v, checksum in applied.items() if ours.get(v) != checksum)
        if foreign:
            print(f"{meta.get('database')}: has migrations {foreign} this source tree lacks or differs on: "
                  "rebuilding", file=sys.stderr)  # fmt: skip
            return None
        return meta
    finally:
        await conn.close()


async def _write_meta(conn: asyncpg.Connection, meta: dict[str, Any]) -> None:
    await conn.execute("CREATE TABLE IF NOT EXISTS bench_meta (key text PRIMARY KEY, value text NOT NULL)")
    await conn.execute(
        "INSERT INTO bench_meta (key, value) VALUES ('meta', $1) ON CONFLICT (key) DO UPDATE SET value = $1",
        json.dumps(meta),
    )


async def _drop_secondary_indexes(conn: asyncpg.Connection, table: str) -> list[str]:
    """Drop the indexes of ``table`` that back no constraint; return their definitions to recreate them."""
    rows = await conn.fetch(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i "
        "WHERE i.schemaname = 'public' AND i.tablename = $1 "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
        table,
    )
    for row in rows:
        await conn.execute(f'DROP INDEX "{row["indexname"]}"')
    return [row["indexdef"] for row in rows]


async def _create_indexes(conn: asyncpg.Connection, definitions: list[str]) -> None:
    for definition in definitions:
        started = time.monotonic()
        await conn.execute(definition)
        print(f"  {definition[:110]}  ({time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)


async def _copy(conn: asyncpg.Connection, table: str, columns: list[str], records: Any, total: int, label: str) -> None:
    """COPY ``records`` (an iterable of tuples) into ``table`` in chunks, with a progress bar."""
    progress = Progress(label, total)
    chunk: list[tuple[Any, ...]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= CHUNK:
            await conn.copy_records_to_table(table, records=chunk, columns=columns)
            progress.advance(len(chunk))
            chunk = []
    if chunk:
        await conn.copy_records_to_table(table, records=chunk, columns=columns)
        progress.advance(len(chunk))
    progress.close()


def _uuids(rng: random.Random, n: int) -> list[str]:
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


# --------------------------------------------------------------------------- appointment worlds


async def generate_world(spec: WorldSpec, *, regen: bool = False) -> dict[str, Any]:
    """Create (or reuse) the world database for ``spec``; return its meta (ids the benchmark needs)."""
    spec = spec.resolved()
    name = world_db_name(spec.appointments, defended=spec.defended)
    dsn = with_database(admin_dsn(), name)
    if not regen:
        meta = await read_meta(dsn)
        if meta is not None and meta.get("spec") == asdict(spec):
            print(f"{name}: reusing ({spec.appointments:,} appointments)", file=sys.stderr)
            migrate(dsn)  # new migrations since generation
            return meta
    what = "sealed" if spec.defended else "in clear"
    print(f"{name}: generating {spec.appointments:,} appointments ({what})", file=sys.stderr, flush=True)
    started = time.monotonic()
    await create_database(name)
    migrate(dsn)
    from service.crypto import sealing  # the product's own sealing (pure; after migrate, as the service is on the path)

    data_keys = sealing.DataKeyring.from_text(bench_data_key(spec.seed))
    rng = random.Random(spec.seed)
    conn = await asyncpg.connect(dsn)
    try:
        # Our rows are consistent by construction: skip the FK triggers and the per-commit flush.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("SET maintenance_work_mem = '512MB'")
        now = datetime.now(UTC)

        practitioners = _uuids(rng, spec.practitioners)
        await _copy(
            conn,
            "practitioners",
            ["id", "display_name", "specialty", "create_time"],
            (
                (pid, f"Dr {rng.choice(FAMILY)} {i:05d}", SPECIALTIES[i % len(SPECIALTIES)], now)
                for i, pid in enumerate(practitioners)
            ),
            spec.practitioners,
            "practitioners",
        )

        patients = _uuids(rng, spec.patients)

        def patient_rows() -> Any:
            for i, pid in enumerate(patients):
                given, family = GIVEN[i % len(GIVEN)], f"{FAMILY[i % len(FAMILY)]}-{i:07d}"
                phone = f"+33 6 {i % 100:02d} {i // 100 % 100:02d} {i // 10_000 % 100:02d} {i // 1_000_000 % 100:02d}"
                email, sex = f"patient{i:07d}@example.test", 1 + i % 3
                if not spec.defended:
                    yield (pid, given, family, sex, phone, email, now)
                    continue
                # As the internal API stores a new patient: every value sealed for its row, plaintext NULL.
                sealed = sealing.seal_patient_contact(
                    data_keys,
                    uuid.UUID(pid),
                    given_name=given,
                    family_name=family,
                    sex=sex,
                    phone=phone,
                    email=email,
                )
                yield (pid, sealed.given_name, sealed.family_name, sealed.sex, sealed.phone, sealed.email, now)

        # The same contact columns in both worlds, in the same order: sealed, or in clear.
        contact_columns = ("given_name", "family_name", "sex", "phone", "email")
        patient_columns = ["id", *(f"sealed_{c}" if spec.defended else c for c in contact_columns), "create_time"]
        await _copy(
            conn,
            "patients",
            patient_columns,
            patient_rows(),
            spec.patients,
            "patients" + (" (sealing)" if spec.defended else ""),
        )

        deferred = await _drop_secondary_indexes(conn, "appointments")
        slots_per_day = spec.practitioners * spec.per_day
        days = math.ceil(spec.appointments / slots_per_day)
        slot_length = timedelta(minutes=24)
        day_slots = [
            [
                (
                    ANCHOR + timedelta(days=d, hours=8) + slot_length * s,
                    ANCHOR + timedelta(days=d, hours=8) + slot_length * (s + 1) - timedelta(minutes=4),
                )
                for s in range(spec.per_day)
            ]
            for d in range(days)
        ]
        created = ANCHOR - timedelta(days=30)
        n_patients = spec.patients
        randrange = rng.randrange
        first_ids: dict[str, Any] = {}

        seal_reason, defended = sealing.seal_reason, spec.defended

        def appointments() -> Any:
            count = 0
            for d in range(days):
                slots = day_slots[d]
                for p, practitioner in enumerate(practitioners):
                    for s in range(spec.per_day):
                        if count >= spec.appointments:
                            return
                        aid_uuid = uuid.UUID(int=rng.getrandbits(128), version=4)
                        aid = str(aid_uuid)
                        patient = patients[randrange(n_patients)]
                        start, end = slots[s]
                        if d == 0 and p == 0 and s == 0:
                            first_ids.update(appointment_id=aid, patient_id=patient, practitioner_id=practitioner)
                        status = "cancelled" if randrange(20) == 0 and not (d == 0 and p == 0) else "booked"
                        # The internal API seals every reason, the empty one too.
                        reason: str | bytes = REASONS[count % 6]
                        if defended:
                            reason = seal_reason(data_keys, aid_uuid, REASONS[count % 6])
                        yield (aid, practitioner, patient, start, end, reason, status, created, created)
                        count += 1

        await _copy(
            conn,
            "appointments",
            ["id", "practitioner_id", "patient_id", "start_time", "end_time",
             "sealed_reason" if spec.defended else "reason", "status", "create_time", "update_time"],
            appointments(),
            spec.appointments,
            "appointments" + (" (sealing)" if spec.defended else ""),
        )  # fmt: skip
        print("recreating appointment indexes", file=sys.stderr, flush=True)
        await _create_indexes(conn, deferred)

        partners = _uuids(rng, spec.partners)
        await _copy(
            conn,
            "partners",
            ["id", "display_name", "create_time"],
            ((pid, f"bench-partner-{i:05d}", now) for i, pid in enumerate(partners)),
            spec.partners,
            "partners",
        )

        def keys() -> Any:
            for pid in partners:
                key_id = "pk_" + base64.b32encode(rng.randbytes(10)).decode("ascii").lower()
                yield (key_id, pid, rng.randbytes(32), now)

        await _copy(
            conn, "partner_keys", ["id", "partner_id", "secret_hash", "create_time"], keys(), spec.partners, "keys"
        )

        # Partner 0 is the benchmark's caller: granted practitioners 0..grants-1 (those of first_ids among them).
        def grants() -> Any:
            for i, pid in enumerate(partners):
                chosen = (
                    range(spec.grants_per_partner)
                    if i == 0
                    else rng.sample(range(spec.practitioners), spec.grants_per_partner)
                )
                for index in chosen:
                    yield (pid, practitioners[index], now - timedelta(days=60))

        await _copy(
            conn,
            "practitioner_grants",
            ["partner_id", "practitioner_id", "grant_time"],
            grants(),
            spec.partners * spec.grants_per_partner,
            "grants",
        )

        def consents() -> Any:
            for _ in range(spec.consents):
                fields = sorted(rng.sample([1, 2, 3, 4], rng.randint(1, 4)))
                yield (
                    str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    patients[randrange(n_patients)],
                    partners[randrange(spec.partners)],
                    fields,
                    "reminders",
                    "k4.pid.bench",
                    now - timedelta(days=1),
                    now + timedelta(days=365),
                )

        await _copy(
            conn,
            "consents",
            ["id", "patient_id", "partner_id", "fields", "purpose", "signing_key_id", "create_time", "expire_time"],
            consents(),
            spec.consents,
            "consents",
        )
        await conn.execute("SET session_replication_role = DEFAULT")
        print("analyzing", file=sys.stderr, flush=True)
        await conn.execute("VACUUM (ANALYZE)")
        meta = {
            "spec": asdict(spec),
            "database": name,
            "defended": spec.defended,
            "data_key_id": data_keys.active_key_id,
            "anchor": ANCHOR.isoformat(),
            "days": days,
            "bench_partner_id": partners[0],
            "bench_practitioners": practitioners[: spec.grants_per_partner],
            "target": first_ids,
            "generated_at": datetime.now(UTC).isoformat(),
            "generation_seconds": round(time.monotonic() - started, 1),
        }
        await _write_meta(conn, meta)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await conn.close()
    print(f"{name}: done in {time.monotonic() - started:.0f}s ({size})", file=sys.stderr, flush=True)
    return meta


# --------------------------------------------------------------------------- the disclosure ledger

_RPC = "/appointments.partner.v1.PartnerAppointmentService/"
_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"
#: How long after its time the generator chains a record (the sequencer's pace).
CHAIN_LAG = timedelta(milliseconds=200)


def items_digest(requested: list[str], appointments: list[str], patients: list[str]) -> bytes:
    """``disclosure_items_digest`` (migration 0005) in Python: sha256 of the three columns' text, 0x1e and 0x1f."""
    return hashlib.sha256("\x1f".join(map("\x1e".join, (requested, appointments, patients))).encode()).digest()


def ledger_field(text: str | None) -> str:
    """``ledger_field`` (migration 0005) in Python: '-' for NULL, else the length in characters, ':' and the text."""
    return "-" if text is None else f"{len(text)}:{text}"


def array_text(values: list[Any]) -> str:
    """A one-dimensional array's PostgreSQL text form: NULL elements unquoted, quoted where needed."""

    def element(value: Any) -> str:
        if value is None:
            return "NULL"
        text = str(value)
        if text == "" or text.upper() == "NULL" or any(c in text for c in '{},"\\ \t\n\r\v\f'):
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return text

    return "{" + ",".join(map(element, values)) + "}"


def digest(prev: bytes, fields: list[str | None]) -> bytes:
    """``disclosure_digest`` (migration 0005) in Python: sha256 of the hash before, then the domain and each field."""
    return hashlib.sha256(prev + ("apptgate-ledger-v1" + "".join(map(ledger_field, fields))).encode()).digest()


@dataclass(frozen=True)
class LedgerSpec:
    items: int = 10_000_000  # appointments disclosed or refused, over all records
    partners: int = 1_000
    days: int = 30
    appointment_pool: int = 1_000_000
    patient_pool: int = 300_000
    partner_range: int = 50_000  # appointments a partner's grants cover
    zipf: float = 1.0
    repeats: float = 0.5  # share of listings that repeat the partner's last page of the day (by reference)
    seed: int = 42
    version: int = GENERATOR_VERSION


async def generate_ledger(spec: LedgerSpec, *, regen: bool = False) -> dict[str, Any]:
    """Create (or reuse) the ledger database; return its meta (busiest partner, time range)."""
    dsn = with_database(admin_dsn(), LEDGER_DB)
    if not regen:
        meta = await read_meta(dsn)
        if meta is not None and meta.get("spec") == asdict(spec):
            print(f"{LEDGER_DB}: reusing ({spec.items:,} appointments)", file=sys.stderr)
            migrate(dsn)
            return meta
    print(f"{LEDGER_DB}: generating a ledger of {spec.items:,} appointments", file=sys.stderr, flush=True)
    started = time.monotonic()
    await create_database(LEDGER_DB)
    migrate(dsn)
    rng = random.Random(spec.seed)
    partners = _uuids(rng, spec.partners)
    key_ids = ["pk_" + base64.b32encode(rng.randbytes(10)).decode("ascii").lower() for _ in partners]
    appointments = _uuids(rng, spec.appointment_pool)
    patients = _uuids(rng, spec.patient_pool)
    requested = ["apt_" + base64.b32encode(rng.randbytes(16)).decode("ascii").rstrip("=").lower()
                 for _ in range(spec.appointment_pool)]  # fmt: skip
    patient_of = [patients[(i * 7919) % spec.patient_pool] for i in range(spec.appointment_pool)]
    weights = [1 / (k + 1) ** spec.zipf for k in range(spec.partners)]
    cumulative = []
    acc = 0.0
    for w in weights:
        acc += w
        cumulative.append(acc)
    offsets = [rng.randrange(spec.appointment_pool) for _ in partners]
    span = spec.days * 86_400
    # ~35.5 appointments per call on average; spread the calls evenly over the span.
    calls = round(spec.items / 35.5)
    mean_gap = span / calls

    conn = await asyncpg.connect(dsn)
    head = (0, bytes(32))
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("SET maintenance_work_mem = '512MB'")
        now = datetime.now(UTC)
        await conn.copy_records_to_table(
            "partners",
            records=[(p, f"ledger-partner-{i:05d}", now) for i, p in enumerate(partners)],
            columns=["id", "display_name", "create_time"],
        )
        await conn.copy_records_to_table(
            "partner_keys",
            records=[(k, p, rng.randbytes(32), now) for k, p in zip(key_ids, partners, strict=True)],
            columns=["id", "partner_id", "secret_hash", "create_time"],
        )
        deferred = await _drop_secondary_indexes(conn, "disclosures")
        columns = [
            "id", "partner_id", "key_id", "view", "contact_fields", "consent_id", "rpc", "trace_id", "disclose_time",
            "outcome", "denial_reason", "requested_ids", "appointment_ids", "patient_ids", "items_of", "items_digest",
        ]  # fmt: skip
        # Written past the trigger that stamps each record's time, in one transaction whose id every record
        # takes (the column's default), so that the digests can cover it.
        await conn.execute("SET session_replication_role = replica")
        writing = conn.transaction()
        await writing.start()
        txid = str(await conn.fetchval("SELECT pg_current_xact_id()"))
        state: dict[str, Any] = {"seq": 0, "items": 0, "prev": bytes(32), "t": LEDGER_START.timestamp()}
        chain: list[tuple[int, int, bytes, datetime, bytes]] = []  # disclosure_chain: id = seq here

        def records() -> Any:
            bisect = __import__("bisect").bisect_left
            total_w = cumulative[-1]
            seq, done, prev, t = 0, 0, bytes(32), LEDGER_START.timestamp()
            last_page: dict[int, tuple[int, int, list[int], bytes]] = {}  # partner → (day, seq, indexes, digest)
            while done < spec.items:
                t += rng.expovariate(1 / mean_gap)
                when = datetime.fromtimestamp(round(t, 6), UTC)
                when_text = when.strftime(_FMT)
                k = bisect(cumulative, rng.random() * total_w)
                partner, key_id = partners[k], key_ids[k]
                trace_id = f"{rng.getrandbits(128):032x}"
                roll = rng.random()
                base = offsets[k]
                outcome, reason = 1, ""
                repeated = None  # (record id, items digest) of the page this listing repeats
                if roll < 0.70:
                    rpc, view = "ListAppointments", 1
                    earlier = last_page.get(k)
                    if earlier is not None and earlier[0] == int(t // 86_400) and rng.random() < spec.repeats:
                        _, repeated_seq, indexes, repeated_digest = earlier
                        indexes = indexes[: spec.items - done]
                        repeated = (repeated_seq, repeated_digest) if len(indexes) == len(earlier[2]) else None
                    else:
                        start = base + rng.randrange(spec.partner_range)
                        indexes = [(start + j) % spec.appointment_pool for j in range(min(50, spec.items - done))]
                elif roll < 0.99:
                    rpc, view = ("GetAppointment", 1) if roll < 0.90 else ("GetAppointmentContact", 2)
                    indexes = [(base + rng.randrange(spec.partner_range)) % spec.appointment_pool]
                    if roll >= 0.98:
                        outcome, reason = 2, "CONSENT_REVOKED"
                else:
                    rpc, view, indexes = "GetAppointment", 1, []  # a probe for an id that resolves to nothing
                    outcome, reason = 2, "NOT_FOUND"
                rpc = _RPC + rpc
                if view == 2:
                    fields = sorted(rng.sample([1, 2, 3, 4], rng.randint(1, 4))) if outcome == 1 else []
                    consent = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                else:
                    fields, consent = [], None
                if indexes:
                    requested_ids = [requested[i] for i in indexes]
                    appointment_ids: list[str | None] = [appointments[i] for i in indexes]
                    patient_ids: list[str | None] = [patient_of[i] for i in indexes]
                else:
                    requested_ids = ["apt_" + base64.b32encode(rng.randbytes(16)).decode("ascii").rstrip("=").lower()]
                    appointment_ids, patient_ids = [None], [None]
                seq += 1
                done += len(requested_ids)
                prefix = (seq, partner, key_id, view, fields, consent, rpc, trace_id, when, outcome, reason)
                row: tuple[Any, ...]
                if repeated is not None:
                    items: tuple[str | None, ...] = (None, None, None, str(repeated[0]), repeated[1].hex())
                    row = (*prefix, None, None, None, repeated[0], repeated[1])
                else:
                    arrays = (array_text(requested_ids), array_text(appointment_ids), array_text(patient_ids))
                    items = (*arrays, None, None)
                    row = (*prefix, requested_ids, appointment_ids, patient_ids, None, None)
                    if rpc.endswith("/ListAppointments"):
                        columns_text = (
                            requested_ids, [a or "" for a in appointment_ids], [p or "" for p in patient_ids]
                        )  # fmt: skip
                        last_page[k] = (int(t // 86_400), seq, indexes, items_digest(*columns_text))
                chained = when + CHAIN_LAG
                h = digest(
                    prev,
                    [
                        str(seq), str(seq), txid, partner, key_id, str(view), array_text(fields), consent, rpc,
                        trace_id, "", when_text, str(outcome), reason, *items, chained.strftime(_FMT),
                    ],
                )  # fmt: skip
                yield row
                chain.append((seq, seq, prev, chained, h))
                prev = h
                state.update(seq=seq, items=done, prev=prev, t=t)

        await _copy(conn, "disclosures", columns, records(), calls, "records")
        await conn.copy_records_to_table(
            "disclosure_chain", records=chain, columns=["id", "seq", "prev_hash", "chain_time", "hash"]
        )
        head = (int(state["seq"]), bytes(state["prev"]))
        await conn.execute("SELECT setval('disclosures_id_seq', $1)", head[0])
        # Every record is chained: the sequencer's cursor goes after the last one (the head's guard is off).
        await conn.execute(
            "UPDATE ledger_head SET seq = $1, hash = $2, (chained_txid, chained_id) = "
            "(SELECT txid, id FROM disclosures ORDER BY txid DESC, id DESC LIMIT 1)",
            head[0],
            head[1],
        )
        await writing.commit()
        await conn.execute("SET session_replication_role = DEFAULT")
        print("recreating ledger indexes", file=sys.stderr, flush=True)
        await _create_indexes(conn, deferred)
        await conn.execute("VACUUM (ANALYZE) disclosures")
        # The Python digests must be the SQL function's: check a sample at both ends.
        bad = await conn.fetchval(
            "SELECT count(*) FROM disclosure_chain c JOIN disclosures d ON d.id = c.id "
            "WHERE (c.seq <= 2000 OR c.seq > $1 - 2000) "
            "AND disclosure_digest(d, c.seq, c.prev_hash, c.chain_time) IS DISTINCT FROM c.hash",
            head[0],
        )
        if bad:
            raise SystemExit(f"ledger generator: {bad} digests differ from disclosure_digest()")
        # And a reference's items digest must be disclosure_items_digest() of the record it names.
        bad = await conn.fetchval(
            "SELECT count(*) FROM (SELECT * FROM disclosures WHERE items_of IS NOT NULL LIMIT 2000) r "
            "JOIN disclosures o ON o.id = r.items_of "
            "WHERE disclosure_items_digest(o) IS DISTINCT FROM r.items_digest"
        )
        if bad:
            raise SystemExit(f"ledger generator: {bad} items digests differ from disclosure_items_digest()")
        busiest = await conn.fetchrow(
            "SELECT partner_id, count(*) AS n FROM disclosures WHERE id <= 500000 GROUP BY 1 ORDER BY 2 DESC LIMIT 1"
        )
        first, last = await conn.fetchrow("SELECT min(disclose_time), max(disclose_time) FROM disclosures")
        meta = {
            "spec": asdict(spec),
            "database": LEDGER_DB,
            "head_seq": head[0],
            "items": state["items"],
            "busiest_partner_id": str(busiest["partner_id"]),
            "first_time": first.isoformat(),
            "last_time": last.isoformat(),
            "generated_at": datetime.now(UTC).isoformat(),
            "generation_seconds": round(time.monotonic() - started, 1),
        }
        await _write_meta(conn, meta)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await conn.close()
    print(f"{LEDGER_DB}: done in {time.monotonic() - started:.0f}s ({size}), head at {head[0]:,}", file=sys.stderr)
    await ensure_ledger_scheduling(dsn)
    return meta


async def ensure_ledger_scheduling(dsn: str) -> dict[str, Any]:
    """Give the ledger database the rows a patient's history joins, derived from the ledger itself; once.

    ``ListPatientDisclosures`` (``service.store.privacy``) checks the patient
    exists and names each entry's partner, appointment, practitioner and
    consent purpose. The ledger's records name 300,000 patients, ~1,000,000
    appointments and one consent per contact record: this adds those patients
    (ids only, nothing sealed), 2,000 practitioners, every appointment named
    (its patient as recorded; a practitioner and a 15-minute slot in the 60
    days from the ledger's first day, both derived from its id) and every
    consent named (its record's first patient and partner, the fields
    released, expired and announced, so the gateway's expiry sweep has nothing
    to do). Written past the triggers (``session_replication_role = replica``:
    no change-feed or privacy events), then analysed. Recorded in
    ``bench_meta`` under ``scheduling``; a ledger built before this existed gets
    them on first use (~15 s).
    """
    conn = await asyncpg.connect(dsn)
    try:
        raw = await conn.fetchval("SELECT value FROM bench_meta WHERE key = 'scheduling'")
        if raw:
            done: dict[str, Any] = json.loads(raw)
            return done
        started = time.monotonic()
        print(f"{LEDGER_DB}: adding the patients, appointments, practitioners and consents the ledger names",
              file=sys.stderr, flush=True)  # fmt: skip
        announced = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'consents' "
            "AND column_name = 'expire_announced')"
        )
        rng = random.Random(43)
        practitioners = [
            (uuid.UUID(int=rng.getrandbits(128), version=4), f"Dr {rng.choice(FAMILY)} {i:05d}",
             SPECIALTIES[i % len(SPECIALTIES)])
            for i in range(2_000)
        ]  # fmt: skip
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.copy_records_to_table(
                "practitioners", records=practitioners, columns=["id", "display_name", "specialty"]
            )
            patients = await conn.execute(
                "INSERT INTO patients (id) SELECT DISTINCT p FROM disclosures CROSS JOIN LATERAL unnest(patient_ids) p "
                "WHERE patient_ids IS NOT NULL AND p IS NOT NULL"
            )
            appointments = await conn.execute(
                """
                WITH named AS (
                    SELECT DISTINCT ON (u.a) u.a, u.p
                    FROM disclosures d CROSS JOIN LATERAL unnest(d.appointment_ids, d.patient_ids) AS u(a, p)
                    WHERE d.appointment_ids IS NOT NULL AND u.a IS NOT NULL
                    ORDER BY u.a
                ), doctors AS (SELECT array_agg(id ORDER BY id) AS ids FROM practitioners)
                INSERT INTO appointments (id, practitioner_id, patient_id, start_time, end_time)
                SELECT n.a, doctors.ids[1 + h.h % cardinality(doctors.ids)], n.p,
                       $1::timestamptz + (h.h / 2000 % 5760) * interval '15 min',
                       $1::timestamptz + (h.h / 2000 % 5760 + 1) * interval '15 min'
                FROM named n CROSS JOIN doctors CROSS JOIN LATERAL (SELECT abs(hashtext(n.a::text)::bigint) AS h) h
                """,
                LEDGER_START,
            )
            consents = await conn.execute(
                f"""
                INSERT INTO consents (id, patient_id, partner_id, fields, purpose, signing_key_id, create_time,
                                      expire_time{", expire_announced" if announced else ""})
                SELECT DISTINCT ON (d.consent_id) d.consent_id, d.patient_ids[1], d.partner_id,
                       CASE WHEN d.contact_fields = '{{}}' THEN '{{1,2,3,4}}'::smallint[] ELSE d.contact_fields END,
                       'appointment reminders', 'k4.pid.bench', d.disclose_time - interval '1 day',
                       d.disclose_time + interval '1 day'{", true" if announced else ""}
                FROM disclosures d
                WHERE d.consent_id IS NOT NULL AND d.patient_ids[1] IS NOT NULL
                ORDER BY d.consent_id, d.id
                """
            )
        for table in ("practitioners", "patients", "appointments", "consents"):
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        done = {
            "practitioners": len(practitioners),
            "patients": int(patients.split()[-1]),
            "appointments": int(appointments.split()[-1]),
            "consents": int(consents.split()[-1]),
            "seconds": round(time.monotonic() - started, 1),
        }
        await conn.execute("INSERT INTO bench_meta (key, value) VALUES ('scheduling', $1)", json.dumps(done))
    finally:
        await conn.close()
    print(f"{LEDGER_DB}: {done}", file=sys.stderr, flush=True)
    return done


def verify_ledger() -> int:
    """Run ``python -m service audit verify --no-seal`` on the ledger database; return its exit code."""
    env = {**os.environ, "DATABASE_URL": with_database(admin_dsn(), LEDGER_DB)}
    env.setdefault("APPTGATE_SERVER_SECRET", base64.urlsafe_b64encode(b"bench-ledger-seal-key-0123456789").decode())
    started = time.monotonic()
    code = subprocess.run(
        [sys.executable, "-m", "service", "audit", "verify", "--no-seal"],
        cwd=source(),
        env=service_env(env),
        check=False,
    ).returncode
    print(f"audit verify: exit {code} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    world = sub.add_parser("world", help="an appointment world")
    world.add_argument("--size", default="100k", help="appointments: 100k, 1m, 10m, … (default 100k)")
    world.add_argument("--practitioners", type=int, default=2_000)
    world.add_argument("--patients", type=int, default=0, help="default: size/5, at least 20,000")
    world.add_argument("--partners", type=int, default=1_000)
    world.add_argument("--grants-per-partner", type=int, default=20)
    world.add_argument("--regen", action="store_true", help="drop and rebuild even when it exists")
    world.add_argument("--nodefense", action="store_true",
                       help="the world with contact values and reasons in clear, nothing sealed (apptgate_bench_<size>"
                            "_nodefense, for the gateway-nodefense variant)")  # fmt: skip
    ledger = sub.add_parser("ledger", help="the disclosure ledger")
    ledger.add_argument("--items", default="10m", help="appointments disclosed or refused in all (default 10m)")
    ledger.add_argument("--partners", type=int, default=1_000)
    ledger.add_argument("--days", type=int, default=30)
    ledger.add_argument("--regen", action="store_true")
    ledger.add_argument("--verify", action="store_true", help="then run `python -m service audit verify` (slow)")
    drop = sub.add_parser("drop", help="drop benchmark databases")
    drop.add_argument("names", nargs="*", help="sizes (100k, 1m, …: the world and its nodefense copy) or 'ledger'")
    drop.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "world":
        spec = WorldSpec(
            parse_size(args.size),
            practitioners=args.practitioners,
            patients=args.patients,
            partners=args.partners,
            grants_per_partner=args.grants_per_partner,
            defended=not args.nodefense,
        )
        meta = asyncio.run(generate_world(spec, regen=args.regen))
        print(json.dumps({k: meta[k] for k in ("database", "days", "generation_seconds")}))
        return 0
    if args.command == "ledger":
        lspec = LedgerSpec(parse_size(args.items), partners=args.partners, days=args.days)
        meta = asyncio.run(generate_ledger(lspec, regen=args.regen))
        print(json.dumps({k: meta[k] for k in ("database", "head_seq", "items", "busiest_partner_id",
                                               "generation_seconds")}))  # fmt: skip
        return verify_ledger() if args.verify else 0
    names = []
    if args.all:
        conn_names = asyncio.run(_bench_databases())
        names = conn_names
    else:
        for n in args.names:  # a size names its world and its nodefense copy
            if n == "ledger":
                names.append(LEDGER_DB)
            else:
                names += [world_db_name(parse_size(n)), world_db_name(parse_size(n), defended=False)]
    for name in names:
        asyncio.run(drop_database(name))
        print(f"dropped {name}", file=sys.stderr)
    return 0


async def _bench_databases() -> list[str]:
    conn = await _admin()
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'apptgate\\_bench\\_%'")
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


if __name__ == "__main__":
    raise SystemExit(main())
