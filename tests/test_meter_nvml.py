"""The NVML meter against a fake pynvml: units, resets, fallbacks and failures."""

from __future__ import annotations

import json
import sys

import pynvml
import pytest

from proxy.meter import MeterSpecError, NvmlMeter, open_meter
from tests.fakes.fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_UNKNOWN,
    FakeNvml,
    fake_uuid,
)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_fake_raises_pynvml_classes() -> None:
    nvml = FakeNvml(1)
    nvml.nvmlInit()
    nvml.gpus[0].lose()
    with pytest.raises(pynvml.NVMLError_GpuIsLost) as info:
        nvml.nvmlDeviceGetTotalEnergyConsumption(nvml.gpus[0])
    assert info.value.value == NVML_ERROR_GPU_IS_LOST == 15
    nvml.gpus[0].recover()
    nvml.gpus[0].energy_supported = False
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetTotalEnergyConsumption(nvml.gpus[0])


def test_energy_counter_in_joules_since_open() -> None:
    nvml = FakeNvml(2)
    nvml.gpus[0].energy_mj = 9_000_000  # 9 kJ since driver load: not ours
    nvml.gpus[1].energy_mj = 1_000
    clock = Clock(100.0)
    meter = open_meter("nvml", nvml_module=nvml, clock=clock)
    assert meter.name == "nvml"
    assert meter.estimate is False
    assert meter.devices == ("gpu0", "gpu1")
    assert meter.update_period == 0.1
    assert meter.up
    nvml.gpus[0].energy_mj += 12_345  # 12.345 J
    nvml.gpus[1].energy_mj += 500
    clock.now = 101.0
    reading = meter.read()
    assert reading.time == 101.0
    assert reading.joules == pytest.approx((12.345, 0.5))
    nvml.gpus[0].energy_mj += 1_000
    assert meter.read().joules == pytest.approx((13.345, 0.5))


def test_counter_reset_keeps_totals_non_decreasing() -> None:
    nvml = FakeNvml(1)
    gpu = nvml.gpus[0]
    gpu.energy_mj = 50_000
    meter = open_meter("nvml:0", nvml_module=nvml, clock=Clock())
    gpu.energy_mj = 60_000
    assert meter.read().joules == pytest.approx((10.0,))
    gpu.energy_mj = 2_000  # driver reload: counter restarts
    assert meter.read().joules == (None,)  # the energy since the last reading is unknown
    assert not meter.up and "backwards" in str(meter.error)
    gpu.energy_mj = 5_000
    assert meter.read().joules == pytest.approx((13.0,))
    assert meter.up
    assert meter.describe()["devices"][0]["counter_resets"] == 1  # type: ignore[index]


def test_power_integration_where_energy_is_not_supported() -> None:
    nvml = FakeNvml(2)
    old = nvml.gpus[1]
    old.energy_supported = False
    old.power_mw = 100_000  # 100 W
    nvml.gpus[0].energy_mj = 0
    clock = Clock(10.0)
    meter = open_meter("nvml", nvml_module=nvml, clock=clock)
    clock.now = 12.0
    old.power_mw = 200_000
    nvml.gpus[0].energy_mj = 7_000
    assert meter.read().joules == pytest.approx((7.0, 300.0))  # (100 + 200) / 2 W * 2 s
    clock.now = 12.5
    assert meter.read().joules == pytest.approx((7.0, 400.0))
    assert meter.update_period == 0.1
    devices = meter.describe()["devices"]
    assert [d["source"] for d in devices] == ["energy", "power"]  # type: ignore[index]
    assert old.calls["energy"] == 1  # probed once, then never again


def test_gpu_lost_mid_run_never_raises_and_recovers_without_inventing_energy() -> None:
    nvml = FakeNvml(2)
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())
    nvml.gpus[0].add_joules(5.0)
    nvml.gpus[1].add_joules(1.0)
    assert meter.read().joules == pytest.approx((5.0, 1.0))

    nvml.gpus[1].lose()
    nvml.gpus[0].add_joules(5.0)
    reading = meter.read()
    assert reading.joules[0] == pytest.approx(10.0)
    assert reading.joules[1] is None
    assert not meter.up
    assert meter.error is not None and "gpu1" in meter.error and "GPU is lost" in meter.error
    assert meter.read().joules[1] is None  # still lost, still no exception

    nvml.gpus[1].add_joules(1000.0)  # used while unreadable: unknown, not invented
    nvml.gpus[1].recover()
    assert meter.read().joules == pytest.approx((10.0, 1.0))
    assert meter.up
    assert meter.error is None
    nvml.gpus[1].add_joules(2.0)
    assert meter.read().joules == pytest.approx((10.0, 3.0))
    described = meter.describe()
    assert described["up"] is True
    assert "GPU is lost" in str(described["last_error"])


@pytest.mark.parametrize("code", [NVML_ERROR_UNKNOWN, 21, NVML_ERROR_DRIVER_NOT_LOADED])
def test_any_nvml_error_on_read_is_contained(code: int) -> None:
    nvml = FakeNvml(1)
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())
    nvml.gpus[0].error = code
    assert meter.read().joules == (None,)
    assert not meter.up
    assert f"code {code}" in str(meter.error)


def test_non_nvml_exception_on_read_is_contained() -> None:
    nvml = FakeNvml(1)
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())

    def broken(handle: object) -> int:
        raise RuntimeError("driver exploded")

    nvml.nvmlDeviceGetTotalEnergyConsumption = broken  # type: ignore[method-assign]
    assert meter.read().joules == (None,)
    assert "driver exploded" in str(meter.error)


