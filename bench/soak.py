"""`make soak`: fixed-rate mixed traffic against one gateway process for ten minutes; RSS and p99 must hold.

One run, in order:

1. Data: the 100k bench world (``bench/datagen.py``, reused when present) and
   the fixture of ``bench/run.py`` (a fresh partner key, a live consent for all
   four contact fields, an emptied ledger), plus a revoked consent for the
   denied calls.
2. Capacity probe (``--probe-seconds``, 0 to skip): a separate gateway process,
   driven closed-loop by ``--probe-concurrency`` callers with the same mix,
   gives the throughput this machine sustains; the soak rate is half of it
   unless ``--rate`` says otherwise (``--rate-share``). That gateway is stopped
   before the soak's starts.
3. The soak: one gateway process (``python -m service serve``,
   ``APPTGATE_WORKERS=1``, as ``bench/run.py`` starts it), driven from this
   process — never the server's — by an open-loop grpc.aio load generator:
   calls are scheduled at fixed intervals of 1/``--rate`` seconds whether or not
   earlier calls have finished, and a call's latency runs from its scheduled
   time, so a slow server shows up as latency rather than as fewer calls. The
   mix (``MIX``): ListAppointments first pages and pages by token,
   GetAppointment, GetAppointmentContact with a valid consent, and failing calls
   (an unknown appointment id, an unknown key, a revoked consent, no consent).
   ``--streams`` WatchAppointments streams stay open the whole time, fed by
   ``--write-rate`` bookings and cancellations per second on the internal
   listener. Every call's status is checked against the one its kind expects,
   and every OK answer's content.
4. Every 5 s: the RSS of the server's process tree (/proc), its open files and
   threads, CPU of the server and of PostgreSQL, the load average, and the
   ledger's unchained backlog.
5. ``bench/results/<date>-soak.{md,json}``: per minute the calls, statuses by
   code, p50/p99 per RPC and overall, RSS; and the verdicts (minute 0 is the
   warm-up): RSS of the last minute minus that of minute 1 under 20 MiB, p99 of
   the last minute at most 1.5 x that of minute 1.

Usage: ``make soak`` (10 min + ~1 min of set-up and probe), or
``.venv/bin/python bench/soak.py --duration 120`` for a short run; ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.set_source(common.ROOT)
import asyncpg  # noqa: E402
import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from appointments.internal.v1 import scheduling_service_pb2 as scheduling_pb  # noqa: E402
from appointments.internal.v1 import scheduling_service_pb2_grpc as scheduling_grpc  # noqa: E402
from appointments.partner.v1 import partner_appointment_service_pb2 as pb  # noqa: E402
from appointments.partner.v1 import partner_appointment_service_pb2_grpc as pb_grpc  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

import datagen  # noqa: E402
import run as bench  # noqa: E402

SAMPLE_EVERY = 5.0
CALL_TIMEOUT = 10.0
RSS_LIMIT_MIB = 20.0
P99_LIMIT = 1.5
WRITE_EPOCH = datetime(2031, 1, 1, 8, tzinfo=UTC)  # bookings of the writer: far from the listed days
UNARY_CHANNELS = 4
FALLBACK_RATE = 80.0  # about half of what the shared 2-core machine sustained at e684b5f and 2fef874

#: kind → (RPC, weight, the status it must answer).
MIX: dict[str, tuple[str, int, str]] = {
    "list": ("ListAppointments", 22, "OK"),
    "list_page": ("ListAppointments", 14, "OK"),
    "get": ("GetAppointment", 24, "OK"),
    "contact": ("GetAppointmentContact", 14, "OK"),
    "not_found": ("GetAppointment", 8, "NOT_FOUND"),
    "bad_key": ("ListAppointments", 6, "UNAUTHENTICATED"),
    "consent_revoked": ("GetAppointmentContact", 6, "PERMISSION_DENIED"),
    "consent_missing": ("GetAppointmentContact", 6, "PERMISSION_DENIED"),
}
RPCS = ("ListAppointments", "GetAppointment", "GetAppointmentContact")


def log(message: str) -> None:
    bench.log(message)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def stamp_of(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


# --------------------------------------------------------------------------- fixture


@dataclass
class Extras:
    """What the soak needs beyond bench/run.py's fixture."""

    revoked_token: str
    partner_meta: list[tuple[str, str]]
    internal_meta: list[tuple[str, str]]
    target_id: str
    unknown_ids: list[str]
    anchor: datetime
    practitioners: list[str]
    patient_id: str
    pseudonyms: Any


