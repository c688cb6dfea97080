"""The command line's errors: one line ``apptgate: …``, exit 2 for bad input, 1 for an operational failure.

Run as subprocesses, as an operator runs them: every problem of the
configuration in one run, no embedded database created by a command that
only reads one, a database role without privileges, ``--debug``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import harness
import pytest

from service.cli.main import _describe
from service.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound, Unavailable


async def _run(*args: str, env: dict[str, str], cwd: Path | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _without_database(**extra: str) -> dict[str, str]:
    env = harness.environment(**extra)
    for name in ("DATABASE_URL", "APPTGATE_DATA_DIR", "APPTGATE_LOG_LEVEL"):
        if name not in extra:
            env.pop(name, None)
    return env


async def test_every_problem_of_a_production_configuration_is_listed_in_one_run(tmp_path: Path) -> None:
    env = _without_database(
        APPTGATE_ENV="production",
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_WORKERS="abc",
        APPTGATE_DB_POOL_MIN="few",
        APPTGATE_DEFAULT_DEADLINE="soon",
        APPTGATE_ALLOW_INSECURE="maybe",
        APPTGATE_PARTNER_ADDR="0.0.0.0:50051",
        APPTGATE_SIGNING_KEY_FILE=str(tmp_path / "no-such-signing-key"),
        OTEL_METRICS_EXPORTER="graphite",
        OTEL_EXPORTER_PROMETHEUS_PORT="99999",
    )
    env.pop("APPTGATE_INTERNAL_TOKEN", None)

    code, _, err = await _run("serve", env=env)

    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith("apptgate: ") and lines[0].endswith("problems with the configuration:"), lines
    problems = [line.strip() for line in lines[1:]]
    expected = [
        "APPTGATE_WORKERS: expected a whole number, got 'abc'",
        "APPTGATE_DB_POOL_MIN: expected a whole number, got 'few'",
        "APPTGATE_DEFAULT_DEADLINE: expected a number, got 'soon'",
        "APPTGATE_ALLOW_INSECURE: expected true or false, got 'maybe'",
        "OTEL_METRICS_EXPORTER: expected one of none, console, otlp, prometheus, got 'graphite'",
        "OTEL_EXPORTER_PROMETHEUS_PORT: expected a port from 1 to 65535, got 99999",
        "DATABASE_URL: required in production",
        "APPTGATE_PARTNER_ADDR: the partner listener 0.0.0.0:50051 is not on loopback and has no TLS, which "
        "production refuses",
        "APPTGATE_INTERNAL_TOKEN or APPTGATE_INTERNAL_TOKEN_FILE is required",
        "APPTGATE_SERVER_SECRET or APPTGATE_SERVER_SECRET_FILE is required in production",
        "APPTGATE_DATA_KEY or APPTGATE_DATA_KEY_FILE is required in production",
        f"APPTGATE_SIGNING_KEY_FILE: cannot read {tmp_path / 'no-such-signing-key'}",
    ]
    assert [e for e in expected if not any(p.startswith(e) for p in problems)] == [], problems
    assert len(problems) == len(expected), problems
    assert not (tmp_path / "data").exists()  # refused before anything was created


async def test_a_command_that_reads_a_database_creates_none_and_says_where_it_looked(tmp_path: Path) -> None:
    env = _without_database(
        APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
        APPTGATE_WORKERS="1",
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
    )
    commands = [
        ("serve",),
        ("audit", "verify"),
        ("data-key", "status"),
        ("partners", "usage", "--partner", str(uuid.uuid4())),
    ]
    for command in commands:
        code, out, err = await _run(*command, env=env, cwd=tmp_path)
        lines = err.strip().splitlines()
        assert (code, len(lines)) == (1, 1), (command, err)
        assert lines[0].startswith("apptgate: no database: DATABASE_URL is unset"), lines
        assert str(tmp_path / ".apptgate" / "pgdata") in lines[0] and "apptgate migrate" in lines[0]
        assert out == ""
    assert os.listdir(tmp_path) == []  # no data directory, no database, no key


async def test_a_command_that_reads_a_database_refuses_the_embedded_one_in_production(tmp_path: Path) -> None:
    code, _, err = await _run("audit", "verify", env=_without_database(APPTGATE_ENV="production"), cwd=tmp_path)

    assert (code, err.strip()) == (
        2,
        "apptgate: DATABASE_URL: required in production (the embedded PostgreSQL is for development)",
    )
    assert os.listdir(tmp_path) == []


@pytest.fixture
async def weak_role(database_dsn: str) -> AsyncIterator[str]:
    """A login on the test's database that owns nothing and was granted nothing; yields its URL."""
    name = f"apptgate_weak_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(f"CREATE ROLE {name} LOGIN")
        parts = urlsplit(database_dsn)
        host = parts.netloc.rpartition("@")[2]
        yield urlunsplit((parts.scheme, f"{name}@{host}", parts.path, parts.query, parts.fragment))
    finally:
        await conn.execute(f"DROP ROLE IF EXISTS {name}")
        await conn.close()


