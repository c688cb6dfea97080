"""The proto tooling: buf lint on protos/, and buf breaking catching an incompatible change.

buf comes from the npm package @bufbuild/buf pinned in clients/typescript (the
``buf`` fixture runs ``npm ci`` when needed). Changes are made to scratch
copies of protos/, never to protos/ itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from client_world import ROOT

APPOINTMENT_PROTO = Path("appointments") / "partner" / "v1" / "appointment.proto"
RENUMBERED = 'Previously present field "1" with name "appointment_id" on message "Appointment" was deleted.'


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def edit(path: Path, old: str, new: str) -> None:
    """Replace ``old`` (which must occur exactly once) with ``new`` in ``path``."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path}"
    path.write_text(text.replace(old, new))


@pytest.fixture
def scratch(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of protos/: the original and one to change."""
    original = shutil.copytree(ROOT / "protos", tmp_path / "original")
    changed = shutil.copytree(ROOT / "protos", tmp_path / "changed")
    return original, changed


def test_the_protos_pass_buf_lint(buf: str) -> None:
    result = run(buf, "lint", "protos")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_buf_breaking_catches_a_renumbered_field(buf: str, scratch: tuple[Path, Path]) -> None:
    original, changed = scratch
    unchanged = run(buf, "breaking", str(changed), "--against", str(original))
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr

    edit(changed / APPOINTMENT_PROTO, "string appointment_id = 1;", "string appointment_id = 8;")
    result = run(buf, "breaking", str(changed), "--against", str(original))

    assert result.returncode != 0
    assert RENUMBERED in result.stdout
    assert str(APPOINTMENT_PROTO) in result.stdout


def test_buf_lint_requires_a_comment_on_every_field(buf: str, scratch: tuple[Path, Path]) -> None:
    _, changed = scratch
    edit(
        changed / APPOINTMENT_PROTO,
        '  // The medical specialty of the practitioner, for example "Dermatology".\n',
        "",
    )
    result = run(buf, "lint", str(changed))
    assert result.returncode != 0
    assert 'Field "specialty" should have a non-empty comment for documentation.' in result.stdout


def test_check_protos_compares_with_the_previous_commit(buf: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copytree(ROOT / "tools", repo / "tools", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    git = ("git", "-c", "user.name=apptgate tests", "-c", "user.email=tests@example.invalid")
    assert run("git", "init", "--quiet", cwd=repo).returncode == 0

    def commit(message: str) -> None:
        assert run(*git, "add", "-A", cwd=repo).returncode == 0
        assert run(*git, "commit", "--quiet", "-m", message, cwd=repo).returncode == 0

    commit("first")
    first = run("sh", "tools/check_protos.sh", buf, cwd=repo)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "buf breaking: skipped: no previous commit" in first.stdout

    edit(repo / "protos" / APPOINTMENT_PROTO, "// The state of an appointment.\nenum", "// The state.\nenum")
    commit("a compatible change: a comment")
    compatible = run("sh", "tools/check_protos.sh", buf, cwd=repo)
    assert compatible.returncode == 0, compatible.stdout + compatible.stderr
    assert "buf breaking: protos/ is compatible with" in compatible.stdout

    edit(repo / "protos" / APPOINTMENT_PROTO, "string appointment_id = 1;", "string appointment_id = 8;")
    commit("an incompatible change: a renumbered field")
    breaking = run("sh", "tools/check_protos.sh", buf, cwd=repo)
    assert breaking.returncode != 0
    assert RENUMBERED in breaking.stdout
