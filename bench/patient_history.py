"""A patient's history over the ledger of 10M disclosures: issue 25's "under 100 ms at p99".

``ListPatientDisclosures`` aggregates every ledger item about one patient (the
records holding its appointments, found by the GIN index on ``patient_ids``,
and the records repeating them by reference, by ``items_of``). This times, for
many distinct patients of ``apptgate_bench_ledger`` (the most-disclosed ones
and a seeded uniform sample of the others), one call at a time and
interleaved per patient, so that drift and the cache warmed by the first
reading of a patient's records favour none of them:

* ``rpc``: ``ListPatientDisclosures`` (first page, default size 50, no window)
  through a gateway (``python -m service serve``, one process) on the ledger
  database, from a gRPC client: what a caller of the internal API waits;
* ``statement``: ``service.store.privacy.PATIENT_DISCLOSURES_SQL`` with the
  RPC's arguments, on one long-lived asyncpg connection, as the gateway's pool
  runs it (a prepared statement, so PostgreSQL plans it for its parameters the
  first five times and may then keep a generic plan): its calls from the sixth
  are also summed up apart, with how many of them ran the generic plan
  (``pg_prepared_statements``);
* ``statement, generic plan``: the same on a connection with
  ``plan_cache_mode = force_generic_plan``, every call under the plan a
  prepared statement may fall back to whatever PostgreSQL's costing chooses
  today (its rows must equal the statement's);
* ``naive``: the same aggregation over the ``disclosure_items`` view filtered by
  patient, as a team without the statement would write it (it reads the whole
  ledger), for a few of the patients (``--history-naive``): the baseline of
  the ratio. Its groups must equal the statement's.

Every patient's counts are also checked against the ledger's census (the sum
of ``count`` over the history equals the items the ledger holds for the
patient, references included). Then ``EXPLAIN (ANALYZE, BUFFERS)`` of the
statement for the most-disclosed patient, with the plan PostgreSQL builds for
its values and with the generic plan.

The ledger database gets the patients, appointments, practitioners and
consents its records name (``datagen.ensure_ledger_scheduling``, once).

``bench/run.py`` runs it after the breach report whenever the ledger is there
(``--ledger``; ``--history-patients 0`` skips it). Alone::

    .venv/bin/python bench/patient_history.py [--patients 200] [--naive 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asyncpg
import grpc
import grpc.aio

import datagen
import run as bench
from common import BENCH_DIR, admin_dsn, parse_size, service_env, size_label, source, with_database
from history_sql import CENSUS_SQL, NAIVE_SQL

TARGET_P99_MS = 100.0
#: The window of a history without bounds, as the RPC passes it (``service/api/audit.py``).
EVER = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))
#: The RPC's default page; the statement is asked for one row more, as the RPC asks.
PAGE = 50
METHOD = "/appointments.internal.v1.AuditService/ListPatientDisclosures"


def log(message: str) -> None:
    bench.log(message)


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile ``p`` (0–100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(ms: list[float]) -> dict[str, Any]:
    return {
        "calls": len(ms),
        "under_target": sum(x < TARGET_P99_MS for x in ms),
        "min_ms": round(min(ms), 3),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def pick(census: list[tuple[uuid.UUID, int]], total: int, top: int, seed: int) -> list[dict[str, Any]]:
    """The ``top`` most-disclosed patients, then a seeded uniform sample of the others, ``total`` in all, shuffled."""
    ranked = sorted(census, key=lambda row: (-row[1], str(row[0])))
    chosen = [{"patient_id": p, "items": n, "kind": "most disclosed"} for p, n in ranked[:top]]
    rng = random.Random(seed)
    others = ranked[top:]
    sample = rng.sample(others, min(max(total - top, 0), len(others)))
    chosen += [{"patient_id": p, "items": n, "kind": "random"} for p, n in sample]
    rng.shuffle(chosen)
    return chosen


def _group(row: Any) -> tuple[Any, ...]:
    """One history entry, comparable across the statement and the baseline (its first 15 columns, in order)."""
    return (row[0], row[1], row[2], row[3], row[4] or "", row[5] or "", row[6], tuple(row[7]), row[8], row[9],
            row[10], row[11] or "", row[12], row[13], row[14])  # fmt: skip


class Gateway:
    """``python -m service serve`` on the ledger database; its internal listener answers the history."""

    def __init__(self, dsn: str, seed: int, port: int, workdir: Path) -> None:
        from service.access.consent_tokens import SigningKey

        fx = bench.Fixture(0, dsn, {})
        fx.server_secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
        fx.signing_key = SigningKey.generate().secret_paserk()
        # A derived data key: the gateway records its check in the database, so every run must bring the same one.
        fx.data_key = datagen.bench_data_key(seed)
        for p in (port, port + 1):
            bench.ensure_port_free(p)
        env = bench.gateway_env(fx, port, workdir, tracing=False, sink_port=0, workers=1)
        command = [bench.PY, "-m", "service", "serve"]
        log_path = workdir / "gateway-ledger.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(command, cwd=source(), env=service_env(env), stdout=out, stderr=out)
        self.server = bench.Server("gateway (ledger)", port, [proc], log_path, [], "gateway")
        self.internal = f"127.0.0.1:{port + 1}"
        self.metadata = (("authorization", f"Bearer {bench.INTERNAL_TOKEN}"),)

    def wait(self, patient: uuid.UUID) -> None:
        from appointments.internal.v1 import audit_service_pb2 as audit_pb

        body = audit_pb.ListPatientDisclosuresRequest(patient_id=str(patient)).SerializeToString()

        def check() -> None:
            with grpc.insecure_channel(self.internal) as channel:
                channel.unary_unary(METHOD)(body, metadata=self.metadata, timeout=10)

        try:
            bench.wait_listening(self.server, check)
        except BaseException:
            self.server.stop()
            raise


async def _explain(conn: asyncpg.Connection, name: str, patient: uuid.UUID, mode: str) -> str:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the prepared statement ``name`` for ``patient``, under ``mode``."""
    await conn.execute(f"SET plan_cache_mode = {mode}")
    try:
        since, until = (t.isoformat() for t in EVER)
        rows = await conn.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE {name}('{patient}', '{since}', '{until}', NULL, NULL, {PAGE + 1})"
        )
    finally:
        await conn.execute("RESET plan_cache_mode")
    return "\n".join(r[0] for r in rows)


