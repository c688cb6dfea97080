"""Demo data for ``make run``: a few practitioners, patients and appointments, one partner with a key.

The patients' details are fictitious. Seeding is idempotent: the data is
created once; every run issues a fresh partner key, because a key's secret is
shown only when it is issued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from service.access import credentials
from service.crypto import sealing
from service.store import partners, scheduling
from service.store.database import Database

DEMO_PARTNER = "Demo Agenda Sync"

_PRACTITIONERS = [
    ("Dr. Ada Demo", "General practice"),
    ("Dr. Bruno Sample", "Dermatology"),
    ("Dr. Chloe Example", "Pediatrics"),
]
_PATIENTS = [
    ("Zelda", "Quenneville-Demo", 1, "+33600000101", "zelda.demo@example.invalid"),
    ("Yannick", "Ostrowski-Demo", 2, "+33600000102", "yannick.demo@example.invalid"),
    ("Xiomara", "Pettigrew-Demo", 1, "+33600000103", "xiomara.demo@example.invalid"),
    ("Wendell", "Rasmussen-Demo", 2, "+33600000104", None),
    ("Valentina", "Szymanski-Demo", 3, None, "valentina.demo@example.invalid"),
]


@dataclass(frozen=True, slots=True)
class DemoWorld:
    """What the demo created or found, with a freshly issued partner key."""

    partner_id: UUID
    partner_key: str
    practitioner_id: UUID
    patient_id: UUID
    appointment_id: UUID
    week_start: datetime


async def seed(database: Database, data_keys: sealing.DataKeyring) -> DemoWorld:
    """Create the demo data unless present (contact details and reasons sealed), and issue a new partner key."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    async with database.transaction() as conn:
        partner = await partners.find_partner_by_name(conn, DEMO_PARTNER)
        if partner is None:
            partner = await partners.create_partner(conn, DEMO_PARTNER)
            practitioners = [await scheduling.create_practitioner(conn, *p) for p in _PRACTITIONERS]
            patients = [uuid4() for _ in _PATIENTS]
            for patient_id, (given, family, sex, phone, email) in zip(patients, _PATIENTS, strict=True):
                contact = sealing.seal_patient_contact(
                    data_keys, patient_id, given_name=given, family_name=family, sex=sex, phone=phone, email=email
                )
                await scheduling.create_patient(conn, patient_id=patient_id, contact=contact)
            for day in range(7):
                for slot, practitioner in enumerate(practitioners):
                    start = today + timedelta(days=day, hours=9 + 2 * slot)
                    appointment_id = uuid4()
                    await scheduling.create_appointment(
                        conn,
                        appointment_id=appointment_id,
                        practitioner_id=practitioner.id,
                        patient_id=patients[(day + slot) % len(patients)],
                        start_time=start,
                        end_time=start + timedelta(minutes=30),
                        sealed_reason=sealing.seal_reason(
                            data_keys, appointment_id, "demo visit reason (never shown to partners)"
                        ),
                    )
            # The third practitioner does not grant access: its appointments stay invisible.
            for practitioner in practitioners[:2]:
                await partners.grant_access(conn, partner.id, practitioner.id)
        granted = min(await partners.granted_practitioners(conn, partner.id))
        first = await scheduling.first_appointment(conn, granted)
        issued = credentials.new_partner_key()
        await partners.insert_key(conn, issued.key_id, partner.id, issued.secret_hash)
    assert first is not None
    week_start = first.start_time.replace(hour=0, minute=0, second=0, microsecond=0)
    return DemoWorld(partner.id, issued.secret, granted, first.patient_id, first.id, week_start)
