"""Secrets and the files around them, as an operator meets them: ``python -m service`` run as a real process.

* Key files and the data directory: a file another local user could have
  chosen the content of is refused at start, exit 2, one line naming the file
  and the fix; the data directory a first start creates is 0700 whatever the
  umask, and the development keys in it pass the same checks.
* The internal token and the database passwords come from files too
  (``APPTGATE_INTERNAL_TOKEN_FILE``, ``APPTGATE_DATABASE_PASSWORD_FILE``,
  ``APPTGATE_PARTNER_DATABASE_PASSWORD_FILE``); the passwords are tried on a
  PostgreSQL of this test's own that checks them (scram-sha-256), since the
  suite's server trusts every login.
* ``audit breach-report --output FILE`` writes its file 0600 under umask 022,
  and never through a link planted at that path.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from harness import scheduling_pb

from service.access.consent_tokens import SigningKey
from service.crypto.keyfiles import DATA_KEYS_FILE, SERVER_SECRET_FILE, SIGNING_KEYS_FILE

#: A token the settings accept, for a file.
TOKEN = "Fz8-Kq2vNw7_Lp4xRt9cHm3bYs6dGj5a"
#: Another user, for files the tests give away (root only).
NOBODY = 65534


async def _run(*args: str, env: dict[str, str], umask: int = 0o022) -> tuple[int, str, str]:
    """Run ``python -m service ARGS`` to its end under ``umask``; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", *args, env=env, umask=umask,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _env(dsn: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return harness.environment(
        **{
            "DATABASE_URL": dsn,
            "APPTGATE_DATA_DIR": str(data_dir),
            "APPTGATE_INTERNAL_TOKEN": harness.INTERNAL_TOKEN,
            "APPTGATE_PARTNER_ADDR": f"127.0.0.1:{harness.free_port()}",
            "APPTGATE_INTERNAL_ADDR": f"127.0.0.1:{harness.free_port()}",
            "APPTGATE_WORKERS": "1",
            **extra,
        }
    )


@dataclass
class Serving:
    process: asyncio.subprocess.Process
    internal_port: int


