"""A meter with constant, known power: for tests, demos and machines without GPUs.

Because the energy is an exact function of time (``watts * elapsed``), tests of
the layers above can assert attribution results to floating-point precision.
It is neither a measurement nor an estimate of real hardware; its name,
``synthetic``, says so in every metric and record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .base import Meter, Reading


class SyntheticMeter(Meter):
    """``count`` devices, each drawing ``watts`` from the moment the meter opens."""

    def __init__(
        self, watts: float, count: int = 1, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(watts) and watts >= 0):
            raise ValueError(f"watts must be a finite number >= 0, got {watts!r}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        self.name = "synthetic"
        self.estimate = False
        self.devices = tuple(f"synthetic{i}" for i in range(count))
        self.update_period = 0.0
        self.watts = float(watts)
        self._clock = clock
        self._t0 = clock()

    def read(self) -> Reading:
        now = self._clock()
        joules = self.watts * max(0.0, now - self._t0)
        return Reading(time=now, joules=(joules,) * len(self.devices))

    @property
    def up(self) -> bool:
        return True

    def _describe_devices(self) -> list[dict[str, object]]:
        return [{"label": label, "watts": self.watts} for label in self.devices]
