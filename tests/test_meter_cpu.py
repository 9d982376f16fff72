"""The cpu meter: RAPL from a fake powercap tree, and the CPU-time estimate from a fake /proc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.meter import CpuTimeMeter, RaplMeter, open_meter
from proxy.meter.cpu import find_rapl_zones, open_cpu_meter


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_uj is not None:
        (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 1_000_000, max_uj=262_143_328_850)
    zone(root, "intel-rapl:1", "package-1", 5_000_000, max_uj=262_143_328_850)
    zone(root, "intel-rapl:0:0", "core", 10)  # inside package-0: must not be counted again
    zone(root, "intel-rapl:0:1", "dram", 10)
    zone(root, "intel-rapl-mmio:0", "package-0", 10)  # same package through MMIO
    return root


def test_rapl_reads_top_level_packages_in_joules(powercap: Path) -> None:
    clock = Clock(3.0)
    meter = open_meter("cpu", powercap_root=powercap, clock=clock)
    assert isinstance(meter, RaplMeter)
    assert meter.name == "cpu"
    assert meter.estimate is False
    assert meter.devices == ("package-0", "package-1")
    (powercap / "intel-rapl:0" / "energy_uj").write_text("3500000\n")
    (powercap / "intel-rapl:1" / "energy_uj").write_text("5250000\n")
    clock.now = 4.0
    reading = meter.read()
    assert reading.time == 4.0
    assert reading.joules == pytest.approx((2.5, 0.25))
    assert meter.up


def test_rapl_wrap_around(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 999_000_000, max_uj=1_000_000_000)  # wraps at 1 kJ
    meter = open_cpu_meter(powercap_root=root, clock=Clock())
    (root / "intel-rapl:0" / "energy_uj").write_text("4000000\n")  # wrapped: 1 J + 4 J
    assert meter.read().joules == pytest.approx((5.0,))
    (root / "intel-rapl:0" / "energy_uj").write_text("6000000\n")
    assert meter.read().joules == pytest.approx((7.0,))
    assert meter.describe()["devices"][0]["wraps"] == 1  # type: ignore[index]


def test_rapl_zone_vanishing_reads_none_then_continues(powercap: Path) -> None:
    meter = open_meter("cpu", powercap_root=powercap, clock=Clock())
    energy = powercap / "intel-rapl:1" / "energy_uj"
    energy.unlink()
    reading = meter.read()
    assert reading.joules[0] == 0.0
    assert reading.joules[1] is None
    assert not meter.up
    assert "package-1" in str(meter.error)
    energy.write_text("9000000\n")  # back, 4 J later: a new base, not 4 J
    assert meter.read().joules == (0.0, 0.0)
    assert meter.up


def test_psys_is_skipped_when_packages_exist(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 1)
    zone(root, "intel-rapl:1", "psys", 1)
    assert [z.label for z in find_rapl_zones(root)] == ["package-0"]


def test_rapl_zones_sort_by_index(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    for i in (10, 2, 1):
        zone(root, f"intel-rapl:{i}", f"package-{i}", 1)
    assert [z.label for z in find_rapl_zones(root)] == ["package-1", "package-2", "package-10"]


def test_unreadable_rapl_falls_back_to_the_estimate(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    path = zone(root, "intel-rapl:0", "package-0", 1)
    (path / "energy_uj").unlink()
    (path / "energy_uj").mkdir()  # reading it fails, as a root-only file would
    proc = fake_proc(tmp_path, busy=(100, 0, 50, 1000, 5, 0, 0, 7))
    meter = open_meter("cpu", powercap_root=root, proc_root=proc, clock=Clock())
    assert isinstance(meter, CpuTimeMeter)
    assert meter.estimate is True


def fake_proc(tmp_path: Path, busy: tuple[int, ...]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    write_stat(proc, busy)
    return proc


def write_stat(proc: Path, busy: tuple[int, ...]) -> None:
    values = " ".join(str(v) for v in busy)
    (proc / "stat").write_text(f"cpu  {values} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")


def write_pid_stat(proc: Path, pid: int, utime: int, stime: int, cutime: int, cstime: int) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0"]
    fields += [str(utime), str(stime), str(cutime), str(cstime), "20", "0", "4", "0", "9"]
    (proc / str(pid) / "stat").write_text(f"{pid} (python3 (x) y) " + " ".join(fields) + "\n")


def test_machine_cpu_time_estimate(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal
    proc = fake_proc(tmp_path, busy=(100, 0, 50, 1000, 5, 0, 0, 7))
    clock = Clock(1.0)
    meter = open_meter(
        "cpu",
        powercap_root=tmp_path / "none",
        proc_root=proc,
        cpu_watts_per_core=20.0,
        clock=clock,
    )
    assert isinstance(meter, CpuTimeMeter)
    assert meter.name == "cpu"
    assert meter.estimate is True
    assert meter.devices == ("cpu",)
    # busy +300 ticks (user 200, nice 10, system 60, irq 10, softirq 20); idle, iowait, steal
    # are not busy. At 100 ticks/s that is 3 CPU-seconds: 60 J at 20 W per core.
    write_stat(proc, (300, 10, 110, 5000, 50, 10, 20, 900))
    clock.now = 2.0
    reading = meter.read()
    assert reading.time == 2.0
    assert reading.joules == pytest.approx((60.0,))
    assert meter.up


def test_process_cpu_time_estimate_counts_children(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, busy=(1, 1, 1, 1, 1, 1, 1, 1))
    write_pid_stat(proc, 4242, utime=100, stime=20, cutime=5, cstime=5)
    meter = CpuTimeMeter(10.0, pid=4242, proc_root=proc, clock=Clock(), clk_tck=100)
    assert meter.update_period == 0.01
    write_pid_stat(proc, 4242, utime=150, stime=40, cutime=25, cstime=15)  # +100 ticks = 1 s
    write_stat(proc, (999, 999, 999, 1, 1, 1, 1, 1))  # the machine's time must not matter
    assert meter.read().joules == pytest.approx((10.0,))
    described = json.loads(json.dumps(meter.describe()))
    assert described["estimate"] is True
    assert described["pid"] == 4242
    assert described["source"] == "cpu-time"
    assert described["watts_per_core"] == 10.0


def test_process_gone_reads_none(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, busy=(1, 1, 1, 1, 1, 1, 1, 1))
    write_pid_stat(proc, 7, 1, 1, 0, 0)
    meter = CpuTimeMeter(pid=7, proc_root=proc, clock=Clock())
    (proc / "7" / "stat").unlink()
    assert meter.read().joules == (None,)
    assert not meter.up
    assert "process 7" in str(meter.error)
    write_pid_stat(proc, 7, 500, 1, 0, 0)
    assert meter.read().joules == (0.0,)  # new base after the gap
    assert meter.up


def test_cpu_meter_describe(powercap: Path) -> None:
    meter = open_meter("cpu", powercap_root=powercap, clock=Clock())
    described = json.loads(json.dumps(meter.describe()))
    assert described["name"] == "cpu"
    assert described["estimate"] is False
    assert described["source"] == "rapl"
    assert [d["label"] for d in described["devices"]] == ["package-0", "package-1"]
    assert described["devices"][0]["max_energy_range_uj"] == 262_143_328_850


def test_bad_watts_per_core() -> None:
    with pytest.raises(ValueError):
        CpuTimeMeter(-1.0)
