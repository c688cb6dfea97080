"""The change-feed fan-out benchmark: 1,000 concurrent WatchAppointments streams on one server process.

Measures, per scenario, on one gateway process (``APPTGATE_WORKERS=1``, default settings otherwise):

* PostgreSQL transactions per second in the benchmark database while idle,
  with no stream and with every stream open (``pg_stat_database``
  ``xact_commit + xact_rollback`` deltas over ``--idle`` seconds; every
  statement outside an explicit transaction counts as one), and the server's
  CPU while idle;
* the server's RSS with no stream, with the streams open and idle, and after
  the burst ("memory for the streams" = open and idle minus no stream);
* commit-to-delivery latency over every delivery: a writer process commits
  appointments at a fixed rate (each INSERT its own transaction, the commit
  timestamped when PostgreSQL acknowledges it), each to a patient of its own
  (so every delivery reaches a patient new to the partner that day: the usage
  charge does its full work); reader processes note when each stream reads
  each change (CLOCK_MONOTONIC, shared by the processes). Every expected
  delivery is checked to arrive exactly once and in order.

Scenarios (how the streams are spread over partners and practitioners):

* ``spread``: 250 partners, 500 practitioners; each partner is granted 4
  practitioners (each practitioner is granted to 2 partners). Even partners
  open one stream per granted practitioner, odd partners 4 streams over all
  their grants (several installations of one software). A change to one
  practitioner reaches 5 streams; changes go to practitioners at random.
* ``hot``: the worst case — 50 partners (the default limit of 20 streams each),
  all granted one practitioner and 3 others of their own; each opens 10 streams
  on that practitioner and 10 over all its grants. Every change is to the
  shared practitioner and reaches all 1,000 streams.

Usage::

    .venv/bin/python bench/feed_fanout.py [--streams 1000] [--scenarios spread,hot] [--readers 2] [--at-commit REV]

Writes ``bench/results/<date>-feed.md`` and ``.json`` and prints the table.
PostgreSQL from BENCH_ADMIN_DSN / DATABASE_URL, else the local server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncpg
import grpc
import grpc.aio
from appointments.internal.v1 import partner_registry_service_pb2 as registry_pb
from appointments.internal.v1 import partner_registry_service_pb2_grpc as registry_grpc
from appointments.internal.v1 import scheduling_service_pb2 as scheduling_pb
from appointments.internal.v1 import scheduling_service_pb2_grpc as scheduling_grpc
from appointments.partner.v1 import partner_appointment_service_pb2 as partner_pb
from appointments.partner.v1 import partner_appointment_service_pb2_grpc as partner_grpc

import common

TOKEN = "bench-internal-token-" + "f" * 32
# Under the 100 concurrent streams a connection may carry (APPTGATE_MAX_STREAMS_PER_CONNECTION).
STREAMS_PER_CHANNEL = 90
# Each channel its own TCP connection: by default gRPC shares one connection between channels
# to the same target, and stream 101 would wait forever for room on it.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
common.set_source(common.ROOT)
START = datetime(2031, 1, 6, tzinfo=UTC)  # change n books an appointment at START + n minutes
START_EPOCH = int(START.timestamp())
SCRIPT = str(Path(__file__).resolve())


def log(message: str) -> None:
    print(f"[feed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(port: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-q * len(sorted_values) // 100)))  # ceil(q/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def process_cpu(pid: int) -> float:
    return common.tree_cpu_seconds(pid)


# --------------------------------------------------------------------------- the plan


@dataclass
class StreamPlan:
    key: str
    practitioner: str  # "" = every granted practitioner
    watched: list[int]  # practitioner indexes the stream should receive


@dataclass
class Plan:
    partner_target: str
    dsn: str
    streams: list[StreamPlan] = field(default_factory=list)
    practitioners: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    changes: list[int] = field(default_factory=list)  # practitioner index of change n
    rate: float = 10.0


async def build_world(
    scenario: str, streams: int, patients_n: int, internal: grpc.aio.Channel, tag: str
) -> tuple[list[str], list[str], list[StreamPlan]]:
    """Create practitioners, patients, partners, keys and grants through the internal API; return the stream plan.

    Every change books a patient of its own, so every delivery reaches a patient
    new to the partner that day: the usage charge does its full work (worst case).
    """
    meta = (("authorization", f"Bearer {TOKEN}"),)
    scheduling = scheduling_grpc.SchedulingServiceStub(internal)
    registry = registry_grpc.PartnerRegistryServiceStub(internal)
    gate = asyncio.Semaphore(16)

    async def call(method: Any, request: Any) -> Any:
        async with gate:
            return await method(request, metadata=meta, timeout=30)

    if scenario == "spread":
        partners_n, practitioners_n, per_partner = streams // 4, streams // 2, 4
    elif scenario == "hot":
        partners_n, per_partner = streams // 20, 20
        practitioners_n = 1 + 3 * partners_n
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    practitioners = [
        r.practitioner_id
        for r in await asyncio.gather(
            *(
                call(
                    scheduling.CreatePractitioner,
                    scheduling_pb.CreatePractitionerRequest(display_name=f"Dr. {tag} {n}", specialty="Bench"),
                )
                for n in range(practitioners_n)
            )
        )
    ]
    patients = [
        r.patient_id
        for r in await asyncio.gather(
            *(
                call(
                    scheduling.CreatePatient,
                    scheduling_pb.CreatePatientRequest(given_name="Bench", family_name=f"{tag} {n}"),
                )
                for n in range(patients_n)
            )
        )
    ]
    partner_ids = [
        r.partner_id
        for r in await asyncio.gather(
            *(
                call(registry.CreatePartner, registry_pb.CreatePartnerRequest(display_name=f"Feed {tag} {n}"))
                for n in range(partners_n)
            )
        )
    ]
    keys = [
        r.secret
        for r in await asyncio.gather(
            *(call(registry.IssuePartnerKey, registry_pb.IssuePartnerKeyRequest(partner_id=p)) for p in partner_ids)
        )
    ]
    grants: list[list[int]] = []
    for i in range(partners_n):
        if scenario == "spread":
            grants.append([(2 * i + k) % practitioners_n for k in range(4)])
        else:
            grants.append([0, 1 + 3 * i, 2 + 3 * i, 3 + 3 * i])
    await asyncio.gather(
        *(
            call(
                registry.GrantPractitionerAccess,
                registry_pb.GrantPractitionerAccessRequest(partner_id=partner_ids[i], practitioner_id=practitioners[j]),
            )
            for i in range(partners_n)
            for j in grants[i]
        )
    )
    plan: list[StreamPlan] = []
    for i in range(partners_n):
        for s in range(per_partner):
            if scenario == "spread":
                single = i % 2 == 0
                one = grants[i][s]
            else:
                single = s < per_partner // 2
                one = 0
            if single:
                plan.append(StreamPlan(keys[i], practitioners[one], [one]))
            else:
                plan.append(StreamPlan(keys[i], "", list(grants[i])))
    return practitioners, patients, plan[:streams]


# --------------------------------------------------------------------------- reader and writer processes


async def reader_main(plan: dict[str, Any], first: int, count: int, out: str) -> None:
    """Open streams ``first``..``first+count`` of the plan, say ``ready``, read until all expected changes arrive."""
    mine = plan["streams"][first : first + count]
    changes: list[int] = plan["changes"]
    channels = [
        grpc.aio.insecure_channel(plan["partner_target"], options=CHANNEL_OPTIONS)
        for _ in range((len(mine) + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]
    calls = [
        partner_grpc.PartnerAppointmentServiceStub(channels[n // STREAMS_PER_CHANNEL]).WatchAppointments(
            partner_pb.WatchAppointmentsRequest(practitioner_id=s["practitioner"]),
            metadata=(("authorization", f"Bearer {s['key']}"),),
        )
        for n, s in enumerate(mine)
    ]
    await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in calls)), timeout=120)
    print("ready", flush=True)
    expected = [sum(1 for p in changes if p in set(s["watched"])) for s in mine]
    received: list[list[tuple[int, float]]] = [[] for _ in mine]
    errors: list[str] = []

    async def read(n: int) -> None:
        call = calls[n]
        got = received[n]
        try:
            while len(got) < expected[n]:
                message = await call.read()
                at = time.monotonic()
                if message is grpc.aio.EOF:
                    errors.append(f"stream {first + n}: ended")
                    return
                got.append(((message.appointment.start_time.seconds - START_EPOCH) // 60, at))
        except grpc.aio.AioRpcError as error:
            errors.append(f"stream {first + n}: {error.code().name} {error.details()}")

    readers = [asyncio.create_task(read(n)) for n in range(len(mine))]
    stop = asyncio.get_running_loop().create_future()

    def stop_now() -> None:
        if not stop.done():
            stop.set_result(None)

    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop_now)
    cpu_at_ready = time.process_time()
    await asyncio.wait([asyncio.gather(*readers), stop], return_when=asyncio.FIRST_COMPLETED)
    cpu = time.process_time() - cpu_at_ready
    for task in readers:
        task.cancel()
    missing = sum(max(0, e - len(r)) for e, r in zip(expected, received, strict=True))
    duplicates = sum(len(r) - len({c for c, _ in r}) for r in received)
    out_of_order = sum(1 for r in received if [c for c, _ in r] != sorted(c for c, _ in r))
    for call in calls:
        call.cancel()
    write_json(
        out,
        {
            "deliveries": [[c, t] for r in received for c, t in r],
            "expected": sum(expected),
            "missing": missing,
            "duplicates": duplicates,
            "out_of_order_streams": out_of_order,
            "errors": errors[:20],
            "error_count": len(errors),
            "cpu_s": cpu,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    )
    print("done", flush=True)
    for channel in channels:
        await channel.close(grace=None)


def write_json(path: str, value: Any) -> None:
    Path(path).write_text(json.dumps(value))


async def writer_main(plan: dict[str, Any]) -> None:
    """Commit one appointment per planned change at the planned rate; print when each was committed."""
    practitioners, patients = plan["practitioners"], plan["patients"]
    conn = await asyncpg.connect(plan["dsn"])
    insert = await conn.prepare(
        "INSERT INTO appointments (practitioner_id, patient_id, start_time, end_time) VALUES ($1, $2, $3, $4)"
    )
    commits: list[tuple[float, float]] = []
    began = time.monotonic()
    for n, practitioner in enumerate(plan["changes"]):
        wait = began + n / plan["rate"] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        when = START + timedelta(minutes=n)
        await conn.execute("BEGIN")
        await insert.fetch(
            uuid.UUID(practitioners[practitioner]),
            uuid.UUID(patients[n % len(patients)]),
            when,
            when + timedelta(minutes=10),
        )
        sent = time.monotonic()
        await conn.execute("COMMIT")
        commits.append((sent, time.monotonic()))
    await conn.close()
    print(json.dumps({"commits": commits, "seconds": time.monotonic() - began}), flush=True)


# --------------------------------------------------------------------------- one scenario


async def settle(dsn: str) -> None:
    """Vacuum and analyse what the set-up wrote, so autovacuum does not run (and count) in the idle windows."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    await asyncio.sleep(10)


