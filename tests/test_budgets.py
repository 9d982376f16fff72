"""Energy budgets, the policy layer: windows, the estimator, the engine and its configuration.

End-to-end behaviour through the proxy is in test_budgets_proxy.py.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.budgets import (
    ALLOW,
    DEGRADE,
    REJECT,
    Budgets,
    BudgetScope,
    BudgetSpec,
    CalendarWindow,
    Degrade,
    Estimator,
    RollingWindow,
    degrade_body,
    p95,
    parse_energy,
    parse_window,
    read_state,
    write_state,
)
from proxy.config import ConfigError, load_config

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3600.0


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def spec(name: str = "b", **fields: Any) -> BudgetSpec:
    values: dict[str, Any] = {
        "tenant": "ads",
        "limit_joules": 100.0,
        "window": "day",
        "action": REJECT,
    }
    values.update(fields)
    return BudgetSpec(name=name, **values)


def engine(specs: list[BudgetSpec], **settings: Any) -> Budgets:
    settings.setdefault("timezone", "Europe/Berlin")
    return Budgets(specs, **settings)


# ---- windows ----


def test_days_in_a_time_zone_last_23_or_25_hours_across_dst() -> None:
    day = CalendarWindow("day", BERLIN)
    start, end = day.bounds(at("2024-03-31T12:00"))  # clocks forward at 02:00
    assert (utc(start), utc(end)) == ("2024-03-30T23:00:00+00:00", "2024-03-31T22:00:00+00:00")
    assert end - start == 23 * HOUR
    start, end = day.bounds(at("2024-10-27T12:00"))  # clocks back at 03:00
    assert end - start == 25 * HOUR
    # A Berlin day is not a UTC day: 23:30 UTC on 1 June is already 2 June in Berlin.
    start, _ = day.bounds(datetime(2024, 6, 1, 23, 30, tzinfo=UTC).timestamp())
    assert utc(start) == "2024-06-01T22:00:00+00:00"
    # Boundaries: the first instant of a day belongs to it, the one before to the day before.
    midnight = at("2024-06-02T00:00")
    assert day.bounds(midnight)[0] == midnight
    assert day.bounds(midnight - 1e-3)[1] == midnight


def test_weeks_start_on_monday_and_months_on_the_first_in_the_zone() -> None:
    week = CalendarWindow("week", BERLIN)
    start, end = week.bounds(at("2024-03-31T23:59"))  # a Sunday, the week DST began
    assert (start, end) == (at("2024-03-25T00:00"), at("2024-04-01T00:00"))
    assert end - start == 7 * 24 * HOUR - HOUR
    assert week.bounds(at("2024-04-01T00:00"))[0] == at("2024-04-01T00:00")
    month = CalendarWindow("month", BERLIN)
    start, end = month.bounds(at("2024-10-15T08:00"))
    assert (start, end) == (at("2024-10-01T00:00"), at("2024-11-01T00:00"))
    assert end - start == 31 * 24 * HOUR + HOUR  # October gives back the DST hour
    start, end = month.bounds(at("2024-12-31T23:59:59"))
    assert (start, end) == (at("2024-12-01T00:00"), at("2025-01-01T00:00"))
    assert month.bounds(at("2024-02-29T12:00"))[1] == at("2024-03-01T00:00")


def test_a_midnight_skipped_by_dst_starts_the_day_at_the_change() -> None:
    santiago = ZoneInfo("America/Santiago")  # 2024-09-08: 00:00 jumps to 01:00
    day = CalendarWindow("day", santiago)
    start, end = day.bounds(at("2024-09-08T12:00", santiago))
    assert utc(start) == "2024-09-08T04:00:00+00:00"  # 01:00 -03, the first instant of the day
    assert end - start == 23 * HOUR
    before = day.bounds(start - 1)
    assert before[1] == start and before[1] - before[0] == 24 * HOUR  # windows tile
    # 2024-04-07: 24:00 -03 goes back to 23:00 -04: 6 April lasts 25 hours.
    start, end = day.bounds(at("2024-04-06T12:00", santiago))
    assert end - start == 25 * HOUR


def test_rolling_windows_age_out_bucket_by_bucket() -> None:
    assert parse_window("rolling:90m") == "rolling:5400s"
    assert parse_window("rolling:24h") == parse_window("rolling:1d") == "rolling:86400s"
    window = RollingWindow(3600)
    assert window.width == 60
    t0 = 1_700_000_010.0
    key = window.bucket(t0)
    assert key % 60 == 0 and key <= t0 < key + 60
    assert window.live(key, t0 + 3600)  # still inside (the bucket overlaps the window)
    assert not window.live(key, key + 60 + 3600)  # the whole bucket is older than an hour
    # Retry-After: until the oldest buckets holding the excess have aged out.
    buckets = {key: 10.0, key + 1200: 10.0}
    assert window.retry_after(buckets, 5.0, t0 + 1800) == key + 60 + 3600 - (t0 + 1800)
    assert window.retry_after(buckets, 15.0, t0 + 1800) == key + 1260 + 3600 - (t0 + 1800)
    assert window.retry_after(buckets, 25.0, t0 + 1800) == 3600  # never enough: its length


# ---- the estimator ----


def test_p95_by_nearest_rank() -> None:
    assert p95(range(1, 101)) == 95
    assert p95([7.0]) == 7.0
    assert p95([1, 2, 3, 100]) == 100
    with pytest.raises(ValueError):
        p95([])


def test_estimator_p95_per_task_and_model_bounded_with_fallbacks() -> None:
    estimator = Estimator(samples=100, min_samples=3, max_keys=4)
    # Before any sample: the study's mean for the task (kWh per 1,000 inferences x 3,600).
    assert estimator.estimate("image-generation", "sd") == pytest.approx(2.907 * 3600)
    assert estimator.estimate("text-generation", "gpt") == pytest.approx(0.047 * 3600)
    assert estimator.estimate("embeddings", "e5") == pytest.approx(0.047 * 3600)  # not studied
    for joules in range(1, 201):  # only the last 100 count: 101..200
        estimator.observe("text-generation", "gpt", float(joules))
    assert estimator.estimate("text-generation", "gpt") == 195.0
    # Too few samples for a model: the task's p95 over its models.
    estimator.observe("text-generation", "tiny", 1.0)
    assert estimator.estimate("text-generation", "tiny") == 195.0
    for _ in range(2):
        estimator.observe("text-generation", "tiny", 1.0)
    assert estimator.estimate("text-generation", "tiny") == 1.0
    # Bounded: at most max_keys (task, model) pairs, the least recently seen forgotten.
    for index in range(10):
        for _ in range(3):
            estimator.observe("embeddings", f"m{index}", 2.0)
    assert len(estimator._pairs) == 4
    assert estimator.estimate("embeddings", "m9") == 2.0
    # A configured default replaces the study's figures.
    assert Estimator(42.0).estimate("image-generation", "sd") == 42.0


# ---- the engine ----


def test_reserve_settle_release_and_unknown_energy() -> None:
    budgets = engine([spec(limit_joules=100.0)], default_estimate_joules=30.0)
    now = at("2024-06-03T10:00")
    first = [budgets.admit("ads", "text-generation", "m", now) for _ in range(3)]
    assert [a.decision for a in first] == [ALLOW] * 3
    assert first[0].reserved_joules == 30.0 and first[0].budgets == ("b",)
    assert budgets.status(now)[0].used_joules == 90.0  # in flight, reserved
    refused = budgets.admit("ads", "text-generation", "m", now)
    assert refused.decision == REJECT and refused.exceeded == ("b",)
    assert refused.charges == []  # a refused request reserves nothing
    assert refused.retry_after_seconds == math.ceil(at("2024-06-04T00:00") - now)
    budgets.settle(first[0], 10.0, now + 1)  # measured: 10 J replaces 30 J
    assert budgets.status(now + 1)[0].used_joules == pytest.approx(70.0)
    budgets.settle(first[0], 10.0, now + 1)  # settling twice changes nothing
    assert budgets.status(now + 1)[0].used_joules == pytest.approx(70.0)
    budgets.release(first[1])  # never reached the upstream: nothing used
    assert budgets.status(now + 1)[0].used_joules == pytest.approx(40.0)
    budgets.settle(first[2], None, now + 1)  # the meter could not tell: the estimate counts
    assert budgets.status(now + 1)[0].used_joules == pytest.approx(40.0)
    assert budgets.admit("ads", "text-generation", "m", now + 2).decision == ALLOW
    assert budgets.status(now + 2)[0].rejected == 1
    # A request without a reservation (refused, released) still counts its measured share,
    # as the ledger's sums will; another tenant's does not.
    budgets.charge("ads", "text-generation", "m", 0.5, now + 2, now + 3)
    budgets.charge("search", "text-generation", "m", 99.0, now + 2, now + 3)
    assert budgets.status(now + 3)[0].used_joules == pytest.approx(70.5)
    # The next day starts from zero.
    assert budgets.status(at("2024-06-04T00:00"))[0].used_joules == 0.0


def test_reservations_leave_no_float_residue() -> None:
    budgets = engine([spec(limit_joules=1e12)], default_estimate_joules=0.1)
    now = at("2024-06-03T10:00")
    admissions = [budgets.admit("ads", "embeddings", "m", now) for _ in range(1000)]
    for admission in admissions:
        budgets.release(admission)
    account = budgets.accounts["b"]
    assert account.reserved == {} and account._holds == {}


def test_which_budgets_apply_and_what_each_action_does() -> None:
    budgets = engine(
        [
            spec("ads-all", limit_joules=1000.0, action="alert"),
            spec("ads-sd", model="sd", limit_joules=50.0, action=REJECT),
            spec(
                "ads-text",
                task="text-generation",
                limit_joules=50.0,
                action=DEGRADE,
                degrade=Degrade(model="small", max_tokens=64),
            ),
            spec(
                "ads-text-2",
                task="text-generation",
                limit_joules=1.0,
                action=DEGRADE,
                degrade=Degrade(max_tokens=16, model="other"),
            ),
            spec("everyone", tenant="*", limit_joules=1e9, action="alert"),
        ],
        default_estimate_joules=40.0,
    )
    budgets.estimator.observe("text-generation", "small", 5.0)
    for _ in range(3):
        budgets.estimator.observe("text-generation", "small", 5.0)
    now = at("2024-06-03T10:00")
    assert budgets.admit("search", "image-generation", "sd", now).budgets == ("everyone",)
    image = budgets.admit("ads", "image-generation", "sd", now)
    assert image.budgets == ("ads-all", "ads-sd", "everyone") and image.decision == ALLOW
    assert budgets.admit("ads", "image-generation", "sd", now).decision == REJECT  # 40 + 40
    text = budgets.admit("ads", "text-generation", "big", now)
    # ads-text-2 is spent (40 > 1): degraded; the first model named, the smallest cap;
    # the reservation is the degraded model's estimate.
    assert text.decision == DEGRADE and text.exceeded == ("ads-text-2",)
    assert text.degrade == Degrade(model="other", max_tokens=16)
    assert text.estimate_joules == 5.0  # the task's p95: "other" has no samples of its own
    status = {s.name: s for s in budgets.status(now)}
    assert status["ads-text-2"].degraded == 1 and status["ads-text"].degraded == 0
    assert status["ads-sd"].rejected == 1
    assert status["ads-all"].used_joules == pytest.approx(45.0)
    # An alert budget never refuses, however spent.
    alert_only = engine([spec(action="alert", limit_joules=1.0)], default_estimate_joules=5.0)
    decisions = {alert_only.admit("ads", "embeddings", "m", now).decision for _ in range(5)}
    assert decisions == {ALLOW}
    assert alert_only.status(now)[0].remaining_ratio == 0.0


def test_rolling_budget_ages_out_and_says_when() -> None:
    budgets = engine([spec(window="rolling:3600s", limit_joules=25.0)], default_estimate_joules=10)
    t0 = 1_700_000_000.0
    a = budgets.admit("ads", "embeddings", "m", t0)
    budgets.settle(a, 10.0, t0)
    b = budgets.admit("ads", "embeddings", "m", t0 + 1800)
    budgets.settle(b, 10.0, t0 + 1800)
    refused = budgets.admit("ads", "embeddings", "m", t0 + 1900)  # 20 + 10 > 25
    assert refused.decision == REJECT
    window = budgets.accounts["b"].window
    expected = window.bucket(t0) + window.width + 3600 - (t0 + 1900)
    assert refused.retry_after_seconds == math.ceil(expected)
    later = t0 + 1900 + refused.retry_after_seconds
    assert budgets.admit("ads", "embeddings", "m", later).decision == ALLOW


# ---- persistence ----


def test_state_survives_a_snapshot_and_a_changed_window_does_not(tmp_path: Path) -> None:
    now = at("2024-06-03T10:00")
    budgets = engine(
        [spec("day"), spec("roll", window="rolling:3600s")], default_estimate_joules=30.0
    )
    for name in ("day", "roll"):
        assert budgets.accounts[name]
    admission = budgets.admit("ads", "embeddings", "m", now)
    budgets.settle(admission, 12.0, now)
    in_flight = budgets.admit("ads", "embeddings", "m", now)  # saved as used
    assert budgets.changed
    path = tmp_path / "budgets.json"
    write_state(path, budgets.snapshot(now + 1))
    assert not budgets.changed
    assert json.loads(path.read_text())["version"] == 1
    assert in_flight.reserved_joules == 30.0

    again = engine([spec("day"), spec("roll", window="rolling:3600s")])
    assert again.restore(read_state(path) or {}, now + 2) == ["day", "roll"]
    assert [s.used_joules for s in again.status(now + 2)] == [42.0, 42.0]
    # The next day, and two hours later for the rolling window: nothing left.
    tomorrow = engine([spec("day")])
    tomorrow.restore(read_state(path) or {}, at("2024-06-04T00:00"))
    assert tomorrow.status(at("2024-06-04T00:00"))[0].used_joules == 0.0
    # A budget whose window or scope changed starts from zero.
    changed = engine([spec("day", window="week"), spec("roll", tenant="search")])
    assert changed.restore(read_state(path) or {}, now + 2) == []
    assert read_state(tmp_path / "missing.json") is None
    with pytest.raises(ValueError):
        engine([spec()]).restore({"version": 99}, now)


async def test_load_rebuilds_used_energy_from_stored_records() -> None:
    """The hook the ledger plugs into: sum_energy(scope, start, end) over stored records."""
    now = at("2024-06-03T10:00")
    records = [  # (tenant, task, model, started_at, joules)
        ("ads", "text-generation", "m", at("2024-06-03T01:00"), 5.0),
        ("ads", "text-generation", "m", now - 1800, 7.0),
        ("ads", "embeddings", "e", now - 60, 11.0),
        ("ads", "text-generation", "m", at("2024-06-02T23:00"), 1000.0),  # yesterday
        ("search", "text-generation", "m", now - 60, 1000.0),  # another tenant
    ]
    asked: list[tuple[BudgetScope, float, float]] = []

    async def sum_energy(scope: BudgetScope, start: float, end: float) -> float:
        asked.append((scope, start, end))
        return sum(
            joules
            for tenant, task, model, started, joules in records
            if scope.matches(tenant, task, model) and start <= started < end
        )

    budgets = engine(
        [
            spec("day"),
            spec("text-hour", task="text-generation", window="rolling:3600s"),
        ],
        default_estimate_joules=1.0,
    )
    in_flight = budgets.admit("ads", "embeddings", "e", now)
    await budgets.load(sum_energy, now)
    used = {s.name: s.used_joules for s in budgets.status(now)}
    assert used["day"] == pytest.approx(5 + 7 + 11 + in_flight.reserved_joules)
    assert used["text-hour"] == pytest.approx(7.0)
    assert sum(1 for scope, _, _ in asked if scope.task == "text-generation") == 61
    budgets.seed("day", 100.0, now)
    assert budgets.status(now)[0].used_joules == pytest.approx(100 + in_flight.reserved_joules)


# ---- degrading a request ----


def test_degrade_rewrites_model_and_caps_settings() -> None:
    degrade = Degrade(model="small", max_tokens=64, size="512x512", steps=20)
    body, changes = degrade_body(
        {"model": "big", "messages": [], "max_tokens": 512}, "text-generation", degrade
    )
    assert body == {"model": "small", "messages": [], "max_tokens": 64}
    assert changes == ["model big→small", "max_tokens 512→64"]
    # A smaller setting is kept; both OpenAI spellings are capped.
    body, changes = degrade_body(
        {"model": "small", "max_tokens": 8, "max_completion_tokens": 900},
        "text-generation",
        degrade,
    )
    assert body == {"model": "small", "max_tokens": 8, "max_completion_tokens": 64}
    assert changes == ["max_completion_tokens 900→64"]
    # No limit named: text generation gets one (TGI's in parameters); embeddings do not.
    assert degrade_body({"model": "small"}, "text-generation", degrade)[1] == [
        "max_tokens unset→64"
    ]
    assert degrade_body(
        {"inputs": "x", "parameters": {"max_new_tokens": 500}}, "text-generation", degrade
    )[0]["parameters"] == {"max_new_tokens": 64}
    assert degrade_body({"inputs": "x"}, "text-generation", degrade)[0]["parameters"] == {
        "max_new_tokens": 64
    }
    assert degrade_body({"model": "small", "input": "x"}, "embeddings", degrade) == (
        {"model": "small", "input": "x"},
        [],
    )
    # Images: size and steps capped, never raised.
    body, changes = degrade_body(
        {"model": "sd", "size": "1024x1024", "num_inference_steps": 50},
        "image-generation",
        Degrade(size="512x512", steps=20),
    )
    assert body == {"model": "sd", "size": "512x512", "num_inference_steps": 20}
    assert changes == ["size 1024x1024→512x512", "num_inference_steps 50→20"]
    small = {"model": "sd", "size": "256x256", "num_inference_steps": 4}
    assert degrade_body(small, "image-generation", Degrade(size="512x512", steps=20)) == (
        small,
        [],
    )


# ---- configuration ----


def test_budget_configuration_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "joulegate.yaml"
    path.write_text(
        """
