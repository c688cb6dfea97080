"""A self-contained HTML page rendered to PDF by WeasyPrint, in memory. No network, no file.

The breach dossier's PDF is the dossier's HTML, laid out by WeasyPrint (a
real engine: CSS paged media, inline SVG, embedded fonts) rather than a
second rendering of the data. The page names no external resource; the
fetcher refuses any all the same, and stops the rendering, so a page that
tried one fails instead of calling out. WeasyPrint is imported when first
used: the other commands do not pay for loading it.
"""

from __future__ import annotations

import gc
import logging
import warnings
from typing import Any


class PdfError(Exception):
    """The page could not be rendered to PDF. The message is fixed text."""


def _refusing_fetcher() -> Any:
    from weasyprint.urls import FatalURLFetchingError, URLFetcher

    class RefusingFetcher(URLFetcher):  # type: ignore[misc]
        """Refuses every URL: the dossier is self-contained, so a fetch is a defect, never a need."""

        def fetch(self, url: str, headers: object = None) -> Any:
            raise FatalURLFetchingError("the page asked for an external resource")

    return RefusingFetcher()


def render(html: str) -> bytes:
    """The PDF of ``html``. Raises :class:`PdfError` when WeasyPrint is missing or refuses the page."""
    try:
        with warnings.catch_warnings():
            # Without the system's HarfBuzz-Subset, WeasyPrint subsets fonts with fontTools and warns, as it is
            # imported, that a future release will need it: a note for packagers, not for the dossier's reader.
            warnings.filterwarnings("ignore", message="HarfBuzz-Subset", category=DeprecationWarning)
            import weasyprint
            from weasyprint.urls import FatalURLFetchingError
    except ImportError as exc:  # the dependency is declared; a partial install is an operator's problem to see
        raise PdfError("WeasyPrint is not installed: pip install weasyprint (make install does)") from exc
    # WeasyPrint reports CSS it ignores (properties only browsers use) as warnings: not the reader's concern.
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    # The cyclic collector paused while WeasyPrint works, as each of its passes would walk every object of the
    # growing document again; the cycles it leaves are collected afterwards, in one pass.
    collecting = gc.isenabled()
    gc.disable()
    try:
        document = weasyprint.HTML(string=html, base_url=None, url_fetcher=_refusing_fetcher())
        pdf: bytes = document.write_pdf()
    except FatalURLFetchingError:
        raise PdfError("the page asked for an external resource; nothing was fetched") from None
    except OSError as exc:  # Pango or fonts missing on the machine
        raise PdfError(f"WeasyPrint could not lay out the page: {exc.strerror or type(exc).__name__}") from None
    finally:
        if collecting:
            gc.enable()
    return pdf
