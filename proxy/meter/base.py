"""The device-layer contract: what every energy meter gives the sampler.

A meter turns one kind of hardware (or a stand-in for it) into cumulative Joules
per device. It knows nothing about HTTP or requests. Consumers subtract two
consecutive readings of a device to get the energy used between them; all the
awkward parts of real counters (resets, wrap-around, devices vanishing) are
handled behind this interface so the monitor layer never has to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of every device of a meter.

    ``joules[i]`` is the cumulative energy of ``Meter.devices[i]`` since the meter
    opened, non-decreasing over the meter's life, or ``None`` when that device could
    not be read this time. Energy used while a device was unreadable is not counted:
    the first good value after a gap continues from the last good value.
    """

    time: float  # time.monotonic() seconds (or the meter's injected clock) when read
    joules: tuple[float | None, ...]


class Meter(ABC):
    """A source of cumulative Joules per device.

    Subclasses set the four attributes in ``__init__``. ``read()`` may block (NVML
    calls do), so the sampler calls it from its own thread; ``up``, ``error`` and
    ``describe()`` only look at state published by the last read and are cheap to
    call from the event loop while a read is in progress.
    """

    name: str  # "nvml", "cpu", "synthetic", "trace": goes into metric labels and records
    estimate: bool  # True when values are an estimate, not a measurement
    devices: tuple[str, ...]  # stable labels, same order as Reading.joules
    update_period: float  # seconds; readings closer than this may show no new energy

    @abstractmethod
    def read(self) -> Reading:
        """Read every device now. Never raises: failures become ``None`` entries."""

    @property
    @abstractmethod
    def up(self) -> bool:
        """False when the last read failed for any device, or the meter is down."""

    @property
    def error(self) -> str | None:
        """Why the meter is not up right now, as one line of text; None when up."""
        return None

    def describe(self) -> dict[str, object]:
        """JSON-able state for ``/joulegate/health``."""
        return {
            "name": self.name,
            "estimate": self.estimate,
            "update_period": self.update_period,
            "up": self.up,
            "error": self.error,
            "devices": self._describe_devices(),
        }

    def _describe_devices(self) -> list[dict[str, object]]:
        """Per-device detail for ``describe()``; backends add what they know."""
        return [{"label": label} for label in self.devices]

    def close(self) -> None:  # noqa: B027 - optional hook, most meters hold nothing
        """Release the hardware handle. Idempotent."""

    def __enter__(self) -> Meter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} devices={list(self.devices)} up={self.up}>"