async def measure_async(
    dsn: str, chosen: list[dict[str, Any]], naive_count: int, gateways: dict[str, Gateway]
) -> dict[str, Any]:
    from appointments.internal.v1 import audit_service_pb2 as audit_pb
    from service.store.privacy import PATIENT_DISCLOSURES_SQL

    # One long-lived connection, as a pool connection of the gateway: asyncpg prepares the statement and keeps it;
    # another that only ever runs its generic plan.
    conns = {
        "statement": await asyncpg.connect(dsn),
        "statement, generic plan": await asyncpg.connect(
            dsn, server_settings={"plan_cache_mode": "force_generic_plan"}
        ),
    }
    channels = {name: grpc.aio.insecure_channel(g.internal) for name, g in gateways.items()}
    rpcs = {name: channel.unary_unary(METHOD) for name, channel in channels.items()}
    variants = [*gateways, *conns]
    ms: dict[str, list[float]] = {v: [] for v in variants}
    by_kind: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    problems: list[str] = []
    histories: dict[uuid.UUID, list[tuple[Any, ...]]] = {}
    checked = 0
    try:
        for index, entry in enumerate(chosen):
            patient = entry["patient_id"]
            rows_of: dict[str, list[Any]] = {}
            pages: dict[str, list[Any]] = {}
            # Rotate the order per patient: the first to run reads the patient's records into the caches.
            order = variants[index % len(variants) :] + variants[: index % len(variants)]
            for variant in order:
                if variant in rpcs:
                    body = audit_pb.ListPatientDisclosuresRequest(patient_id=str(patient)).SerializeToString()
                    started = time.perf_counter()
                    data = await rpcs[variant](body, metadata=gateways[variant].metadata, timeout=30)
                    elapsed = time.perf_counter() - started
                    pages[variant] = list(audit_pb.ListPatientDisclosuresResponse.FromString(data).disclosures)
                else:
                    started = time.perf_counter()
                    rows_of[variant] = await conns[variant].fetch(
                        PATIENT_DISCLOSURES_SQL, patient, *EVER, None, None, PAGE + 1
                    )
                    elapsed = time.perf_counter() - started
                ms[variant].append(elapsed * 1000)
                by_kind[variant].setdefault(entry["kind"], []).append(elapsed * 1000)
            rows = rows_of["statement"]
            histories[patient] = [_group(r) for r in rows]
            if [tuple(r) for r in rows_of["statement, generic plan"]] != [tuple(r) for r in rows]:
                problems.append(f"{patient}: the generic plan's rows differ from the statement's")
            for variant, entries in pages.items():
                if len(entries) != min(len(rows), PAGE) or any(
                    e.count != r[14] or e.partner.display_name != r[1] or e.appointment.appointment_id != str(r[2])
                    for e, r in zip(entries, rows, strict=False)
                ):
                    problems.append(f"{patient}: the page of {variant} differs from the statement's rows")
            if len(rows) <= PAGE:
                checked += 1
                if sum(r[14] for r in rows) != entry["items"]:
                    problems.append(f"{patient}: history counts {sum(r[14] for r in rows)}, ledger {entry['items']}")
            if (index + 1) % 50 == 0:
                log(f"  {index + 1}/{len(chosen)} patients: "
                    + ", ".join(f"{v} p50 {percentile(ms[v], 50):.1f} ms" for v in variants))  # fmt: skip
        # The plans each connection ran: custom ones for the first five calls, then the generic one if it is kept.
        plans = {
            name: await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
                PATIENT_DISCLOSURES_SQL,
            )
            for name, conn in conns.items()
        }
        # The baseline, for a few patients (each call reads the whole ledger): the most disclosed first.
        naive_patients = [e for e in chosen if e["kind"] == "most disclosed"][:3]
        naive_patients += [e for e in chosen if e["kind"] == "random"][: max(naive_count - len(naive_patients), 0)]
        naive_patients = naive_patients[:naive_count]
        naive_ms: list[float] = []
        naive_conn = await asyncpg.connect(dsn)
        try:
            for entry in naive_patients:
                patient = entry["patient_id"]
                started = time.perf_counter()
                rows = await naive_conn.fetch(NAIVE_SQL, patient, *EVER, PAGE + 1)
                naive_ms.append((time.perf_counter() - started) * 1000)
                if len(histories[patient]) <= PAGE and sorted(map(_group, rows), key=repr) != sorted(
                    histories[patient], key=repr
                ):
                    problems.append(f"{patient}: the baseline's groups differ from the statement's")
            # The plans, for the most-disclosed patient: as planned for its values, and generic.
            top = max(chosen, key=lambda e: e["items"])["patient_id"]
            explain: dict[str, str] = {}
            await naive_conn.execute(
                "PREPARE history_statement(uuid, timestamptz, timestamptz, timestamptz, text, integer) AS "
                + PATIENT_DISCLOSURES_SQL
            )
            for mode, label in (("force_custom_plan", "custom plan"), ("force_generic_plan", "generic plan")):
                explain[f"statement, {label}"] = await _explain(naive_conn, "history_statement", top, mode)
        finally:
            await naive_conn.close()
    finally:
        for conn in conns.values():
            await conn.close()
        for channel in channels.values():
            await channel.close()
    variant_figures = {
        v: {**summary(ms[v]), "by_kind": {k: summary(x) for k, x in sorted(by_kind[v].items())}} for v in variants
    }
    if len(ms["statement"]) > 5:  # from the sixth call, when PostgreSQL may have settled on the generic plan
        variant_figures["statement"]["from_sixth"] = summary(ms["statement"][5:])
    for name, row in plans.items():
        variant_figures[name]["plans"] = row and {"generic": row["generic_plans"], "custom": row["custom_plans"]}
    return {
        "variants": variant_figures,
        "naive": {
            **(summary(naive_ms) if naive_ms else {}),
            "patients": [str(e["patient_id"]) for e in naive_patients],
        },
        "checked_counts": checked,
        "problems": problems,
        "explain": explain,
        "explain_patient": str(top),
    }


