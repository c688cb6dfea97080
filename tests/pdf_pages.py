"""A PDF read back as its reader gets it: the text (poppler's pdftotext), the pages' sizes (pdfinfo) and whether a
page is drawn (pdftoppm).

Used on the breach dossier's PDF. Tests that need poppler call
:func:`require_poppler`, which skips them, saying why, on a machine without it
(``make test`` installs Debian's poppler-utils when it runs as root).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

#: Seconds a poppler tool may take on a dossier; far above what it needs on a loaded machine.
TOOL_TIMEOUT = 120


def require_poppler() -> None:
    """Skip the test, saying why, without pdftotext, pdftoppm and pdfinfo on PATH."""
    if any(shutil.which(tool) is None for tool in ("pdftotext", "pdftoppm", "pdfinfo")):
        pytest.skip(
            "no pdftotext/pdftoppm/pdfinfo on PATH (`make test` installs Debian's poppler-utils when run as root)"
        )


def text(path: Path) -> str:
    """The PDF's text in reading order, its white space collapsed."""
    done = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True, timeout=TOOL_TIMEOUT
    )
    return " ".join(done.stdout.split())


def page_sizes(path: Path) -> list[tuple[float, float]]:
    """Each page's width and height in points, in order (poppler's pdfinfo)."""
    done = subprocess.run(
        ["pdfinfo", "-f", "1", "-l", "100000", str(path)], capture_output=True, text=True, check=True,
        timeout=TOOL_TIMEOUT,
    )  # fmt: skip
    sizes = re.findall(r"^Page +\d+ size: +([\d.]+) x ([\d.]+) pts", done.stdout, flags=re.M)
    return [(float(width), float(height)) for width, height in sizes]


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
