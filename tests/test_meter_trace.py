"""Replaying a recorded power trace: exact integrals, looping, and file errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.meter import MeterSpecError, open_meter
from proxy.meter.trace import load_trace


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_GPUS = """time_s,device,watts
0,gpu0,100
0,gpu1,50
1,gpu0,300
2,gpu0,200
2,gpu1,150
"""
# period = 2 + (2 - 1) = 3 s
# gpu0: 100 W on [0,1), 300 W on [1,2), 200 W on [2,3) -> 600 J per period
# gpu1: 50 W on [0,2), 150 W on [2,3) -> 250 J per period


def test_piecewise_constant_integral(tmp_path: Path) -> None:
    clock = Clock(500.0)
    meter = open_meter(f"trace:{write(tmp_path, TWO_GPUS)}", clock=clock)
    assert meter.name == "trace"
    assert meter.estimate is False
    assert meter.devices == ("gpu0", "gpu1")
    expected = {
        0.0: (0.0, 0.0),
        0.5: (50.0, 25.0),
        1.0: (100.0, 50.0),
        1.5: (250.0, 75.0),
        2.25: (450.0, 137.5),
        3.0: (600.0, 250.0),
    }
    for elapsed, joules in expected.items():
        clock.now = 500.0 + elapsed
        reading = meter.read()
        assert reading.time == 500.0 + elapsed
        assert reading.joules == pytest.approx(joules)


def test_loops_after_the_last_step(tmp_path: Path) -> None:
    clock = Clock(0.0)
    meter = open_meter(f"trace:{write(tmp_path, TWO_GPUS)}", clock=clock)
    clock.now = 3.5  # one period and 0.5 s of the next
    assert meter.read().joules == pytest.approx((650.0, 275.0))
    clock.now = 10 * 3.0 + 1.5
    assert meter.read().joules == pytest.approx((6000.0 + 250.0, 2500.0 + 75.0))
    assert meter.describe()["period_seconds"] == 3.0


def test_times_are_relative_to_the_first_row_and_late_devices_start_at_zero(
    tmp_path: Path,
) -> None:
    text = "time_s , device , watts\n\n100.0,a,10\n100.5,b,40\n101.0,a,20\n"
    trace = load_trace(write(tmp_path, text))
    assert trace.devices == ("a", "b")
    assert trace.period == 1.5
    # a: 10 W [0,1), 20 W [1,1.5) -> 20 J; b: 0 W [0,0.5), 40 W [0.5,1.5) -> 40 J
    assert trace.energy(0, 1.5) == pytest.approx(20.0)
    assert trace.energy(1, 1.5) == pytest.approx(40.0)
    assert trace.energy(1, 1.5 + 0.25) == pytest.approx(40.0)  # b draws 0 W again
    assert trace.energy(1, 1.5 + 0.75) == pytest.approx(50.0)


def test_single_time_is_constant_power(tmp_path: Path) -> None:
    clock = Clock(0.0)
    path = write(tmp_path, "time_s,device,watts\n0,gpu0,250\n")
    meter = open_meter(f"trace:{path}", clock=clock)
    clock.now = 7.25
    assert meter.read().joules == pytest.approx((7.25 * 250.0,))


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("", None, "empty"),
        ("time,device,watts\n0,gpu0,1\n", 1, "header"),
        ("time_s,device,watts\n", None, "no rows"),
        ("time_s,device,watts\n0,gpu0\n", 2, "3 fields"),
        ("time_s,device,watts\n0,gpu0,1\nx,gpu0,1\n", 3, "not a number"),
        ("time_s,device,watts\n0,gpu0,lots\n", 2, "not a number"),
        ("time_s,device,watts\n0,gpu0,nan\n", 2, "finite"),
        ("time_s,device,watts\n0,gpu0,-3\n", 2, ">= 0"),
        ("time_s,device,watts\n0,,3\n", 2, "device is empty"),
        ("time_s,device,watts\n1,gpu0,1\n0.5,gpu1,1\n", 3, "goes back"),
        ("time_s,device,watts\n0,gpu0,1\n\n0,gpu0,2\n", 4, "second row"),
    ],
)
def test_bad_file_names_file_and_line(
    tmp_path: Path, text: str, line: int | None, why: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MeterSpecError) as info:
        open_meter(f"trace:{path}")
    message = str(info.value)
    assert str(path) in message
    assert why in message
    if line is not None:
        assert f"line {line}" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(MeterSpecError, match="cannot read"):
        open_meter(f"trace:{path}")


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MeterSpecError, match=str(path)):
        open_meter(f"trace:{path}")
