"""The letters to the patients of a breach (GDPR Art. 34): the mail-merge rows and the notice templates. Pure: no I/O.

``audit breach-report --include-contact --format csv --letters`` writes one
row per patient (:data:`LETTER_HEADER`): the name and email the letter is
addressed with, what of theirs was disclosed, and that same content already
written out as a sentence in French and in English (``disclosed_fr``,
``disclosed_en``), so a mail merge needs no logic. The dossier prints the
notice templates (:func:`templates`), whose merge fields are those columns,
``{{given_name}}`` and so on; what the data cannot say (the likely
consequences, the measures) is a marked place for the DPO to complete.

Every value written into the templates' HTML is escaped; the CSV neutralises
a cell a spreadsheet would run as a formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import tzinfo
from html import escape

from appointments.internal.v1 import audit_pb2
from appointments.type.v1 import contact_pb2

from service import models
from service.disclosure import breach
from service.disclosure.patient_history_page import date_en, date_fr

#: How each contact field is named to the patient.
FIELD_WORDS = {
    models.ContactField.NAME: ("votre nom", "your name"),
    models.ContactField.SEX: ("votre sexe", "your sex"),
    models.ContactField.PHONE: ("votre numéro de téléphone", "your phone number"),
    models.ContactField.EMAIL: ("votre adresse e-mail", "your email address"),
}

#: The mail merge's columns: the fields of ``AffectedPatient`` the letter uses, then the sentences.
LETTER_HEADER = [
    "patient_id",
    "contact.given_name",
    "contact.family_name",
    "contact.email",
    "partner.display_name",
    "contact_fields",
    "first_disclosure_time",
    "last_disclosure_time",
    "appointments.start_time",
    "appointments.practitioner_display_name",
    "appointments.practitioner_specialty",
    "disclosed_fr",
    "disclosed_en",
]


@dataclass(frozen=True, slots=True)
class Said:
    """One thing said in French and in English (plain text)."""

    fr: str
    en: str


def _join(words: Sequence[str], conjunction: str) -> str:
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + conjunction + words[-1]


def fields_said(fields: Sequence[int]) -> Said:
    """The contact fields in words: ``votre nom et votre adresse e-mail``; empty for none."""
    known = [FIELD_WORDS[models.ContactField(n)] for n in sorted(set(fields)) if n in FIELD_WORDS]
    return Said(_join([w[0] for w in known], " et "), _join([w[1] for w in known], " and "))


def _appointment_said(appointment: audit_pb2.AppointmentSummary, zone: tzinfo) -> Said:
    start = appointment.start_time.ToDatetime(tzinfo=zone)
    who = appointment.practitioner_display_name
    specialty = f" ({appointment.practitioner_specialty})" if appointment.practitioner_specialty else ""
    return Said(f"le {date_fr(start, zone)} avec {who}{specialty}", f"on {date_en(start, zone)} with {who}{specialty}")


def disclosed_said(patient: audit_pb2.AffectedPatient, zone: tzinfo) -> Said:
    """What of the patient's was disclosed, as a sentence for the letter."""
    appointments = [_appointment_said(a, zone) for a in patient.appointments]
    fields = fields_said(patient.contact_fields)
    fr: list[str] = []
    en: list[str] = []
    if appointments:
        many = len(appointments) > 1
        fr.append(
            ("les informations de vos rendez-vous" if many else "les informations de votre rendez-vous")
            + " (date, heure, praticien et spécialité) "
            + _join([a.fr for a in appointments], " et ")
        )
        en.append(
            ("the details of your appointments" if many else "the details of your appointment")
            + " (date, time, practitioner and specialty) "
            + _join([a.en for a in appointments], " and ")
        )
    if fields.fr:
        fr.append(fields.fr)
        en.append(fields.en)
    if not fr:  # reached only by a consent request
        return Said(
            "une demande d’accès à vos coordonnées vous a été adressée en son nom\u202f; aucune de vos données "
            "ne lui a été transmise",
            "a request for your contact details was sent to you in its name; none of your data was sent to it",
        )
    return Said(_join(fr, " ainsi que "), _join(en, " as well as "))


def letter_row(report: breach.Report, patient: audit_pb2.AffectedPatient, zone: tzinfo) -> list[str]:
    """One mail-merge row. The patient's ``contact`` must be set (``--include-contact``)."""
    if not patient.HasField("contact"):
        raise ValueError("a letter needs the patient's contact, read with --include-contact")
    said = disclosed_said(patient, zone)
    return [
        patient.patient_id,
        breach.cell(patient.contact.given_name),
        breach.cell(patient.contact.family_name),
        breach.cell(patient.contact.email),
        breach.cell(report.partner.display_name),
        breach.LIST_SEPARATOR.join(contact_pb2.ContactField.Name(f) for f in patient.contact_fields),
        patient.first_disclosure_time.ToJsonString(),
        patient.last_disclosure_time.ToJsonString(),
        breach.LIST_SEPARATOR.join(a.start_time.ToJsonString() for a in patient.appointments),
        breach.LIST_SEPARATOR.join(breach.cell(a.practitioner_display_name) for a in patient.appointments),
        breach.LIST_SEPARATOR.join(breach.cell(a.practitioner_specialty) for a in patient.appointments),
        breach.cell(said.fr),
        breach.cell(said.en),
    ]


