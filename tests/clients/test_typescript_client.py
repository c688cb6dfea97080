"""The TypeScript client (clients/typescript) and its example programs against a real gateway.

The examples are compiled with the project's pinned TypeScript and run with
Node.js over gRPC (HTTP/2, plaintext) against the gateway fixture (or, to
test resumption, against gateways a test stops and starts): list-and-contact
(pages, consented contact), watch-agenda (``watchAppointments``) and
request-contact (``requestContactAccess`` and ``watchConsentRequests``). Node.js and
npm are required: without them these tests fail, they never skip.
``npm ci`` runs only when node_modules is missing or older than the lock file
(the ``node_modules`` fixture, with the same stamp as ``make node-modules``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import harness
import pytest
from appointments.internal.v1 import consent_service_pb2
from client_world import (
    NODE_DIR,
    WEEK_END,
    WEEK_START,
    Agenda,
    approve,
    consent_requests,
    deny,
    patient_of_day,
    required_tool,
)

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

EXAMPLE = NODE_DIR / "dist" / "examples" / "list-and-contact.js"
WATCH_AGENDA = NODE_DIR / "dist" / "examples" / "watch-agenda.js"
REQUEST_CONTACT = NODE_DIR / "dist" / "examples" / "request-contact.js"


@pytest.fixture(scope="session")
def node(node_modules: Path) -> str:
    """The node binary, after a build of the client and its example with the pinned TypeScript."""
    node, npm = required_tool("node"), required_tool("npm")
    version = subprocess.run([node, "--version"], check=True, capture_output=True, text=True).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"Node.js 20 or later is required, found {version}"
    subprocess.run([npm, "run", "--silent", "build"], cwd=NODE_DIR, check=True)
    assert EXAMPLE.exists() and WATCH_AGENDA.exists() and REQUEST_CONTACT.exists()
    return node


def _rfc3339(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


async def run_example(node: str, **env: str) -> tuple[int, str, str]:
    """Run the example with ``env`` added; return its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(EXAMPLE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=NODE_DIR,
        env=harness.environment(APPTGATE_START=_rfc3339(WEEK_START), APPTGATE_END=_rfc3339(WEEK_END), **env),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_example_lists_the_week_and_reads_the_consented_contact(
    node: str, partner_target: str, agenda: Agenda
) -> None:
    status, out, err = await run_example(
        node,
        APPTGATE_PARTNER_ADDR=partner_target,
        APPTGATE_PARTNER_KEY=agenda.partner.secret,
        APPTGATE_CONSENT_TOKEN=agenda.consent_token,
    )
    assert status == 0, err
    result = json.loads(out)

    listed = result["appointments"]
    expected = await agenda.partner.list_all(start_time=harness.ts(WEEK_START), end_time=harness.ts(WEEK_END))
    assert [a["appointmentId"] for a in listed] == [a.appointment_id for a in expected]
    assert len(listed) == agenda.appointment_count
    assert all(a["patientRef"].startswith("pat_") and a["status"] == "APPOINTMENT_STATUS_BOOKED" for a in listed)
    assert {a["practitioner"]["practitionerId"] for a in listed} == {agenda.practitioner_id}
    assert "LEAKCHECK" not in json.dumps(listed)  # the basic view: no name, contact or visit reason

    contact = result["contact"]
    assert contact["appointmentId"] == listed[0]["appointmentId"]
    assert contact["patient"]["givenName"].startswith("Leakcheckgiven")
    assert contact["patient"]["email"].startswith("leakcheck.")
    assert "phone" not in contact["patient"] and "sex" not in contact["patient"]
    assert contact["withheldFields"] == ["CONTACT_FIELD_SEX", "CONTACT_FIELD_PHONE"]
    assert result["denied"] is None


async def test_example_reports_a_revoked_consent_with_its_reason(
    node: str, partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    await world.consents.RevokeConsent(
        consent_service_pb2.RevokeConsentRequest(consent_id=agenda.consent_id), metadata=world.internal_metadata
    )
    status, out, err = await run_example(
        node,
        APPTGATE_PARTNER_ADDR=partner_target,
        APPTGATE_PARTNER_KEY=agenda.partner.secret,
        APPTGATE_CONSENT_TOKEN=agenda.consent_token,
    )
    assert status == 3, err
    result = json.loads(out)
    assert result["contact"] is None
    assert result["denied"]["code"] == "PERMISSION_DENIED"
    assert result["denied"]["reason"] == "CONSENT_REVOKED"
    assert len(result["appointments"]) == agenda.appointment_count


async def test_example_reports_a_refused_key(node: str, partner_target: str) -> None:
    status, out, err = await run_example(
        node, APPTGATE_PARTNER_ADDR=partner_target, APPTGATE_PARTNER_KEY="pk_" + "a" * 16 + "." + "b" * 43
    )
    assert status == 1
    assert out == ""
    assert "UNAUTHENTICATED" in err and "INVALID_CREDENTIALS" in err


async def test_example_gives_up_on_an_unreachable_server_within_its_deadline(node: str) -> None:
    status, _, err = await run_example(
        node, APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}", APPTGATE_PARTNER_KEY="pk_x.y"
    )
    assert status == 1
    assert "UNAVAILABLE" in err


# Long-running examples: the change feeds


@dataclass
class Running:
    """A running example: its JSON lines as they come, and its stderr so far."""

    process: asyncio.subprocess.Process
    stderr: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    async def line(self, within: float = 15) -> dict[str, Any]:
        """The next JSON document it printed."""
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout=within)
        assert raw, f"the example ended; stderr: {''.join(self.stderr)}"
        document: dict[str, Any] = json.loads(raw)
        return document

    async def finish(self, within: float = 30) -> int:
        """Wait for it to exit; return its status."""
        status = await asyncio.wait_for(self.process.wait(), timeout=within)
        if self._drain is not None:
            await asyncio.wait_for(self._drain, timeout=5)
        return status

    def said(self, text: str) -> bool:
        return text in "".join(self.stderr)


