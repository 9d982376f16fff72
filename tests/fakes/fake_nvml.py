"""A stand-in for the ``pynvml`` module, for testing meters without a GPU.

It exposes the functions the NVML meter uses with pynvml's units (mJ, mW) and
raises pynvml's own exception classes: ``NVMLError(NVML_ERROR_GPU_IS_LOST)``
comes out as ``pynvml.NVMLError_GpuIsLost``, exactly as the real module does, so
code under test catches the real classes. Tests steer it through ``FakeGpu``
fields (energy, power, support, lost) and ``FakeNvml.init_error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pynvml

NVMLError = pynvml.NVMLError
NVML_SUCCESS = pynvml.NVML_SUCCESS
NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN


@dataclass
class FakeGpu:
    """One fake device. Change the fields between reads to script a scenario."""

    index: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int = 0  # what nvmlDeviceGetTotalEnergyConsumption returns; may go backwards
    power_mw: int = 0  # what nvmlDeviceGetPowerUsage returns
    energy_supported: bool = True  # False: the energy call raises NVMLError_NotSupported
    power_supported: bool = True
    error: int | None = None  # every call on this device raises NVMLError(error), e.g. GPU lost
    calls: dict[str, int] = field(default_factory=dict)

    def lose(self) -> None:
        """From now on every call raises NVMLError_GpuIsLost, until ``recover()``."""
        self.error = NVML_ERROR_GPU_IS_LOST

    def recover(self) -> None:
        self.error = None

    def add_joules(self, joules: float) -> None:
        self.energy_mj += round(joules * 1000)


def fake_uuid(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-444455556666"


class FakeNvml:
    """Module-like object with pynvml's function names, constants and errors."""

    NVMLError = pynvml.NVMLError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    def __init__(self, count: int = 1, *, init_error: int | None = None) -> None:
        self.gpus = [FakeGpu(index=i, uuid=fake_uuid(i)) for i in range(count)]
        self.init_error = init_error  # nvmlInit raises NVMLError(init_error)
        self.count_error: int | None = None  # nvmlDeviceGetCount raises NVMLError(count_error)
        self.refcount = 0  # nvmlInit minus nvmlShutdown, as pynvml counts them
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        if self.count_error is not None:
            raise NVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._device(self.gpus[index], "handle")

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeGpu:
        self._check_init()
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.gpus:
            if gpu.uuid == text:
                return self._device(gpu, "handle")
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:
        return self._device(handle, "index").index

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return self._device(handle, "uuid").uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return self._device(handle, "name").name

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        gpu = self._device(handle, "energy")
        if not gpu.energy_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        gpu = self._device(handle, "power")
        if not gpu.power_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_mw

    def _check_init(self) -> None:
        if self.refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _device(self, gpu: FakeGpu, call: str) -> FakeGpu:
        self._check_init()
        gpu.calls[call] = gpu.calls.get(call, 0) + 1
        if gpu.error is not None:
            raise NVMLError(gpu.error)
        return gpu
