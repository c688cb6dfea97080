"""``audit breach-report`` as a dossier: HTML and PDF, the letters' contact details and their ledger record.

The world: a partner granted two practitioners (two specialties) lists their
appointments and reads the contact details two patients consented to; another
partner of the same practitioners is a bystander. Every report is made by the
command line in a subprocess, with the gateway's data key so that
``--include-contact`` can open the names.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pdf_pages
import pytest
from appointments.internal.v1 import audit_pb2
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_NAME, CONTACT_FIELD_PHONE
from google.protobuf import json_format
from harness import MONDAY, World
from page_text import PageText

from service.crypto.sealing import DataKeyring

DATA_KEY = os.urandom(32)
WINDOW = ("--since", "2000-01-01T00:00:00Z", "--until", "2100-01-01T00:00:00Z")
PARTNER_NAME = 'Agenda <b>"Plus"</b> & Co'
INTERNAL_USE_RPC = "/apptgate.cli.Audit/BreachReport"


@pytest.fixture
def data_keys() -> DataKeyring:
    """The gateway's data key, which the command line is given too (``APPTGATE_DATA_KEY``)."""
    return DataKeyring([(1, DATA_KEY)])


@dataclass
class Scene:
    partner: harness.PartnerHandle
    patients: list[Any]
    #: Patient id → the contact fields the partner received.
    consented: dict[str, list[int]]
    appointments: int


@pytest.fixture
async def scene(world: World) -> Scene:
    heart = await world.practitioner("Dr Aline Martin", "Cardiology")
    mind = await world.practitioner("Dr Paul Roux", "Psychiatry")
    patients = [await world.patient() for _ in range(4)]
    for n, patient in enumerate(patients):
        await world.appointment(heart, patient.patient_id, MONDAY + timedelta(hours=n))
        if n % 2:
            await world.appointment(mind, patient.patient_id, MONDAY + timedelta(days=1, hours=n))
    partner = await world.partner(PARTNER_NAME, heart, mind)
    bystander = await world.partner("Bystander Soft", heart)
    await bystander.list_all()
    listed = await partner.list_all()
    consented = {
        patients[0].patient_id: [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL],
        patients[1].patient_id: [CONTACT_FIELD_PHONE],
    }
    refusals = set()
    for patient_id, fields in consented.items():
        token = (await world.consent(patient_id, partner.partner_id, fields)).token
        for appointment in listed:
            try:
                await partner.contact(appointment.appointment_id, token)
            except grpc.aio.AioRpcError as error:  # another patient's appointment
                refusals.add(error.code())
    assert refusals == {grpc.StatusCode.PERMISSION_DENIED}
    return Scene(partner, patients, consented, len(listed))


