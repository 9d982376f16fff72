"""Tests for proxy.sampler with fake meters.

Timing-robust by construction: tests wait for *conditions* (with a generous timeout) rather than
sleeping a fixed time and counting, and the fake meters stamp readings with their own call count,
so power figures do not depend on how fast the machine is.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pytest

from proxy.meter.base import Meter, Reading
from proxy.sampler import Sampler, next_deadline


class CountingMeter(Meter):
    """Each read advances a virtual clock by 0.1 s at ``watts`` per device; can fail on demand."""

    def __init__(self, watts: float = 100.0, count: int = 1, update_period: float = 0.0) -> None:
        self.name = "fake"
        self.estimate = False
        self.devices = tuple(f"dev{i}" for i in range(count))
        self.update_period = update_period
        self.watts = watts
        self.calls = 0
        self.fail: Callable[[int], bool] = lambda n: False
        self.none: Callable[[int], bool] = lambda n: False
        self.lock = threading.Lock()

    def read(self) -> Reading:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.fail(n):
            raise RuntimeError(f"boom {n}")
        t = n * 0.1
        value = None if self.none(n) else self.watts * t
        return Reading(time=t, joules=(value,) * len(self.devices))

    @property
    def up(self) -> bool:
        return True


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


@pytest.mark.parametrize("interval", [0.0, 0.004, 1.01, -1.0, math.nan, math.inf])
def test_interval_out_of_range_is_rejected(interval: float) -> None:
    with pytest.raises(ValueError):
        Sampler(CountingMeter(), interval)


@pytest.mark.parametrize("interval", [0.005, 0.05, 1.0])
def test_interval_in_range_is_accepted(interval: float) -> None:
    assert Sampler(CountingMeter(), interval).interval == interval


def test_readings_arrive_callback_is_called_and_stop_joins() -> None:
    seen: list[Reading] = []
    sampler = Sampler(CountingMeter(), 0.005, on_reading=seen.append)
    assert sampler.latest() is None
    sampler.start()
    try:
        wait_for(lambda: len(seen) >= 5)
        latest = sampler.latest()
        assert latest is not None and latest.joules[0] is not None
    finally:
        assert sampler.stop() is True
    assert not sampler.running
    assert sampler._thread is not None and sampler._thread.daemon
    n = len(seen)
    time.sleep(0.03)
    assert len(seen) == n  # nothing after stop
    assert [r.time for r in seen] == sorted(r.time for r in seen)
    assert sampler.snapshot()["samples"] == n


def test_ring_buffer_is_bounded() -> None:
    meter = CountingMeter()
    with Sampler(meter, 0.005, history=4) as sampler:
        wait_for(lambda: meter.calls >= 12)
    readings = sampler.readings()
    assert len(readings) == 4
    assert readings[-1] == sampler.latest()
    assert sampler.snapshot()["buffer_capacity"] == 4


def test_meter_and_callback_exceptions_do_not_kill_the_thread() -> None:
    meter = CountingMeter()
    meter.fail = lambda n: n % 2 == 0

    def callback(r: Reading) -> None:
        raise ValueError("callback broke")

    with Sampler(meter, 0.005, on_reading=callback) as sampler:
        wait_for(lambda: meter.calls >= 10)
        assert sampler.running
    snap = sampler.snapshot()
    assert snap["read_errors"] == snap["read_exceptions"] >= 4
    assert snap["callback_errors"] >= 4
    assert snap["samples"] == meter.calls - snap["read_exceptions"]
    assert isinstance(snap["last_error"], str)


def test_power_watts_uses_readings_spanning_the_update_period() -> None:
    meter = CountingMeter(watts=250.0, count=2, update_period=0.3)
    with Sampler(meter, 0.005) as sampler:
        assert sampler.power_watts() == {"dev0": None, "dev1": None}
        wait_for(lambda: len(sampler.readings()) >= 5)
    assert sampler.power_watts() == {"dev0": pytest.approx(250.0), "dev1": pytest.approx(250.0)}


def test_power_watts_is_none_across_an_unreadable_gap() -> None:
    meter = CountingMeter(update_period=0.2)
    meter.none = lambda n: n == 3
    sampler = Sampler(meter, 0.005)
    for _ in range(4):  # drive reads by hand: no thread, no timing
        sampler._sample_once()
    assert sampler.power_watts() == {"dev0": None}  # readings 4 and 3(None): not 0.2 s apart
    sampler._sample_once()
    sampler._sample_once()
    assert sampler.power_watts() == {"dev0": pytest.approx(100.0)}
    snap = sampler.snapshot()  # an unreadable device counts as a read error, not an exception
    assert (snap["samples"], snap["read_errors"], snap["read_exceptions"]) == (6, 1, 0)


def test_snapshot_reports_rate_and_state() -> None:
    meter = CountingMeter()
    with Sampler(meter, 0.01) as sampler:
        wait_for(lambda: meter.calls >= 5)
        snap = sampler.snapshot()
    assert snap["running"] is True
    assert snap["target_rate_hz"] == pytest.approx(100.0)
    rate = snap["actual_rate_hz"]
    assert isinstance(rate, float) and rate > 0
    assert isinstance(snap["cpu_seconds"], float) and snap["cpu_seconds"] >= 0
    assert sampler.snapshot()["running"] is False


def test_start_is_idempotent_and_restartable() -> None:
    meter = CountingMeter()
    sampler = Sampler(meter, 0.005)
    sampler.start()
    first = sampler._thread
    sampler.start()
    assert sampler._thread is first
    assert sampler.stop()
    sampler.start()
    try:
        n = meter.calls
        wait_for(lambda: meter.calls > n)
    finally:
        assert sampler.stop()


def test_schedule_does_not_drift_and_skips_missed_ticks() -> None:
    # On time: the next deadline is start + k * interval, whatever the read cost.
    assert next_deadline(10.0, 0.05, 0, 10.003) == (pytest.approx(10.05), 1, 0)
    deadline, tick, skipped = 10.0, 0, 0
    for _ in range(1000):
        deadline, tick, skipped = next_deadline(10.0, 0.05, tick, deadline - 0.01)
        assert skipped == 0
    assert deadline == pytest.approx(10.0 + 1000 * 0.05, abs=1e-9)
    # A read that overran 3.5 ticks skips the past ones instead of bursting.
    deadline, tick, skipped = next_deadline(10.0, 0.05, 1, 10.225)
    assert (deadline, tick, skipped) == (pytest.approx(10.25), 5, 3)


def test_slow_meter_stop_timeout_and_restart_guard() -> None:
    release = threading.Event()
    meter = CountingMeter()
    meter.fail = lambda n: not release.wait(10.0)  # the first read blocks until released
    sampler = Sampler(meter, 0.005)
    sampler.start()
    try:
        wait_for(lambda: meter.calls >= 1)
        assert sampler.stop(timeout=0.01) is False  # stuck in a read: not joined yet
        with pytest.raises(RuntimeError):
            sampler.start()
    finally:
        release.set()
    assert sampler.stop() is True
