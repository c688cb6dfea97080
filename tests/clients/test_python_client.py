"""The Python client (clients/python, package ``apptgate_client``) against a real gateway.

Every call goes over a real channel to a real :class:`~service.app.Gateway`
(or to a real socket that never answers): no grpc mocks. The gateway runs in
the test's event loop, so the blocking client is driven from a worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apptgate_client
import harness
import pytest
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_NAME, CONTACT_FIELD_PHONE, CONTACT_FIELD_SEX
from apptgate_client import (
    AsyncInternalClient,
    AsyncPartnerClient,
    ConsentDenied,
    DeadlineExceeded,
    InternalClient,
    InvalidArgument,
    NotFound,
    PartnerClient,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from client_world import WEEK_END, WEEK_START, Agenda, DatabaseProxy

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "python"
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=0.2)


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking client call off the event loop that serves the gateway."""
    return await asyncio.to_thread(fn)


@pytest.fixture
def client(partner_target: str, agenda: Agenda) -> Iterator[PartnerClient]:
    with PartnerClient(partner_target, agenda.partner.secret, timeout=5) as c:
        yield c


@pytest.fixture
async def aclient(partner_target: str, agenda: Agenda) -> AsyncIterator[AsyncPartnerClient]:
    async with AsyncPartnerClient(partner_target, agenda.partner.secret, timeout=5) as c:
        yield c


#: Channel arguments for a client of the silent port: a subchannel of its own. gRPC otherwise shares
#: subchannels between channels of the same target and arguments, and the port (an ephemeral one)
#: can be one an earlier test's client connected to: its stale subchannel, reset when that test's
#: socket closed, then fails the call at once with UNAVAILABLE (seen under load, and reproduced).
OWN_SUBCHANNEL = (("grpc.use_local_subchannel_pool", 1),)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server); see OWN_SUBCHANNEL."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def week(**kwargs: Any) -> dict[str, Any]:
    return {"start_time": WEEK_START, "end_time": WEEK_END, **kwargs}


# Paging


async def test_iter_appointments_walks_every_page_in_order(client: PartnerClient, agenda: Agenda) -> None:
    first = await in_thread(lambda: client.list_appointments(**week(page_size=3)))
    assert len(first.appointments) == 3
    assert first.next_page_token

    seen = await in_thread(lambda: list(client.iter_appointments(**week(page_size=3))))

    expected = await agenda.partner.list_all(page_size=500, start_time=harness.ts(WEEK_START))
    assert [a.appointment_id for a in seen] == [a.appointment_id for a in expected]
    assert len({a.appointment_id for a in seen}) == agenda.appointment_count  # 3 pages, no gap, no repeat
    starts = [a.start_time.ToDatetime() for a in seen]
    assert starts == sorted(starts)
    assert {a.practitioner.practitioner_id for a in seen} == {agenda.practitioner_id}


async def test_async_client_walks_every_page(aclient: AsyncPartnerClient, agenda: Agenda) -> None:
    seen = [a async for a in aclient.iter_appointments(**week(page_size=2))]
    assert len({a.appointment_id for a in seen}) == agenda.appointment_count
    one = await aclient.get_appointment(seen[0].appointment_id)
    assert one == seen[0]


async def test_iter_appointments_filters_by_practitioner(client: PartnerClient, agenda: Agenda) -> None:
    seen = await in_thread(lambda: list(client.iter_appointments(**week(practitioner_id=agenda.practitioner_id))))
    assert len(seen) == agenda.appointment_count
    with pytest.raises(NotFound) as caught:
        await in_thread(lambda: list(client.iter_appointments(**week(practitioner_id=agenda.hidden_practitioner_id))))
    assert caught.value.reason == "NOT_FOUND"


# Contact, only with a consent token


@pytest.mark.parametrize("client_class", [PartnerClient, AsyncPartnerClient])
def test_contact_needs_an_explicit_consent_token(client_class: type) -> None:
    token = inspect.signature(client_class.get_appointment_contact).parameters["consent_token"]
    assert token.default is inspect.Parameter.empty  # required: no way to ask for contact details without one


async def _consented_appointment_id(client: AsyncPartnerClient) -> tuple[str, str]:
    """The id of the first appointment of the week (booked for the consented patient) and a foreign one."""
    seen = [a async for a in client.iter_appointments(**week())]
    other = next(a for a in seen if a.patient_ref != seen[0].patient_ref)
    return seen[0].appointment_id, other.appointment_id


async def test_contact_with_a_token_sets_exactly_the_consented_fields(
    aclient: AsyncPartnerClient, agenda: Agenda
) -> None:
    appointment_id, _ = await _consented_appointment_id(aclient)
    contact = await aclient.get_appointment_contact(appointment_id, agenda.consent_token)
    assert contact.appointment_id == appointment_id
    assert contact.patient.HasField("given_name") and contact.patient.HasField("email")
    assert contact.patient.email.startswith("leakcheck.")
    assert not contact.patient.HasField("phone") and not contact.patient.HasField("sex")
    assert list(contact.withheld_fields) == [CONTACT_FIELD_SEX, CONTACT_FIELD_PHONE]


