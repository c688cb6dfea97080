"""Instructions per call of the gateway, counted by callgrind: a figure this noisy machine cannot move.

Throughput and CPU time on the shared 2-core machine move by ±20% between
consecutive runs; instruction counts do not (the same binary, inputs and
environment give the same total whatever else runs). This starts the gateway
on the bench's 100k world under ``valgrind --tool=callgrind`` with collection
off, warms it up, counts only while one client makes N calls of one
scenario (``--scenario``: ``list``, the default, ``get`` or ``contact``, as
in run.py) one at a time over one channel, and prints the total per call;
the dump (``callgrind_annotate`` reads it) is kept for the breakdown.

    .venv/bin/python bench/instructions.py plain tracing sampled-out --calls 300
    .venv/bin/python bench/instructions.py plain --scenario contact --keep /tmp/cg
    .venv/bin/python bench/instructions.py plain --scenario get --at-commit HEAD   # before a change
    .venv/bin/python bench/instructions.py plain naive --scenario get --clock --calls 1000

``--clock`` runs without valgrind and reports what the instructions leave
out — system calls, waiting, the kernel's share — as CPU and wall time per
call and the idle server's CPU: one call at a time, so the figures of c=1,
and noisy (repeat and alternate).

Variants: ``plain`` (tracing off, as ``gateway`` in run.py), ``tracing``
(100% to the OTLP sink, as ``gateway+tracing``), ``sampled-out`` (a tracer
provider whose sampler drops every span: what tracing costs before any span
is recorded), ``naive`` (the naive handler of ``bench/baselines.py``: the
gateway's server-side cost against it, noise-free; PostgreSQL's share is not
counted for either), ``norecord``, ``nodatabase`` and ``cold`` (the plain gateway with that
variant of ``bench/whatif.py``: what the ledger record costs the gateway's
process; what a get or a contact read costs it with no statement at all; a
page built with its views and pseudonyms remembered nowhere). Each counts the whole
process (the event loop, grpc's threads, the export thread, the sequencer's
passes during the calls). ~1 min per variant. Needs valgrind (Debian's
``valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import datagen  # noqa: E402
import run  # noqa: E402
from common import ROOT, service_env, set_source, source, tree_cpu_seconds  # noqa: E402

VARIANTS = ("plain", "tracing", "sampled-out", "naive", "norecord", "nodatabase", "cold")
#: Variants that are the plain gateway with one of bench/whatif.py's parts replaced.
WHATIF = ("norecord", "nodatabase", "cold")
PORT, SINK_PORT = 57400, 57490


@contextlib.contextmanager
def serving(variant: str, fx: run.Fixture, workdir: Path, prefix: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """One server of ``variant`` on :data:`PORT`, started under ``prefix`` (valgrind, or nothing)."""
    traced = variant not in ("plain", "naive", *WHATIF)
    env = run.gateway_env(fx, PORT, workdir, tracing=traced, sink_port=SINK_PORT, workers=1)
    if variant == "sampled-out":
        env["OTEL_TRACES_SAMPLER"] = "always_off"
    command = [*prefix, run.PY]
    if variant == "naive":  # on the gateway's event loop
        loop = run.gateway_loop()
        command += [str(BENCH_DIR / "baselines.py"), "naive", "--port", str(PORT), "--dsn", fx.dsn,
                    "--partner-id", fx.meta["bench_partner_id"], "--loop", loop]  # fmt: skip
    elif variant in WHATIF:
        env["APPTGATE_WHATIF"] = variant
        command += [str(BENCH_DIR / "whatif.py"), "serve"]
    else:
        command += ["-m", "service", "serve"]
    run.ensure_port_free(PORT)
    sink = None
    if traced:
        sink = subprocess.Popen([run.PY, str(BENCH_DIR / "otlp_sink.py"), "--port", str(SINK_PORT)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    with (workdir / f"{variant}.log").open("wb") as log:
        server = subprocess.Popen(command, cwd=source(), env=service_env(env), stdout=log, stderr=log)
    try:
        yield server
    finally:
        server.terminate()
        server.wait(timeout=120)
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=10)


def _caller(variant: str, fx: run.Fixture, scenario: str, channel: grpc.Channel) -> Callable[[], object]:
    """One call of ``scenario`` against the server of ``variant``, once the channel is ready."""
    call = channel.unary_unary(run.SERVICE + run.SCENARIOS[scenario])
    metadata = [("authorization", f"Bearer {fx.partner_key}")]
    body = fx.bodies[("naive" if variant == "naive" else "gateway", scenario)]
    grpc.channel_ready_future(channel).result(timeout=300)  # startup under valgrind takes a while
    return lambda: call(body, metadata=metadata, timeout=30)


def count(variant: str, fx: run.Fixture, calls: int, workdir: Path, scenario: str = "list") -> int:
    """Instructions the gateway executed during ``calls`` sequential calls of ``scenario``."""
    out = workdir / f"callgrind.{variant}.out"
    prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    with serving(variant, fx, workdir, prefix) as server, grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        call = _caller(variant, fx, scenario, channel)
        for _ in range(50):
            call()
        subprocess.run(["callgrind_control", "--instr=on", str(server.pid)], check=True, capture_output=True)
        for _ in range(calls):
            call()
        subprocess.run(["callgrind_control", "--instr=off", str(server.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True, capture_output=True)
    dumps = sorted(workdir.glob(f"callgrind.{variant}.out.*"))
    totals = re.search(r"^totals: (\d+)", dumps[-1].read_text(), re.MULTILINE)
    if totals is None:
        raise SystemExit(f"{dumps[-1]}: no totals line")
    return int(totals.group(1))


def clock(variant: str, fx: run.Fixture, calls: int, workdir: Path, scenario: str = "list") -> str:
    """CPU and wall time per call of ``calls`` sequential calls, natively (noisy), and the idle server's CPU."""
    with serving(variant, fx, workdir, []) as server, grpc.insecure_channel(f"127.0.0.1:{PORT}") as channel:
        call = _caller(variant, fx, scenario, channel)
        for _ in range(200):
            call()
        time.sleep(1)
        cpu, started = tree_cpu_seconds(server.pid), time.monotonic()
        time.sleep(10)
        idle = (tree_cpu_seconds(server.pid) - cpu) / (time.monotonic() - started)
        cpu, started = tree_cpu_seconds(server.pid), time.monotonic()
        for _ in range(calls):
            call()
        wall, cpu = time.monotonic() - started, tree_cpu_seconds(server.pid) - cpu
    return (
        f"{calls / wall:5.0f} calls/s, {wall / calls * 1000:6.2f} ms of wall and {cpu / calls * 1000:6.3f} ms of "
        f"server CPU per {scenario} call; idle, {idle * 100:.1f}% of a core"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--scenario", choices=sorted(run.SCENARIOS), default="list")
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here (for callgrind_annotate)")
    parser.add_argument("--at-commit", metavar="REV", help="count this commit (git archive) instead of the work tree")
    parser.add_argument("--source", type=Path, help="count this source tree (a patched copy) instead of the work tree")
    parser.add_argument("--clock", action="store_true", help="no valgrind: CPU and wall time per call (noisy)")
    args = parser.parse_args()
    if not args.clock and shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: apt-get install -y valgrind")
    if args.source:
        set_source(args.source)
    elif args.at_commit:
        exported = Path(tempfile.mkdtemp(prefix="apptgate-src-"))
        archive = subprocess.run(["git", "archive", args.at_commit], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(exported)], input=archive.stdout, check=True)
        set_source(exported)
        print(f"counting {args.at_commit} (exported to {exported}), not the work tree", flush=True)
    meta = asyncio.run(datagen.generate_world(datagen.WorldSpec(100_000)))
    fx = asyncio.run(run.prepare_fixture(100_000, meta))
    results: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="apptgate-instructions-") as tmp:
        for variant in args.variants:
            if args.clock:
                print(f"{variant:12} {clock(variant, fx, args.calls, Path(tmp), args.scenario)}", flush=True)
                continue
            started = time.monotonic()
            results[variant] = count(variant, fx, args.calls, Path(tmp), args.scenario)
            print(f"{variant:12} {results[variant] / args.calls / 1e6:7.3f} M instructions per {args.scenario} call "
                  f"({args.calls} calls, {time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in Path(tmp).glob("callgrind.*.out.*"):
                shutil.copy(dump, args.keep / dump.name)
    base = results.get("plain")
    if base:
        for variant, total in results.items():
            if variant != "plain":
                print(f"{variant} / plain: {total / base:.3f}")


if __name__ == "__main__":
    main()
