"""Turns a benchmark run (the JSON that ``bench/run.py`` collects) into its markdown table, ratios and chart.

.venv/bin/python bench/report.py bench/results/2030-01-01-1200.json   # re-render a stored run
.venv/bin/python bench/report.py --defense A.json B.json …  # issue 6's ratios across runs (median, range)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

SCENARIO_NAMES = {"list": "ListAppointments (page of 50)", "get": "GetAppointment",
                  "contact": "GetAppointmentContact (valid token)"}  # fmt: skip
VARIANT_ORDER = ["gateway", "gateway-nodefense", "gateway+tracing", "gateway+whatif", "naive", "bare"]

# The targets of issue 8 (ratios measured in one run; not timed tests).
TARGETS = {
    "list_vs_naive": 1.0,
    "list_vs_bare": 0.30,
    "list_p99_ms": 25.0,
    "contact_vs_naive": 0.8,
    "growth_p50": 1.3,
    "breach_seconds": 10.0,
    "rss_mib": 150.0,
}
# Issue 6: with the values sealed (encryption at rest), ≥ 80% of the throughput with them in clear (same run).
DEFENSE_RATIO = 0.80
DEFENSE_SCENARIOS = ("list", "contact")


def _size_key(label: str) -> int:
    number = float(label[:-1]) if label[-1] in "km" else float(label)
    return int(number * (1_000 if label.endswith("k") else 1_000_000 if label.endswith("m") else 1))


def _find(runs: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    """The run matching ``where``; with several rounds (``run.py --rounds``), the one of median throughput."""
    found = sorted((run for run in runs if all(run.get(k) == v for k, v in where.items())), key=lambda r: r["rps"])
    return found[(len(found) - 1) // 2] if found else None


def _of(run: dict[str, Any] | None, key: str) -> float | None:
    """A run's figure ``key``, or None when there is no run or no such figure."""
    value = None if run is None else run.get(key)
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return a / b


def _paired(runs: list[dict[str, Any]], num: str, den: str, field: str = "rps", **where: Any) -> list[float]:
    """``num``'s ``field`` over ``den``'s, one ratio per round that measured both (rounds alternate their order)."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if run["variant"] in (num, den) and all(run.get(k) == v for k, v in where.items()):
            by_round.setdefault(run.get("round", 0), {})[run["variant"]] = run[field]
    pairs = [_ratio(values.get(num), values.get(den)) for values in by_round.values()]
    return sorted(r for r in pairs if r is not None)


def _median_ratio(runs: list[dict[str, Any]], num: str, den: str, field: str = "rps", **where: Any) -> float | None:
    pairs = _paired(runs, num, den, field, **where)
    return statistics.median(pairs) if pairs else None


def _ratio_cell(runs: list[dict[str, Any]], num: str, den: str, field: str = "rps", **where: Any) -> str:
    """The median of the per-round ratios and, over several rounds, their range."""
    pairs = _paired(runs, num, den, field, **where)
    if not pairs:
        return "–"
    median = f"{statistics.median(pairs):.2f}"
    return median if len(pairs) == 1 else f"{median} ({pairs[0]:.2f}–{pairs[-1]:.2f})"


def _ledger_size(breach: dict[str, Any]) -> str:
    """The ledger's size as a run measured it: appointments and records (one record per call since migration 0016)."""
    if "items" in breach:
        return f"{breach['items']:,}-disclosure ({breach['records']:,} records)"
    return f"{breach['records']:,}-record"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| size | scenario | variant | c | req/s | p50 ms | p99 ms | server CPU s (ms/req) | PostgreSQL CPU s (ms/req) "
        "| RSS MiB (peak) | resp. bytes | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, variant in _labelled(runs):
        lines.append(
            f"| {r['size']} | {r['scenario']} | {variant} | {r['concurrency']} | {r['rps']:,.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_s']:.1f} ({r['server_cpu_ms_per_req']:.3f}) | "
            f"{r['pg_cpu_s']:.1f} ({r['pg_cpu_ms_per_req']:.3f}) | {r['rss_mib']:.0f} ({r['hwm_mib']:.0f}) | "
            f"{r['response_bytes']:,} | {r['errors']} |"
        )
    return lines


