"""`joulegate report`: energy, carbon and per-request figures from the ledger, per group.

Sums (requests, kWh, facility kWh, kgCO2e, tokens, images) come from `Ledger.totals`, which
reads the hourly roll-up, so they cost a few thousand rows over any range. The per-request
figures need each record: median and p95 Wh per request, J per output token and Wh per
image are computed in one streaming pass over `Ledger.iter_records`, keeping per group only
an `array('d')` of its requests' energies (8 bytes a metered request: exact quantiles, about
8 MB a million requests) and four running sums.

Definitions (all times UTC; requests grouped by the time they *started*):

- kWh per 1,000 requests = kWh / metered requests x 1,000 (requests whose energy is unknown
  count in `requests`, not in the ratio);
- median, p95: of metered requests' Wh, linear interpolation between closest ranks;
- J per output token = energy of metered requests that produced output tokens / those
  tokens; Wh per image likewise over metered requests that produced images.

An unknown figure is None: "-" in the table and the HTML, an empty field in CSV, null in JSON;
never 0.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import html
import io
import json
import math
import sys
from array import array
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from proxy.ledger import Ledger, Totals
from proxy.study import study_figures

JOULES_PER_KWH = 3_600_000.0
JOULES_PER_WH = 3600.0
DAY = 86400
DIMENSIONS = ("tenant", "task", "model", "team", "day")
FORMATS = ("table", "csv", "json", "html")
DEFAULT_DAYS = 30

# (key, heading) of every figure a group has, in column order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("requests", "requests"),
    ("metered_requests", "metered"),
    ("kwh", "kWh"),
    ("facility_kwh", "facility kWh"),
    ("kg_co2e", "kgCO2e"),
    ("kwh_per_1000_requests", "kWh/1k req"),
    ("median_wh_per_request", "median Wh/req"),
    ("p95_wh_per_request", "p95 Wh/req"),
    ("joules_per_output_token", "J/out token"),
    ("wh_per_image", "Wh/image"),
)


class ReportError(ValueError):
    """A bad argument or an unusable ledger: one line for the user, exit status 2."""


# ---- arguments ----


def parse_when(text: str, *, until: bool = False) -> float:
    """`YYYY-MM-DD` or an ISO date and time (UTC unless it says otherwise) as Unix seconds.
    A bare date is the start of that day, or for `until` its end (the day is included)."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return (moment + timedelta(days=1 if until else 0)).timestamp()
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"expected YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_by(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not names or any(not name for name in names):
        raise ReportError(f"--by: expected a comma-separated list of {', '.join(DIMENSIONS)}")
    for name in names:
        if name not in DIMENSIONS:
            raise ReportError(f"--by: unknown {name!r} (expected {', '.join(DIMENSIONS)})")
    if len(set(names)) != len(names):
        raise ReportError(f"--by: {text!r} names a column twice")
    return names


def add_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument(
        "--since",
        help=f"first day (YYYY-MM-DD, UTC) or moment; default {DEFAULT_DAYS} days before --until",
    )
    parser.add_argument("--until", help="last day, included, or moment, excluded; default now")
    parser.add_argument(
        "--by",
        default="task",
        help=f"group by a comma-separated list of {', '.join(DIMENSIONS)} (default task)",
    )
    parser.add_argument("--format", default="table", help=f"{', '.join(FORMATS)} (default table)")
    parser.add_argument("--out", help="write the report to this file instead of standard output")
    parser.add_argument(
        "--config", default=default_config, help="YAML configuration file (also JOULEGATE_CONFIG)"
    )


# ---- figures ----


