"""The text of an HTML page as its reader gets it, by language, with the markup it holds listed.

Used on the page ``audit patient-history --format html`` writes, and on the DOM
a real browser built from it: what is inside ``<head>``, ``<style>`` or
``<script>`` or a ``hidden`` element is not text a reader sees; every other
text node is kept with the ``lang`` in force around it, and whether it is in
the reference footer (``class="refs"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
_UNSHOWN = frozenset({"head", "style", "script", "template", "noscript"})
#: Elements that end a line of text: a space between their text and their neighbours'.
_BLOCKS = frozenset(
    {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "tr", "td", "th", "table", "section",
     "header", "footer", "main", "article", "body"}
)  # fmt: skip
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class _Open:
    tag: str
    lang: str | None
    hidden: bool
    refs: bool


@dataclass(frozen=True)
class Chunk:
    """One text node: its text, the language around it, whether it is in the reference footer."""

    text: str
    lang: str | None
    refs: bool


class PageText(HTMLParser):
    """Parses a whole page at construction; see :meth:`text`."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self._open: list[_Open] = []
        self.chunks: list[Chunk] = []
        #: Every element name, and every (element, attribute, value), in the page.
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        #: The text of each element of these names, in order.
        self.headings: dict[str, list[str]] = {"h2": [], "h3": [], "title": []}
        self._heading: tuple[str, list[str]] | None = None
        self.feed(markup)
        self.close()

    def _top(self) -> _Open:
        return self._open[-1] if self._open else _Open("", None, False, False)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend((tag, name, value) for name, value in attrs)
        if tag in _VOID:
            if tag == "br":
                self.handle_data(" ")
            return
        if tag in _BLOCKS:
            self.handle_data(" ")
        parent = self._top()
        named = dict(attrs)
        self._open.append(
            _Open(
                tag,
                named.get("lang", parent.lang),
                parent.hidden or tag in _UNSHOWN or "hidden" in named,
                parent.refs or "refs" in (named.get("class") or "").split(),
            )
        )
        if tag in self.headings:
            self._heading = (tag, [])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCKS:
            self.handle_data(" ")
        if self._heading is not None and self._heading[0] == tag:
            self.headings[tag].append(" ".join("".join(self._heading[1]).split()))
            self._heading = None
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading[1].append(data)
        top = self._top()
        if not top.hidden:
            self.chunks.append(Chunk(data, top.lang, top.refs))

    def text(self, lang: str | None = None, *, refs: bool = True) -> str:
        """The text shown, its white space collapsed: all of it, or that in ``lang``; without the footer's."""
        # A text left out still separates the words on either side of it.
        kept = (c.text if (lang is None or c.lang == lang) and (refs or not c.refs) else " " for c in self.chunks)
        return " ".join("".join(kept).split())


def words(text: str) -> str:
    """``text`` with its white space collapsed as :meth:`PageText.text` does."""
    return " ".join(text.split())
