"""Test harness: real PostgreSQL databases, a real gateway on free ports, and a small named world.

Nothing here mocks asyncpg or grpc: each test gets its own database (a copy of
a migrated template), a :class:`~service.app.Gateway` bound to 127.0.0.1:0,
and clients over real channels. The fake personal data is distinctive
(``LEAKCHECK``) so a leak can be found with grep.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import inspect
import ipaddress
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import grpc.aio
from appointments.internal.v1 import (
    audit_service_pb2 as audit_pb,
)
from appointments.internal.v1 import (
    audit_service_pb2_grpc as audit_grpc,
)
from appointments.internal.v1 import (
    consent_pb2,
    scheduling_pb2,
)
from appointments.internal.v1 import (
    consent_service_pb2 as consent_pb,
)
from appointments.internal.v1 import (
    consent_service_pb2_grpc as consent_grpc,
)
from appointments.internal.v1 import (
    partner_registry_service_pb2 as registry_pb,
)
from appointments.internal.v1 import (
    partner_registry_service_pb2_grpc as registry_grpc,
)
from appointments.internal.v1 import (
    scheduling_service_pb2 as scheduling_pb,
)
from appointments.internal.v1 import (
    scheduling_service_pb2_grpc as scheduling_grpc,
)
from appointments.partner.v1 import (
    partner_appointment_service_pb2 as partner_pb,
)
from appointments.partner.v1 import (
    partner_appointment_service_pb2_grpc as partner_grpc,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.store import migrations

if TYPE_CHECKING:
    from service.app import Gateway

INTERNAL_TOKEN = "test-internal-token-" + "x" * 32
MONDAY = datetime(2030, 3, 4, tzinfo=UTC)


def with_database(dsn: str, name: str) -> str:
    """Return ``dsn`` pointing at database ``name`` (URL form, socket hosts included)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def create_template(admin_dsn: str) -> str:
    """Create and migrate a template database; return its name."""
    name = f"apptgate_tmpl_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(with_database(admin_dsn, name))
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    return name


