"""``python -m service``: configuration and database errors, the migration check, draining on SIGTERM or SIGHUP,
TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.access.consent_tokens import SigningKey
from service.crypto.sealing import new_key_text
from service.store.embedded import SERVER_USER


@dataclass
class Served:
    process: asyncio.subprocess.Process
    partner_port: int
    internal_port: int


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, err.decode()


def _env(dsn: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    defaults = {
        "DATABASE_URL": dsn,
        "APPTGATE_DATA_DIR": str(tmp_path / "data"),
        "APPTGATE_INTERNAL_TOKEN": harness.INTERNAL_TOKEN,
        "APPTGATE_PARTNER_ADDR": f"127.0.0.1:{harness.free_port()}",
        "APPTGATE_INTERNAL_ADDR": f"127.0.0.1:{harness.free_port()}",
    }
    return harness.environment(**{**defaults, **extra})


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    dsn = await harness.create_database(admin_dsn, None)
    try:
        yield dsn
    finally:
        await harness.drop_database(admin_dsn, dsn)


async def test_serve_refuses_an_unmigrated_database_with_a_clear_message(empty_dsn: str, tmp_path: Path) -> None:
    code, err = await _run("serve", env=_env(empty_dsn, tmp_path))

    assert code == 1
    assert "not migrated" in err
    assert "python -m service migrate" in err


async def test_migrate_then_serve_starts(empty_dsn: str, tmp_path: Path) -> None:
    code, err = await _run("migrate", env=_env(empty_dsn, tmp_path))
    assert code == 0, err

    served = await _serve(_env(empty_dsn, tmp_path))
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0


@pytest.mark.parametrize(
    ("extra", "flags", "expected"),
    [
        ({"APPTGATE_PARTNER_ADDR": "0.0.0.0:0"}, (), "--allow-insecure"),
        ({"APPTGATE_PARTNER_ADDR": "[::]:0"}, (), "--allow-insecure"),
        ({"APPTGATE_INTERNAL_ADDR": "0.0.0.0:0"}, ("--allow-insecure",), "--allow-insecure-internal"),
        ({"APPTGATE_PARTNER_ADDR": "0.0.0.0:0"}, ("--allow-insecure-internal",), "--allow-insecure"),
        ({"APPTGATE_INTERNAL_TOKEN": ""}, (), "APPTGATE_INTERNAL_TOKEN"),
        ({"APPTGATE_INTERNAL_TOKEN": "short"}, (), "at least 32"),
        ({"APPTGATE_PARTNER_ADDR": "localhost"}, (), "APPTGATE_PARTNER_ADDR"),
        ({"APPTGATE_DB_POOL_MIN": "five"}, (), "APPTGATE_DB_POOL_MIN"),
        ({"APPTGATE_TLS_CERT": "/nonexistent/cert.pem"}, (), "APPTGATE_TLS_KEY"),
        ({"APPTGATE_ENV": "production"}, (), "APPTGATE_SERVER_SECRET"),
    ],
)
async def test_bad_configuration_is_refused_before_listening(
    database_dsn: str, tmp_path: Path, extra: dict[str, str], flags: tuple[str, ...], expected: str
) -> None:
    code, err = await _run("serve", *flags, env=_env(database_dsn, tmp_path, **extra))

    assert code == 2
    assert expected in err
    assert "Traceback" not in err


#: The password put in every bad DATABASE_URL below: it must never be printed.
SECRET = "s3cret-Pa55word-never-printed"


def _with_login(dsn: str, user: str | None = None, password: str = SECRET) -> str:
    """``dsn`` logging in as ``user`` (default: its own) with ``password``."""
    parts = urlsplit(dsn)
    userinfo, _, host = parts.netloc.rpartition("@")
    name = user or userinfo.partition(":")[0] or "postgres"
    return urlunsplit((parts.scheme, f"{name}:{password}@{host}", parts.path, parts.query, parts.fragment))


def _with_query(dsn: str, parameter: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&{parameter}" if parts.query else parameter
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _quiet_env(dsn: str, tmp_path: Path) -> dict[str, str]:
    """An environment whose only possible complaint is ``dsn``: keys given, so none is created (and logged)."""
    return _env(
        dsn,
        tmp_path,
        APPTGATE_WORKERS="2",
        APPTGATE_SERVER_SECRET=base64.b64encode(os.urandom(32)).decode(),
        APPTGATE_SIGNING_KEY=SigningKey.generate().secret_paserk(),
        APPTGATE_DATA_KEY=new_key_text(),
    )


async def _refused(command: str, dsn: str, tmp_path: Path, code: int) -> str:
    """Run ``command`` with ``dsn``; check it fails with ``code`` in one line, no traceback, no password; return it."""
    returned, err = await _run(command, env=_quiet_env(dsn, tmp_path))
    lines = err.strip().splitlines()
    assert (returned, len(lines)) == (code, 1), err
    assert "Traceback" not in err
    assert SECRET not in err
    return lines[0]


BAD_DATABASE_URLS: dict[str, tuple[Callable[[str], str], int, str]] = {
    "missing database": (
        lambda dsn: _with_login(harness.with_database(dsn, "apptgate_no_such_database")),
        2,
        'DATABASE_URL: the server refused the connection: database "apptgate_no_such_database" does not exist',
    ),
    "unknown role": (
        lambda dsn: _with_login(dsn, user="apptgate_no_such_role"),
        2,
        'DATABASE_URL: the server refused the connection: role "apptgate_no_such_role" does not exist',
    ),
    "closed port": (
        lambda _: f"postgresql://postgres:{SECRET}@127.0.0.1:{harness.free_port()}/test",
        1,
        "the database is unreachable (connection refused); check DATABASE_URL",
    ),
    "bad sslmode": (lambda dsn: _with_query(_with_login(dsn), "sslmode=bogus"), 2, "DATABASE_URL has an sslmode"),
    "not a URL": (
        lambda _: f"host=127.0.0.1 user=postgres password={SECRET}",
        2,
        "DATABASE_URL is not a postgresql://",
    ),
    "port out of range": (
        lambda _: f"postgresql://postgres:{SECRET}@127.0.0.1:99999/test",
        2,
        "DATABASE_URL has a port that is not a number from 1 to 65535",
    ),
}


@pytest.mark.parametrize("command", ["migrate", "serve"])
@pytest.mark.parametrize("case", list(BAD_DATABASE_URLS))
async def test_a_database_url_that_cannot_work_is_one_line_without_its_password(
    database_dsn: str, tmp_path: Path, command: str, case: str
) -> None:
    build, code, expected = BAD_DATABASE_URLS[case]

    line = await _refused(command, build(database_dsn), tmp_path, code)

    assert expected in line


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """The URL, password included, of a PostgreSQL of this module's own that asks for a password.

    The shared test server trusts every local login, so it cannot refuse a wrong password.
    """
    with harness.password_server() as server:
        yield server.login_url()


@pytest.mark.parametrize("command", ["migrate", "serve"])
async def test_a_wrong_password_is_one_line_without_the_password(
    password_server: str, tmp_path: Path, command: str
) -> None:
    right = await asyncpg.connect(password_server)  # the server takes its right password
    await right.close()

    line = await _refused(command, _with_login(password_server), tmp_path, 2)

    assert 'DATABASE_URL: the server refused the connection: password authentication failed for user "postgres"' in line
    assert urlsplit(password_server).password not in line


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A fresh directory under the system's temporary directory, which every user can search.

    pytest's own ``tmp_path`` lies under a directory closed to other users, which
    the embedded PostgreSQL's user could not cross when the tests run as root.
    """
    path = Path(tempfile.mkdtemp(prefix="apg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def _embedded_environment(pgdata: Path) -> dict[str, str]:
    """The environment the embedded server in ``pgdata`` runs programs with, as its superuser sees it."""
    conn = await asyncpg.connect(f"postgresql://postgres:@/postgres?host={pgdata}")
    try:
        await conn.execute("CREATE TEMP TABLE environment (line text)")
        # CSV with separators no line holds: each line of `env` is one value, backslashes and all.
        await conn.execute("COPY environment FROM PROGRAM 'env' WITH (FORMAT csv, DELIMITER E'\\x1f', QUOTE E'\\x1e')")
        lines = [row["line"] for row in await conn.fetch("SELECT line FROM environment")]
    finally:
        await conn.close()
    return dict(line.partition("=")[::2] for line in lines if "=" in line)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_embedded_database_sees_none_of_the_services_secrets(open_tmp: Path, workers: str) -> None:
    secrets = {
        "APPTGATE_SERVER_SECRET": base64.b64encode(os.urandom(32)).decode(),
        "APPTGATE_SIGNING_KEY": SigningKey.generate().secret_paserk(),
        "APPTGATE_DATA_KEY": new_key_text(),
        "APPTGATE_INTERNAL_TOKEN": "embedded-internal-token-" + "e" * 32,
        "PGPASSWORD": SECRET,
    }
    env = harness.environment(
        **secrets,
        APPTGATE_DATA_DIR=str(open_tmp),
        APPTGATE_WORKERS=workers,
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
    )
    env.pop("DATABASE_URL", None)
    code, err = await _run("migrate", env=env)
    assert code == 0, err
    served = await _serve(env)
    try:
        seen = await _embedded_environment(open_tmp / "pgdata")
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0

    assert "PATH" in seen  # the program ran, and its environment was read
    assert sorted(name for name in seen if name.startswith("APPTGATE_") or name in secrets) == [], sorted(seen)
    assert not [value for value in secrets.values() if any(value in line for line in seen.values())]


as_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="what pgserver does as root only")


def _server_status(pgdata: Path) -> dict[str, str]:
    """``/proc/<pid>/status`` of the PostgreSQL server running in ``pgdata``, by field."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    return dict(line.split(":", 1) for line in Path(f"/proc/{postmaster}/status").read_text().splitlines())


@as_root
async def test_run_as_root_the_embedded_database_opens_only_its_data_directory_to_its_own_user(open_tmp: Path) -> None:
    env = harness.environment(
        APPTGATE_DATA_DIR=str(open_tmp),
        APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
        APPTGATE_WORKERS="1",
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
    )
    env.pop("DATABASE_URL", None)
    above = {directory: _mode(directory) for directory in open_tmp.parents}
    code, err = await _run("migrate", env=env)
    assert code == 0, err
    served = await _serve(env)
    try:
        status = _server_status(open_tmp / "pgdata")
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0

    account = pwd.getpwnam(SERVER_USER)
    assert status["Uid"].split() == [str(account.pw_uid)] * 4
    assert (status["Gid"].split(), status["Groups"].split()) == ([str(account.pw_gid)] * 4, [])  # none of root's
    # Of the directories on its way, only the data directory was opened, and only to be crossed.
    assert {directory: _mode(directory) for directory in open_tmp.parents} == above
    assert _mode(open_tmp) == 0o701


@as_root
async def test_the_embedded_database_opens_no_directory_above_the_data_directory(open_tmp: Path) -> None:
    closed = open_tmp / "closed"
    closed.mkdir(mode=0o700)
    env = harness.environment(APPTGATE_DATA_DIR=str(closed / "data"), APPTGATE_WORKERS="1")
    env.pop("DATABASE_URL", None)

    code, err = await _run("migrate", env=env)

    lines = err.strip().splitlines()
    assert (code, len(lines)) == (2, 1), err
    assert f"{closed} keeps it from" in lines[0]
    assert _mode(closed) == 0o700


async def _serve(env: dict[str, str], *flags: str) -> Served:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", *flags, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    partner = int(env["APPTGATE_PARTNER_ADDR"].rsplit(":", 1)[1])
    internal = int(env["APPTGATE_INTERNAL_ADDR"].rsplit(":", 1)[1])
    await harness.wait_for_port(partner)
    await harness.wait_for_port(internal)
    return Served(process, partner, internal)


async def _waiting_on_a_lock(conn: asyncpg.Connection) -> int:
    """Backends of this database waiting on a lock now (a fresh look, even inside a transaction)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    )


