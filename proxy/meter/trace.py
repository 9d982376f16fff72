"""Replaying a recorded power trace as a meter, for benchmarks.

A benchmark that replays the same trace gets the same energy every run, so
changes in attribution show up as changes in numbers, not as GPU noise.

File format: CSV with the header ``time_s,device,watts``. Each row sets the power
of ``device`` from ``time_s`` until that device's next row (piecewise constant);
a device draws 0 W before its first row. Times are relative to the first row,
which plays at the moment the meter opens, so absolute recorded timestamps work
too. Rows must be in time order. After the last row the trace loops with period
``last time + last step`` (the last step being the gap between the two latest
distinct times), so the last row lasts as long as the step before it. The energy
reported is the exact integral of that function.
"""

from __future__ import annotations

import csv
import math
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .base import Meter, Reading
from .spec import MeterSpecError

HEADER = ("time_s", "device", "watts")
CONSTANT_PERIOD = 1.0  # period of a trace whose rows all share one time: any value works


@dataclass(frozen=True, slots=True)
class PowerProfile:
    """One device's power over one period of the trace."""

    starts: tuple[float, ...]  # seconds from the start of the period, increasing
    watts: tuple[float, ...]  # power from starts[i] to starts[i + 1] (or the period end)
    cumulative: tuple[float, ...]  # Joules from the period start to starts[i]
    period_joules: float  # Joules over one whole period

    def energy_within(self, offset: float) -> float:
        """Joules from the period start to ``offset`` seconds into it."""
        i = bisect_right(self.starts, offset) - 1
        if i < 0:
            return 0.0
        return self.cumulative[i] + self.watts[i] * (offset - self.starts[i])


@dataclass(frozen=True, slots=True)
class PowerTrace:
    """A parsed trace: devices in order of first appearance and their profiles."""

    devices: tuple[str, ...]
    profiles: tuple[PowerProfile, ...]
    period: float

    def energy(self, device: int, elapsed: float) -> float:
        """Exact Joules of device number ``device`` over ``elapsed`` seconds of replay."""
        if elapsed <= 0:
            return 0.0
        profile = self.profiles[device]
        loops = math.floor(elapsed / self.period)
        offset = min(max(elapsed - loops * self.period, 0.0), self.period)
        return loops * profile.period_joules + profile.energy_within(offset)


def load_trace(path: str | Path) -> PowerTrace:
    """Read and check a trace file; MeterSpecError names the file and line of a problem."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = _read_rows(path, f)
    except OSError as e:
        raise MeterSpecError(f"trace file {path}: cannot read it: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise MeterSpecError(f"trace file {path}: not UTF-8 text: {e.reason}") from e
    return _build(rows)


def _read_rows(path: str | Path, f: TextIO) -> list[tuple[float, str, float]]:
    reader = csv.reader(f)
    header: tuple[str, ...] | None = None
    rows: list[tuple[float, str, float]] = []
    last_time: dict[str, float] = {}
    for record in reader:
        where = f"trace file {path}, line {reader.line_num}"
        if not record or all(not cell.strip() for cell in record):
            continue
        cells = tuple(cell.strip() for cell in record)
        if header is None:
            header = cells
            if header != HEADER:
                raise MeterSpecError(f"{where}: header must be {','.join(HEADER)}, got {record}")
            continue
        if len(cells) != 3:
            raise MeterSpecError(f"{where}: expected 3 fields (time_s,device,watts), got {record}")
        time_text, device, watts_text = cells
        t = _number(where, "time_s", time_text)
        watts = _number(where, "watts", watts_text)
        if watts < 0:
            raise MeterSpecError(f"{where}: watts must be >= 0, got {watts_text}")
        if not device:
            raise MeterSpecError(f"{where}: device is empty")
        if rows and t < rows[-1][0]:
            raise MeterSpecError(f"{where}: time_s {time_text} goes back; rows must be in order")
        if device in last_time and t <= last_time[device]:
            raise MeterSpecError(f"{where}: second row for {device} at time_s {time_text}")
        last_time[device] = t
        rows.append((t, device, watts))
    if header is None:
        raise MeterSpecError(f"trace file {path}: empty, expected a {','.join(HEADER)} header")
    if not rows:
        raise MeterSpecError(f"trace file {path}: no rows after the header")
    return rows


def _number(where: str, field: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MeterSpecError(f"{where}: {field} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise MeterSpecError(f"{where}: {field} {text!r} is not a finite number")
    return value


def _build(rows: list[tuple[float, str, float]]) -> PowerTrace:
    origin = rows[0][0]
    times = sorted({t - origin for t, _, _ in rows})
    period = times[-1] + (times[-1] - times[-2]) if len(times) > 1 else CONSTANT_PERIOD
    per_device: dict[str, list[tuple[float, float]]] = {}
    for t, device, watts in rows:
        per_device.setdefault(device, []).append((t - origin, watts))
    profiles = []
    for steps in per_device.values():
        starts = tuple(start for start, _ in steps)
        watts = tuple(w for _, w in steps)
        ends = (*starts[1:], period)
        cumulative = [0.0]
        for start, end, w in zip(starts, ends, watts, strict=True):
            cumulative.append(cumulative[-1] + w * (end - start))
        profiles.append(
            PowerProfile(
                starts=starts,
                watts=watts,
                cumulative=tuple(cumulative[:-1]),
                period_joules=cumulative[-1],
            )
        )
    return PowerTrace(devices=tuple(per_device), profiles=tuple(profiles), period=period)


class TraceMeter(Meter):
    """Replays a PowerTrace from the moment it opens, looping forever."""

    def __init__(
        self, trace: PowerTrace, *, source: str = "", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = "trace"
        self.estimate = False
        self.devices = trace.devices
        self.update_period = 0.0
        self.trace = trace
        self.source = source
        self._clock = clock
        self._t0 = clock()

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.monotonic) -> TraceMeter:
        """Load ``path`` (MeterSpecError when it is not a valid trace) and start replaying."""
        return cls(load_trace(path), source=str(path), clock=clock)

    def read(self) -> Reading:
        now = self._clock()
        elapsed = now - self._t0
        joules = tuple(self.trace.energy(i, elapsed) for i in range(len(self.devices)))
        return Reading(time=now, joules=joules)

    @property
    def up(self) -> bool:
        return True

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "file": self.source, "period_seconds": self.trace.period}