async def test_a_database_role_without_privileges_is_one_line_and_debug_adds_the_detail(
    weak_role: str, tmp_path: Path
) -> None:
    env = harness.environment(DATABASE_URL=weak_role, APPTGATE_DATA_DIR=str(tmp_path / "data"))
    env.pop("APPTGATE_LOG_LEVEL", None)
    args = ("partners", "usage", "--partner", str(uuid.uuid4()))

    code, _, err = await _run(*args, env=env)
    debug_code, _, debug_err = await _run("--debug", *args, env=env)
    after_code, _, after_err = await _run(*args, "--debug", env=env)
    level_code, _, level_err = await _run(*args, env={**env, "APPTGATE_LOG_LEVEL": "debug"})

    assert code == 1
    assert err.strip().splitlines() == [
        "apptgate: the database refused DATABASE_URL's role (InsufficientPrivilegeError, SQLSTATE 42501): check its "
        "privileges; rerun with --debug for the detail"
    ]
    for returned, detailed in ((debug_code, debug_err), (after_code, after_err), (level_code, level_err)):
        assert returned == 1
        assert "Traceback (most recent call last)" in detailed and "permission denied" in detailed
        assert detailed.strip().splitlines()[-1] == err.strip()


HINT = "rerun with --debug for the detail"


@pytest.mark.parametrize(
    ("error", "line", "code"),
    [
        (ConfigError(["APPTGATE_X: bad"]), "APPTGATE_X: bad", 2),
        (NotFound("partner not found", metadata={"partner_id": "p-1"}), "partner not found (partner_id p-1)", 2),
        (FailedPrecondition("the key is already revoked"), "the key is already revoked", 2),
        (InvalidArgument.field("--rps", "must be positive"), "invalid --rps: must be positive", 2),
        (Unavailable("the database is unreachable"), "the database is unreachable; check DATABASE_URL", 1),
        (asyncpg.CheckViolationError('new row violates: DETAIL (Zelda, +33600000101)'),
         f"the database refused the values given (CheckViolationError, SQLSTATE 23514); {HINT}", 2),
        (RuntimeError("patient Zelda Quenneville, +33600000101"), f"unexpected RuntimeError; {HINT}", 1),
        (ExceptionGroup("g", [KeyError("zelda.demo@example.invalid")]), f"unexpected KeyError; {HINT}", 1),
        (OSError(13, "Permission denied", "/srv/report.csv"), "Permission denied (/srv/report.csv)", 1),
    ],
)  # fmt: skip
def test_each_error_becomes_one_line_with_its_exit_code_and_no_text_it_did_not_write(
    error: Exception, line: str, code: int
) -> None:
    assert _describe(error) == (line, code)


async def test_a_usage_error_is_one_line_naming_the_command_and_its_help() -> None:
    env = _without_database()
    missing = await _run("partners", env=env)
    unknown = await _run("audit", "breach-report", "--format", "docx", env=env)
    not_a_uuid = await _run("partners", "usage", "--partner", "not-a-uuid", env=env)

    for code, out, err in (missing, unknown, not_a_uuid):
        assert (code, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and err.startswith("apptgate: "), err
        assert err.rstrip().endswith("--help)"), err
    assert "partners_command" in missing[2]
    assert "invalid choice: 'docx'" in unknown[2]
    assert not_a_uuid[2].startswith("apptgate: --partner: not a UUID: 'not-a-uuid' (see ")