async def prepare_extras(fx: bench.Fixture) -> Extras:
    """A revoked consent of the target patient (its token answers CONSENT_REVOKED) and the ids of failing calls."""
    from service.access.consent_tokens import ConsentClaims, ConsentKeyring, SigningKey
    from service.disclosure.pseudonyms import Pseudonyms

    partner = uuid.UUID(fx.meta["bench_partner_id"])
    patient = uuid.UUID(fx.meta["target"]["patient_id"])
    keyring = ConsentKeyring([SigningKey.from_paserk(fx.signing_key)])
    ids = Pseudonyms(base64.urlsafe_b64decode(fx.server_secret)).for_partner(partner)
    now, consent_id = datetime.now(UTC), uuid.uuid4()
    claims = ConsentClaims(
        ids.consent_ref(consent_id), ids.patient_ref(patient), partner, (1, 2, 3, 4), "soak", now,
        now + timedelta(days=2),
    )  # fmt: skip
    conn = await asyncpg.connect(fx.dsn)
    try:
        await conn.execute(
            "INSERT INTO consents (id, patient_id, partner_id, fields, purpose, signing_key_id, create_time, "
            "expire_time, revoke_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            consent_id, patient, partner, [1, 2, 3, 4], "soak", keyring.active_key_id, now,
            claims.expires_at, now,
        )  # fmt: skip
    finally:
        await conn.close()
    return Extras(
        revoked_token=keyring.sign(claims),
        partner_meta=[("authorization", f"Bearer {fx.partner_key}")],
        internal_meta=[("authorization", f"Bearer {bench.INTERNAL_TOKEN}")],
        target_id=fx.gateway_ids["appointment"],
        unknown_ids=[ids.appointment_id(uuid.uuid4()) for _ in range(1000)],
        anchor=datetime.fromisoformat(fx.meta["anchor"]),
        practitioners=list(fx.meta["bench_practitioners"]),
        patient_id=fx.meta["target"]["patient_id"],
        pseudonyms=ids,
    )


# --------------------------------------------------------------------------- the mixed traffic


@dataclass
class Record:
    at: float  # scheduled time, seconds since the start of the traffic
    kind: str
    code: str
    latency_ms: float
    lag_ms: float  # how late the call left compared with its schedule (load generator health)
    wrong: bool = False  # status as expected but the content was not


class Traffic:
    """The callers of one gateway: the mix, its expectations, and what each call answered."""

    def __init__(self, fx: bench.Fixture, extras: Extras, port: int, seed: int) -> None:
        self.fx, self.x = fx, extras
        self.rng = random.Random(seed)
        self.kinds = list(MIX)
        self.cumulative: list[int] = []
        total = 0
        for kind in self.kinds:
            total += MIX[kind][1]
            self.cumulative.append(total)
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(UNARY_CHANNELS)]
        self.stubs = [pb_grpc.PartnerAppointmentServiceStub(c) for c in self.channels]
        self.tokens: deque[tuple[int, str]] = deque(maxlen=200)  # (day, next_page_token)
        self.ids: deque[str] = deque([extras.target_id], maxlen=1000)
        self.next_stub = 0
        self.details: dict[str, Counter[str]] = {}  # unexpected status → its messages

    def pick(self) -> str:
        return self.kinds[bisect.bisect_right(self.cumulative, self.rng.randrange(self.cumulative[-1]))]

    def _window(self, request: pb.ListAppointmentsRequest, day: int) -> None:
        request.start_time.CopyFrom(stamp_of(self.x.anchor + timedelta(days=day)))
        request.end_time.CopyFrom(stamp_of(self.x.anchor + timedelta(days=day + 1)))
        request.page_size = 50

    async def call(self, kind: str) -> tuple[str, bool]:
        """Make one call of ``kind``; return (status code name, whether an OK answer had the wrong content)."""
        stub = self.stubs[self.next_stub]
        self.next_stub = (self.next_stub + 1) % len(self.stubs)
        meta = self.x.partner_meta
        try:
            if kind in ("list", "list_page", "bad_key"):
                request = pb.ListAppointmentsRequest()
                day = self.rng.randrange(2)
                if kind == "list_page" and self.tokens:
                    day, token = self.tokens[self.rng.randrange(len(self.tokens))]
                    request.page_token = token
                self._window(request, day)
                if kind == "bad_key":
                    meta = [("authorization", "Bearer " + _unknown_key())]
                reply = await stub.ListAppointments(request, metadata=meta, timeout=CALL_TIMEOUT)
                if reply.next_page_token:
                    self.tokens.append((day, reply.next_page_token))
                self.ids.extend(a.appointment_id for a in reply.appointments[:5])
                wrong = not reply.appointments or not all(a.appointment_id for a in reply.appointments)
                if kind == "list" and (len(reply.appointments) != 50 or not reply.next_page_token):
                    wrong = True
                return "OK", wrong
            if kind in ("get", "not_found"):
                wanted = (
                    self.ids[self.rng.randrange(len(self.ids))]
                    if kind == "get"
                    else self.rng.choice(self.x.unknown_ids)
                )
                got = await stub.GetAppointment(
                    pb.GetAppointmentRequest(appointment_id=wanted), metadata=meta, timeout=CALL_TIMEOUT
                )
                return "OK", got.appointment_id != wanted or not got.practitioner.display_name
            token = {"contact": self.fx.consent_token, "consent_revoked": self.x.revoked_token}.get(kind, "")
            contact = await stub.GetAppointmentContact(
                pb.GetAppointmentContactRequest(appointment_id=self.x.target_id, consent_token=token),
                metadata=meta,
                timeout=CALL_TIMEOUT,
            )
            patient = contact.patient
            return "OK", not (
                patient.HasField("email") and patient.HasField("phone") and patient.HasField("given_name")
            )
        except grpc.aio.AioRpcError as error:
            name = error.code().name
            if name != MIX[kind][2]:
                self.details.setdefault(name, Counter())[str(error.details())[:120]] += 1
            return name, False

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def _unknown_key() -> str:
    from service.access import credentials

    return credentials.new_partner_key().secret  # well shaped, never issued: looked up, then refused


