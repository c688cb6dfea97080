"""``audit patient-history``: a patient's history from the command line, and its page read back from a browser.

The world: two partners list a patient's appointment, one reads the email with
the patient's consent, the other tries without one and is refused; another
patient of the same practitioner goes through the same partners with values of
their own, which must appear nowhere in the first patient's history.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import shutil
import signal
import stat
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import harness
import pytest
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE
from harness import MONDAY, World
from page_text import UUID_PATTERN, PageText, words

from service.cli import audit
from service.store.database import Database

#: A partner name and a purpose written to break a page that would not escape them.
HOSTILE_NAME = 'Cabinet <script>document.title="PWNED"</script> & "Fils" <img src=x onerror=alert(1)>'
AGENDA_NAME = "Agenda Plus"
PURPOSE = "Rappels de rendez-vous par e-mail <b>48 h avant</b>"
OTHER_PURPOSE = "OTHERPATIENT-PURPOSE relances téléphoniques"
#: The browser's wait for a page; far above what it needs, so that a loaded machine does not fail the test.
BROWSER_TIMEOUT = 120.0


@pytest.fixture
def chromium() -> str:
    """The Chromium binary on PATH; the test is skipped, saying why, without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium binary on PATH (`make test` installs Debian's chromium when run as root)")
    return found


@dataclass
class Scene:
    """The world above, with what the tests look for."""

    patient: Any
    other: Any
    agenda: harness.PartnerHandle
    cabinet: harness.PartnerHandle
    appointment_id: str
    other_appointment_id: str


@pytest.fixture
async def scene(world: World) -> Scene:
    practitioner = await world.practitioner("Dr Aline Martin", "Cardiology")
    patient = await world.patient()
    other = await world.patient()
    mine = await world.appointment(practitioner, patient.patient_id, start=MONDAY + timedelta(hours=9))
    theirs = await world.appointment(practitioner, other.patient_id, start=MONDAY + timedelta(hours=11))
    agenda = await world.partner(AGENDA_NAME, practitioner)
    cabinet = await world.partner(HOSTILE_NAME, practitioner)

    def by_start(listed: list[Any]) -> tuple[str, str]:
        [first, second] = sorted(listed, key=lambda a: a.start_time.ToDatetime())
        return first.appointment_id, second.appointment_id

    agenda_mine, agenda_theirs = by_start(await agenda.list_all())
    cabinet_mine, _ = by_start(await cabinet.list_all())
    consent = await world.consent(patient.patient_id, agenda.partner_id, [CONTACT_FIELD_EMAIL], purpose=PURPOSE)
    await agenda.contact(agenda_mine, consent.token)
    other_consent = await world.consent(
        other.patient_id, agenda.partner_id, [CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE], purpose=OTHER_PURPOSE
    )
    await agenda.contact(agenda_theirs, other_consent.token)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cabinet.contact(cabinet_mine, "")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return Scene(patient, other, agenda, cabinet, mine.appointment_id, theirs.appointment_id)


async def _history(database_dsn: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return await harness.audit_cli(database_dsn, tmp_path / "data", "patient-history", *args)


def _secrets(patient: Any) -> list[str]:
    """A patient's personal values, none of which a history page may hold (it names fields, not values)."""
    return [patient.given_name, patient.family_name, patient.email, patient.phone]


async def test_the_history_has_the_four_entries_of_the_patient_with_names_fields_purpose_and_counts(
    scene: Scene, database_dsn: str, tmp_path: Path
) -> None:
    code, out, err = await _history(database_dsn, tmp_path, "--patient", scene.patient.patient_id)

    assert code == 0, err
    document = json.loads(out)
    assert document["patient_id"] == scene.patient.patient_id
    assert document["window"] == {"start_time": None, "end_time": None}
    found = {
        (e["partner"]["display_name"], e["view"], tuple(e["fields"]), e["outcome"], e["denial_reason"], e["purpose"])
        for e in document["entries"]
    }
    assert found == {
        (AGENDA_NAME, "basic", (), "disclosed", "", ""),
        (HOSTILE_NAME, "basic", (), "disclosed", "", ""),
        (AGENDA_NAME, "contact", ("email",), "disclosed", "", PURPOSE),
        (HOSTILE_NAME, "contact", (), "denied", "CONSENT_REQUIRED", ""),
    }
    for entry in document["entries"]:
        assert entry["count"] == 1
        assert entry["appointment"]["appointment_id"] == scene.appointment_id
        assert entry["appointment"]["practitioner_display_name"] == "Dr Aline Martin"
    assert [e["last_time"] for e in document["entries"]] == sorted(
        (e["last_time"] for e in document["entries"]), reverse=True
    )
    assert document["totals"]["responses"] == {
        "disclosed": 3, "denied": 1, "requested": 0, "consent_granted": 0, "internal_use": 0,
    }  # fmt: skip
    for value in [*_secrets(scene.other), OTHER_PURPOSE, scene.other_appointment_id, scene.other.patient_id]:
        assert value not in out
    assert '"entries": 4' in err


async def test_a_history_read_a_page_at_a_time_is_the_same_history(scene: Scene, database: Database) -> None:
    patient = uuid.UUID(scene.patient.patient_id)

    whole = await audit.read_history(database, patient, None, None)
    paged = await audit.read_history(database, patient, None, None, page_size=1)

    assert len(whole.entries) == 4
    assert paged.entries == whole.entries
    assert len({e.group_key for e in paged.entries}) == 4


async def test_the_history_as_csv_has_a_row_per_entry(scene: Scene, database_dsn: str, tmp_path: Path) -> None:
    code, out, err = await _history(database_dsn, tmp_path, "--patient", scene.patient.patient_id, "--format", "csv")

    assert code == 0, err
    header, *rows = list(csv.reader(io.StringIO(out)))
    assert header[:3] == ["partner_id", "partner_display_name", "appointment_id"]
    assert sorted(dict(zip(header, row, strict=True))["outcome"] for row in rows) == ["denied"] + ["disclosed"] * 3


async def test_a_window_after_every_access_holds_nothing(scene: Scene, database_dsn: str, tmp_path: Path) -> None:
    code, out, err = await _history(
        database_dsn, tmp_path, "--patient", scene.patient.patient_id, "--from", "2100-01-01T00:00:00Z"
    )

    assert code == 0, err
    assert json.loads(out)["entries"] == []


async def test_the_page_read_back_from_a_browser_tells_the_patient_and_no_one_else(
    chromium: str, scene: Scene, database_dsn: str, tmp_path: Path
) -> None:
    page = tmp_path / "history.html"

    code, out, err = await _history(
        database_dsn, tmp_path, "--patient", scene.patient.patient_id, "--format", "html",
        "--timezone", "Europe/Paris", "--output", str(page),
    )  # fmt: skip

    assert code == 0, err
    assert out == ""
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    markup = page.read_text(encoding="utf-8")
    dom = await _rendered_dom(chromium, page, tmp_path)
    read = PageText(dom)
    fr, en, everything = read.text("fr"), read.text("en"), read.text()

    # The partners by name (the hostile one as text, its markup inert), the purpose, the practitioner.
    assert AGENDA_NAME in everything and words(HOSTILE_NAME) in everything
    assert words(PURPOSE) in fr and words(PURPOSE) in en
    assert "Dr Aline Martin" in everything and "Cardiology" in everything
    # Both languages: what was seen, the email named, the refusal explained.
    assert "Qui a consulté vos données de rendez-vous" in fr and "Who has seen your appointment data" in en
    assert "A vu les horaires de votre rendez-vous" in fr and "Saw your appointment times" in en
    assert "A reçu votre adresse e-mail, avec votre consentement." in fr
    assert "Received your email address, with your consent." in en
    assert "sans votre consentement ; refusé, rien n’a été transmis." in fr
    assert "without your consent; refused, nothing was sent." in en
    assert "Rendez-vous du lundi 4 mars 2030 à 10 h 00" in fr  # 09:00 UTC, in Paris
    # Nothing of the other patient, and no personal value of this one: fields are named, not shown.
    for value in [*_secrets(scene.other), *_secrets(scene.patient), OTHER_PURPOSE, "LEAKCHECK"]:
        assert value not in markup and value not in dom
    for identifier in (scene.other.patient_id, scene.other_appointment_id):
        assert identifier not in markup and identifier not in dom
    # No internal notion; ids only in the reference footer, but the patient's own reference.
    assert not re.findall(r"\b(views?|outcomes?|denied|basic|consent_required|disclos\w*)\b", everything, re.I)
    assert set(UUID_PATTERN.findall(read.text(refs=False))) == {scene.patient.patient_id}
    assert {scene.agenda.partner_id, scene.cabinet.partner_id, scene.appointment_id} <= set(
        UUID_PATTERN.findall(everything)
    )
    # The browser built no element from the third-party text, and nothing ran.
    assert not {"script", "img", "iframe", "b"} & set(read.tags)
    assert not [name for _, name, _ in read.attributes if name.startswith("on") or name in ("src", "href")]
    assert read.headings["title"] == ["Qui a consulté vos données · Who has seen your data"]


async def _rendered_dom(chromium: str, page: Path, home: Path) -> str:
    """The DOM Chromium built from ``page`` (headless, a profile of its own under ``home``), once the page loaded."""
    process = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", f"--user-data-dir={home / 'browser'}", "--dump-dom", page.as_uri(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.environment(HOME=str(home), XDG_CONFIG_HOME=str(home), XDG_CACHE_HOME=str(home)),
        start_new_session=True,  # its helper processes too are ended with it on a timeout
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=BROWSER_TIMEOUT)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-4000:]
    assert out.strip(), err.decode(errors="replace")[-4000:]
    return out.decode()


async def test_an_unknown_patient_exits_2_with_one_line_and_writes_no_file(database_dsn: str, tmp_path: Path) -> None:
    missing = str(uuid.uuid4())
    target = tmp_path / "history.html"

    code, out, err = await _history(database_dsn, tmp_path, "--patient", missing, "--output", str(target))

    assert code == 2
    assert out == ""
    assert err.strip().splitlines() == [f"apptgate: --patient: no patient has the id {missing}"]
    assert not target.exists()


async def test_a_window_ending_before_it_starts_exits_2_with_one_line(database_dsn: str, tmp_path: Path) -> None:
    code, _, err = await _history(
        database_dsn, tmp_path, "--patient", str(uuid.uuid4()),
        "--from", "2030-03-04T00:00:00Z", "--to", "2030-03-01T00:00:00Z",
    )  # fmt: skip

    assert code == 2
    [line] = err.strip().splitlines()
    assert "the window ends before it starts" in line and line.startswith("apptgate: --to")