async def create_database(admin_dsn: str, template: str | None) -> str:
    """Create a fresh database (a copy of ``template``, or empty); return its DSN."""
    name = f"apptgate_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop a database created by :func:`create_database`, closing its connections."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def ts(value: datetime) -> Timestamp:
    """A Timestamp of an aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The rich ``google.rpc.Status`` of a failed call (fails when the server sent none)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error.code()}"
    return status


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ``ErrorInfo`` detail of a failed call."""
    for detail in status_of(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def bad_fields(error: grpc.aio.AioRpcError) -> set[str]:
    """The fields named by the ``BadRequest`` detail of a failed call."""
    for detail in status_of(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")


@dataclass
class PartnerHandle:
    """A partner in the test world, with its key and a partner-API stub that sends it."""

    partner_id: str
    key_id: str
    secret: str
    stub: partner_grpc.PartnerAppointmentServiceStub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying this partner's key."""
        return (("authorization", f"Bearer {self.secret}"),)

    async def list(self, **fields: Any) -> partner_pb.ListAppointmentsResponse:
        """ListAppointments with this partner's key; ``start_time``/``end_time`` default to a wide window."""
        fields.setdefault("start_time", ts(MONDAY - timedelta(days=30)))
        fields.setdefault("end_time", ts(MONDAY + timedelta(days=300)))
        request = partner_pb.ListAppointmentsRequest(**fields)
        return await self.stub.ListAppointments(request, metadata=self.metadata)

    async def list_all(self, page_size: int = 0, **fields: Any) -> list[Any]:
        """Every page of ListAppointments, concatenated."""
        found: list[Any] = []
        token = ""
        while True:
            page = await self.list(page_size=page_size, page_token=token, **fields)
            found.extend(page.appointments)
            token = page.next_page_token
            if not token:
                return found

    async def get(self, appointment_id: str) -> Any:
        """GetAppointment with this partner's key."""
        return await self.stub.GetAppointment(
            partner_pb.GetAppointmentRequest(appointment_id=appointment_id), metadata=self.metadata
        )

    async def contact(self, appointment_id: str, consent_token: str = "") -> Any:
        """GetAppointmentContact with this partner's key."""
        return await self.stub.GetAppointmentContact(
            partner_pb.GetAppointmentContactRequest(appointment_id=appointment_id, consent_token=consent_token),
            metadata=self.metadata,
        )


@dataclass
class World:
    """Builds practitioners, patients, appointments and partners through the internal API."""

    partner_channel: grpc.aio.Channel
    internal_channel: grpc.aio.Channel
    scheduling: scheduling_grpc.SchedulingServiceStub = field(init=False)
    registry: registry_grpc.PartnerRegistryServiceStub = field(init=False)
    consents: consent_grpc.ConsentServiceStub = field(init=False)
    audit: audit_grpc.AuditServiceStub = field(init=False)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.scheduling = scheduling_grpc.SchedulingServiceStub(self.internal_channel)
        self.registry = registry_grpc.PartnerRegistryServiceStub(self.internal_channel)
        self.consents = consent_grpc.ConsentServiceStub(self.internal_channel)
        self.audit = audit_grpc.AuditServiceStub(self.internal_channel)

    @property
    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata carrying the internal token."""
        return (("authorization", f"Bearer {INTERNAL_TOKEN}"),)

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    async def practitioner(self, name: str = "", specialty: str = "General practice") -> str:
        """Create a practitioner; return its id."""
        n = self._next()
        reply = await self.scheduling.CreatePractitioner(
            scheduling_pb.CreatePractitionerRequest(display_name=name or f"Dr. Test {n}", specialty=specialty),
            metadata=self.internal_metadata,
        )
        return reply.practitioner_id

    async def patient(self, **overrides: Any) -> scheduling_pb2.Patient:
        """Create a patient with distinctive fake contact details; return it."""
        n = self._next()
        fields = {
            "given_name": f"Leakcheckgiven{n:04d}",
            "family_name": f"LEAKCHECK-Family-{n:04d}",
            "sex": 1 + n % 3,
            "phone": f"+3369999{n:04d}",
            "email": f"leakcheck.{n:04d}@example.invalid",
        }
        fields.update(overrides)
        return await self.scheduling.CreatePatient(
            scheduling_pb.CreatePatientRequest(**fields), metadata=self.internal_metadata
        )

    async def appointment(
        self,
        practitioner_id: str,
        patient_id: str,
        start: datetime | None = None,
        minutes: int = 30,
        reason: str = "LEAKCHECK-REASON persistent cough",
    ) -> scheduling_pb2.Appointment:
        """Book an appointment; return it (internal view)."""
        start = start or MONDAY + timedelta(hours=self._next())
        return await self.scheduling.CreateAppointment(
            scheduling_pb.CreateAppointmentRequest(
                practitioner_id=practitioner_id,
                patient_id=patient_id,
                start_time=ts(start),
                end_time=ts(start + timedelta(minutes=minutes)),
                reason=reason,
            ),
            metadata=self.internal_metadata,
        )

    async def partner(self, name: str = "", *grants: str) -> PartnerHandle:
        """Create a partner with one key and the given practitioner grants."""
        partner = await self.registry.CreatePartner(
            registry_pb.CreatePartnerRequest(display_name=name or f"Partner {self._next()}"),
            metadata=self.internal_metadata,
        )
        key = await self.registry.IssuePartnerKey(
            registry_pb.IssuePartnerKeyRequest(partner_id=partner.partner_id), metadata=self.internal_metadata
        )
        for practitioner_id in grants:
            await self.grant(partner.partner_id, practitioner_id)
        return PartnerHandle(
            partner.partner_id,
            key.key_id,
            key.secret,
            partner_grpc.PartnerAppointmentServiceStub(self.partner_channel),
        )

    async def grant(self, partner_id: str, practitioner_id: str) -> None:
        """Grant a partner access to a practitioner."""
        await self.registry.GrantPractitionerAccess(
            registry_pb.GrantPractitionerAccessRequest(partner_id=partner_id, practitioner_id=practitioner_id),
            metadata=self.internal_metadata,
        )

    async def revoke_grant(self, partner_id: str, practitioner_id: str) -> None:
        """Revoke a partner's access to a practitioner."""
        await self.registry.RevokePractitionerAccess(
            registry_pb.RevokePractitionerAccessRequest(partner_id=partner_id, practitioner_id=practitioner_id),
            metadata=self.internal_metadata,
        )

    async def consent(
        self, patient_id: str, partner_id: str, fields: list[int], ttl: float = 3600, purpose: str = "reminders"
    ) -> consent_pb2.Consent:
        """Grant a consent; return it with its token."""
        duration = Duration()
        duration.FromNanoseconds(int(ttl * 1e9))
        return await self.consents.GrantConsent(
            consent_pb.GrantConsentRequest(
                patient_id=patient_id, partner_id=partner_id, fields=fields, ttl=duration, purpose=purpose
            ),
            metadata=self.internal_metadata,
        )

    async def disclosures(self, **filters: Any) -> list[Any]:
        """Every ledger record matching ``filters`` (all pages)."""
        found: list[Any] = []
        token = ""
        while True:
            page = await self.audit.ListDisclosures(
                audit_pb.ListDisclosuresRequest(page_token=token, **filters), metadata=self.internal_metadata
            )
            found.extend(page.disclosures)
            token = page.next_page_token
            if not token:
                return found

    async def issue_key(self, partner_id: str) -> Any:
        """Issue another key to a partner (its ``PartnerKey`` message, secret included)."""
        return await self.registry.IssuePartnerKey(
            registry_pb.IssuePartnerKeyRequest(partner_id=partner_id), metadata=self.internal_metadata
        )

    async def revoke_key(self, key_id: str) -> None:
        """Revoke a partner key."""
        await self.registry.RevokePartnerKey(
            registry_pb.RevokePartnerKeyRequest(key_id=key_id), metadata=self.internal_metadata
        )


@asynccontextmanager
async def serving(gateway: Gateway) -> AsyncIterator[World]:
    """Start ``gateway``, yield a :class:`World` over channels to both of its listeners, then stop it."""
    await gateway.start()
    assert gateway.partner and gateway.internal
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.partner.port}") as partner_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.internal.port}") as internal_channel,
        ):
            yield World(partner_channel, internal_channel)
    finally:
        await gateway.stop(0)


