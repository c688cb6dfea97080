"""`make bench-replica`: the primary's CPU per partner read with a streaming replica, against the naive handler.

Issue 27's target: with one replica, the primary's CPU per ``ListAppointments``
at most 0.35× the naive handler's, measured side by side in one run. One run:

1. A real primary (``initdb``) and a real streaming replica (``pg_basebackup
   -R``) on free ports (``demo/cluster.py``, pgserver's PostgreSQL programs),
   made for this run and removed after it; the 100k world of ``bench/run.py``
   generated on the primary (``bench/datagen.py``), a fresh key and consent,
   an empty ledger (``run.prepare_fixture``); then a wait until the replica
   has replayed all of it (``pg_last_wal_replay_lsn()`` ≥ the primary's
   ``pg_current_wal_lsn()``).
2. Three servers on the primary, one process each, as ``bench/run.py`` starts
   them: ``gateway+replica`` (``APPTGATE_READ_REPLICA_URLS`` pointing at the
   replica as ``apptgate_partner``: the reads run there, the primary
   authorises each answer in the statement that records it), ``gateway`` (the
   same code, no replica: everything on the primary) and ``naive``
   (``bench/baselines.py``); with ``--whatif norecord`` also
   ``gateway+replica+whatif``, the replica gateway without the ledger record
   (``bench/whatif.py``): what the primary spends on a call besides its
   record and the authorisation inside it. Before any load: each replica gateway's health says
   ``apptgate.replica.0`` SERVING on its internal listener, the gateways give
   the same answers, and 50 listings to ``gateway+replica`` are seen read on
   the replica and authorised on the primary (``pg_stat_user_functions`` of
   each node: the cluster tracks PL/pgSQL functions).
3. Per round (``--rounds``, every other one in reverse variant order) × scenario
   × variant: ``run.measure`` (check call, h2load warm-up, measured h2load run
   at c=16, answers checked by size, DATA bytes and the access log), with the
   CPU of the primary's whole postmaster tree, the replica's and the server's
   over the measured run only.
4. The whole run's accounting: the partner functions' calls on each node
   against the calls in each gateway's access log (which node read every
   answer, and that the primary authorised each one the replica read).

Writes ``bench/results/<date>-replica.md`` and ``.json`` and prints the table.
The ratios are the medians of the rounds' (with their range).

    .venv/bin/python bench/replica.py [--rounds 3] [--scenarios list,get] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.set_source(common.ROOT)
import asyncpg  # noqa: E402
import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from demo.cluster import Cluster, Node  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from service.app import REPLICA_HEALTH_PREFIX  # noqa: E402
from service.store.database import partner_login_dsn  # noqa: E402

import datagen  # noqa: E402
import run as bench  # noqa: E402

#: The variants, in the order of even rounds: (a) reads on the replica, (a) with ``--whatif``'s parts replaced
#: (``bench/whatif.py``), (b) all on the primary, (c) the baseline.
VARIANTS = ("gateway+replica", "gateway+replica+whatif", "gateway", "naive")
#: The partner-path functions whose calls tell which node read (the list and get reads) and which authorised.
FUNCTIONS = ("partner_list_appointments", "partner_get_appointment", "record_checked_basic_disclosures")
READ_FUNCTION = {"list": "partner_list_appointments", "get": "partner_get_appointment"}
TARGET = 0.35  # issue 27: the primary's CPU per ListAppointments, replica gateway / naive, at most this


def log(message: str) -> None:
    print(f"[replica {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def postmaster(node: Node) -> int:
    """The pid of ``node``'s postmaster: the first line of ``postmaster.pid`` in its data directory."""
    return int((node.data / "postmaster.pid").read_text().splitlines()[0])


