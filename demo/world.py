"""Demo data for ``make run``: a few practitioners, patients and appointments, one partner with a key.

The patients' details are fictitious. Seeding is idempotent: the data is
created once. The partner's key is kept between runs in the data directory
(:func:`partner_key`), since a key's secret is shown only when it is issued:
a run uses the kept key while it verifies, issues a new one otherwise, and
revokes every other key of the demo partner.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

from service.access import credentials
from service.crypto import sealing
from service.crypto.keyfiles import write_private
from service.errors import Unauthenticated
from service.settings import read_private_file
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


#: The file of the data directory that keeps the demo partner's key between runs (mode 0600).
KEY_FILE = "demo-partner-key"


@dataclass(frozen=True, slots=True)
class DemoWorld:
    """What the demo created or found."""

    partner_id: UUID
    practitioner_id: UUID
    patient_id: UUID
    appointment_id: UUID
    week_start: datetime


@dataclass(frozen=True, slots=True)
class DemoKey:
    """The demo partner's key for this run: the one kept from an earlier run, or a new one."""

    key: str
    key_id: str
    #: True when this run issued it (the kept one was missing, revoked, expired or not the demo partner's).
    issued: bool
    #: The other keys of the demo partner, which this run revoked.
    revoked: list[str]


async def seed(database: Database, data_keys: sealing.DataKeyring) -> DemoWorld:
    """Create the demo data unless present (contact details and reasons sealed); issue no key."""
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
    assert first is not None
    week_start = first.start_time.replace(hour=0, minute=0, second=0, microsecond=0)
    return DemoWorld(partner.id, granted, first.patient_id, first.id, week_start)


def _kept_key(path: Path) -> str | None:
    """The key kept at ``path``, or None when there is none (or none shaped like a key)."""
    if not os.path.lexists(path):
        return None
    text = read_private_file(path, f"the demo partner key {path}").strip()
    try:
        credentials.partner_key_id(text)
    except Unauthenticated:
        return None  # not a key: replaced by a new one
    return text


def _keep(path: Path, key: str) -> None:
    """Write ``key`` to ``path`` (mode 0600), replacing what was there in one step."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    write_private(temporary, key + "\n")
    try:
        os.replace(temporary, path)
    except OSError:
        temporary.unlink()
        raise


async def partner_key(database: Database, partner_id: UUID, path: Path) -> DemoKey:
    """The demo partner's key: the one kept at ``path`` while it verifies, else a new one, kept there.

    Every other key of the demo partner is revoked, in the same transaction
    (each earlier run issued one, and a key nobody holds is a key to leak).
    Raises :class:`ConfigError` when the file cannot be trusted (see
    :func:`service.settings.read_private_file`).
    """
    kept = _kept_key(path)
    async with database.transaction() as conn:
        key_id = credentials.partner_key_id(kept) if kept is not None else None
        if (
            kept is not None
            and key_id is not None
            and await partners.key_is_live(conn, key_id, partner_id, credentials.hash_secret(kept))
        ):
            key, issued = kept, False
        else:
            new = credentials.new_partner_key()
            await partners.insert_key(conn, new.key_id, partner_id, new.secret_hash)
            key, key_id, issued = new.secret, new.key_id, True
        revoked = await partners.revoke_keys_except(conn, partner_id, key_id)
        if issued:
            _keep(path, key)  # before the commit: a key is never live without its file
    return DemoKey(key, key_id, issued, revoked)
