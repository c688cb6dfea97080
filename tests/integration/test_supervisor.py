"""``python -m service serve`` with several workers: they never outlive their supervisor.

Real processes throughout: a supervisor started as the service is, its workers
found through ``/proc`` (the supervisor's children, and the sockets each one
listens on), and signals sent by pid.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import audit_service_pb2 as audit_pb
from appointments.internal.v1 import audit_service_pb2_grpc as audit_grpc

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")

WORKERS = 2
#: How long workers may take to be gone once their supervisor is: generous for a loaded machine.
WORKERS_GONE_WITHIN = 30.0


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, from ``/proc/<pid>/stat``; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in parentheses, may hold spaces: the fields start after its last ")".
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1])


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie left for a parent that does not reap it has stopped)."""
    found = _state_and_parent(pid)
    return found is not None and found[0] not in ("Z", "X")


def _children(pid: int) -> set[int]:
    """The running children of ``pid``."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _state_and_parent(int(entry.name))
            if found is not None and found[1] == pid and found[0] not in ("Z", "X"):
                children.add(int(entry.name))
    return children


def _listening_sockets(port: int) -> set[str]:
    """The ``socket:[inode]`` names of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    names = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            columns = line.split()
            local, state, inode = columns[1], columns[3], columns[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                names.add(f"socket:[{inode}]")
    return names


def _listens(pid: int, port: int) -> bool:
    """True when process ``pid`` holds a socket listening on ``port``."""
    wanted = _listening_sockets(port)
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in wanted:
                return True
        except OSError:
            continue
    return False


@dataclass
class Supervisor:
    process: asyncio.subprocess.Process
    workers: set[int]
    partner_port: int
    internal_port: int


def _env(dsn: str, tmp_path: Path, token: str, partner_port: int, internal_port: int) -> dict[str, str]:
    return harness.environment(
        DATABASE_URL=dsn,
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_INTERNAL_TOKEN=token,
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{partner_port}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{internal_port}",
        APPTGATE_WORKERS=str(WORKERS),
    )


@asynccontextmanager
async def _supervisor(env: dict[str, str]) -> AsyncIterator[Supervisor]:
    """A supervisor whose every worker listens on both ports; whatever is left of it is killed on exit."""
    partner = int(env["APPTGATE_PARTNER_ADDR"].rsplit(":", 1)[1])
    internal = int(env["APPTGATE_INTERNAL_ADDR"].rsplit(":", 1)[1])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    workers: set[int] = set()
    try:

        def all_serving() -> bool:
            assert process.returncode is None, f"the supervisor exited with {process.returncode}"
            workers.update(_children(process.pid))
            return len(workers) == WORKERS and all(_listens(w, partner) and _listens(w, internal) for w in workers)

        assert await harness.eventually(all_serving, within=60), f"workers {workers} never all served"
        yield Supervisor(process, set(workers), partner, internal)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


async def _gone(pids: set[int]) -> float:
    """Wait until none of ``pids`` runs; return the seconds it took (fails past the deadline)."""
    started = time.monotonic()
    gone = await harness.eventually(lambda: not any(_running(pid) for pid in pids), within=WORKERS_GONE_WITHIN)
    assert gone, f"workers still running {WORKERS_GONE_WITHIN:.0f} s after their supervisor: {pids}"
    return time.monotonic() - started


async def _internal_call(port: int, token: str) -> grpc.StatusCode:
    """One internal call with ``token`` on a new connection: its status code."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await audit_grpc.AuditServiceStub(channel).ListDisclosures(
                audit_pb.ListDisclosuresRequest(page_size=1),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_workers_stop_when_their_supervisor_is_killed(database_dsn: str, tmp_path: Path) -> None:
    env = _env(database_dsn, tmp_path, harness.INTERNAL_TOKEN, harness.free_port(), harness.free_port())
    async with _supervisor(env) as supervisor:
        supervisor.process.send_signal(signal.SIGKILL)
        await supervisor.process.wait()

        await _gone(supervisor.workers)


async def test_sighup_stops_the_supervisor_and_its_workers_cleanly(database_dsn: str, tmp_path: Path) -> None:
    env = _env(database_dsn, tmp_path, harness.INTERNAL_TOKEN, harness.free_port(), harness.free_port())
    async with _supervisor(env) as supervisor:
        supervisor.process.send_signal(signal.SIGHUP)

        assert await asyncio.wait_for(supervisor.process.wait(), timeout=60) == 0
        await _gone(supervisor.workers)


async def test_a_new_supervisor_never_serves_beside_the_workers_of_a_killed_one(
    database_dsn: str, tmp_path: Path
) -> None:
    partner_port, internal_port = harness.free_port(), harness.free_port()
    old_token, new_token = "old-internal-token-" + "o" * 32, "new-internal-token-" + "n" * 32
    async with _supervisor(_env(database_dsn, tmp_path, old_token, partner_port, internal_port)) as first:
        assert await _internal_call(internal_port, old_token) == grpc.StatusCode.OK
        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()
        await _gone(first.workers)

    async with _supervisor(_env(database_dsn, tmp_path, new_token, partner_port, internal_port)):
        # Each call opens a new connection, which the kernel may hand to any listener on the port.
        codes = [await _internal_call(internal_port, old_token) for _ in range(40)]
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        assert await _internal_call(internal_port, new_token) == grpc.StatusCode.OK


async def test_a_supervisor_refuses_ports_another_process_listens_on(database_dsn: str, tmp_path: Path) -> None:
    partner_port, internal_port = harness.free_port(), harness.free_port()
    # A listener as a stale worker holds it: SO_REUSEPORT, which would let a new worker bind beside it.
    with socket.socket() as stale:
        stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stale.bind(("127.0.0.1", internal_port))
        stale.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "serve",
            env=_env(database_dsn, tmp_path, harness.INTERNAL_TOKEN, partner_port, internal_port),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(process.communicate(), timeout=60)
        finally:
            if process.returncode is None:
                for pid in _children(process.pid):
                    os.kill(pid, signal.SIGKILL)
                process.kill()
                await process.wait()

    assert process.returncode == 1, err.decode()[-3000:]  # an operational failure, as for one process
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "APPTGATE_INTERNAL_ADDR" in lines[0] and "in use" in lines[0]