async def _calls(dsn: str) -> dict[str, float]:
    """Calls of :data:`FUNCTIONS` in the database of ``dsn``, as the server's statistics hold them now.

    With each, its total time in milliseconds (``<function> ms``), and that of the
    ledger's sequencer (``chain_disclosures``), which the record's cost includes.
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT funcname, calls, total_time FROM pg_stat_user_functions WHERE funcname = ANY($1::text[])",
            [*FUNCTIONS, "chain_disclosures"],
        )
    finally:
        await conn.close()
    found = {row["funcname"]: row for row in rows}
    counts = {name: float(found[name]["calls"]) if name in found else 0.0 for name in FUNCTIONS}
    times = {
        f"{name} ms": float(found[name]["total_time"]) if name in found else 0.0
        for name in (*FUNCTIONS, "chain_disclosures")
    }
    return counts | times


async def settled_calls(cluster: Cluster, database: str, quiet: float = 11.0, within: float = 90.0) -> dict[str, float]:
    """Both nodes' :func:`_calls` (``primary:…``, ``replica:…``), once they have not moved for ``quiet`` seconds.

    A backend reports its statistics at most once a second, and one that
    reported less than a second before going idle waits ten seconds more
    (PostgreSQL's ``PGSTAT_IDLE_INTERVAL``): counts read sooner may miss calls.
    """

    async def read() -> dict[str, float]:
        values: dict[str, float] = {}
        for name, node in (("primary", cluster.primary), ("replica", cluster.replica)):
            values.update({f"{name}:{k}": v for k, v in (await _calls(node.dsn(database))).items()})
        return values

    deadline = time.monotonic() + within
    last, since = await read(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise SystemExit(f"the partner functions' call counts still move after {within:g}s")
        await asyncio.sleep(1.0)
        now = await read()
        if _counts(now) != _counts(last):  # the sequencer's time moves on its own, idle or not
            since = time.monotonic()
        last = now
    return last


def _counts(values: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in values.items() if not name.endswith(" ms")}


class ReplicaCpu:
    """``run.Meter``: the CPU seconds of the replica's whole postmaster tree over a measured run."""

    def __init__(self, node: Node) -> None:
        self._pid = postmaster(node)
        self._before = 0.0

    def begin(self) -> None:
        self._before = common.tree_cpu_seconds(self._pid)

    def end(self) -> dict[str, float]:
        return {"replica_cpu_s": common.tree_cpu_seconds(self._pid) - self._before}


class PrimaryProfile:
    """``run.Meter``: ``perf record`` (software clock, call graphs) on the primary's whole tree over a measured run.

    What PostgreSQL's own C functions spend on the primary per variant, where
    ``pg_stat_user_functions`` sees only PL/pgSQL and its report lags. The
    top symbols, by self time and then inclusive, go to ``path`` (``perf report``); nothing is
    returned to the run's figures.
    """

    def __init__(self, node: Node, path: Path) -> None:
        self._pid = postmaster(node)
        self._path = path
        self._perf: subprocess.Popen[bytes] | None = None

    def begin(self) -> None:
        pids = ",".join(map(str, common.process_tree(self._pid)))
        command = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-p", pids,
                   "-o", str(self._path.with_suffix(".data"))]  # fmt: skip
        self._perf = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def end(self) -> dict[str, float]:
        assert self._perf is not None
        self._perf.send_signal(signal.SIGINT)
        self._perf.wait(timeout=60)
        data = self._path.with_suffix(".data")
        reports = [
            subprocess.run(
                ["perf", "report", "-i", str(data), "--stdio", children, "--sort", "symbol",
                 "--percent-limit", "0.5", "-g", "none"],
                capture_output=True, text=True, check=False,
            ).stdout
            for children in ("--no-children", "--children")  # self time, then inclusive
        ]  # fmt: skip
        self._path.write_text("\n".join(reports))
        data.unlink(missing_ok=True)
        return {}


def access_log_calls(server: bench.Server) -> dict[str, int]:
    """Every call ``server``'s access log holds so far, by ``<method> <code>`` (warm-ups and checks included)."""
    counts: dict[str, int] = {}
    for record in bench.access_log_calls(server.log_path.read_bytes()):
        key = f"{str(record.get('method', '?')).rsplit('/', 1)[-1]} {record.get('code', '?')}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