@contextlib.asynccontextmanager
async def running(node: str, script: Path, **env: str) -> AsyncIterator[Running]:
    """Start ``script`` with ``env`` added; kill it on the way out if it still runs."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=NODE_DIR,
        env=harness.environment(**env),
    )
    run = Running(process)

    async def drain() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            run.stderr.append(line.decode())

    run._drain = asyncio.create_task(drain())
    try:
        yield run
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        run._drain.cancel()


async def book(world: harness.World, agenda: Agenda, hours: int) -> str:
    """Book an appointment of the agenda's practitioner, ``hours`` after the week's second day starts."""
    start = WEEK_START + timedelta(days=1, hours=hours)
    await world.appointment(agenda.practitioner_id, agenda.patient_ids[1], start=start)
    return f"{start:%Y-%m-%dT%H:%M:%S.000Z}"


#: The bookings of the agenda world, made before any test opens a stream (a stream opened "from now"
#: may replay changes committed just before it, see test_python_client_watch.until).
AGENDA_STARTS = {f"{WEEK_START + timedelta(days=day, hours=9):%Y-%m-%dT%H:%M:%S.000Z}" for day in range(7)}


async def change_at(run: Running, start: str) -> dict[str, Any]:
    """The next change the watch-agenda example printed for the appointment starting at ``start``."""
    while True:
        document = await run.line()
        assert document["event"] == "change", document
        if document["startTime"] == start:
            return document
        assert document["startTime"] in AGENDA_STARTS, document


def _restartable(settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring) -> tuple[int, Secrets, Settings]:
    """A fixed partner port, and secrets and settings that a gateway started again on it shares with the first."""
    port = harness.free_port()
    secrets = Secrets(os.urandom(32), keyring, data_keys)  # the same secret on both: resume tokens survive the restart
    return port, secrets, replace(settings, partner_addr=f"127.0.0.1:{port}", internal_addr="127.0.0.1:0")


async def test_watch_agenda_example_follows_changes_and_resumes_across_a_server_restart(
    node: str,
    settings: Settings,
    database: Database,
    keyring: ConsentKeyring,
    data_keys: DataKeyring,
    agenda: Agenda,
    world: harness.World,
) -> None:
    port, secrets, partner_settings = _restartable(settings, keyring, data_keys)
    first = Gateway(partner_settings, database, secrets)
    await first.start()
    second: Gateway | None = None
    try:
        async with running(
            node, WATCH_AGENDA, APPTGATE_PARTNER_ADDR=f"127.0.0.1:{port}", APPTGATE_PARTNER_KEY=agenda.partner.secret
        ) as run:
            assert await run.line() == {"event": "live"}
            before = await book(world, agenda, 11)
            created = await change_at(run, before)
            assert created["changeType"] == "CREATED" and created["appointmentId"].startswith("apt_")
            assert created["resumeToken"]

            await first.stop(1)  # the stream ends with UNAVAILABLE: "resume with the last token"
            during = await book(world, agenda, 12)  # committed while no server listens
            # The client tries to reopen while nothing listens, and keeps trying (its onRetry hook logs each try).
            assert await harness.eventually(lambda: run.said("WatchAppointments: UNAVAILABLE; reopening in"))
            assert run.process.returncode is None
            second = Gateway(partner_settings, database, secrets)
            await second.start()

            assert (await run.line())["startTime"] == during  # replayed, with nothing before it
            after = await book(world, agenda, 17)
            assert (await run.line())["startTime"] == after

            run.process.send_signal(signal.SIGTERM)
            stopped = await run.line()
            assert await run.finish() == 0, run.stderr
        assert stopped["event"] == "stopped" and stopped["resumeToken"]
    finally:
        if second is not None:
            await second.stop(0)


async def test_watch_agenda_example_resumes_from_a_stored_token_exactly_once(
    node: str, partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    key = {"APPTGATE_PARTNER_ADDR": partner_target, "APPTGATE_PARTNER_KEY": agenda.partner.secret}
    async with running(node, WATCH_AGENDA, APPTGATE_PRACTITIONER_ID=agenda.practitioner_id, **key) as run:
        assert await run.line() == {"event": "live"}
        first = await book(world, agenda, 13)
        stored = (await change_at(run, first))["resumeToken"]
        run.process.send_signal(signal.SIGINT)
        assert (await run.line()) == {"event": "stopped", "resumeToken": stored}
        assert await run.finish() == 0
    later = [await book(world, agenda, 15), await book(world, agenda, 16)]
    async with running(node, WATCH_AGENDA, APPTGATE_RESUME_TOKEN=stored, APPTGATE_MAX_CHANGES="2", **key) as run:
        assert await run.line() == {"event": "live"}
        replayed = [(await run.line())["startTime"] for _ in later]
        assert (await run.line())["event"] == "stopped"
        assert await run.finish() == 0
    assert replayed == later


async def test_watch_agenda_example_ends_when_its_key_is_revoked(
    node: str, partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    async with running(
        node, WATCH_AGENDA, APPTGATE_PARTNER_ADDR=partner_target, APPTGATE_PARTNER_KEY=agenda.partner.secret
    ) as run:
        assert await run.line() == {"event": "live"}
        await world.revoke_key(agenda.partner.key_id)
        assert await run.finish() == 1
    assert run.said("UNAUTHENTICATED")
    assert not run.said("reopening")  # not a transient end: never resumed


async def test_watch_agenda_example_gives_up_opening_on_an_unreachable_server_after_its_resume_timeout(
    node: str,
) -> None:
    started = asyncio.get_running_loop().time()
    async with running(
        node,
        WATCH_AGENDA,
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_PARTNER_KEY="pk_x.y",
        APPTGATE_RESUME_TIMEOUT_MS="1500",
    ) as run:
        assert await run.finish() == 1
    took = asyncio.get_running_loop().time() - started
    assert run.said("UNAVAILABLE")
    assert run.said("reopening in")
    assert took < 1.5 + 5  # the budget, and Node.js starting; never the default 60 s


async def test_watch_agenda_example_resumes_a_watch_that_received_nothing_after_more_tries_than_a_count_allowed(
    node: str,
    settings: Settings,
    database: Database,
    keyring: ConsentKeyring,
    data_keys: DataKeyring,
    agenda: Agenda,
    world: harness.World,
) -> None:
    port, secrets, partner_settings = _restartable(settings, keyring, data_keys)
    first = Gateway(partner_settings, database, secrets)
    await first.start()
    second: Gateway | None = None
    try:
        async with running(
            node, WATCH_AGENDA, APPTGATE_PARTNER_ADDR=f"127.0.0.1:{port}", APPTGATE_PARTNER_KEY=agenda.partner.secret
        ) as run:
            assert await run.line() == {"event": "live"}
            # No change yet: the watch holds only the server's bookmarks, which it never printed.
            await first.stop(1)  # UNAVAILABLE, SERVER_SHUTTING_DOWN, after a last bookmark
            during = await book(world, agenda, 12)
            # Six reopenings: more than the five sends a count of attempts allowed before.
            assert await harness.eventually(lambda: "".join(run.stderr).count("reopening in") >= 6)
            assert run.process.returncode is None
            second = Gateway(partner_settings, database, secrets)
            await second.start()

            assert (await change_at(run, during))["changeType"] == "CREATED"
            after = await book(world, agenda, 17)
            assert (await run.line())["startTime"] == after
    finally:
        if second is not None:
            await second.stop(0)


# Consent requests: ask, wait for the answer on the feed, read the contact


async def test_request_contact_example_waits_for_the_approval_then_reads_the_contact(
    node: str, partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    week = await agenda.partner.list_all(start_time=harness.ts(WEEK_START), end_time=harness.ts(WEEK_END))
    appointment_id = week[1].appointment_id
    async with running(
        node,
        REQUEST_CONTACT,
        APPTGATE_PARTNER_ADDR=partner_target,
        APPTGATE_PARTNER_KEY=agenda.partner.secret,
        APPTGATE_APPOINTMENT_ID=appointment_id,
        APPTGATE_FIELDS="email,name",
        APPTGATE_MESSAGE="Hello from Agenda Sync",
        APPTGATE_TTL_SECONDS="3600",
    ) as run:
        requested = await run.line()
        assert requested["event"] == "requested" and requested["state"] == "PENDING"
        assert requested["consentRequestId"].startswith("crq_") and requested["alreadyPending"] is False
        (asked,) = await consent_requests(world, patient_of_day(agenda, 1))
        assert asked.message == "Hello from Agenda Sync" and list(asked.fields) == [1, 4]  # NAME, EMAIL
        assert asked.ttl.seconds == 3600

        await approve(world, patient_of_day(agenda, 1), fields=[4])  # the email only
        changed = await run.line()
        assert changed == {"event": "changed", "consentRequestId": requested["consentRequestId"], "state": "APPROVED"}
        contact = (await run.line())["contact"]
        assert await run.finish() == 0, run.stderr
    assert contact["appointmentId"] == appointment_id
    assert contact["patient"]["email"].startswith("leakcheck.")
    assert "givenName" not in contact["patient"]
    assert "CONTACT_FIELD_NAME" in contact["withheldFields"]


async def test_request_contact_example_follows_a_pending_request_and_reports_a_denial(
    node: str, partner_target: str, agenda: Agenda, world: harness.World
) -> None:
    week = await agenda.partner.list_all(start_time=harness.ts(WEEK_START), end_time=harness.ts(WEEK_END))
    env = {
        "APPTGATE_PARTNER_ADDR": partner_target,
        "APPTGATE_PARTNER_KEY": agenda.partner.secret,
        "APPTGATE_FIELDS": "PHONE",
    }
    async with (
        running(node, REQUEST_CONTACT, APPTGATE_APPOINTMENT_ID=week[2].appointment_id, **env) as first,
        running(node, REQUEST_CONTACT, APPTGATE_APPOINTMENT_ID=week[5].appointment_id, **env) as again,
    ):
        asked = await first.line()
        # The same patient (days 2 and 5), the same field: ALREADY_EXISTS names the pending request, followed.
        pending = await again.line()
        assert pending == {**asked, "alreadyPending": True} or asked == {**pending, "alreadyPending": True}
        await deny(world, patient_of_day(agenda, 2))
        for run in (first, again):
            assert (await run.line())["state"] == "DENIED"
            assert await run.finish() == 3, run.stderr


async def test_request_contact_example_reports_an_unknown_appointment(
    node: str, partner_target: str, agenda: Agenda
) -> None:
    async with running(
        node,
        REQUEST_CONTACT,
        APPTGATE_PARTNER_ADDR=partner_target,
        APPTGATE_PARTNER_KEY=agenda.partner.secret,
        APPTGATE_APPOINTMENT_ID="apt_" + "a" * 26,
    ) as run:
        assert await run.finish() == 1
    assert run.said("NOT_FOUND")
