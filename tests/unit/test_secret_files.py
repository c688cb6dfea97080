"""Every file a secret is read from is checked the same way: no symbolic link, no other owner, no other writer.

One table of every ``*_FILE`` variable, each tried with a file as an operator
means it (it loads) and with each way another local user could have chosen
its content (it is refused, with one line naming the file and the fix, and
never the content). Real files in a temporary directory; a file is given to
another user only when the tests run as root.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from service import settings
from service.access.consent_tokens import SigningKey
from service.app import load_secrets
from service.crypto.keyfiles import DATA_KEYS_FILE, SERVER_SECRET_FILE, SIGNING_KEYS_FILE, open_private_output
from service.errors import ConfigError

TOKEN = "Zq4vT9-kLm2xR7_pWn8sYc3bHj6dGf5a"
#: Another user, for files the tests give away (root only).
NOBODY = 65534


def _content(variable: str) -> str:
    return {
        "APPTGATE_SERVER_SECRET_FILE": base64.b64encode(os.urandom(32)).decode(),
        "APPTGATE_SIGNING_KEY_FILE": SigningKey.generate().secret_paserk(),
        "APPTGATE_DATA_KEY_FILE": "1:" + base64.b64encode(os.urandom(32)).decode(),
        "APPTGATE_INTERNAL_TOKEN_FILE": TOKEN,
        "APPTGATE_DATABASE_PASSWORD_FILE": "Sentinel-password-1",
        "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE": "Sentinel-password-2",
    }[variable] + "\n"


VARIABLES = [
    "APPTGATE_SERVER_SECRET_FILE",
    "APPTGATE_SIGNING_KEY_FILE",
    "APPTGATE_DATA_KEY_FILE",
    "APPTGATE_INTERNAL_TOKEN_FILE",
    "APPTGATE_DATABASE_PASSWORD_FILE",
    "APPTGATE_PARTNER_DATABASE_PASSWORD_FILE",
]


def _load(tmp_path: Path, variable: str, path: Path) -> None:
    """Load the settings and the secrets as ``serve`` does, with ``variable`` naming ``path``."""
    loaded = settings.load(
        {"DATABASE_URL": "postgresql://owner@127.0.0.1:1/app", "APPTGATE_DATA_DIR": str(tmp_path / "data"),
         variable: str(path)}
    )  # fmt: skip
    load_secrets(loaded)


def _as_found(path: Path, how: str) -> Path:
    """Make ``path`` (a good key file) unsafe in the way ``how`` names; return the path to configure."""
    if how == "symbolic link":
        link = path.with_name(path.name + ".link")
        link.symlink_to(path)
        return link
    if how == "another user's":
        os.chown(path, NOBODY, NOBODY)
        return path
    path.chmod(int(how.removeprefix("mode "), 8))
    return path


def _needs_root(how: str) -> None:
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("giving a file to another user takes root")


@pytest.mark.parametrize("variable", VARIABLES)
def test_a_private_file_of_this_user_loads(tmp_path: Path, variable: str) -> None:
    path = tmp_path / "secret"
    path.write_text(_content(variable))
    path.chmod(0o600)
    _load(tmp_path, variable, path)
    path.chmod(0o644)  # readable by others is the operator's choice (a mounted secret often is); writable is not
    _load(tmp_path, variable, path)


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("how", ["mode 0666", "mode 0602", "mode 0620", "symbolic link", "another user's"])
def test_a_file_another_user_could_have_chosen_is_refused_naming_the_file_and_the_fix(
    tmp_path: Path, variable: str, how: str
) -> None:
    _needs_root(how)
    path = tmp_path / "secret"
    content = _content(variable)
    path.write_text(content)
    path.chmod(0o600)
    configured = _as_found(path, how)

    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, variable, configured)

    [problem] = caught.value.problems
    expected_end = {
        "symbolic link": f"{configured} is a symbolic link: name the file itself",
        "another user's": f"chown {'root' if os.geteuid() == 0 else os.geteuid()} {configured}",
    }.get(how, f"{configured} can be written by other users ({how}): chmod 600 {configured}")
    assert problem.startswith(f"{variable}: ") and problem.endswith(expected_end)
    assert "\n" not in problem
    assert content.strip()[-12:] not in str(caught.value)


@pytest.mark.parametrize("variable", VARIABLES)
def test_a_fifo_in_place_of_a_key_file_is_refused_at_once(tmp_path: Path, variable: str) -> None:
    # Opened without blocking: a FIFO with no writer would otherwise hang the start.
    path = tmp_path / "secret"
    os.mkfifo(path, 0o600)

    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, variable, path)

    assert caught.value.problems == [f"{variable}: {path} is not a regular file"]


@pytest.mark.parametrize("name", [SERVER_SECRET_FILE, SIGNING_KEYS_FILE, DATA_KEYS_FILE])
@pytest.mark.parametrize("how", ["mode 0666", "symbolic link", "another user's"])
def test_a_development_key_file_is_checked_like_a_configured_one(tmp_path: Path, name: str, how: str) -> None:
    _needs_root(how)
    data = tmp_path / "data"
    load_secrets(settings.load({"APPTGATE_DATA_DIR": str(data)}))  # creates the three, as a first start does
    path = data / name
    if how == "symbolic link":
        moved = tmp_path / name
        path.rename(moved)
        path.symlink_to(moved)
    else:
        _as_found(path, how)

    with pytest.raises(ConfigError) as caught:
        load_secrets(settings.load({"APPTGATE_DATA_DIR": str(data)}))

    [problem] = caught.value.problems
    assert problem.startswith("the development ") and f"{path} " in problem


def test_the_development_files_a_first_start_creates_pass_their_own_checks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    loaded = settings.load({"APPTGATE_DATA_DIR": str(data)})

    first, second = load_secrets(loaded), load_secrets(loaded)

    assert first.server_secret == second.server_secret
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()} == {
        SERVER_SECRET_FILE: 0o600,
        SIGNING_KEYS_FILE: 0o600,
        DATA_KEYS_FILE: 0o600,
    }


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda d: d.chmod(0o777), "can be written by other users (mode 0777): chmod 700"),
        (lambda d: d.chmod(0o1777), "can be written by other users (mode 1777): chmod 700"),
        (lambda d: d.chmod(0o770), "can be written by other users (mode 0770): chmod 700"),
    ],
)
def test_a_data_directory_others_can_write_is_refused(
    tmp_path: Path, make: Callable[[Path], None], complaint: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make(data)

    with pytest.raises(ConfigError) as caught:
        load_secrets(settings.load({"APPTGATE_DATA_DIR": str(data)}))

    assert caught.value.problems == [f"APPTGATE_DATA_DIR: {data} {complaint} {data}"]
    assert list(data.iterdir()) == []  # nothing was written into it


def test_a_readable_data_directory_of_this_user_is_used_as_it_is(tmp_path: Path) -> None:
    # An older version's directory, made under umask 022: nobody else can write in it.
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    load_secrets(settings.load({"APPTGATE_DATA_DIR": str(data)}))
    assert stat.S_IMODE(data.stat().st_mode) == 0o755


# --- files the command line writes -----------------------------------------------------------------------------------


def test_an_output_file_is_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "report.csv"
    previous = os.umask(0)
    try:
        with open_private_output(path, "--output") as out:
            out.write("id\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "id\n"


def test_an_existing_output_file_of_this_user_is_made_private_then_replaced(tmp_path: Path) -> None:
    path = tmp_path / "report.csv"
    path.write_text("an older, longer report\n")
    path.chmod(0o644)
    with open_private_output(path, "--output") as out:
        out.write("new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "new\n"


@pytest.mark.parametrize(
    ("how", "complaint"),
    [
        ("symbolic link", "{path} is a symbolic link: write to another path"),
        ("dangling symbolic link", "{path} is a symbolic link: write to another path"),
        ("hard link", "{path} has other hard links: write to another path"),
        ("fifo", "cannot write {path} (No such device or address)"),  # no reader; with one: not a regular file
        ("another user's", "{path} belongs to another user: write to another path"),
    ],
)
def test_an_output_path_someone_prepared_is_refused_and_left_as_it_was(
    tmp_path: Path, how: str, complaint: str
) -> None:
    _needs_root(how)
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    target.chmod(0o644)
    path = tmp_path / "report.csv"
    if how == "symbolic link":
        path.symlink_to(target)
    elif how == "dangling symbolic link":
        target.unlink()
        path.symlink_to(target)
    elif how == "hard link":
        os.link(target, path)
    elif how == "fifo":
        os.mkfifo(path)
    else:
        target = path
        path.write_text("keep me\n")
        path.chmod(0o644)
        os.chown(path, NOBODY, NOBODY)

    with pytest.raises(ConfigError) as caught:
        open_private_output(path, "--output")

    assert caught.value.problems == ["--output: " + complaint.format(path=path)]
    if how == "dangling symbolic link":
        assert not target.exists()  # nothing was created through the link
    elif how != "fifo":
        assert target.read_text() == "keep me\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
