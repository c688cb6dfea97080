"""A fleet on one machine: a PostgreSQL primary, a streaming replica and two gateway processes (``make cluster``).

The primary is a new cluster (``initdb``) and the replica a real streaming
standby made from it with ``pg_basebackup -R``, both with the PostgreSQL
programs the project installs (pgserver's), so it runs wherever ``make
install`` does. Started by root, PostgreSQL runs as the user the embedded
database uses (:data:`service.store.embedded.SERVER_USER`), which refuses
root. The gateways share the primary and read from the replica
(``APPTGATE_READ_REPLICA_URLS``). The test suite uses :class:`Cluster` for
its replica tests; ``python -m demo.cluster`` starts everything, prints where
each part listens, and stops it all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.store.accounts import as_account
from service.store.database import partner_login_dsn
from service.store.embedded import SERVER_USER

#: The database the gateways use in the cluster.
DATABASE = "apptgate"


def programs() -> Path:
    """The directory of the PostgreSQL programs (initdb, pg_ctl, pg_basebackup) pgserver installs."""
    import pgserver._commands

    return Path(pgserver._commands.POSTGRES_BIN_PATH)


def wait_for_port(port: int, process: subprocess.Popen[bytes], within: float = 60.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; raise if ``process`` ends or time runs out."""
    deadline = time.monotonic() + within
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway meant for port {port} did not start (see its log)")
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One PostgreSQL server of the cluster: its data directory, port and log file."""

    data: Path
    port: int

    @property
    def log(self) -> Path:
        """The server's log file, beside its data directory."""
        return self.data.with_suffix(".log")

    def dsn(self, database: str = DATABASE, user: str = "postgres") -> str:
        """A URL to this server (trust authentication on loopback)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"


@dataclass
class Cluster:
    """A primary and one streaming replica under ``base``; :meth:`start` makes and starts them."""

    base: Path
    primary: Node = field(init=False)
    replica: Node = field(init=False)

    def __post_init__(self) -> None:
        self.primary = Node(self.base / "primary", free_port())
        self.replica = Node(self.base / "replica", free_port())
        # Whom the programs run as when started by root: known once start() has made the user.
        self._account: pwd.struct_passwd | None = None

    def start(self) -> None:
        """Make the primary, its database and the replica; start both; return once the replica streams."""
        if os.geteuid() == 0:
            import pgserver.utils

            pgserver.utils.ensure_user_exists(SERVER_USER)
            self._account = pwd.getpwnam(SERVER_USER)
            os.chown(self.base, self._account.pw_uid, self._account.pw_gid)
        self._run("initdb", "-D", self.primary.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        self._configure(self.primary, {"wal_level": "replica", "max_wal_senders": "4", "track_functions": "pl"})
        self._pg_ctl(self.primary, "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres", DATABASE)
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
            "-D", self.replica.data, "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip
        self._configure(self.replica, {"hot_standby": "on"})
        self._pg_ctl(self.replica, "start")

    def stop(self) -> None:
        """Stop both servers (fast shutdown); leave their directories."""
        for node in (self.replica, self.primary):
            if (node.data / "postmaster.pid").exists():
                self._pg_ctl(node, "stop", "-m", "fast")

    def _configure(self, node: Node, settings: dict[str, str]) -> None:
        lines = {
            "port": str(node.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",  # a cluster for trying and testing, made again each time
            **settings,
        }
        with open(node.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("".join(f"{name} = {value}\n" for name, value in lines.items()))

    def _pg_ctl(self, node: Node, *args: str) -> None:
        self._run("pg_ctl", "-D", node.data, "-l", node.log, "-w", *args)

    def _run(self, program: str, *args: str | Path) -> None:
        command = [str(programs() / program), *map(str, args)]
        if self._account is not None:
            command = as_account(self._account, command)
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 (our programs)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()[-500:]}")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Start the cluster and two gateways; print where each listens; stop everything on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m demo.cluster", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="apptgate-cluster-"))
    cluster = Cluster(base)
    gateways: list[subprocess.Popen[bytes]] = []
    gateways_internal: list[str] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start()
        token = os.urandom(24).hex()
        common = {
            "DATABASE_URL": cluster.primary.dsn(),
            "APPTGATE_READ_REPLICA_URLS": partner_login_dsn(cluster.replica.dsn()),
            "APPTGATE_DATA_DIR": str(base / "gateway"),
            "APPTGATE_INTERNAL_TOKEN": token,
        }
        environment = {**os.environ, **common}
        subprocess.run([sys.executable, "-m", "service", "migrate"], env=environment, check=True)
        for n in range(2):
            addresses = {
                "APPTGATE_PARTNER_ADDR": f"127.0.0.1:{free_port()}",
                "APPTGATE_INTERNAL_ADDR": f"127.0.0.1:{free_port()}",
            }
            log = open(base / f"gateway-{n}.log", "ab")  # noqa: SIM115 (open for the child's life)
            gateway = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"], env={**environment, **addresses}, stderr=log
            )
            gateways.append(gateway)
            gateways_internal.append(addresses["APPTGATE_INTERNAL_ADDR"])
            for address in addresses.values():
                wait_for_port(int(address.rsplit(":", 1)[1]), gateway)
            print(f"gateway {n}: partners {addresses['APPTGATE_PARTNER_ADDR']}, "
                  f"internal {addresses['APPTGATE_INTERNAL_ADDR']} (log {log.name})")  # fmt: skip
        print(f"primary: {cluster.primary.dsn()} (log {cluster.primary.log})")
        print(f"replica: {cluster.replica.dsn()} (log {cluster.replica.log})")
        print(f"internal token: {token}")
        internal = gateways_internal[0]
        print(
            "a replica's health: grpcurl -plaintext -d "
            f'\'{{"service": "apptgate.replica.0"}}\' {internal} grpc.health.v1.Health/Check'
        )
        print("Ctrl-C stops everything and removes", base)
        pid, _ = os.wait()  # until a gateway ends by itself, or Ctrl-C
        print(f"a gateway (pid {pid}) stopped: stopping the cluster", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for gateway in gateways:
            gateway.send_signal(signal.SIGTERM)
        for gateway in gateways:
            if gateway.returncode is None:
                with contextlib.suppress(ChildProcessError):  # reaped by os.wait above
                    gateway.wait(timeout=60)
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