def ratios(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| size | scenario | c | gateway / naive | gateway / bare | tracing on / off (req/s) | tracing on / off (p99) "
        "| what-if / naive | gateway / nodefense |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = sorted({(r["size"], r["scenario"], r["concurrency"]) for r in runs},
                  key=lambda k: (_size_key(k[0]), list(SCENARIO_NAMES).index(k[1]), k[2]))  # fmt: skip
    for size, scenario, c in keys:
        if _find(runs, size=size, scenario=scenario, concurrency=c, variant="gateway") is None:
            continue
        where = {"size": size, "scenario": scenario, "concurrency": c}
        lines.append(
            f"| {size} | {scenario} | {c} | {_ratio_cell(runs, 'gateway', 'naive', **where)} | "
            f"{_ratio_cell(runs, 'gateway', 'bare', **where)} | "
            f"{_ratio_cell(runs, 'gateway+tracing', 'gateway', **where)} | "
            f"{_ratio_cell(runs, 'gateway+tracing', 'gateway', 'p99_ms', **where)} | "
            f"{_ratio_cell(runs, 'gateway+whatif', 'naive', **where)} | "
            f"{_ratio_cell(runs, 'gateway', 'gateway-nodefense', **where)} |"
        )
    return lines


def _cpu_per_call(run: dict[str, Any]) -> float | None:
    """Server CPU + the CPU of its world's PostgreSQL backends, per call: the cost less the machine's noise."""
    if "db_cpu_ms_per_req" not in run:
        return None
    return float(run["server_cpu_ms_per_req"]) + float(run["db_cpu_ms_per_req"])


def defense_across(reports: list[dict[str, Any]]) -> list[str]:
    """Several runs' gateway / nodefense ratios side by side: median and range (``report.py --defense``)."""
    keys = sorted(
        {(r["size"], r["scenario"], r["concurrency"]) for rep in reports for r in rep["runs"]
         if r["variant"] == "gateway-nodefense" and r["scenario"] in DEFENSE_SCENARIOS},
        key=lambda k: (_size_key(k[0]), list(SCENARIO_NAMES).index(k[1]), k[2]),
    )  # fmt: skip
    lines = [
        f"| size | scenario | c | throughput ratio per run | median | ≥ {DEFENSE_RATIO:.2f} | "
        "CPU-per-call ratio per run (nodefense / gateway) | median |",
        "| --- | --- | ---: | --- | ---: | --- | --- | ---: |",
    ]
    for size, scenario, c in keys:
        rps, cpu = [], []
        for rep in reports:
            g = _find(rep["runs"], size=size, scenario=scenario, concurrency=c, variant="gateway")
            d = _find(rep["runs"], size=size, scenario=scenario, concurrency=c, variant="gateway-nodefense")
            if g and d:
                rps.append(_ratio(g["rps"], d["rps"]))
                cpu.append(_ratio(_cpu_per_call(d), _cpu_per_call(g)))
        r = [x for x in rps if x is not None]
        k = [x for x in cpu if x is not None]
        mr = statistics.median(r) if r else None
        mk = statistics.median(k) if k else None
        lines.append(
            f"| {size} | {scenario} | {c} | {', '.join(_fmt(x) for x in rps)} | {_fmt(mr)} | "
            f"{_mark(None if mr is None else mr >= DEFENSE_RATIO)} | {', '.join(_fmt(x) for x in cpu)} | {_fmt(mk)} |"
        )
    return lines


