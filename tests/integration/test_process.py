"""``python -m service``: configuration errors, the migration check, draining on SIGTERM, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc


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


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer[0].subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes | Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("apptgate test CA", ca_key, None)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, (ca, ca_key))
    client = _certificate("partner-client", client_key, (ca, ca_key))
    files = {"ca": _pem(ca), "server": _pem(server), "server_key": _key_pem(server_key)}
    paths = {}
    for name, content in files.items():
        (tmp_path / f"{name}.pem").write_bytes(content)
        paths[f"{name}_file"] = tmp_path / f"{name}.pem"
    return {"ca": _pem(ca), "client": _pem(client), "client_key": _key_pem(client_key), **paths}


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