def test_neither_energy_nor_power_supported() -> None:
    nvml = FakeNvml(1)
    nvml.gpus[0].energy_supported = False
    nvml.gpus[0].power_supported = False
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())
    assert meter.read().joules == (None,)
    assert not meter.up
    assert "Not Supported" in str(meter.error)


@pytest.mark.parametrize(
    "code", [NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_UNKNOWN]
)
def test_init_failure_gives_a_down_meter(code: int) -> None:
    nvml = FakeNvml(2, init_error=code)
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())
    assert isinstance(meter, NvmlMeter)
    assert meter.devices == ()
    assert not meter.up
    assert meter.read().joules == ()
    assert "nvmlInit failed" in str(meter.error)
    assert meter.describe()["up"] is False
    meter.close()
    assert nvml.refcount == 0  # no shutdown without a successful init


def test_init_failure_keeps_requested_devices_as_none() -> None:
    nvml = FakeNvml(2, init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    meter = open_meter("nvml:0,1", nvml_module=nvml, clock=Clock())
    assert meter.devices == ("gpu0", "gpu1")
    assert meter.read().joules == (None, None)
    assert not meter.up
    assert "Driver Not Loaded" in str(meter.error)


def test_pynvml_missing_gives_a_down_meter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = open_meter("nvml")
    assert meter.devices == ()
    assert not meter.up
    assert "pynvml cannot be imported" in str(meter.error)


def test_real_pynvml_without_a_driver_is_down_not_raising() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    meter = open_meter("nvml")
    assert not meter.up
    assert meter.read().joules == ()
    assert "nvmlInit failed" in str(meter.error)


def test_no_gpu_visible() -> None:
    meter = open_meter("nvml", nvml_module=FakeNvml(0), clock=Clock())
    assert meter.devices == ()
    assert not meter.up
    assert "no GPU" in str(meter.error)


def test_devices_by_uuid_are_labelled_by_index() -> None:
    nvml = FakeNvml(3)
    meter = open_meter(f"nvml:{fake_uuid(2)},{fake_uuid(0)}", nvml_module=nvml, clock=Clock())
    assert meter.devices == ("gpu2", "gpu0")
    nvml.gpus[2].add_joules(2.0)
    nvml.gpus[1].add_joules(99.0)
    assert meter.read().joules == pytest.approx((2.0, 0.0))
    devices = meter.describe()["devices"]
    assert [d["uuid"] for d in devices] == [fake_uuid(2), fake_uuid(0)]  # type: ignore[index]


def test_devices_argument_selects_gpus() -> None:
    nvml = FakeNvml(3)
    meter = open_meter("nvml", nvml_module=nvml, devices=["gpu1", fake_uuid(2)], clock=Clock())
    assert meter.devices == ("gpu1", "gpu2")


def test_same_gpu_twice_is_a_spec_error() -> None:
    nvml = FakeNvml(2)
    with pytest.raises(MeterSpecError, match="gpu1"):
        open_meter(f"nvml:1,{fake_uuid(1)}", nvml_module=nvml, clock=Clock())
    assert nvml.refcount == 0


def test_missing_device_reads_none_and_is_retried_later() -> None:
    nvml = FakeNvml(1)
    clock = Clock(0.0)
    meter = open_meter("nvml:0,1", nvml_module=nvml, clock=clock)
    assert meter.devices == ("gpu0", "gpu1")
    assert meter.read().joules == (0.0, None)
    assert not meter.up
    assert "gpu1: cannot open device" in str(meter.error)
    nvml.gpus.append(type(nvml.gpus[0])(index=1, uuid=fake_uuid(1)))  # hot-added
    clock.now = 1.0
    assert meter.read().joules == (0.0, None)  # not retried yet: once every few seconds
    clock.now = 6.0
    assert meter.read().joules == (0.0, 0.0)
    assert meter.up
    nvml.gpus[1].add_joules(4.0)
    assert meter.read().joules == pytest.approx((0.0, 4.0))


def test_describe_is_json_and_names_the_gpus() -> None:
    nvml = FakeNvml(2)
    nvml.gpus[1].name = "NVIDIA A100-SXM4-40GB"
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())
    nvml.gpus[1].lose()
    meter.read()
    described = json.loads(json.dumps(meter.describe()))
    assert described["name"] == "nvml"
    assert described["estimate"] is False
    assert described["up"] is False
    assert "gpu1" in described["error"]
    gpu0, gpu1 = described["devices"]
    assert gpu0 == {
        "label": "gpu0",
        "index": 0,
        "uuid": fake_uuid(0),
        "name": "NVIDIA H100 80GB HBM3",
        "source": "energy",
        "up": True,
        "error": None,
        "counter_resets": 0,
    }
    assert gpu1["name"] == "NVIDIA A100-SXM4-40GB"
    assert gpu1["up"] is False
    assert "GPU is lost" in gpu1["error"]


def test_close_shuts_nvml_down_once_and_reads_stay_safe() -> None:
    nvml = FakeNvml(1)
    meter = open_meter("nvml", nvml_module=nvml, clock=Clock())
    assert nvml.refcount == 1
    meter.close()
    meter.close()
    assert nvml.refcount == 0
    assert meter.read().joules == (None,)
    assert not meter.up
    assert meter.error == "meter closed"


def test_read_time_is_the_middle_of_the_reads() -> None:
    ticks = iter([0.0, 1.0, 2.0, 3.0, 5.0, 6.0])
    nvml = FakeNvml(1)
    meter = NvmlMeter(nvml, clock=lambda: next(ticks))
    # open: retry-clock 0.0, read 1.0..2.0; then a read from 3.0 to 5.0
    assert meter.read().time == 4.0