budgets:
  - {name: ads-daily, tenant: ads, limit: 5 kWh, window: day, action: reject}
  - name: free-text
    tenant: free
    task: text-generation
    model: big
    limit: 500 Wh
    window: rolling:90m
    action: degrade
    degrade: {model: small, max_tokens: 64, size: 512X512, steps: 20}
  - {name: all, tenant: "*", limit: 1800 J, window: month, action: alert}
budget_timezone: Europe/Berlin
budget_default_estimate_joules: 50
"""
    )
    config = load_config(path, environ={})
    ads, free, every = config.budgets
    assert ads == BudgetSpec("ads-daily", "ads", 5 * 3.6e6, "day", "reject")
    assert free.limit_joules == 500 * 3600 and free.window == "rolling:5400s"
    assert (free.task, free.model) == ("text-generation", "big")
    assert free.degrade == Degrade(model="small", max_tokens=64, size="512x512", steps=20)
    assert every.tenant == "*" and every.limit_joules == 1800.0
    assert config.budget_timezone == "Europe/Berlin"
    assert config.budget_default_estimate_joules == 50.0
    assert {"ads", "free"} <= config.tenants and "*" not in config.tenants
    from_env = load_config(
        environ={
            "JOULEGATE_BUDGETS": '[{"name": "x", "tenant": "a", "limit": "1 kWh", '
            '"window": "week", "action": "alert"}]'
        }
    )
    assert from_env.budgets[0].limit_joules == 3.6e6
    assert load_config(environ={}).budgets == ()


def test_energy_units() -> None:
    assert parse_energy("5 kWh") == 1.8e7
    assert parse_energy("500Wh") == 1.8e6
    assert parse_energy("1800 J") == 1800.0
    assert parse_energy("2.5 kJ") == 2500.0
    assert parse_energy("0.5 MWh") == 1.8e9
    for bad in ("5", 5, "5 kW", "-1 J", "0 J", "", True, "1e3 J"):
        with pytest.raises(ValueError):
            parse_energy(bad)


GOOD = {"name": "b", "tenant": "ads", "limit": "1 kWh", "window": "day", "action": "reject"}
BAD_BUDGETS: list[tuple[str, Any]] = [
    ("budgets", {"name": "b"}),
    ("budgets", ["b"]),
    ("budgets", [GOOD | {"limit": "5 kW"}]),
    ("budgets", [GOOD | {"limit": 5}]),
    ("budgets", [GOOD | {"window": "fortnight"}]),
    ("budgets", [GOOD | {"window": "rolling:10s"}]),
    ("budgets", [GOOD | {"window": "rolling:24"}]),
    ("budgets", [GOOD | {"action": "shout"}]),
    ("budgets", [GOOD | {"action": "degrade"}]),
    ("budgets", [GOOD | {"action": "degrade", "degrade": {"size": "big"}}]),
    ("budgets", [GOOD | {"action": "degrade", "degrade": {"max_tokens": 0}}]),
    ("budgets", [GOOD | {"action": "degrade", "degrade": {"colour": "grey"}}]),
    ("budgets", [GOOD | {"degrade": {"model": "small"}}]),
    ("budgets", [GOOD | {"task": "painting"}]),
    ("budgets", [GOOD | {"tenant": "bad tenant!"}]),
    ("budgets", [GOOD | {"name": ""}]),
    ("budgets", [GOOD | {"extra": 1}]),
    ("budgets", [{k: v for k, v in GOOD.items() if k != "window"}]),
    ("budgets", [GOOD, GOOD]),
    ("budgets", "[unclosed"),
    ("budget_timezone", "Mars/Olympus_Mons"),
    ("budget_timezone", ""),
    ("budget_default_estimate_joules", 0),
    ("budget_default_estimate_joules", "lots"),
    ("budget_state_path", "/no/such/directory/budgets.json"),
]


@pytest.mark.parametrize(("key", "value"), BAD_BUDGETS)
def test_bad_budget_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={}, overrides={key: value})
    assert raised.value.key == key
    assert "\n" not in str(raised.value)


def test_a_bad_entry_is_named_in_the_message() -> None:
    with pytest.raises(ConfigError, match=r"budgets: entry 1 \(late\): expected an energy"):
        load_config(environ={}, overrides={"budgets": [GOOD, GOOD | {"name": "late", "limit": 3}]})
