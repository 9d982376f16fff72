"""NVIDIA GPUs through NVML (the ``pynvml`` module of nvidia-ml-py).

Per device, the preferred source is ``nvmlDeviceGetTotalEnergyConsumption``:
a cumulative counter in mJ since the driver loaded (Volta and newer), updated
every ~20-100 ms. Where it raises NVMLError_NotSupported, the meter falls back to
``nvmlDeviceGetPowerUsage`` (mW) and integrates it between reads; on Ampere and
newer that power is itself a ~1 s average, so short bursts are smoothed. TDP is
never used.

Failures never escape ``read()``. pynvml missing, no driver, ``nvmlInit``
failing: the meter opens *down* (no devices, or the requested ones reading
None) and says why in ``describe()``. A GPU that is lost mid-run reads None and
keeps being retried; when it answers again it continues from its last total.

The pynvml module is injectable so tests can pass a fake with the same
functions, units and exception classes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .accumulate import EnergyAccumulator
from .base import Meter, Reading
from .spec import MeterSpecError

UPDATE_PERIOD = 0.1  # s: energy counter refresh (and a fair power-averaging floor)
HANDLE_RETRY_SECONDS = 5.0  # how often to retry a device whose handle could not be obtained
NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED, when the module does not define it

Source = Literal["energy", "power"]


@dataclass(slots=True)
class _Gpu:
    """Everything the meter knows about one selected GPU."""

    label: str
    selector: int | str  # what the user asked for: an index or a UUID
    handle: Any = None
    index: int | None = None
    uuid: str | None = None
    model: str | None = None
    source: Source | None = None  # decided on the first successful read
    error: str | None = None  # why the last read of this device failed
    retry_at: float = 0.0  # when to try to get a handle again, if there is none
    energy: EnergyAccumulator = field(default_factory=EnergyAccumulator)


class NvmlMeter(Meter):
    """Cumulative Joules per NVIDIA GPU."""

    def __init__(
        self,
        nvml: Any = None,
        gpus: Sequence[int | str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open NVML and the selected GPUs (indices or ``GPU-`` UUIDs; None = all visible).

        ``nvml`` is the pynvml module or a stand-in; None imports pynvml. Never
        raises for NVML trouble; raises MeterSpecError when two selectors name the
        same GPU, since that would count its energy twice.
        """
        self.name = "nvml"
        self.estimate = False
        self.update_period = UPDATE_PERIOD
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: Any = nvml
        self._initialized = False
        self._closed = False
        self._init_error: str | None = None
        self._up = False
        self._error: str | None = None
        self._last_error: str | None = None
        self._gpus: list[_Gpu] = []
        self._open(gpus)
        self.devices = tuple(gpu.label for gpu in self._gpus)
        duplicates = sorted({label for label in self.devices if self.devices.count(label) > 1})
        if duplicates:
            self.close()
            raise MeterSpecError(f"nvml: {', '.join(duplicates)} selected more than once")
        # A first read sets each device's base, so totals count from now.
        self.read()

    @property
    def initialized(self) -> bool:
        """True when pynvml loaded and nvmlInit succeeded (devices may still fail)."""
        return self._initialized

    def _open(self, gpus: Sequence[int | str] | None) -> None:
        requested = list(gpus) if gpus is not None else []
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as e:
                self._fail_open(f"pynvml cannot be imported: {e}", requested)
                return
            self._nvml = pynvml
        try:
            self._nvml.nvmlInit()
        except Exception as e:
            self._fail_open(f"nvmlInit failed: {_error_text(e)}", requested)
            return
        self._initialized = True
        if gpus is None:
            try:
                requested = list(range(int(self._nvml.nvmlDeviceGetCount())))
            except Exception as e:
                self._init_error = f"nvmlDeviceGetCount failed: {_error_text(e)}"
                return
            if not requested:
                self._init_error = "NVML sees no GPU"
                return
        now = self._clock()
        for selector in requested:
            gpu = _Gpu(label=_label(selector), selector=selector)
            if self._attach(gpu, now) and isinstance(selector, str) and gpu.index is not None:
                gpu.label = f"gpu{gpu.index}"
            self._gpus.append(gpu)

    def _fail_open(self, why: str, requested: list[int | str]) -> None:
        self._init_error = why
        self._gpus = [_Gpu(label=_label(s), selector=s, error=why) for s in requested]

    def _attach(self, gpu: _Gpu, now: float) -> bool:
        """Get the device handle and its identity; on failure, retry later."""
        nvml = self._nvml
        try:
            if isinstance(gpu.selector, int):
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu.selector)
            else:
                handle = nvml.nvmlDeviceGetHandleByUUID(gpu.selector)
        except Exception as e:
            gpu.error = f"{gpu.label}: cannot open device: {_error_text(e)}"
            gpu.retry_at = now + HANDLE_RETRY_SECONDS
            return False
        gpu.handle = handle
        index = _optional(nvml, "nvmlDeviceGetIndex", handle)
        gpu.index = int(index) if isinstance(index, int) else None
        if gpu.index is None and isinstance(gpu.selector, int):
            gpu.index = gpu.selector
        gpu.uuid = _optional_text(nvml, "nvmlDeviceGetUUID", handle)
        gpu.model = _optional_text(nvml, "nvmlDeviceGetName", handle)
        gpu.error = None
        return True

    def read(self) -> Reading:
        with self._lock:
            try:
                return self._read()
            except Exception as e:  # a bug or a very odd module: still never raise
                for gpu in self._gpus:
                    gpu.energy.gap()
                self._publish(f"nvml read failed: {_error_text(e)}")
                return Reading(time=self._clock(), joules=(None,) * len(self._gpus))

    def _read(self) -> Reading:
        start = self._clock()
        if self._closed:
            return Reading(time=start, joules=(None,) * len(self._gpus))
        if not self._initialized:
            self._publish(self._init_error)
            return Reading(time=start, joules=(None,) * len(self._gpus))
        sources = [gpu.source for gpu in self._gpus]
        samples = [self._sample(gpu, start) for gpu in self._gpus]
        end = self._clock()
        now = start + (end - start) / 2  # the devices were read somewhere in [start, end]
        joules: list[float | None] = []
        for gpu, sample, source_before in zip(self._gpus, samples, sources, strict=True):
            if sample is None:
                gpu.energy.gap()
                joules.append(None)
                continue
            source, value = sample
            resets = gpu.energy.resets
            try:
                if source == "energy":
                    total: float | None = gpu.energy.counter(value / 1000.0)  # mJ -> J
                else:
                    total = gpu.energy.power(now, value / 1000.0)  # mW -> W
            except ValueError as e:
                gpu.error = f"{gpu.label}: {e}"
                gpu.energy.gap()
                joules.append(None)
                continue
            # The value is a new base after either of these: the energy since the previous
            # reading is unknown, so this reading says so (None) rather than a made-up 0 J.
            # The base is kept, so the next reading measures again.
            if gpu.energy.resets != resets:
                gpu.error = (
                    f"{gpu.label}: the energy counter went backwards (driver reloaded?);"
                    " the energy since the previous reading is unknown"
                )
                total = None
            elif source == "power" and source_before == "energy":
                gpu.error = (
                    f"{gpu.label}: the energy counter is no longer supported; power is"
                    " integrated from now on, the energy since the previous reading is unknown"
                )
                total = None
            joules.append(total)
        errors = [gpu.error for gpu in self._gpus if gpu.error]
        if not self._gpus:
            errors.append(self._init_error or "no GPU selected")
        self._publish("; ".join(errors) if errors else None)
        return Reading(time=now, joules=tuple(joules))

    def _sample(self, gpu: _Gpu, now: float) -> tuple[Source, float] | None:
        """Read one device's raw value: (``energy``, mJ) or (``power``, mW); None on failure."""
        if gpu.handle is None and (now < gpu.retry_at or not self._attach(gpu, now)):
            return None
        nvml = self._nvml
        try:
            if gpu.source != "power":
                try:
                    millijoules = nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
                except Exception as e:
                    if getattr(e, "value", None) != getattr(
                        nvml, "NVML_ERROR_NOT_SUPPORTED", NOT_SUPPORTED
                    ):
                        raise
                    gpu.source = "power"  # no energy counter here: integrate power
                else:
                    gpu.source = "energy"
                    gpu.error = None
                    return ("energy", float(millijoules))
            milliwatts = nvml.nvmlDeviceGetPowerUsage(gpu.handle)
        except Exception as e:
            gpu.error = f"{gpu.label}: {_error_text(e)}"
            return None
        gpu.error = None
        return ("power", float(milliwatts))

    def _publish(self, error: str | None) -> None:
        """Make the outcome of a read visible to ``up``/``describe()`` callers."""
        self._error = error
        self._up = error is None
        if error is not None:
            self._last_error = error

    @property
    def up(self) -> bool:
        return self._up

    @property
    def error(self) -> str | None:
        return self._error

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "last_error": self._last_error}

    def _describe_devices(self) -> list[dict[str, object]]:
        return [
            {
                "label": gpu.label,
                "index": gpu.index,
                "uuid": gpu.uuid,
                "name": gpu.model,
                "source": gpu.source,
                "up": gpu.error is None and self._up_device(gpu),
                "error": gpu.error,
                "counter_resets": gpu.energy.resets,
            }
            for gpu in self._gpus
        ]

    def _up_device(self, gpu: _Gpu) -> bool:
        return self._initialized and not self._closed and gpu.handle is not None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._up = False
            self._error = "meter closed"
            if self._initialized:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as e:
                    self._last_error = f"nvmlShutdown failed: {_error_text(e)}"


def _label(selector: int | str) -> str:
    """The device label before NVML tells us the index: gpuN, or the UUID itself."""
    return f"gpu{selector}" if isinstance(selector, int) else selector


def _error_text(error: BaseException) -> str:
    """One line naming the NVML error (class and code) or the Python exception."""
    try:
        text = str(error)
    except Exception:
        text = ""
    value = getattr(error, "value", None)
    name = type(error).__name__
    if isinstance(value, int):
        return f"{name}: {text} (code {value})" if text else f"{name} (code {value})"
    return f"{name}: {text}" if text else name


def _optional(nvml: Any, function: str, handle: Any) -> object | None:
    """Identity details are nice to have: a failure here must not fail the device."""
    try:
        return getattr(nvml, function)(handle)
    except Exception:
        return None


def _optional_text(nvml: Any, function: str, handle: Any) -> str | None:
    value = _optional(nvml, function, handle)
    if isinstance(value, bytes):  # pynvml before 11.5 returned bytes
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
