"""A patient's history rendered: the page a patient reads, and the JSON and CSV staff work with. No I/O."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from page_text import UUID_PATTERN, PageText, words

from service import models
from service.disclosure import patient_history, patient_history_page
from service.disclosure.patient_history import History

T0 = datetime(2030, 3, 4, 8, 0, tzinfo=UTC)
PATIENT = uuid.UUID("00000000-0000-4000-8000-00000000aaaa")
AGENDA = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
CABINET = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
VISIT = uuid.UUID("00000000-0000-4000-8000-0000000000c3")
CHECKUP = uuid.UUID("00000000-0000-4000-8000-0000000000d4")
HOSTILE_NAME = 'Cabinet <script>alert("x")</script><img src=x onerror=alert(1)> & "Fils" \u202eevil'
HOSTILE_PURPOSE = 'rappels "><iframe src="https://evil.example/"></iframe> &amp; <b>gras</b>'
#: Elements the page is made of; anything else would come from text that was not escaped.
PAGE_ELEMENTS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "span", "dl", "dt", "dd", "code",
    "div", "p", "main", "section", "ul", "li", "br", "bdi", "footer", "table", "tr", "th", "td",
}  # fmt: skip
JARGON = re.compile(
    r"\b(views?|outcomes?|disclos\w*|denied|denial|basic|ledger|pseudonym\w*|consent_\w+|not_found|requested)\b", re.I
)


def partner_headings(read: PageText) -> list[str]:
    """The partners' headings, in order (the other second-level headings are the page's own)."""
    return [h for h in read.headings["h2"] if h not in {"En bref", "In short", "À savoir", "Good to know"}]


def entry(
    partner: uuid.UUID = AGENDA,
    name: str = "Agenda Plus",
    *,
    appointment: uuid.UUID | None = VISIT,
    view: models.View = models.View.BASIC,
    fields: tuple[int, ...] = (),
    outcome: models.Outcome = models.Outcome.DISCLOSED,
    reason: str = "",
    purpose: str = "",
    count: int = 1,
    hours: float = 0,
    practitioner: str = "Dr Aline Martin",
    specialty: str = "Cardiologie",
) -> models.PatientDisclosure:
    last = T0 + timedelta(hours=hours)
    return models.PatientDisclosure(
        partner,
        name,
        appointment,
        None if appointment is None else T0 + timedelta(days=2, hours=2),
        practitioner if appointment else "",
        specialty if appointment else "",
        view,
        fields,
        outcome,
        reason,
        uuid.uuid4() if purpose else None,
        purpose,
        last - timedelta(hours=3) if count > 1 else last,
        last,
        count,
        f"{partner}|{appointment}|{view}|{outcome}|{hours}",
    )


def history(*entries: models.PatientDisclosure, start: datetime | None = None) -> History:
    newest_first = tuple(sorted(entries, key=lambda e: e.last_time, reverse=True))
    return History(PATIENT, start, None, T0 + timedelta(days=1), newest_first)


def page(*entries: models.PatientDisclosure, zone: ZoneInfo | None = None) -> PageText:
    return PageText(patient_history_page.render(history(*entries), zone or UTC))


FOUR = (
    entry(hours=1),
    entry(CABINET, "Cabinet Dupont", hours=2),
    entry(view=models.View.CONTACT, fields=(4,), purpose="Rappels par e-mail", hours=3),
    entry(
        CABINET, "Cabinet Dupont", view=models.View.CONTACT, outcome=models.Outcome.DENIED, reason="CONSENT_REQUIRED",
        hours=4,
    ),
)  # fmt: skip


class TestPage:
    def test_hostile_partner_names_purposes_and_practitioners_are_text_not_markup(self) -> None:
        hostile = entry(
            CABINET, HOSTILE_NAME, view=models.View.CONTACT, fields=(4,), purpose=HOSTILE_PURPOSE,
            practitioner="<i>Dr</i> Who", specialty="</h3><script>x()</script>",
        )  # fmt: skip
        markup = patient_history_page.render(history(hostile), UTC)
        read = PageText(markup)

        assert set(read.tags) <= PAGE_ELEMENTS
        assert not [(tag, name) for tag, name, _ in read.attributes if name.startswith("on") or name in ("src", "href")]
        for text in (HOSTILE_NAME, HOSTILE_PURPOSE, "<i>Dr</i> Who", "</h3><script>x()</script>"):
            assert words(text) in read.text()
        assert partner_headings(read) == [words(HOSTILE_NAME)]
        # Isolated, so that an override character in a name cannot reorder the sentence around it.
        assert (
            "<bdi>"
            + HOSTILE_NAME.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            + "</bdi>"
            in markup
        )

    def test_the_page_may_load_nothing_and_run_nothing_but_its_own_style(self) -> None:
        markup = patient_history_page.render(history(*FOUR), UTC)

        [style] = re.findall(r"<style>(.*?)</style>", markup, re.S)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        [policy] = [
            v
            for tag, name, v in PageText(markup).attributes
            if tag == "meta" and name == "content" and v and "src" in v
        ]
        assert policy.startswith("default-src 'none'; ")
        assert f"style-src 'sha256-{digest}'" in policy
        assert "<script" not in markup and "http" not in markup.replace("http-equiv", "")

    def test_every_block_is_in_french_and_in_english(self) -> None:
        read = page(*FOUR)

        assert "Qui a consulté vos données de rendez-vous" in read.text("fr")
        assert "Who has seen your appointment data" in read.text("en")
        assert "A vu les horaires de votre rendez-vous" in read.text("fr")
        assert "Saw your appointment times" in read.text("en")
        # The same number of sentences in each language: every access is told twice.
        assert read.text("fr").count("Le 4 mars 2030") == read.text("en").count("On 4 March 2030") == 4
        assert "Saw" not in read.text("fr") and "A vu" not in read.text("en")

    def test_entries_are_grouped_by_partner_then_appointment_most_recent_first(self) -> None:
        read = page(
            entry(hours=1),
            entry(CABINET, "Cabinet Dupont", hours=2),
            entry(appointment=CHECKUP, hours=5),
            entry(view=models.View.CONTACT, fields=(4,), purpose="Rappels", hours=3),
        )

        assert partner_headings(read) == ["Agenda Plus", "Cabinet Dupont"]
        text = read.text()
        agenda, cabinet = text.index("Agenda Plus"), text.index("Cabinet Dupont")
        # Agenda Plus's two appointments under its heading, each once, before the other partner's.
        assert text.count("Appointment on Wednesday 6 March 2030 at 10:00", agenda, cabinet) == 2
        # Its most recently accessed appointment first (seen), then the other: the email, then the times seen.
        told = re.findall(r"Saw your appointment times|Received your email address", text[agenda:cabinet])
        assert told == ["Saw your appointment times", "Received your email address", "Saw your appointment times"]
        assert len(read.headings["h3"]) == 3

    def test_what_was_seen_refused_asked_and_granted_is_told_plainly(self) -> None:
        read = page(
            *FOUR,
            entry(view=models.View.CONTACT, fields=(3, 4), outcome=models.Outcome.REQUESTED, hours=5),
            entry(
                view=models.View.CONTACT, fields=(4,), outcome=models.Outcome.CONSENT_GRANTED, purpose="Rappels",
                hours=6,
            ),
            entry(
                view=models.View.CONTACT, fields=(1,), outcome=models.Outcome.DENIED, reason="CONSENT_REVOKED",
                hours=7,
            ),
        )  # fmt: skip
        fr, en = read.text("fr"), read.text("en")

        assert "Tried to read your contact details without your consent; refused, nothing was sent." in en
        assert "A tenté de lire vos coordonnées sans votre consentement ; refusé, rien n’a été transmis." in fr
        assert "Received your email address, with your consent." in en
        assert "A reçu votre adresse e-mail, avec votre consentement." in fr
        assert "Purpose of your consent: “Rappels par e-mail”." in en
        assert "Motif de votre consentement : « Rappels par e-mail »." in fr
        assert "Asked for your consent to receive your phone number and your email address." in en
        assert "A demandé votre consentement pour recevoir votre numéro de téléphone et votre adresse e-mail." in fr
        assert "At its request, you gave it your consent to receive your email address." in en
        assert "Tried to read your name with a consent you had withdrawn; refused, nothing was sent." in en

    def test_counts_and_first_and_last_times_are_given(self) -> None:
        read = page(entry(count=12, hours=5))

        assert "12 times, from 4 March 2030 at 10:00 to 4 March 2030 at 13:00." in read.text("en")
        assert "12 fois, du 4 mars 2030 à 10 h 00 au 4 mars 2030 à 13 h 00." in read.text("fr")

    def test_times_are_shown_in_the_zone_asked_for(self) -> None:
        read = page(entry(hours=1), zone=ZoneInfo("Europe/Paris"))

        assert "On 4 March 2030 at 10:00." in read.text("en")  # 09:00 UTC, UTC+1 in March
        assert "Appointment on Wednesday 6 March 2030 at 11:00" in read.text("en")
        assert "Europe/Paris" in read.text()

    def test_the_header_gives_the_patient_reference_period_and_date_generated(self) -> None:
        read = PageText(patient_history_page.render(history(*FOUR, start=T0 - timedelta(days=30)), UTC))

        assert f"Référence patient · Patient reference {PATIENT}" in read.text()
        assert "du 2 février 2030 à 8 h 00 au 5 mars 2030 à 8 h 00" in read.text("fr")
        assert "from 2 February 2030 at 08:00 to 5 March 2030 at 08:00" in read.text("en")
        assert "Generated on" in read.text() and "5 March 2030 at 08:00" in read.text("en")

    def test_no_internal_notion_and_no_id_but_the_patients_outside_the_references(self) -> None:
        read = page(*FOUR, entry(view=models.View.CONTACT, fields=(4,), outcome=models.Outcome.REQUESTED, hours=9))

        body = read.text(refs=False)
        assert not JARGON.findall(body)
        assert set(UUID_PATTERN.findall(body)) == {str(PATIENT)}
        footer = {m for m in UUID_PATTERN.findall(read.text()) if m not in body}
        assert footer == {str(AGENDA), str(CABINET), str(VISIT)}

    def test_an_empty_history_says_nobody_accessed_anything(self) -> None:
        read = page()

        assert "No partner application accessed your data, or tried to, during this period." in read.text("en")
        assert "Aucun logiciel partenaire n’a consulté vos données" in read.text("fr")
        assert read.headings["h3"] == []

    def test_an_appointment_gone_is_named_as_such(self) -> None:
        read = page(entry(appointment=None))

        assert "An appointment that no longer exists" in read.text("en")


class TestFormats:
    def test_json_has_the_patient_window_entries_and_totals(self) -> None:
        document = json.loads(json.dumps(patient_history.json_document(history(*FOUR, start=T0))))

        assert document["patient_id"] == str(PATIENT)
        assert document["window"] == {"start_time": T0.isoformat(), "end_time": None}
        assert document["generate_time"] == (T0 + timedelta(days=1)).isoformat()
        refused, contact, *_ = document["entries"]
        assert refused["partner"] == {"partner_id": str(CABINET), "display_name": "Cabinet Dupont"}
        assert (refused["view"], refused["outcome"], refused["denial_reason"]) == (
            "contact",
            "denied",
            "CONSENT_REQUIRED",
        )
        assert (contact["fields"], contact["purpose"], contact["count"]) == (["email"], "Rappels par e-mail", 1)
        assert contact["appointment"] == {
            "appointment_id": str(VISIT),
            "start_time": (T0 + timedelta(days=2, hours=2)).isoformat(),
            "practitioner_display_name": "Dr Aline Martin",
            "practitioner_specialty": "Cardiologie",
        }
        assert document["totals"] == {
            "entries": 4,
            "partners": 2,
            "appointments": 1,
            "responses": {"disclosed": 3, "denied": 1, "requested": 0, "consent_granted": 0, "internal_use": 0},
        }

    def test_totals_sum_the_counts_of_the_entries(self) -> None:
        sums = patient_history.totals([entry(count=7), entry(CABINET, count=5, appointment=CHECKUP)])

        assert (sums.entries, sums.partners, sums.appointments) == (2, 2, 2)
        assert sums.responses[models.Outcome.DISCLOSED] == 12

    @pytest.mark.parametrize("name", ['=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "\tx"])
    def test_csv_has_a_header_and_a_row_per_entry_with_no_formula_a_spreadsheet_would_run(self, name: str) -> None:
        rows = [patient_history.CSV_HEADER] + [
            patient_history.csv_row(e) for e in (*FOUR, entry(name=name, purpose=name))
        ]
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)

        header, *read = list(csv.reader(io.StringIO(buffer.getvalue())))
        assert header == patient_history.CSV_HEADER and len(read) == 5
        last = dict(zip(header, read[-1], strict=True))
        assert last["partner_display_name"] == last["purpose"] == "'" + name
        contact = dict(zip(header, read[2], strict=True))
        assert (contact["fields"], contact["outcome"], contact["view"]) == ("email", "disclosed", "contact")
