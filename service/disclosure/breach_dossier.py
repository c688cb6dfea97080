"""The breach dossier: the page a DPO files with the authority and works from to notify patients. Pure: no I/O.

One self-contained HTML document (inline CSS, no script, no external
resource: a Content-Security-Policy forbids any), printable as it is and
rendered to PDF from the same text (:mod:`service.disclosure.pdf`). It holds:

* a header: the partner, the keys concerned, the window, when it was
  generated, and what the ledger's verification found (the whole chain,
  which covers the window: :mod:`service.disclosure.ledger_check`);
* a summary: patients and appointments, patients per contact field, what
  each view showed, the first and last disclosure, the specialties (health
  data: a specialty tells what a patient is treated for);
* the timeline (:mod:`service.disclosure.breach_chart`);
* the GDPR Art. 33(3) (a)–(d) sections, filled in where the ledger says it
  (nature, categories and numbers of people and records, keys revoked) and
  marked where only the DPO knows (circumstances, consequences, measures; the
  DPO's contact from ``APPTGATE_DPO_CONTACT`` when set);
* the notices to patients (Art. 34) in French and English
  (:mod:`service.disclosure.breach_letters`);
* the affected patients: internal id, appointments (time, practitioner,
  specialty), fields, views, first and last time, printed on landscape pages
  in columns of fixed widths. Names and emails appear only when the report
  was read with ``--include-contact`` (which the ledger records); without it
  no name, email or phone is anywhere in the page.

Times are RFC 3339 in UTC, as in the JSON and CSV; each column names the
field of ``BreachReportResponse`` it shows. Partner and practitioner names,
specialties and the DPO's contact are third-party text: escaped and isolated
(``<bdi>``; in the patients' list, whose cells hold text only because every
element is one more box for the PDF engine to lay out, by the characters
``<bdi>`` stands for, FSI … PDI).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo
from html import escape
from uuid import UUID

from service import models
from service.disclosure import breach, breach_chart, breach_letters
from service.timestamps import to_timestamp

_CSS = """
:root { color-scheme: light; }
@page { size: A4; margin: 16mm 13mm 18mm;
  @bottom-right { content: counter(page) " / " counter(pages); font: 8pt sans-serif; color: #555; } }
body { font: 10.5pt/1.45 "DejaVu Sans", system-ui, Arial, sans-serif; color: #1b1b1b; background: #fff;
  max-width: 64rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 .75rem; color: #1d3a66; }
h2 { font-size: 1.2rem; margin: 1.6rem 0 .5rem; color: #1d3a66; border-bottom: 2px solid #1d3a66; }
h3 { font-size: 1rem; margin: 1rem 0 .3rem; }
p { margin: .3rem 0; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0 0 1rem;
  padding: .6rem .9rem; background: #f3f5f8; }
.facts dt { font-weight: bold; }
.facts dd { margin: 0; }
.banner { padding: .5rem .8rem; margin: .6rem 0; border: 2px solid #1d3a66; }
.banner.contact { border-color: #b3261e; background: #fdf0ef; }
.intact { color: #1e6b34; font-weight: bold; }
.broken { color: #b3261e; font-weight: bold; }
.unchecked { color: #8a6300; font-weight: bold; }
table { border-collapse: collapse; margin: .4rem 0 .8rem; }
th, td { text-align: left; vertical-align: top; padding: .15rem .6rem .15rem 0; border-bottom: 1px solid #dde3ea; }
td.n, th.n { text-align: right; }
th code, .field { display: block; font-weight: normal; color: #555; font-size: .8em; }
@page list { size: A4 landscape; }
section.patients { page: list; }
table.patients { width: 100%; font-size: .85em; margin: 0; table-layout: fixed; }
table.patients td, table.patients th { overflow-wrap: anywhere; }
table.patients td { white-space: pre-line; }
table.patients tbody th { font: .92em "DejaVu Sans Mono", ui-monospace, monospace; }
table.patients tr { break-inside: avoid; }
col.id { width: 18%; } col.appointments { width: 38%; } col.fields { width: 8%; } col.views { width: 6%; }
col.time { width: 15%; } .contact col.id { width: 12%; } .contact col.appointments { width: 22%; }
.contact col.time { width: 13%; } .contact col.name { width: 11%; } .contact col.email { width: 15%; }
code { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: .92em; overflow-wrap: anywhere; }
.todo { background: #fff3c4; border: 1px dashed #8a6300; padding: 0 .2rem; }
.merge { background: #e6eefa; font-family: "DejaVu Sans Mono", monospace; font-size: .92em; }
.letter { border: 1px solid #c9d3e0; padding: .4rem .9rem; margin: .5rem 0 1rem; break-inside: avoid; }
.chart { margin: .5rem 0; }
.chart svg { max-width: 100%; height: auto; }
.method { font-size: .85em; color: #444; }
@media print { body { padding: 0; max-width: none; } h2 { break-after: avoid; } table.patients { font-size: .72em; }
  col.id { width: 21%; } col.appointments { width: 40%; } col.time { width: 12.5%; }
  .contact col.appointments { width: 26%; } .contact col.time { width: 12.5%; } .contact col.email { width: 12%; } }
"""

#: The page allows its own style sheet and nothing else: no script, image, font, frame or connection.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
    + "'; base-uri 'none'; form-action 'none'"
)

#: Patients per table of the patients' list.
TABLE_ROWS = 100
#: How each view is described.
VIEW_WORDS = {
    models.View.BASIC: "basic view: appointment times, practitioner and specialty, a pseudonym of the patient",
    models.View.CONTACT: "contact view: contact details released by a patient's consent",
}
_FIELD_LABELS = {f: f.label for f in models.ContactField}


def _text(value: str) -> str:
    return escape(value, quote=True)


def _theirs(value: str) -> str:
    """Third-party text: escaped and isolated from the text around it."""
    return f"<bdi>{_text(value)}</bdi>"


def rfc3339(value: datetime) -> str:
    """A time as the JSON and CSV write it: RFC 3339, UTC, ``Z``."""
    return to_timestamp(value).ToJsonString()


def _time(value: datetime | None) -> str:
    return "–" if value is None else f"<time>{rfc3339(value)}</time>"


def _n(value: int) -> str:
    return f"{value:,}"


def _th(label: str, field: str = "", numeric: bool = False) -> str:
    code = f"<code>{_text(field)}</code>" if field else ""
    css = ' class="n"' if numeric else ""
    return f"<th{css}>{_text(label)}{code}</th>"


def _fields(numbers: Iterable[int]) -> str:
    labels = [_FIELD_LABELS[models.ContactField(n)] for n in sorted(numbers) if n in _FIELD_LABELS]
    return ", ".join(labels) if labels else "none"


def _verification(value: breach.Verification) -> str:
    if value.state is breach.VerificationState.NOT_CHECKED:
        return '<span class="unchecked">not verified with this report</span> (run <code>audit verify</code>)'
    scope = (
        f"the whole ledger, records 1 to {_n(value.head_seq)}, verified at {_time(value.verify_time)}: "
        f"{_n(value.records)} records, {_n(value.seals_checked)} seals, "
        f"{_n(value.witnessed_checkpoints)} witnessed checkpoints. The window holds {_n(value.window_records)} "
        "records of this partner"
    )
    if value.window_unchained_records:
        scope += f", {_n(value.window_unchained_records)} of them not yet chained and so not covered"
    scope += "."
    if value.state is breach.VerificationState.INTACT:
        return f'<span class="intact">INTACT</span>: {scope}'
    problems = "".join(f"<li>{_text(p)}</li>" for p in value.problems)
    return (
        f'<span class="broken">NOT INTACT</span> ({_n(len(value.problems))} problems): {scope} '
        f"The report may be incomplete.<ul>{problems}</ul>"
    )


def _header(report: breach.Report, record_id: int | None) -> str:
    keys = ", ".join(f"<code>{_text(k)}</code>" for k in report.key_ids) or "none used in the window"
    if report.key_id is None:
        keys += " (every key of the partner)"
    facts = [
        ("Partner", "partner", f"{_theirs(report.partner.display_name)} <code>{_text(str(report.partner.id))}</code>"),
        ("Keys concerned", "key_ids", keys),
        (
            "Window",
            "start_time, end_time",
            f"from {_time(report.start_time)} to {_time(report.end_time)} (end excluded)",
        ),
        ("Generated", "generate_time", _time(report.generate_time)),
        ("Ledger verification", "verification", _verification(report.verification)),
    ]
    rows = "".join(f'<dt>{_text(a)}<span class="field">{_text(f)}</span></dt><dd>{v}</dd>' for a, f, v in facts)
    if report.contact_included:
        banner = (
            '<p class="banner contact"><strong>This dossier contains the names and email addresses of '
            f"{_n(sum(p.contact is not None for p in report.patients))} patients</strong>, read for the "
            "notification letters (<code>--include-contact</code>); that use is recorded in the ledger"
            + (f" (record {record_id})" if record_id is not None else "")
            + ". Keep it as you keep the patients' records.</p>"
        )
    else:
        banner = (
            '<p class="banner">This dossier contains no name, email address or phone number: the patients are '
            "named by their internal ids. Their health data (appointments, practitioners, specialties) is "
            "still personal data: keep it confidential.</p>"
        )
    title = f"<h1>Breach dossier: {_theirs(report.partner.display_name)}</h1>"
    return f'<header>{title}<dl class="facts">{rows}</dl>{banner}</header>'


def _summary(report: breach.Report) -> str:
    sums = report.totals
    facts = [
        ("Patients affected", "totals.patients", _n(sums.patients)),
        ("Appointments disclosed", "totals.appointments", _n(sums.appointments)),
        ("Disclosures (appointments, once per response)", "totals.disclosures", _n(report.disclosures)),
        ("Patients with contact details disclosed", "totals.contact_patients", _n(sums.contact_patients)),
        ("Patients sent a consent request", "totals.consent_request_patients", _n(sums.consent_request_patients)),
        ("First disclosure", "totals.first_disclosure_time", _time(report.first_disclosure_time)),
        ("Last disclosure", "totals.last_disclosure_time", _time(report.last_disclosure_time)),
    ]
    rows = "".join(f'<dt>{_text(a)}<span class="field">{_text(f)}</span></dt><dd>{v}</dd>' for a, f, v in facts)
    fields = "".join(
        f'<tr><td>{_text(_FIELD_LABELS[models.ContactField(n)])}</td><td class="n">{_n(c)}</td></tr>'
        for n, c in sums.per_field.items()
    )
    views = "".join(
        f'<tr><td>{_text(v.view.label)}<span class="field">{_text(VIEW_WORDS[v.view])}</span></td>'
        f'<td class="n">{_n(v.patients)}</td><td class="n">{_n(v.appointments)}</td>'
        f'<td class="n">{_n(v.disclosures)}</td></tr>'
        for v in report.views
    )
    specialties = (
        "".join(
            f'<tr><td>{_theirs(s.specialty)}</td><td class="n">{_n(s.patients)}</td>'
            f'<td class="n">{_n(s.appointments)}</td></tr>'
            for s in report.specialties
        )
        or '<tr><td colspan="3">none</td></tr>'
    )
    return (
        '<section class="summary"><h2>Summary</h2>'
        f'<dl class="facts">{rows}</dl>'
        "<h3>Patients per contact field</h3>"
        f"<table><thead><tr>{_th('Field', 'totals.fields.field')}{_th('Patients', 'patients', True)}</tr></thead>"
        f"<tbody>{fields}</tbody></table>"
        "<h3>Per view</h3>"
        f"<table><thead><tr>{_th('View', 'totals.views.view')}{_th('Patients', 'patients', True)}"
        f"{_th('Appointments', 'appointments', True)}{_th('Disclosures', 'disclosures', True)}</tr></thead>"
        f"<tbody>{views}</tbody></table>"
        "<h3>Specialties concerned</h3><p>A specialty is health data (GDPR Art. 9): it tells what a patient is "
        "treated for.</p>"
        f"<table><thead><tr>{_th('Specialty', 'totals.specialties.specialty')}{_th('Patients', 'patients', True)}"
        f"{_th('Appointments', 'appointments', True)}</tr></thead><tbody>{specialties}</tbody></table>"
        "</section>"
    )


def _article_33(report: breach.Report, dpo_contact: str | None) -> str:
    sums = report.totals
    keys = ", ".join(f"<code>{_text(k)}</code>" for k in report.key_ids) or "no key"
    contact = ", ".join(
        f"{_text(_FIELD_LABELS[models.ContactField(n)])} ({_n(c)} patients)" for n, c in sums.per_field.items() if c
    )
    basic = next((v for v in report.views if v.view is models.View.BASIC), None)
    categories = [
        f"appointment dates and times and the practitioner seen ({_n(basic.patients if basic else 0)} patients, "
        f"{_n(basic.appointments if basic else 0)} appointments)",
        f"the practitioner's specialty, which is health data ({_n(len(report.specialties))} specialties)",
        f"contact details: {contact}" if contact else "no contact detail (name, sex, phone, email)",
    ]
    circumstances = breach_letters.todo("les circonstances de l’incident", "the circumstances of the incident")
    consequences = breach_letters.todo(
        "les conséquences probables", "the likely consequences (fraudulent contact, a specialty revealed, …)"
    )
    measures = breach_letters.todo("les autres mesures prises ou envisagées", "the other measures taken or proposed")
    revoked = "".join(
        f"<li>The key <code>{_text(k)}</code> was revoked at {_time(t)}.</li>" for k, t in report.revoked_keys
    )
    live = [k for k in report.key_ids if k not in dict(report.revoked_keys)]
    if live:
        revoked += (
            "<li>Not revoked when this dossier was generated: "
            + ", ".join(f"<code>{_text(k)}</code>" for k in live)
            + ".</li>"
        )
    dpo = (
        f"<bdi>{_text(dpo_contact)}</bdi>"
        if dpo_contact
        else breach_letters.todo(
            "coordonnées du DPO", "the DPO's name and contact details (set APPTGATE_DPO_CONTACT to fill this in)"
        ).en
    )
    requested = (
        f", of whom {_n(sums.consent_request_patients)} were sent a consent request"
        if sums.consent_request_patients
        else ""
    )
    period = (
        f"between {_time(report.first_disclosure_time)} and {_time(report.last_disclosure_time)}"
        if report.first_disclosure_time is not None
        else "in the window"
    )
    return f"""<section class="art33"><h2>Notification to the supervisory authority (GDPR Art. 33(3))</h2>
<h3>(a) Nature of the breach · Nature de la violation</h3>
<p>Appointment data was disclosed to the partner application {_theirs(report.partner.display_name)} through its
access key(s) {keys}, {period}. {circumstances.en}</p>
<p>Categories of data subjects: patients of the platform whose appointments were disclosed
(<strong>{_n(sums.patients)}</strong> patients{requested}).</p>
<p>Categories of personal data: {"; ".join(categories)}. The visit reason is never disclosed to partners.</p>
<p>Approximate number of records: <strong>{_n(sums.appointments)}</strong> appointments, disclosed
{_n(report.disclosures)} times (an appointment counted once per response that carried it).</p>
<h3>(b) Data protection officer · Délégué à la protection des données</h3>
<p>{dpo}</p>
<h3>(c) Likely consequences · Conséquences probables</h3>
<p>{consequences.en}</p>
<h3>(d) Measures taken or proposed · Mesures prises ou envisagées</h3>
<ul>{revoked}<li>{measures.en}</li></ul>
</section>"""


def _letters(report: breach.Report, dpo_contact: str | None, zone: tzinfo) -> str:
    said = breach_letters.templates(report, dpo_contact, zone)
    return f"""<section class="letters"><h2>Notice to the patients (GDPR Art. 34)</h2>
<p>The fields <span class="merge">{{{{…}}}}</span> are the columns of
<code>audit breach-report --include-contact --format csv --letters</code> (one row per patient, with their name, email
and what of theirs was disclosed, already written out in both languages).</p>
<h3 lang="fr">Français</h3><div class="letter" lang="fr">{said.fr}</div>
<h3 lang="en">English</h3><div class="letter" lang="en">{said.en}</div>
</section>"""


#: Unicode's isolate controls (LRI, RLI, FSI, PDI): removed from third-party text that is isolated by them.
_ISOLATES = dict.fromkeys(range(0x2066, 0x206A))


def _isolated(value: str) -> str:
    """Third-party text in the patients' list: escaped, on one line, and isolated by the characters ``<bdi>``
    stands for (FSI … PDI), where an element would be one more box for the PDF engine; its own isolate controls
    are removed, so that it cannot close the isolate early, and its line breaks shown as spaces, as elsewhere."""
    return f"\u2068{_text(' '.join(value.translate(_ISOLATES).splitlines()))}\u2069"


def _patient_id(value: UUID, narrow: bool) -> str:
    """A patient's id; in a narrow column, a line break allowed after its third group, where the text has none."""
    text = str(value)
    return f"{text[:19]}<wbr>{text[19:]}" if narrow else text


def _patients(report: breach.Report) -> str:
    with_contact = report.contact_included
    columns = ["id", "appointments", "fields", "views", "time", "time"] + (["name", "email"] if with_contact else [])
    head = (
        "<colgroup>"
        + "".join(f'<col class="{c}">' for c in columns)
        + "</colgroup><thead><tr>"
        + _th("Patient", "patient_id")
        + _th("Appointments", "appointments: start_time, practitioner_display_name, practitioner_specialty")
        + _th("Contact fields", "contact_fields")
        + _th("Views", "views")
        + _th("First", "first_disclosure_time")
        + _th("Last", "last_disclosure_time")
        + (_th("Name", "contact.given_name, family_name") + _th("Email", "contact.email") if with_contact else "")
        + "</tr></thead>"
    )
    rows = []
    for patient in report.patients:
        affected = patient.affected
        # Text only, an appointment a line (the cells keep line breaks): every element is a box that the PDF
        # engine lays out and draws on its own.
        appointments = "\n".join(
            f"{rfc3339(a.start_time)} · {_isolated(a.practitioner_display_name)} · "
            f"{_isolated(a.practitioner_specialty)}"
            for a in patient.appointments
        ) or ("consent request only" if affected.consent_requests else "–")
        cells = [
            appointments,
            _text(_fields(affected.contact_fields)),
            _text(", ".join(v.label for v in affected.views) or "–"),
            rfc3339(affected.first_disclosure_time),
            rfc3339(affected.last_disclosure_time),
        ]
        if with_contact:
            contact = patient.contact
            cells.append(_isolated(f"{contact.given_name} {contact.family_name}") if contact else "–")
            cells.append(_isolated(contact.email) if contact and contact.email else "–")
        row_header = f'<th scope="row">{_patient_id(affected.patient_id, with_contact)}</th>'
        rows.append(f"<tr>{row_header}<td>" + "</td><td>".join(cells) + "</td></tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(columns)}">No patient was reached in the window.</td></tr>')
    # Tables of a bounded number of rows: a paged layout engine lays a long table out in time that grows
    # faster than its rows; each table repeats the header, as a page break would.
    css = "patients contact" if with_contact else "patients"
    tables = "".join(
        f'<table class="{css}">{head}<tbody>{"".join(rows[n : n + TABLE_ROWS])}</tbody></table>'
        for n in range(0, len(rows), TABLE_ROWS)
    )
    return f'<section class="patients"><h2>Affected patients ({_n(len(report.patients))})</h2>{tables}</section>'


def render(
    report: breach.Report, *, dpo_contact: str | None = None, zone: tzinfo = UTC, record_id: int | None = None
) -> str:
    """The dossier as a self-contained HTML page; the letters' dates in ``zone``, every other time in UTC.

    ``record_id`` is the ledger record of the contact details' use, when they were read.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_text(CONTENT_SECURITY_POLICY)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Breach dossier: {_text(report.partner.display_name)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        _header(report, record_id),
        "<main>",
        _summary(report),
        '<section><h2>Timeline</h2><div class="chart">',
        breach_chart.render(report.activity),
        "</div></section>",
        _article_33(report, dpo_contact),
        _letters(report, dpo_contact, zone),
        _patients(report),
        "</main>",
        '<footer class="method"><h2>How these numbers were made</h2>',
        "<p>From the disclosure ledger: every response the partner received with the keys concerned in the window "
        "is a record, written before the response left and hash-chained. A patient is affected when one of their "
        "appointments was disclosed, or a consent request sent to them. Records of the platform's own use of "
        "contact details, and refused attempts (nothing sent), are not counted. The same report is available as "
        "JSON and CSV (<code>audit breach-report --format json|csv</code>) and from "
        "<code>AuditService.BreachReport</code>, with the field names shown here.</p>",
        "</footer>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)