# --------------------------------------------------------------------------- the templates


def merge(column: str) -> str:
    """A merge field of the templates, marked as such: ``{{given_name}}`` for the column ``contact.given_name``."""
    return f'<span class="merge">{{{{{escape(column.rsplit(".", 1)[-1])}}}}}</span>'


def todo(fr: str, en: str) -> Said:
    """A marked place for the DPO to complete (HTML), in both languages."""
    return Said(
        f'<span class="todo">[À compléter par le DPO\u00a0: {escape(fr)}]</span>',
        f'<span class="todo">[To be completed by the DPO: {escape(en)}]</span>',
    )


def _period(report: breach.Report, zone: tzinfo) -> Said:
    first, last = report.first_disclosure_time, report.last_disclosure_time
    if first is None or last is None:
        return Said("pendant la période examinée", "during the period examined")
    return Said(
        f"entre le {escape(date_fr(first, zone))} et le {escape(date_fr(last, zone))}",
        f"between {escape(date_en(first, zone))} and {escape(date_en(last, zone))}",
    )


def _dpo(dpo_contact: str | None) -> Said:
    if dpo_contact:
        text = f"<bdi>{escape(dpo_contact)}</bdi>"
        return Said(text, text)
    return todo(
        "les coordonnées du délégué à la protection des données (APPTGATE_DPO_CONTACT n’est pas défini)",
        "the data protection officer's contact details (APPTGATE_DPO_CONTACT is not set)",
    )


def _measures(report: breach.Report, zone: tzinfo) -> Said:
    fr = [f"la clé d’accès {escape(k)} a été révoquée le {escape(date_fr(t, zone))}" for k, t in report.revoked_keys]
    en = [f"the access key {escape(k)} was revoked on {escape(date_en(t, zone))}" for k, t in report.revoked_keys]
    extra = todo("les autres mesures prises ou envisagées", "the other measures taken or proposed")
    if not fr:
        return extra
    return Said(f"{_join(fr, ' et ')}\u202f; {extra.fr}", f"{_join(en, ' and ')}; {extra.en}")


def templates(report: breach.Report, dpo_contact: str | None, zone: tzinfo) -> Said:
    """The notice to each patient (Art. 34), in French and in English, as HTML with merge fields marked."""
    partner = f"<bdi>{escape(report.partner.display_name)}</bdi>"
    period = _period(report, zone)
    dpo = _dpo(dpo_contact)
    measures = _measures(report, zone)
    consequences = todo(
        "les conséquences probables pour les patients (par exemple : messages ou appels frauduleux se "
        "réclamant de votre praticien, spécialité médicale révélée)",
        "the likely consequences for patients (for example: fraudulent messages or calls claiming to come from "
        "your practitioner, a medical specialty revealed)",
    )
    circumstances = todo("les circonstances de l’incident", "how the incident happened")
    fr = f"""<p>Objet\u00a0: incident de sécurité concernant vos données de rendez-vous</p>
<p>Bonjour {merge("given_name")} {merge("family_name")},</p>
<p>Nous vous informons d’un incident de sécurité. {period.fr}, le logiciel {partner}, relié à notre plateforme de
prise de rendez-vous, a été utilisé pour consulter des données de rendez-vous\u00a0; {circumstances.fr}.</p>
<p>Vos données concernées\u00a0: {merge("disclosed_fr")}. Le motif de vos rendez-vous n’a jamais été transmis.</p>
<p>Conséquences probables\u00a0: {consequences.fr}.</p>
<p>Mesures prises\u00a0: {measures.fr}.</p>
<p>Soyez attentif aux messages, courriels ou appels qui feraient état de vos rendez-vous pour vous demander un
paiement, des informations ou un mot de passe\u00a0: ne donnez aucune information sans vérifier auprès de votre
praticien par un moyen habituel.</p>
<p>Pour toute question, vous pouvez contacter notre délégué à la protection des données\u00a0: {dpo.fr}. Vous pouvez
aussi introduire une réclamation auprès de la CNIL (www.cnil.fr).</p>"""
    en = f"""<p>Subject: security incident involving your appointment data</p>
<p>Dear {merge("given_name")} {merge("family_name")},</p>
<p>We are writing to tell you about a security incident. {period.en[0].upper() + period.en[1:]}, the application
{partner}, which is connected to our appointment booking platform, was used to read appointment data;
{circumstances.en}.</p>
<p>Your data concerned: {merge("disclosed_en")}. The reason for your appointments was never shared.</p>
<p>Likely consequences: {consequences.en}.</p>
<p>Measures taken: {measures.en}.</p>
<p>Be wary of messages, emails or calls that mention your appointments to ask you for a payment, information or a
password: give nothing without checking with your practitioner through your usual means.</p>
<p>If you have any question, you can contact our data protection officer: {dpo.en}. You may also lodge a complaint
with the supervisory authority (in France, the CNIL: www.cnil.fr).</p>"""
    return Said(fr, en)
