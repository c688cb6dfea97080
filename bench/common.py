"""Shared helpers of the benchmark harness: DSNs, a progress bar, and /proc accounting.

Nothing here imports the service: the harness must keep working while the
service changes under it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


_SOURCE = [ROOT]


def set_source(path: Path) -> None:
    """Run the service (serve, migrate, audit) from ``path``: the work tree, or an exported commit."""
    _SOURCE[0] = path.resolve()
    for entry in (str(path / "clients" / "python" / "src"), str(path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def source() -> Path:
    return _SOURCE[0]


def service_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with PYTHONPATH set so ``python -m service`` and the stubs come from :func:`source`."""
    src = source()
    paths = [str(src), str(src / "clients" / "python" / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def source_migrations() -> dict[int, str]:
    """The migrations in the source tree: version → the SHA-256 of the file, as ``schema_migrations`` records it."""
    return {
        int(p.name[:4]): hashlib.sha256(p.read_text().encode()).hexdigest()
        for p in (source() / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")
    }


def admin_dsn() -> str:
    """The DSN the harness creates its databases with: BENCH_ADMIN_DSN, else DATABASE_URL, else local postgres."""
    return os.environ.get("BENCH_ADMIN_DSN") or os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_DSN


def with_database(dsn: str, name: str) -> str:
    """Return ``dsn`` pointing at database ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def parse_size(text: str) -> int:
    """``100k`` → 100_000, ``1m`` → 1_000_000, ``10M`` → 10_000_000, ``2500`` → 2500."""
    text = text.strip().lower().replace("_", "")
    factor = 1
    if text.endswith("k"):
        factor, text = 1_000, text[:-1]
    elif text.endswith("m"):
        factor, text = 1_000_000, text[:-1]
    return int(float(text) * factor)


def size_label(n: int) -> str:
    """The inverse of :func:`parse_size` for round numbers."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


class Progress:
    """A progress bar on stderr (redrawn at most 5 times a second), with rate and ETA."""

    def __init__(self, label: str, total: int, *, unit: str = "rows") -> None:
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._tty = sys.stderr.isatty()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._drawn >= (0.2 if self._tty else 5.0) or self.done >= self.total:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        fraction = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(fraction * 30)
        line = (
            f"{self.label:<22} [{bar:<30}] {fraction * 100:5.1f}% {self.done:>11,}/{self.total:,} {self.unit} "
            f"{rate:>9,.0f}/s  ETA {eta:5.0f}s"
        )
        end = "\r" if self._tty and self.done < self.total else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.done < self.total:
            self._draw(time.monotonic())
            if self._tty:
                print(file=sys.stderr)
        elapsed = time.monotonic() - self.started
        print(f"{self.label}: {self.done:,} {self.unit} in {elapsed:.1f}s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by the process ``pid`` alone; ``None`` once it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the ')' split: state=0, ppid=1, …, utime=11, stime=12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_map() -> dict[int, list[int]]:
    """ppid → [pid] over every process."""
    result: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        result.setdefault(int(fields[1]), []).append(int(entry))
    return result


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its descendants.

    The root's cutime/cstime hold the CPU of children it has already reaped (a
    PostgreSQL backend that exited during the run still counts), and live
    descendants add their own. Deltas of this value across a run are that
    run's CPU.
    """
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the ')' split: state=0, ppid=1, …, utime=11, stime=12, cutime=13, cstime=14.
        total += int(fields[11]) + int(fields[12])
        if pid == root:
            total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def tree_system_seconds_and_switches(root: int) -> tuple[float, int]:
    """System CPU seconds and context switches so far of ``root``, its live descendants and their threads.

    Per call, these tell a process that waits and wakes more (GIL handoffs,
    socket round trips) from one that computes more: user CPU is the rest of
    :func:`tree_cpu_seconds`.
    """
    system, switches = 0, 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        system += int(fields[12])
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            except FileNotFoundError:
                continue
            for line in status.splitlines():
                if "ctxt_switches:" in line:
                    switches += int(line.split()[1])
    return system / CLK_TCK, switches


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of one process in MiB; zeros when it is gone."""
    rss = hwm = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return rss, hwm


def postmaster_pid() -> int | None:
    """The pid of the local PostgreSQL postmaster (the 'postgres' process whose parent is not 'postgres')."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except FileNotFoundError:
            continue
        if comm != "postgres":
            continue
        try:
            parent_comm = Path(f"/proc/{fields[1]}/comm").read_text().strip()
        except FileNotFoundError:
            parent_comm = ""
        if parent_comm != "postgres":
            return int(entry)
    return None


# --------------------------------------------------------------------------- ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``port``: bind it without SO_REUSEPORT (as a stale grpc server would share it)."""
    for family, address in ((socket.AF_INET, host), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR so that connections in TIME_WAIT do not count; a listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno in (99, 97):  # no IPv6 on this host
                    continue
                return False
    return True


def listeners_of(port: int) -> set[int]:
    """The pids listening on TCP ``port`` (from ``ss``), empty when ss is unavailable."""
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return set()
    pids: set[int] = set()
    for part in out.split("pid=")[1:]:
        digits = part.split(",", 1)[0]
        if digits.isdigit():
            pids.add(int(digits))
    return pids


@dataclass
class Machine:
    nproc: int
    cpu_model: str
    mem_gib: float
    kernel: str

    @classmethod
    def probe(cls) -> Machine:
        model = "unknown"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = 0.0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
        return cls(os.cpu_count() or 1, model, round(mem, 1), os.uname().release)