async def test_sync_contact_with_a_token(client: PartnerClient, aclient: AsyncPartnerClient, agenda: Agenda) -> None:
    appointment_id, _ = await _consented_appointment_id(aclient)
    contact = await in_thread(lambda: client.get_appointment_contact(appointment_id, agenda.consent_token))
    assert contact.patient.family_name.startswith("LEAKCHECK-Family-")
    assert CONTACT_FIELD_NAME not in contact.withheld_fields


async def test_consent_denials_raise_consent_denied_with_their_reason(
    aclient: AsyncPartnerClient, internal_target: str, agenda: Agenda
) -> None:
    appointment_id, foreign_id = await _consented_appointment_id(aclient)
    cases = [
        (appointment_id, "", "CONSENT_REQUIRED"),
        (appointment_id, agenda.consent_token[:-2] + "AA", "CONSENT_INVALID"),
        (foreign_id, agenda.consent_token, "CONSENT_INVALID"),  # another patient's appointment
    ]
    for target_id, token, reason in cases:
        with pytest.raises(ConsentDenied) as caught:
            await aclient.get_appointment_contact(target_id, token)
        assert caught.value.reason == reason
        assert caught.value.domain == "apptgate.dev"
        assert caught.value.code.name == "PERMISSION_DENIED"

    async with AsyncInternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
        revoked = await internal.revoke_consent(agenda.consent_id)
    assert revoked.HasField("revoke_time")
    with pytest.raises(ConsentDenied) as caught:
        await aclient.get_appointment_contact(appointment_id, agenda.consent_token)
    assert caught.value.reason == "CONSENT_REVOKED"


# Typed errors


async def test_typed_errors_carry_code_reason_and_fields(
    client: PartnerClient, partner_target: str, agenda: Agenda
) -> None:
    with pytest.raises(NotFound) as not_found:
        await in_thread(lambda: client.get_appointment("apt_" + "a" * 26))
    assert (not_found.value.reason, not_found.value.attempts) == ("NOT_FOUND", 1)
    assert isinstance(not_found.value.__cause__, Exception)  # the grpc error, kept as the cause

    with pytest.raises(InvalidArgument) as bad:
        await in_thread(lambda: client.list_appointments(**week(page_size=-1)))
    assert bad.value.fields == ("page_size",)
    assert bad.value.field_violations[0].description

    with pytest.raises(InvalidArgument) as bad_token:
        await in_thread(lambda: client.list_appointments(**week(page_token="not-a-token")))
    assert bad_token.value.reason == "INVALID_PAGE_TOKEN"
    assert bad_token.value.fields == ("page_token",)

    stranger_key = "pk_" + "a" * 16 + "." + "b" * 43
    with PartnerClient(partner_target, stranger_key) as stranger, pytest.raises(Unauthenticated) as unknown:
        await in_thread(lambda: stranger.list_consent_keys())
    assert unknown.value.reason == "INVALID_CREDENTIALS"
    assert stranger_key not in str(unknown.value) and stranger_key not in repr(stranger)


def test_client_side_mistakes_fail_before_any_call(partner_target: str) -> None:
    with pytest.raises(ValueError, match="key"):
        PartnerClient(partner_target, "")
    with pytest.raises(ValueError, match="key"):
        PartnerClient(partner_target, "pk_x.y\nz")
    with pytest.raises(ValueError, match="timeout"):
        PartnerClient(partner_target, "pk_x.y", timeout=0)
    with PartnerClient(partner_target, "pk_x.y") as client, pytest.raises(ValueError, match="timezone-aware"):
        client.list_appointments(start_time=datetime(2030, 1, 1), end_time=datetime(2030, 1, 2))


# Deadlines


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.list_appointments(**week()),
        lambda c: next(c.iter_appointments(**week())),
        lambda c: c.get_appointment("apt_" + "a" * 26),
        lambda c: c.get_appointment_contact("apt_" + "a" * 26, "token"),
        lambda c: c.list_consent_keys(),
    ],
    ids=["list", "iter", "get", "contact", "keys"],
)
def test_every_call_has_the_default_deadline(silent_port: int, call: Callable[[PartnerClient], Any]) -> None:
    # Without a deadline, a call to a server that never answers would wait for the
    # channel's 20 s connect timeout and then be retried.
    with PartnerClient(f"127.0.0.1:{silent_port}", "pk_x.y", timeout=0.3, options=OWN_SUBCHANNEL) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            call(client)
    assert time.monotonic() - started < 2.0
    assert caught.value.attempts == 1