async def _start(env: dict[str, str], umask: int = 0o022) -> Serving:
    """Start ``serve`` and wait until its internal listener accepts connections."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", env=env, umask=umask,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    port = int(env["APPTGATE_INTERNAL_ADDR"].rsplit(":", 1)[1])
    try:
        await harness.wait_for_port(port, within=60)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return Serving(process, port)


async def _stop(serving: Serving) -> None:
    serving.process.send_signal(signal.SIGTERM)
    try:
        assert await asyncio.wait_for(serving.process.wait(), timeout=30) == 0
    finally:
        if serving.process.returncode is None:
            serving.process.kill()
            await serving.process.wait()


def _refused(code: int, err: str) -> str:
    """The one line a refused start printed (exit 2, no traceback), besides its JSON log lines."""
    assert code == 2, err
    assert "Traceback" not in err
    # Log lines (a development key created before the refusal) are JSON objects, one per line.
    lines = [line for line in err.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1, err
    return lines[0]


# --- key files and the data directory ---------------------------------------------------------------------------------


def _key_file_content(variable: str) -> str:
    return {
        "APPTGATE_SERVER_SECRET_FILE": base64.b64encode(os.urandom(32)).decode(),
        "APPTGATE_SIGNING_KEY_FILE": SigningKey.generate().secret_paserk(),
        "APPTGATE_DATA_KEY_FILE": harness.data_key_text(),
        "APPTGATE_INTERNAL_TOKEN_FILE": TOKEN,
    }[variable] + "\n"


@pytest.mark.parametrize(
    ("variable", "how"),
    [
        ("APPTGATE_DATA_KEY_FILE", "mode 0666"),
        ("APPTGATE_SIGNING_KEY_FILE", "symbolic link"),
        ("APPTGATE_SERVER_SECRET_FILE", "another user's"),
        ("APPTGATE_INTERNAL_TOKEN_FILE", "mode 0620"),
    ],
)
async def test_serve_refuses_a_key_file_another_user_could_have_written_with_one_line_and_exit_2(
    database_dsn: str, tmp_path: Path, variable: str, how: str
) -> None:
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("giving a file to another user takes root")
    path = tmp_path / "secret"
    content = _key_file_content(variable)
    path.write_text(content)
    path.chmod(0o600)
    if how == "symbolic link":
        path, target = tmp_path / "secret.link", path
        path.symlink_to(target)
        fix = f"{path} is a symbolic link: name the file itself"
    elif how == "another user's":
        os.chown(path, NOBODY, NOBODY)
        fix = f"chown root {path}"
    else:
        path.chmod(int(how.removeprefix("mode "), 8))
        fix = f"{path} can be written by other users ({how}): chmod 600 {path}"
    env = _env(database_dsn, tmp_path / "data", **{variable: str(path)})
    if variable == "APPTGATE_INTERNAL_TOKEN_FILE":
        env.pop("APPTGATE_INTERNAL_TOKEN")  # the variable would win over its file

    line = _refused(*(await _run("serve", env=env))[::2])

    assert line.startswith(f"apptgate: {variable}: ") and line.endswith(fix)
    assert content.strip()[-12:] not in line


async def test_a_first_start_at_umask_000_makes_a_private_data_directory_and_keys_that_pass_its_checks(
    database_dsn: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"

    for _ in range(2):  # the second start reads what the first created
        await _stop(await _start(_env(database_dsn, data), umask=0))

    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()} == {
        SERVER_SECRET_FILE: 0o600,
        SIGNING_KEYS_FILE: 0o600,
        DATA_KEYS_FILE: 0o600,
    }


async def test_a_signing_key_planted_in_a_data_directory_others_can_write_is_never_used(
    database_dsn: str, tmp_path: Path
) -> None:
    # What an older version left at umask 000, and another local user filled with a key of their own.
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    planted = data / SIGNING_KEYS_FILE
    planted.write_text(SigningKey.generate().secret_paserk() + "\n")

    line = _refused(*(await _run("serve", env=_env(database_dsn, data)))[::2])

    assert line == f"apptgate: APPTGATE_DATA_DIR: {data} can be written by other users (mode 0777): chmod 700 {data}"
    data.chmod(0o700)
    if os.geteuid() == 0:  # the same key file, now in a private directory but owned by the other user
        os.chown(planted, NOBODY, NOBODY)
        line = _refused(*(await _run("serve", env=_env(database_dsn, data)))[::2])
        assert line.startswith(f"apptgate: the development consent-signing key (APPTGATE_SIGNING_KEY unset): {planted}")
        assert line.endswith(f"chown root {planted}")


# --- the internal token from a file -----------------------------------------------------------------------------------


async def test_the_internal_token_can_come_from_a_file_and_a_weak_one_is_refused(
    database_dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "internal-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    env = _env(database_dsn, tmp_path / "data", APPTGATE_INTERNAL_TOKEN_FILE=str(path))
    env.pop("APPTGATE_INTERNAL_TOKEN")

    serving = await _start(env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving.internal_port}") as channel:
            stub = harness.scheduling_grpc.SchedulingServiceStub(channel)
            request = scheduling_pb.CreatePractitionerRequest(display_name="Dr. File", specialty="Tokens")
            created = await stub.CreatePractitioner(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreatePractitioner(request, metadata=(("authorization", f"Bearer {TOKEN[::-1]}"),))
    finally:
        await _stop(serving)
    assert created.display_name == "Dr. File"
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    for weak, complaint in (("A" * 48, "at least 8 different characters"), (" " * 48, "at least 32 characters")):
        path.write_text(weak + "\n")
        line = _refused(*(await _run("serve", env=env))[::2])
        assert line.startswith(f"apptgate: APPTGATE_INTERNAL_TOKEN_FILE: the token in {path} ") and complaint in line
    code, _, err = await _run("serve", env={**env, "APPTGATE_INTERNAL_TOKEN": "x" * 40})
    assert "APPTGATE_INTERNAL_TOKEN: is too weak" in _refused(code, err)


# --- database passwords from files, against a server that checks them -----------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[harness.PasswordServer]:
    with harness.password_server() as server:
        yield server


@pytest.fixture
async def password_database(
    password_server: harness.PasswordServer,
) -> AsyncIterator[tuple[harness.PasswordServer, str]]:
    """A fresh, empty database on the password server."""
    name = f"apptgate_pw_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(password_server.url(), password=password_server.password)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield password_server, name
    finally:
        conn = await asyncpg.connect(password_server.url(), password=password_server.password)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


async def test_the_database_password_comes_from_a_file_and_a_refused_login_is_one_line(
    password_database: tuple[harness.PasswordServer, str], tmp_path: Path
) -> None:
    server, name = password_database
    main = _secret_file(tmp_path / "db-password", server.password + "\n")
    wrong = _secret_file(tmp_path / "wrong-password", "not-the-password\n")
    env = _env(server.url(name), tmp_path / "data")

    without = await _run("migrate", env=env)
    mistaken = await _run("migrate", env={**env, "APPTGATE_DATABASE_PASSWORD_FILE": str(wrong)})
    migrated = await _run("migrate", env={**env, "APPTGATE_DATABASE_PASSWORD_FILE": str(main)})

    # The server's own reason, which names the user and never a password (service/store/database.py words the rest).
    assert 'user "postgres"' in _refused(without[0], without[2])
    line = _refused(mistaken[0], mistaken[2])
    assert line.startswith("apptgate: DATABASE_URL") and "not-the-password" not in line
    assert 'password authentication failed for user "postgres"' in line
    assert migrated[0] == 0, migrated[2]
    assert server.password not in migrated[1] + migrated[2]


async def test_the_partner_login_takes_its_password_from_its_own_file(
    password_database: tuple[harness.PasswordServer, str], tmp_path: Path
) -> None:
    server, name = password_database
    partner_password = "Partner-" + uuid.uuid4().hex
    main = _secret_file(tmp_path / "db-password", server.password + "\n")
    env = _env(server.url(name), tmp_path / "data", APPTGATE_DATABASE_PASSWORD_FILE=str(main))
    assert (await _run("migrate", env=env))[0] == 0
    conn = await asyncpg.connect(server.url(name), password=server.password)
    try:
        await conn.execute(f"ALTER ROLE apptgate_partner PASSWORD '{partner_password}'")
    finally:
        await conn.close()
    partner = _secret_file(tmp_path / "partner-password", partner_password + "\n")
    wrong = _secret_file(tmp_path / "wrong-password", "not-the-partner-password\n")

    refused = await _run("serve", env={**env, "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE": str(wrong)})
    serving = await _start({**env, "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE": str(partner)})
    try:
        conn = await asyncpg.connect(server.url(name), password=server.password)
        try:  # the partner pool is open: its connections are logged in as the partner role
            logged_in = await harness.eventually(
                lambda: conn.fetchval(
                    "SELECT count(*) > 0 FROM pg_stat_activity WHERE usename = 'apptgate_partner' AND datname = $1",
                    name,
                )
            )
        finally:
            await conn.close()
    finally:
        await _stop(serving)

    line = _refused(refused[0], refused[2])
    assert 'password authentication failed for user "apptgate_partner"' in line
    assert "not-the-partner-password" not in line
    assert logged_in


# --- files the command line writes ------------------------------------------------------------------------------------


async def _breach_report(dsn: str, tmp_path: Path, output: Path) -> tuple[int, str, str]:
    conn = await asyncpg.connect(dsn)
    try:  # a partner the report can name (an unknown one is refused before the output is opened)
        partner = await conn.fetchval(
            "INSERT INTO partners (display_name) VALUES ($1) RETURNING id", f"Reported {uuid.uuid4()}"
        )
    finally:
        await conn.close()
    return await _run(
        "audit", "breach-report", "--partner", str(partner), "--since", "2030-01-01T00:00:00Z",
        "--until", "2030-02-01T00:00:00Z", "--format", "csv", "--output", str(output),
        env=_env(dsn, tmp_path / "data"), umask=0o022,
    )  # fmt: skip


async def test_a_breach_report_file_is_created_0600_under_umask_022(database_dsn: str, tmp_path: Path) -> None:
    output = tmp_path / "report.csv"

    code, out, err = await _breach_report(database_dsn, tmp_path, output)

    assert code == 0, err
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert output.read_text().splitlines() == [
        "patient_id,appointment_ids,contact_fields,first_disclosure_time,last_disclosure_time,consent_requests,views,"
        "appointments.start_time,appointments.practitioner_display_name,appointments.practitioner_specialty"
    ]
    assert out == ""


async def test_a_breach_report_never_writes_through_a_link_planted_at_its_path(
    database_dsn: str, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    output = tmp_path / "report.csv"
    output.symlink_to(victim)
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "created-through-the-link")

    refused = await _breach_report(database_dsn, tmp_path, output)
    also_refused = await _breach_report(database_dsn, tmp_path, dangling)

    assert _refused(refused[0], refused[2]) == f"apptgate: --output: {output} is a symbolic link: write to another path"
    assert _refused(also_refused[0], also_refused[2]).endswith("is a symbolic link: write to another path")
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "created-through-the-link").exists()


async def test_an_existing_report_file_is_made_private_before_it_is_rewritten(
    database_dsn: str, tmp_path: Path
) -> None:
    output = tmp_path / "report.csv"
    output.write_text("an older report, much longer than the new one\n" * 10)
    output.chmod(0o644)

    code, _, err = await _breach_report(database_dsn, tmp_path, output)

    assert code == 0, err
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert "older report" not in output.read_text()
