"""Encryption at rest: a dump reveals no contact value and no reason; rotation and backfill by `data-key reencrypt`."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
import harness
import pytest
from appointments.type.v1.contact_pb2 import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_NAME,
    CONTACT_FIELD_PHONE,
    CONTACT_FIELD_SEX,
)
from google.protobuf.duration_pb2 import Duration
from harness import MONDAY, PartnerHandle, World

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets, warn_about_unsealed_values
from service.crypto import sealing
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

ALL = [CONTACT_FIELD_NAME, CONTACT_FIELD_SEX, CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]
SEALED = {
    "patients": ("sealed_given_name", "sealed_family_name", "sealed_sex", "sealed_phone", "sealed_email"),
    "appointments": ("sealed_reason",),
    "consent_requests": ("sealed_purpose", "sealed_message"),
}


@dataclass
class Seeded:
    """Patients and appointments created through the internal API, and a partner granted their practitioner."""

    practitioner: str
    partner: PartnerHandle
    patients: list[Any]
    reasons: list[str]
    appointment_ids: dict[str, str]  # patient id → the partner's id of that patient's appointment

    @property
    def secrets(self) -> list[str]:
        """Every personal value seeded: none may appear in clear in the database."""
        values = list(self.reasons)
        for p in self.patients:
            values += [p.given_name, p.family_name, p.phone, p.email]
        return [v for v in values if v]


async def _seed(world: World, count: int = 3) -> Seeded:
    practitioner = await world.practitioner()
    partner = await world.partner("Agenda", practitioner)
    patients, reasons = [], []
    for n in range(count):
        patient = await world.patient(family_name=f"QUARTZLEAK-Family-{n}", email=f"quartz.leak.{n}@example.invalid")
        reason = f"QUARTZLEAK-REASON-{n} recurring migraine"
        await world.appointment(practitioner, patient.patient_id, MONDAY + timedelta(hours=n), reason=reason)
        patients.append(patient)
        reasons.append(reason)
    listed = await partner.list_all()  # in start time order: one appointment per patient, an hour apart
    appointment_ids = {p.patient_id: a.appointment_id for p, a in zip(patients, listed, strict=True)}
    return Seeded(practitioner, partner, patients, reasons, appointment_ids)


async def _disclose_everything(world: World, seeded: Seeded) -> None:
    """Fill the ledger, the consents and the change feed the way real traffic does."""
    for patient in seeded.patients:
        token = (await world.consent(patient.patient_id, seeded.partner.partner_id, ALL)).token
        contact = await seeded.partner.contact(seeded.appointment_ids[patient.patient_id], token)
        assert contact.patient.email == patient.email


async def _dump_by_copy(dsn: str) -> str:
    """Every table of the schema, as pg_dump reads it (COPY … TO STDOUT) and as SELECT * shows it."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
        ]
        assert {"patients", "appointments", "appointment_changes", "disclosures", "consents"} <= set(tables)
        copied = io.BytesIO()
        for table in tables:
            await conn.copy_from_table(table, output=copied)
        selected = [await conn.fetch(f'SELECT * FROM "{table}"') for table in tables]
    finally:
        await conn.close()
    return copied.getvalue().decode() + "\n" + repr(selected)


def _leaks(dump: str, values: list[str]) -> list[str]:
    """The values found in ``dump``: as text, in any case, or as the hex of their bytes (bytea output)."""
    lowered = dump.lower()
    return [v for v in values if v.lower() in lowered or v.encode().hex() in lowered]


async def test_a_dump_of_the_database_shows_no_name_phone_email_or_reason(world: World, database_dsn: str) -> None:
    seeded = await _seed(world)
    await _disclose_everything(world, seeded)

    dump = await _dump_by_copy(database_dsn)

    assert len(seeded.secrets) == 15
    assert _leaks(dump, seeded.secrets) == []
    # The check can fail: the same dump shows what is stored in clear (the ids, the practitioner).
    assert seeded.patients[0].patient_id in dump