def uuid_of(text: str) -> uuid.UUID:
    """A UUID from its text (for SQL parameters in tests)."""
    return uuid.UUID(text)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PasswordServer:
    """A PostgreSQL of a test module's own that asks for a password (scram-sha-256) on 127.0.0.1."""

    port: int
    password: str

    def url(self, database: str = "postgres") -> str:
        """The URL of its ``postgres`` role, without the password."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def login_url(self) -> str:
        """The URL of its ``postgres`` role, password included."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"


@contextmanager
def password_server() -> Iterator[PasswordServer]:
    """Start a :class:`PasswordServer` (the shared test server trusts every local login) and stop it after the block.

    It runs on the PostgreSQL programs pgserver installs; run by root, which
    PostgreSQL refuses, as the embedded database's own user.
    """
    from pgserver._commands import POSTGRES_BIN_PATH

    from service.store.accounts import as_account
    from service.store.embedded import SERVER_USER

    base = Path(tempfile.mkdtemp(prefix="apg-pw-"))
    account = None
    if os.geteuid() == 0:
        import pgserver.utils

        pgserver.utils.ensure_user_exists(SERVER_USER)  # as the embedded database does: the order of tests is moot
        account = pwd.getpwnam(SERVER_USER)
    password = "Scram-" + uuid.uuid4().hex
    (base / "password").write_text(password)
    if account is not None:
        for path in (base, base / "password"):
            os.chown(path, account.pw_uid, account.pw_gid)
    data, port = base / "data", free_port()

    def pg(program: str, *args: str | Path) -> None:
        command = [POSTGRES_BIN_PATH / program, *args]
        line = as_account(account, command) if account is not None else list(map(str, command))
        # No pipes: the server pg_ctl starts would inherit them and hold them open.
        environment = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}
        subprocess.run(line, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        pg("initdb", "-D", data, "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={base / 'password'}",
           "--encoding=UTF8", "--no-sync")  # fmt: skip
        pg("pg_ctl", "-D", data, "-l", base / "log", "-w", "-o",
           f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off", "start")  # fmt: skip
        yield PasswordServer(port, password)
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


async def wait_for_port(port: int, within: float = 20.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 30.0, interval: float = 0.02
) -> bool:
    """Poll ``condition`` (a function, or a coroutine function) until it holds or ``within`` seconds have passed.

    Returns its last value. For a test that must see something happen (a
    connection returned, a record written by a background task) without
    guessing how long a busy machine takes: the deadline is generous, and the
    caller still asserts on what it waited for.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        outcome = condition()
        held = bool(await outcome) if inspect.isawaitable(outcome) else bool(outcome)
        if held or loop.time() > deadline:
            return held
        await asyncio.sleep(interval)


async def all_chained(conn: asyncpg.Connection) -> bool:
    """Whether every record written so far has its place in the ledger's chain.

    The gateway's sequencer chains committed records every 100 ms, once their
    transaction is older than every one still running in the whole cluster (another
    test run on a shared server can hold that back); ``audit verify`` chains what is
    left, but not while the sequencer is at it: it then counts only what is chained.
    """
    return bool(
        await conn.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM disclosures d "
            "WHERE NOT EXISTS (SELECT 1 FROM disclosure_chain c WHERE c.id = d.id))"
        )
    )


@asynccontextmanager
async def owner_tampering(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that writes past the ledger's triggers, as its owner (or a superuser) can."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        yield conn


async def audit_cli(database_dsn: str, data_dir: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """Run ``python -m service audit ARGS`` against ``database_dsn``; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "audit",
        *args,
        env=environment(DATABASE_URL=database_dsn, APPTGATE_DATA_DIR=str(data_dir), **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def data_key_text(*keys: tuple[int, bytes]) -> str:
    """An ``APPTGATE_DATA_KEY`` value for a subprocess: the ``(id, key)`` pairs given, or one fresh key with id 1."""
    chosen = keys or ((1, os.urandom(32)),)
    return ",".join(f"{key_id}:{base64.b64encode(key).decode()}" for key_id, key in chosen)


def environment(**overrides: str) -> dict[str, str]:
    """A copy of this process's environment with ``overrides`` (for subprocesses)."""
    env = dict(os.environ)
    env.update(overrides)
    return env


def certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    """A certificate for ``subject``: a CA when ``issuer`` is None, else a localhost server or client cert it signs."""
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


def pem(cert: x509.Certificate) -> bytes:
    """The certificate in PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key in unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
