"""A PDF read back as its reader gets it: the text (poppler's pdftotext) and whether a page is drawn (pdftoppm).

Used on the breach dossier's PDF. Tests that need poppler call
:func:`require_poppler`, which skips them, saying why, on a machine without it
(``make test`` installs Debian's poppler-utils when it runs as root).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

#: Seconds a poppler tool may take on a dossier; far above what it needs on a loaded machine.
TOOL_TIMEOUT = 120


def require_poppler() -> None:
    """Skip the test, saying why, without pdftotext and pdftoppm on PATH."""
    if shutil.which("pdftotext") is None or shutil.which("pdftoppm") is None:
        pytest.skip("no pdftotext/pdftoppm on PATH (`make test` installs Debian's poppler-utils when run as root)")


def text(path: Path) -> str:
    """The PDF's text in reading order, its white space collapsed."""
    done = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True, timeout=TOOL_TIMEOUT
    )
    return " ".join(done.stdout.split())


def page_variance(path: Path, page: int = 1) -> float:
    """The variance of the grey levels of ``page`` drawn at 40 dpi: 0 for a blank page."""
    from PIL import Image, ImageStat

    prefix = path.with_name(f"{path.stem}-page")
    subprocess.run(
        ["pdftoppm", "-png", "-r", "40", "-f", str(page), "-l", str(page), "-singlefile", str(path), str(prefix)],
        check=True,
        timeout=TOOL_TIMEOUT,
    )
    with Image.open(prefix.with_suffix(".png")) as image:
        return float(ImageStat.Stat(image.convert("L")).var[0])
