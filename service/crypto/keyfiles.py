"""Secrets from configuration, or development secrets created under the data directory.

In production (``APPTGATE_ENV=production``) a missing secret is a
configuration error. In development the service creates one, readable by its
owner only, and logs a warning so nobody mistakes it for a managed key.

Every key file, named by a ``*_FILE`` variable or created in the data
directory, is read by :func:`service.settings.read_private_file`: a symbolic
link, a file another user owns, or one the group or others may write is
refused, since whoever can write it chooses the key. The data directory is
created with mode 0700 and refused when other users may write it. Files the
command line writes for the operator (a breach report) are created with mode
0600 by :func:`open_private_output`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from service.access.consent_tokens import ConsentKeyring, SigningKey
from service.crypto.sealing import DataKeyring, new_key_text
from service.errors import ConfigError
from service.settings import Settings, file_problem, read_private_file

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


def private_data_dir(settings: Settings) -> Path:
    """The data directory, created with mode 0700 when absent; refused when other users may write it.

    Another local user who can write the directory can plant a key the
    service would then use, or replace the embedded database. A directory
    this function creates gets exactly 0700, whatever the umask. A symbolic
    link to a directory is followed (a data directory on a mounted volume);
    the directory it leads to is checked. Raises :class:`ConfigError`.
    """
    path = settings.data_dir
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError([f"APPTGATE_DATA_DIR: cannot create {path} ({exc.strerror})"]) from None
    else:
        # mkdir's mode passes through the umask; the directory is ours until now, so no one got in between.
        os.chmod(path, 0o700)
        return path
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError([f"APPTGATE_DATA_DIR: cannot use {path} ({exc.strerror})"]) from None
    problem = file_problem(info, path, directory=True)
    if problem is not None:
        raise ConfigError([f"APPTGATE_DATA_DIR: {problem}"])
    return path


def write_private(path: Path, content: str) -> None:
    """Create ``path`` with mode 0600, refusing to overwrite (two processes racing keep the first).

    ``O_EXCL`` neither follows a symbolic link nor opens an existing file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)


def open_private_output(path: Path, label: str) -> TextIO:
    """Open ``path`` for writing a file that holds identifiers: mode 0600, never through a symbolic link.

    A new file is created with mode 0600 (not the umask's 0644). An existing
    one is reused only when it is a regular file of this user with no other
    hard link; its mode becomes 0600 before it is truncated, so its old
    content is kept when it is refused. Checked on the open descriptor, so
    nothing can swap the file in between. Raises :class:`ConfigError` naming
    ``label`` (the option).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        # Without O_NONBLOCK a FIFO planted at the path would block the open until someone reads it.
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and path.is_symlink():
            raise ConfigError([f"{label}: {path} is a symbolic link: write to another path"]) from None
        raise ConfigError([f"{label}: cannot write {path} ({exc.strerror})"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{label}: {path} is not a regular file: write to another path"])
        if info.st_uid != os.geteuid():
            raise ConfigError([f"{label}: {path} belongs to another user: write to another path"])
        if info.st_nlink != 1:
            raise ConfigError([f"{label}: {path} has other hard links: write to another path"])
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def load_server_secret(settings: Settings) -> bytes:
    """Return the server secret (pseudonyms and page tokens derive their keys from it).

    From ``APPTGATE_SERVER_SECRET`` (base64), else ``APPTGATE_SERVER_SECRET_FILE``,
    else, outside production, ``<data dir>/server-secret``, created on first use.
    """
    if settings.server_secret:
        return _decode(settings.server_secret, "APPTGATE_SERVER_SECRET")
    if settings.server_secret_file:
        text = read_private_file(settings.server_secret_file, "APPTGATE_SERVER_SECRET_FILE")
        return _decode(text, "APPTGATE_SERVER_SECRET_FILE")
    if settings.production:
        raise ConfigError(["APPTGATE_SERVER_SECRET or APPTGATE_SERVER_SECRET_FILE is required in production"])
    text = _development_file(
        settings,
        SERVER_SECRET_FILE,
        lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n",
        "server secret",
        "APPTGATE_SERVER_SECRET",
    )
    return _decode(text, str(settings.data_dir / SERVER_SECRET_FILE))


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


def _development_file(settings: Settings, name: str, content: Callable[[], str], what: str, variable: str) -> str:
    """Return the text of a development key file, creating it (race-safe, mode 0600) on first use with a warning.

    The file passes the checks of every key file (:func:`read_private_file`),
    in a data directory other users cannot write (:func:`private_data_dir`).
    """
    path = private_data_dir(settings) / name
    # lexists: a dangling symbolic link is not "no file"; reading it below refuses it.
    if not os.path.lexists(path):
        try:
            created = _create_private_atomically(path, content())
        except OSError as exc:
            raise ConfigError([f"{path}: cannot create a development {what} ({exc.strerror})"]) from None
        if created:
            log.warning("created a development %s at %s; set %s in production", what, path, variable)
    return read_private_file(path, f"the development {what} ({variable} unset)")


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
            read_private_file(settings.signing_key_file, "APPTGATE_SIGNING_KEY_FILE"), "APPTGATE_SIGNING_KEY_FILE"
        )
    if settings.production:
        raise ConfigError(["APPTGATE_SIGNING_KEY or APPTGATE_SIGNING_KEY_FILE is required in production"])
    text = _development_file(
        settings,
        SIGNING_KEYS_FILE,
        lambda: _DEV_SIGNING_KEYS_HEADER + SigningKey.generate().secret_paserk() + "\n",
        "consent-signing key",
        "APPTGATE_SIGNING_KEY",
    )
    return _keyring(text, str(settings.data_dir / SIGNING_KEYS_FILE))


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
        return _data_keyring(
            read_private_file(settings.data_key_file, "APPTGATE_DATA_KEY_FILE"), "APPTGATE_DATA_KEY_FILE"
        )
    if settings.production:
        raise ConfigError(["APPTGATE_DATA_KEY or APPTGATE_DATA_KEY_FILE is required in production"])
    text = _development_file(
        settings,
        DATA_KEYS_FILE,
        lambda: _DEV_DATA_KEYS_HEADER + new_key_text(1) + "\n",
        "data key",
        "APPTGATE_DATA_KEY",
    )
    return _data_keyring(text, str(settings.data_dir / DATA_KEYS_FILE))


def configured_problems(settings: Settings) -> list[str]:
    """The problems of the secrets ``settings`` configure (a value or a ``*_FILE``), all three read; none created.

    A secret left unset is not looked at: production refuses it
    (:func:`service.settings.serving_problems`), development creates it when
    it is loaded. Passed to :func:`service.settings.load` as a check, so a bad
    key is reported with every other problem of the configuration.
    """
    problems: list[str] = []
    for configured, load in (
        (settings.server_secret or settings.server_secret_file, load_server_secret),
        (settings.signing_key or settings.signing_key_file, load_signing_keys),
        (settings.data_key or settings.data_key_file, load_data_keys),
    ):
        if configured:
            try:
                load(settings)
            except ConfigError as exc:
                problems.extend(p for p in exc.problems if p not in problems)
    return problems
