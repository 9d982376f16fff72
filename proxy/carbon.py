"""Carbon and facility energy: grid intensity at the request's time, and the data centre's PUE.

A request's facility energy is its device energy times the PUE (power usage effectiveness:
the whole facility's energy over its IT equipment's; 1.0 counts the devices only). Its carbon
is the facility energy times the grid's carbon intensity when it ran, either a constant or
an hourly series as exported by Electricity Maps (gCO2eq/kWh) or WattTime (lbs/MWh).
Outside the series' hours the intensity, and so the carbon, is unknown: never a made-up value.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

JOULES_PER_KWH = 3.6e6
GRAMS_PER_POUND = 453.59237
# What the value columns of common exports are called, most specific first.
_VALUE_COLUMNS = (
    "carbon intensity gco₂eq/kwh (lca)",
    "carbon intensity gco2eq/kwh (lca)",
    "carbon intensity gco₂eq/kwh (direct)",
    "carbon intensity gco2eq/kwh (direct)",
    "carbon_intensity",
    "gco2eq_per_kwh",
    "value",
)
_TIME_COLUMNS = ("datetime (utc)", "datetime", "point_time", "timestamp", "time")


class CarbonConfigError(ValueError):
    """A carbon intensity file that cannot be used; the message names the file and line."""


@dataclass(slots=True)  # one per request: not frozen, which would cost 5 times as much
class Footprint:
    facility_energy_joules: float
    carbon_grams: float | None
    intensity_g_per_kwh: float | None


class IntensitySeries:
    """Hourly (or any regular step) grid intensity: each value holds from its time for one step."""

    def __init__(self, times: list[float], values: list[float]) -> None:
        if not times:
            raise ValueError("an intensity series needs at least one row")
        order = sorted(range(len(times)), key=times.__getitem__)
        self.times = [times[i] for i in order]
        self.values = [values[i] for i in order]
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False) if b > a]
        # The smallest gap is the series' step: a larger one is a missing row, not a longer hour.
        self.step = min(gaps) if gaps else 3600.0

    def at(self, unix_time: float) -> float | None:
        index = bisect.bisect_right(self.times, unix_time) - 1
        if index < 0 or unix_time >= self.times[index] + self.step:
            return None
        return self.values[index]

    @classmethod
    def from_csv(cls, path: str | Path, unit: str = "g_per_kwh") -> IntensitySeries:
        """Read an export: a time column (ISO 8601, UTC unless it says otherwise, or Unix
        seconds) and an intensity column, found by their usual names."""
        factor = {"g_per_kwh": 1.0, "lbs_per_mwh": GRAMS_PER_POUND / 1000.0}[unit]
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise CarbonConfigError(f"cannot read {path}: {error}") from None
        reader = csv.DictReader(text.splitlines())
        columns = {name.strip().lower(): name for name in reader.fieldnames or ()}
        time_column = next((columns[c] for c in _TIME_COLUMNS if c in columns), None)
        value_column = next((columns[c] for c in _VALUE_COLUMNS if c in columns), None)
        if time_column is None or value_column is None:
            raise CarbonConfigError(
                f"{path}: needs a time column ({', '.join(_TIME_COLUMNS)}) and an intensity"
                f" column ({', '.join(_VALUE_COLUMNS)}); found {list(columns)}"
            )
        times, values = [], []
        for line, row in enumerate(reader, start=2):
            raw_value = (row.get(value_column) or "").strip()
            if not raw_value:
                continue  # a missing hour stays unknown
            try:
                times.append(_unix_time(row[time_column]))
                value = float(raw_value) * factor
            except (ValueError, TypeError):
                raise CarbonConfigError(f"{path}, line {line}: cannot read {row!r}") from None
            if not value >= 0:
                raise CarbonConfigError(f"{path}, line {line}: negative intensity {raw_value}")
            values.append(value)
        if not times:
            raise CarbonConfigError(f"{path}: no rows with an intensity")
        return cls(times, values)


def _unix_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class CarbonModel:
    """Turns a request's energy and time into its facility energy and carbon."""

    def __init__(self, pue: float = 1.0, intensity: float | IntensitySeries | None = None) -> None:
        if not pue >= 1.0:
            raise ValueError(f"PUE is at least 1.0, got {pue!r}")
        self.pue = pue
        self.intensity = intensity

    def intensity_at(self, unix_time: float) -> float | None:
        if isinstance(self.intensity, IntensitySeries):
            return self.intensity.at(unix_time)
        return self.intensity

    def footprint(self, energy_joules: float, unix_time: float) -> Footprint:
        facility = energy_joules * self.pue
        intensity = self.intensity_at(unix_time)
        grams = None if intensity is None else facility / JOULES_PER_KWH * intensity
        return Footprint(facility, grams, intensity)
