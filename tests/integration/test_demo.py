"""``make run``'s demo: it serves, and every grpcurl command it prints works as pasted."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import harness
import pytest

from demo import walkthrough
from demo import world as demo_data
from service.access.consent_tokens import SigningKey
from service.crypto.sealing import new_key_text


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    dsn = await harness.create_database(admin_dsn, None)
    try:
        yield dsn
    finally:
        await harness.drop_database(admin_dsn, dsn)


async def _read_walkthrough(stream: asyncio.StreamReader) -> str:
    printed = []
    while True:
        line = (await asyncio.wait_for(stream.readline(), timeout=60)).decode()
        assert line, "the demo exited before printing its commands"
        printed.append(line)
        if line.startswith("The partner key is shown once"):
            return "".join(printed)


def _commands(printed: str) -> list[str]:
    """The command lines of the walk-through: after "then paste", every line but blanks and ``#`` comments."""
    _, _, pasted = printed.partition("then paste any of these:")
    pasted, _, _ = pasted.partition("The partner key is shown once")
    return [line for line in pasted.splitlines() if line.strip() and not line.startswith("#")]


async def test_the_demo_serves_and_its_printed_commands_work(empty_dsn: str, tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    env = harness.environment(
        DATABASE_URL=empty_dsn,
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
    )
    env.pop("APPTGATE_INTERNAL_TOKEN", None)
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "demo",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert demo.stdout is not None
        printed = await _read_walkthrough(demo.stdout)
        exports = [line for line in printed.splitlines() if line.startswith("export ")]
        commands = _commands(printed)
        assert len(commands) == len(walkthrough.COMMANDS)
        script = ["set -u", *exports]
        for index, (command, (_, expected, succeeds)) in enumerate(zip(commands, walkthrough.COMMANDS, strict=True)):
            assert command == expected
            script.append(f"echo '=== {index}'")
            script.append(
                f"{command} || exit {100 + index}" if succeeds else f"if {command}; then exit {100 + index}; fi"
            )
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", "\n".join(script), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(shell.communicate(), timeout=120)
        output = out.decode()
        assert shell.returncode == 0, output
    finally:
        demo.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(demo.wait(), timeout=30) == 0

    sections = dict(part.split("\n", 1) for part in output.split("=== ")[1:])
    assert "appointments.partner.v1.PartnerAppointmentService" in sections["0"]
    listed = json.loads(sections["2"])
    assert len(listed["appointments"]) == 5 and listed["nextPageToken"]
    assert not any(p[1] in sections["2"] or (p[4] and p[4] in sections["2"]) for p in demo_data._PATIENTS)
    assert "CONSENT_REQUIRED" in sections["4"]
    contact = json.loads(sections["6"])
    assert set(contact["patient"]) == {"email"}
    assert contact["withheldFields"] == ["CONTACT_FIELD_NAME", "CONTACT_FIELD_SEX", "CONTACT_FIELD_PHONE"]
    asked = json.loads(sections["8"])
    assert asked["consentRequestId"].startswith("crq_") and asked["state"] == "CONSENT_REQUEST_STATE_PENDING"
    assert asked["fields"] == ["CONTACT_FIELD_PHONE", "CONTACT_FIELD_EMAIL"]
    [pending] = json.loads(sections["9"])["consentRequests"]
    assert pending["partnerDisplayName"] == demo_data.DEMO_PARTNER and pending["message"]
    approved = json.loads(sections["10"])
    assert approved["state"] == "CONSENT_REQUEST_STATE_APPROVED"
    assert approved["grantedFields"] == ["CONTACT_FIELD_PHONE"] and approved["consentId"]
    fetched = json.loads(sections["11"])
    assert fetched["consentRequestId"] == asked["consentRequestId"]
    assert fetched["state"] == "CONSENT_REQUEST_STATE_APPROVED" and fetched["consentToken"].startswith("v4.public.")
    assert fetched["grantedFields"] == ["CONTACT_FIELD_PHONE"] and "message" not in fetched
    requested_contact = json.loads(sections["12"])
    assert set(requested_contact["patient"]) == {"phone"}
    assert requested_contact["withheldFields"] == ["CONTACT_FIELD_NAME", "CONTACT_FIELD_SEX", "CONTACT_FIELD_EMAIL"]
    report = json.loads(sections["13"])
    assert report["totals"]["contactPatients"] == "1" and report["totals"]["consentRequestPatients"] == "1"
    [reached] = [patient for patient in report["patients"] if "consentRequests" in patient]
    assert reached["consentRequests"] == "1" and reached["contactFields"] == [
        "CONTACT_FIELD_PHONE",
        "CONTACT_FIELD_EMAIL",
    ]
    assert "SERVING" in sections["14"]


async def test_the_demo_refuses_production_and_issues_nothing(database_dsn: str, tmp_path: Path) -> None:
    token = "production-internal-token-" + "p" * 32
    # A production configuration the service itself would serve with: only the demo is refused.
    env = harness.environment(
        APPTGATE_ENV="production",
        DATABASE_URL=database_dsn,
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_INTERNAL_TOKEN=token,
        APPTGATE_SERVER_SECRET=base64.b64encode(os.urandom(32)).decode(),
        APPTGATE_SIGNING_KEY=SigningKey.generate().secret_paserk(),
        APPTGATE_DATA_KEY=new_key_text(),
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
    )
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "demo",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(demo.communicate(), timeout=60)
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()

    assert demo.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "production" in lines[0], lines
    assert token not in out.decode() + err.decode()
    conn = await asyncpg.connect(database_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM partners") == 0
        assert await conn.fetchval("SELECT count(*) FROM partner_keys") == 0
    finally:
        await conn.close()