def measure(ledger_meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """Time a patient's history over the ledger (see the module docstring); ``None`` when the source lacks it."""
    try:
        import service.store.privacy  # noqa: F401
    except ImportError:
        log("  patient history: the measured source has no service.store.privacy (issue 25): skipped")
        return None
    dsn = with_database(admin_dsn(), datagen.LEDGER_DB)
    datagen.migrate(dsn)
    scheduling = asyncio.run(datagen.ensure_ledger_scheduling(dsn))
    started = time.monotonic()
    census = asyncio.run(_census(dsn))
    items = sorted(n for _, n in census)
    chosen = pick(census, args.history_patients, args.history_top, args.history_seed)
    log(f"  patient history: {len(chosen)} patients ({args.history_top} most disclosed, "
        f"{len(chosen) - args.history_top} at random) of {len(census):,}")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="apptgate-history-"))
    load = [round(os.getloadavg()[0], 2)]
    gateways: dict[str, Gateway] = {}
    try:
        if not args.history_no_rpc:
            seed = int(ledger_meta["spec"]["seed"])
            gateways["rpc"] = Gateway(dsn, seed, args.port_base + 60, workdir)
            for gateway in gateways.values():
                gateway.wait(chosen[0]["patient_id"])
                log(f"  {gateway.server.variant}: {gateway.internal}, pid {gateway.server.pids}")
        result = asyncio.run(measure_async(dsn, chosen, args.history_naive, gateways))
    finally:
        for gateway in gateways.values():
            gateway.server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result.update(
        ledger={
            "records": ledger_meta["head_seq"],
            "items": ledger_meta["items"],
            "patients": len(census),
            "items_per_patient": {"p50": percentile(items, 50), "p99": percentile(items, 99), "max": items[-1]},
        },
        scheduling=scheduling,
        patients={
            "total": len(chosen),
            "most_disclosed": sum(e["kind"] == "most disclosed" for e in chosen),
            "seed": args.history_seed,
            "page_size": PAGE,
        },
        target_p99_ms=TARGET_P99_MS,
        seconds=round(time.monotonic() - started, 1),
        load_1m=[*load, round(os.getloadavg()[0], 2)],  # before and after: other work on the machine
    )
    for variant, figures in result["variants"].items():
        log(f"  {variant}: p50 {figures['p50_ms']:.2f} / p95 {figures['p95_ms']:.2f} / p99 {figures['p99_ms']:.2f} / "
            f"max {figures['max_ms']:.2f} ms")  # fmt: skip
    after = result["variants"]["statement"].get("from_sixth")
    if after:
        log(f"  statement from its sixth call: p50 {after['p50_ms']:.2f} / p99 {after['p99_ms']:.2f} / "
            f"max {after['max_ms']:.2f} ms")  # fmt: skip
    for name in ("statement", "statement, generic plan"):
        log(f"  {name}: plans {result['variants'][name].get('plans') or '?'}")
    if result["naive"].get("calls"):
        log(f"  naive ({result['naive']['calls']} patients): p50 {result['naive']['p50_ms']:.0f} ms")
    for problem in result["problems"]:
        log(f"  ! {problem}")
    return result