def _pg_dump_binary(server_major: int) -> str | None:
    candidates = [shutil.which("pg_dump")]
    try:
        import pgserver  # the embedded server's own tools

        candidates.insert(0, str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"))
    except ImportError:  # pragma: no cover
        pass
    for candidate in candidates:
        if not candidate or not Path(candidate).exists():
            continue
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"(\d+)\.\d+", version)
        if found and int(found[1]) >= server_major:
            return candidate
    return None


async def _pg_dump(database_dsn: str, *args: str) -> str:
    """The output of ``pg_dump --data-only`` with ``args``; skips the test where no pg_dump can read the server."""
    conn = await asyncpg.connect(database_dsn)
    try:
        server_major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
    binary = _pg_dump_binary(server_major)
    if binary is None:
        pytest.skip(f"no pg_dump for PostgreSQL {server_major} here (the COPY dump test still runs)")
    process = await asyncio.create_subprocess_exec(
        binary,
        "--data-only",
        "--enable-row-security",
        *args,
        "--dbname",
        database_dsn,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_pg_dump_itself_finds_no_contact_value_or_reason(world: World, database_dsn: str) -> None:
    seeded = await _seed(world, count=2)
    await _disclose_everything(world, seeded)

    dump = await _pg_dump(database_dsn)

    assert "COPY public.patients" in dump and "COPY public.appointments" in dump
    assert _leaks(dump, seeded.secrets) == []


def _copied_rows(dump: str, table: str) -> list[dict[str, str]]:
    """The rows of ``table`` in a pg_dump, each column's text by name (``\\N`` for NULL)."""
    header = re.search(rf"^COPY public\.{table} \((.*)\) FROM stdin;$", dump, re.MULTILINE)
    assert header is not None, f"no COPY of {table} in the dump"
    columns = header[1].split(", ")
    lines = dump[header.end() + 1 :].split("\n\\.\n", 1)[0].splitlines()
    return [dict(zip(columns, line.split("\t"), strict=True)) for line in lines]


async def test_a_patients_sex_is_stored_sealed_and_released_only_under_a_consent_for_it(
    world: World, database_dsn: str, data_keys: DataKeyring
) -> None:
    seeded = await _seed(world, count=3)
    first, second, third = seeded.patients
    assert sorted(p.sex for p in seeded.patients) == [1, 2, 3]
    conn = await asyncpg.connect(database_dsn)
    try:
        stored = {str(r["id"]): r for r in await conn.fetch("SELECT id, sex, sealed_sex FROM patients")}
    finally:
        await conn.close()
    dump = await _pg_dump(database_dsn, "--table", "public.patients")
    with_sex = (await world.consent(first.patient_id, seeded.partner.partner_id, ALL)).token
    without = [CONTACT_FIELD_NAME, CONTACT_FIELD_PHONE, CONTACT_FIELD_EMAIL]
    without_sex = (await world.consent(second.patient_id, seeded.partner.partner_id, without)).token

    released = await seeded.partner.contact(seeded.appointment_ids[first.patient_id], with_sex)
    withheld = await seeded.partner.contact(seeded.appointment_ids[second.patient_id], without_sex)

    # No sex in clear: the column is NULL, the sealed value opens to the enum number for its own row and column only.
    assert [stored[p.patient_id]["sex"] for p in seeded.patients] == [None] * 3
    for patient, other in ((first, second), (second, third), (third, first)):
        sealed, row_id = stored[patient.patient_id]["sealed_sex"], harness.uuid_of(patient.patient_id)
        assert data_keys.open(sealed, table="patients", column="sex", row_id=row_id) == str(patient.sex)
        with pytest.raises(sealing.SealError):  # under another row
            data_keys.open(sealed, table="patients", column="sex", row_id=harness.uuid_of(other.patient_id))
        with pytest.raises(sealing.SealError):  # under another column
            data_keys.open(sealed, table="patients", column="given_name", row_id=row_id)
    assert len({len(stored[p.patient_id]["sealed_sex"]) for p in seeded.patients}) == 1  # the length tells nothing
    # pg_dump shows no sex value: the clear column is NULL in every row it copies.
    rows = _copied_rows(dump, "patients")
    assert sorted(r["id"] for r in rows) == sorted(p.patient_id for p in seeded.patients)
    assert {r["sex"] for r in rows} == {"\\N"}
    assert all(r["sealed_sex"] != "\\N" for r in rows)
    # The contact view still shows the sex under a consent that covers it, and withholds it otherwise.
    assert released.patient.HasField("sex") and released.patient.sex == first.sex
    assert not withheld.patient.HasField("sex") and list(withheld.withheld_fields) == [CONTACT_FIELD_SEX]
    assert withheld.patient.email == second.email


async def test_the_contact_view_still_shows_exactly_the_consented_values(world: World) -> None:
    seeded = await _seed(world, count=2)
    first, second = seeded.patients
    full = (await world.consent(first.patient_id, seeded.partner.partner_id, ALL)).token
    phone_only = (await world.consent(second.patient_id, seeded.partner.partner_id, [CONTACT_FIELD_PHONE])).token

    contact = await seeded.partner.contact(seeded.appointment_ids[first.patient_id], full)
    partial = await seeded.partner.contact(seeded.appointment_ids[second.patient_id], phone_only)

    assert (contact.patient.given_name, contact.patient.family_name) == (first.given_name, first.family_name)
    assert (contact.patient.phone, contact.patient.email, contact.patient.sex) == (first.phone, first.email, first.sex)
    assert partial.patient.phone == second.phone
    assert not partial.patient.given_name and not partial.patient.email


@pytest.mark.parametrize(
    "statement",
    [
        *(f"SELECT {column} FROM {table}" for table, columns in SEALED.items() for column in columns),
        "SELECT * FROM patients",
        "UPDATE patients SET sealed_email = NULL",
        "UPDATE appointments SET sealed_reason = NULL",
    ],
)
async def test_the_partner_role_cannot_touch_sealed_columns(database_dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(database_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE apptgate_partner")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


# --- rotation and backfill: `python -m service data-key …` ---------------------------------------------------------


async def _data_key(database_dsn: str, tmp_path: Path, data_key: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "data-key",
        *args,
        env=harness.environment(
            DATABASE_URL=database_dsn, APPTGATE_DATA_DIR=str(tmp_path / "cli-data"), APPTGATE_DATA_KEY=data_key
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    assert data_key.split(":", 1)[1][:12] not in out.decode() + err.decode()
    return process.returncode, out.decode(), err.decode()


@asynccontextmanager
async def _running(settings: Settings, database: Database, secrets: Secrets) -> AsyncIterator[World]:
    gateway = Gateway(replace(settings), database, secrets)
    async with harness.serving(gateway) as world:
        yield world


def _on(world: World, partner: PartnerHandle) -> PartnerHandle:
    return replace(partner, stub=harness.partner_grpc.PartnerAppointmentServiceStub(world.partner_channel))


async def _key_ids_stored(database_dsn: str) -> dict[int, int]:
    """Data key id → number of sealed values, read straight from the tables."""
    conn = await asyncpg.connect(database_dsn)
    try:
        found: dict[int, int] = {}
        for table, columns in SEALED.items():
            for column in columns:
                for value in await conn.fetch(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"):
                    key_id = sealing.key_id_of(value[0])
                    found[key_id] = found.get(key_id, 0) + 1
        return found
    finally:
        await conn.close()


async def test_reencrypt_moves_every_value_to_the_new_key_so_the_old_one_can_be_retired(
    settings: Settings, database: Database, database_dsn: str, keyring: ConsentKeyring, tmp_path: Path
) -> None:
    k1, k2, secret = os.urandom(32), os.urandom(32), os.urandom(32)
    async with _running(settings, database, Secrets(secret, keyring, DataKeyring([(1, k1)]))) as world:
        seeded = await _seed(world, count=3)
        first = seeded.patients[0]
        token = (await world.consent(first.patient_id, seeded.partner.partner_id, ALL)).token
        asked = await seeded.partner.stub.RequestContactAccess(
            harness.partner_pb.RequestContactAccessRequest(
                appointment_id=seeded.appointment_ids[first.patient_id],
                fields=ALL[:1],
                purpose="QUARTZLEAK-PURPOSE reminders",
                message="QUARTZLEAK-MESSAGE hello",
                ttl=Duration(seconds=3600),
            ),
            metadata=seeded.partner.metadata,
        )
    assert await _key_ids_stored(database_dsn) == {1: 20}

    code, out, err = await _data_key(
        database_dsn, tmp_path, harness.data_key_text((2, k2), (1, k1)), "reencrypt", "--batch-size", "2"
    )

    assert code == 0, err
    assert "patients: 15 values re-sealed under data key 2, 0 sealed from clear (3 rows)" in out
    assert "appointments: 3 values re-sealed under data key 2, 0 sealed from clear (3 rows)" in out
    assert "consent_requests: 2 values re-sealed under data key 2, 0 sealed from clear (1 rows)" in out
    assert "patients: done" in err
    assert await _key_ids_stored(database_dsn) == {2: 20}

    code, out, _ = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, k2), (1, k1)), "status")
    assert code == 0
    assert "data key 2: 20 values  (active)" in out and "data key 1: 0 values" in out
    assert "in clear: 0 values" in out and "nothing to re-encrypt" in out

    code, out, _ = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, k2), (1, k1)), "reencrypt")
    assert code == 0
    assert "patients: 0 values re-sealed under data key 2, 0 sealed from clear (0 rows)" in out  # idempotent

    async with _running(settings, database, Secrets(secret, keyring, DataKeyring([(2, k2)]))) as world:
        contact = await _on(world, seeded.partner).contact(seeded.appointment_ids[first.patient_id], token)
        request = await _on(world, seeded.partner).stub.GetConsentRequest(
            harness.partner_pb.GetConsentRequestRequest(consent_request_id=asked.consent_request_id),
            metadata=seeded.partner.metadata,
        )
    assert request.purpose == "QUARTZLEAK-PURPOSE reminders"
    assert (contact.patient.given_name, contact.patient.sex, contact.patient.phone, contact.patient.email) == (
        first.given_name,
        first.sex,
        first.phone,
        first.email,
    )


