"""The synthetic meter: exact constant power, for tests and demos."""

from __future__ import annotations

import pytest

from proxy.meter import MeterSpecError, Reading, SyntheticMeter, open_meter


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_energy_is_watts_times_elapsed_exactly() -> None:
    clock = Clock(1000.0)
    meter = open_meter("synthetic:200", clock=clock)
    assert meter.name == "synthetic"
    assert meter.estimate is False
    assert meter.devices == ("synthetic0",)
    assert meter.update_period == 0.0
    assert meter.read() == Reading(time=1000.0, joules=(0.0,))
    clock.now = 1002.5
    assert meter.read() == Reading(time=1002.5, joules=(500.0,))
    clock.now = 1003.0
    assert meter.read().joules == (600.0,)


def test_several_devices() -> None:
    clock = Clock(0.0)
    meter = open_meter("synthetic:150x3", clock=clock)
    assert meter.devices == ("synthetic0", "synthetic1", "synthetic2")
    clock.now = 2.0
    assert meter.read().joules == (300.0, 300.0, 300.0)
    assert meter.up
    described = meter.describe()
    assert described["name"] == "synthetic"
    assert described["up"] is True
    assert described["devices"] == [
        {"label": "synthetic0", "watts": 150.0},
        {"label": "synthetic1", "watts": 150.0},
        {"label": "synthetic2", "watts": 150.0},
    ]


def test_clock_going_backwards_never_gives_negative_energy() -> None:
    clock = Clock(10.0)
    meter = SyntheticMeter(100.0, clock=clock)
    clock.now = 9.0
    assert meter.read().joules == (0.0,)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SyntheticMeter(-1.0)
    with pytest.raises(ValueError):
        SyntheticMeter(1.0, count=0)
    with pytest.raises(MeterSpecError):
        open_meter("synthetic:-1")