async def _census(dsn: str) -> list[tuple[uuid.UUID, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [(r[0], int(r[1])) for r in await conn.fetch(CENSUS_SQL)]
    finally:
        await conn.close()


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "history-") -> None:
    """The scenario's options (``--history-…`` in ``bench/run.py``, without the prefix here)."""
    parser.add_argument(f"--{prefix}patients", type=int, default=200,
                        help="distinct patients whose history is timed (default 200; 0 skips it)")  # fmt: skip
    parser.add_argument(f"--{prefix}top", type=int, default=20, help="of which the most disclosed (default 20)")
    parser.add_argument(f"--{prefix}naive", type=int, default=10,
                        help="patients timed with the naive query over disclosure_items (~2.5 s each)")  # fmt: skip
    parser.add_argument(f"--{prefix}seed", type=int, default=25)
    parser.add_argument(f"--{prefix}no-rpc", dest="history_no_rpc", action="store_true",
                        help="time the statement only (no gateway)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, prefix="")
    parser.add_argument("--ledger-items", default="10m", help="the ledger (generated when missing; default 10m)")
    parser.add_argument("--port-base", type=int, default=56050)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    for name in ("patients", "top", "naive", "seed"):
        setattr(args, f"history_{name}", getattr(args, name))
    signal.signal(signal.SIGTERM, bench._terminate)
    ledger_meta = asyncio.run(datagen.generate_ledger(datagen.LedgerSpec(parse_size(args.ledger_items))))
    started = datetime.now(UTC)
    result = measure(ledger_meta, args)
    if result is None:
        return 1
    import report as report_module

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source(), capture_output=True, text=True,
                            check=False).stdout.strip() or "?"  # fmt: skip
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "service", "migrations"], cwd=source(),
                                capture_output=True, text=True, check=False).stdout.strip())  # fmt: skip
    document = {
        "date": started.isoformat(timespec="seconds"),
        "commit": commit + (" + uncommitted changes in service/ or migrations/" if dirty else ""),
        "command": " ".join(["patient_history.py", *(argv if argv is not None else sys.argv[1:])]),
        "history": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M") + "-history"
    (args.out / f"{stamp}.json").write_text(json.dumps(document, indent=1) + "\n")
    text = "\n".join([f"# apptgate: a patient's history — {document['date']}", "",
                      f"- commit {document['commit']}; command: `{document['command']}`", "",
                      *report_module.history_section(result)])  # fmt: skip
    (args.out / f"{stamp}.md").write_text(text + "\n")
    print(text)
    log(f"written {args.out / stamp}.md, .json ({size_label(ledger_meta['items'])} ledger)")
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