async def _draining(port: int) -> bool:
    """Whether the listener on ``port`` has begun to stop: a new connection is told NOT_SERVING, or refused."""
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.UNAVAILABLE
    return reply.status != health_pb2.HealthCheckResponse.SERVING


async def test_sigterm_lets_an_in_flight_call_finish_then_exits_zero(database_dsn: str, tmp_path: Path) -> None:
    # A grace far longer than this test holds the call, however slow the machine.
    served = await _serve(_env(database_dsn, tmp_path, APPTGATE_SHUTDOWN_GRACE="60"))
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{served.partner_port}") as partner_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{served.internal_port}") as internal_channel,
        ):
            world = harness.World(partner_channel, internal_channel)
            practitioner = await world.practitioner()
            partner = await world.partner("A", practitioner)
            blocker = await asyncpg.connect(database_dsn)
            try:
                # Hold the grants table so the next partner call waits inside its transaction.
                transaction = blocker.transaction()
                await transaction.start()
                await blocker.execute("LOCK TABLE practitioner_grants IN ACCESS EXCLUSIVE MODE")
                in_flight = asyncio.ensure_future(partner.list())
                # The call is in flight once the server's statement waits on the lock.
                in_flight_by = time.monotonic() + 30
                while not await _waiting_on_a_lock(blocker):
                    assert time.monotonic() < in_flight_by, "the call never reached the database"
                    assert not in_flight.done(), in_flight
                    await asyncio.sleep(0.02)
                served.process.send_signal(signal.SIGTERM)
                # The server has acted on the signal once its listener stops serving new calls;
                # the call in flight must outlive that.
                draining_by = time.monotonic() + 30
                while not await _draining(served.partner_port):
                    assert time.monotonic() < draining_by, "the server never began to drain"
                    await asyncio.sleep(0.05)
                assert served.process.returncode is None, "exited before the in-flight call finished"
                assert not in_flight.done(), in_flight
                await transaction.rollback()
            finally:
                await blocker.close()
            reply = await asyncio.wait_for(in_flight, timeout=10)
        assert list(reply.appointments) == []
        assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0
    finally:
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_sighup_stops_a_single_process_server_cleanly(database_dsn: str, tmp_path: Path, event_loop: str) -> None:
    served = await _serve(_env(database_dsn, tmp_path, APPTGATE_WORKERS="1", APPTGATE_EVENT_LOOP=event_loop))
    try:
        served.process.send_signal(signal.SIGHUP)

        # Exit code 0, not death by the signal: the server drained and stopped as on SIGTERM.
        assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0
    finally:
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes | Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = harness.certificate("apptgate test CA", ca_key, None)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = harness.certificate("localhost", server_key, (ca, ca_key))
    client = harness.certificate("partner-client", client_key, (ca, ca_key))
    files = {"ca": harness.pem(ca), "server": harness.pem(server), "server_key": harness.key_pem(server_key)}
    paths = {}
    for name, content in files.items():
        (tmp_path / f"{name}.pem").write_bytes(content)
        paths[f"{name}_file"] = tmp_path / f"{name}.pem"
    return {"ca": harness.pem(ca), "client": harness.pem(client), "client_key": harness.key_pem(client_key), **paths}


