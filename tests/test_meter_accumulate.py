"""The shared rules that turn raw counters and power into Joules since open."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.meter.accumulate import EnergyAccumulator


def test_first_counter_value_is_the_base() -> None:
    acc = EnergyAccumulator()
    assert acc.counter(5000.0) == 0.0
    assert acc.counter(5012.5) == 12.5
    assert acc.counter(5012.5) == 12.5


def test_counter_going_backwards_is_a_reset_not_negative_energy() -> None:
    acc = EnergyAccumulator()
    acc.counter(100.0)
    acc.counter(150.0)
    assert acc.counter(3.0) == 50.0  # reset: new base, nothing invented, nothing lost before
    assert acc.counter(10.0) == 57.0
    assert acc.resets == 1


def test_counter_wraps_around_a_known_range() -> None:
    acc = EnergyAccumulator(wrap_joules=1000.0)
    acc.counter(990.0)
    assert acc.counter(5.0) == pytest.approx(15.0)
    assert acc.wraps == 1
    assert acc.resets == 0


def test_gap_makes_the_next_value_a_new_base() -> None:
    acc = EnergyAccumulator()
    acc.counter(0.0)
    acc.counter(10.0)
    acc.gap()
    assert acc.counter(500.0) == 10.0  # 490 J used while unreadable are not invented
    assert acc.counter(501.0) == 11.0


def test_power_is_integrated_with_the_trapezoid_rule() -> None:
    acc = EnergyAccumulator()
    assert acc.power(10.0, 100.0) == 0.0
    assert acc.power(12.0, 200.0) == pytest.approx(300.0)  # (100 + 200) / 2 * 2 s
    acc.gap()
    assert acc.power(20.0, 1000.0) == pytest.approx(300.0)
    assert acc.power(20.5, 1000.0) == pytest.approx(800.0)


def test_switching_between_counter_and_power_starts_a_new_base() -> None:
    acc = EnergyAccumulator()
    acc.counter(1000.0)
    acc.counter(1010.0)
    assert acc.power(1.0, 50.0) == 10.0
    assert acc.power(2.0, 50.0) == 60.0
    assert acc.counter(7.0) == 60.0


def test_rejects_nonsense() -> None:
    acc = EnergyAccumulator()
    with pytest.raises(ValueError):
        acc.counter(math.nan)
    with pytest.raises(ValueError):
        acc.power(0.0, -1.0)
    with pytest.raises(ValueError):
        EnergyAccumulator(wrap_joules=0.0)


@given(
    st.lists(
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e9, allow_nan=False)),
        max_size=50,
    )
)
def test_total_never_decreases(values: list[float | None]) -> None:
    acc = EnergyAccumulator()
    previous = 0.0
    for value in values:
        if value is None:
            acc.gap()
            continue
        total = acc.counter(value)
        assert total >= previous
        previous = total
