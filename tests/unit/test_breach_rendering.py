"""The breach dossier's pure parts: the page, its chart, the letters, the message and CSV, the PDF engine's fence."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from html import escape
from pathlib import Path
from zoneinfo import ZoneInfo

import pdf_pages
import pytest
from appointments.internal.v1 import audit_pb2
from page_text import PageText

from service import models
from service.disclosure import breach, breach_chart, breach_dossier, breach_letters, pdf

T0 = datetime(2030, 3, 4, 9, tzinfo=UTC)
HOSTILE_PARTNER = 'Agenda <script>alert("x")</script> & <img src=x onerror=alert(1)>'
HOSTILE_SPECIALTY = '=HYPERLINK("http://evil.example")</td><img src=y>'
KEY = "pk_abcdefghijklmnop"
CONTACT = models.NoticeContact("Leakcheckgiven0001", "LEAKCHECK-Family-0001", "leakcheck.0001@example.invalid")


def _report(*, contact: bool = False, hours: int = 3, verification: breach.Verification | None = None) -> breach.Report:
    partner = models.Partner(uuid.UUID(int=7), HOSTILE_PARTNER, T0)
    patients = []
    for n in range(3):
        patient_id = uuid.UUID(int=100 + n)
        appointments = (
            models.AppointmentSummary(uuid.UUID(int=200 + n), patient_id, T0 + timedelta(days=n), uuid.UUID(int=9),
                                      'Dr "Quote" Martin', HOSTILE_SPECIALTY if n == 0 else "Cardiology"),
        )  # fmt: skip
        affected = models.AffectedPatient(
            patient_id,
            (appointments[0].id,),
            (1, 4) if n == 0 else (),
            T0,
            T0 + timedelta(hours=n),
            0,
            (models.View.BASIC, models.View.CONTACT) if n == 0 else (models.View.BASIC,),
        )
        patients.append(breach.ReportedPatient(affected, appointments, CONTACT if contact and n == 0 else None))
    activity = tuple(breach.Activity(T0 + timedelta(hours=h), models.View.BASIC, 3) for h in range(hours))
    return breach.Report(
        partner=partner,
        key_id=KEY,
        key_ids=(KEY,),
        start_time=T0 - timedelta(days=1),
        end_time=T0 + timedelta(days=1),
        generate_time=T0 + timedelta(days=2),
        patients=tuple(patients),
        activity=(*activity, breach.Activity(T0, models.View.CONTACT, 1)),
        views=breach.view_totals({models.View.BASIC: (3, 3, 3 * hours), models.View.CONTACT: (1, 1, 1)}),
        verification=verification or breach.Verification(breach.VerificationState.INTACT, T0, 40, 40, 2, 1, 12, 0),
        revoked_keys=((KEY, T0 + timedelta(days=1, hours=2)),),
    )


def _long_report(patients: int) -> breach.Report:
    """A report of ``patients`` patients with one to three appointments each, ids 00000000-…-000000002710 on."""
    listed = []
    for n in range(patients):
        patient_id = uuid.UUID(int=10_000 + n)
        appointments = tuple(
            models.AppointmentSummary(uuid.UUID(int=20_000 + 3 * n + k), patient_id, T0 + timedelta(hours=k),
                                      uuid.UUID(int=9), 'Dr "Quote" Martin', "Cardiology")
            for k in range(1 + n % 3)
        )  # fmt: skip
        affected = models.AffectedPatient(
            patient_id, tuple(a.id for a in appointments), (), T0, T0 + timedelta(hours=2), 0, (models.View.BASIC,)
        )
        listed.append(breach.ReportedPatient(affected, appointments))
    return replace(_report(), patients=tuple(listed))


class TestPage:
    def test_third_party_text_is_escaped_and_never_markup(self) -> None:
        html = breach_dossier.render(_report(), dpo_contact="<b>DPO</b> dpo@example.invalid")
        page = PageText(html)

        assert HOSTILE_PARTNER in page.text() and HOSTILE_SPECIALTY in page.text()
        assert "<b>DPO</b> dpo@example.invalid" in page.text()
        assert not {"script", "img", "b", "iframe", "link"} & set(page.tags)
        assert all(name not in ("src", "href", "onerror") for _, name, _ in page.attributes)

    def test_the_patients_list_isolates_third_party_text_that_cannot_end_its_isolate(self) -> None:
        report = _report()
        first = report.patients[0]
        hostile = replace(first.appointments[0], practitioner_display_name="Dr \u2069\u202eLeakcheck\nMartin")
        report = replace(report, patients=(replace(first, appointments=(hostile,)), *report.patients[1:]))

        html = breach_dossier.render(report)
        listed = html[html.index("<h2>Affected patients") :]

        assert "\u2068Dr \u202eLeakcheck Martin\u2069 · \u2068" + escape(HOSTILE_SPECIALTY) + "\u2069" in listed
        assert listed.count("\u2068") == listed.count("\u2069") == 2 * 3  # a name and a specialty per appointment
        assert "<img" not in listed and "<bdi>" not in listed

    def test_the_page_allows_its_own_style_and_nothing_else(self) -> None:
        html = breach_dossier.render(_report())
        [css] = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()

        assert escape(f"default-src 'none'; style-src 'sha256-{digest}'") in html
        assert "url(" not in html and "@import" not in html and "style=" not in html

    def test_without_the_flag_no_name_or_email_column_or_value(self) -> None:
        without = breach_dossier.render(_report())
        with_contact = breach_dossier.render(_report(contact=True), record_id=42)

        for value in (CONTACT.given_name, CONTACT.family_name, CONTACT.email):
            assert value not in without and value in with_contact
        assert "contact.email" not in without and "contact.email" in with_contact
        assert "contains no name, email address or phone number" in without
        assert "recorded in the ledger (record 42)" in with_contact

    def test_the_header_states_the_scope_and_the_verification(self) -> None:
        text = PageText(breach_dossier.render(_report())).text()

        assert "00000000-0000-0000-0000-000000000007" in text and KEY in text
        assert "from 2030-03-03T09:00:00Z to 2030-03-05T09:00:00Z (end excluded)" in text
        assert "INTACT: the whole ledger, records 1 to 40" in text
        assert f"The key {KEY} was revoked at 2030-03-05T11:00:00Z." in text

    def test_a_broken_ledger_is_said_with_every_problem(self) -> None:
        broken = breach.Verification(
            breach.VerificationState.NOT_INTACT, T0, 40, 40, problems=("record 3 was altered", "record 9 is missing")
        )
        text = PageText(breach_dossier.render(_report(verification=broken))).text()
        unchecked = PageText(breach_dossier.render(_report(verification=breach.Verification()))).text()

        assert "NOT INTACT (2 problems)" in text and "record 3 was altered" in text and "record 9 is missing" in text
        assert "not verified with this report" in unchecked

    def test_the_summary_counts_patients_fields_views_and_specialties(self) -> None:
        html = breach_dossier.render(_report())

        assert '<span class="field">totals.patients</span></dt><dd>3</dd>' in html
        assert '<tr><td>name</td><td class="n">1</td></tr>' in html
        assert '<tr><td>phone</td><td class="n">0</td></tr>' in html
        assert re.search(
            r'<tr><td>Cardiology</td><td class="n">2</td><td class="n">2</td></tr>',
            html.replace("<bdi>", "").replace("</bdi>", ""),
        )


class TestChart:
    def test_one_bar_per_hour_stacked_by_view_with_a_text_alternative(self) -> None:
        svg = breach_chart.render(_report(hours=5).activity)

        assert svg.startswith("<svg") and "<script" not in svg and "href" not in svg
        assert svg.count("<rect") == 5 + 1 + 2  # five basic bars, one contact bar, two legend keys
        assert "Appointments disclosed per hour (UTC)" in svg
        assert 'aria-label="Appointments disclosed per hour (UTC) from 2030-03-04 09:00 to 2030-03-04 13:00' in svg

    def test_a_long_incident_is_drawn_per_day_then_per_week(self) -> None:
        days = [breach.Activity(T0 + timedelta(hours=h), models.View.BASIC, 1) for h in range(0, 24 * 20, 6)]
        weeks = [breach.Activity(T0 + timedelta(days=d), models.View.BASIC, 1) for d in range(0, 400, 3)]

        by_day = breach_chart.bucket(days)
        by_week = breach_chart.bucket(weeks)

        assert by_day is not None and by_day.unit == "day" and sum(b[models.View.BASIC] for b in by_day.bars) == 80
        assert by_week is not None and by_week.unit == "week" and by_week.start.weekday() == 0
        assert len(by_week.bars) <= breach_chart.MAX_BARS
        assert "per day (UTC)" in breach_chart.render(days)

    def test_no_activity_draws_nothing(self) -> None:
        assert breach_chart.render(()) == '<p class="empty">No appointment was disclosed in the window.</p>'


class TestLetters:
    def test_the_templates_have_merge_fields_in_both_languages(self) -> None:
        said = breach_letters.templates(_report(), None, UTC)

        for merged in ("{{given_name}}", "{{family_name}}"):
            assert merged in said.fr and merged in said.en
        assert "{{disclosed_fr}}" in said.fr and "{{disclosed_en}}" in said.en
        assert "APPTGATE_DPO_CONTACT n’est pas défini" in said.fr and "APPTGATE_DPO_CONTACT is not set" in said.en
        assert f"la clé d’accès {KEY} a été révoquée" in said.fr and "<script>" not in said.fr + said.en

    def test_the_dpo_contact_is_filled_in_escaped(self) -> None:
        said = breach_letters.templates(_report(), "Claire <claire@example.invalid>", UTC)

        assert "Claire &lt;claire@example.invalid&gt;" in said.fr and "APPTGATE_DPO_CONTACT" not in said.en

    def test_a_letter_row_needs_the_contact_and_says_what_was_disclosed(self) -> None:
        report = _report(contact=True)
        message = breach.response_message(report)
        with_contact = next(p for p in message.patients if p.HasField("contact"))
        without = next(p for p in message.patients if not p.HasField("contact"))

        cells = breach_letters.letter_row(report, with_contact, ZoneInfo("Europe/Paris"))
        row = dict(zip(breach_letters.LETTER_HEADER, cells, strict=True))
        with pytest.raises(ValueError, match="--include-contact"):
            breach_letters.letter_row(report, without, UTC)

        assert row["contact.family_name"] == CONTACT.family_name and row["contact.email"] == CONTACT.email
        assert row["partner.display_name"] == HOSTILE_PARTNER
        assert row["disclosed_fr"].startswith("les informations de votre rendez-vous")
        assert "le 4 mars 2030 à 10\u00a0h\u00a000" in row["disclosed_fr"]  # 09:00 UTC in Paris
        assert row["disclosed_fr"].endswith("votre nom et votre adresse e-mail")
        assert row["disclosed_en"].endswith("your name and your email address")
        assert row["appointments.practitioner_specialty"].startswith("'=")  # inert in a spreadsheet

    def test_a_patient_reached_only_by_a_request_is_told_so(self) -> None:
        message = audit_pb2.AffectedPatient(patient_id=str(uuid.UUID(int=1)), consent_requests=1)

        said = breach_letters.disclosed_said(message, UTC)

        assert "none of your data was sent" in said.en and "aucune de vos données" in said.fr


class TestMessage:
    def test_json_has_the_proto_names_enum_names_zero_counts_and_utc_times(self) -> None:
        text = breach.json_text(breach.response_message(_report()))

        assert '"patient_id"' in text and '"first_disclosure_time": "2030-03-04T09:00:00Z"' in text
        assert '"CONTACT_FIELD_NAME"' in text and '"DISCLOSURE_VIEW_BASIC"' in text
        assert '"consent_request_patients": "0"' in text and '"state": "LEDGER_VERIFICATION_STATE_INTACT"' in text
        assert "+00:00" not in text and '"contact"' not in text

    def test_the_totals_add_up(self) -> None:
        report = _report(hours=4)
        totals = breach.response_message(report).totals

        assert (totals.patients, totals.appointments, totals.contact_patients) == (3, 3, 1)
        assert totals.disclosures == 3 * 4 + 1 == sum(a.disclosures for a in report.activity)
        assert [(s.specialty, s.patients) for s in totals.specialties] == [(HOSTILE_SPECIALTY, 1), ("Cardiology", 2)]
        assert totals.first_disclosure_time.ToJsonString() == "2030-03-04T09:00:00Z"

    def test_csv_rows_are_named_after_the_fields_and_inert_in_a_spreadsheet(self) -> None:
        message = breach.response_message(_report())

        rows = [dict(zip(breach.CSV_HEADER, breach.csv_row(p), strict=True)) for p in message.patients]

        assert rows[0]["contact_fields"] == "CONTACT_FIELD_NAME; CONTACT_FIELD_EMAIL"
        assert rows[0]["views"] == "DISCLOSURE_VIEW_BASIC; DISCLOSURE_VIEW_CONTACT"
        assert rows[0]["appointments.practitioner_specialty"] == "'" + HOSTILE_SPECIALTY
        assert rows[1]["appointments.start_time"] == "2030-03-05T09:00:00Z"


class TestPdf:
    def test_the_dossier_renders_to_pdf(self) -> None:
        assert pdf.render(breach_dossier.render(_report())).startswith(b"%PDF-")

    def test_a_long_list_of_patients_is_whole_and_on_landscape_pages(self, tmp_path: Path) -> None:
        pdf_pages.require_poppler()
        report = _long_report(3 * breach_dossier.TABLE_ROWS - 40)  # three tables, each over several pages
        output = tmp_path / "dossier.pdf"

        output.write_bytes(pdf.render(breach_dossier.render(report)))

        flat = pdf_pages.text(output)
        assert all(str(p.affected.patient_id) in flat for p in report.patients)
        assert flat.count('Dr "Quote" Martin · Cardiology') == sum(len(p.appointments) for p in report.patients)
        landscape = [width > height for width, height in pdf_pages.page_sizes(output)]
        first = landscape.index(True)
        assert not any(landscape[:first]) and all(landscape[first:]) and len(landscape) - first > 3

    def test_a_page_asking_for_an_external_resource_is_refused_not_fetched(self) -> None:
        page = breach_dossier.render(replace(_report(), patients=()))
        hostile = page.replace("</main>", '<img src="http://127.0.0.1:9/leak.png"></main>')

        with pytest.raises(pdf.PdfError, match="external resource"):
            pdf.render(hostile)