async def test_reencrypt_refuses_to_start_without_a_key_still_in_use(
    settings: Settings, database: Database, database_dsn: str, keyring: ConsentKeyring, tmp_path: Path
) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    async with _running(settings, database, Secrets(os.urandom(32), keyring, DataKeyring([(1, k1)]))) as world:
        await _seed(world, count=1)

    code, out, err = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, k2)), "reencrypt")

    assert code == 1
    assert "data key(s) 1, which the configuration lacks" in err
    assert await _key_ids_stored(database_dsn) == {1: 6}
    code, out, _ = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, k2)), "status")
    assert "data key 1: 6 values  (NOT CONFIGURED: these values cannot be opened)" in out


async def test_reencrypt_seals_what_a_database_from_before_the_upgrade_holds_in_clear(
    settings: Settings,
    database: Database,
    database_dsn: str,
    keyring: ConsentKeyring,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    k1 = os.urandom(32)
    keys = DataKeyring([(1, k1)])
    clear = {
        "given_name": "Backfillgiven",
        "family_name": "BACKFILL-Family",
        "phone": "+33611112222",
        "email": "backfill.leak@example.invalid",
    }
    reason = "BACKFILL-REASON sprained ankle"
    async with _running(settings, database, Secrets(os.urandom(32), keyring, keys)) as world:
        practitioner = await world.practitioner()
        partner = await world.partner("Agenda", practitioner)
        conn = await asyncpg.connect(database_dsn)
        try:  # rows as a version before migration 0009 wrote them
            patient_id = await conn.fetchval(
                "INSERT INTO patients (given_name, family_name, sex, phone, email) VALUES ($1, $2, 2, $3, $4) "
                "RETURNING id",
                *clear.values(),
            )
            no_phone = await conn.fetchval(
                "INSERT INTO patients (given_name, family_name) VALUES ('Nophonegiven', 'NOPHONE-Family') RETURNING id"
            )
            await conn.execute(
                "INSERT INTO appointments (practitioner_id, patient_id, start_time, end_time, reason) "
                "VALUES ($1, $2, $3::timestamptz, $3::timestamptz + interval '30 minutes', $4)",
                harness.uuid_of(practitioner),
                patient_id,
                MONDAY,
                reason,
            )
        finally:
            await conn.close()
        [listed] = await partner.list_all()
        token = (await world.consent(str(patient_id), partner.partner_id, ALL)).token
        before = await partner.contact(listed.appointment_id, token)  # still readable before the backfill
        assert _leaks(await _dump_by_copy(database_dsn), [clear["phone"], reason]) == [clear["phone"], reason]

        with caplog.at_level(logging.WARNING, logger="service.app"):
            await warn_about_unsealed_values(database, keys)
        assert "still stored in clear: run `python -m service data-key reencrypt`" in caplog.text
        code, out, _ = await _data_key(database_dsn, tmp_path, harness.data_key_text((1, k1)), "status")
        assert (
            "in clear: 8 values" in out and "patients.phone: 0 under the active key, 0 under others, 1 in clear" in out
        )
        assert "patients.sex: 0 under the active key, 0 under others, 1 in clear" in out

        code, out, err = await _data_key(database_dsn, tmp_path, harness.data_key_text((1, k1)), "reencrypt")

        assert code == 0, err
        assert "patients: 0 values re-sealed under data key 1, 7 sealed from clear (2 rows)" in out
        assert "appointments: 0 values re-sealed under data key 1, 1 sealed from clear (1 rows)" in out
        after = await partner.contact(listed.appointment_id, token)

    assert before == after
    assert (after.patient.given_name, after.patient.sex, after.patient.phone, after.patient.email) == (
        clear["given_name"],
        2,
        clear["phone"],
        clear["email"],
    )
    conn = await asyncpg.connect(database_dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM patients WHERE id = $1", patient_id)
        assert [row[c] for c in clear] == [None] * 4
        assert all(row[f"sealed_{c}"] is not None for c in clear)
        # The imported sex too: sealed as its enum number's text, its clear column cleared.
        assert row["sex"] is None
        assert keys.open(row["sealed_sex"], table="patients", column="sex", row_id=patient_id) == "2"
        row = await conn.fetchrow(
            "SELECT phone, sealed_phone, sex, sealed_sex, sealed_given_name FROM patients WHERE id = $1", no_phone
        )
        assert row["phone"] is None and row["sealed_phone"] is None and row["sealed_given_name"] is not None
        assert row["sex"] is None and row["sealed_sex"] is None  # no sex imported, none sealed
        assert await conn.fetchval("SELECT count(*) FROM appointments WHERE reason IS NOT NULL") == 0
    finally:
        await conn.close()
    assert _leaks(await _dump_by_copy(database_dsn), [*clear.values(), reason, "Nophonegiven"]) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.app"):
        await warn_about_unsealed_values(database, keys)
    assert caplog.text == ""


async def test_a_value_copied_to_another_row_does_not_open_and_answers_internal(
    world: World, database_dsn: str
) -> None:
    seeded = await _seed(world, count=2)
    first, second = seeded.patients
    conn = await asyncpg.connect(database_dsn)
    try:  # an attacker with write access swaps in another patient's sealed email
        await conn.execute(
            "UPDATE patients SET sealed_email = (SELECT sealed_email FROM patients WHERE id = $1) WHERE id = $2",
            harness.uuid_of(first.patient_id),
            harness.uuid_of(second.patient_id),
        )
    finally:
        await conn.close()
    token = (await world.consent(second.patient_id, seeded.partner.partner_id, [CONTACT_FIELD_EMAIL])).token

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await seeded.partner.contact(seeded.appointment_ids[second.patient_id], token)

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert first.email not in str(caught.value.details())


# --- a wrong data key under a known id: refused at start, by `data-key status` and before `data-key reencrypt` -------


def _serve_env(database_dsn: str, tmp_path: Path, data_key: str, **extra: str) -> dict[str, str]:
    return harness.environment(
        **{
            "DATABASE_URL": database_dsn,
            "APPTGATE_DATA_DIR": str(tmp_path / "serve-data"),
            "APPTGATE_DATA_KEY": data_key,
            "APPTGATE_INTERNAL_TOKEN": harness.INTERNAL_TOKEN,
            "APPTGATE_PARTNER_ADDR": f"127.0.0.1:{harness.free_port()}",
            "APPTGATE_INTERNAL_ADDR": f"127.0.0.1:{harness.free_port()}",
            "APPTGATE_WORKERS": "1",
            **extra,
        }
    )


async def _serve_until_refused(env: dict[str, str]) -> tuple[int, str]:
    """Run ``serve``, which is expected to exit on its own (refusing to start); return its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout=90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def _serve_then_stop(env: dict[str, str]) -> None:
    """Run ``serve`` until both listeners accept connections, then stop it with SIGTERM; it must exit 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", env=env, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for variable in ("APPTGATE_PARTNER_ADDR", "APPTGATE_INTERNAL_ADDR"):
            await harness.wait_for_port(int(env[variable].rsplit(":", 1)[1]), within=60)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _recorded_checks(database_dsn: str) -> dict[int, bytes]:
    conn = await asyncpg.connect(database_dsn)
    try:
        return {r["key_id"]: r["check_value"] for r in await conn.fetch("SELECT * FROM data_key_checks")}
    finally:
        await conn.close()


def _wrong_key_line(key_id: int) -> str:
    return (
        f"apptgate: data key {key_id} is not the key this database recorded under id {key_id} (their check values "
        f"differ): configure the original key {key_id}; a new key takes a new id"
    )


async def test_the_first_start_records_a_check_value_and_then_a_wrong_key_under_that_id_is_refused_everywhere(
    settings: Settings, database: Database, database_dsn: str, keyring: ConsentKeyring, tmp_path: Path
) -> None:
    k1, wrong, k2 = os.urandom(32), os.urandom(32), os.urandom(32)
    async with _running(settings, database, Secrets(os.urandom(32), keyring, DataKeyring([(1, k1)]))) as world:
        await _seed(world, count=1)
    assert await _recorded_checks(database_dsn) == {}  # sealing alone records nothing; a start does

    await _serve_then_stop(_serve_env(database_dsn, tmp_path, harness.data_key_text((1, k1))))

    assert await _recorded_checks(database_dsn) == {1: sealing.key_check(k1)}
    assert k1[:8] not in sealing.key_check(k1)
    wrong_text = harness.data_key_text((1, wrong))
    code, err = await _serve_until_refused(_serve_env(database_dsn, tmp_path, wrong_text))
    assert (code, err.strip()) == (2, _wrong_key_line(1))  # the one line; the development keys were made already
    code, out, err = await _data_key(database_dsn, tmp_path, wrong_text, "status")
    assert (code, out, err.strip()) == (2, "", _wrong_key_line(1))
    code, out, err = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, k2), (1, wrong)), "reencrypt")
    assert (code, out, err.strip()) == (2, "", _wrong_key_line(1))
    # Nothing was re-sealed, and key 2 was not recorded by the refused run: it may still come with the right key 1.
    assert await _key_ids_stored(database_dsn) == {1: 6}
    assert await _recorded_checks(database_dsn) == {1: sealing.key_check(k1)}
    # Several workers: each refuses, and the supervisor does not serve either.
    supervised = _serve_env(database_dsn, tmp_path, wrong_text, APPTGATE_WORKERS="2")
    code, err = await _serve_until_refused(supervised)
    assert code != 0 and _wrong_key_line(1) in err and "Traceback" not in err

    code, _, err = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, k2), (1, k1)), "reencrypt")
    assert code == 0, err
    assert await _recorded_checks(database_dsn) == {1: sealing.key_check(k1), 2: sealing.key_check(k2)}


