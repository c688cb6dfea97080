"""The change-feed fan-out benchmark: many concurrent WatchAppointments streams on one server process.

Measures, on one gateway process (``APPTGATE_WORKERS=1``):

* database transactions per second while the streams are idle, with 0 and
  with N streams open (must not grow with N: one listener per process);
* the server's RSS with no stream, with N idle streams, and after the burst;
* commit-to-delivery latency (p50, p99) over every delivery: a writer books
  appointments one after another; each booking's commit time is taken when
  its CreateAppointment returns, each stream notes when it reads the change.

Usage::

    .venv/bin/python bench/feed_fanout.py [--streams 1000] [--changes 200] [--interval 0.02]

Writes ``bench/results/<date>-feed.md`` and prints it. PostgreSQL from
BENCH_ADMIN_DSN / DATABASE_URL, else the local server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_source(common.ROOT)
from appointments.internal.v1 import (  # noqa: E402
    partner_registry_service_pb2 as registry_pb,
    partner_registry_service_pb2_grpc as registry_grpc,
    scheduling_service_pb2 as scheduling_pb,
    scheduling_service_pb2_grpc as scheduling_grpc,
)
from appointments.partner.v1 import (  # noqa: E402
    partner_appointment_service_pb2 as partner_pb,
    partner_appointment_service_pb2_grpc as partner_grpc,
)
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

TOKEN = "bench-internal-token-" + "f" * 32
STREAMS_PER_CHANNEL = 90  # under the 100 concurrent streams a connection may carry


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


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def xacts(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def main(args: argparse.Namespace) -> str:
    admin = common.admin_dsn()
    name = f"apptgate_feed_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = common.with_database(admin, name)
    env = common.service_env(dict(os.environ, DATABASE_URL=dsn, APPTGATE_INTERNAL_TOKEN=TOKEN, APPTGATE_WORKERS="1",
                                  APPTGATE_FEED_MAX_STREAMS=str(args.streams + 10), APPTGATE_LOG_LEVEL="WARNING",
                                  APPTGATE_PARTNER_RPS="100000", APPTGATE_PARTNER_BURST="100000",
                                  APPTGATE_PATIENT_DAILY_CAP="10000000", APPTGATE_ANOMALY_MIN_VOLUME="100000000",
                                  APPTGATE_DATA_DIR=f"/tmp/{name}"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, check=True, capture_output=True)
    partner_port, internal_port = free_port(), free_port()
    env.update(APPTGATE_PARTNER_ADDR=f"127.0.0.1:{partner_port}", APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{internal_port}")
    server = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env)
    try:
        await wait_port(partner_port)
        await wait_port(internal_port)
        meta = (("authorization", f"Bearer {TOKEN}"),)
        internal = grpc.aio.insecure_channel(f"127.0.0.1:{internal_port}")
        scheduling = scheduling_grpc.SchedulingServiceStub(internal)
        registry = registry_grpc.PartnerRegistryServiceStub(internal)
        practitioner = (
            await scheduling.CreatePractitioner(
                scheduling_pb.CreatePractitionerRequest(display_name="Dr. Feed", specialty="Bench"), metadata=meta
            )
        ).practitioner_id
        patient = (
            await scheduling.CreatePatient(
                scheduling_pb.CreatePatientRequest(given_name="Bench", family_name="Feed"), metadata=meta
            )
        ).patient_id
        partner = (
            await registry.CreatePartner(registry_pb.CreatePartnerRequest(display_name="Feed bench"), metadata=meta)
        ).partner_id
        key = (
            await registry.IssuePartnerKey(registry_pb.IssuePartnerKeyRequest(partner_id=partner), metadata=meta)
        ).secret
        await registry.GrantPractitionerAccess(
            registry_pb.GrantPractitionerAccessRequest(partner_id=partner, practitioner_id=practitioner), metadata=meta
        )
        await asyncio.sleep(2)
        rss_empty = rss_mib(server.pid)
        before = await xacts(dsn)
        await asyncio.sleep(args.idle)
        idle_none = (await xacts(dsn) - before - 1) / args.idle

        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{partner_port}")
                    for _ in range((args.streams + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)]  # fmt: skip
        partner_meta = (("authorization", f"Bearer {key}"),)
        streams = [partner_grpc.PartnerAppointmentServiceStub(channels[n // STREAMS_PER_CHANNEL]).WatchAppointments(
            partner_pb.WatchAppointmentsRequest(), metadata=partner_meta) for n in range(args.streams)]  # fmt: skip
        for stream in streams:
            await stream.initial_metadata()
        await asyncio.sleep(2)
        rss_idle = rss_mib(server.pid)
        before = await xacts(dsn)
        await asyncio.sleep(args.idle)
        idle_streams = (await xacts(dsn) - before - 1) / args.idle

        received: dict[str, list[float]] = {}

        async def reader(stream: object) -> None:
            for _ in range(args.changes):
                change = await stream.read()  # type: ignore[attr-defined]
                received.setdefault(change.appointment.start_time.ToJsonString(), []).append(time.monotonic())

        readers = [asyncio.create_task(reader(s)) for s in streams]
        committed: dict[str, float] = {}
        start = datetime(2031, 1, 6, tzinfo=UTC)
        for n in range(args.changes):
            when = start + timedelta(minutes=n)
            await scheduling.CreateAppointment(scheduling_pb.CreateAppointmentRequest(
                practitioner_id=practitioner, patient_id=patient, start_time=ts(when),
                end_time=ts(when + timedelta(minutes=10))), metadata=meta)  # fmt: skip
            committed[ts(when).ToJsonString()] = time.monotonic()
            await asyncio.sleep(args.interval)
        await asyncio.wait_for(asyncio.gather(*readers), timeout=300)
        rss_after = rss_mib(server.pid)
        latencies = sorted((at - committed[key_]) * 1000 for key_, times in received.items() for at in times)
        for stream in streams:
            stream.cancel()
        for channel in [*channels, internal]:
            await channel.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    report = "\n".join([
        f"# Change-feed fan-out — {datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        f"`bench/feed_fanout.py --streams {args.streams} --changes {args.changes} --interval {args.interval}`, "
        f"one gateway process, {os.cpu_count()} CPUs, PostgreSQL on the same machine.",
        "",
        "| measure | value | target (issue 5) |",
        "| --- | ---: | --- |",
        f"| streams open | {args.streams} | 1,000 |",
        f"| deliveries measured | {len(latencies):,} | |",
        f"| commit-to-delivery p50 | {p50:.1f} ms | |",
        f"| commit-to-delivery p99 | {p99:.1f} ms | < 250 ms |",
        f"| server RSS, no stream | {rss_empty:.1f} MiB | |",
        f"| server RSS, {args.streams} idle streams | {rss_idle:.1f} MiB (+{rss_idle - rss_empty:.1f}) | < 100 MiB for the streams |",
        f"| server RSS after the burst | {rss_after:.1f} MiB | |",
        f"| database transactions/s idle, no stream | {idle_none:.2f} | |",
        f"| database transactions/s idle, {args.streams} streams | {idle_streams:.2f} | independent of the streams |",
        "",
        "Idle transactions are the health probe (one `SELECT 1` a second) and the feed listener's keepalive;"
        " every delivery also writes its audit record (one transaction per stream per batch).",
    ])  # fmt: skip
    out = common.BENCH_DIR / "results" / f"{datetime.now(UTC).strftime('%Y-%m-%d-%H%M')}-feed.md"
    out.write_text(report + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between bookings")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    print(asyncio.run(main(parser.parse_args())))