def defense(runs: list[dict[str, Any]]) -> list[str]:
    """Issue 6: gateway (sealed values) against gateway-nodefense (values in clear), per size, scenario and c."""
    keys = sorted(
        {(r["size"], r["scenario"], r["concurrency"]) for r in runs
         if r["variant"] == "gateway-nodefense" and r["scenario"] in DEFENSE_SCENARIOS},
        key=lambda k: (_size_key(k[0]), list(SCENARIO_NAMES).index(k[1]), k[2]),
    )  # fmt: skip
    if not keys:
        return []
    lines = [
        f"| size | scenario | c | gateway req/s | nodefense req/s | gateway / nodefense | ≥ {DEFENSE_RATIO:.2f} | "
        "p99 ms (gateway / nodefense) | server CPU ms/req | world's PostgreSQL backends CPU ms/req "
        "| CPU per call, nodefense / gateway | load (1 min) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    worst: dict[str, float] = {}
    for size, scenario, c in keys:
        g = _find(runs, size=size, scenario=scenario, concurrency=c, variant="gateway")
        d = _find(runs, size=size, scenario=scenario, concurrency=c, variant="gateway-nodefense")
        assert d is not None
        r = _ratio(_of(g, "rps"), d["rps"])
        if r is not None:
            worst[scenario] = min(worst.get(scenario, r), r)
        lines.append(
            f"| {size} | {scenario} | {c} | {_fmt(_of(g, 'rps'), 0)} | {d['rps']:,.0f} | {_fmt(r)} | "
            f"{_mark(None if r is None else r >= DEFENSE_RATIO)} | {_fmt(_of(g, 'p99_ms'), 1)} / {d['p99_ms']:.1f} | "
            f"{_fmt(_of(g, 'server_cpu_ms_per_req'), 3)} / {d['server_cpu_ms_per_req']:.3f} | "
            f"{_fmt(_of(g, 'db_cpu_ms_per_req'), 3)} / {_fmt(_of(d, 'db_cpu_ms_per_req'), 3)} | "
            f"{_fmt(_ratio(_cpu_per_call(d), _cpu_per_call(g) if g else None))} | "
            f"{_fmt(_of(g, 'load_1m'), 1)} / {_fmt(_of(d, 'load_1m'), 1)} |"
        )
    verdict = ", ".join(
        f"{scenario}: worst {value:.2f} ({_mark(value >= DEFENSE_RATIO)})" for scenario, value in worst.items()
    )
    lines += ["", f"Verdict (every concurrency must reach {DEFENSE_RATIO:.2f}): {verdict}."]
    return lines


def targets(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    sizes = sorted({r["size"] for r in runs}, key=_size_key)
    base = sizes[0] if sizes else "100k"
    g = _find(runs, size=base, scenario="list", concurrency=16, variant="gateway")
    list16: dict[str, Any] = {"size": base, "scenario": "list", "concurrency": 16}
    rows = ["| target (issue 8) | measured | verdict |", "| --- | ---: | --- |"]
    r = _median_ratio(runs, "gateway", "naive", **list16)
    rows.append(f"| ListAppointments c=16, {base}: ≥ {TARGETS['list_vs_naive']}× naive | {_fmt(r)}× | "
                f"{_mark(None if r is None else r >= TARGETS['list_vs_naive'])} |")  # fmt: skip
    r = _median_ratio(runs, "gateway", "bare", **list16)
    rows.append(f"| ListAppointments c=16, {base}: ≥ {TARGETS['list_vs_bare']}× bare | {_fmt(r)}× | "
                f"{_mark(None if r is None else r >= TARGETS['list_vs_bare'])} |")  # fmt: skip
    p99 = g["p99_ms"] if g else None
    rows.append(f"| ListAppointments c=16, {base}: p99 ≤ {TARGETS['list_p99_ms']:.0f} ms | {_fmt(p99)} ms | "
                f"{_mark(None if p99 is None else p99 <= TARGETS['list_p99_ms'])} |")  # fmt: skip
    r = _median_ratio(runs, "gateway", "naive", size=base, scenario="contact", concurrency=16)
    rows.append(f"| GetAppointmentContact c=16, {base}: ≥ {TARGETS['contact_vs_naive']}× naive contact read | "
                f"{_fmt(r)}× | {_mark(None if r is None else r >= TARGETS['contact_vs_naive'])} |")  # fmt: skip
    for c in (1, 16):
        first = _find(runs, size=base, scenario="list", concurrency=c, variant="gateway")
        for size in sizes[1:]:
            other = _find(runs, size=size, scenario="list", concurrency=c, variant="gateway")
            r = _ratio(_of(other, "p50_ms"), _of(first, "p50_ms"))
            verdict = (
                _mark(None if r is None else r <= TARGETS["growth_p50"])
                if size == "10m"
                else ("(10M is the target)" if r is None or r <= TARGETS["growth_p50"] else "**over 1.3× already**")
            )
            rows.append(f"| ListAppointments p50 growth {base}→{size}, c={c}: ≤ {TARGETS['growth_p50']}× (at 10M) | "
                        f"{_fmt(r)}× ({_fmt(_of(first, 'p50_ms'))} → {_fmt(_of(other, 'p50_ms'))} ms) | "
                        f"{verdict} |")  # fmt: skip
    breach = report.get("breach")
    if breach:
        days = [x["seconds"] for x in breach["runs"] if x["window"] == "one day"]
        worst = max(days) if days else None
        rows.append(f"| breach report, one partner, one day of a {_ledger_size(breach)} ledger: < "
                    f"{TARGETS['breach_seconds']:.0f} s | {_fmt(worst)} s (worst of {len(days)}) | "
                    f"{_mark(None if worst is None else worst < TARGETS['breach_seconds'])} |")  # fmt: skip
    else:
        rows.append("| breach report over a 10M-record ledger: < 10 s | not run (no 10M ledger; `--ledger`) | – |")
    history = report.get("history")
    if history:
        figures = history["variants"].get("rpc") or history["variants"]["statement"]
        what = "ListPatientDisclosures" if "rpc" in history["variants"] else "its statement"
        rows.append(f"| a patient's history over a {_ledger_size(history['ledger'])} ledger ({what}, "
                    f"{figures['calls']} patients): p99 < {history['target_p99_ms']:.0f} ms | "
                    f"{figures['p99_ms']:.1f} ms (p50 {figures['p50_ms']:.1f}) | "
                    f"{_mark(figures['p99_ms'] < history['target_p99_ms'])} |")  # fmt: skip
    gateway_peaks = [r["hwm_mib"] for r in runs if r["variant"].startswith("gateway")]
    peak = max(gateway_peaks) if gateway_peaks else None
    rows.append(f"| gateway RSS under load < {TARGETS['rss_mib']:.0f} MiB per worker | {_fmt(peak, 0)} MiB peak | "
                f"{_mark(None if peak is None else peak < TARGETS['rss_mib'])} |")  # fmt: skip
    return rows


def statements(by_size: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The partner path's statements alone, as the partner role, in both worlds (``run.py statement_cost``)."""
    if not any(by_size.values()):
        return []
    out = [
        "### The partner path's statements alone (sealed world / clear world)",
        "",
        "Run as `apptgate_partner` with the key id and secret hash they verify, one at a time, before the load: "
        "median round trip of the prepared statement, median server-side execution time "
        "(`EXPLAIN (ANALYZE, TIMING OFF)`). The statements are the same in both worlds and read no sealed "
        "column; only the tables' rows differ (sealed ones are wider).",
        "",
        "| size | statement | rows | round trip ms (sealed / clear) | execution ms (sealed / clear) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    plans: list[str] = []
    for size, worlds in by_size.items():
        on, off = worlds.get("gateway", {}), worlds.get("gateway-nodefense", {})
        for name in on:
            a, b = on[name], off.get(name, {})
            trip, execution = _fmt(b.get("round_trip_ms"), 3), _fmt(b.get("execution_ms"), 3)
            out.append(f"| {size} | {name} | {a['rows']} | {a['round_trip_ms']:.3f} / {trip} "
                       f"| {a['execution_ms']:.3f} / {execution} |")  # fmt: skip
            for label, data in (("sealed", a), ("clear", b)):
                if data.get("plan"):
                    plans += [f"{size} {name}, {label}:", "", "```", data["plan"], "```", ""]
    return [*out, "", *plans]


def _labelled(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The runs in table order, each with its variant's label (and its round, when there are several)."""
    rounds = {r.get("round", 0) for r in runs}
    ordered = sorted(
        runs,
        key=lambda r: (
            _size_key(r["size"]), list(SCENARIO_NAMES).index(r["scenario"]),
            VARIANT_ORDER.index(r["variant"]) if r["variant"] in VARIANT_ORDER else 9, r["concurrency"],
            r.get("round", 0),
        ),
    )  # fmt: skip
    return [
        (r, f"{r['variant']} (round {r['round'] + 1})" if "round" in r and len(rounds) > 1 else r["variant"])
        for r in ordered
    ]


def waits(runs: list[dict[str, Any]]) -> list[str]:
    """Per call, the server's system CPU and its threads' context switches; per commit, the ledger records.

    Runs from 2026-11-29 09:40 on have the first two, runs from 12:31 on the third.
    """
    measured = [r for r in runs if "server_switches_per_req" in r]
    if not measured:
        return []
    out = [
        "Server system CPU (of the CPU above) and context switches of its threads, per call; ledger records "
        "written during the run per transaction that wrote them (the recorder's groups):",
        "",
        "| size | scenario | variant | c | system CPU ms/req | context switches / req | ledger records / commit |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    out += [
        f"| {r['size']} | {r['scenario']} | {variant} | {r['concurrency']} | {r['server_sys_ms_per_req']:.3f} "
        f"| {r['server_switches_per_req']:.2f} | {_per_commit(r)} |"
        for r, variant in _labelled(measured)
    ]
    return [*out, ""]


def _per_commit(run: dict[str, Any]) -> str:
    """Ledger records per writing transaction, or a dash where the run wrote none (the baselines, older runs)."""
    commits = run.get("ledger_commits", 0)
    return f"{run['ledger_records'] / commits:.2f}" if commits else "–"


def markdown(report: dict[str, Any], chart_name: str | None) -> str:
    m = report["machine"]
    s = report["settings"]
    out = [
        f"# apptgate benchmark — {report['date']}",
        "",
        f"- machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['mem_gib']} GiB, Linux {m['kernel']}",
        f"- PostgreSQL {report['postgresql']} (same machine); commit {report['commit']}",
        f"- command: `{report['command']}`; wall time {report.get('wall_seconds', 0):.0f} s",
        f"- each run: {s['warmup_s']:.0f} s h2load warm-up, then {s['duration_s']:.0f} s measured; "
        f"{s['workers']} server process(es) per variant; concurrency c = {s['h2load_clients']}",
        f"- event loop: gateway {s.get('gateway_loop', 'uvloop')}, naive and bare {s.get('baseline_loop', 'asyncio')}",
        "- CPU: seconds used by the server's process tree and by all PostgreSQL processes during the measured "
        "run (/proc), and per request; RSS at the end of the run (peak since start).",
        "",
        "## Results",
        "",
        *table(report["runs"]),
        "",
        *waits(report["runs"]),
        "## Ratios (throughput unless noted)",
        "",
        *ratios(report["runs"]),
        "",
        "## Targets",
        "",
        *targets(report),
        "",
    ]
    cost = defense(report["runs"])
    if cost:
        out += [
            "## Cost of encryption at rest (issue 6)",
            "",
            "`gateway` serves the sealed world; `gateway-nodefense` is the same code on the world's `_nodefense` "
            "copy (values in clear, schema and partner role as migrated) with the contact path's decryption "
            "patched out (`bench/whatif.py nodefense`); both answer the same bytes (checked at start). CPU and "
            "load columns: gateway / nodefense. (Runs before commit f6e2fb0 also had row-level security, on in "
            "`gateway` and disabled in `gateway-nodefense`.)",
            "",
            *cost,
            "",
        ]
        out += statements(report.get("statements", {}))
    breach = report.get("breach")
    if breach:
        out += ["## Breach report", "", f"Busiest partner `{breach['partner']}` over a {_ledger_size(breach)} "
                "ledger, `python -m service audit breach-report --format csv` (process start included):", "",
                "| window | seconds | patients | appointments |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
        for run in breach["runs"]:
            t = run["totals"]
            # The totals are their proto JSON mapping, which writes 64-bit counts as strings.
            patients, appointments = (f"{int(t[k]):,}" if k in t else "?" for k in ("patients", "appointments"))
            out.append(f"| {run['window']} | {run['seconds']:.2f} | {patients} | {appointments} |")
        if breach.get("explain"):
            out += ["", "```", breach["explain"], "```"]
        out.append("")
    if report.get("history"):
        out += history_section(report["history"])
    profile = report.get("profile")
    if profile:
        out += ["## Profile (py-spy, ListAppointments c=16)", ""]
        for tag, data in profile.items():
            out += [f"### {tag} frames — {data['samples']} samples, {data.get('rps_under_profiler')} req/s under "
                    f"the profiler (`{data['folded']}`)", "", "| self % | frame |", "| ---: | --- |"]  # fmt: skip
            out += [f"| {pct} | `{name}` |" for name, pct in data["self"][:20]]
            out += ["", "| inclusive % | frame |", "| ---: | --- |"]
            out += [f"| {pct} | `{name}` |" for name, pct in data["inclusive"][:25]]
            out.append("")
    if chart_name:
        out += [f"![throughput and p99 against concurrency]({chart_name})", ""]
    return "\n".join(out)


HISTORY_VARIANTS = {
    "rpc": "`ListPatientDisclosures` through a gateway",
    "statement": "its statement (`PATIENT_DISCLOSURES_SQL`) on one long-lived connection",
    "statement, from the sixth call": "the same, from its sixth call (when PostgreSQL may keep a generic plan)",
    "statement, generic plan": "the same, the generic plan forced (`plan_cache_mode = force_generic_plan`)",
}


def history_section(history: dict[str, Any]) -> list[str]:
    """A patient's history over the ledger (``bench/patient_history.py``): latencies, the baseline, the plans."""
    ledger, picked, scheduling = history["ledger"], history["patients"], history.get("scheduling", {})
    per = ledger["items_per_patient"]
    naive = history["naive"]
    out = [
        "## A patient's history (issue 25)",
        "",
        f"Over a {_ledger_size(ledger)} ledger naming {ledger['patients']:,} patients (items per patient: p50 "
        f"{per['p50']}, p99 {per['p99']}, max {per['max']}), with the {scheduling.get('appointments', 0):,} "
        f"appointments and {scheduling.get('consents', 0):,} consents it names; {picked['total']} distinct patients "
        f"({picked['most_disclosed']} most disclosed, the others a uniform sample, seed {picked['seed']}), one call "
        f"at a time, the variants interleaved per patient; the first page ({picked['page_size']}), no window. "
        f"Target: p99 < {history['target_p99_ms']:.0f} ms. Load average (1 min) before and after: "
        f"{' / '.join(str(x) for x in history.get('load_1m', [])) or '?'}; {history.get('seconds', 0):.0f} s.",
        "",
        "| variant | calls | min ms | p50 ms | p95 ms | p99 ms | max ms | most disclosed: p50 / max ms "
        f"| under {history['target_p99_ms']:.0f} ms | naive p50 / p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: dict[str, Any] = {}
    for variant, figures in history["variants"].items():
        rows[variant] = figures
        if figures.get("from_sixth"):
            rows[f"{variant}, from the sixth call"] = figures["from_sixth"]
    for variant, figures in rows.items():
        top = figures.get("by_kind", {}).get("most disclosed")
        top_cell = "–" if not top else f"{top['p50_ms']:.2f} / {top['max_ms']:.2f}"
        ratio = _ratio(naive.get("p50_ms"), figures["p50_ms"])
        under = figures.get("under_target", "–")
        out.append(f"| {HISTORY_VARIANTS.get(variant, variant)} | {figures['calls']} | "
                   f"{_fmt(figures.get('min_ms'))} | {figures['p50_ms']:.2f} | {figures['p95_ms']:.2f} | "
                   f"{figures['p99_ms']:.2f} | {figures['max_ms']:.2f} | {top_cell} | {under} | "
                   f"{_fmt(ratio, 0 if ratio and ratio >= 100 else 1)}× |")  # fmt: skip
    if naive.get("calls"):
        under = naive.get("under_target", "–")
        out.append(f"| naive: the same groups from `disclosure_items` by `patient_id` (a scan) | {naive['calls']} | "
                   f"{_fmt(naive.get('min_ms'), 0)} | {naive['p50_ms']:.0f} | {naive['p95_ms']:.0f} | "
                   f"{naive['p99_ms']:.0f} | {naive['max_ms']:.0f} | – | {under} | 1× |")  # fmt: skip
    problems = history.get("problems") or []
    checks = [f"the history's counts equal the ledger's census ({history['checked_counts']} patients)"]
    if "rpc" in history["variants"]:
        checks.append("each RPC page equals the statement's rows (entries, partners, appointments, counts)")
    if "statement, generic plan" in history["variants"]:
        checks.append("the generic plan's rows equal the statement's")
    if naive.get("calls"):
        checks.append("the baseline's groups equal the statement's")
    verdict = "**" + "; ".join(problems[:5]) + "**" if problems else "all held"
    out += ["", f"Checked, patient by patient: {', '.join(checks)}: {verdict}."]
    plans = {name: figures["plans"] for name, figures in history["variants"].items() if figures.get("plans")}
    if plans:
        out += ["", "Plans each connection ran (`pg_prepared_statements`): " + "; ".join(
            f"{name}, {n['custom']} custom and {n['generic']} generic" for name, n in plans.items()) + "."]  # fmt: skip
    for name, text in history.get("explain", {}).items():
        out += ["", f"`EXPLAIN (ANALYZE, BUFFERS)`, {name}, the most-disclosed patient:", "", "```", text, "```"]
    out.append("")
    return out


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return False
    runs = report["runs"]
    sizes = sorted({r["size"] for r in runs}, key=_size_key)
    full = sizes[0]
    scenarios = [s for s in SCENARIO_NAMES if any(r["scenario"] == s for r in runs)]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 3.6 * len(scenarios)), squeeze=False)
    styles = {"gateway": ("C0", "o"), "gateway+tracing": ("C3", "s"), "gateway+whatif": ("C4", "v"),
              "gateway-nodefense": ("C5", "P"), "naive": ("C1", "^"), "bare": ("C2", "D")}  # fmt: skip
    for row, scenario in enumerate(scenarios):
        for size in sizes:
            for variant in VARIANT_ORDER:
                found = (_find(runs, scenario=scenario, variant=variant, size=size, concurrency=c)
                         for c in sorted({r["concurrency"] for r in runs}))  # fmt: skip
                points = [(r["concurrency"], r["rps"], r["p99_ms"]) for r in found if r is not None]
                if not points:
                    continue
                color, marker = styles.get(variant, ("k", "x"))
                dashed = size != full
                label = f"{variant} ({size})"
                xs = [p[0] for p in points]
                style = {"marker": marker, "color": color, "label": label,
                         "linestyle": "--" if dashed else "-", "alpha": 0.6 if dashed else 1}  # fmt: skip
                axes[row][0].plot(xs, [p[1] for p in points], **style)
                axes[row][1].plot(xs, [p[2] for p in points], **style)
        for col, (ylabel, title) in enumerate((("req/s", "throughput"), ("ms", "p99 latency"))):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in runs}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{SCENARIO_NAMES[scenario]}: {title}")
            ax.grid(True, alpha=0.3)
            ax.set_yscale("log")
        axes[row][0].legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"apptgate, {report['date'][:10]}, {m['nproc']} CPUs, PostgreSQL {report['postgresql']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(report: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    png_path = out / f"{stamp}.png"
    has_chart = chart(report, png_path)
    md_path = out / f"{stamp}.md"
    md_path.write_text(markdown(report, png_path.name if has_chart else None))
    print(md_path.read_text())
    return [md_path, json_path, *([png_path] if has_chart else [])]


if __name__ == "__main__":
    if sys.argv[1] == "--defense":  # report.py --defense RUN.json RUN.json …: issue 6's ratios across runs
        print("\n".join(defense_across([json.loads(Path(a).read_text()) for a in sys.argv[2:]])))
        raise SystemExit(0)
    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    write(data, source.parent, source.stem)