async def _report(database_dsn: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    code, out, err = await harness.audit_cli(
        database_dsn, tmp_path / "data", "breach-report", *args, APPTGATE_DATA_KEY=harness.data_key_text((1, DATA_KEY))
    )
    assert "Traceback" not in err, err
    return code, out, err


def _personal_values(patients: list[Any]) -> list[str]:
    return [v for p in patients for v in (p.given_name, p.family_name, p.email, p.phone)]


def _text(html: str) -> str:
    return PageText(html).text()


async def test_the_dossier_names_the_scope_and_no_name_email_or_phone_without_the_flag(
    scene: Scene, database_dsn: str, tmp_path: Path
) -> None:
    code, html, err = await _report(
        database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW, "--format", "html"
    )

    assert code == 0, err
    text = _text(html)
    assert PARTNER_NAME in text and "<b>" not in html.split("<body>")[1].split("Agenda")[0]
    assert "&lt;b&gt;&quot;Plus&quot;&lt;/b&gt; &amp; Co" in html  # escaped, never markup
    assert scene.partner.partner_id in text and scene.partner.key_id in text
    assert "2000-01-01T00:00:00Z" in text and "2100-01-01T00:00:00Z" in text
    assert re.search(r"INTACT: the whole ledger, records 1 to \d+", text)
    for patient in scene.patients:
        assert patient.patient_id in text
    assert "Cardiology" in text and "Psychiatry" in text
    assert "<svg" in html and "<script" not in html and "src=" not in html and "href=" not in html
    assert "Content-Security-Policy" in html
    assert "Français" in text and "English" in text and "{{given_name}}" in text
    assert "[To be completed by the DPO:" in text
    for value in _personal_values(scene.patients):
        assert value not in html, "a contact value in a dossier made without --include-contact"
    assert "Bystander" not in html


async def test_the_dpo_contact_comes_from_the_setting(scene: Scene, database_dsn: str, tmp_path: Path) -> None:
    code, html, err = await harness.audit_cli(
        database_dsn, tmp_path / "data", "breach-report", "--partner", scene.partner.partner_id, *WINDOW,
        "--format", "html", APPTGATE_DPO_CONTACT="Claire Dupont <dpo@clinic.example>, +33 1 00 00 00 00",
    )  # fmt: skip

    assert code == 0, err
    assert "Claire Dupont &lt;dpo@clinic.example&gt;, +33 1 00 00 00 00" in html
    assert "APPTGATE_DPO_CONTACT is not set" not in html


async def test_the_json_is_the_rpc_response_with_its_field_names(
    scene: Scene, world: World, database_dsn: str, tmp_path: Path
) -> None:
    code, out, err = await _report(database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW)
    rpc = await world.audit.BreachReport(
        harness.audit_pb.BreachReportRequest(
            partner_id=scene.partner.partner_id,
            start_time=harness.ts(datetime(2000, 1, 1, tzinfo=UTC)),
            end_time=harness.ts(datetime(2100, 1, 1, tzinfo=UTC)),
        ),
        metadata=world.internal_metadata,
    )

    assert code == 0, err
    cli = json.loads(out)
    served = json_format.MessageToDict(rpc, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    assert cli["verification"]["state"] == "LEDGER_VERIFICATION_STATE_INTACT"
    assert served["verification"]["state"] == "LEDGER_VERIFICATION_STATE_NOT_CHECKED"
    for same in ("patients", "totals", "partner", "key_ids", "start_time", "end_time", "activity"):
        assert cli[same] == served[same], same
    assert cli["key_ids"] == [scene.partner.key_id]
    assert cli["totals"]["patients"] == "4" and cli["totals"]["appointments"] == str(scene.appointments)
    fields = {f["field"]: f["patients"] for f in cli["totals"]["fields"]}
    assert fields == {
        "CONTACT_FIELD_NAME": "1", "CONTACT_FIELD_SEX": "0", "CONTACT_FIELD_PHONE": "1", "CONTACT_FIELD_EMAIL": "1",
    }  # fmt: skip
    views = {v["view"]: v for v in cli["totals"]["views"]}
    assert views["DISCLOSURE_VIEW_BASIC"]["patients"] == "4"
    assert views["DISCLOSURE_VIEW_CONTACT"]["patients"] == "2"
    assert {s["specialty"] for s in cli["totals"]["specialties"]} == {"Cardiology", "Psychiatry"}
    assert all(
        t.endswith("Z") for p in cli["patients"] for t in (p["first_disclosure_time"], p["last_disclosure_time"])
    )
    assert all("contact" not in p for p in cli["patients"])
    assert sum(int(a["disclosures"]) for a in cli["activity"]) == int(cli["totals"]["disclosures"])


async def test_the_csv_has_a_row_per_patient_under_the_field_names(
    scene: Scene, database_dsn: str, tmp_path: Path
) -> None:
    code, out, err = await _report(
        database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW, "--format", "csv"
    )

    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["patient_id"] for r in rows} == {p.patient_id for p in scene.patients}
    first = next(r for r in rows if r["patient_id"] == scene.patients[0].patient_id)
    assert first["contact_fields"] == "CONTACT_FIELD_NAME; CONTACT_FIELD_EMAIL"
    assert first["views"] == "DISCLOSURE_VIEW_BASIC; DISCLOSURE_VIEW_CONTACT"
    assert first["appointments.practitioner_specialty"] == "Cardiology"
    assert first["first_disclosure_time"].endswith("Z")


async def test_include_contact_adds_names_and_emails_and_records_that_use_in_the_ledger(
    scene: Scene, world: World, database_dsn: str, tmp_path: Path
) -> None:
    before = await world.audit.BreachReport(
        harness.audit_pb.BreachReportRequest(
            partner_id=scene.partner.partner_id,
            start_time=harness.ts(MONDAY - timedelta(days=36500)),
            end_time=harness.ts(MONDAY + timedelta(days=36500)),
        ),
        metadata=world.internal_metadata,
    )

    code, html, err = await _report(
        database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW, "--format", "html",
        "--include-contact",
    )  # fmt: skip

    assert code == 0, err
    for patient in scene.patients:
        assert patient.family_name in html and patient.email in html
        assert patient.phone not in html  # the letters need names and emails, never the phone
    records = [
        r
        for r in await world.disclosures(partner_id=scene.partner.partner_id)
        if r.outcome == audit_pb2.DISCLOSURE_OUTCOME_INTERNAL_USE
    ]  # one message per patient of the record
    [record_id] = {r.disclosure_id for r in records}
    assert sorted(r.patient_id for r in records) == sorted(p.patient_id for p in scene.patients)
    for internal in records:
        assert internal.key_id == "" and internal.rpc == INTERNAL_USE_RPC and internal.appointment_id == ""
        assert list(internal.contact_fields) == [CONTACT_FIELD_NAME, CONTACT_FIELD_EMAIL]
        assert internal.view == audit_pb2.DISCLOSURE_VIEW_CONTACT and internal.consent_id == ""
    assert f"ledger record {record_id}" in err and f"(record {record_id})" in html

    # The partner's numbers do not count the platform's own use.
    after = await world.audit.BreachReport(
        harness.audit_pb.BreachReportRequest(
            partner_id=scene.partner.partner_id,
            start_time=harness.ts(MONDAY - timedelta(days=36500)),
            end_time=harness.ts(MONDAY + timedelta(days=36500)),
        ),
        metadata=world.internal_metadata,
    )
    assert after.patients == before.patients and after.totals == before.totals
    assert after.activity == before.activity

    # The patient's own history tells of it; the ledger still verifies with the record in it.
    history = await world.audit.ListPatientDisclosures(
        harness.audit_pb.ListPatientDisclosuresRequest(patient_id=scene.patients[2].patient_id),
        metadata=world.internal_metadata,
    )
    assert [e.outcome for e in history.disclosures].count(audit_pb2.DISCLOSURE_OUTCOME_INTERNAL_USE) == 1
    code, out, err = await harness.audit_cli(database_dsn, tmp_path / "data", "verify")
    assert code == 0 and "the ledger is intact" in out, err


async def test_letters_need_include_contact_and_give_a_row_per_patient(
    scene: Scene, world: World, database_dsn: str, tmp_path: Path
) -> None:
    refused = await _report(
        database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW, "--format", "csv", "--letters"
    )
    nothing_read = not any(
        r.outcome == audit_pb2.DISCLOSURE_OUTCOME_INTERNAL_USE
        for r in await world.disclosures(partner_id=scene.partner.partner_id)
    )

    code, out, err = await _report(
        database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW, "--format", "csv", "--letters",
        "--include-contact", "--timezone", "Europe/Paris",
    )  # fmt: skip

    assert refused[0] == 2 and refused[1] == ""
    assert refused[2].strip().splitlines() == [
        "apptgate: --letters needs --format csv and --include-contact: the letters' rows hold the patients' names "
        "and emails, which are read only with --include-contact (and recorded in the ledger)"
    ]
    assert nothing_read
    assert code == 0, err
    rows = {r["patient_id"]: r for r in csv.DictReader(io.StringIO(out))}
    assert set(rows) == {p.patient_id for p in scene.patients}
    for patient in scene.patients:
        row = rows[patient.patient_id]
        assert (row["contact.given_name"], row["contact.family_name"], row["contact.email"]) == (
            patient.given_name,
            patient.family_name,
            patient.email,
        )
        assert row["partner.display_name"] == PARTNER_NAME
        assert "Cardiology" in row["disclosed_fr"] and "Cardiology" in row["disclosed_en"]
        assert patient.phone not in out
    first = rows[scene.patients[0].patient_id]
    assert first["disclosed_fr"].endswith("votre nom et votre adresse e-mail")
    assert "à 1\u00a0h\u00a000" in first["disclosed_fr"]  # MONDAY 00:00 UTC is 01:00 in Paris


async def test_the_rpc_answers_not_found_for_an_unknown_partner_or_another_partners_key(
    scene: Scene, world: World
) -> None:
    other = await world.partner("Other Soft")

    async def refused(**fields: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.audit.BreachReport(
                harness.audit_pb.BreachReportRequest(
                    start_time=harness.ts(MONDAY - timedelta(days=1)), end_time=harness.ts(MONDAY), **fields
                ),
                metadata=world.internal_metadata,
            )
        return caught.value

    unknown = await refused(partner_id="00000000-0000-4000-8000-000000000000")
    foreign = await refused(partner_id=scene.partner.partner_id, key_id=other.key_id)
    missing = await refused(partner_id=scene.partner.partner_id, key_id="pk_aaaaaaaaaaaaaaaa")

    assert unknown.code() == foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.details() == missing.details()  # another partner's key answers as one that does not exist


async def test_the_pdf_is_the_dossier_laid_out_and_reads_back(scene: Scene, database_dsn: str, tmp_path: Path) -> None:
    pdf_pages.require_poppler()
    output = tmp_path / "dossier.pdf"

    code, out, err = await _report(
        database_dsn, tmp_path, "--partner", scene.partner.partner_id, *WINDOW, "--format", "pdf", "--output",
        str(output),
    )  # fmt: skip

    assert code == 0 and out == "", err
    assert output.read_bytes().startswith(b"%PDF-") and output.stat().st_mode & 0o777 == 0o600
    flat = pdf_pages.text(output)
    assert "Breach dossier" in flat and "Agenda" in flat
    assert "Patients affected" in flat and "INTACT" in flat
    assert scene.partner.key_id in flat
    assert "Appointments disclosed per hour (UTC)" in flat  # the chart's caption, drawn as SVG
    assert "Notification to the supervisory authority" in flat and "Objet" in flat
    for value in _personal_values(scene.patients):
        assert value not in flat
    assert pdf_pages.page_variance(output) > 100, "the first page is blank"


async def test_the_ledger_takes_an_internal_use_only_without_key_or_consent_and_never_a_partner_call_without_key(
    scene: Scene, database_dsn: str
) -> None:
    conn = await asyncpg.connect(database_dsn)
    patient = scene.patients[0].patient_id
    insert = (
        "INSERT INTO disclosures (partner_id, key_id, view, contact_fields, consent_id, rpc, outcome, requested_ids, "
        "appointment_ids, patient_ids) VALUES ($1, $2, 2, $3::smallint[], $4, $5, $6, ARRAY[$7::text], "
        "ARRAY[NULL::uuid], ARRAY[$7::uuid])"
    )
    partner = uuid.UUID(scene.partner.partner_id)
    try:
        for key_id, fields, consent, outcome in [
            (scene.partner.key_id, [1, 4], None, 5),  # an internal use names no key
            ("", [1, 4], uuid.uuid4(), 5),  # nor a consent
            ("", [], None, 5),  # and reads at least one field
            ("", [1, 4], uuid.uuid4(), 1),  # a partner disclosure always has its key
        ]:
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(insert, partner, key_id, fields, consent, INTERNAL_USE_RPC, outcome, patient)
        await conn.execute(insert, partner, "", [1, 4], None, INTERNAL_USE_RPC, 5, patient)
    finally:
        await conn.close()
