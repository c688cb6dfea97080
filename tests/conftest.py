"""Fixtures: one PostgreSQL server per session (DATABASE_URL or embedded), a database per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc.aio
import harness
import pytest

from service.access.consent_tokens import ConsentKeyring, SigningKey
from service.app import Gateway, Secrets
from service.crypto.sealing import DataKeyring
from service.settings import Settings
from service.store.database import Database, partner_login_dsn
from service.store.embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A DSN with the right to create databases: DATABASE_URL, else an embedded server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    directory = Path(tempfile.mkdtemp(prefix="apg-"))
    server = EmbeddedPostgres(directory / "pg")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def template(admin_dsn: str) -> Iterator[str]:
    """A migrated template database, copied for each test."""
    name = asyncio.run(harness.create_template(admin_dsn))
    yield name
    asyncio.run(harness.drop_database(admin_dsn, harness.with_database(admin_dsn, name)))


@pytest.fixture
async def database_dsn(admin_dsn: str, template: str) -> AsyncIterator[str]:
    """A fresh migrated database for one test."""
    dsn = await harness.create_database(admin_dsn, template)
    try:
        yield dsn
    finally:
        await harness.drop_database(admin_dsn, dsn)


@pytest.fixture
async def database(database_dsn: str) -> AsyncIterator[Database]:
    """Pools on the test's database; the partner path logs in as its own role."""
    db = await Database.connect(
        database_dsn, min_size=1, max_size=5, partner_dsn=partner_login_dsn(database_dsn), require_partner_login=True
    )
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for an in-process gateway on free loopback ports.

    Extraction limits are set out of reach: tests that drive hundreds of calls
    are not about them; tests/integration/test_limits.py sets its own.
    """
    return Settings(
        data_dir=tmp_path / "data",
        partner_addr="127.0.0.1:0",
        internal_addr="127.0.0.1:0",
        internal_token=harness.INTERNAL_TOKEN,
        partner_rps=1e6,
        partner_burst=1_000_000,
        contact_daily_cap=1_000_000,
        patient_daily_cap=1_000_000,
        anomaly_min_volume=1_000_000,
    )


@pytest.fixture
def keyring() -> ConsentKeyring:
    """The consent-signing keyring of the test's gateway (one fresh key)."""
    return ConsentKeyring([SigningKey.generate()])


@pytest.fixture
def data_keys() -> DataKeyring:
    """The data keyring (encryption at rest) of the test's gateways: one fresh key, id 1."""
    return DataKeyring([(1, os.urandom(32))])


@pytest.fixture
async def gateway(
    settings: Settings, database: Database, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[Gateway]:
    """A running gateway (both listeners) over the test's database."""
    server = Gateway(replace(settings), database, Secrets(os.urandom(32), keyring, data_keys))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def partner_channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the partner listener."""
    assert gateway.partner
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.partner.port}") as channel:
        yield channel


@pytest.fixture
async def internal_channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the internal listener."""
    assert gateway.internal
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.internal.port}") as channel:
        yield channel


@pytest.fixture
def world(partner_channel: grpc.aio.Channel, internal_channel: grpc.aio.Channel) -> harness.World:
    """A builder of practitioners, patients, appointments and partners over the internal API."""
    return harness.World(partner_channel, internal_channel)


@pytest.fixture
async def watchful(
    settings: Settings, database_dsn: str, keyring: ConsentKeyring, data_keys: DataKeyring
) -> AsyncIterator[harness.World]:
    """A gateway that suspends a partner at its first anomalous day (threshold: 5 patients reached)."""
    database = await Database.connect(database_dsn, min_size=1, max_size=4)
    gateway = Gateway(
        replace(settings, anomaly_min_volume=5, anomaly_suspend=True),
        database,
        Secrets(os.urandom(32), keyring, data_keys),
    )
    try:
        async with harness.serving(gateway) as world:
            yield world
    finally:
        await database.close()