async def _health(port: int, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


async def test_tls_and_mutual_tls_on_the_partner_listener(
    database_dsn: str, tmp_path: Path, pki: dict[str, bytes | Path]
) -> None:
    env = _env(
        database_dsn,
        tmp_path,
        APPTGATE_TLS_CERT=str(pki["server_file"]),
        APPTGATE_TLS_KEY=str(pki["server_key_file"]),
        APPTGATE_TLS_CLIENT_CA=str(pki["ca_file"]),
    )
    served = await _serve(env)
    try:
        ca = pki["ca"]
        assert isinstance(ca, bytes)
        without_client_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        with_client_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=pki["client_key"],  # type: ignore[arg-type]
            certificate_chain=pki["client"],  # type: ignore[arg-type]
        )

        assert await _health(served.partner_port, with_client_cert) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _health(served.partner_port, without_client_cert)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.partner_port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0


async def test_tls_allows_a_non_loopback_partner_address(
    database_dsn: str, tmp_path: Path, pki: dict[str, bytes | Path]
) -> None:
    port = harness.free_port()
    env = _env(
        database_dsn,
        tmp_path,
        APPTGATE_PARTNER_ADDR=f"0.0.0.0:{port}",
        APPTGATE_TLS_CERT=str(pki["server_file"]),
        APPTGATE_TLS_KEY=str(pki["server_key_file"]),
    )
    served = await _serve(env)
    try:
        ca = pki["ca"]
        assert isinstance(ca, bytes)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        assert await _health(port, credentials) == health_pb2.HealthCheckResponse.SERVING
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), timeout=30) == 0


async def test_the_apptgate_command_runs_the_same_commands_and_tells_its_version(tmp_path: Path) -> None:
    import service

    script = Path(sys.executable).parent / "apptgate"
    outputs = []
    for command in ([str(script)], [sys.executable, "-m", "service"]):
        process = await asyncio.create_subprocess_exec(
            *command, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        outputs.append((process.returncode, out.decode().strip()))
    usage = await asyncio.create_subprocess_exec(
        str(script), "audit", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, usage_err = await asyncio.wait_for(usage.communicate(), timeout=60)

    assert outputs == [(0, f"apptgate {service.__version__}")] * 2
    assert usage.returncode == 2
    assert usage_err.decode().splitlines() == [
        "apptgate: apptgate audit: the following arguments are required: audit_command (see apptgate audit --help)"
    ]