async def open_loop(
    traffic: Traffic, rate: float, duration: float, records: list[Record], state: dict[str, Any]
) -> None:
    """Start call i at t0 + i/rate, whatever the earlier calls are doing; wait for the stragglers at the end."""
    loop = asyncio.get_running_loop()
    t0 = state["t0"]
    pending: set[asyncio.Task[None]] = set()

    async def one(kind: str, scheduled: float) -> None:
        started = loop.time()
        code, wrong = await traffic.call(kind)
        done = loop.time()
        records.append(
            Record(round(scheduled - t0, 3), kind, code, (done - scheduled) * 1000, (started - scheduled) * 1000, wrong)
        )

    i = 0
    while True:
        scheduled = t0 + i / rate
        if scheduled - t0 >= duration:
            break
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(traffic.pick(), scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
        state["in_flight"] = len(pending)
        i += 1
    if pending:
        await asyncio.wait(pending, timeout=CALL_TIMEOUT + 5)
    for task in pending:
        task.cancel()


async def closed_loop(traffic: Traffic, concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    """``concurrency`` callers back to back for ``warmup + seconds``; calls per second over the last ``seconds``."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    counted_from, end = begin + warmup, begin + warmup + seconds
    codes: Counter[str] = Counter()
    latencies: list[float] = []

    async def caller() -> None:
        while True:
            started = loop.time()
            if started >= end:
                return
            code, _ = await traffic.call(traffic.pick())
            done = loop.time()
            if started >= counted_from and done <= end:
                codes[code] += 1
                latencies.append((done - started) * 1000)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    latencies.sort()
    calls = sum(codes.values())
    return {"concurrency": concurrency, "seconds": seconds, "calls": calls, "calls_per_s": round(calls / seconds, 1),
            "p50_ms": round(percentile(latencies, 0.5), 2), "p99_ms": round(percentile(latencies, 0.99), 2),
            "codes": dict(codes)}  # fmt: skip


# --------------------------------------------------------------------------- streams and the writer


@dataclass
class StreamStats:
    changes: int = 0
    reconnects: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    delivery_ms: list[float] = field(default_factory=list)


async def watch(port: int, extras: Extras, stats: StreamStats, written: dict[str, float], stop: asyncio.Event) -> None:
    """One WatchAppointments stream, open the whole run; resumed from its last token if the server ends it."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PartnerAppointmentServiceStub(channel)
        resume = ""
        while not stop.is_set():
            call = stub.WatchAppointments(
                pb.WatchAppointmentsRequest(resume_token=resume), metadata=extras.partner_meta
            )
            stopper = asyncio.create_task(stop.wait())
            try:
                reader = asyncio.create_task(_read_stream(call, stats, written, loop))
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    resume = reader.result() or resume
                    code = (await call.code()).name
                    stats.ends[code] += 1
                    stats.reconnects += 1
                    await asyncio.sleep(1)
                else:
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await reader
            finally:
                stopper.cancel()


async def _read_stream(call: Any, stats: StreamStats, written: dict[str, float], loop: Any) -> str:
    resume = ""
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for change in call:
            stats.changes += 1
            resume = change.resume_token
            sent = written.get(change.appointment.appointment_id + str(change.change_type))
            if sent is not None:
                stats.delivery_ms.append((loop.time() - sent) * 1000)
    return resume


async def writer(port: int, extras: Extras, rate: float, written: dict[str, float], codes: Counter[str],
                 stop: asyncio.Event) -> None:  # fmt: skip
    """Book an appointment with a granted practitioner, then cancel the previous one: changes for the streams."""
    if rate <= 0:
        return
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port + 1}") as channel:
        stub = scheduling_grpc.SchedulingServiceStub(channel)
        previous: str | None = None
        i = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1 / rate)
            if stop.is_set():
                break
            start = WRITE_EPOCH + timedelta(minutes=30 * i)
            request = scheduling_pb.CreateAppointmentRequest(
                practitioner_id=extras.practitioners[i % len(extras.practitioners)], patient_id=extras.patient_id,
                start_time=stamp_of(start), end_time=stamp_of(start + timedelta(minutes=20)),
            )  # fmt: skip
            i += 1
            try:
                created = await stub.CreateAppointment(request, metadata=extras.internal_meta, timeout=CALL_TIMEOUT)
                public = extras.pseudonyms.appointment_id(uuid.UUID(created.appointment_id))
                written[public + str(pb.CHANGE_TYPE_CREATED)] = loop.time()
                codes["OK"] += 1
                if previous is not None:
                    cancel = scheduling_pb.CancelAppointmentRequest(appointment_id=previous)
                    await stub.CancelAppointment(cancel, metadata=extras.internal_meta, timeout=CALL_TIMEOUT)
                    codes["OK"] += 1
                previous = created.appointment_id
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
            if len(written) > 10_000:  # keep the sender's own memory flat
                for key in list(written)[:5_000]:
                    del written[key]


