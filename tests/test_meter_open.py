"""open_meter: which meter each spec gives, and auto's fallback to cpu."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from proxy.meter import (
    CpuTimeMeter,
    Meter,
    NvmlMeter,
    Reading,
    SyntheticMeter,
    TraceMeter,
    open_meter,
)
from tests.fakes.fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    FakeNvml,
)


def cpu_only(tmp_path: Path) -> dict[str, object]:
    """open_meter arguments that make the cpu meter a deterministic estimate."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu  10 0 10 100 0 0 0 0 0 0\n")
    return {"powercap_root": tmp_path / "no-powercap", "proc_root": proc}


def test_auto_uses_nvml_when_a_gpu_is_visible(tmp_path: Path) -> None:
    nvml = FakeNvml(2)
    meter = open_meter("auto", nvml_module=nvml, **cpu_only(tmp_path))  # type: ignore[arg-type]
    assert isinstance(meter, NvmlMeter)
    assert meter.devices == ("gpu0", "gpu1")


@pytest.mark.parametrize(
    "nvml",
    [
        FakeNvml(2, init_error=NVML_ERROR_LIBRARY_NOT_FOUND),
        FakeNvml(2, init_error=NVML_ERROR_DRIVER_NOT_LOADED),
        FakeNvml(0),
    ],
)
def test_auto_falls_back_to_cpu(tmp_path: Path, nvml: FakeNvml) -> None:
    meter = open_meter("auto", nvml_module=nvml, **cpu_only(tmp_path))  # type: ignore[arg-type]
    assert isinstance(meter, CpuTimeMeter)
    assert meter.name == "cpu"
    assert meter.estimate is True
    assert meter.up
    assert nvml.refcount == 0  # the NVML attempt was closed again


def test_auto_falls_back_when_pynvml_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)
    meter = open_meter("auto", **cpu_only(tmp_path))  # type: ignore[arg-type]
    assert meter.name == "cpu"


def test_auto_with_pid_estimates_that_process(tmp_path: Path) -> None:
    meter = open_meter(
        "auto",
        nvml_module=FakeNvml(0),
        cpu_pid=os.getpid(),
        cpu_watts_per_core=5.0,
        powercap_root=tmp_path / "none",
    )
    assert isinstance(meter, CpuTimeMeter)
    assert meter.pid == os.getpid()
    assert meter.watts_per_core == 5.0
    assert meter.read().joules[0] is not None  # the real /proc/PID/stat parses


def test_each_kind(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,device,watts\n0,gpu0,1\n")
    assert isinstance(open_meter("synthetic:1"), SyntheticMeter)
    assert isinstance(open_meter(f"trace:{trace}"), TraceMeter)
    assert isinstance(open_meter("nvml", nvml_module=FakeNvml(1)), NvmlMeter)
    assert open_meter("cpu", **cpu_only(tmp_path)).name == "cpu"  # type: ignore[arg-type]


def test_every_meter_honours_the_interface(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,device,watts\n0,gpu0,1\n")
    meters: list[Meter] = [
        open_meter("synthetic:100x2"),
        open_meter(f"trace:{trace}"),
        open_meter("nvml", nvml_module=FakeNvml(2)),
        open_meter("nvml", nvml_module=FakeNvml(2, init_error=NVML_ERROR_DRIVER_NOT_LOADED)),
        open_meter("cpu", **cpu_only(tmp_path)),  # type: ignore[arg-type]
    ]
    for meter in meters:
        with meter:
            reading = meter.read()
            assert isinstance(reading, Reading)
            assert len(reading.joules) == len(meter.devices)
            assert all(isinstance(label, str) and label for label in meter.devices)
            assert meter.update_period >= 0
            described = json.loads(json.dumps(meter.describe()))
            assert described["name"] == meter.name in ("nvml", "cpu", "synthetic", "trace")
            assert described["estimate"] is meter.estimate
            assert described["up"] is meter.up
            assert [d["label"] for d in described["devices"]] == list(meter.devices)
            assert ("error" in described) and (described["error"] is None) == meter.up
