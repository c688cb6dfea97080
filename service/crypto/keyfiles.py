"""Secrets from configuration, or development secrets created under the data directory.

In production (``APPTGATE_ENV=production``) a missing secret is a
configuration error. In development the service creates one, readable by its
owner only, and logs a warning so nobody mistakes it for a managed key.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from service.access.consent_tokens import ConsentKeyring, SigningKey
from service.crypto.sealing import DataKeyring, new_key_text
from service.errors import ConfigError
from service.settings import Settings

log = logging.getLogger(__name__)

SERVER_SECRET_FILE = "server-secret"  # noqa: S105 (a file name, not a secret)


def _decode(value: str, label: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(value.strip() + "=" * (-len(value.strip()) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError([f"{label}: not base64"]) from exc
    if len(raw) < 32:
        raise ConfigError([f"{label}: must hold at least 32 bytes (got {len(raw)})"])
    return raw


def write_private(path: Path, content: str) -> None:
    """Create ``path`` with mode 0600, refusing to overwrite (two processes racing keep the first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)


def load_server_secret(settings: Settings) -> bytes:
    """Return the server secret (pseudonyms and page tokens derive their keys from it).

    From ``APPTGATE_SERVER_SECRET`` (base64), else ``APPTGATE_SERVER_SECRET_FILE``,
    else, outside production, ``<data dir>/server-secret``, created on first use.
    """
    if settings.server_secret:
        return _decode(settings.server_secret, "APPTGATE_SERVER_SECRET")
    if settings.server_secret_file:
        try:
            return _decode(settings.server_secret_file.read_text(), "APPTGATE_SERVER_SECRET_FILE")
        except OSError as exc:
            raise ConfigError([f"APPTGATE_SERVER_SECRET_FILE: cannot read {settings.server_secret_file}"]) from exc
    if settings.production:
        raise ConfigError(["APPTGATE_SERVER_SECRET or APPTGATE_SERVER_SECRET_FILE is required in production"])
    path = settings.data_dir / SERVER_SECRET_FILE
    text = _development_file(
        path,
        lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n",
        "server secret",
        "APPTGATE_SERVER_SECRET",
    )
    return _decode(text, str(path))


SIGNING_KEYS_FILE = "signing-keys"

_DEV_SIGNING_KEYS_HEADER = (
    "# apptgate development consent-signing key, created on first start.\n"
    "# Set APPTGATE_SIGNING_KEY or APPTGATE_SIGNING_KEY_FILE in production.\n"
)


def _create_private_atomically(path: Path, content: str) -> bool:
    """Create ``path`` (mode 0600) holding ``content``, or leave an existing file alone; True if created.

    The content goes to a temporary file first, which is then hard-linked into
    place: a process racing this one sees either no file or the whole file,
    never a half-written one, and the first to link wins.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    write_private(temporary, content)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
    return True


def _development_file(path: Path, content: Callable[[], str], what: str, variable: str) -> str:
    """Return the text of a development key file, creating it (race-safe, mode 0600) on first use with a warning."""
    if not path.exists():
        try:
            created = _create_private_atomically(path, content())
        except OSError as exc:
            raise ConfigError([f"{path}: cannot create a development {what} ({exc.strerror})"]) from None
        if created:
            log.warning("created a development %s at %s; set %s in production", what, path, variable)
    return _read_key_file(path, str(path))


def _read_key_file(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read {path} ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{label}: {path} is not UTF-8 text"]) from None


def _keyring(text: str, label: str) -> ConsentKeyring:
    try:
        return ConsentKeyring.from_text(text)
    except ValueError as exc:
        # The message names the key's position, never its text.
        raise ConfigError([f"{label}: {exc}"]) from None


def load_signing_keys(settings: Settings) -> ConsentKeyring:
    """Return the consent-token keyring (the first key signs, every key verifies).

    From ``APPTGATE_SIGNING_KEY`` (PASERKs separated by commas or new lines),
    else ``APPTGATE_SIGNING_KEY_FILE``, else, outside production,
    ``<data dir>/signing-keys``, created with one new key on first use.
    Raises ``ConfigError``, whose messages never hold key text.
    """
    if settings.signing_key:
        return _keyring(settings.signing_key, "APPTGATE_SIGNING_KEY")
    if settings.signing_key_file:
        return _keyring(
            _read_key_file(settings.signing_key_file, "APPTGATE_SIGNING_KEY_FILE"), "APPTGATE_SIGNING_KEY_FILE"
        )
    if settings.production:
        raise ConfigError(["APPTGATE_SIGNING_KEY or APPTGATE_SIGNING_KEY_FILE is required in production"])
    path = settings.data_dir / SIGNING_KEYS_FILE
    text = _development_file(
        path,
        lambda: _DEV_SIGNING_KEYS_HEADER + SigningKey.generate().secret_paserk() + "\n",
        "consent-signing key",
        "APPTGATE_SIGNING_KEY",
    )
    return _keyring(text, str(path))


DATA_KEYS_FILE = "data-keys"

_DEV_DATA_KEYS_HEADER = (
    "# apptgate development data key (encryption at rest of contact details), created on first start.\n"
    "# Set APPTGATE_DATA_KEY or APPTGATE_DATA_KEY_FILE in production. Losing it loses the sealed data.\n"
)


def _data_keyring(text: str, label: str) -> DataKeyring:
    try:
        return DataKeyring.from_text(text)
    except ValueError as exc:
        # The message names the key's position or id, never its text.
        raise ConfigError([f"{label}: {exc}"]) from None


def load_data_keys(settings: Settings) -> DataKeyring:
    """Return the data keyring that seals contact details and visit reasons (the first key seals, all open).

    From ``APPTGATE_DATA_KEY`` (``<id>:<base64 key>`` entries separated by
    commas or new lines), else ``APPTGATE_DATA_KEY_FILE``, else, outside
    production, ``<data dir>/data-keys``, created with one new key (id 1) on
    first use. Raises ``ConfigError``, whose messages never hold key text.
    """
    if settings.data_key:
        return _data_keyring(settings.data_key, "APPTGATE_DATA_KEY")
    if settings.data_key_file:
        return _data_keyring(_read_key_file(settings.data_key_file, "APPTGATE_DATA_KEY_FILE"), "APPTGATE_DATA_KEY_FILE")
    if settings.production:
        raise ConfigError(["APPTGATE_DATA_KEY or APPTGATE_DATA_KEY_FILE is required in production"])
    path = settings.data_dir / DATA_KEYS_FILE
    text = _development_file(
        path, lambda: _DEV_DATA_KEYS_HEADER + new_key_text(1) + "\n", "data key", "APPTGATE_DATA_KEY"
    )
    return _data_keyring(text, str(path))