async def test_a_wrong_key_is_refused_before_its_id_has_a_check_value_by_the_values_it_does_not_open(
    settings: Settings, database: Database, database_dsn: str, keyring: ConsentKeyring, tmp_path: Path
) -> None:
    k1, wrong = os.urandom(32), os.urandom(32)
    async with _running(settings, database, Secrets(os.urandom(32), keyring, DataKeyring([(1, k1)]))) as world:
        seeded = await _seed(world, count=1)
    patient_id = seeded.patients[0].patient_id
    wrong_text = harness.data_key_text((1, wrong))
    expected = (
        f"apptgate: data key 1 opens none of the values sealed under id 1 that it was tried on (patients {patient_id}: "
        "given_name, family_name, sex, phone, email): configure the key that sealed them under id 1"
    )

    status = await _data_key(database_dsn, tmp_path, wrong_text, "status")
    reencrypt = await _data_key(database_dsn, tmp_path, wrong_text, "reencrypt")
    served = await _serve_until_refused(_serve_env(database_dsn, tmp_path, wrong_text))

    assert (status[0], status[2].strip()) == (2, expected)
    assert (reencrypt[0], reencrypt[2].strip()) == (2, expected)
    # serve logs (JSON) its development keys first; the refusal is its last line.
    assert (served[0], served[1].strip().splitlines()[-1]) == (2, expected)
    assert "Traceback" not in served[1]
    assert await _recorded_checks(database_dsn) == {}  # the wrong key was not recorded
    code, out, err = await _data_key(database_dsn, tmp_path, harness.data_key_text((1, k1)), "status")
    assert code == 0, err
    assert "opened one row per data key and table (keys 1): 0 values do not open" in out