# --------------------------------------------------------------------------- sampling


def proc_counts(root: int) -> tuple[float, int, int, list[int]]:
    """RSS (MiB, summed over the tree), open files and threads of ``root``'s process tree, and its pids."""
    pids = common.process_tree(root)
    rss = sum(common.rss_mib(pid)[0] for pid in pids)
    fds = threads = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
    return rss, fds, threads, pids


_BACKENDS = (
    "SELECT count(*), max(extract(epoch FROM now() - xact_start)), "
    "(array_agg(left(query, 40) ORDER BY xact_start) FILTER (WHERE xact_start IS NOT NULL))[1] "
    "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
_LEDGER_POSITIONS = "SELECT (SELECT last_value FROM disclosures_id_seq), (SELECT seq FROM ledger_head)"


async def sampler(server: bench.Server, fx: bench.Fixture, pg_pid: int | None, state: dict[str, Any],
                  samples: list[dict[str, Any]], stop: asyncio.Event) -> None:  # fmt: skip
    """Every SAMPLE_EVERY seconds: the server's RSS, files, threads, CPU; PostgreSQL's CPU and backends; load."""
    loop = asyncio.get_running_loop()
    conn = await asyncpg.connect(fx.dsn)
    try:
        ids0, chained0 = await conn.fetchrow(_LEDGER_POSITIONS)
        tick = state["t0"]
        while not stop.is_set():
            rss, fds, threads, pids = proc_counts(server.pids[0])
            usage = resource.getrusage(resource.RUSAGE_SELF)
            backends, oldest, oldest_query = await conn.fetchrow(_BACKENDS)
            # Records inserted minus records chained since the start (O(1): no scan of the table under test).
            ids, chained = await conn.fetchrow(_LEDGER_POSITIONS)
            unchained = (ids - ids0) - (chained - chained0)
            samples.append({
                "t": round(loop.time() - state["t0"], 2),
                "rss_mib": round(rss, 2),
                "fds": fds,
                "threads": threads,
                "processes": len(pids),
                "server_cpu_s": round(common.tree_cpu_seconds(server.pids[0]), 2),
                "pg_cpu_s": round(common.tree_cpu_seconds(pg_pid), 2) if pg_pid else None,
                "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "load1": float(Path("/proc/loadavg").read_text().split()[0]),  # noqa: ASYNC240
                "pg_backends": int(backends),
                "ledger_unchained": int(unchained),
                "in_flight": state.get("in_flight", 0),
                "oldest_xact_s": round(float(oldest or 0.0), 2),
                "oldest_xact_query": oldest_query or "",
            })  # fmt: skip
            tick += SAMPLE_EVERY
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, tick - loop.time()))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the run


