"""The TypeScript client (clients/typescript) and its example program against a real gateway.

The example is compiled with the project's pinned TypeScript and run with
Node.js over gRPC (HTTP/2, plaintext) against the gateway fixture. Node.js and
npm are required: without them these tests fail, they never skip.
``npm ci`` runs only when node_modules is missing or older than the lock file
(the ``node_modules`` fixture, with the same stamp as ``make node-modules``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import harness
import pytest
from appointments.internal.v1 import consent_service_pb2
from client_world import NODE_DIR, WEEK_END, WEEK_START, Agenda, required_tool

EXAMPLE = NODE_DIR / "dist" / "examples" / "list-and-contact.js"


@pytest.fixture(scope="session")
def node(node_modules: Path) -> str:
    """The node binary, after a build of the client and its example with the pinned TypeScript."""
    node, npm = required_tool("node"), required_tool("npm")
    version = subprocess.run([node, "--version"], check=True, capture_output=True, text=True).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"Node.js 20 or later is required, found {version}"
    subprocess.run([npm, "run", "--silent", "build"], cwd=NODE_DIR, check=True)
    assert EXAMPLE.exists()
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
