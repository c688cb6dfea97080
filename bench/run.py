"""`make bench`: the gateway against the naive handler and the bare transport, side by side, with h2load.

One run, in order:

1. Data: the appointment worlds of the requested sizes and, with ``--ledger``,
   the 10M-record disclosure ledger (``bench/datagen.py``; reused when present).
2. Per world: a fresh partner key, consent and signing key for the benchmark's
   partner, an emptied ledger, and the servers — the gateway (``python -m
   service serve``, tracing off), the gateway with tracing on (OTLP/HTTP at
   100% sampling to a local sink), the naive baseline and the bare baseline
   (``bench/baselines.py``), one process each (``--workers`` to change), and
   on request ``gateway-nodefense``: the same gateway code on the world's
   ``_nodefense`` copy (contact values and reasons in clear, nothing sealed)
   with the contact path's decryption replaced (``bench/whatif.py``
   ``nodefense``), sharing the gateway's key, consent and secrets so that its
   answers must equal the gateway's (checked at start). The naive baseline
   reads that clear copy too where one is built (it reads contact columns in
   clear). Every
   port is checked free before a server starts and, once it listens, checked to
   be held by that server alone (grpc's SO_REUSEPORT would let a stale server
   take part of the load).
3. Per scenario × concurrency × variant, interleaved so drift hits all variants
   alike (``--rounds N``: all of it N times, every other round with the
   variants in reverse order; each ratio is then the median of the rounds'
   ratios, with their range): a check call with a real gRPC client (status OK, the expected
   response size and content), an h2load warm-up, then the measured h2load run
   (gRPC over h2c: 5-byte-framed body, ``content-type: application/grpc``,
   ``te: trailers``, ``authorization``). Measured: throughput, p50/p99 from
   h2load's per-request log, CPU seconds of the server's process tree and of
   every PostgreSQL process (from /proc), the server's RSS, response bytes on
   the wire. h2load does not read grpc-status, so every run is also checked
   three ways: the check call, the DATA bytes per response (an error answer
   carries none), and the gateway's access log (every call's status code).
4. With the ledger: the breach report CLI over it (one partner, one day), then
   a patient's history (``ListPatientDisclosures``) for many patients, with its
   statement and the naive query over ``disclosure_items`` side by side
   (``bench/patient_history.py``).
5. ``bench/results/<date>.{md,json,png}`` and the ratios.

Usage: ``make bench`` (default suite, ≤ 15 min), or ``.venv/bin/python bench/run.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncpg
import grpc
from appointments.partner.v1 import appointment_pb2, contact_pb2
from appointments.partner.v1 import partner_appointment_service_pb2 as pb

import datagen
from common import (
    BENCH_DIR,
    CLK_TCK,
    ROOT,
    Machine,
    admin_dsn,
    listeners_of,
    parse_size,
    port_is_free,
    postmaster_pid,
    process_cpu_seconds,
    process_tree,
    rss_mib,
    service_env,
    set_source,
    size_label,
    source,
    tree_cpu_seconds,
    tree_system_seconds_and_switches,
    with_database,
)

PY = sys.executable
SERVICE = "/appointments.partner.v1.PartnerAppointmentService/"
INTERNAL_TOKEN = "bench-internal-token-" + "x" * 32
SCENARIOS = {"list": "ListAppointments", "get": "GetAppointment", "contact": "GetAppointmentContact"}
# Also the interleaving order within a (scenario, concurrency): gateway-nodefense right after gateway.
VARIANTS = ("gateway", "gateway-nodefense", "naive", "bare", "gateway+tracing", "gateway+whatif")
_FRAME = b"\x00"


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: flag byte 0 (not compressed), 4-byte big-endian length, bytes."""
    return _FRAME + len(message).to_bytes(4, "big") + message


# --------------------------------------------------------------------------- credentials and requests


@dataclass
class Fixture:
    """What one world's runs need: ids, credentials, request bodies and the expected answers."""

    size: int
    dsn: str
    meta: dict[str, Any]
    partner_key: str = ""
    server_secret: str = ""
    signing_key: str = ""
    consent_token: str = ""
    gateway_ids: dict[str, str] = field(default_factory=dict)
    bodies: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (variant kind, scenario) → request bytes
    data_key: str = ""  # APPTGATE_DATA_KEY of the world (bench/datagen.py derives it from the seed)
    issued: Any = None  # (partner key, consent id, its claims, signing key id): shared with the nodefense copy

    @property
    def defended(self) -> bool:
        return bool(self.meta.get("defended", True))


