"""The device layer: cumulative Joules per device, from NVML, RAPL, or stand-ins.

Nothing here knows about HTTP or requests. ``open_meter(spec)`` turns a
``--meter`` spec into a :class:`Meter`; the sampler calls ``read()`` on its own
thread and subtracts consecutive :class:`Reading` values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import Meter, Reading
from .cpu import POWERCAP_ROOT, PROC_ROOT, CpuTimeMeter, RaplMeter, open_cpu_meter
from .nvml import NvmlMeter
from .spec import FORMS, MeterSpec, MeterSpecError, parse_gpus, parse_spec
from .synthetic import SyntheticMeter
from .trace import TraceMeter

__all__ = [
    "FORMS",
    "CpuTimeMeter",
    "Meter",
    "MeterSpec",
    "MeterSpecError",
    "NvmlMeter",
    "RaplMeter",
    "Reading",
    "SyntheticMeter",
    "TraceMeter",
    "open_meter",
    "parse_spec",
]


def open_meter(
    spec: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    nvml_module: Any = None,
    devices: Sequence[int | str] | None = None,
    cpu_watts_per_core: float = 10.0,
    cpu_pid: int | None = None,
    powercap_root: str | Path = POWERCAP_ROOT,
    proc_root: str | Path = PROC_ROOT,
) -> Meter:
    """Open the meter a spec names.

    Specs: ``auto`` (NVML when it loads and sees a GPU, else ``cpu``), ``nvml``,
    ``nvml:0,1``, ``nvml:GPU-<uuid>[,...]``, ``cpu``, ``synthetic:WATTS[xN]``,
    ``trace:FILE``. ``devices`` selects GPUs (indices, ``gpuN`` or UUIDs) for
    ``nvml``/``auto`` when the spec does not; meters without GPUs ignore it.
    ``nvml_module`` replaces pynvml (tests). Raises MeterSpecError for a bad spec,
    a bad trace file or a GPU selected twice; hardware trouble gives a meter that
    is down instead, except that ``auto`` then falls back to ``cpu``.
    """
    parsed = parse_spec(spec)
    gpus = parsed.gpus
    if devices is not None:
        if gpus is not None:
            raise MeterSpecError(
                f"bad meter spec {spec!r}: GPUs given both in the spec and as devices={devices!r}"
            )
        gpus = parse_gpus(devices)

    def cpu() -> Meter:
        return open_cpu_meter(
            clock=clock,
            watts_per_core=cpu_watts_per_core,
            pid=cpu_pid,
            powercap_root=powercap_root,
            proc_root=proc_root,
        )

    match parsed.kind:
        case "nvml":
            return NvmlMeter(nvml_module, gpus, clock=clock)
        case "auto":
            meter = NvmlMeter(nvml_module, gpus, clock=clock)
            if meter.initialized and meter.devices:
                return meter
            meter.close()
            return cpu()
        case "cpu":
            return cpu()
        case "synthetic":
            return SyntheticMeter(parsed.watts, parsed.count, clock=clock)
        case "trace":
            assert parsed.path is not None
            return TraceMeter.open(parsed.path, clock=clock)
    raise MeterSpecError(f"bad meter spec {spec!r}: unknown meter (accepted: {FORMS})")