async def caught_up(cluster: Cluster, within: float = 300.0) -> float:
    """Wait until the replica has replayed all the primary has written so far; return the seconds waited."""
    started = time.monotonic()
    primary = await asyncpg.connect(cluster.primary.dsn("postgres"))
    replica = await asyncpg.connect(cluster.replica.dsn("postgres"))
    try:
        written = await primary.fetchval("SELECT pg_current_wal_lsn()")
        while not await replica.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", written):
            if time.monotonic() - started > within:
                raise SystemExit(f"the replica did not replay the primary's WAL up to {written} in {within:g}s")
            await asyncio.sleep(0.1)
    finally:
        await primary.close()
        await replica.close()
    return time.monotonic() - started


async def replica_serving(internal_port: int, within: float = 60.0) -> str:
    """Wait until the gateway's health says its replica 0 is SERVING (a Watch on its internal listener)."""
    name = f"{REPLICA_HEALTH_PREFIX}0"
    status = "no answer"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{internal_port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name))
        try:
            async with asyncio.timeout(within):
                async for reply in stream:
                    status = str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return "SERVING"
        except TimeoutError:
            pass
        finally:
            stream.cancel()
    raise SystemExit(f"{name} is not SERVING after {within:g}s (last: {status}): see the gateway's log")


def reads_on_replica(cluster: Cluster, fx: bench.Fixture, server: bench.Server, calls: int = 50) -> dict[str, float]:
    """Make ``calls`` ListAppointments to ``server``; return the partner functions each node ran meanwhile.

    Exits unless every one was read on the replica and authorised on the primary.
    """
    database = fx.meta["database"]
    before = asyncio.run(settled_calls(cluster, database))
    for _ in range(calls):
        bench.check_answer("list", server.variant, bench.grpc_call(server.port, "list", fx.bodies[("gateway", "list")],
                                                                   server.metadata), fx)  # fmt: skip
    after = asyncio.run(settled_calls(cluster, database))
    seen = {k: after[k] - before[k] for k in after}
    if seen["replica:partner_list_appointments"] != calls or seen["primary:record_checked_basic_disclosures"] != calls:
        raise SystemExit(f"{server.variant}: of {calls} listings, not all were read on the replica and authorised "
                         f"on the primary: {seen}")  # fmt: skip
    return seen


def replica_share(accounting: dict[str, float], replica_gateways: list[str]) -> dict[str, float]:
    """Per scenario: the reads the replica ran over the calls the replica gateways answered (1.0: all of them)."""
    share = {}
    for scenario, function in READ_FUNCTION.items():
        method = bench.SCENARIOS[scenario]
        calls = sum(
            accounting.get(f"{g}: {method} {code}", 0.0) for g in replica_gateways for code in ("OK", "CANCELLED")
        )
        if calls:
            share[scenario] = round(accounting[f"replica:{function}"] / calls, 4)
    return share


def idle(cluster: Cluster, servers: list[bench.Server], seconds: float) -> dict[str, float]:
    """CPU per second of each node's postmaster tree and each server while no call is made (their background)."""
    trees = {"primary": postmaster(cluster.primary), "replica": postmaster(cluster.replica)}
    before = {name: common.tree_cpu_seconds(pid) for name, pid in trees.items()}
    before.update({s.variant: s.cpu_seconds() for s in servers})
    started = time.monotonic()
    time.sleep(seconds)  # the span measured: no event to wait for
    elapsed = time.monotonic() - started
    after = {name: common.tree_cpu_seconds(pid) for name, pid in trees.items()}
    after.update({s.variant: s.cpu_seconds() for s in servers})
    return {f"{name}_cpu_ms_per_s": round((after[name] - before[name]) * 1000 / elapsed, 2) for name in before}


# --------------------------------------------------------------------------- figures


