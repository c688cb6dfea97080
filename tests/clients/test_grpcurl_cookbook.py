"""docs/grpcurl.md works as written: every ``sh`` block runs against a live gateway, in order.

The blocks run in one bash process (so a variable a block sets, like ``$TOKEN``,
is there for the next ones), with the variables ``make run`` exports bound to
a real world: the agenda world's partner, practitioner and consented patient.
A block must exit 0 with ``set -e`` semantics, unless the HTML comment after it
says ``<!-- expect: exit N ... -->``; the JSON strings of that comment must
appear in the block's output. The test also checks that the variables the
page relies on are exactly those ``make run`` prints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from client_world import ROOT, WEEK_END, WEEK_START, Agenda

from demo import walkthrough

COOKBOOK = ROOT / "docs" / "grpcurl.md"
_BLOCK = re.compile(r"^```sh\n(.*?)^```\n(?:<!--\s*expect:(.*?)-->)?", re.MULTILINE | re.DOTALL)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_EXIT = re.compile(r"\bexit\s+(\d+)")
_VARIABLE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)")
_ASSIGNED = re.compile(r"^([A-Z_][A-Z0-9_]*)=", re.MULTILINE)
_TABLE_VARIABLE = re.compile(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)? \|", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One ``sh`` block of the cookbook and what its run must show."""

    index: int
    script: str
    exit_status: int
    expected: tuple[str, ...]


def blocks(text: str) -> list[Block]:
    found = []
    for index, match in enumerate(_BLOCK.finditer(text)):
        expect = match.group(2) or ""
        status = _EXIT.search(_JSON_STRING.sub("", expect))
        found.append(
            Block(
                index,
                match.group(1),
                int(status.group(1)) if status else 0,
                tuple(json.loads(s) for s in _JSON_STRING.findall(expect)),
            )
        )
    return found


def make_run_variables() -> set[str]:
    """The names of the variables ``make run`` exports (service.walkthrough, what the demo prints)."""
    placeholder = {
        f.name: WEEK_START if f.type == "datetime" else f"<{f.name}>"
        for f in dataclasses.fields(walkthrough.DemoValues)
    }
    return set(walkthrough.variables(walkthrough.DemoValues(**placeholder)))


def test_the_cookbook_relies_only_on_what_make_run_prints() -> None:
    text = COOKBOOK.read_text()
    found = blocks(text)
    assert len(found) >= 25, "the cookbook lost commands"
    assert text.count("```sh") == len(found), "a sh block is not followed by a blank-line-free closing fence"
    exported = make_run_variables()
    documented = {name for row in _TABLE_VARIABLE.findall(text) for name in row if name}
    assert documented == exported
    assigned = set(_ASSIGNED.findall("\n".join(b.script for b in found)))
    used = set(_VARIABLE.findall("\n".join(b.script for b in found)))
    assert used - assigned - {"PATH", "PWD"} == exported


async def test_every_cookbook_command_works_against_a_live_gateway(
    tmp_path: Path, partner_target: str, internal_target: str, agenda: Agenda
) -> None:
    (first, *_) = await agenda.partner.list_all(start_time=harness.ts(WEEK_START), end_time=harness.ts(WEEK_END))
    variables = {
        "PARTNER": partner_target,
        "INTERNAL": internal_target,
        "KEY": agenda.partner.secret,
        "INTERNAL_TOKEN": harness.INTERNAL_TOKEN,
        "PARTNER_ID": agenda.partner.partner_id,
        "PRACTITIONER_ID": agenda.practitioner_id,
        "PATIENT_ID": agenda.consented_patient_id,
        "APPOINTMENT_ID": first.appointment_id,  # the consented patient's first appointment
        "START": f"{WEEK_START:%Y-%m-%dT%H:%M:%SZ}",
        "END": f"{WEEK_END:%Y-%m-%dT%H:%M:%SZ}",
    }
    assert set(variables) == make_run_variables()
    found = blocks(COOKBOOK.read_text())
    script = ["set -u -o pipefail", "shopt -s inherit_errexit"]
    script += [f"export {name}='{value}'" for name, value in variables.items()]
    for block in found:
        out, status = tmp_path / f"out.{block.index}", tmp_path / f"status.{block.index}"
        # A block that must succeed runs under errexit: any failing command ends the whole run.
        script.append("set -e" if block.exit_status == 0 else "set +e")
        script.append(f"{{\n{block.script}}} >{out} 2>&1")
        script.append(f"echo $? >{status}")
    # PATH as a user has it before the cookbook's first block adds .venv/bin (grpcurl, from the dev install).
    env = harness.environment(PATH=os.environ.get("PATH", "") + os.pathsep + str(Path(sys.executable).parent))
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", "\n".join(script), cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL
    )
    await asyncio.wait_for(shell.wait(), timeout=120)

    for block in found:
        out, status = tmp_path / f"out.{block.index}", tmp_path / f"status.{block.index}"
        output = out.read_text() if out.exists() else "(not run)"
        where = f"block {block.index} of docs/grpcurl.md:\n{block.script}\n--- output:\n{output}"
        if not status.exists():
            pytest.fail(f"failed (or never ran): {where}")
        assert int(status.read_text()) == block.exit_status, where
        for expected in block.expected:
            assert expected in output, f"{expected!r} missing from {where}"
        assert "LEAKCHECK-REASON" not in output, where  # the visit reason never reaches a partner
    assert shell.returncode == 0
