"""A partner key bound to a client certificate, over real mutual TLS.

The gateway serves the partner listener with TLS and a client CA; two
partners' certificates are issued by that CA. A key bound to one certificate
verifies only over a connection that presented it: over the other partner's
certificate it answers exactly like a wrong key. The certificate's
fingerprint is in the ledger record and the access log of every call.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import grpc.aio
import harness
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import PartnerHandle, World

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database
from service.telemetry.logs import JsonFormatter


@dataclass
class Client:
    """A partner's client certificate: its credentials for a channel, and its SHA-256 fingerprint."""

    credentials: grpc.ChannelCredentials
    fingerprint: str
    pem: bytes


@dataclass
class Scene:
    """A gateway with mutual TLS, a world over it, and two clients with certificates of the same CA."""

    world: World
    port: int
    a: Client
    b: Client


@pytest.fixture
async def scene(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring, tmp_path: Path
) -> AsyncIterator[Scene]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = harness.certificate("apptgate test CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    files = {"ca": harness.pem(ca), "server": harness.pem(harness.certificate("localhost", server_key, (ca, ca_key)))}
    files["server_key"] = harness.key_pem(server_key)
    for name, content in files.items():
        (tmp_path / f"{name}.pem").write_bytes(content)
    clients = []
    for name in ("partner-a", "partner-b"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = harness.certificate(name, key, (ca, ca_key))
        credentials = grpc.ssl_channel_credentials(files["ca"], harness.key_pem(key), harness.pem(cert))
        fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        clients.append(Client(credentials, fingerprint, harness.pem(cert)))
    tls = replace(
        settings,
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server_key.pem",
        tls_client_ca=tmp_path / "ca.pem",
    )
    gateway = Gateway(tls, database, Secrets(os.urandom(32), keyring, data_keys))
    await gateway.start()
    assert gateway.partner and gateway.internal
    try:
        async with (
            grpc.aio.secure_channel(f"localhost:{gateway.partner.port}", clients[0].credentials) as partner_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.internal.port}") as internal_channel,
        ):
            yield Scene(World(partner_channel, internal_channel), gateway.partner.port, clients[0], clients[1])
    finally:
        await gateway.stop(0)


async def _key(world: World, partner_id: str, bound_to: str = "") -> tuple[str, str]:
    key = await world.registry.IssuePartnerKey(
        harness.registry_pb.IssuePartnerKeyRequest(partner_id=partner_id, client_cert_sha256=bound_to),
        metadata=world.internal_metadata,
    )
    assert key.client_cert_sha256 == bound_to.replace(":", "").lower()
    return key.key_id, key.secret


def _fingerprint(error: grpc.aio.AioRpcError) -> tuple[object, ...]:
    """Everything a caller can observe of an error."""
    return (error.code(), error.details(), harness.status_of(error).SerializeToString())


async def _refused(handle: PartnerHandle) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await handle.list()
    return caught.value


async def test_a_key_bound_to_a_certificate_verifies_over_it_only_and_the_record_names_it(scene: Scene) -> None:
    world = scene.world
    practitioner = await world.practitioner()
    await world.appointment(practitioner, (await world.patient()).patient_id)
    partner = await world.partner("Agenda A", practitioner)
    colon_spelled = ":".join(scene.a.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    bound_id, bound_secret = await _key(world, partner.partner_id, colon_spelled)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("apptgate.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        async with grpc.aio.secure_channel(f"localhost:{scene.port}", scene.b.credentials) as channel_b:
            stub_b = harness.partner_grpc.PartnerAppointmentServiceStub(channel_b)
            over_a = PartnerHandle(partner.partner_id, bound_id, bound_secret, partner.stub)
            over_b = PartnerHandle(partner.partner_id, bound_id, bound_secret, stub_b)
            wrong_secret = PartnerHandle(partner.partner_id, bound_id, bound_secret[:-1] + "x", stub_b)

            listed = await over_a.list()
            stolen = await _refused(over_b)  # the key without the certificate's private key
            again = await _refused(over_b)  # answered from memory this time
            wrong = await _refused(wrong_secret)
            unbound_over_b = await PartnerHandle(partner.partner_id, partner.key_id, partner.secret, stub_b).list()
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    records = await world.disclosures(partner_id=partner.partner_id)

    assert len(listed.appointments) == 1 and len(unbound_over_b.appointments) == 1
    assert stolen.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _fingerprint(stolen) == _fingerprint(wrong) == _fingerprint(again)  # exactly like a wrong key
    by_key = {record.key_id: record.client_cert_sha256 for record in records}
    assert by_key == {bound_id: scene.a.fingerprint, partner.key_id: scene.b.fingerprint}
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    served = [(line["key_id"], line["code"], line.get("client_cert")) for line in lines if line.get("key_id")]
    assert (bound_id, "OK", scene.a.fingerprint) in served
    assert (partner.key_id, "OK", scene.b.fingerprint) in served


async def test_a_key_bound_to_a_certificate_is_refused_without_one(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring, scene: Scene
) -> None:
    world = scene.world
    practitioner = await world.practitioner()
    partner = await world.partner("Agenda A", practitioner)
    bound_id, bound_secret = await _key(world, partner.partner_id, scene.a.fingerprint)
    # The same database served by a gateway without TLS: no certificate reaches it.
    plain = Gateway(replace(settings), database, Secrets(os.urandom(32), keyring, data_keys))
    async with harness.serving(plain) as plain_world:
        bound = PartnerHandle(
            partner.partner_id,
            bound_id,
            bound_secret,
            harness.partner_grpc.PartnerAppointmentServiceStub(plain_world.partner_channel),
        )
        unbound = replace(bound, key_id=partner.key_id, secret=partner.secret)

        refused = await _refused(bound)
        served = await unbound.list()

    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served is not None


@pytest.mark.parametrize("value", ["ab" * 31, "zz" * 32, "ab:" * 31 + "a", "ab" * 32 + "\n"])
async def test_a_malformed_certificate_fingerprint_is_invalid(scene: Scene, value: str) -> None:
    partner = await scene.world.partner("Agenda A")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _key(scene.world, partner.partner_id, value)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert harness.bad_fields(caught.value) == {"client_cert_sha256"}


async def _cli(database_dsn: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "partners", *args,
        env=harness.environment(DATABASE_URL=database_dsn, APPTGATE_DATA_DIR=str(tmp_path / "cli-data")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_command_line_issues_a_key_bound_to_a_certificate_file(
    scene: Scene, database_dsn: str, tmp_path: Path
) -> None:
    practitioner = await scene.world.practitioner()
    partner = await scene.world.partner("Agenda A", practitioner)
    (tmp_path / "a.pem").write_bytes(scene.a.pem)
    (tmp_path / "not-a-cert.pem").write_text("hello")

    code, out, err = await _cli(database_dsn, tmp_path, "issue-key", "--partner", partner.partner_id, "--cert",
                                str(tmp_path / "a.pem"), "--format", "json")  # fmt: skip
    bad = await _cli(database_dsn, tmp_path, "issue-key", "--partner", partner.partner_id, "--cert",
                     str(tmp_path / "not-a-cert.pem"))  # fmt: skip

    assert code == 0, err
    issued = json.loads(out)
    assert issued["client_cert_sha256"] == scene.a.fingerprint
    bound = PartnerHandle(partner.partner_id, issued["key_id"], issued["secret"], partner.stub)
    assert (await bound.list()) is not None  # over certificate A
    async with grpc.aio.secure_channel(f"localhost:{scene.port}", scene.b.credentials) as channel_b:
        over_b = replace(bound, stub=harness.partner_grpc.PartnerAppointmentServiceStub(channel_b))
        assert (await _refused(over_b)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert bad[0] == 2 and len(bad[2].strip().splitlines()) == 1 and "Traceback" not in bad[2]
    assert "no PEM certificate" in bad[2]
