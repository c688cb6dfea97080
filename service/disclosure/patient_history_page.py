"""The page a patient reads: who saw what of theirs, when and why, in French and English. Pure: no I/O.

One self-contained HTML document: inline CSS, no script, no external resource
(a Content-Security-Policy forbids any, so a page opened from a mail or a
portal cannot call out), readable on paper. Every sentence is given in both
languages side by side, each in an element with its ``lang``, so a screen
reader speaks it in the right voice.

The page says what happened in plain words, grouped by partner (the name a
patient recognises) and, under it, by appointment: what the partner saw ("your
appointment times", or the contact details by name), when and how many times,
under which consent's purpose, and what it asked for or was refused. It names
no internal notion (views, outcomes, reason codes); the internal ids of the
partners and appointments appear only in a reference footer for the staff.

Partner names, practitioners' names and specialties and purposes are
third-party text: each is escaped, and isolated (``<bdi>``) so that
right-to-left or override characters in it cannot reorder the text around it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from html import escape
from uuid import UUID

from service import models
from service.disclosure.patient_history import History, totals

_CSS = """
:root { color-scheme: light; }
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif; color: #1b1b1b;
  background: #fff; max-width: 62rem; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.55rem; line-height: 1.25; margin: 0 0 1rem; }
h1 span { display: block; }
h1 span[lang="en"], .bi > [lang="en"] { color: #3a3a3a; }
h2 { font-size: 1.3rem; margin: 0 0 .25rem; color: #1d3a66; }
h3 { font-size: 1.05rem; margin: 1.25rem 0 .25rem; }
p { margin: .25rem 0; }
.bi { display: grid; grid-template-columns: 1fr 1fr; gap: 0 2rem; }
@media (max-width: 44rem) { .bi { grid-template-columns: 1fr; } .bi > [lang="en"] { margin-top: .35rem; } }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0 0 1rem;
  padding: .75rem 1rem; background: #f3f5f8; border-radius: 6px; }
.facts dt { font-weight: 600; }
.facts dd { margin: 0; }
.summary { margin: 1.5rem 0; padding: .75rem 1rem; border: 1px solid #c9d3e0; border-radius: 6px; }
.partner { margin-top: 2rem; padding-top: 1rem; border-top: 3px solid #1d3a66; }
.accesses { list-style: none; margin: 0; padding: 0; }
.access { margin: .6rem 0; padding: .4rem 0 .4rem .8rem; border-left: 4px solid #1d3a66; }
.access.refused { border-left-color: #b3261e; }
.access.asked { border-left-color: #8a6300; }
.access.internal { border-left-color: #5a5a5a; }
.when, .why { color: #444; }
.about { margin-top: 2.5rem; padding-top: 1rem; border-top: 1px solid #c9d3e0; }
.refs { margin-top: 1.5rem; font-size: .8rem; color: #555; }
.refs table { border-collapse: collapse; }
.refs th, .refs td { text-align: left; padding: .1rem 1rem .1rem 0; vertical-align: top; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .9em; overflow-wrap: anywhere; }
@media print { body { padding: 0; font-size: 11pt; } .partner { break-inside: avoid-page; } }
"""

#: The page allows its own style sheet and nothing else: no script, image, font, frame or connection.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
    + "'; base-uri 'none'; form-action 'none'"
)

_MONTHS_FR = (
    "janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre",
    "décembre",
)  # fmt: skip
_MONTHS_EN = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip
_DAYS_FR = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
_DAYS_EN = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

#: How each contact field is named to the patient.
_FIELD_WORDS = {
    models.ContactField.NAME: ("votre nom", "your name"),
    models.ContactField.SEX: ("votre sexe", "your sex"),
    models.ContactField.PHONE: ("votre numéro de téléphone", "your phone number"),
    models.ContactField.EMAIL: ("votre adresse e-mail", "your email address"),
}
_ANY_CONTACT = ("vos coordonnées", "your contact details")
_NOTHING_SENT = ("refusé, rien n’a été transmis", "refused, nothing was sent")
_NOT_SENT_TO_YOU = ("refusé, cette demande ne vous a pas été envoyée", "refused, this request was not sent to you")


@dataclass(frozen=True, slots=True)
class _Words:
    """One thing said in both languages (HTML, already escaped)."""

    fr: str
    en: str


def _text(value: str) -> str:
    return escape(value, quote=True)


def _theirs(value: str) -> str:
    """Third-party text: escaped and isolated from the text around it."""
    return f"<bdi>{_text(value)}</bdi>"


def _bilingual(words: _Words, tag: str = "p", css: str = "") -> str:
    classes = f' class="{css}"' if css else ""
    return (
        f'<div class="bi"><{tag} lang="fr"{classes}>{words.fr}</{tag}>'
        f'<{tag} lang="en"{classes}>{words.en}</{tag}></div>'
    )


def _plural(n: int, one: str, many: str) -> str:
    return f"{n:,} " + (one if n == 1 else many)


def _plural_fr(n: int, one: str, many: str) -> str:
    # In French, 0 and 1 take the singular.
    return f"{n:,}".replace(",", "\u202f") + " " + (one if n <= 1 else many)


def date_fr(value: datetime, zone: tzinfo, *, hour: bool = True, weekday: bool = False) -> str:
    """A time as a French reader writes it: ``lundi 4 mars 2030 à 9 h 05`` (also used by the breach letters)."""
    t = value.astimezone(zone)
    day = "1er" if t.day == 1 else str(t.day)
    text = f"{_DAYS_FR[t.weekday()]} " if weekday else ""
    text += f"{day} {_MONTHS_FR[t.month - 1]} {t.year}"
    return text + (f" à {t.hour}\u00a0h\u00a0{t.minute:02d}" if hour else "")


def date_en(value: datetime, zone: tzinfo, *, hour: bool = True, weekday: bool = False) -> str:
    """A time in English: ``Monday 4 March 2030 at 09:05``."""
    t = value.astimezone(zone)
    text = f"{_DAYS_EN[t.weekday()]} " if weekday else ""
    text += f"{t.day} {_MONTHS_EN[t.month - 1]} {t.year}"
    return text + (f" at {t.hour:02d}:{t.minute:02d}" if hour else "")


def _zone_name(zone: tzinfo, at: datetime) -> str:
    """An IANA zone's name (``Europe/Paris``), else the zone's abbreviation at ``at``."""
    return "UTC" if zone is UTC else str(getattr(zone, "key", None) or zone.tzname(at) or "UTC")


def _fields(fields: Sequence[int]) -> _Words:
    """The contact fields in words: ``votre nom et votre adresse e-mail``; "your contact details" for none."""
    known = [_FIELD_WORDS[models.ContactField(n)] for n in sorted(set(fields)) if n in _FIELD_WORDS]
    if not known:
        return _Words(*_ANY_CONTACT)

    def join(words: list[str], conjunction: str) -> str:
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + conjunction + words[-1]

    return _Words(join([w[0] for w in known], " et "), join([w[1] for w in known], " and "))


def _refusal(entry: models.PatientDisclosure) -> _Words:
    """A refused attempt in plain words."""
    reason = entry.denial_reason
    f = _fields(entry.fields)
    if entry.view is models.View.BASIC:
        how = (" sans en avoir l’autorisation", " without being allowed to") if reason == "NOT_FOUND" else ("", "")
        return _Words(
            f"A tenté de voir votre rendez-vous{how[0]}\u202f; {_NOTHING_SENT[0]}.",
            f"Tried to see your appointment{how[1]}; {_NOTHING_SENT[1]}.",
        )
    if reason == "CONSENT_REQUEST_PENDING":
        return _Words(
            f"A demandé à nouveau votre consentement pour recevoir {f.fr} alors qu’une demande attendait encore "
            f"votre réponse\u202f; {_NOT_SENT_TO_YOU[0]}.",
            f"Asked again for your consent to receive {f.en} while a request was still waiting for your answer; "
            f"{_NOT_SENT_TO_YOU[1]}.",
        )
    if reason.startswith("CONSENT_REQUEST_"):
        return _Words(
            f"A demandé votre consentement pour recevoir {f.fr} au-delà du nombre de demandes permis\u202f; "
            f"{_NOT_SENT_TO_YOU[0]}.",
            f"Asked for your consent to receive {f.en} beyond the number of requests allowed; {_NOT_SENT_TO_YOU[1]}.",
        )
    how = {
        "CONSENT_REQUIRED": (" sans votre consentement", " without your consent"),
        "CONSENT_INVALID": (" avec un consentement non valable", " with a consent that was not valid"),
        "CONSENT_EXPIRED": (" avec un consentement expiré", " with a consent that had expired"),
        "CONSENT_REVOKED": (" avec un consentement que vous aviez retiré", " with a consent you had withdrawn"),
        "NOT_FOUND": (" sans en avoir l’autorisation", " without being allowed to"),
    }.get(reason, ("", ""))
    return _Words(
        f"A tenté de lire {f.fr}{how[0]}\u202f; {_NOTHING_SENT[0]}.",
        f"Tried to read {f.en}{how[1]}; {_NOTHING_SENT[1]}.",
    )


def _what(entry: models.PatientDisclosure) -> tuple[_Words, str]:
    """What the partner did, in plain words, and the entry's CSS class."""
    f = _fields(entry.fields)
    if entry.outcome is models.Outcome.DENIED:
        return _refusal(entry), "refused"
    if entry.outcome is models.Outcome.REQUESTED:
        return _Words(
            f"A demandé votre consentement pour recevoir {f.fr}.", f"Asked for your consent to receive {f.en}."
        ), "asked"
    if entry.outcome is models.Outcome.CONSENT_GRANTED:
        return _Words(
            f"À sa demande, vous lui avez donné votre consentement pour recevoir {f.fr}.",
            f"At its request, you gave it your consent to receive {f.en}.",
        ), "asked"
    if entry.outcome is models.Outcome.INTERNAL_USE:
        return _Words(
            f"Rien ne lui a été transmis : la plateforme a utilisé {f.fr} pour vous écrire au sujet d’un "
            "incident qui concerne ce logiciel.",
            f"Nothing was sent to it: the platform used {f.en} to write to you about an incident involving this "
            "application.",
        ), "internal"
    if entry.view is models.View.BASIC:
        return _Words(
            "A vu les horaires de votre rendez-vous (date, heure et praticien), sans votre nom ni vos coordonnées.",
            "Saw your appointment times (date, time and practitioner), not your name or contact details.",
        ), "seen"
    return _Words(f"A reçu {f.fr}, avec votre consentement.", f"Received {f.en}, with your consent."), "seen"


def _when(entry: models.PatientDisclosure, zone: tzinfo) -> _Words:
    if entry.count == 1:
        return _Words(f"Le {date_fr(entry.last_time, zone)}.", f"On {date_en(entry.last_time, zone)}.")
    return _Words(
        f"{_plural_fr(entry.count, 'fois', 'fois')}, du {date_fr(entry.first_time, zone)} "
        f"au {date_fr(entry.last_time, zone)}.",
        f"{_plural(entry.count, 'time', 'times')}, from {date_en(entry.first_time, zone)} "
        f"to {date_en(entry.last_time, zone)}.",
    )


def _why(entry: models.PatientDisclosure) -> _Words | None:
    if not entry.purpose:
        return None
    purpose = _theirs(entry.purpose)
    if entry.outcome is models.Outcome.DENIED:
        return _Words(
            f"Motif du consentement présenté\u00a0: «\u00a0{purpose}\u00a0».",
            f"Purpose of the consent shown: “{purpose}”.",
        )
    return _Words(
        f"Motif de votre consentement\u00a0: «\u00a0{purpose}\u00a0».", f"Purpose of your consent: “{purpose}”."
    )


def _access(entry: models.PatientDisclosure, zone: tzinfo) -> str:
    what, css = _what(entry)
    lines = [what, _when(entry, zone)]
    why = _why(entry)
    if why is not None:
        lines.append(why)
    fr = "<br>".join(f'<span class="{c}">{w.fr}</span>' for w, c in zip(lines, ("what", "when", "why"), strict=False))
    en = "<br>".join(f'<span class="{c}">{w.en}</span>' for w, c in zip(lines, ("what", "when", "why"), strict=False))
    return f'<li class="access {css}">{_bilingual(_Words(fr, en))}</li>'


def _appointment_title(entry: models.PatientDisclosure, zone: tzinfo) -> _Words:
    if entry.outcome is models.Outcome.INTERNAL_USE:  # about the patient, not one appointment
        return _Words("Information sur un incident", "Notice of an incident")
    if entry.appointment_id is None or entry.appointment_start_time is None:
        return _Words("Un rendez-vous qui n’existe plus", "An appointment that no longer exists")
    start = entry.appointment_start_time
    who = _theirs(entry.practitioner_display_name)
    specialty = f" ({_theirs(entry.practitioner_specialty)})" if entry.practitioner_specialty else ""
    return _Words(
        f"Rendez-vous du {date_fr(start, zone, weekday=True)} avec {who}{specialty}",
        f"Appointment on {date_en(start, zone, weekday=True)} with {who}{specialty}",
    )


@dataclass
class _Partner:
    name: str
    last_time: datetime
    appointments: dict[UUID | None, list[models.PatientDisclosure]] = field(default_factory=dict)


def _by_partner(entries: Sequence[models.PatientDisclosure]) -> dict[UUID, _Partner]:
    """Entries grouped by partner, then appointment, each group in the order of its most recent access."""
    partners: dict[UUID, _Partner] = {}
    for entry in sorted(entries, key=lambda e: e.last_time, reverse=True):
        partner = partners.setdefault(entry.partner_id, _Partner(entry.partner_display_name, entry.last_time))
        partner.appointments.setdefault(entry.appointment_id, []).append(entry)
    return partners


def _partner_section(partner: _Partner, zone: tzinfo) -> str:
    parts = [
        '<section class="partner">',
        f"<h2>{_theirs(partner.name)}</h2>",
        _bilingual(
            _Words(
                f"Dernier accès\u00a0: {date_fr(partner.last_time, zone)}.",
                f"Last access: {date_en(partner.last_time, zone)}.",
            ),
            css="when",
        ),
    ]
    for group in partner.appointments.values():
        title = _appointment_title(group[0], zone)
        parts.append(f'<h3><span lang="fr">{title.fr}</span><br><span lang="en">{title.en}</span></h3>')
        parts.append('<ul class="accesses">')
        parts.extend(_access(entry, zone) for entry in group)
        parts.append("</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _period(history: History, zone: tzinfo) -> _Words:
    start = history.start_time
    end = history.end_time or history.generate_time
    if start is None:
        return _Words(
            f"depuis le premier accès enregistré jusqu’au {date_fr(end, zone)}",
            f"from the first recorded access to {date_en(end, zone)}",
        )
    return _Words(
        f"du {date_fr(start, zone)} au {date_fr(end, zone)}", f"from {date_en(start, zone)} to {date_en(end, zone)}"
    )


def _summary(history: History) -> str:
    if not history.entries:
        return _bilingual(
            _Words(
                "Aucun logiciel partenaire n’a consulté vos données, ni essayé de le faire, pendant cette période.",
                "No partner application accessed your data, or tried to, during this period.",
            )
        )
    sums = totals(history.entries)
    seen = sums.responses[models.Outcome.DISCLOSED]
    refused = sums.responses[models.Outcome.DENIED]
    asked = sums.responses[models.Outcome.REQUESTED]
    fr = (
        f"Pendant cette période, {_plural_fr(sums.partners, 'logiciel partenaire', 'logiciels partenaires')} "
        f"{'a' if sums.partners <= 1 else 'ont'} accédé à vos données ou essayé de le faire\u00a0: "
        f"{_plural_fr(seen, 'consultation', 'consultations')}, "
        f"{_plural_fr(refused, 'tentative refusée', 'tentatives refusées')}, "
        f"{_plural_fr(asked, 'demande de consentement', 'demandes de consentement')}."
    )
    en = (
        f"During this period, {_plural(sums.partners, 'partner application', 'partner applications')} "
        f"accessed your data or tried to: seen {_plural(seen, 'time', 'times')}, "
        f"{_plural(refused, 'refused attempt', 'refused attempts')}, "
        f"{_plural(asked, 'consent request', 'consent requests')}."
    )
    return _bilingual(_Words(fr, en))


def _references(history: History, partners: dict[UUID, _Partner], zone: tzinfo) -> str:
    rows = [
        f"<tr><td>{_theirs(p.name)}</td><td><code>{_text(str(pid))}</code></td></tr>" for pid, p in partners.items()
    ]
    appointments: dict[UUID, datetime | None] = {}
    for entry in history.entries:
        if entry.appointment_id is not None:
            appointments.setdefault(entry.appointment_id, entry.appointment_start_time)
    for aid, start in appointments.items():
        when = "–" if start is None else f"{date_fr(start, zone, hour=False)} · {date_en(start, zone, hour=False)}"
        rows.append(f"<tr><td>{_text(when)}</td><td><code>{_text(str(aid))}</code></td></tr>")
    return "\n".join(
        [
            '<section class="refs">',
            _bilingual(
                _Words(
                    "Références, pour le service qui a établi ce document si vous le contactez à son sujet :",
                    "References, for the staff who prepared this document should you contact them about it:",
                )
            ),
            "<table>",
            '<tr><th><span lang="fr">Logiciel ou rendez-vous</span> · <span lang="en">Application or appointment'
            '</span></th><th><span lang="fr">Référence</span> · <span lang="en">Reference</span></th></tr>',
            *rows,
            "</table>",
            "</section>",
        ]
    )


def render(history: History, zone: tzinfo = UTC) -> str:
    """The history as a self-contained HTML page, its times shown in ``zone``."""
    partners = _by_partner(history.entries)
    period = _period(history, zone)
    zone_name = _text(_zone_name(zone, history.generate_time))
    facts = [
        ("Référence patient", "Patient reference", f"<code>{_text(str(history.patient_id))}</code>"),
        (
            "Période couverte",
            "Period covered",
            f'<span lang="fr">{period.fr}</span><br><span lang="en">{period.en}</span>',
        ),
        (
            "Document établi le",
            "Generated on",
            f'<span lang="fr">{date_fr(history.generate_time, zone)}</span><br>'
            f'<span lang="en">{date_en(history.generate_time, zone)}</span>',
        ),
        ("Fuseau horaire des heures", "Times shown in", zone_name),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="fr">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_text(CONTENT_SECURITY_POLICY)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Qui a consulté vos données · Who has seen your data</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        '<h1><span lang="fr">Qui a consulté vos données de rendez-vous</span>\n'
        '<span lang="en">Who has seen your appointment data</span></h1>',
        '<dl class="facts">',
        *(
            f'<dt><span lang="fr">{fr}</span> · <span lang="en">{en}</span></dt><dd>{value}</dd>'
            for fr, en, value in facts
        ),
        "</dl>",
        _bilingual(
            _Words(
                "Ce document indique quels logiciels reliés à la plateforme de prise de rendez-vous (agendas, "
                "logiciels de cabinet…) ont consulté vos données, ce qu’ils ont vu, quand et pourquoi, et quelles "
                "tentatives ont été refusées. Il a été établi à votre demande (droit d’accès, article 15 du RGPD).",
                "This document shows which software connected to the appointment booking platform (diaries, "
                "practice software…) accessed your data, what it saw, when and why, and which attempts were "
                "refused. It was prepared at your request (right of access, Article 15 of the GDPR).",
            )
        ),
        "</header>",
        "<main>",
        '<section class="summary">',
        _bilingual(_Words("En bref", "In short"), tag="h2"),
        _summary(history),
        "</section>",
        *(_partner_section(partner, zone) for partner in partners.values()),
        "</main>",
        '<footer class="about">',
        _bilingual(_Words("À savoir", "Good to know"), tag="h2"),
        _bilingual(
            _Words(
                "Le motif de vos rendez-vous n’est jamais transmis à ces logiciels. Votre nom, votre sexe, votre "
                "numéro de téléphone et votre adresse e-mail ne sont transmis qu’avec votre consentement, et "
                "seulement au logiciel, pour les informations et pendant la durée que vous avez choisis. Une "
                "tentative refusée n’a rien transmis.",
                "The reason for your appointments is never shared with this software. Your name, sex, phone number "
                "and email address are shared only with your consent, and only with the application, the details "
                "and for the length of time you chose. A refused attempt shared nothing.",
            )
        ),
        _references(history, partners, zone),
        "</footer>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)