async def test_status_exits_1_when_a_value_does_not_open_or_its_key_is_not_configured(
    settings: Settings, database: Database, database_dsn: str, keyring: ConsentKeyring, tmp_path: Path
) -> None:
    key = os.urandom(32)
    async with _running(settings, database, Secrets(os.urandom(32), keyring, DataKeyring([(1, key)]))) as world:
        seeded = await _seed(world, count=2)
    first, second = (harness.uuid_of(p.patient_id) for p in seeded.patients)
    key_text = harness.data_key_text((1, key))
    code, out, err = await _data_key(database_dsn, tmp_path, key_text, "status", "--open-all")
    assert (code, err) == (0, "")
    assert "opened every sealed value: 0 do not open" in out
    conn = await asyncpg.connect(database_dsn)
    try:  # someone with write access swaps two patients' sealed emails: each opens for its own row only
        await conn.execute(
            "UPDATE patients p SET sealed_email = o.sealed_email FROM patients o WHERE p.id = $1 AND o.id = $2 "
            "OR p.id = $2 AND o.id = $1",
            first,
            second,
        )
    finally:
        await conn.close()

    sampled = await _data_key(database_dsn, tmp_path, key_text, "status")
    scanned = await _data_key(database_dsn, tmp_path, key_text, "status", "--open-all")
    unconfigured = await _data_key(database_dsn, tmp_path, harness.data_key_text((2, os.urandom(32))), "status")

    assert sampled[0] == 1
    assert re.fullmatch(r"apptgate: patients \S+ email: the sealed value does not open\n", sampled[2])
    assert scanned[0] == 1
    assert sorted(scanned[2].splitlines()) == sorted(
        f"apptgate: patients {row} email: the sealed value does not open" for row in (first, second)
    )
    assert unconfigured[0] == 1
    assert (
        "apptgate: 12 values are sealed under data key 1, which is not configured: they cannot be opened; add the "
        "key after the active one" in unconfigured[2]
    )