def per_call(run: dict[str, Any]) -> dict[str, float]:
    """A run's throughput, latency and CPU per call (ms) of each node and of the server; the machine's other load."""
    n = max(run["requests"], 1)
    replica = run["extra"]["replica_cpu_s"]
    others = run["machine_cpu_s"] - run["server_cpu_s"] - run["pg_cpu_s"] - replica - run["loadgen_cpu_s"]
    return {
        "rps": run["rps"],
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
        "primary_ms": run["pg_cpu_s"] * 1000 / n,
        # Of which the backends of the world's database (the rest: WAL sender and writer, checkpointer, …).
        "backends_ms": run["db_cpu_s"] * 1000 / n,
        "replica_ms": replica * 1000 / n,
        "server_ms": run["server_cpu_s"] * 1000 / n,
        # The machine's busy CPUs that were none of these nor h2load (other people's work): the noise.
        "other_cpus": max(others, 0.0) / max(run["duration_s"], 1e-9),
        "records_per_commit": run["ledger_records"] / run["ledger_commits"] if run["ledger_commits"] else 0.0,
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict[str, Any]], scenarios: list[str], rounds: int) -> dict[str, Any]:
    """Per scenario: each variant's median figures, and per round the primary-CPU and throughput ratios to naive."""
    out: dict[str, Any] = {}
    for scenario in scenarios:
        found = {(r["variant"], r["round"]): per_call(r) for r in runs if r["scenario"] == scenario}
        variants = {}
        for variant in VARIANTS:
            rows = [found[(variant, n)] for n in range(rounds) if (variant, n) in found]
            if rows:
                variants[variant] = {k: round(_median([row[k] for row in rows]), 4) for k in rows[0]}
        ratios: dict[str, Any] = {}
        for variant in VARIANTS[:-1]:
            for figure, key in (("primary_cpu", "primary_ms"), ("throughput", "rps")):
                each = [found[(variant, n)][key] / found[("naive", n)][key] for n in range(rounds)
                        if (variant, n) in found and ("naive", n) in found and found[("naive", n)][key]]  # fmt: skip
                if each:
                    ratios[f"{variant}/naive {figure}"] = {
                        "median": round(_median(each), 3), "min": round(min(each), 3), "max": round(max(each), 3)
                    }  # fmt: skip
        out[scenario] = {"variants": variants, "ratios": ratios}
    return out