async def idle_window(dsn: str, seconds: float, server_pid: int) -> tuple[float, float]:
    """(transactions/s in the database, server CPU s/s) over ``seconds`` of idleness.

    PostgreSQL counts a transaction when it ends and publishes a backend's
    counts up to ~10 s later when it is mostly idle: over a long window that
    lag is noise. Every statement outside an explicit transaction counts as one.
    """
    conn = await asyncpg.connect(dsn)
    try:
        query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        before = int(await conn.fetchval(query))
        cpu = process_cpu(server_pid)
        await asyncio.sleep(seconds)
        cpu = process_cpu(server_pid) - cpu
        after = int(await conn.fetchval(query))
    finally:
        await conn.close()
    # Our own statements between the two readings: the first SELECT (counted when it ends).
    return (after - before - 1) / seconds, cpu / seconds


# cwd: `python -m` puts the current directory first on sys.path, before PYTHONPATH; run from the
# measured source, or the work tree's service would run whatever --at-commit says.
def start_server(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, cwd=common.source())


def migrate(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, check=True, capture_output=True,
                   cwd=common.source())  # fmt: skip


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=common.service_env(dict(os.environ)),
    )


async def run_scenario(args: argparse.Namespace, scenario: str, admin: str, dsn: str, workdir: Path) -> dict[str, Any]:
    env = common.service_env(
        dict(
            os.environ,
            DATABASE_URL=dsn,
            APPTGATE_INTERNAL_TOKEN=TOKEN,
            APPTGATE_WORKERS="1",
            APPTGATE_LOG_LEVEL="WARNING",
            APPTGATE_DATA_DIR=str(workdir / "data"),
        )
    )
    partner_port, internal_port = free_port(), free_port()
    env.update(APPTGATE_PARTNER_ADDR=f"127.0.0.1:{partner_port}", APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{internal_port}")
    server = start_server(env)
    readers: list[asyncio.subprocess.Process] = []
    try:
        await wait_port(partner_port)
        await wait_port(internal_port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{internal_port}") as internal:
            log(f"{scenario}: creating partners, keys, grants")
            count = args.spread_changes if scenario == "spread" else args.hot_changes
            practitioners, patients, streams = await build_world(scenario, args.streams, count, internal, scenario)
        rng = random.Random(7)
        if scenario == "spread":
            changes = [rng.randrange(len(practitioners)) for _ in range(args.spread_changes)]
            rate = args.spread_rate
        else:
            changes = [0] * args.hot_changes
            rate = args.hot_rate
        plan = Plan(f"127.0.0.1:{partner_port}", dsn, streams, practitioners, patients, changes, rate)
        plan_file = workdir / f"{scenario}-plan.json"
        plan_file.write_text(json.dumps(asdict(plan)))

        await settle(dsn)
        rss_empty = common.rss_mib(server.pid)[0]
        log(f"{scenario}: idle {args.idle:.0f}s without streams")
        idle_none, cpu_none = await idle_window(dsn, args.idle, server.pid)

        log(f"{scenario}: opening {len(streams)} streams in {args.readers} reader processes")
        share = (len(streams) + args.readers - 1) // args.readers
        for r in range(args.readers):
            out = workdir / f"{scenario}-reader-{r}.json"
            readers.append(await spawn("--role", "reader", "--plan", str(plan_file), "--first", str(r * share),
                                       "--count", str(share), "--out", str(out)))  # fmt: skip

        opened = time.monotonic()
        for reader in readers:
            assert reader.stdout is not None
            line = await asyncio.wait_for(reader.stdout.readline(), timeout=180)
            if line.strip() != b"ready":
                raise RuntimeError(f"a reader failed to open its streams: {line!r}")
        open_seconds = time.monotonic() - opened
        await asyncio.sleep(10)  # PostgreSQL publishes the counts of the streams' opening transactions
        rss_idle = common.rss_mib(server.pid)[0]
        log(f"{scenario}: idle {args.idle:.0f}s with {len(streams)} streams")
        idle_streams, cpu_streams = await idle_window(dsn, args.idle, server.pid)

        log(f"{scenario}: writing {len(changes)} changes at {rate}/s")
        load_before = os.getloadavg()
        server_cpu = process_cpu(server.pid)
        pg = common.postmaster_pid()
        pg_cpu = process_cpu(pg) if pg else 0.0
        writer = await spawn("--role", "writer", "--plan", str(plan_file))
        assert writer.stdout is not None
        written = json.loads(await asyncio.wait_for(writer.stdout.readline(), timeout=len(changes) / rate + 300))
        await writer.wait()
        burst_seconds = written["seconds"]
        results = []
        drain_until = time.monotonic() + args.drain
        for r, reader in enumerate(readers):
            assert reader.stdout is not None and reader.stdin is not None
            try:
                line = await asyncio.wait_for(reader.stdout.readline(), max(0.1, drain_until - time.monotonic()))
            except TimeoutError:  # a reader still misses deliveries: it writes what it has
                reader.stdin.write(b"stop\n")
                await reader.stdin.drain()
                line = await asyncio.wait_for(reader.stdout.readline(), timeout=60)
            if line.strip() != b"done":
                raise RuntimeError(f"reader {r} failed: {line!r}")
            results.append(json.loads((workdir / f"{scenario}-reader-{r}.json").read_text()))
        server_cpu = process_cpu(server.pid) - server_cpu
        pg_cpu = (process_cpu(pg) - pg_cpu) if pg else float("nan")
        load_after = os.getloadavg()
        rss_after = common.rss_mib(server.pid)[0]
        for reader in readers:
            await reader.wait()
        readers = []
    finally:
        for reader in readers:
            if reader.returncode is None:
                reader.kill()
                await reader.wait()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    committed = written["commits"]
    latencies = sorted((at - committed[change][1]) * 1000 for r in results for change, at in r["deliveries"])
    commit_rtt = sorted((done - sent) * 1000 for sent, done in committed)
    return {
        "scenario": scenario,
        "streams": len(streams),
        "partners": len({s.key for s in streams}),
        "practitioners": len(practitioners),
        "single_practitioner_streams": sum(1 for s in streams if s.practitioner),
        "changes": len(changes),
        "rate": rate,
        "burst_seconds": burst_seconds,
        "fanout_per_change": sum(r["expected"] for r in results) / max(1, len(changes)),
        "open_seconds": open_seconds,
        "expected": sum(r["expected"] for r in results),
        "delivered": len(latencies),
        "missing": sum(r["missing"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "out_of_order_streams": sum(r["out_of_order_streams"] for r in results),
        "stream_errors": sum(r["error_count"] for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:5],
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "commit_rtt_p50_ms": statistics.median(commit_rtt),
        "rss_empty_mib": rss_empty,
        "rss_idle_mib": rss_idle,
        "rss_after_mib": rss_after,
        "idle_xact_s_none": idle_none,
        "idle_xact_s_streams": idle_streams,
        "idle_server_cpu_none": cpu_none,
        "idle_server_cpu_streams": cpu_streams,
        "burst_server_cpu_s": server_cpu,
        "burst_postgres_cpu_s": pg_cpu,
        "reader_cpu_s": sum(r["cpu_s"] for r in results),
        "load_before": load_before,
        "load_after": load_after,
    }


def _environment() -> list[str]:
    """The APPTGATE_* variables the run was given (they reach the server)."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("APPTGATE_")]


def render(args: argparse.Namespace, runs: list[dict[str, Any]], started: datetime) -> str:
    def row(label: str, cell: str | Callable[[dict[str, Any]], str], fmt: str = "", target: str = "") -> str:
        """One line of the table: each run's ``cell`` (a key, formatted with ``fmt``, or a function of the run)."""
        texts = (cell(r) if callable(cell) else format(r[cell], fmt) for r in runs)
        return f"| {label} | " + " | ".join(texts) + f" | {target} |"

    lines = [
        f"# Change-feed fan-out — {started.isoformat(timespec='seconds')}",
        "",
        f"`{' '.join([*_environment(), '.venv/bin/python', 'bench/feed_fanout.py', *sys.argv[1:]])}` — "
        "one gateway process "
        f"(`APPTGATE_WORKERS=1`, default limits), {os.cpu_count()} CPUs shared with PostgreSQL, the writer and "
        f"{args.readers} reader processes; code at `{common_git_describe()}`.",
        "",
        "| measure | " + " | ".join(r["scenario"] for r in runs) + " | target (issue 5) |",
        "| --- | " + " | ".join("---:" for _ in runs) + " | --- |",
        row("streams open", "streams", ","),
        row("partners", "partners", ","),
        row("streams on one practitioner (rest: all grants)", "single_practitioner_streams", ","),
        row("changes written", "changes", ","),
        row("changes per second", "rate", "g"),
        row("deliveries per change", "fanout_per_change", ".1f"),
        row("deliveries expected", "expected", ","),
        row("deliveries received", "delivered", ","),
        row(
            "deliveries missing / duplicated / streams out of order",
            lambda r: f"{r['missing']} / {r['duplicates']} / {r['out_of_order_streams']}",
        ),
        row("streams ended with an error", "stream_errors", ","),
        row("commit-to-delivery p50 (ms)", "p50_ms", ".1f"),
        row("commit-to-delivery p90 (ms)", "p90_ms", ".1f"),
        row("commit-to-delivery p99 (ms)", "p99_ms", ".1f", "< 250 ms"),
        row("commit-to-delivery max (ms)", "max_ms", ".1f"),
        row("server RSS, no stream (MiB)", "rss_empty_mib", ".1f"),
        row("server RSS, streams open and idle (MiB)", "rss_idle_mib", ".1f"),
        row(
            "memory for the streams (MiB)",
            lambda r: f"{r['rss_idle_mib'] - r['rss_empty_mib']:.1f}",
            target="< 100 MiB",
        ),
        row("server RSS after the burst (MiB)", "rss_after_mib", ".1f"),
        row("idle transactions/s, no stream", "idle_xact_s_none", ".2f"),
        row("idle transactions/s, streams open", "idle_xact_s_streams", ".2f", "independent of the streams"),
        row("idle server CPU, no stream (s/s)", "idle_server_cpu_none", ".3f"),
        row("idle server CPU, streams open (s/s)", "idle_server_cpu_streams", ".3f"),
        row("burst: server CPU (s)", "burst_server_cpu_s", ".1f"),
        row("burst: PostgreSQL CPU, all databases (s)", "burst_postgres_cpu_s", ".1f"),
        row("burst: readers' CPU (s)", "reader_cpu_s", ".1f"),
        row("burst duration (s)", "burst_seconds", ".1f"),
        row("load average before / after the burst", lambda r: f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}"),
    ]
    for r in runs:
        if r["error_samples"]:
            lines += ["", f"{r['scenario']}: stream errors, e.g. " + "; ".join(r["error_samples"])]
    return "\n".join(lines)


_MEASURED: list[str] = []


def common_git_describe() -> str:
    if _MEASURED:
        return _MEASURED[0]
    try:
        head = subprocess.run(["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(common.ROOT), "status", "--porcelain", "service", "migrations"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in service/ or migrations/ (the work tree)" if dirty else "")


def export_commit(rev: str) -> Path:
    """Export ``rev`` with git archive and run the service from it (the harness stays this one)."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    exported = Path(tempfile.mkdtemp(prefix=f"apptgate-src-{commit}-"))
    archive = subprocess.run(["git", "archive", commit], cwd=common.ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(exported)], input=archive, check=True)
    common.set_source(exported)
    _MEASURED.append(f"{commit} (git archive, not the work tree)")
    log(f"measuring commit {commit}, exported to {exported}")
    return exported


async def cancellable(work: Coroutine[Any, Any, str]) -> str:
    """Run ``work``; SIGTERM and SIGINT cancel it, so its cleanup (servers, readers, database) still runs."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await task


async def main(args: argparse.Namespace) -> str:
    started = datetime.now(UTC)
    exported = export_commit(args.at_commit) if args.at_commit else None
    try:
        return await measure(args, started)
    finally:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)


async def measure(args: argparse.Namespace, started: datetime) -> str:
    admin = common.admin_dsn()
    name = f"apptgate_feed_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = common.with_database(admin, name)
    runs = []
    with tempfile.TemporaryDirectory(prefix="apptgate-feed-") as tmp:
        workdir = Path(tmp)
        try:
            env = common.service_env(dict(os.environ, DATABASE_URL=dsn, APPTGATE_DATA_DIR=str(workdir / "data")))
            migrate(env)
            for scenario in args.scenarios.split(","):
                runs.append(await run_scenario(args, scenario, admin, dsn, workdir))
                log(f"{scenario}: p50 {runs[-1]['p50_ms']:.1f} ms, p99 {runs[-1]['p99_ms']:.1f} ms")
        finally:
            conn = await asyncpg.connect(admin)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()
    report = render(args, runs, started)
    stem = common.BENCH_DIR / "results" / f"{started.strftime('%Y-%m-%d-%H%M')}-feed"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(report + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--scenarios", default="spread,hot", help="comma-separated: spread, hot")
    parser.add_argument("--spread-changes", type=int, default=600)
    parser.add_argument("--spread-rate", type=float, default=20.0, help="changes per second (spread)")
    parser.add_argument("--hot-changes", type=int, default=60)
    parser.add_argument("--hot-rate", type=float, default=2.0, help="changes per second (hot)")
    parser.add_argument("--readers", type=int, default=2, help="reader processes sharing the streams")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of each idle measurement")
    parser.add_argument("--drain", type=float, default=60.0, help="seconds readers get after the last write")
    parser.add_argument("--at-commit", metavar="REV", help="run the service of this commit instead of the work tree")
    parser.add_argument("--role", choices=["main", "reader", "writer"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.role == "reader":
        asyncio.run(reader_main(json.loads(Path(parsed.plan).read_text()), parsed.first, parsed.count, parsed.out))
    elif parsed.role == "writer":
        asyncio.run(writer_main(json.loads(Path(parsed.plan).read_text())))
    else:
        print(asyncio.run(cancellable(main(parsed))))