async def prepare_fixture(size: int, meta: dict[str, Any], like: Fixture | None = None) -> Fixture:
    """Issue a fresh key and consent for the benchmark partner; empty the ledger; build the requests.

    With ``like`` (the world's defended fixture), install the same key, consent
    and secrets instead, so that the same requests get the same answers.
    """
    from service.access import credentials
    from service.access.consent_tokens import ConsentClaims, ConsentKeyring, SigningKey
    from service.disclosure.pseudonyms import Pseudonyms

    fx = Fixture(size, with_database(admin_dsn(), meta["database"]), meta)
    datagen.migrate(fx.dsn)  # right before serving: a migration may have landed since the data was checked
    fx.data_key = datagen.bench_data_key(meta["spec"]["seed"])
    partner = uuid.UUID(meta["bench_partner_id"])
    target = uuid.UUID(meta["target"]["appointment_id"])
    patient = uuid.UUID(meta["target"]["patient_id"])
    if like is None:
        secret = os.urandom(32)
        fx.server_secret = base64.urlsafe_b64encode(secret).decode()
        signing = SigningKey.generate()
        fx.signing_key = signing.secret_paserk()
        keyring = ConsentKeyring([signing])
        now, consent_id, refs = datetime.now(UTC), uuid.uuid4(), Pseudonyms(secret).for_partner(partner)
        claims = ConsentClaims(
            refs.consent_ref(consent_id), refs.patient_ref(patient), partner, (1, 2, 3, 4), "benchmark", now,
            now + timedelta(days=2),
        )  # fmt: skip
        fx.consent_token = keyring.sign(claims)
        fx.issued = (credentials.new_partner_key(), consent_id, claims, keyring.active_key_id)
    else:
        if (like.meta["bench_partner_id"], like.meta["target"]) != (meta["bench_partner_id"], meta["target"]):
            raise SystemExit(f"{meta['database']} is not a copy of {like.meta['database']} (other ids)")
        secret = base64.urlsafe_b64decode(like.server_secret)
        fx.server_secret, fx.signing_key, fx.consent_token = like.server_secret, like.signing_key, like.consent_token
        fx.issued = like.issued
    key, consent_id, claims, signing_key_id = fx.issued
    fx.partner_key = key.secret
    now = claims.issued_at
    conn = await asyncpg.connect(fx.dsn)
    try:
        await conn.execute(
            "INSERT INTO partner_keys (id, partner_id, secret_hash) VALUES ($1, $2, $3)",
            key.key_id, partner, key.secret_hash,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO consents (id, patient_id, partner_id, fields, purpose, signing_key_id, create_time, "
            "expire_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            consent_id, patient, partner, [1, 2, 3, 4], "benchmark", signing_key_id, now,
            claims.expires_at,
        )  # fmt: skip
        # The bench database's ledger is ours: start each run from an empty chain (the
        # append-only triggers are ordinary triggers, off under session_replication_role).
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("TRUNCATE disclosures, disclosure_chain, ledger_seals")
        await conn.execute("UPDATE ledger_head SET seq = 0, hash = $1", bytes(32))
        await conn.execute("SET session_replication_role = DEFAULT")
        await conn.execute("VACUUM ANALYZE disclosures")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    ids = Pseudonyms(secret).for_partner(partner)
    fx.gateway_ids = {"appointment": ids.appointment_id(target), "patient_ref": ids.patient_ref(patient)}
    anchor = datetime.fromisoformat(meta["anchor"])
    listing = pb.ListAppointmentsRequest(page_size=50)
    listing.start_time.FromDatetime(anchor)
    listing.end_time.FromDatetime(anchor + timedelta(days=1))
    for kind in ("gateway", "naive"):
        appointment_id = fx.gateway_ids["appointment"] if kind == "gateway" else str(target)
        fx.bodies[(kind, "list")] = listing.SerializeToString()
        fx.bodies[(kind, "get")] = pb.GetAppointmentRequest(appointment_id=appointment_id).SerializeToString()
        fx.bodies[(kind, "contact")] = pb.GetAppointmentContactRequest(
            appointment_id=appointment_id, consent_token=fx.consent_token if kind == "gateway" else ""
        ).SerializeToString()
    for scenario in SCENARIOS:
        fx.bodies[("bare", scenario)] = fx.bodies[("gateway", scenario)]
    return fx


def check_answer(scenario: str, kind: str, data: bytes, fx: Fixture) -> None:
    """Assert the answer is the one the benchmark means to measure (not an empty or error-shaped success)."""
    if scenario == "list":
        message = pb.ListAppointmentsResponse.FromString(data)
        assert len(message.appointments) == 50, f"{kind}: {len(message.appointments)} appointments, expected 50"
        assert message.next_page_token, f"{kind}: no next_page_token"
        assert all(a.start_time.seconds for a in message.appointments)
    elif scenario == "get":
        appointment = appointment_pb2.Appointment.FromString(data)
        expected = fx.gateway_ids["appointment"] if kind != "naive" else fx.meta["target"]["appointment_id"]
        assert appointment.appointment_id == expected, f"{kind}: wrong appointment"
        assert appointment.practitioner.display_name, f"{kind}: no practitioner"
    else:
        contact = contact_pb2.AppointmentContact.FromString(data)
        assert contact.patient.HasField("email") and contact.patient.HasField("phone"), f"{kind}: no contact fields"
        assert contact.patient.HasField("given_name"), f"{kind}: no name"
        assert not contact.withheld_fields, f"{kind}: fields withheld"


def check_same_answers(reference: Server, ref_fx: Fixture, other: Server, other_fx: Fixture) -> None:
    """``other`` (a gateway on another copy of the world) must answer exactly what ``reference`` answers.

    Byte for byte, but for the page token, which is AES-GCM under a random
    nonce (never twice the same): its length must match, and the next page
    fetched with the reference's token must be the same on both.
    """
    for scenario in SCENARIOS:
        ours = grpc_call(reference.port, scenario, ref_fx.bodies[("gateway", scenario)], reference.metadata)
        theirs = grpc_call(other.port, scenario, other_fx.bodies[("gateway", scenario)], other.metadata)
        if scenario != "list":
            same = ours == theirs
        else:
            a, b = pb.ListAppointmentsResponse.FromString(ours), pb.ListAppointmentsResponse.FromString(theirs)
            same = list(a.appointments) == list(b.appointments) and len(a.next_page_token) == len(b.next_page_token)
            following = pb.ListAppointmentsRequest.FromString(ref_fx.bodies[("gateway", "list")])
            following.page_token = a.next_page_token
            body = following.SerializeToString()
            second = [
                pb.ListAppointmentsResponse.FromString(grpc_call(server.port, "list", body, server.metadata))
                for server in (reference, other)
            ]
            same = same and len(second[0].appointments) == 50 and second[0].appointments == second[1].appointments
        if not same:
            raise SystemExit(f"{other.variant} answers {SCENARIOS[scenario]} differently from {reference.variant}")
    log(f"  {other.variant}: the same answers as {reference.variant} (list, its next page, get, contact)")


def grpc_call(port: int, scenario: str, body: bytes, metadata: list[tuple[str, str]], timeout: float = 10) -> bytes:
    """One call with a real gRPC client; returns the raw response bytes. Raises grpc.RpcError on a non-OK status."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary(SERVICE + SCENARIOS[scenario])  # no (de)serializers: bytes in, bytes out
        response: bytes = method(body, metadata=metadata, timeout=timeout)
        return response


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    variant: str
    port: int
    procs: list[subprocess.Popen[bytes]]
    log_path: Path
    metadata: list[tuple[str, str]]
    kind: str  # gateway | naive | bare (which request bodies it takes)
    log_offset: int = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(pid) for pid in self.pids)

    def system_seconds_and_switches(self) -> tuple[float, int]:
        values = [tree_system_seconds_and_switches(pid) for pid in self.pids]
        return sum(v[0] for v in values), sum(v[1] for v in values)

    def rss(self) -> tuple[float, float]:
        values = [rss_mib(pid) for root in self.pids for pid in process_tree(root)]
        return max((v[0] for v in values), default=0.0), max((v[1] for v in values), default=0.0)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ensure_port_free(port: int) -> None:
    if not port_is_free(port):
        holders = listeners_of(port)
        raise SystemExit(f"port {port} is in use (pids {sorted(holders) or '?'}): stop the stale server first")


def wait_listening(server: Server, scenario_check: Any, timeout: float = 60) -> None:
    """Wait until the server answers, then check the port is held by its processes only."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise SystemExit(f"{server.variant} exited while starting; see {server.log_path}:\n"
                             + server.log_path.read_text()[-3000:])  # fmt: skip
        try:
            scenario_check()
            break
        except (grpc.RpcError, AssertionError) as exc:
            last = exc
            time.sleep(0.3)
    else:
        raise SystemExit(f"{server.variant} did not answer in {timeout}s: {last}")
    ours = {pid for root in server.pids for pid in process_tree(root)}
    holders = listeners_of(server.port)
    if holders and not holders <= ours:
        raise SystemExit(f"port {server.port} is shared with pids {sorted(holders - ours)}: a stale server?")