def render(report: dict[str, Any]) -> str:
    """The markdown report: settings, the per-variant table, the ratios and the target."""
    lines = [
        f"# Reads on a streaming replica — {report['date']}",
        "",
        f"- command: `{report['command']}`",
        f"- commit {report['commit']}; PostgreSQL {report['postgresql']} (a primary and a `pg_basebackup` "
        "streaming replica made for the run, `demo/cluster.py`, fsync off)",
        f"- machine: {report['machine']['nproc']} CPUs ({report['machine']['cpu_model']}), shared with other work: "
        f"1-minute load {report['load_before']:.2f} before the run, {report['load_range']} during the runs",
        f"- world {report['settings']['world']} on the primary, generated in {report['generate_s']:.0f} s; the "
        f"replica caught up {report['catch_up_s']:.1f} s after the fixture; c={report['settings']['concurrency']}, "
        f"{report['settings']['duration_s']:g} s runs after {report['settings']['warmup_s']:g} s of warm-up, "
        f"{report['settings']['rounds']} rounds (every other one in reverse variant order), one process per server",
        "- idle, all servers up (CPU ms per second): "
        + ", ".join(f"{k.removesuffix('_cpu_ms_per_s')} {v:g}" for k, v in report["idle"].items()),
        f"- before the load: {report['replica_check']['calls']} listings to gateway+replica, read "
        f"{report['replica_check']['replica:partner_list_appointments']:.0f} times on the replica and authorised "
        f"{report['replica_check']['primary:record_checked_basic_disclosures']:.0f} times on the primary",
        "- over the whole run (warm-ups and checks included), the partner functions' calls on each node against "
        "the calls in each gateway's access log:",
        "",
        "  | | calls |",
        "  | --- | ---: |",
        *(f"  | {name} | {count:,.0f} |" for name, count in report["accounting"].items()),
        "",
        "  Reads on the replica per call the replica gateways answered (OK or cancelled by h2load at the end of a "
        "run): " + ", ".join(f"{bench.SCENARIOS[k]} {v:.4f}" for k, v in report["replica_share"].items()) + ".",
        "",
        "Medians over the rounds; CPU in ms per call (primary, replica: each node's whole postmaster tree; of the "
        "primary's, its backends of the world's database; server: the server's process); records/commit: ledger "
        "records per transaction that wrote them; others: the machine's busy CPUs that were none of these nor "
        "h2load, on average (other people's work).",
        "",
    ]
    for scenario, data in report["summary"].items():
        lines += [f"## {bench.SCENARIOS[scenario]}", "",
                  "| variant | calls/s | p50 ms | p99 ms | primary CPU | of which backends | replica CPU | server CPU "
                  "| records/commit | others |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for variant, v in data["variants"].items():
            lines.append(
                f"| {variant} | {v['rps']:,.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['primary_ms']:.3f} | "
                f"{v['backends_ms']:.3f} | {v['replica_ms']:.3f} | {v['server_ms']:.3f} | "
                f"{v['records_per_commit']:.2f} | {v['other_cpus']:.2f} |"
            )
        lines += ["", "| ratio (median of the rounds, range) | value |", "| --- | ---: |"]
        for name, r in data["ratios"].items():
            lines.append(f"| {name} | {r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}) |")
        lines.append("")
    verdict = report["summary"].get("list", {}).get("ratios", {}).get("gateway+replica/naive primary_cpu")
    if verdict is not None:
        met = "met" if verdict["median"] <= TARGET else "NOT met"
        lines.append(f"Target (issue 27): the primary's CPU per ListAppointments with the replica ≤ {TARGET}× the "
                     f"naive handler's: {verdict['median']:.3f} — {met}.")  # fmt: skip
    errors = sum(r["errors"] for r in report["runs"])
    lines.append(f"Errors over all runs: {errors}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="100k", help="bench world (default 100k)")
    parser.add_argument("--scenarios", default="list,get", help="list, get or both (default both)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, every other one in reverse order (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent calls (default 16)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each measured run")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle background measured first")
    parser.add_argument("--port-base", type=int, default=56250)
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results")
    parser.add_argument("--whatif", metavar="PATCHES", default="",
                        help="add gateway+replica+whatif: the replica gateway with bench/whatif.py's variants "
                             "(norecord: what the primary's CPU is without the ledger record)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs and the cluster's directory")
    parser.add_argument("--perf", action="store_true",
                        help="perf record the primary's processes during each variant's first-round run "
                             "(<out>/<date>-replica-perf-<variant>-<scenario>.txt)")  # fmt: skip
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(READ_FUNCTION)
    if unknown or args.rounds < 1:
        parser.error(f"unknown scenario(s) {sorted(unknown)}" if unknown else "--rounds must be at least 1")
    # bench/run.py's helpers read these: one process per server, the gateway's event loop for the baseline.
    args.workers, args.baseline_loop = 1, "same"
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop everything


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install -y nghttp2-client (make bench-replica does it)")
    scenarios = args.scenarios.split(",")
    size = common.parse_size(args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                            text=True, check=False).stdout.strip() or "?"  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "service", "migrations", "bench", "demo"],
                           cwd=common.ROOT, capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": asdict(common.Machine.probe()),
        "commit": commit + (" + uncommitted changes in service/, migrations/, bench/ or demo/" if dirty else ""),
        "command": " ".join(["bench/replica.py", *argv]),
        "load_before": os.getloadavg()[0],
        "settings": {"world": common.size_label(size), "concurrency": args.concurrency, "duration_s": args.duration,
                     "warmup_s": args.warmup, "rounds": args.rounds, "scenarios": scenarios},
        "runs": [],
    }  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="apptgate-bench-replica-"))
    workdir = base / "servers"
    workdir.mkdir()
    cluster = Cluster(base)
    servers: list[bench.Server] = []
    try:
        log(f"a primary and a streaming replica in {base}")
        cluster.start()
        os.environ["BENCH_ADMIN_DSN"] = cluster.primary.dsn("postgres")  # datagen and the fixture use the primary
        started = time.monotonic()
        meta = asyncio.run(datagen.generate_world(datagen.WorldSpec(size)))
        report["generate_s"] = time.monotonic() - started
        report["postgresql"] = asyncio.run(bench._pg_version())
        fx = asyncio.run(bench.prepare_fixture(size, meta))
        report["catch_up_s"] = asyncio.run(caught_up(cluster))
        database = meta["database"]
        port = args.port_base
        replica_url = partner_login_dsn(cluster.replica.dsn(database))
        by_variant: dict[str, bench.Server] = {}
        replica_env = {"APPTGATE_READ_REPLICA_URLS": replica_url}
        gateways = [("gateway", 0, {}), ("gateway+replica", 10, replica_env)]
        if args.whatif:
            gateways.append(("gateway+replica+whatif", 30, replica_env))
        for variant, offset, extra_env in gateways:
            by_variant[variant] = bench.start_gateway(fx, variant, port + offset, workdir, args, extra_env)
            servers.append(by_variant[variant])
        by_variant["naive"] = bench.start_baseline(fx, "naive", port + 20, workdir, args)
        servers.append(by_variant["naive"])
        for variant, offset, _ in gateways[1:]:
            log(f"replica {asyncio.run(replica_serving(port + offset + 1))} on {variant}'s health")
        expected: dict[str, int] = {}
        for scenario in scenarios:
            data = bench.grpc_call(port, scenario, fx.bodies[("gateway", scenario)], by_variant["gateway"].metadata)
            bench.check_answer(scenario, "gateway", data, fx)
            expected[scenario] = len(data)
        bench.check_same_answers(by_variant["gateway"], fx, by_variant["gateway+replica"], fx)
        report["replica_check"] = {"calls": 50, **reads_on_replica(cluster, fx, by_variant["gateway+replica"], 50)}
        report["idle"] = idle(cluster, servers, args.idle)
        log(f"idle: {report['idle']}")
        primary_pid = postmaster(cluster.primary)
        meter = ReplicaCpu(cluster.replica)
        for round_ in range(args.rounds):
            for scenario in scenarios:
                order = [v for v in VARIANTS if v in by_variant]
                for variant in order if round_ % 2 == 0 else order[::-1]:
                    server = by_variant[variant]
                    exp = expected[scenario] if server.kind == "gateway" else 0
                    meters: list[bench.Meter] = [meter]
                    if args.perf and round_ == 0:
                        profile = args.out / f"{stamp}-replica-perf-{variant}-{scenario}.txt"
                        meters.append(PrimaryProfile(cluster.primary, profile))
                    run = bench.measure(server, scenario, args.concurrency, fx, workdir, args, primary_pid, exp,
                                        meters=meters)  # fmt: skip
                    figures = per_call(asdict(run))
                    log(f"    primary {figures['primary_ms']:.3f}  replica {figures['replica_ms']:.3f} ms/call")
                    report["runs"].append({**asdict(run), "round": round_})
            if round_ == 0:  # still SERVING after a round of load (the lag bound held)
                log(f"replica {asyncio.run(replica_serving(port + 11, within=5))} after the first round")
        report["accounting"] = asyncio.run(settled_calls(cluster, database))
        for variant, _, _ in gateways:
            report["accounting"].update(
                {f"{variant}: {k}": float(v) for k, v in access_log_calls(by_variant[variant]).items()}
            )
        log(f"accounting: {report['accounting']}")
        report["replica_share"] = replica_share(report["accounting"], [v for v, _, _ in gateways[1:]])
    finally:
        for server in servers:
            server.stop()
        cluster.stop()
        if args.keep:
            log(f"kept {base} (servers' logs in {workdir}, the stopped cluster)")
        else:
            shutil.rmtree(base, ignore_errors=True)
    loads = [r["load_1m"] for r in report["runs"]]
    report["load_range"] = f"{min(loads):.1f}–{max(loads):.1f}"
    report["summary"] = summarize(report["runs"], scenarios, args.rounds)
    md, js = args.out / f"{stamp}-replica.md", args.out / f"{stamp}-replica.json"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(render(report))
    print(md.read_text())
    log(f"written: {md}, {js}")
    return 0 if all(r["errors"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
