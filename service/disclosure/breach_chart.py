"""The breach dossier's timeline: appointments disclosed per hour, by view, as an inline SVG. Pure: no I/O.

A stacked bar per hour (UTC) from the first disclosure to the last, one colour
per view, a scale on the left, dates below. A long incident would make bars
thinner than a line: past :data:`MAX_BARS` hours the bars are days, and past
that many days, weeks; the chart's title says which. The SVG has no script,
no external reference and no text but numbers, dates and fixed words, and it
carries a text summary (``aria-label``, ``<title>``) for screen readers and
for the PDF's text layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape

from service import models
from service.disclosure.breach import Activity

#: The most bars drawn before they are made longer (an hour, then a day, then a week).
MAX_BARS = 336
WIDTH = 760
HEIGHT = 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 28, 44
#: The colour of each view's bars, with the word for it in the legend.
VIEW_STYLE = {
    models.View.BASIC: ("#4a78b5", "basic view (times, practitioner)"),
    models.View.CONTACT: ("#c0392b", "contact view (name, sex, phone, email)"),
}
#: Presentation attributes, not classes: they hold in every SVG renderer (a browser's, WeasyPrint's).
_TEXT = 'font-family="DejaVu Sans, Arial, sans-serif" font-size="11" fill="#333"'
_CAPTION = 'font-family="DejaVu Sans, Arial, sans-serif" font-size="12" font-weight="bold" fill="#1d3a66"'
_BUCKETS = ((timedelta(hours=1), "hour"), (timedelta(days=1), "day"), (timedelta(weeks=1), "week"))


@dataclass(frozen=True, slots=True)
class Bucketed:
    """The activity regrouped: the bar length, its name, the first bar's start, and each bar's count per view."""

    size: timedelta
    unit: str
    start: datetime
    bars: list[dict[models.View, int]]


def bucket(activity: Sequence[Activity]) -> Bucketed | None:
    """Regroup hourly activity into at most :data:`MAX_BARS` bars; ``None`` when there is none."""
    if not activity:
        return None
    first = min(a.hour_start_time for a in activity)
    last = max(a.hour_start_time for a in activity)
    for size, unit in _BUCKETS:
        start = _floor(first, size)
        count = (last - start) // size + 1
        if count <= MAX_BARS or unit == "week":
            bars: list[dict[models.View, int]] = [{} for _ in range(count)]
            for item in activity:
                bar = bars[(item.hour_start_time - start) // size]
                bar[item.view] = bar.get(item.view, 0) + item.disclosures
            return Bucketed(size, unit, start, bars)
    raise AssertionError("unreachable")


def _floor(value: datetime, size: timedelta) -> datetime:
    value = value.astimezone(UTC)
    if size >= timedelta(weeks=1):
        day = value.replace(hour=0, minute=0, second=0, microsecond=0)
        return day - timedelta(days=day.weekday())  # weeks start on Monday (ISO 8601)
    if size >= timedelta(days=1):
        return value.replace(hour=0, minute=0, second=0, microsecond=0)
    return value.replace(minute=0, second=0, microsecond=0)


def _nice_step(peak: int) -> int:
    """A round step for the scale, giving four or five lines up to ``peak``."""
    step = 1
    while peak / step > 5:
        for factor in (2, 5, 10):
            if peak / (step * factor) <= 5:
                return step * factor
        step *= 10
    return step


def _label(value: datetime, unit: str) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if unit == "hour" else value.strftime("%Y-%m-%d")


def summary(activity: Sequence[Activity]) -> str:
    """The chart in one sentence (its text alternative)."""
    grouped = bucket(activity)
    if grouped is None:
        return "No appointment was disclosed in the window."
    totals = {view: sum(bar.get(view, 0) for bar in grouped.bars) for view in models.View}
    busiest = max(range(len(grouped.bars)), key=lambda n: sum(grouped.bars[n].values()))
    at = grouped.start + busiest * grouped.size
    parts = ", ".join(f"{totals[view]:,} in the {VIEW_STYLE[view][1].split(' (')[0]}" for view in models.View)
    return (
        f"Appointments disclosed per {grouped.unit} (UTC) from {_label(grouped.start, grouped.unit)} to "
        f"{_label(grouped.start + (len(grouped.bars) - 1) * grouped.size, grouped.unit)}: {parts}; the busiest "
        f"{grouped.unit}, {_label(at, grouped.unit)}, had {sum(grouped.bars[busiest].values()):,}."
    )


def render(activity: Sequence[Activity]) -> str:
    """The timeline as an ``<svg>`` element, or a paragraph saying there is nothing to draw."""
    grouped = bucket(activity)
    if grouped is None:
        return f'<p class="empty">{escape(summary(activity))}</p>'
    peak = max(sum(bar.values()) for bar in grouped.bars) or 1
    step = _nice_step(peak)
    top = -(-peak // step) * step
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / len(grouped.bars)
    gap = min(2.0, slot * 0.2)
    label = escape(summary(activity), quote=True)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{label}">',
        f"<title>{label}</title>",
        f'<text x="{_LEFT}" y="16" {_CAPTION}>Appointments disclosed per {grouped.unit} (UTC)</text>',
    ]
    for n in range(0, top + 1, step):
        y = _TOP + plot_h - plot_h * n / top
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{WIDTH - _RIGHT}" y2="{y:.1f}" stroke="#d5dbe3" stroke-width="1"/>'
        )
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" {_TEXT} text-anchor="end">{n:,}</text>')
    for index, bar in enumerate(grouped.bars):
        x = _LEFT + index * slot + gap / 2
        base: float = _TOP + plot_h
        at = _label(grouped.start + index * grouped.size, grouped.unit)
        for view in models.View:
            count = bar.get(view, 0)
            if not count:
                continue
            height = plot_h * count / top
            base -= height
            colour, words = VIEW_STYLE[view]
            parts.append(
                f'<rect x="{x:.2f}" y="{base:.2f}" width="{max(slot - gap, 0.5):.2f}" height="{height:.2f}" '
                f'fill="{colour}"><title>{at}: {count:,} in the {escape(words)}</title></rect>'
            )
    last = len(grouped.bars) - 1
    spacing = max(1, len(grouped.bars) // 4)
    # Labels a quarter of the chart apart, none too close to the last one to be read.
    ticks = sorted({0, last, *(n for n in range(0, last, spacing) if last - n >= spacing / 2)})
    for index in ticks:
        x = _LEFT + (index + 0.5) * slot
        anchor = "start" if index == 0 else "end" if index == len(grouped.bars) - 1 else "middle"
        text = _label(grouped.start + index * grouped.size, grouped.unit)
        parts.append(f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" {_TEXT} text-anchor="{anchor}">{text}</text>')
    legend_x = _LEFT
    for view in models.View:
        colour, words = VIEW_STYLE[view]
        parts.append(f'<rect x="{legend_x}" y="{HEIGHT - 14}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{HEIGHT - 5}" {_TEXT}>{escape(words)}</text>')
        legend_x += 300
    parts.append(
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{WIDTH - _RIGHT}" y2="{_TOP + plot_h}" '
        'stroke="#333" stroke-width="1"/>'
    )
    parts.append("</svg>")
    return "\n".join(parts)