@dataclass(slots=True)
class _Sums:
    requests: int = 0
    metered_requests: int = 0
    failed_requests: int = 0
    estimated_requests: int = 0
    energy_joules: float | None = None
    facility_energy_joules: float | None = None
    carbon_grams: float | None = None

    def add(self, totals: Totals) -> None:
        self.requests += totals.requests
        self.metered_requests += totals.energy_requests
        self.failed_requests += totals.failed_requests
        self.estimated_requests += totals.estimated_requests
        self.energy_joules = _add(self.energy_joules, totals.energy_joules)
        self.facility_energy_joules = _add(
            self.facility_energy_joules, totals.facility_energy_joules
        )
        self.carbon_grams = _add(self.carbon_grams, totals.carbon_grams)


@dataclass(slots=True)
class _PerRequest:
    """What one pass over the records keeps for a group."""

    wh: array = field(default_factory=lambda: array("d"))
    token_joules: float = 0.0
    tokens: int = 0
    image_joules: float = 0.0
    images: int = 0


def _add(left: float | None, right: float | None) -> float | None:
    if left is None:
        return right
    return left if right is None else left + right


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _ratio(numerator: float | None, denominator: float) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile of sorted values, interpolated between closest ranks; None if empty."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _figures(sums: _Sums, per: _PerRequest) -> dict[str, Any]:
    ordered = sorted(per.wh)
    kwh = _scaled(sums.energy_joules, 1 / JOULES_PER_KWH)
    return {
        "requests": sums.requests,
        "metered_requests": sums.metered_requests,
        "kwh": kwh,
        "facility_kwh": _scaled(sums.facility_energy_joules, 1 / JOULES_PER_KWH),
        "kg_co2e": _scaled(sums.carbon_grams, 1 / 1000),
        "kwh_per_1000_requests": _scaled(_ratio(kwh, sums.metered_requests), 1000),
        "median_wh_per_request": quantile(ordered, 0.5),
        "p95_wh_per_request": quantile(ordered, 0.95),
        "joules_per_output_token": _ratio(per.token_joules if per.tokens else None, per.tokens),
        "wh_per_image": _ratio(
            per.image_joules / JOULES_PER_WH if per.images else None, per.images
        ),
    }


@dataclass(slots=True)
class Report:
    since: float
    until: float
    by: tuple[str, ...]
    groups: list[tuple[tuple[Any, ...], dict[str, Any]]]  # (key in `by` order, figures)
    total: dict[str, Any]
    failed_requests: int
    estimated_requests: int
    energy_by_task: dict[str, dict[int, float]]  # task -> day -> kWh
    energy_by_tenant: dict[str, dict[int, float]]
    study: list[dict[str, Any]]  # per task: measured vs the study's Table 2


