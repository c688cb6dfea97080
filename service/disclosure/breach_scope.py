"""Reading a breach's scope, and the contact details of its letters: used by the RPC and the command line.

:func:`read` reads everything a :class:`~service.disclosure.breach.Report`
holds but the ledger's verification, in one snapshot, so its numbers agree
with each other as of one instant (``generate_time``). :func:`read_contacts`
reads the patients' names and emails for the notification letters, and
records that use in the ledger (an internal use, outcome 5) in the same
transaction, before any value is opened: no name leaves unrecorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from uuid import UUID

from service import models
from service.crypto import sealing
from service.disclosure import breach
from service.errors import NotFound
from service.store import breaches, chain, disclosures, ledger, partners
from service.store.database import Connection, Database

#: The fields a letter is addressed with; the phone and sex are never read for it.
NOTICE_FIELDS = (models.ContactField.NAME, models.ContactField.EMAIL)


async def check_subjects(conn: Connection, partner_id: UUID, key_id: str | None) -> models.Partner:
    """The partner reported on. Raises :class:`NotFound` for an unknown partner, or a key not the partner's.

    A key of another partner is answered as a key that does not exist.
    """
    partner = await partners.find_partner(conn, partner_id)
    if partner is None:
        raise NotFound("partner not found", metadata={"partner_id": str(partner_id)})
    if key_id is not None:
        key = await partners.find_key(conn, key_id)
        if key is None or key.partner_id != partner_id:
            raise NotFound("partner key not found", reason="KEY_NOT_FOUND", metadata={"key_id": key_id})
    return partner


async def read(
    database: Database, window: breaches.Window, *, progress: Callable[[int], None] | None = None
) -> breach.Report:
    """The report of ``window``, its verification left to the caller.

    Raises :class:`NotFound` as :func:`check_subjects` does.
    """
    async with database.transaction(readonly=True, snapshot=True) as conn:
        generate_time = await chain.clock(conn)
        partner = await check_subjects(conn, window.partner_id, window.key_id)
        found: list[models.AffectedPatient] = []
        async for patient in disclosures.breach_report(
            conn,
            partner_id=window.partner_id,
            start_time=window.start_time,
            end_time=window.end_time,
            key_id=window.key_id,
        ):
            found.append(patient)
            if progress is not None:
                progress(len(found))
        appointment_ids = [a for p in found for a in p.appointment_ids]
        summaries = await breaches.appointments(conn, appointment_ids)
        rows = await breaches.activity(conn, window)
        views = await breaches.view_totals(conn, window)
        keys = (window.key_id,) if window.key_id is not None else tuple(sorted({row.key_id for row in rows}))
        revoked = []
        for key_id in keys:
            key = await partners.find_key(conn, key_id)
            if key is not None and key.revoke_time is not None:
                revoked.append((key_id, key.revoke_time))
    return breach.Report(
        partner=partner,
        key_id=window.key_id,
        key_ids=keys,
        start_time=window.start_time,
        end_time=window.end_time,
        generate_time=generate_time,
        patients=breach.attach_appointments(found, summaries),
        activity=breach.activity(
            (row.hour_start_time, row.view, row.items) for row in rows if row.outcome is models.Outcome.DISCLOSED
        ),
        views=breach.view_totals({row.view: (row.patients, row.appointments, row.items) for row in views}),
        revoked_keys=tuple(revoked),
    )


async def read_contacts(
    database: Database, keys: sealing.DataKeyring, report: breach.Report, *, rpc: str = ledger.INTERNAL_USE_RPC
) -> tuple[breach.Report, int | None]:
    """The report with each patient's name and email, and the id of the ledger record of that use.

    The record (outcome 5, under the report's partner, one item per patient
    whose name was read) commits before the values are opened; a report with
    no patient reads and records nothing (``None``). Patients reached only by
    a consent request are written to as well: the partner asked them for
    their details. Raises :class:`service.crypto.sealing.SealError` when a
    value does not open (the record stays: the values were read).
    """
    patient_ids: Sequence[UUID] = [p.affected.patient_id for p in report.patients]
    if not patient_ids:
        return report, None
    async with database.transaction() as conn:
        stored = await breaches.notice_contacts(conn, patient_ids)
        record_id = await ledger.record_internal_use(
            conn, report.partner.id, [s.patient_id for s in stored], NOTICE_FIELDS, rpc=rpc
        )
    opened = {s.patient_id: sealing.open_notice_contact(keys, s) for s in stored}
    patients = tuple(replace(p, contact=opened.get(p.affected.patient_id)) for p in report.patients)
    return replace(report, patients=patients), record_id