async def health(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def probe(fx: bench.Fixture, extras: Extras, server: bench.Server, args: argparse.Namespace) -> dict[str, Any]:
    traffic = Traffic(fx, extras, server.port, seed=args.seed + 1)
    try:
        return await closed_loop(traffic, args.probe_concurrency, args.probe_seconds, warmup=3.0)
    finally:
        await traffic.close()


async def soak(fx: bench.Fixture, extras: Extras, server: bench.Server, args: argparse.Namespace,
               pg_pid: int | None) -> dict[str, Any]:  # fmt: skip
    loop = asyncio.get_running_loop()
    traffic = Traffic(fx, extras, server.port, seed=args.seed)
    records: list[Record] = []
    samples: list[dict[str, Any]] = []
    stream_stats = StreamStats()
    written: dict[str, float] = {}
    write_codes: Counter[str] = Counter()
    stop = asyncio.Event()
    state: dict[str, Any] = {"t0": loop.time() + 0.5}
    background = [
        asyncio.create_task(sampler(server, fx, pg_pid, state, samples, stop)),
        asyncio.create_task(writer(server.port, extras, args.write_rate, written, write_codes, stop)),
        *(asyncio.create_task(watch(server.port, extras, stream_stats, written, stop)) for _ in range(args.streams)),
    ]
    progress = asyncio.create_task(_progress(records, samples, args.duration, state))
    try:
        await open_loop(traffic, args.rate, args.duration, records, state)
    finally:
        progress.cancel()
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        await traffic.close()
    details = {code: dict(messages.most_common(5)) for code, messages in traffic.details.items()}
    return {"records": records, "samples": samples, "streams": stream_stats, "writes": write_codes,
            "unexpected_details": details}  # fmt: skip


async def _progress(
    records: list[Record], samples: list[dict[str, Any]], duration: float, state: dict[str, Any]
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(60)
        recent = sorted(r.latency_ms for r in records[-3000:])
        last = samples[-1] if samples else {}
        log(f"  soak {loop.time() - state['t0']:5.0f}/{duration:.0f} s: {len(records):,} calls, "
            f"p99 of the last 3000 {percentile(recent, 0.99):.1f} ms, RSS {last.get('rss_mib', 0):.1f} MiB, "
            f"in flight {state.get('in_flight', 0)}, load {last.get('load1')}")  # fmt: skip


# --------------------------------------------------------------------------- figures


def summarize(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    records: list[Record] = result["records"]
    samples: list[dict[str, Any]] = result["samples"]
    minutes = max(1, int(args.duration // 60))
    per_minute = []
    for m in range(minutes):
        rows = [r for r in records if m * 60 <= r.at < (m + 1) * 60]
        window = [s for s in samples if m * 60 <= s["t"] < (m + 1) * 60]
        codes = Counter(r.code for r in rows)
        entry: dict[str, Any] = {
            "minute": m,
            "calls": len(rows),
            "codes": dict(sorted(codes.items())),
            "unexpected": sum(1 for r in rows if r.code != MIX[r.kind][2]),
            "wrong_content": sum(1 for r in rows if r.wrong),
            "max_lag_ms": round(max((r.lag_ms for r in rows), default=0.0), 1),
        }
        entry.update(_latencies(rows))
        entry["rpc"] = {rpc: _latencies([r for r in rows if MIX[r.kind][0] == rpc]) for rpc in RPCS}
        if window:
            rss = [s["rss_mib"] for s in window]
            entry.update(rss_mean_mib=round(sum(rss) / len(rss), 2), rss_max_mib=max(rss),
                         fds=window[-1]["fds"], threads=window[-1]["threads"],
                         load1=round(sum(s["load1"] for s in window) / len(window), 2),
                         ledger_unchained=window[-1]["ledger_unchained"],
                         oldest_xact_s=max(s.get("oldest_xact_s", 0.0) for s in window),
                         pg_backends=window[-1]["pg_backends"])  # fmt: skip
        per_minute.append(entry)
    # CPU shares per minute from consecutive samples.
    for entry in per_minute:
        m = entry["minute"]
        window = [s for s in samples if m * 60 <= s["t"] <= (m + 1) * 60 + 0.01]
        if len(window) >= 2:
            span = window[-1]["t"] - window[0]["t"]
            for key in ("server_cpu_s", "pg_cpu_s", "loadgen_cpu_s"):
                if window[0][key] is not None:
                    entry[key.replace("_s", "_pct")] = round(100 * (window[-1][key] - window[0][key]) / span, 1)
    first, last = per_minute[min(1, len(per_minute) - 1)], per_minute[-1]
    rss_growth = round(last.get("rss_mean_mib", 0) - first.get("rss_mean_mib", 0), 2)
    p99_ratio = round(last["p99_ms"] / first["p99_ms"], 2) if first["p99_ms"] else float("nan")
    by_kind = {}
    for kind, (rpc, weight, expect) in MIX.items():
        rows = [r for r in records if r.kind == kind]
        by_kind[kind] = {"rpc": rpc, "weight": weight, "expect": expect, "calls": len(rows),
                         "codes": dict(Counter(r.code for r in rows)),
                         "unexpected": sum(1 for r in rows if r.code != expect),
                         "wrong_content": sum(1 for r in rows if r.wrong), **_latencies(rows)}  # fmt: skip
    streams: StreamStats = result["streams"]
    delivery = sorted(streams.delivery_ms)
    loads = [s["load1"] for s in samples]
    return {
        "calls": len(records),
        "codes": dict(sorted(Counter(r.code for r in records).items())),
        "unexpected": sum(1 for r in records if r.code != MIX[r.kind][2]),
        "wrong_content": sum(1 for r in records if r.wrong),
        **_latencies(records),
        "rpc": {rpc: _latencies([r for r in records if MIX[r.kind][0] == rpc]) for rpc in RPCS},
        "by_kind": by_kind,
        "per_minute": per_minute,
        "streams": {"open": args.streams, "changes_received": streams.changes, "reconnects": streams.reconnects,
                    "ended_by_server": dict(streams.ends), "delivery_p50_ms": round(percentile(delivery, 0.5), 1),
                    "delivery_p99_ms": round(percentile(delivery, 0.99), 1), "deliveries_timed": len(delivery)},
        "writes": dict(result["writes"]),
        "unexpected_details": result["unexpected_details"],
        "load1": {"min": min(loads, default=0), "mean": round(sum(loads) / max(len(loads), 1), 2),
                  "max": max(loads, default=0)},
        "verdicts": {
            "rss_growth_mib": rss_growth, "rss_ok": rss_growth < RSS_LIMIT_MIB,
            "p99_first_ms": first["p99_ms"], "p99_last_ms": last["p99_ms"], "p99_ratio": p99_ratio,
            "p99_ok": p99_ratio <= P99_LIMIT, "compared_minutes": [first["minute"], last["minute"]],
        },
        "samples": samples,
    }  # fmt: skip


def _latencies(rows: list[Record]) -> dict[str, Any]:
    values = sorted(r.latency_ms for r in rows)
    return {"n": len(values), "p50_ms": round(percentile(values, 0.5), 2), "p99_ms": round(percentile(values, 0.99), 2),
            "max_ms": round(values[-1], 1) if values else float("nan")}  # fmt: skip


def render(report: dict[str, Any]) -> str:
    s, v = report["soak"], report["soak"]["verdicts"]
    lines = [
        f"# apptgate soak — {report['date']}",
        "",
        f"- machine: {report['machine']['nproc']} CPUs, {report['machine']['cpu_model']}, "
        f"{report['machine']['mem_gib']} GiB, Linux {report['machine']['kernel']}; PostgreSQL {report['postgresql']} "
        f"(same machine); commit {report['commit']}",
        f"- command: `{report['command']}`; wall time {report['wall_seconds']:.0f} s",
        f"- load average (1 min) during the soak: min {s['load1']['min']}, mean {s['load1']['mean']}, "
        f"max {s['load1']['max']} (2 cores; other people's jobs included)",
        f"- one gateway process (`python -m service serve`, APPTGATE_WORKERS=1, bench/run.py's settings), "
        f"{report['settings']['world']} world; open-loop grpc.aio load generator in a separate process, "
        f"{UNARY_CHANNELS} connections; latency from each call's scheduled time",
        f"- rate {report['settings']['rate']:g} calls/s for {report['settings']['duration_s']:g} s; "
        f"{report['settings']['streams']} WatchAppointments streams open throughout; "
        f"{report['settings']['write_rate']:g} writes/s (book + cancel) on the internal listener",
    ]
    probe_result = report.get("probe")
    if probe_result:
        lines.append(
            f"- capacity probe (same mix, closed loop, {probe_result['concurrency']} callers, "
            f"{probe_result['seconds']:g} s, separate gateway process): {probe_result['calls_per_s']:g} calls/s "
            f"(p50 {probe_result['p50_ms']} ms, p99 {probe_result['p99_ms']} ms): the soak rate is "
            f"{100 * report['settings']['rate'] / probe_result['calls_per_s']:.0f}% of it"
        )
    lines += [
        "",
        "## Verdicts (minute 0 is the warm-up)",
        "",
        f"- **RSS growth** (mean of minute {v['compared_minutes'][1]} − mean of minute {v['compared_minutes'][0]}): "
        f"{v['rss_growth_mib']:+.2f} MiB — limit < {RSS_LIMIT_MIB:g} MiB: **{'PASS' if v['rss_ok'] else 'FAIL'}**",
        f"- **p99 stability** (all unary calls): minute {v['compared_minutes'][0]} {v['p99_first_ms']} ms, "
        f"minute {v['compared_minutes'][1]} {v['p99_last_ms']} ms, ratio {v['p99_ratio']} — limit ≤ {P99_LIMIT:g}: "
        f"**{'PASS' if v['p99_ok'] else 'FAIL'}**",
        f"- calls: {s['calls']:,}; statuses: "
        + ", ".join(f"{k} {n:,}" for k, n in s["codes"].items())
        + f"; not the status their kind expects: **{s['unexpected']}**; "
        f"OK with wrong content: **{s['wrong_content']}**"
        + "".join(f"; {code}: {json.dumps(messages)}" for code, messages in s["unexpected_details"].items()),
        "- server access log: "
        + ", ".join(f"{k} {n:,}" for k, n in report["access_log_codes"].items())
        + f"; health after: {report['health_after']}; server alive after: {report['server_alive_after']}",
        f"- streams: {s['streams']['changes_received']:,} changes received, {s['streams']['reconnects']} reconnects "
        f"{s['streams']['ended_by_server'] or ''}, delivery p50 {s['streams']['delivery_p50_ms']} ms / p99 "
        f"{s['streams']['delivery_p99_ms']} ms; writes: {s['writes']}",
        "",
        "## Per minute",
        "",
        "| min | calls | statuses | unexpected | p50 ms | p99 ms | List p50/p99 | Get p50/p99 | Contact p50/p99 "
        "| RSS MiB mean (max) | fds | threads | server CPU % | PG CPU % | loadgen CPU % | load1 | unchained "
        "| oldest xact s |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for m in s["per_minute"]:
        rpc = m["rpc"]
        codes = ", ".join(f"{k} {n}" for k, n in m["codes"].items())
        lines.append(
            f"| {m['minute']} | {m['calls']:,} | {codes} | {m['unexpected']} | {m['p50_ms']} | {m['p99_ms']} "
            + " ".join(f"| {rpc[r]['p50_ms']} / {rpc[r]['p99_ms']}" for r in RPCS)
            + f" | {m.get('rss_mean_mib', '–')} ({m.get('rss_max_mib', '–')}) | {m.get('fds', '–')} "
            f"| {m.get('threads', '–')} | {m.get('server_cpu_pct', '–')} | {m.get('pg_cpu_pct', '–')} "
            f"| {m.get('loadgen_cpu_pct', '–')} | {m.get('load1', '–')} | {m.get('ledger_unchained', '–')} "
            f"| {m.get('oldest_xact_s', '–')} |"
        )
    lines += [
        "",
        "## Whole run, per kind of call",
        "",
        "| kind | RPC | weight | expects | calls | statuses | unexpected | p50 ms | p99 ms | max ms |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, k in s["by_kind"].items():
        codes = ", ".join(f"{c} {n:,}" for c, n in sorted(k["codes"].items()))
        lines.append(f"| {kind} | {k['rpc']} | {k['weight']} | {k['expect']} | {k['calls']:,} | {codes} "
                     f"| {k['unexpected']} | {k['p50_ms']} | {k['p99_ms']} | {k['max_ms']} |")  # fmt: skip
    lines += [
        "",
        f"Overall: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms; per RPC: "
        + "; ".join(f"{r} p50 {s['rpc'][r]['p50_ms']} / p99 {s['rpc'][r]['p99_ms']} ms" for r in RPCS)
        + ".",
        "",
        "RSS is the sum of VmRSS over the server's process tree, sampled every 5 s; `unchained` is the ledger's "
        "backlog (records inserted, not yet hash-chained by the sequencer) at the end of the minute; "
        "`oldest xact` the longest-running transaction seen in the soak's database during the minute "
        "(samples every 5 s; which statement is in the JSON); every sample is in the JSON.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of soak (default 600)")
    parser.add_argument("--rate", type=float,
                        help="calls per second, open loop (default: --rate-share of the probe's throughput, "
                             f"or {FALLBACK_RATE:g} without a probe)")  # fmt: skip
    parser.add_argument("--rate-share", type=float, default=0.5,
                        help="the soak rate as a share of the probed throughput (default 0.5)")  # fmt: skip
    parser.add_argument("--streams", type=int, default=4, help="WatchAppointments streams held open (default 4)")
    parser.add_argument("--write-rate", type=float, default=0.5, help="bookings per second feeding the streams")
    parser.add_argument("--probe-seconds", type=float, default=20.0, help="capacity probe length; 0 skips it")
    parser.add_argument("--probe-concurrency", type=int, default=32)
    parser.add_argument("--size", default="100k", help="bench world (default 100k)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--port-base", type=int, default=56150)
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results")
    parser.add_argument("--at-commit", metavar="REV",
                        help="measure this commit (exported with git archive, bench helpers included) instead of "
                             "the work tree")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the server logs (their directory is printed)")
    parser.add_argument("--commit-label", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def at_commit(rev: str, argv: list[str]) -> int:
    """Run this script from ``rev`` exported with git archive (service, migrations and bench helpers alike)."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    exported = Path(tempfile.mkdtemp(prefix=f"apptgate-soak-src-{commit}-"))
    try:
        archive = subprocess.run(["git", "archive", commit], cwd=common.ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(exported)], input=archive, check=True)
        script = exported / "bench" / "soak.py"
        if not script.exists():  # a commit older than this script: bring it along
            shutil.copy2(Path(__file__), script)
        log(f"measuring commit {commit} (exported to {exported}), not the work tree")
        rest, skip = [], False
        for arg in argv:
            if skip or arg.startswith("--at-commit"):
                skip = arg == "--at-commit"
                continue
            rest.append(arg)
        out = parse_args(rest).out.resolve()
        command = [sys.executable, str(script), *rest, "--out", str(out), "--commit-label", commit]
        env = {**os.environ, "APPTGATE_SOAK_COMMAND": " ".join(["bench/soak.py", *argv])}
        child = subprocess.Popen(command, cwd=exported, env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.terminate()  # it stops its gateway, then exits
            return child.wait()
    finally:
        shutil.rmtree(exported, ignore_errors=True)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks that stop the gateway


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when started in the background, where SIGINT is ignored
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.at_commit:
        return at_commit(args.at_commit, argv)
    # The soak's own database (the bench world's shape): other runs' fixtures empty their world's ledger.
    datagen.world_db_name = lambda appointments, **_: f"apptgate_soak_{common.size_label(appointments)}"
    # bench/run.py's helpers read these: one process, no what-if patches.
    args.workers, args.whatif = 1, ""
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    size = common.parse_size(args.size)
    meta = asyncio.run(datagen.generate_world(datagen.WorldSpec(size)))
    import service

    log(f"service from {Path(service.__file__).parent}, database {meta['database']}")
    pg_pid = asyncio.run(bench._postmaster_of_dsn()) or common.postmaster_pid()
    if args.commit_label:
        commit, dirty = args.commit_label + " (exported with git archive)", False
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                                text=True, check=False).stdout.strip() or "?"  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "service", "migrations", "bench"],
                                cwd=common.ROOT, capture_output=True, text=True, check=False)  # fmt: skip
        dirty = bool(status.stdout.strip())
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": vars(common.Machine.probe()),
        "postgresql": asyncio.run(bench._pg_version()),
        "commit": commit + (" + uncommitted changes in service/, migrations/ or bench/" if dirty else ""),
        "command": os.environ.get("APPTGATE_SOAK_COMMAND") or " ".join(["bench/soak.py", *argv]),
        "settings": {"duration_s": args.duration, "rate": args.rate, "rate_share": args.rate_share,
                     "streams": args.streams,
                     "write_rate": args.write_rate, "world": common.size_label(size), "mix": MIX,
                     "call_timeout_s": CALL_TIMEOUT, "sample_every_s": SAMPLE_EVERY},
    }  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="apptgate-soak-"))
    server: bench.Server | None = None
    try:
        if args.probe_seconds > 0:
            fx = asyncio.run(bench.prepare_fixture(size, meta))
            extras = asyncio.run(prepare_extras(fx))
            server = bench.start_gateway(fx, "gateway", args.port_base + 10, workdir, args)
            log(f"capacity probe: {args.probe_concurrency} callers, closed loop, {args.probe_seconds:g} s")
            report["probe"] = asyncio.run(probe(fx, extras, server, args))
            log(f"  {report['probe']}")
            server.stop()
            server = None
        if args.rate is None:
            probed = report.get("probe", {}).get("calls_per_s")
            args.rate = round(args.rate_share * probed) if probed else FALLBACK_RATE
        report["settings"]["rate"] = args.rate
        fx = asyncio.run(bench.prepare_fixture(size, meta))  # a fresh key and an empty ledger for the soak
        extras = asyncio.run(prepare_extras(fx))
        server = bench.start_gateway(fx, "gateway", args.port_base, workdir, args)
        bench.gateway_codes(server)  # skip the start-up check's line
        log(f"soak: {args.rate:g} calls/s for {args.duration:g} s, {args.streams} streams, pid {server.pids[0]}")
        result = asyncio.run(soak(fx, extras, server, args, pg_pid))
        report["health_after"] = asyncio.run(health(server.port))
        report["server_alive_after"] = server.alive()
        report["access_log_codes"] = dict(sorted(bench.gateway_codes(server).items()))
        report["soak"] = summarize(result, args)
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            log(f"kept the server logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    md, js = args.out / f"{stamp}-soak.md", args.out / f"{stamp}-soak.json"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(render(report))
    print(md.read_text())
    log(f"written: {md}, {js}")
    verdicts = report["soak"]["verdicts"]
    return 0 if verdicts["rss_ok"] and verdicts["p99_ok"] and report["soak"]["unexpected"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
