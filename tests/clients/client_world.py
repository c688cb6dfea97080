"""Shared by the client tests: a small agenda world, and where the Node.js tooling lives."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import harness
import pytest
from appointments.internal.v1 import consent_pb2
from appointments.internal.v1 import consent_service_pb2 as consent_pb
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_NAME
from google.protobuf.duration_pb2 import Duration

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "clients" / "typescript"
#: The same stamp as `make node-modules`: npm ci runs again only when the lock file changes.
NODE_STAMP = NODE_DIR / "node_modules" / ".installed"

#: The week the agenda world books (harness.MONDAY, a Monday).
WEEK_START = harness.MONDAY
WEEK_END = harness.MONDAY + timedelta(days=7)


@dataclass
class Agenda:
    """One partner granted one practitioner's week; one patient consented to share name and email."""

    partner: harness.PartnerHandle
    practitioner_id: str
    hidden_practitioner_id: str
    patient_ids: list[str]
    appointment_count: int
    consented_patient_id: str
    consent_id: str
    consent_token: str


async def build_agenda(world: harness.World) -> Agenda:
    """Seven appointments, one a day at 09:00 from :data:`WEEK_START`, the first of the consented patient.

    One more appointment belongs to a practitioner who granted the partner nothing.
    """
    practitioner = await world.practitioner("Dr. Agenda", "Dermatology")
    hidden = await world.practitioner("Dr. Hidden")
    patients = [await world.patient() for _ in range(3)]
    for day in range(7):
        start = WEEK_START + timedelta(days=day, hours=9)
        await world.appointment(practitioner, patients[day % 3].patient_id, start=start)
    await world.appointment(hidden, patients[0].patient_id, start=WEEK_START + timedelta(hours=10))
    partner = await world.partner("Agenda Sync", practitioner)
    consent = await world.consent(patients[0].patient_id, partner.partner_id, [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL])
    return Agenda(
        partner=partner,
        practitioner_id=practitioner,
        hidden_practitioner_id=hidden,
        patient_ids=[p.patient_id for p in patients],
        appointment_count=7,
        consented_patient_id=patients[0].patient_id,
        consent_id=consent.consent_id,
        consent_token=consent.token,
    )


def patient_of_day(agenda: Agenda, day: int) -> str:
    """The internal id of the patient booked on ``day`` (0 to 6) of the agenda week."""
    return agenda.patient_ids[day % 3]


async def consent_requests(world: harness.World, patient_id: str) -> list[consent_pb2.PatientConsentRequest]:
    """The consent requests made to a patient, newest first, as the patient app lists them (internal API)."""
    reply = await world.consents.ListConsentRequests(
        consent_pb.ListConsentRequestsRequest(patient_id=patient_id, page_size=500), metadata=world.internal_metadata
    )
    return list(reply.consent_requests)


async def pending_request(world: harness.World, patient_id: str) -> consent_pb2.PatientConsentRequest:
    """The patient's one pending consent request (fails unless there is exactly one)."""
    pending = [
        r for r in await consent_requests(world, patient_id) if r.state == consent_pb2.CONSENT_REQUEST_STATE_PENDING
    ]
    assert len(pending) == 1, pending
    return pending[0]


async def approve(
    world: harness.World, patient_id: str, fields: list[int] | None = None, ttl: timedelta | None = None
) -> consent_pb2.PatientConsentRequest:
    """Approve the patient's pending request, as the patient app does (``fields`` empty: as asked)."""
    request = consent_pb.ApproveConsentRequestRequest(
        consent_request_id=(await pending_request(world, patient_id)).consent_request_id, fields=fields or []
    )
    if ttl is not None:
        duration = Duration()
        duration.FromTimedelta(ttl)
        request.ttl.CopyFrom(duration)
    return await world.consents.ApproveConsentRequest(request, metadata=world.internal_metadata)


async def deny(world: harness.World, patient_id: str) -> consent_pb2.PatientConsentRequest:
    """Deny the patient's pending request, as the patient app does."""
    pending = await pending_request(world, patient_id)
    return await world.consents.DenyConsentRequest(
        consent_pb.DenyConsentRequestRequest(consent_request_id=pending.consent_request_id),
        metadata=world.internal_metadata,
    )


def required_tool(name: str) -> str:
    """The path of ``name``; fails the test (never skips it) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required for the client tests (Node.js 20 or later with npm)")
    return path


@dataclass
class DatabaseProxy:
    """A TCP relay in front of PostgreSQL that a test can cut, so the database "goes down" for a gateway.

    ``dsn`` is the real database (TCP or, as the embedded server's, a Unix socket
    given as ``?host=/dir``); :meth:`start` returns a DSN that goes through the relay.
    """

    dsn: str
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self.dsn)
        port = parts.port or 5432
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        if socket_dir.startswith("/"):
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        return await asyncio.open_connection(parts.hostname or "127.0.0.1", port)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._upstream()
        self._writers += [writer, up_writer]
        await asyncio.gather(self._relay(reader, up_writer), self._relay(up_reader, writer))

    async def start(self) -> str:
        """Listen on a free loopback port; return the DSN through the relay."""
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self.dsn)
        user = parts.username or "postgres"
        password = f":{parts.password}" if parts.password else ""
        return urlunsplit(("postgresql", f"{user}{password}@127.0.0.1:{port}", parts.path, "sslmode=disable", ""))

    async def cut(self) -> None:
        """Stop accepting connections and drop the open ones: from now on the database is unreachable."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
