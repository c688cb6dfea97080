"""``python -m service partners …`` as an operator runs it: real processes, their output, their exit codes."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import harness
import pytest
from appointments.internal.v1 import partner_registry_pb2
from harness import PartnerHandle, World

RFC3339_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")
UNKNOWN = "00000000-0000-4000-8000-00000000c11a"


async def partners(database_dsn: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run ``python -m service partners ARGS``; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "partners", *args,
        env=harness.environment(DATABASE_URL=database_dsn, APPTGATE_DATA_DIR=str(tmp_path / "cli-data")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    assert "Traceback" not in err.decode(), err.decode()
    return process.returncode, out.decode(), err.decode()


async def answer(database_dsn: str, tmp_path: Path, *args: str) -> Any:
    """The JSON answer of a command that must succeed."""
    code, out, err = await partners(database_dsn, tmp_path, *args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def names(message: Any) -> set[str]:
    """The field names of a proto message type."""
    return {field.name for field in message.DESCRIPTOR.fields}


async def test_a_partner_is_onboarded_and_its_key_rotated_with_an_overlap(
    world: World, database_dsn: str, tmp_path: Path
) -> None:
    practitioner = await world.practitioner()
    patient = await world.patient()
    await world.appointment(practitioner, patient.patient_id)
    run = (database_dsn, tmp_path)

    created = await answer(*run, "create", "--display-name", "Agenda Onboarded")
    partner_id = created["partner_id"]
    grant = await answer(*run, "grant", "--partner", partner_id, "--practitioner", practitioner)
    lapse = (datetime.now(UTC) + timedelta(days=14)).replace(microsecond=0)
    old = await answer(*run, "issue-key", "--partner", partner_id, "--expire-time", lapse.isoformat())
    new = await answer(*run, "issue-key", "--partner", partner_id)
    stub = harness.partner_grpc.PartnerAppointmentServiceStub(world.partner_channel)
    old_handle = PartnerHandle(partner_id, old["key_id"], old["secret"], stub)
    new_handle = PartnerHandle(partner_id, new["key_id"], new["secret"], stub)
    assert len((await old_handle.list()).appointments) == 1  # the overlap: both keys work
    assert len((await new_handle.list()).appointments) == 1
    revoked = await answer(*run, "revoke-key", "--key", old["key_id"])
    keys = await answer(*run, "keys", "--partner", partner_id)
    listed = await answer(*run, "list")
    shown = await answer(*run, "show", "--partner", partner_id)

    assert shown == created and created["display_name"] == "Agenda Onboarded"
    assert set(created) == names(partner_registry_pb2.Partner)
    assert listed == {"partners": [created]}
    assert grant["practitioner_id"] == practitioner and grant["revoke_time"] is None
    assert set(grant) == names(partner_registry_pb2.PractitionerGrant)
    assert old["expire_time"] == lapse.strftime("%Y-%m-%dT%H:%M:%SZ") and new["expire_time"] is None
    assert old["secret"].startswith(old["key_id"] + ".") and set(old) == names(partner_registry_pb2.PartnerKey)
    assert revoked["state"] == "PARTNER_KEY_STATE_REVOKED" and RFC3339_UTC.fullmatch(revoked["revoke_time"])
    assert [(k["key_id"], k["state"]) for k in keys["keys"]] == [
        (old["key_id"], "PARTNER_KEY_STATE_REVOKED"),
        (new["key_id"], "PARTNER_KEY_STATE_ACTIVE"),
    ]
    assert all(RFC3339_UTC.fullmatch(k["last_use_time"]) for k in keys["keys"])  # each listed once
    assert all("secret" not in k for k in keys["keys"]) and old["secret"].split(".")[1] not in json.dumps(keys)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await old_handle.list()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len((await new_handle.list()).appointments) == 1


async def test_tables_are_the_default_and_show_what_an_operator_looks_for(
    world: World, database_dsn: str, tmp_path: Path
) -> None:
    partner = await world.partner("Agenda Tabled")
    await world.revoke_key(partner.key_id)

    listed = await partners(database_dsn, tmp_path, "list")
    keys = await partners(database_dsn, tmp_path, "keys", "--partner", partner.partner_id)
    usage = await partners(database_dsn, tmp_path, "usage", "--partner", partner.partner_id)

    assert [code for code, _, _ in (listed, keys, usage)] == [0, 0, 0]
    header, row = listed[1].splitlines()
    assert header.split() == ["partner_id", "display_name", "create_time"]
    assert row.startswith(partner.partner_id) and "Agenda Tabled" in row
    header, row = keys[1].splitlines()
    assert header.split() == ["key_id", "state", "create_time", "last_use_time", "expire_time", "revoke_time"]
    key_id, state, created, last_use, expires, revoked = row.split()
    assert (key_id, state, last_use, expires) == (partner.key_id, "REVOKED", "-", "-")
    assert RFC3339_UTC.fullmatch(created) and RFC3339_UTC.fullmatch(revoked)
    lines = dict(line.split(None, 1) for line in usage[1].splitlines())
    assert lines["partner_id"] == partner.partner_id and lines["flag_time"] == "-"
    assert {"limits.burst", "limits.patient_daily_cap", "limits.suspend_time"} <= set(lines)


async def test_limits_are_set_shown_and_refused_when_out_of_range(
    world: World, database_dsn: str, tmp_path: Path
) -> None:
    partner = await world.partner("Agenda Limited")
    run = (database_dsn, tmp_path)

    limits = await answer(*run, "set-limits", "--partner", partner.partner_id, "--burst", "7", "--contact-cap", "0")
    usage = await answer(*run, "usage", "--partner", partner.partner_id)

    assert (limits["burst"], limits["contact_daily_cap"], limits["suspend_time"]) == (7, 0, None)
    assert usage["limits"] == limits and set(usage) == names(partner_registry_pb2.PartnerUsage)
    assert usage["day"] == datetime.now(UTC).date().isoformat() and usage["flag_time"] is None


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("show", "--partner", UNKNOWN), f"apptgate: partner not found (--partner {UNKNOWN})"),
        (("show", "--partner", "agenda-a"), "apptgate: --partner: "),
        (("keys", "--partner", UNKNOWN), f"apptgate: partner not found (--partner {UNKNOWN})"),
        (("usage", "--partner", UNKNOWN), f"apptgate: partner not found (--partner {UNKNOWN})"),
        (("lift", "--partner", "{partner}"), "apptgate: the partner is not suspended (--partner {partner})"),
        (("set-limits", "--partner", "{partner}", "--contact-cap", "-1"), "apptgate: --contact-cap: must be zero or"),
        (("set-limits", "--partner", "{partner}", "--burst", "-3", "--rps", "nan"), "apptgate: --rps: must be "),
        (("set-limits", "--partner", "{partner}", "--patient-cap", "99999999999"), "apptgate: --patient-cap: out of"),
        (("set-limits", "--partner", "{partner}", "--burst", "lots"), "apptgate: --burst: must be a whole number"),
        (("set-limits", "--partner", UNKNOWN, "--burst", "3"), f"apptgate: partner not found (--partner {UNKNOWN})"),
        (("revoke-key", "--key", "pk_" + "a" * 16), "apptgate: partner key not found (--key pk_aaaaaaaaaaaaaaaa)"),
        (("revoke-key", "--key", "{key}"), "apptgate: the key is already revoked (--key {key})"),
        (("revoke-key", "--key", "pk_nope"), "apptgate: --key: not a key id"),
        (("issue-key", "--partner", UNKNOWN), f"apptgate: partner not found (--partner {UNKNOWN})"),
        (("issue-key", "--partner", "{partner}", "--expire-time", "2001-01-01T00:00:00Z"),
         "apptgate: --expire-time: must be in the future"),
        (("issue-key", "--partner", "{partner}", "--expire-time", "next tuesday"), "apptgate: --expire-time: must be"),
        (("issue-key", "--partner", "{partner}", "--expire-time", "2040-01-01T00:00:00"), "apptgate: --expire-time:"),
        (("grant", "--partner", "{partner}", "--practitioner", UNKNOWN), "apptgate: practitioner not found"),
        (("revoke-grant", "--partner", "{partner}", "--practitioner", UNKNOWN), "apptgate: no such access is granted"),
        (("create", "--display-name", "Agenda Refusing"), "apptgate: a partner with this display name exists"),
        (("create", "--display-name", "x" * 201), "apptgate: --display-name: "),
    ],
)  # fmt: skip
async def test_bad_input_is_one_line_and_exit_2_never_a_traceback(
    world: World, database_dsn: str, tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    partner = await world.partner("Agenda Refusing")
    await world.revoke_key(partner.key_id)
    ids = {"partner": partner.partner_id, "key": partner.key_id}

    code, out, err = await partners(database_dsn, tmp_path, *(arg.format(**ids) for arg in args))

    assert (code, out) == (2, "")
    [line] = err.splitlines()
    assert line.startswith(said.format(**ids)), line


async def test_an_unreachable_database_is_an_operational_failure(tmp_path: Path) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{harness.free_port()}/none"

    code, out, err = await partners(closed, tmp_path, "list")

    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert line.startswith("apptgate: ") and "DATABASE_URL" in line