def test_a_per_call_timeout_overrides_the_default(silent_port: int) -> None:
    assert apptgate_client.DEFAULT_TIMEOUT == 10
    with PartnerClient(f"127.0.0.1:{silent_port}", "pk_x.y", options=OWN_SUBCHANNEL) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.list_consent_keys(timeout=0.2)
    assert time.monotonic() - started < 1.5


async def test_async_calls_have_the_default_deadline(silent_port: int) -> None:
    async with AsyncPartnerClient(f"127.0.0.1:{silent_port}", "pk_x.y", timeout=0.3, options=OWN_SUBCHANNEL) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.get_appointment("apt_" + "a" * 26)
    assert time.monotonic() - started < 2.0


# Retries


def test_unavailable_is_retried_with_backoff_then_raised() -> None:
    with PartnerClient(f"127.0.0.1:{harness.free_port()}", "pk_x.y", retry=FAST_RETRY) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            client.list_consent_keys()
        elapsed = time.monotonic() - started
    assert caught.value.attempts == FAST_RETRY.max_attempts
    assert elapsed < FAST_RETRY.budget() + 1.0  # 0.05 + 0.1 + 0.2 of jittered waits, plus connection attempts


def test_a_retry_never_outlasts_the_deadline() -> None:
    slow = RetryPolicy(max_attempts=10, initial_backoff=1.0, max_backoff=1.0)
    with PartnerClient(f"127.0.0.1:{harness.free_port()}", "pk_x.y", retry=slow, timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            client.list_consent_keys()
    assert time.monotonic() - started < 0.9
    assert caught.value.attempts < slow.max_attempts


async def test_internal_writes_are_not_retried_but_reads_are() -> None:
    async with AsyncInternalClient(f"127.0.0.1:{harness.free_port()}", harness.INTERNAL_TOKEN, retry=FAST_RETRY) as c:
        with pytest.raises(Unavailable) as write:
            await c.create_practitioner("Dr. Retry", "Cardiology")
        with pytest.raises(Unavailable) as read:
            await c.list_consents("00000000-0000-0000-0000-000000000000")
    assert write.value.attempts == 1
    assert read.value.attempts == FAST_RETRY.max_attempts


def retried(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether the client logged a retry of a failed attempt."""
    return any(r.name == "apptgate_client" and "retrying in" in r.getMessage() for r in caplog.records)


async def test_retries_reach_a_server_that_comes_up_late(
    settings: Settings,
    database: Database,
    keyring: ConsentKeyring,
    data_keys: DataKeyring,
    agenda: Agenda,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="apptgate_client")
    port = harness.free_port()
    patient = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.2)
    client = PartnerClient(f"127.0.0.1:{port}", agenda.partner.secret, retry=patient, timeout=8)
    late = Gateway(
        replace(settings, partner_addr=f"127.0.0.1:{port}", internal_addr="127.0.0.1:0"),
        database,
        Secrets(os.urandom(32), keyring, data_keys),
    )
    try:
        call = asyncio.create_task(in_thread(client.list_consent_keys))
        # An attempt failed while nothing listens, and the client retries (it logs each retry).
        assert await harness.eventually(lambda: retried(caplog) or call.done())
        assert not call.done()  # still retrying: nothing listens yet
        await late.start()
        keys = await asyncio.wait_for(call, timeout=8)
    finally:
        await late.stop(0)
        client.close()
    assert [k.key_id for k in keys] == [keyring.active_key_id]


async def test_the_servers_retry_delay_is_honoured(
    settings: Settings, keyring: ConsentKeyring, data_keys: DataKeyring, database_dsn: str
) -> None:
    # A real gateway whose database went down answers UNAVAILABLE with RetryInfo (1 s).
    proxy = DatabaseProxy(database_dsn)
    down = await Database.connect(await proxy.start(), min_size=0, max_size=2)
    gateway = Gateway(replace(settings), down, Secrets(os.urandom(32), keyring, data_keys))
    await gateway.start()
    assert gateway.partner
    quick = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
    try:
        await proxy.cut()
        async with AsyncPartnerClient(
            f"127.0.0.1:{gateway.partner.port}", "pk_" + "a" * 16 + "." + "b" * 43, retry=quick
        ) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await client.list_consent_keys()
            elapsed = time.monotonic() - started
    finally:
        await gateway.stop(0)
        await down.close()
    assert caught.value.reason == "DATABASE_UNAVAILABLE"
    assert caught.value.retry_delay == pytest.approx(1.0)
    assert caught.value.attempts == 2
    assert elapsed >= 1.0  # the policy alone would have waited at most 0.01 s


# The internal client


async def test_sync_internal_client_round_trip(internal_target: str, partner_target: str) -> None:
    def scenario() -> dict[str, Any]:
        with InternalClient(internal_target, harness.INTERNAL_TOKEN) as internal:
            practitioner = internal.create_practitioner("Dr. Internal", "Pediatrics")
            patient = internal.create_patient("Leakcheckgiven", "LEAKCHECK-Internal", sex=1, email="l@example.invalid")
            internal.create_appointment(
                practitioner.practitioner_id, patient.patient_id, WEEK_START, WEEK_START + timedelta(minutes=20)
            )
            partner = internal.create_partner("Internal Client Partner")
            key = internal.issue_partner_key(partner.partner_id)
            internal.grant_practitioner_access(partner.partner_id, practitioner.practitioner_id)
            consent = internal.grant_consent(
                patient.patient_id, partner.partner_id, [CONTACT_FIELD_NAME], timedelta(minutes=5), "reminders"
            )
            with PartnerClient(partner_target, key.secret) as partner_client:
                (appointment,) = partner_client.iter_appointments(**week())
                contact = partner_client.get_appointment_contact(appointment.appointment_id, consent.token)
            disclosures = list(internal.iter_disclosures(partner_id=partner.partner_id, page_size=1))
            report = internal.breach_report(
                partner.partner_id, datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
            )
            consents = internal.list_consents(patient.patient_id)
            return {
                "family_name": contact.patient.family_name,
                "disclosures": len(disclosures),
                "patients": [p.patient_id for p in report.patients],
                "patient_id": patient.patient_id,
                "consents": [c.consent_id for c in consents],
                "consent_id": consent.consent_id,
            }

    result = await in_thread(scenario)
    assert result["family_name"] == "LEAKCHECK-Internal"
    assert result["disclosures"] == 2  # one basic (the list), one contact
    assert result["consents"] == [result["consent_id"]]
    assert result["patients"] == [result["patient_id"]]


# Packaging: a fresh virtual environment, and the example program


@pytest.mark.slow
async def test_fresh_venv_installs_the_client_and_runs_the_example(
    tmp_path: Path, partner_target: str, agenda: Agenda
) -> None:
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"

    def install() -> None:
        # From a copy: setuptools builds in the source tree, and a stale build/ there could leak into the wheel.
        source = shutil.copytree(CLIENT_DIR, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"), str(source)],
            check=True,
            capture_output=True,
            cwd=tmp_path,
        )

    await in_thread(install)
    probe = await in_thread(
        lambda: subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.util, json, apptgate_client, appointments.partner.v1.appointment_pb2 as a;"
                "print(json.dumps([apptgate_client.__file__, a.__file__, importlib.util.find_spec('service')]))",
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
    )
    client_file, stubs_file, service_spec = json.loads(probe.stdout)
    assert client_file.startswith(str(venv)) and stubs_file.startswith(str(venv))
    assert service_spec is None  # the client stands alone: no server code installed or needed
    assert (Path(client_file).parent / "py.typed").exists()

    example = await in_thread(
        lambda: subprocess.run(
            [str(python), str(CLIENT_DIR / "examples" / "sync_week.py"), "--json", "--from", f"{WEEK_START:%Y-%m-%d}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=harness.environment(APPTGATE_PARTNER_ADDR=partner_target, APPTGATE_PARTNER_KEY=agenda.partner.secret),
            timeout=60,
        )
    )
    assert example.returncode == 0, example.stderr
    synced = json.loads(example.stdout)
    assert len(synced["appointments"]) == agenda.appointment_count
    assert {a["practitioner"] for a in synced["appointments"]} == {"Dr. Agenda"}
    assert "LEAKCHECK" not in example.stdout  # the basic view: no name, no contact, no reason


async def test_example_prints_a_readable_agenda(partner_target: str, agenda: Agenda) -> None:
    example = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT_DIR / "examples" / "sync_week.py"),
        "--from",
        f"{WEEK_START:%Y-%m-%d}",
        "--practitioner",
        agenda.practitioner_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.environment(APPTGATE_PARTNER_ADDR=partner_target, APPTGATE_PARTNER_KEY=agenda.partner.secret),
    )
    out, err = await asyncio.wait_for(example.communicate(), timeout=30)
    assert example.returncode == 0, err.decode()
    text = out.decode()
    assert f"{agenda.appointment_count} appointments" in text
    assert text.count("Dr. Agenda") == agenda.appointment_count
    assert "Monday 2030-03-04" in text


async def test_example_reports_a_refused_key(partner_target: str) -> None:
    example = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT_DIR / "examples" / "sync_week.py"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=harness.environment(APPTGATE_PARTNER_ADDR=partner_target, APPTGATE_PARTNER_KEY="pk_bad.key"),
    )
    _, err = await asyncio.wait_for(example.communicate(), timeout=30)
    assert example.returncode == 1
    assert "UNAUTHENTICATED" in err.decode()