def gateway_env(
    fx: Fixture, port: int, workdir: Path, *, tracing: bool, sink_port: int, workers: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APPTGATE_"))}
    env.update(
        DATABASE_URL=fx.dsn,
        APPTGATE_INTERNAL_TOKEN=INTERNAL_TOKEN,
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{port}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{port + 1}",
        APPTGATE_DATA_DIR=str(workdir / f"data-{port}"),
        APPTGATE_SERVER_SECRET=fx.server_secret,
        APPTGATE_SIGNING_KEY=fx.signing_key,
        # The key the world's contact values and reasons are sealed under (every gateway variant gets it).
        APPTGATE_DATA_KEY=fx.data_key,
        APPTGATE_WORKERS=str(workers),
        # Passed on explicitly (every other APPTGATE_ variable of the harness is dropped above).
        APPTGATE_EVENT_LOOP=gateway_loop(),
        OTEL_METRICS_EXPORTER="none",
        OTEL_TRACES_EXPORTER="none",
        # Per-partner limits (issue 6) stay on and are evaluated on every call, but set so that the
        # benchmark partner's load does not trip them (older commits ignore these variables).
        APPTGATE_PARTNER_RPS="1000000",
        APPTGATE_PARTNER_BURST="1000000",
        APPTGATE_CONTACT_DAILY_CAP="1000000000",
        APPTGATE_PATIENT_DAILY_CAP="1000000000",
        APPTGATE_ANOMALY_SUSPEND="false",
    )
    if tracing:
        env.update(
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{sink_port}/v1/traces",
            OTEL_TRACES_SAMPLER="always_on",
        )
    return env


def start_gateway(fx: Fixture, variant: str, port: int, workdir: Path, args: argparse.Namespace,
                  extra_env: dict[str, str] | None = None) -> Server:  # fmt: skip
    """Start ``python -m service serve`` on ``port`` (its internal listener on ``port + 1``); ``extra_env`` added."""
    for p in (port, port + 1):
        ensure_port_free(p)
    log_path = workdir / f"{variant}-{size_label(fx.size)}.log"
    env = gateway_env(fx, port, workdir, tracing=variant.endswith("tracing"), sink_port=args.port_base + 90,
                      workers=args.workers)  # fmt: skip
    env.update(extra_env or {})
    command = [PY, "-m", "service", "serve"]
    if variant.endswith("whatif"):  # a change measured before it is made (bench/whatif.py)
        command = [PY, str(BENCH_DIR / "whatif.py"), "serve"]
        env["APPTGATE_WHATIF"] = args.whatif
    elif variant == "gateway-nodefense":  # no decryption, on the world's copy in clear (nothing sealed)
        if fx.defended:
            raise SystemExit("gateway-nodefense must run on a _nodefense world")
        command = [PY, str(BENCH_DIR / "whatif.py"), "serve"]
        env["APPTGATE_WHATIF"] = "nodefense"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(command, cwd=source(), env=service_env(env), stdout=out, stderr=out)
    meta = [("authorization", f"Bearer {fx.partner_key}")]
    server = Server(variant, port, [proc], log_path, meta, "gateway")
    try:
        wait_listening(server, lambda: grpc_call(port, "list", fx.bodies[("gateway", "list")], meta, timeout=3))
    except BaseException:
        server.stop()
        raise
    return server


def gateway_loop() -> str:
    """The gateway's event loop in a run: the harness's APPTGATE_EVENT_LOOP, else the gateway's default (uvloop)."""
    return os.environ.get("APPTGATE_EVENT_LOOP", "uvloop").strip().lower()


def baseline_loop(args: argparse.Namespace) -> str:
    """The baselines' event loop: by default the gateway's."""
    return gateway_loop() if args.baseline_loop == "same" else str(args.baseline_loop)


def start_baseline(fx: Fixture, kind: str, port: int, workdir: Path, args: argparse.Namespace) -> Server:
    ensure_port_free(port)
    log_path = workdir / f"{kind}-{size_label(fx.size)}.log"
    command = [PY, str(BENCH_DIR / "baselines.py"), kind, "--port", str(port), "--loop", baseline_loop(args)]
    if kind == "bare":
        command += ["--responses", str(workdir / f"responses-{size_label(fx.size)}")]
    else:
        command += ["--dsn", fx.dsn, "--partner-id", fx.meta["bench_partner_id"]]
    if args.workers > 1:
        command += ["--reuse-port"]
    procs = []
    with log_path.open("wb") as out:
        for _ in range(args.workers):
            procs.append(subprocess.Popen(command, cwd=source(), env=service_env(dict(os.environ)), stdout=out,
                                          stderr=out))  # fmt: skip
    server = Server(kind, port, procs, log_path, [], kind)
    try:
        wait_listening(server, lambda: grpc_call(port, "list", fx.bodies[(kind, "list")], [], timeout=3))
    except BaseException:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------- PostgreSQL wait sampling


class WaitSampler:
    """Samples pg_stat_activity of one database every 20 ms in a thread: what the backends are doing.

    The average number of backends per state ("active: CPU", "active: Lock/transactionid",
    "idle in transaction: Client/ClientRead", …) tells a database-bound run from a lock-bound one
    from a client-bound one (backends idle in a transaction, waiting for the server's next statement).
    """

    def __init__(self, dsn: str, database: str) -> None:
        import threading

        self._dsn, self._database = dsn, database
        self._stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.pids: set[int] = set()  # every backend of the database seen busy during the run
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    "SELECT pid, state, coalesce(wait_event_type || '/' || wait_event, 'CPU') AS w "
                    "FROM pg_stat_activity "
                    "WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    "AND state <> 'idle' AND query NOT LIKE 'LISTEN%'",
                    self._database,
                )
                self.samples += 1
                self.pids.update(row["pid"] for row in rows)
                for row in rows:
                    key = f"{row['state']}: {row['w']}"
                    self.counts[key] = self.counts.get(key, 0) + 1
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def summary(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {k: round(v / n, 2) for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1])}


