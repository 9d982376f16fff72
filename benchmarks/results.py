"""One result row per measure, the shape every benchmark hands to `run_all.py`.

Each benchmark prints its own detailed output as before; with `--rows-json PATH` it also
writes its headline figures as rows (measure, target, measured value, verdict), so one runner
can put every benchmark's figures into one table without parsing their text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

PASS, MISS, INFO = "PASS", "MISS", "INFO"
VERDICTS = (PASS, MISS, INFO)


@dataclass(frozen=True)
class Row:
    """One figure: what was measured, what it should be, what it was, and whether that's met.

    `verdict` is PASS or MISS against `target`, or INFO where there is no target (a reference
    figure, such as nginx's overhead, or a benchmark that could not run here, such as the GPU
    checks without a GPU).
    """

    measure: str
    target: str
    value: str
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")


def verdict(ok: bool) -> str:
    return PASS if ok else MISS


def write_rows(path: Path | None, rows: Iterable[Row]) -> None:
    """Write `rows` as a JSON list to `path` (nothing when no path was asked for)."""
    if path is not None:
        path.write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")


def read_rows(path: Path) -> list[Row]:
    return [Row(**fields) for fields in json.loads(path.read_text())]


_HEADER = ("measure", "target", "measured", "result")


def _cells(rows: Sequence[Row]) -> list[tuple[str, str, str, str]]:
    return [(row.measure, row.target, row.value, row.verdict) for row in rows]


def text_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table, for the terminal."""
    cells = [_HEADER, *_cells(rows)]
    widths = [max(len(line[column]) for line in cells) for column in range(4)]

    def line(texts: Sequence[str]) -> str:
        return "  ".join(t.ljust(w) for t, w in zip(texts, widths, strict=True)).rstrip()

    return "\n".join([line(_HEADER), line(["-" * w for w in widths]), *map(line, cells[1:])])


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub-flavoured markdown table (`|` in a cell escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(_HEADER), line(["---"] * 4), *(line(cells) for cells in _cells(rows))])
