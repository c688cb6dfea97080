"""``OTEL_METRICS_EXPORTER=prometheus``: the service's metrics on ``/metrics``, through the same redaction."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import harness
import pytest
from appointments.type.v1.contact_pb2 import CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE

from service.access.consent_tokens import ConsentKeyring
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Exporter, Settings
from service.store.database import Database
from service.telemetry.tracing import Telemetry


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


async def test_prometheus_serves_the_metrics_and_no_personal_value(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> None:
    port = harness.free_port()
    configured = replace(
        settings,
        otel_metrics_exporter=Exporter.PROMETHEUS,
        otel_prometheus_host="127.0.0.1",
        otel_prometheus_port=port,
    )
    telemetry = Telemetry.from_settings(configured)
    try:
        telemetry.observe_pool(database.pool_usage)
        gateway = Gateway(configured, database, Secrets(os.urandom(32), keyring, data_keys), telemetry=telemetry)
        async with harness.serving(gateway) as world:
            practitioner = await world.practitioner("Dr. Metricsleak Practitioner")
            patient = await world.patient(
                given_name="Promleakgiven",
                family_name="PROMLEAK-Family",
                phone="+33612340987",
                email="promleak.patient@example.invalid",
            )
            appointment = await world.appointment(practitioner, patient.patient_id, reason="PROMLEAK-REASON migraine")
            partner = await world.partner("Prometheus Leak Partner", practitioner)
            [listed] = (await partner.list()).appointments
            await partner.get(listed.appointment_id)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await partner.contact(listed.appointment_id)  # no token: a consent denial, counted by reason
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            consent = await world.consent(
                patient.patient_id,
                partner.partner_id,
                [CONTACT_FIELD_EMAIL, CONTACT_FIELD_PHONE],
            )
            contact = await partner.contact(listed.appointment_id, consent.token)
            assert contact.patient.email == "promleak.patient@example.invalid"  # the values did leave, to the partner

            text = await asyncio.to_thread(_scrape, port)
        leaks = [
            "Promleakgiven",
            "PROMLEAK",
            "+33612340987",
            "33612340987",
            "promleak.patient",
            "Metricsleak",
            "migraine",
            partner.secret,
            partner.secret.partition(".")[2],
            consent.token,
            harness.INTERNAL_TOKEN,
            appointment.appointment_id,
            patient.patient_id,
        ]
    finally:
        telemetry.shutdown()

    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {
        "rpc_server_duration_milliseconds_count",
        "apptgate_disclosures_total",
        "apptgate_consent_denials_total",
        "apptgate_db_pool_connections",
        "target_info",
    } <= names, sorted(names)
    assert 'rpc_method="/appointments.partner.v1.PartnerAppointmentService/GetAppointmentContact"' in text
    assert 'contact_field="email"' in text and 'view="contact"' in text
    assert [value for value in leaks if value in text] == []
    with pytest.raises(urllib.error.URLError):  # shut down with the telemetry: the port is released
        await asyncio.to_thread(_scrape, port)


async def test_a_port_in_use_for_metrics_is_named_with_its_variables(settings: Settings) -> None:
    port = harness.free_port()
    first = Telemetry.from_settings(
        replace(
            settings,
            otel_metrics_exporter=Exporter.PROMETHEUS,
            otel_prometheus_host="127.0.0.1",
            otel_prometheus_port=port,
        )
    )
    try:
        with pytest.raises(
            OSError, match=f"OTEL_EXPORTER_PROMETHEUS_HOST/PORT: cannot serve /metrics on 127.0.0.1:{port}"
        ):
            Telemetry.from_settings(
                replace(
                    settings,
                    otel_metrics_exporter=Exporter.PROMETHEUS,
                    otel_prometheus_host="127.0.0.1",
                    otel_prometheus_port=port,
                )
            )
    finally:
        first.shutdown()


def _instance(text: str) -> str:
    """The ``service_instance_id`` of a scrape's ``target_info``: which process answered."""
    [line] = [line for line in text.splitlines() if line.startswith("target_info{")]
    return line.split('service_instance_id="', 1)[1].split('"', 1)[0]


async def test_each_worker_serves_its_metrics_on_the_port_plus_its_number(database_dsn: str, tmp_path: Path) -> None:
    base = harness.free_port()
    while not all(_free(port) for port in (base, base + 1)):
        base = harness.free_port()
    env = harness.environment(
        DATABASE_URL=database_dsn,
        APPTGATE_DATA_DIR=str(tmp_path / "data"),
        APPTGATE_INTERNAL_TOKEN=harness.INTERNAL_TOKEN,
        APPTGATE_WORKERS="2",
        APPTGATE_PARTNER_ADDR=f"127.0.0.1:{harness.free_port()}",
        APPTGATE_INTERNAL_ADDR=f"127.0.0.1:{harness.free_port()}",
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(base),
    )
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "serve", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await harness.wait_for_port(base, within=60)
        await harness.wait_for_port(base + 1, within=60)
        scrapes: dict[int, str] = {}

        async def both_observe_their_pool() -> bool:
            # A worker serves /metrics before its database pool is open; its gauge
            # (and ``target_info``, which comes with the first metric) follows.
            for port in (base, base + 1):
                scrapes[port] = await asyncio.to_thread(_scrape, port)
            return all("apptgate_db_pool_connections" in text for text in scrapes.values())

        await harness.eventually(both_observe_their_pool, within=60, interval=0.2)
        first, second = scrapes[base], scrapes[base + 1]
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), timeout=30) == 0

    assert _instance(first) != _instance(second)  # two processes, one port each
    assert "apptgate_db_pool_connections" in first and "apptgate_db_pool_connections" in second


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