# --------------------------------------------------------------------------- h2load


@dataclass
class Run:
    size: str
    scenario: str
    variant: str
    concurrency: int
    clients: int
    streams: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    server_cpu_ms_per_req: float
    pg_cpu_s: float
    pg_cpu_ms_per_req: float
    loadgen_cpu_s: float
    pg_backends: dict[str, float]
    rss_mib: float
    hwm_mib: float
    response_bytes: int
    data_bytes_per_req: float
    errors: int
    processes: int
    codes: dict[str, int] = field(default_factory=dict)
    # CPU of the PostgreSQL backends of this world's database only (those busy during the run): unlike
    # pg_cpu_s, other people's databases on the same cluster are not in it.
    db_cpu_s: float = 0.0
    db_cpu_ms_per_req: float = 0.0
    load_1m: float = 0.0  # the machine's 1-minute load average at the end of the run
    machine_cpu_s: float = 0.0  # busy CPU seconds of the whole machine during the run (/proc/stat)
    other_cpu_s: float = 0.0  # of which not this server, PostgreSQL or h2load: other people's work, this harness
    server_sys_ms_per_req: float = 0.0  # the server's system CPU per call (in server_cpu_ms_per_req)
    server_switches_per_req: float = 0.0  # context switches of the server's threads per call
    # Ledger records written during the run and the transactions they took (the recorder's groups):
    # records per commit tells how well concurrent calls share a statement. 0 for the baselines.
    ledger_records: int = 0
    ledger_commits: int = 0
    # What the run's meters (``measure(meters=…)``) counted over the measured run: name → delta.
    extra: dict[str, float] = field(default_factory=dict)


class Meter(Protocol):
    """Something else counted over a measured run only (another process tree's CPU, a server's counters)."""

    def begin(self) -> None:
        """Read the counters right before the measured run."""

    def end(self) -> dict[str, float]:
        """Read them again right after it; return the deltas by name."""


