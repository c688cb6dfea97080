"""``python -m service demo`` (``make run``): migrate, seed, serve, and print grpcurl commands that work as pasted."""

from __future__ import annotations

import secrets
from dataclasses import replace

from demo import walkthrough, world
from service import app
from service.errors import ConfigError
from service.settings import Settings
from service.store import migrations
from service.store.database import Database


def _print_walkthrough(gateway: app.Gateway, seeded: world.DemoWorld, internal_token: str) -> None:
    assert gateway.partner and gateway.internal
    values = walkthrough.DemoValues(
        partner_address=f"localhost:{gateway.partner.port}",
        internal_address=f"localhost:{gateway.internal.port}",
        partner_key=seeded.partner_key,
        internal_token=internal_token,
        partner_id=str(seeded.partner_id),
        practitioner_id=str(seeded.practitioner_id),
        patient_id=str(seeded.patient_id),
        appointment_id=gateway.partner_appointment_id(seeded.partner_id, seeded.appointment_id),
        week_start=seeded.week_start,
    )
    print(walkthrough.render(values), flush=True)


async def serve(settings: Settings) -> None:
    """Serve the demo until SIGTERM or SIGINT: the database migrated and seeded, the walk-through printed.

    Without ``APPTGATE_INTERNAL_TOKEN``, a fresh one is made up and printed with the commands.
    Raises :class:`ConfigError` with ``APPTGATE_ENV=production``, before anything is
    opened: the demo issues a live partner key and prints the internal token.
    """
    if settings.production:
        raise ConfigError(
            ["the demo refuses APPTGATE_ENV=production: it issues a partner key and prints the internal token"]
        )
    if not settings.internal_token:
        settings = replace(settings, internal_token=secrets.token_urlsafe(32))
    internal_token = settings.internal_token
    assert internal_token is not None
    seeded: list[world.DemoWorld] = []

    async def prepare(database: Database, keys: app.Secrets) -> None:
        async with database.connection() as conn:
            await migrations.migrate(conn)
        seeded.append(await world.seed(database, keys.data_keys))

    async def ready(gateway: app.Gateway) -> None:
        _print_walkthrough(gateway, seeded[0], internal_token)

    await app.serve(settings, prepare=prepare, on_ready=ready)