def _key_of(by: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    def key(values: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(int(values["day"]) if name == "day" else values[name] or None for name in by)

    return key


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((value is None, value if value is not None else "") for value in key)


async def build_report(
    ledger: Ledger, since: float, until: float, by: Sequence[str] = ("task",)
) -> Report:
    """The report's figures over requests that started in [since, until)."""
    by = tuple(by)
    key_of = _key_of(by)
    sums: dict[tuple[Any, ...], _Sums] = defaultdict(_Sums)
    per_task: dict[str, _Sums] = defaultdict(_Sums)
    all_sums = _Sums()
    by_task: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    by_tenant: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for totals in await ledger.totals(since, until, period="day"):
        values = {
            "tenant": totals.tenant,
            "task": totals.task,
            "model": totals.model,
            "team": totals.team,
            "day": totals.period_start,
        }
        sums[key_of(values)].add(totals)
        per_task[totals.task].add(totals)
        all_sums.add(totals)
        if totals.energy_joules is not None:
            kwh = totals.energy_joules / JOULES_PER_KWH
            by_task[totals.task][totals.period_start] += kwh
            by_tenant[totals.tenant][totals.period_start] += kwh

    per: dict[tuple[Any, ...], _PerRequest] = defaultdict(_PerRequest)
    async for batch in ledger.iter_records(since, until, batch_size=5000):
        for document in batch:
            joules = document["energy_joules"]
            if joules is None:
                continue
            document["day"] = int(document["started_at"] // DAY * DAY)
            group = per[key_of(document)]
            group.wh.append(joules / JOULES_PER_WH)
            if document["output_tokens"]:
                group.token_joules += joules
                group.tokens += document["output_tokens"]
            if document["images"]:
                group.image_joules += joules
                group.images += document["images"]

    everything = _PerRequest()
    for group in per.values():
        everything.wh.extend(group.wh)
        everything.token_joules += group.token_joules
        everything.tokens += group.tokens
        everything.image_joules += group.image_joules
        everything.images += group.images
    keys = sorted(set(sums) | set(per), key=_sort_key)  # per-only: written between the reads
    groups = [(key, _figures(sums.get(key, _Sums()), per.get(key, _PerRequest()))) for key in keys]

    figures = study_figures()
    study = []
    for task in sorted(set(per_task) | set(figures)):
        task_sums = per_task.get(task, _Sums())
        kwh = _scaled(task_sums.energy_joules, 1 / JOULES_PER_KWH)
        measured = _scaled(_ratio(kwh, task_sums.metered_requests), 1000)
        figure = figures.get(task)
        study.append(
            {
                "task": task,
                "metered_requests": task_sums.metered_requests,
                "kwh_per_1000_requests": measured,
                "study_task": figure.study_task if figure else None,
                "study_kwh_per_1000_mean": figure.kwh_per_1000_mean if figure else None,
                "study_kwh_per_1000_std": figure.kwh_per_1000_std if figure else None,
                "ratio_to_study": (
                    measured / figure.kwh_per_1000_mean
                    if figure and measured is not None and figure.kwh_per_1000_mean
                    else None
                ),
            }
        )
    return Report(
        since=since,
        until=until,
        by=by,
        groups=groups,
        total=_figures(all_sums, everything),
        failed_requests=all_sums.failed_requests,
        estimated_requests=all_sums.estimated_requests,
        energy_by_task={name: dict(days) for name, days in by_task.items()},
        energy_by_tenant={name: dict(days) for name, days in by_tenant.items()},
        study=study,
    )


# ---- rendering ----


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def _moment(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    if moment.hour == moment.minute == moment.second == 0:
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _period(report: Report) -> str:
    """The period in words people read, saying whether its last day is included."""
    end = datetime.fromtimestamp(report.until, UTC)
    if end.hour == end.minute == end.second == 0:
        return f"{_moment(report.since)} to {_day(report.until - DAY)} (UTC, inclusive)"
    return f"{_moment(report.since)} to {_moment(report.until)} (UTC, end excluded)"


def _label(name: str, value: Any) -> str:
    if value is None:
        return "(none)"
    return _day(value) if name == "day" else str(value)


def number(value: float | int | None) -> str:
    """A figure for people: '-' when unknown, thousands separated, four significant digits
    for small ones (no exponent notation)."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    decimals = min(12, max(0, 3 - math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def _rows(report: Report, *, total: bool) -> list[list[str]]:
    rows = [
        [_label(name, value) for name, value in zip(report.by, key, strict=True)]
        + [number(figures[column]) for column, _ in COLUMNS]
        for key, figures in report.groups
    ]
    if total:
        rows.append(
            ["all"] + [""] * (len(report.by) - 1) + [number(report.total[c]) for c, _ in COLUMNS]
        )
    return rows


def render_table(report: Report) -> str:
    header = [*report.by, *(heading for _, heading in COLUMNS)]
    rows = _rows(report, total=True)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    keys = len(report.by)

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < keys else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [f"joulegate report, {_period(report)}", "", line(header), rule]
    lines += [line(row) for row in rows[:-1]]
    lines += [rule, line(rows[-1])]
    return "\n".join(lines) + "\n"


def render_csv(report: Report) -> str:
    """One row per group, full precision; an unknown figure is an empty field."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*report.by, *(column for column, _ in COLUMNS)])
    for key, figures in report.groups:
        writer.writerow(
            [
                _label(name, value) if value is not None else ""
                for name, value in zip(report.by, key, strict=True)
            ]
            + ["" if figures[column] is None else repr(figures[column]) for column, _ in COLUMNS]
        )
    return out.getvalue()


def report_document(report: Report) -> dict[str, Any]:
    def key_document(key: tuple[Any, ...]) -> dict[str, Any]:
        return {
            name: (_day(value) if name == "day" and value is not None else value)
            for name, value in zip(report.by, key, strict=True)
        }

    return {
        "since": datetime.fromtimestamp(report.since, UTC).isoformat(),
        "until": datetime.fromtimestamp(report.until, UTC).isoformat(),
        "by": list(report.by),
        "groups": [{**key_document(key), **figures} for key, figures in report.groups],
        "total": {
            **report.total,
            "failed_requests": report.failed_requests,
            "estimated_requests": report.estimated_requests,
        },
        "study_comparison": report.study,
    }


def render_json(report: Report) -> str:
    return json.dumps(report_document(report), indent=2) + "\n"


# ---- HTML: one file, inline CSS and SVG, no script ----

# Okabe-Ito, safe for colour-blind readers, then a few more distinct hues.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#999999",
)
MAX_SERIES = len(PALETTE) - 1  # beyond that, the smallest series are drawn as "other"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  color: #1b1b1b; margin: 2em auto; max-width: 1180px; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .1em; } h2 { font-size: 1.2em; margin-top: 2em;
  border-bottom: 1px solid #ccc; padding-bottom: .2em; }
.muted { color: #555; } .small { font-size: .85em; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .6em .9em; min-width: 9em; }
.card .value { font-size: 1.35em; font-weight: 600; } .card .name { color: #555; font-size: .85em; }
table { border-collapse: collapse; width: 100%; font-size: .88em; }
th, td { padding: .3em .5em; border-bottom: 1px solid #e3e3e3; }
th { background: #f3f3f3; text-align: left; } td.n, th.n { text-align: right;
  font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid #888; }
svg { display: block; margin: .6em 0; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, Arial, sans-serif; fill: #333; }
figure { margin: 0; page-break-inside: avoid; break-inside: avoid; }
figcaption { font-size: .85em; color: #555; }
@media print { body { margin: 0; max-width: none; font-size: 11px; }
  h2 { page-break-after: avoid; break-after: avoid; } tr { page-break-inside: avoid; } }
@page { size: A4 landscape; margin: 12mm; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _nice_step(top: float, ticks: int = 5) -> float:
    raw = top / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _series(data: dict[str, dict[int, float]]) -> tuple[list[str], dict[str, dict[int, float]]]:
    """The largest series by total, the rest folded into `other`."""
    ordered = sorted(data, key=lambda name: (-sum(data[name].values()), name))
    if len(ordered) <= MAX_SERIES + 1:
        return ordered, data
    kept = ordered[:MAX_SERIES]
    other: dict[int, float] = defaultdict(float)
    for name in ordered[MAX_SERIES:]:
        for day, kwh in data[name].items():
            other[day] += kwh
    return [*kept, "other"], {**{name: data[name] for name in kept}, "other": dict(other)}


def stacked_bars_svg(data: dict[str, dict[int, float]], title: str) -> str:
    """Energy per UTC day, one bar a day, one colour per series."""
    names, data = _series(data)
    days = sorted({day for series in data.values() for day in series})
    if not days:
        return f'<p class="muted">No metered energy to chart for {_e(title)}.</p>'
    days = list(range(int(days[0]), int(days[-1]) + DAY, DAY))  # days without traffic: gaps
    stacks = {day: sum(data[name].get(day, 0.0) for name in names) for day in days}
    top = max(stacks.values()) or 1.0
    step = _nice_step(top)
    top = math.ceil(top / step) * step
    width, height, left, right, upper, lower = 1100, 320, 70, 180, 20, 50
    plot_w, plot_h = width - left - right, height - upper - lower
    slot = plot_w / len(days)
    bar = max(1.0, slot * 0.75)
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(title)}">'
    ]
    tick = 0.0
    while tick <= top + step / 2:
        y = upper + plot_h - tick / top * plot_h
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(f"{tick:g}")}</text>'
        )
        tick += step
    parts.append(
        f'<text x="14" y="{upper + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {upper + plot_h / 2:.0f})">kWh</text>'
    )
    label_every = max(1, math.ceil(len(days) / 16))
    for index, day in enumerate(days):
        x = left + index * slot + (slot - bar) / 2
        base = upper + plot_h
        for colour, name in zip(PALETTE, names, strict=False):
            kwh = data[name].get(day, 0.0)
            if kwh <= 0:
                continue
            h = kwh / top * plot_h
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.2f}" '
                f'fill="{colour if name != "other" else PALETTE[-1]}">'
                f"<title>{_e(_day(day))} {_e(name)}: {_e(number(kwh))} kWh</title></rect>"
            )
        if index % label_every == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{upper + plot_h + 16}" text-anchor="middle">'
                f"{_e(_day(day)[5:])}</text>"
            )
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{upper + plot_h}" y2="{upper + plot_h}" '
        'stroke="#333"/>'
    )
    for index, name in enumerate(names):
        colour = PALETTE[index] if name != "other" else PALETTE[-1]
        y = upper + 6 + index * 20
        shown = name if len(name) <= 22 else name[:21] + "…"
        parts.append(
            f'<rect x="{left + plot_w + 16}" y="{y}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{left + plot_w + 34}" y="{y + 10}">{_e(shown)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def study_svg(study: list[dict[str, Any]]) -> str:
    """Horizontal bars on a log scale: measured kWh per 1,000 requests beside the study's."""
    rows = [
        row
        for row in study
        if row["kwh_per_1000_requests"] is not None or row["study_kwh_per_1000_mean"] is not None
    ]
    values = [
        value
        for row in rows
        for value in (row["kwh_per_1000_requests"], row["study_kwh_per_1000_mean"])
        if value is not None and value > 0
    ]
    if not values:
        return '<p class="muted">No figures to compare.</p>'
    low = 10 ** math.floor(math.log10(min(values)))
    high = 10 ** math.ceil(math.log10(max(values)))
    if high <= low:
        high = low * 10
    width, left, right, row_h = 1100, 170, 90, 34
    height = 40 + row_h * len(rows) + 30
    plot_w = width - left - right

    def x_of(value: float) -> float:
        return left + (math.log10(value) - math.log10(low)) / math.log10(high / low) * plot_w

    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        'aria-label="kWh per 1,000 requests by task, measured and the study">'
    ]
    decade = low
    while decade <= high * 1.0001:
        x = x_of(decade)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="24" y2="{height - 30}" stroke="#e3e3e3"/>'
            f'<text x="{x:.1f}" y="{height - 14}" text-anchor="middle">{_e(f"{decade:g}")}</text>'
        )
        decade *= 10
    parts.append(
        f'<rect x="{left}" y="4" width="12" height="12" fill="{PALETTE[0]}"/>'
        f'<text x="{left + 18}" y="14">measured here</text>'
        f'<rect x="{left + 140}" y="4" width="12" height="12" fill="{PALETTE[1]}"/>'
        f'<text x="{left + 158}" y="14">study, Table 2 mean</text>'
        f'<text x="{left + plot_w}" y="14" text-anchor="end">kWh per 1,000 requests '
        "(log scale)</text>"
    )
    for index, row in enumerate(rows):
        y = 30 + index * row_h
        parts.append(
            f'<text x="{left - 8}" y="{y + row_h / 2 + 2:.0f}" text-anchor="end">'
            f"{_e(row['task'])}</text>"
        )
        for offset, (value, colour) in enumerate(
            (
                (row["kwh_per_1000_requests"], PALETTE[0]),
                (row["study_kwh_per_1000_mean"], PALETTE[1]),
            )
        ):
            bar_y = y + 3 + offset * 13
            if value is None or value <= 0:
                parts.append(f'<text x="{left + 4}" y="{bar_y + 10}">-</text>')
                continue
            end = max(x_of(value), left + 1)
            parts.append(
                f'<rect x="{left}" y="{bar_y}" width="{end - left:.1f}" height="11" '
                f'fill="{colour}"><title>{_e(number(value))}</title></rect>'
                f'<text x="{end + 4:.1f}" y="{bar_y + 10}">{_e(number(value))}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    total = report.total
    top_task = max(
        report.energy_by_task, key=lambda n: sum(report.energy_by_task[n].values()), default=None
    )
    top_tenant = max(
        report.energy_by_tenant,
        key=lambda n: sum(report.energy_by_tenant[n].values()),
        default=None,
    )
    coverage = f"{total['metered_requests'] / total['requests']:.1%}" if total["requests"] else "-"
    cards = [
        ("requests", number(total["requests"])),
        ("metered (energy known)", f"{number(total['metered_requests'])} ({coverage})"),
        ("device energy, kWh", number(total["kwh"])),
        ("facility energy, kWh", number(total["facility_kwh"])),
        ("emissions, kgCO2e", number(total["kg_co2e"])),
        ("kWh per 1,000 requests", number(total["kwh_per_1000_requests"])),
        ("median Wh per request", number(total["median_wh_per_request"])),
        ("p95 Wh per request", number(total["p95_wh_per_request"])),
    ]
    header = "".join(f"<th>{_e(name)}</th>" for name in report.by) + "".join(
        f'<th class="n">{_e(heading)}</th>' for _, heading in COLUMNS
    )
    keys = len(report.by)
    body = []
    rows = _rows(report, total=True)
    for index, row in enumerate(rows):
        css = ' class="total"' if index == len(rows) - 1 else ""
        cells = "".join(
            f"<td>{_e(cell)}</td>" if i < keys else f'<td class="n">{_e(cell)}</td>'
            for i, cell in enumerate(row)
        )
        body.append(f"<tr{css}>{cells}</tr>")
    study_rows = "".join(
        f"<tr><td>{_e(row['task'])}</td><td>{_e(row['study_task'] or '-')}</td>"
        f'<td class="n">{_e(number(row["metered_requests"]))}</td>'
        f'<td class="n">{_e(number(row["kwh_per_1000_requests"]))}</td>'
        f'<td class="n">{_e(number(row["study_kwh_per_1000_mean"]))}</td>'
        f'<td class="n">{_e(number(row["study_kwh_per_1000_std"]))}</td>'
        f'<td class="n">{_e(number(row["ratio_to_study"]))}</td></tr>'
        for row in report.study
    )
    notes = []
    if report.estimated_requests:
        notes.append(
            f"{number(report.estimated_requests)} requests carry estimated energy "
            "(no device meter)."
        )
    if report.failed_requests:
        notes.append(
            f"{number(report.failed_requests)} requests did not complete normally "
            "(aborted or answered by joulegate); they are counted."
        )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>joulegate sustainability report, {_e(_period(report))}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>Inference energy and emissions</h1>
<p class="muted">joulegate sustainability report &middot; {_e(_period(report))} &middot;
grouped by {_e(", ".join(report.by))} &middot; generated {_e(generated)}</p>

<h2>Summary</h2>
<div class="cards">{
        "".join(
            f'<div class="card"><div class="value">{_e(value)}</div>'
            f'<div class="name">{_e(name)}</div></div>'
            for name, value in cards
        )
    }</div>
<p>Most energy by task: <strong>{_e(top_task or "-")}</strong>; by tenant:
<strong>{_e(top_tenant or "-")}</strong>. {_e(" ".join(notes))}</p>

<h2>Figures by {_e(", ".join(report.by))}</h2>
<table>
<thead><tr>{header}</tr></thead>
<tbody>
{"".join(body)}
</tbody>
</table>
<p class="small muted">kWh: energy measured at the accelerators. Facility kWh: times the
configured PUE. kgCO2e: facility energy times the grid's carbon intensity at the hour of the
request. kWh per 1,000 requests counts metered requests only. Median and p95 are of single
requests' energy. J per output token and Wh per image cover metered requests that produced
tokens or images. "-": unknown (never counted as zero).</p>

<h2>Energy over time</h2>
<figure>{stacked_bars_svg(report.energy_by_task, "energy per day by task")}
<figcaption>Device energy per UTC day, by task (kWh).</figcaption></figure>
<figure>{stacked_bars_svg(report.energy_by_tenant, "energy per day by tenant")}
<figcaption>Device energy per UTC day, by tenant (kWh).</figcaption></figure>

<h2>Compared with published figures</h2>
<figure>{study_svg(report.study)}
<figcaption>kWh per 1,000 requests per task here beside the means of Luccioni, Jernite
&amp; Strubell, "Power Hungry Processing" (FAccT 2024), Table 2: A100 GPU, batch size 1,
the study's own models. Different hardware, models and batching make these a sense of
scale, not a benchmark.</figcaption></figure>
<table>
<thead><tr><th>task</th><th>study task</th><th class="n">metered requests</th>
<th class="n">kWh/1k here</th><th class="n">study mean</th><th class="n">study std</th>
<th class="n">here / study</th></tr></thead>
<tbody>{study_rows}</tbody>
</table>
</body>
</html>
"""


RENDERERS: dict[str, Callable[[Report], str]] = {
    "table": render_table,
    "csv": render_csv,
    "json": render_json,
    "html": render_html,
}


# ---- the command ----


def check_arguments(arguments: argparse.Namespace) -> tuple[float, float, tuple[str, ...], str]:
    if arguments.format not in FORMATS:
        raise ReportError(
            f"--format: expected one of {', '.join(FORMATS)}, got {arguments.format!r}"
        )
    by = parse_by(arguments.by)
    until = (
        parse_when(arguments.until, until=True)
        if arguments.until
        else datetime.now(UTC).timestamp()
    )
    since = parse_when(arguments.since) if arguments.since else until - DEFAULT_DAYS * DAY
    if not since < until:
        raise ReportError("--since must be before --until")
    return since, until, by, arguments.format


async def _report(spec: str, data_dir: str, since: float, until: float, by: tuple[str, ...]):
    from proxy.ledger import LedgerError, open_ledger, parse_spec

    parsed = parse_spec(spec)
    if parsed.kind == "off":
        raise ReportError("the configuration has no ledger (ledger: off)")
    if parsed.kind == "sqlite":
        path = Path(data_dir) / parsed.target
        if not path.is_file():  # a report never creates an empty ledger at a mistyped path
            raise ReportError(f"no ledger at {path} (check ledger and data_dir)")
    ledger = open_ledger(spec, data_dir, instance="joulegate-report")
    assert ledger is not None
    try:
        await ledger.start()
    except LedgerError as error:
        raise ReportError(str(error)) from None
    try:
        return await build_report(ledger, since, until, by)
    finally:
        await ledger.close()


def report_command(arguments: argparse.Namespace) -> int:
    """`joulegate report`: 0 when written, 2 with one line on standard error otherwise."""
    from proxy.config import ConfigError, load_config

    try:
        since, until, by, output = check_arguments(arguments)
        try:
            config = load_config(arguments.config)
        except ConfigError as error:
            raise ReportError(f"configuration error: {error}") from None
        report = asyncio.run(_report(config.ledger, config.data_dir, since, until, by))
        text = RENDERERS[output](report)
        if arguments.out:
            try:
                Path(arguments.out).write_text(text, encoding="utf-8")
            except OSError as error:
                raise ReportError(f"cannot write {arguments.out}: {error.strerror}") from None
        else:
            sys.stdout.write(text)
    except ReportError as error:
        print(f"joulegate report: {error}", file=sys.stderr)
        return 2
    return 0