def processes_cpu_seconds(pids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each live process of ``pids``."""
    seconds = {pid: process_cpu_seconds(pid) for pid in pids}
    return {pid: used for pid, used in seconds.items() if used is not None}


async def database_backends(dsn: str, database: str) -> set[int]:
    """The pids of the client backends connected to ``database`` (the pools of the servers on that world)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


async def ledger_mark(dsn: str) -> int:
    """The newest ledger record's id (0 when empty): records written after it are a run's."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM disclosures"))
    finally:
        await conn.close()


async def ledger_written(dsn: str, after: int) -> tuple[int, int]:
    """Ledger records written after the record ``after``, and the transactions that wrote them."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT txid) FROM disclosures WHERE id > $1", after)
    finally:
        await conn.close()
    return int(row[0]), int(row[1])


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs; idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def h2load_command(server: Server, scenario: str, body_path: Path, concurrency: int, duration: float,
                   log_file: Path | None) -> list[str]:  # fmt: skip
    clients = min(concurrency, 16)
    streams = max(1, concurrency // clients)
    command = [
        "h2load", "-D", f"{round(duration * 1000)}ms", "-c", str(clients), "-m", str(streams), "-t", "1",
        "-d", str(body_path), "-H", "content-type: application/grpc", "-H", "te: trailers",
    ]  # fmt: skip
    for name, value in server.metadata:
        command += ["-H", f"{name}: {value}"]
    if log_file is not None:
        command += ["--log-file", str(log_file)]
    command.append(f"http://127.0.0.1:{server.port}{SERVICE}{SCENARIOS[scenario]}")
    return command


def _parse_h2load(out: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            parts = line.replace(",", "").split()
            result["elapsed"] = float(parts[2].rstrip("s"))
            result["rps"] = float(parts[3])
        elif line.startswith("requests:"):
            words = line.replace(",", "").split()
            result["total"] = float(words[1])
            result["succeeded"] = float(words[words.index("succeeded") - 1])
            result["failed"] = float(words[words.index("failed") - 1])
            result["errored"] = float(words[words.index("errored") - 1])
        elif line.startswith("status codes:"):
            words = line.replace(",", "").split()
            result["2xx"] = float(words[2])
        elif line.startswith("traffic:"):
            # traffic: 1.2MB (1234) total, 1KB (123) headers (space savings …), 1MB (1000) data
            chunks = line.split("(")
            numbers = [c.split(")")[0] for c in chunks[1:]]
            result["data_bytes"] = float(numbers[-1])
    return result


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index] / 1000.0


def access_log_calls(log: bytes) -> Iterator[dict[str, Any]]:
    """The calls a gateway's log holds: its JSON access lines (``"event": "rpc"``), other lines skipped."""
    for line in log.splitlines():
        if b'"event": "rpc"' not in line:
            continue
        try:
            yield json.loads(line)
        except ValueError:
            continue


def gateway_codes(server: Server) -> dict[str, int]:
    """Status codes in the gateway's access log since the last call (its JSON lines name each call's code)."""
    codes: dict[str, int] = {}
    if server.kind != "gateway":
        return codes
    with server.log_path.open("rb") as handle:
        handle.seek(server.log_offset)
        chunk = handle.read()
        server.log_offset += len(chunk)
    for record in access_log_calls(chunk):
        codes[record.get("code", "?")] = codes.get(record.get("code", "?"), 0) + 1
    return codes


def measure(server: Server, scenario: str, concurrency: int, fx: Fixture, workdir: Path, args: argparse.Namespace,
            pg_pid: int | None, expected_bytes: int, meters: Sequence[Meter] = ()) -> Run:  # fmt: skip
    body = fx.bodies[(server.kind, scenario)]
    metadata = server.metadata
    # 1. A real gRPC client: status OK, the expected size and content.
    data = grpc_call(server.port, scenario, body, metadata)
    check_answer(scenario, server.variant, data, fx)
    if expected_bytes and len(data) != expected_bytes:
        raise SystemExit(f"{server.variant} {scenario}: {len(data)} response bytes, expected {expected_bytes}")
    body_path = workdir / f"body-{server.kind}-{scenario}.bin"
    body_path.write_bytes(frame(body))
    # 2. Warm-up (connections, statement caches, the interpreter's caches).
    subprocess.run(h2load_command(server, scenario, body_path, concurrency, args.warmup, None),
                   capture_output=True, check=True)  # fmt: skip
    gateway_codes(server)  # skip the warm-up's log lines
    # 3. The measured run.
    log_file = workdir / "h2load.log"
    log_file.unlink(missing_ok=True)
    for meter in meters:
        meter.begin()
    cpu0, pg0 = server.cpu_seconds(), tree_cpu_seconds(pg_pid) if pg_pid else 0.0
    sys0, switches0 = server.system_seconds_and_switches()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = machine_busy_seconds()
    backends0 = processes_cpu_seconds(asyncio.run(database_backends(fx.dsn, fx.meta["database"])))
    mark = asyncio.run(ledger_mark(fx.dsn))
    started = time.monotonic()
    with WaitSampler(fx.dsn, fx.meta["database"]) as waits:
        done = subprocess.run(h2load_command(server, scenario, body_path, concurrency, args.duration, log_file),
                              capture_output=True, text=True, check=False)  # fmt: skip
    elapsed = time.monotonic() - started
    records, commits = asyncio.run(ledger_written(fx.dsn, mark))
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1 = machine_busy_seconds()
    backends1 = processes_cpu_seconds(waits.pids | set(backends0))
    db_cpu = sum(cpu - backends0.get(pid, 0.0) for pid, cpu in backends1.items())
    cpu1, pg1 = server.cpu_seconds(), tree_cpu_seconds(pg_pid) if pg_pid else 0.0
    sys1, switches1 = server.system_seconds_and_switches()
    extra = {name: delta for meter in meters for name, delta in meter.end().items()}
    rss, hwm = server.rss()
    if done.returncode != 0:
        raise SystemExit(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    stats = _parse_h2load(done.stdout)
    latencies = sorted(int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line.count("\t") >= 2)
    requests = int(stats.get("succeeded", 0))
    codes = gateway_codes(server)
    # h2load resets the streams still in flight when its time is up: up to `concurrency` CANCELLED per run
    # (the warm-up's own may land in this run's log) are the end of the run, not failures.
    bad_codes = sum(n for code, n in codes.items() if code not in ("OK", "CANCELLED"))
    bad_codes += max(0, codes.get("CANCELLED", 0) - 2 * concurrency)
    errors = int(stats.get("failed", 0) + stats.get("errored", 0) + (stats.get("total", 0) - stats.get("2xx", 0)))
    errors += bad_codes
    data_per_req = stats.get("data_bytes", 0) / max(requests, 1)
    # An answer that is not OK has no DATA frame: 5 + size bytes per call proves each call carried the answer.
    if abs(data_per_req - (5 + len(data))) > 2 and requests:
        errors += 1
        log(f"  ! {server.variant}: {data_per_req:.1f} DATA bytes per response, expected {5 + len(data)}")
    # And the server must still answer right after the run.
    check_answer(scenario, server.variant, grpc_call(server.port, scenario, body, metadata), fx)
    duration = stats.get("elapsed", elapsed)
    run = Run(
        size=size_label(fx.size),
        scenario=scenario,
        variant=server.variant,
        concurrency=concurrency,
        clients=min(concurrency, 16),
        streams=max(1, concurrency // min(concurrency, 16)),
        duration_s=round(duration, 2),
        requests=requests,
        rps=round(stats.get("rps", 0.0), 1),
        p50_ms=round(_percentile(latencies, 0.50), 3),
        p90_ms=round(_percentile(latencies, 0.90), 3),
        p99_ms=round(_percentile(latencies, 0.99), 3),
        max_ms=round(latencies[-1] / 1000.0, 3) if latencies else float("nan"),
        server_cpu_s=round(cpu1 - cpu0, 2),
        server_cpu_ms_per_req=round((cpu1 - cpu0) * 1000 / max(requests, 1), 3),
        pg_cpu_s=round(pg1 - pg0, 2),
        pg_cpu_ms_per_req=round((pg1 - pg0) * 1000 / max(requests, 1), 3),
        loadgen_cpu_s=round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 2),
        pg_backends=waits.summary(),
        rss_mib=round(rss, 1),
        hwm_mib=round(hwm, 1),
        response_bytes=len(data),
        data_bytes_per_req=round(data_per_req, 1),
        errors=errors,
        processes=len({pid for pid in listeners_of(server.port)}) or len(server.procs),
        codes=codes,
        db_cpu_s=round(db_cpu, 2),
        db_cpu_ms_per_req=round(db_cpu * 1000 / max(requests, 1), 3),
        load_1m=round(os.getloadavg()[0], 2),
        machine_cpu_s=round(busy1 - busy0, 2),
        server_sys_ms_per_req=round((sys1 - sys0) * 1000 / max(requests, 1), 3),
        server_switches_per_req=round((switches1 - switches0) / max(requests, 1), 2),
        ledger_records=records,
        ledger_commits=commits,
        extra=extra,
    )
    run.other_cpu_s = round(max(0.0, run.machine_cpu_s - run.server_cpu_s - run.pg_cpu_s - run.loadgen_cpu_s), 2)
    log(
        f"  {run.size:>4} {scenario:<7} {server.variant:<16} c={concurrency:<3} {run.rps:>8.0f} req/s  "
        f"p50 {run.p50_ms:6.2f}  p99 {run.p99_ms:7.2f} ms  cpu {run.server_cpu_ms_per_req:.3f} ms/req  "
        f"pg {run.pg_cpu_ms_per_req:.3f} (db {run.db_cpu_ms_per_req:.3f}) ms/req  rss {run.rss_mib:.0f} MiB  "
        f"sys {run.server_sys_ms_per_req:.3f} ms/req  cs {run.server_switches_per_req:.1f}/req  "
        f"err {errors}  load {run.load_1m:.1f}  " + ", ".join(f"{k} {v}" for k, v in list(run.pg_backends.items())[:3])
    )
    return run


# --------------------------------------------------------------------------- breach report


def breach_report(args: argparse.Namespace, ledger_meta: dict[str, Any]) -> dict[str, Any]:
    """Time ``python -m service audit breach-report`` for the busiest partner over one day, then over 30 days."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APPTGATE_"))}
    env["DATABASE_URL"] = with_database(admin_dsn(), datagen.LEDGER_DB)
    datagen.migrate(env["DATABASE_URL"])  # the source tree may have migrations the ledger lacks
    first = datetime.fromisoformat(ledger_meta["first_time"])
    day = (first + timedelta(days=15)).replace(hour=0, minute=0, second=0, microsecond=0)
    partner = ledger_meta["busiest_partner_id"]
    result: dict[str, Any] = {
        "partner": partner,
        "records": ledger_meta["head_seq"],
        "items": ledger_meta["items"],
        "runs": [],
    }
    windows = [("one day", day, day + timedelta(days=1))] * args.breach_repeats
    if args.breach_month:
        windows.append(("whole ledger (30 days)", first, datetime.fromisoformat(ledger_meta["last_time"])
                        + timedelta(seconds=1)))  # fmt: skip
    # The report goes to a file, as an operator's would (the CLI writes only regular files: not /dev/null).
    output = Path(tempfile.mkdtemp(prefix="apptgate-breach-")) / "report.csv"
    for label, since, until in windows:
        command = [
            PY, "-m", "service", "audit", "breach-report", "--partner", partner,
            "--since", since.isoformat(), "--until", until.isoformat(), "--format", "csv", "--output", str(output),
        ]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(command, cwd=source(), env=service_env(env), capture_output=True, text=True,
                              check=False)  # fmt: skip
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"breach-report failed:\n{done.stderr[-3000:]}")
        summary = {}
        for line in done.stderr.splitlines():
            if line.startswith("breach report: "):
                summary = json.loads(line[len("breach report: ") :])
        result["runs"].append({"window": label, "since": since.isoformat(), "until": until.isoformat(),
                               "seconds": round(seconds, 2), "totals": summary})  # fmt: skip
        log(f"  breach report ({label}): {seconds:.2f}s, {summary.get('patients')} patients, "
            f"{summary.get('appointments')} appointments")  # fmt: skip
    shutil.rmtree(output.parent, ignore_errors=True)
    result["explain"] = asyncio.run(_explain_breach(partner, day))
    return result


async def _explain_breach(partner: str, day: datetime) -> str:
    from service.store import disclosures

    conn = await asyncpg.connect(with_database(admin_dsn(), datagen.LEDGER_DB))
    try:
        rows = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + disclosures.BREACH_SQL,
            uuid.UUID(partner),
            day,
            day + timedelta(days=1),
            None,
        )
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


# --------------------------------------------------------------------------- the partner path's statements


async def statement_cost(fx: Fixture, repeats: int = 300) -> dict[str, Any]:
    """The partner path's listing and appointment read as the partner role, alone: what the partner role's checks cost.

    For each statement of the measured source (``service.store.partner_path``:
    ``LIST_SQL`` and ``GET_SQL``, which call the partner-path functions with the
    key id and secret hash), run as the gateway runs a call (``SET LOCAL ROLE``): the median
    round trip of ``repeats`` executions of the prepared statement, one at a
    time, the median server-side execution time (``EXPLAIN (ANALYZE, TIMING
    OFF)``), and one ``EXPLAIN (ANALYZE, BUFFERS)`` of the plan it runs.

    ``run`` times it in the sealed world and in its clear copy. The statements,
    the functions they call and the key check inside them are the same in both,
    and neither reads a sealed column: the two differ only by the tables they
    read (sealed rows are wider, so a listing may read a few more buffers).
    """
    import statistics

    from service.store import partner_path

    anchor = datetime.fromisoformat(fx.meta["anchor"])
    target = uuid.UUID(fx.meta["target"]["appointment_id"])
    key_id, secret_hash = fx.issued[0].key_id, fx.issued[0].secret_hash
    statements = {"list": partner_path.LIST_SQL, "get": partner_path.GET_SQL}
    params: dict[str, tuple[Any, ...]] = {
        "list": (key_id, secret_hash, None, anchor, anchor + timedelta(days=1), None, None, 51),
        "get": (key_id, secret_hash, target),
    }
    out: dict[str, Any] = {}
    conn = await asyncpg.connect(fx.dsn)
    try:
        for name, sql in statements.items():
            if sql.count("$") != len(params[name]):  # not the statement shape this probe knows
                return {}
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE apptgate_partner")
                statement = await conn.prepare(sql)
                rows = 0
                for _ in range(20):  # past the plan cache's first custom plans
                    rows = len(await statement.fetch(*params[name]))
                walls = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    await statement.fetch(*params[name])
                    walls.append(time.perf_counter() - started)
                explain = await conn.prepare("EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON, FORMAT JSON) " + sql)
                executions = []
                for _ in range(repeats):
                    plan = json.loads(await explain.fetchval(*params[name]))
                    executions.append(plan[0]["Execution Time"])
                text = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *params[name])
            out[name] = {
                "rows": rows,
                "round_trip_ms": round(statistics.median(walls) * 1000, 3),
                "execution_ms": round(statistics.median(executions), 3),
                "plan": "\n".join(r[0] for r in text),
            }
    finally:
        await conn.close()
    return out


# --------------------------------------------------------------------------- profile


def profile(fx: Fixture, server: Server, workdir: Path, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    """py-spy on a gateway under one scenario (ListAppointments by default) at c=16: where time goes."""
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    out: dict[str, Any] = {}
    scenario = args.profile_scenario
    body_path = workdir / f"body-{server.variant}-{scenario}.bin"
    body_path.write_bytes(frame(fx.bodies[("gateway", scenario)]))
    for native in (False, True):
        tag = ("native" if native else "python") + ("" if server.variant == "gateway" else f"-{server.variant}")
        tag += "" if scenario == "list" else f"-{scenario}"
        raw = args.out / f"{stamp}-profile-{tag}.folded"
        load = subprocess.Popen(
            h2load_command(server, scenario, body_path, 16, args.profile_seconds + 6, None),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(2)
        command = [pyspy, "record", "--pid", str(server.pids[0]), "--duration", str(args.profile_seconds),
                   "--rate", "200", "--format", "raw", "--output", str(raw)]  # fmt: skip
        # Without --native, sample without pausing the process (less distortion); native stacks need the pause.
        command.append("--native" if native else "--nonblocking")
        spy = subprocess.run(command, capture_output=True, text=True, check=False)
        stdout, _ = load.communicate()
        stats = _parse_h2load(stdout)
        if spy.returncode != 0 or not raw.exists():
            log(f"  py-spy ({tag}) failed: {spy.stderr[-500:]}")
            continue
        out[tag] = {"folded": raw.name, "rps_under_profiler": stats.get("rps"), **summarize_folded(raw)}
        log(f"  profile ({tag}): {raw.name}, {out[tag]['samples']} samples")
    return out


def summarize_folded(path: Path, top: int = 30) -> dict[str, Any]:
    """Self and inclusive shares of functions in py-spy's folded stacks ("a;b;c count" lines)."""
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_counts[leaf] = self_counts.get(leaf, 0) + count
        for name in set(frames):
            incl[name] = incl.get(name, 0) + count

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": share(self_counts), "inclusive": share(incl)}


# --------------------------------------------------------------------------- main


class _Registry(dict):  # type: ignore[type-arg]
    """The servers of one world by variant; each is also listed in ``started`` the moment it starts, for cleanup."""

    def __init__(self, started: list[Server]) -> None:
        super().__init__()
        self._started = started

    def __setitem__(self, key: str, value: Server) -> None:
        self._started.append(value)
        super().__setitem__(key, value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100k,1m", help="appointment worlds (default 100k,1m; add 10m explicitly)")
    parser.add_argument("--with-10m", action="store_true", help="add the 10M world (generated once: ~4 min)")
    parser.add_argument("--full-size", default="100k", help="the size that runs every scenario and variant")
    parser.add_argument("--scenarios", default="list,get,contact")
    parser.add_argument("--variants", default="gateway,gateway+tracing,naive,bare",
                        help="any of gateway, gateway+tracing, naive, bare, gateway-nodefense (issue 6: the gateway "
                             "with encryption at rest off, on the world's _nodefense copy, values in clear) "
                             "(gateway+whatif: see --whatif)")  # fmt: skip
    parser.add_argument("--other-sizes-variants", default="gateway,naive",
                        help="variants run (ListAppointments only) at the other sizes")  # fmt: skip
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each measured run")
    parser.add_argument("--workers", type=int, default=1, help="server processes per variant (APPTGATE_WORKERS)")
    parser.add_argument("--baseline-loop", choices=("same", "asyncio", "uvloop"), default="same",
                        help="the naive and bare servers' event loop (default: the gateway's; before commit "
                             "0fc513e they ran on asyncio)")  # fmt: skip
    parser.add_argument("--ledger", action="store_true",
                        help="generate the 10M ledger if missing; time breach report, patient history")  # fmt: skip
    parser.add_argument("--ledger-items", default="10m", help="appointments disclosed in the generated ledger")
    parser.add_argument("--breach-repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every scenario × concurrency × variant this many times, the variants "
                             "in reverse order every other round; ratios: the median of the rounds'")  # fmt: skip
    parser.add_argument("--breach-month", action="store_true", help="also report the busiest partner over 30 days")
    import patient_history

    patient_history.add_arguments(parser)  # --history-…: a patient's history over the same ledger (issue 25)
    parser.add_argument("--whatif", metavar="PATCHES", default="",
                        help="add the variant gateway+whatif: the gateway with bench/whatif.py's variants "
                             "(norecord, gather, noread, nodatabase, cold) to measure a change before it is "
                             "made")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway under ListAppointments c=16")
    parser.add_argument("--profile-seconds", type=int, default=20)
    parser.add_argument("--profile-variants", default="gateway,gateway+whatif",
                        help="which servers to profile (any gateway variant, gateway-nodefense included)")  # fmt: skip
    parser.add_argument("--profile-scenario", default="list", choices=sorted(SCENARIOS),
                        help="the scenario profiled (default list)")  # fmt: skip
    parser.add_argument("--regen", action="store_true", help="rebuild the worlds even when present")
    parser.add_argument("--port-base", type=int, default=56050)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--at-commit", metavar="REV",
                        help="measure this commit (exported with git archive) instead of the work tree")  # fmt: skip
    parser.add_argument("--source", type=Path, help="measure the service in this directory (default: the work tree)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 100k only, 2 s runs, c=16 (and 20 patients' histories)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.full_size, args.concurrency, args.duration, args.warmup = "100k", "100k", "16", 2.0, 1.0
        args.history_patients, args.history_top = min(args.history_patients, 20), min(args.history_top, 5)
        args.history_naive = min(args.history_naive, 1)
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install -y nghttp2-client (make bench does it)")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    if args.with_10m and 10_000_000 not in sizes:
        sizes.append(10_000_000)
    full = parse_size(args.full_size)
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    if "gateway+whatif" in variants and not args.whatif:
        args.whatif = "norecord"
    if args.whatif and "gateway+whatif" not in variants:
        variants.append("gateway+whatif")
    other_variants = [v for v in args.other_sizes_variants.split(",") if v]
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    started = time.monotonic()
    pg_pid = asyncio.run(_postmaster_of_dsn()) or postmaster_pid()
    if pg_pid is None:
        log("! no local PostgreSQL postmaster found: PostgreSQL CPU will read 0")
    machine = Machine.probe()
    exported: Path | None = None
    if args.at_commit:
        commit = subprocess.run(["git", "rev-parse", "--short", args.at_commit], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        exported = Path(tempfile.mkdtemp(prefix=f"apptgate-src-{commit}-"))
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(exported)], input=archive, check=True)
        set_source(exported)
        dirty = False
        log(f"measuring commit {commit} (exported to {exported}), not the work tree")
    else:
        if args.source:
            set_source(args.source)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source(), capture_output=True,
                                text=True).stdout.strip() or "?"  # fmt: skip
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "service", "migrations"], cwd=source(),
                                    capture_output=True, text=True).stdout.strip())  # fmt: skip
    pg_version = asyncio.run(_pg_version())
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": asdict(machine),
        "postgresql": pg_version,
        "commit": commit + (" + uncommitted changes in service/ or migrations/ (the work tree)" if dirty else ""),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "workers": args.workers,
                     "concurrency": concurrency, "h2load_clients": "min(c, 16) connections × c/16 streams",
                     "gateway_loop": gateway_loop(),
                     "baseline_loop": baseline_loop(args)},
        "runs": [],
    }  # fmt: skip
    # Data first (reused when present).
    metas = {size: asyncio.run(datagen.generate_world(datagen.WorldSpec(size), regen=args.regen)) for size in sizes}

    def plan(size: int) -> tuple[list[str], list[str]]:
        """The variants and scenarios run at ``size``."""
        if size == full:
            return variants, scenarios
        return [v for v in other_variants if v in VARIANTS], ["list"]

    # The world's _nodefense copy (values in clear, nothing sealed): for gateway-nodefense, and for the
    # naive baseline's contact reads (it reads the contact columns in clear, as a team without this project would).
    clear_metas = {
        size: asyncio.run(datagen.generate_world(datagen.WorldSpec(size, defended=False), regen=args.regen))
        for size in sizes
        if "gateway-nodefense" in plan(size)[0] or ("naive" in plan(size)[0] and "contact" in plan(size)[1])
    }
    ledger_meta = None
    if args.ledger:
        ledger_meta = asyncio.run(datagen.generate_ledger(datagen.LedgerSpec(parse_size(args.ledger_items))))
    else:
        ledger_meta = asyncio.run(datagen.read_meta(with_database(admin_dsn(), datagen.LEDGER_DB)))
        if ledger_meta and ledger_meta.get("items", 0) < 10_000_000:
            ledger_meta = None  # only a ledger of 10M disclosures, in records of the current shape, answers it
    log(f"data ready in {time.monotonic() - started:.0f}s")
    workdir = Path(tempfile.mkdtemp(prefix="apptgate-bench-"))
    servers: list[Server] = []
    sink: subprocess.Popen[bytes] | None = None
    try:
        for size in sizes:
            fx = asyncio.run(prepare_fixture(size, metas[size]))
            fx_clear = asyncio.run(prepare_fixture(size, clear_metas[size], like=fx)) if size in clear_metas else None
            size_variants, size_scenarios = plan(size)
            # Which world each server serves and is checked against.
            fixture_of = {"gateway-nodefense": fx_clear, "naive": fx_clear or fx}
            port = args.port_base
            by_variant: dict[str, Server] = _Registry(servers)
            if {"gateway", "bare", "gateway-nodefense"} & set(size_variants):
                by_variant["gateway"] = start_gateway(fx, "gateway", port, workdir, args)
            # The bare server answers the gateway's own bytes: capture them now.
            responses = workdir / f"responses-{size_label(size)}"
            responses.mkdir(exist_ok=True)
            expected: dict[str, int] = {}
            if "gateway" in by_variant:
                for scenario in SCENARIOS:
                    data = grpc_call(port, scenario, fx.bodies[("gateway", scenario)], by_variant["gateway"].metadata)
                    check_answer(scenario, "gateway", data, fx)
                    (responses / f"{SCENARIOS[scenario]}.bin").write_bytes(data)
                    expected[scenario] = len(data)
            if "gateway+tracing" in size_variants:
                ensure_port_free(args.port_base + 90)
                sink = subprocess.Popen(
                    [PY, str(BENCH_DIR / "otlp_sink.py"), "--port", str(args.port_base + 90)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                by_variant["gateway+tracing"] = start_gateway(fx, "gateway+tracing", port + 10, workdir, args)
            if "gateway+whatif" in size_variants:
                by_variant["gateway+whatif"] = start_gateway(fx, "gateway+whatif", port + 40, workdir, args)
            if "gateway-nodefense" in size_variants:
                assert fx_clear is not None
                by_variant["gateway-nodefense"] = start_gateway(fx_clear, "gateway-nodefense", port + 50, workdir, args)
                check_same_answers(by_variant["gateway"], fx, by_variant["gateway-nodefense"], fx_clear)
                # The partner statements alone in the sealed world and in its clear copy, before the load
                # (and its noise) starts.
                report.setdefault("statements", {})[size_label(size)] = {
                    "gateway": asyncio.run(statement_cost(fx)),
                    "gateway-nodefense": asyncio.run(statement_cost(fx_clear)),
                }
            if "naive" in size_variants:
                by_variant["naive"] = start_baseline(fixture_of["naive"] or fx, "naive", port + 20, workdir, args)
            if "bare" in size_variants:
                by_variant["bare"] = start_baseline(fx, "bare", port + 30, workdir, args)
            log(f"{size_label(size)}: servers up: " + ", ".join(f"{s.variant}:{s.port} pid {s.pids}" for s in servers))
            order = [v for v in VARIANTS if v in by_variant and v in size_variants]
            for round_ in range(args.rounds):
                for scenario in size_scenarios:
                    for c in concurrency:
                        # Odd rounds take the variants in reverse: drift over a run (the ledger grows, the
                        # machine's other load comes and goes) then favours none of them.
                        for variant in order if round_ % 2 == 0 else order[::-1]:
                            if variant == "gateway+tracing" and scenario != "list":
                                continue
                            server = by_variant[variant]
                            exp = expected.get(scenario, 0) if server.kind in ("gateway", "bare") else 0
                            run = measure(server, scenario, c, fixture_of.get(variant) or fx, workdir, args, pg_pid,
                                          exp)  # fmt: skip
                            report["runs"].append({**asdict(run), "round": round_})
            if args.profile and size == full:
                for variant in args.profile_variants.split(","):
                    if variant in by_variant:
                        server_fx = fixture_of.get(variant) or fx
                        report.setdefault("profile", {}).update(profile(server_fx, by_variant[variant], workdir, args,
                                                                        stamp))  # fmt: skip
            for server in servers:
                server.stop()
            servers.clear()
            if sink is not None:
                sink.send_signal(signal.SIGTERM)
                sink.wait(timeout=10)
                sink = None
        if ledger_meta is not None:
            log(f"breach report over the {ledger_meta['head_seq']:,}-record ledger")
            report["breach"] = breach_report(args, ledger_meta)
            if args.history_patients > 0:
                import patient_history

                log(f"a patient's history over the {ledger_meta['head_seq']:,}-record ledger")
                history = patient_history.measure(ledger_meta, args)
                if history is not None:
                    report["history"] = history
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
        if sink is not None:
            sink.kill()
            sink.wait()
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    import report as report_module

    paths = report_module.write(report, args.out, stamp)
    log(f"done in {report['wall_seconds']:.0f}s: " + ", ".join(str(p) for p in paths))
    shutil.rmtree(workdir, ignore_errors=True)
    if exported is not None:
        shutil.rmtree(exported, ignore_errors=True)
    return 0


async def _postmaster_of_dsn() -> int | None:
    """The postmaster of the server the DSN reaches: the parent of our own backend (when it runs here)."""
    conn = await asyncpg.connect(admin_dsn())
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        try:  # read while the backend lives
            stat = Path(f"/proc/{backend}/stat").read_text()  # noqa: ASYNC240 (a /proc read, not disk I/O)
        except FileNotFoundError:
            return None  # not on this machine (or not visible): no PostgreSQL CPU column
    finally:
        await conn.close()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


async def _pg_version() -> str:
    conn = await asyncpg.connect(admin_dsn())
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
