"""CPU energy: RAPL through powercap where readable, else an estimate from CPU time.

RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``) is a measurement of each
CPU package, so that meter has ``estimate=False``. It wraps at
``max_energy_range_uj``, which the accumulator undoes. Since CVE-2020-8694 the
file is usually readable by root only, and containers rarely mount it.

Everywhere else the meter estimates: CPU seconds times ``watts_per_core``. With a
pid it counts that process and its waited-for children (utime, stime, cutime,
cstime from ``/proc/PID/stat``); without one, the machine's busy time from
``/proc/stat``. Such numbers are rough, which is why ``estimate=True`` goes into
every metric and record they produce. Both roots are injectable for tests.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .accumulate import EnergyAccumulator
from .base import Meter, Reading

POWERCAP_ROOT = "/sys/class/powercap"
PROC_ROOT = "/proc"
RAPL_UPDATE_PERIOD = 0.001  # s: RAPL counters refresh about every millisecond
_TOP_LEVEL_ZONE = re.compile(r"intel-rapl:(\d+)")  # "intel-rapl:0:1" subzones are inside these


@dataclass(slots=True)
class RaplZone:
    """One top-level RAPL zone (a CPU package, or psys)."""

    label: str  # the zone's ``name`` file: "package-0"
    path: Path  # the zone's directory
    max_range_uj: int | None  # the counter wraps after this many µJ; None if unknown
    energy: EnergyAccumulator = field(init=False)
    error: str | None = None

    def __post_init__(self) -> None:
        wrap = self.max_range_uj / 1e6 if self.max_range_uj else None
        self.energy = EnergyAccumulator(wrap_joules=wrap)

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


def find_rapl_zones(root: str | Path = POWERCAP_ROOT) -> list[RaplZone]:
    """Top-level RAPL zones whose counter this process can read, in index order.

    Subzones (core, uncore, dram inside a package) are skipped because the package
    already includes them; ``psys`` (whole platform, packages included) is skipped
    when package zones exist, for the same reason: no energy is counted twice.
    """
    base = Path(root)
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    zones: list[tuple[int, RaplZone]] = []
    for entry in entries:
        match = _TOP_LEVEL_ZONE.fullmatch(entry.name)
        if match is None:
            continue
        try:
            int((entry / "energy_uj").read_text().strip())
        except (OSError, ValueError):
            continue  # unreadable (root-only) or absent: not usable
        label = _read_text(entry / "name") or entry.name
        max_range = _read_text(entry / "max_energy_range_uj")
        max_range_uj = int(max_range) if max_range and max_range.isdigit() else None
        zones.append((int(match.group(1)), RaplZone(label, entry, max_range_uj)))
    zones.sort(key=lambda pair: pair[0])
    found = [zone for _, zone in zones]
    if any(zone.label != "psys" for zone in found):
        found = [zone for zone in found if zone.label != "psys"]
    seen: set[str] = set()
    for zone in found:  # two zones with one name would merge in metrics: keep labels unique
        if zone.label in seen:
            zone.label = f"{zone.label}-{zone.path.name}"
        seen.add(zone.label)
    return found


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class RaplMeter(Meter):
    """Cumulative Joules per CPU package from RAPL."""

    def __init__(self, zones: list[RaplZone], *, clock: Callable[[], float] = time.monotonic):
        if not zones:
            raise ValueError("RaplMeter needs at least one zone")
        self.name = "cpu"
        self.estimate = False
        self.devices = tuple(zone.label for zone in zones)
        self.update_period = RAPL_UPDATE_PERIOD
        self.zones = zones
        self._clock = clock
        self._lock = threading.Lock()
        self._up = False
        self._error: str | None = None
        self.read()  # the base: totals count from open

    def read(self) -> Reading:
        with self._lock:
            start = self._clock()
            raw: list[int | None] = []
            for zone in self.zones:
                try:
                    raw.append(zone.read_uj())
                    zone.error = None
                except (OSError, ValueError) as e:
                    raw.append(None)
                    zone.error = f"{zone.label}: cannot read {zone.path / 'energy_uj'}: {e}"
            now = start + (self._clock() - start) / 2
            joules: list[float | None] = []
            for zone, value in zip(self.zones, raw, strict=True):
                if value is None:
                    zone.energy.gap()
                    joules.append(None)
                else:
                    joules.append(zone.energy.counter(value / 1e6))  # µJ -> J
            errors = [zone.error for zone in self.zones if zone.error]
            self._error = "; ".join(errors) if errors else None
            self._up = not errors
            return Reading(time=now, joules=tuple(joules))

    @property
    def up(self) -> bool:
        return self._up

    @property
    def error(self) -> str | None:
        return self._error

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "source": "rapl"}

    def _describe_devices(self) -> list[dict[str, object]]:
        return [
            {
                "label": zone.label,
                "path": str(zone.path),
                "max_energy_range_uj": zone.max_range_uj,
                "wraps": zone.energy.wraps,
                "error": zone.error,
            }
            for zone in self.zones
        ]


class CpuTimeMeter(Meter):
    """Estimated Joules: CPU seconds of a process (or the machine) times watts per core."""

    def __init__(
        self,
        watts_per_core: float = 10.0,
        *,
        pid: int | None = None,
        proc_root: str | Path = PROC_ROOT,
        clock: Callable[[], float] = time.monotonic,
        clk_tck: int | None = None,
    ) -> None:
        if not (math.isfinite(watts_per_core) and watts_per_core >= 0):
            raise ValueError(f"watts_per_core must be a finite number >= 0, got {watts_per_core}")
        self.name = "cpu"
        self.estimate = True
        self.devices = ("cpu",)
        self.watts_per_core = float(watts_per_core)
        self.pid = pid
        self._proc = Path(proc_root)
        self._ticks_per_second = clk_tck or _clock_ticks()
        self.update_period = 1.0 / self._ticks_per_second  # CPU time moves in whole ticks
        self._clock = clock
        self._lock = threading.Lock()
        self._energy = EnergyAccumulator()
        self._up = False
        self._error: str | None = None
        self.read()  # the base: totals count from open

    def cpu_seconds(self) -> float:
        """CPU time so far: the process and its reaped children, or all busy CPUs."""
        if self.pid is not None:
            return _process_ticks(self._proc / str(self.pid) / "stat") / self._ticks_per_second
        return _busy_ticks(self._proc / "stat") / self._ticks_per_second

    def read(self) -> Reading:
        with self._lock:
            now = self._clock()
            try:
                seconds = self.cpu_seconds()
            except (OSError, ValueError, IndexError) as e:
                self._energy.gap()
                self._up = False
                self._error = f"cpu: {_what(self.pid)}: {e}"
                return Reading(time=now, joules=(None,))
            self._up = True
            self._error = None
            return Reading(time=now, joules=(self._energy.counter(seconds * self.watts_per_core),))

    @property
    def up(self) -> bool:
        return self._up

    @property
    def error(self) -> str | None:
        return self._error

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "source": "cpu-time",
            "watts_per_core": self.watts_per_core,
            "pid": self.pid,
        }


def _process_ticks(stat: Path) -> int:
    """utime + stime + cutime + cstime from /proc/PID/stat, in clock ticks."""
    text = stat.read_text()
    # The command name (field 2) is in parentheses and may hold spaces or ")".
    fields = text[text.rindex(")") + 1 :].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17.
    return sum(int(value) for value in fields[11:15])


def _busy_ticks(stat: Path) -> int:
    """Busy time of all CPUs from /proc/stat's ``cpu`` line, in clock ticks.

    user + nice + system + irq + softirq. Idle and iowait are not busy; steal is
    time the hypervisor gave to someone else; guest time is already inside user.
    """
    for line in stat.read_text().splitlines():
        if line.startswith("cpu "):
            values = [int(value) for value in line.split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq = values[:7]
            return user + nice + system + irq + softirq
    raise ValueError(f"no 'cpu' line in {stat}")


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK")) or 100
    except (ValueError, OSError, AttributeError):
        return 100


def _what(pid: int | None) -> str:
    return f"process {pid}" if pid is not None else "machine CPU time"


def open_cpu_meter(
    *,
    clock: Callable[[], float] = time.monotonic,
    watts_per_core: float = 10.0,
    pid: int | None = None,
    powercap_root: str | Path = POWERCAP_ROOT,
    proc_root: str | Path = PROC_ROOT,
    clk_tck: int | None = None,
) -> Meter:
    """RAPL when a zone is readable, else the CPU-time estimate."""
    zones = find_rapl_zones(powercap_root)
    if zones:
        return RaplMeter(zones, clock=clock)
    return CpuTimeMeter(watts_per_core, pid=pid, proc_root=proc_root, clock=clock, clk_tck=clk_tck)
