"""Turning raw hardware values into Joules since open that never go down.

Hardware gives either a cumulative counter (NVML's mJ since driver load, RAPL's
µJ that wraps at ``max_energy_range_uj``, CPU seconds) or an instantaneous power
(NVML's mW where the energy counter is not supported). Both become the same thing
here: a per-device running total that starts at 0 when the meter opens and only
grows, so the layers above can subtract consecutive readings and never see a
negative interval.

Rules, shared by every backend so they behave alike:

* The first value after open, and the first value after a gap (a failed read),
  is a new base: it adds nothing. Energy used while a device was unreadable is
  unknown, and inventing it would be worse than leaving it out.
* A counter that goes backwards wrapped around if the counter's range is known
  (RAPL), else it was reset (driver reload): the new value is a new base and
  the interval loses at most one sampling period of energy.
* Power samples are integrated with the trapezoidal rule between reads.
"""

from __future__ import annotations

import math


class EnergyAccumulator:
    """Running Joules for one device, fed with counter values or power samples."""

    __slots__ = ("_last_power", "_last_raw", "_wrap", "resets", "total", "wraps")

    def __init__(self, wrap_joules: float | None = None) -> None:
        """``wrap_joules``: the counter's range, when it wraps (RAPL); None if it never does."""
        if wrap_joules is not None and not (wrap_joules > 0 and math.isfinite(wrap_joules)):
            raise ValueError(f"wrap_joules must be a positive number, got {wrap_joules!r}")
        self._wrap = wrap_joules
        self._last_raw: float | None = None
        self._last_power: tuple[float, float] | None = None
        self.total = 0.0
        self.resets = 0  # times the counter went backwards without a known wrap
        self.wraps = 0  # times the counter wrapped around its known range

    def counter(self, raw_joules: float) -> float:
        """Feed a cumulative counter value (already in Joules); returns the total."""
        if not math.isfinite(raw_joules):
            raise ValueError(f"counter value is not a finite number: {raw_joules!r}")
        last = self._last_raw
        self._last_raw = raw_joules
        self._last_power = None
        if last is None:
            return self.total
        delta = raw_joules - last
        if delta < 0:
            if self._wrap is not None and delta + self._wrap >= 0:
                delta += self._wrap
                self.wraps += 1
            else:
                delta = 0.0
                self.resets += 1
        self.total += delta
        return self.total

    def power(self, time: float, watts: float) -> float:
        """Feed an instantaneous power sample taken at ``time``; returns the total."""
        if not (math.isfinite(watts) and watts >= 0):
            raise ValueError(f"power is not a non-negative number: {watts!r}")
        last = self._last_power
        self._last_power = (time, watts)
        self._last_raw = None
        if last is None:
            return self.total
        last_time, last_watts = last
        if time > last_time:
            self.total += (last_watts + watts) / 2.0 * (time - last_time)
        return self.total

    def gap(self) -> None:
        """The device could not be read: the next value starts a new base."""
        self._last_raw = None
        self._last_power = None
