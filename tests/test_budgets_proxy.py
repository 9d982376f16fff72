"""Energy budgets end to end: the real proxy, a real upstream, a meter whose energy per request
is known, so that what a budget allows, refuses or rewrites can be asserted exactly."""

from __future__ import annotations

import asyncio
import glob
import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.meter.base import Meter, Reading
from proxy.server import BUDGETS, RECORDER
from tests.fake_openai import SEEN, create_fake_openai
from tests.servers import closed_port_url, joulegate, metric_series, serve, settled

INTERVAL = 0.02
WATTS = 100.0  # per request the upstream is working on
BODIES = web.AppKey("bodies", list)


pytest_plugins = ["tests.postgres_fixtures"]


class LoadMeter(Meter):
    """One device that draws `watts` for the first `seconds` of each request the upstream
    serves, and nothing when idle: exactly watts x seconds per request, however many run at
    once and however slowly a loaded machine answers."""

    def __init__(self, seconds: float, watts: float = WATTS) -> None:
        self.name = "synthetic"
        self.estimate = False
        self.devices = ("gpu0",)
        self.update_period = 0.0
        self.seconds = seconds
        self.watts = watts
        self._lock = threading.Lock()
        self._done = 0.0  # Joules of work items that are over
        self._working: list[float] = []  # start times of work items still drawing power

    def work(self) -> None:
        with self._lock:
            self._working.append(time.monotonic())

    def read(self) -> Reading:
        with self._lock:
            now = time.monotonic()
            over = [start for start in self._working if now - start >= self.seconds]
            self._done += len(over) * self.watts * self.seconds
            self._working = [start for start in self._working if now - start < self.seconds]
            running = sum(self.watts * (now - start) for start in self._working)
            return Reading(now, (self._done + running,))

    @property
    def up(self) -> bool:
        return True


def working_upstream(meter: LoadMeter) -> web.Application:
    """Chat completions that keep the metered device busy for the meter's `seconds` each."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        request.app[BODIES].append(body)
        meter.work()
        await asyncio.sleep(meter.seconds)
        return web.json_response(
            {"model": body.get("model"), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        )

    app = web.Application()
    app[BODIES] = []
    app.router.add_post("/v1/chat/completions", chat)
    return app


def budget(name: str, tenant: str, limit: str, action: str, **more: Any) -> dict[str, Any]:
    return (
        {"name": name, "tenant": tenant, "limit": limit, "action": action}
        | {"window": "day"}
        | more
    )


async def chat(
    client: aiohttp.ClientSession, proxy: str, tenant: str, **body: Any
) -> tuple[int, CIMultiDict[str], Any]:
    document = {"model": "big", "messages": [{"role": "user", "content": "hi"}]} | body
    async with client.post(
        proxy + "/v1/chat/completions", json=document, headers={"X-Tenant": tenant}
    ) as response:
        text = await response.text()
        if response.content_type == "application/json":
            return response.status, response.headers.copy(), json.loads(text)
        return response.status, response.headers.copy(), text


async def scrape(client: aiohttp.ClientSession, proxy: str) -> str:
    async with client.get(proxy + "/metrics") as response:
        return await response.text()


def settings(**more: Any) -> dict[str, Any]:
    return {"sample_interval_seconds": INTERVAL, "tenant_header": "X-Tenant"} | more


async def test_a_spent_reject_budget_answers_429_until_the_day_ends() -> None:
    meter = LoadMeter(0.1)
    upstream_app = working_upstream(meter)  # 10 J per request
    config = settings(
        budgets=[budget("ads-daily", "ads", "20 J", "reject")],
        budget_timezone="Europe/Berlin",
        budget_default_estimate_joules=5,
    )
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, meter_instance=meter, **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        for _ in range(2):  # 0 + 5 and 10 + 5 fit in 20 J
            status, _, _ = await chat(client, proxy, "ads")
            assert status == 200
            await settled(app)
        status, headers, document = await chat(client, proxy, "ads")  # 20 + 5 does not
        berlin = datetime.now(ZoneInfo("Europe/Berlin"))
        midnight = datetime.combine(berlin.date() + timedelta(days=1), datetime.min.time())
        until_midnight = midnight.replace(tzinfo=berlin.tzinfo).timestamp() - time.time()
        assert status == 429
        assert abs(int(headers["Retry-After"]) - until_midnight) <= 2
        error = document["error"]
        assert error["type"] == "energy_budget_exceeded"
        assert error["code"] == "energy_budget_exceeded" and error["param"] is None
        assert "ads-daily" in error["message"]
        assert (await chat(client, proxy, "search"))[0] == 200  # another tenant: no budget
        await settled(app)
        exposition = await scrape(client, proxy)
        async with client.get(proxy + "/joulegate/requests/" + headers["X-Request-Id"]) as response:
            record = await response.json()
    assert len(upstream_app[BODIES]) == 3  # the refused request never reached it
    assert (record["code"], record["status"]) == (429, "error")
    assert record["reason"] == "energy budget ads-daily spent"
    labels = '{budget="ads-daily",tenant="ads"}'
    assert metric_series(exposition, "joulegate_budget_rejected_requests_total") == {
        '{budget="ads-daily"}': 1.0
    }
    assert metric_series(exposition, "joulegate_budget_joules") == {labels: 20.0}
    used = metric_series(exposition, "joulegate_budget_used_joules")[labels]
    assert 16.0 <= used <= 21.0  # two requests of about 10 J
    ratio = metric_series(exposition, "joulegate_budget_remaining_ratio")[labels]
    assert ratio == pytest.approx(max(0.0, 20.0 - used) / 20.0)


async def test_a_spent_degrade_budget_rewrites_the_request_and_records_it() -> None:
    upstream_app = create_fake_openai()
    config = settings(
        meter="synthetic:100",
        budgets=[
            budget(
                "free-tier",
                "free",
                "1 J",  # spent before the first request: every estimate is larger
                "degrade",
                window="rolling:1h",
                degrade={"model": "small", "max_tokens": 4},
            )
        ],
        budget_default_estimate_joules=5,
    )
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        status, headers, document = await chat(client, proxy, "free", max_tokens=512)
        assert status == 200 and document["model"] == "small"
        degraded_id = headers["X-Request-Id"]
        status, _, stream = await chat(client, proxy, "free", stream=True)
        assert status == 200 and stream.endswith("data: [DONE]\n\n")
        status, headers, _ = await chat(client, proxy, "paid", max_tokens=512)
        paid_id = headers["X-Request-Id"]
        await settled(app)
        async with client.get(proxy + "/joulegate/requests/" + degraded_id) as response:
            record = await response.json()
        async with client.get(proxy + "/joulegate/requests/" + paid_id) as response:
            paid = await response.json()
        exposition = await scrape(client, proxy)
    plain, streamed, untouched = upstream_app[SEEN].bodies
    assert (plain["model"], plain["max_tokens"]) == ("small", 4)
    # A stream is degraded too, and still gets its usage asked for on the client's behalf.
    assert (streamed["model"], streamed["max_tokens"]) == ("small", 4)
    assert streamed["stream_options"] == {"include_usage": True}
    assert (untouched["model"], untouched["max_tokens"]) == ("big", 512)
    assert record["degraded"] == "model big→small, max_tokens 512→4"
    assert record["model"] == "small" and record["output_tokens"] == 4
    assert paid["degraded"] is None and paid["model"] == "big"
    assert metric_series(exposition, "joulegate_budget_degraded_requests_total") == {
        '{budget="free-tier"}': 2.0
    }


async def test_an_alert_budget_only_changes_metrics() -> None:
    meter = LoadMeter(0.05)
    upstream_app = working_upstream(meter)  # 5 J per request
    config = settings(budgets=[budget("watch", "ads", "1 J", "alert", window="week")])
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, meter_instance=meter, **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        answers = [await chat(client, proxy, "ads", max_tokens=512) for _ in range(3)]
        await settled(app)
        exposition = await scrape(client, proxy)
        records = [app[RECORDER].store.get(headers["X-Request-Id"]) for _, headers, _ in answers]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    measured = sum(r.energy_joules or 0.0 for r in records if r is not None)
    assert all(body == upstream_app[BODIES][0] for body in upstream_app[BODIES])
    assert upstream_app[BODIES][0]["max_tokens"] == 512
    labels = '{budget="watch",tenant="ads"}'
    assert metric_series(exposition, "joulegate_budget_joules") == {labels: 1.0}
    used = metric_series(exposition, "joulegate_budget_used_joules")[labels]
    assert used == pytest.approx(measured) and used > 3 * 5 * 0.5  # about 5 J per request
    assert metric_series(exposition, "joulegate_budget_remaining_ratio") == {labels: 0.0}
    assert metric_series(exposition, "joulegate_budget_rejected_requests_total") == {}
    assert metric_series(exposition, "joulegate_budget_degraded_requests_total") == {}


async def test_a_burst_cannot_overshoot_a_nearly_spent_budget_by_more_than_one_estimate() -> None:
    meter = LoadMeter(0.2)
    upstream_app = working_upstream(meter)  # 20 J per request, at any concurrency
    limit = 170.0
    config = settings(
        budgets=[budget("burst", "burst", f"{limit} J", "reject")],
        budget_default_estimate_joules=15,
    )
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, meter_instance=meter, **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        for _ in range(5):  # warms the estimator and spends about 100 J of 170
            assert (await chat(client, proxy, "burst"))[0] == 200
            await settled(app)
        budgets = app[BUDGETS]
        estimate = budgets.estimator.estimate("text-generation", "big")
        assert 16.0 <= estimate <= 21.0
        before = budgets.status(time.time())[0].used_joules
        answers = await asyncio.gather(*(chat(client, proxy, "burst") for _ in range(50)))
        await settled(app)
        after = budgets.status(time.time())[0].used_joules
        store = app[RECORDER].store
        records = [store.get(headers["X-Request-Id"]) for _, headers, _ in answers]
    statuses = [status for status, _, _ in answers]
    admitted = statuses.count(200)
    assert admitted + statuses.count(429) == 50
    assert 1 <= admitted <= (limit - before) // estimate + 1
    assert after <= limit + estimate
    # The budget's account agrees with the records' own measured energy.
    measured = sum(r.energy_joules for r in records if r is not None and r.energy_joules)
    assert after == pytest.approx(before + measured, rel=0.02)
    assert len(upstream_app[BODIES]) == 5 + admitted


async def after_a_restart(
    config: dict[str, Any],
) -> tuple[dict[str, float], int, CIMultiDict[str], list[Any]]:
    """A fresh proxy with `config`: the budgets' used energy it starts with, its answer to
    one more request of tenant `ads`, and what of that reached the upstream."""
    meter = LoadMeter(0.1)
    upstream_app = working_upstream(meter)
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, meter_instance=meter, **config) as (proxy, _),
        aiohttp.ClientSession() as client,
    ):
        used = metric_series(await scrape(client, proxy), "joulegate_budget_used_joules")
        status, headers, _ = await chat(client, proxy, "ads")
    return used, status, headers, upstream_app[BODIES]


async def test_budget_state_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.server.BUDGET_STATE_SAVE_SECONDS", 0.05)
    state = tmp_path / "budgets.json"
    config = settings(
        budgets=[budget("ads-daily", "ads", "20 J", "reject")],
        budget_default_estimate_joules=5,
        budget_state_path=str(state),
    )
    labels = '{budget="ads-daily",tenant="ads"}'
    meter = LoadMeter(0.1)
    async with (
        serve(working_upstream(meter)) as upstream,
        joulegate(upstream, meter_instance=meter, **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        for _ in range(2):
            assert (await chat(client, proxy, "ads"))[0] == 200
            await settled(app)
        used = metric_series(await scrape(client, proxy), "joulegate_budget_used_joules")[labels]
        await asyncio.sleep(0.2)
        saved = json.loads(state.read_text())  # written while running, not only at shutdown
        assert sum(j for _, j in saved["budgets"]["ads-daily"]["buckets"]) == pytest.approx(used)
    assert 16.0 <= used <= 21.0

    restored, status, headers, forwarded = await after_a_restart(config)
    assert restored[labels] == pytest.approx(used)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert forwarded == []


async def test_a_request_that_never_reached_the_upstream_gives_its_reservation_back() -> None:
    config = settings(
        meter="synthetic:100",
        budgets=[budget("ads-daily", "ads", "1 kWh", "reject")],
        budget_default_estimate_joules=500,
    )
    async with (
        joulegate(closed_port_url(), **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        status, headers, document = await chat(client, proxy, "ads")
        await settled(app)
        used = app[BUDGETS].status(time.time())[0].used_joules
        record = app[RECORDER].store.get(headers["X-Request-Id"])
    assert status == 502 and document["error"]["code"] == "upstream_unavailable"
    assert record is not None and record.energy_joules is not None
    # Its measured share of a few milliseconds counts, not the 500 J it had reserved.
    assert used == pytest.approx(record.energy_joules) and used < 100.0


def test_the_window_length_gauge_follows_the_calendar() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from proxy.budgets import Budgets, parse_budgets
    from proxy.metrics import BudgetCollector
    from proxy.tasks import TASKS

    specs = parse_budgets(
        [
            {"name": "daily", "tenant": "t", "limit": "1 Wh", "window": "day", "action": "alert"},
            {
                "name": "roll",
                "tenant": "t",
                "limit": "1 Wh",
                "window": "rolling:90m",
                "action": "alert",
            },
        ],
        TASKS,
    )
    budgets = Budgets(specs, timezone="Europe/Berlin")
    # 2026-10-25 in Berlin has 25 hours: the clocks go back at 03:00.
    clock = datetime(2026, 10, 25, 12, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp
    families = {f.name: f for f in BudgetCollector(budgets, clock=clock).collect()}
    lengths = {
        s.labels["budget"]: s.value for s in families["joulegate_budget_window_seconds"].samples
    }
    assert lengths == {"daily": 25 * 3600, "roll": 90 * 60}


async def test_budgets_are_rebuilt_from_the_ledger_after_a_restart(tmp_path: Path) -> None:
    config = settings(
        budgets=[budget("ads-daily", "ads", "20 J", "reject")],
        budget_default_estimate_joules=5,
        ledger="sqlite",
        data_dir=str(tmp_path),
        ledger_flush_interval_seconds=0.02,
    )
    labels = '{budget="ads-daily",tenant="ads"}'
    meter = LoadMeter(0.1)
    async with (
        serve(working_upstream(meter)) as upstream,
        joulegate(upstream, meter_instance=meter, **config) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        for _ in range(2):
            assert (await chat(client, proxy, "ads"))[0] == 200
            await settled(app)
        used = metric_series(await scrape(client, proxy), "joulegate_budget_used_joules")[labels]
    assert not (tmp_path / "budgets.json").exists()  # no state file: the ledger is the state

    rebuilt, status, _, forwarded = await after_a_restart(config)
    assert rebuilt[labels] == pytest.approx(used)
    assert status == 429
    assert forwarded == []


async def test_proxies_sharing_a_postgresql_ledger_share_their_budgets(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("no PostgreSQL server here (CI installs Debian's postgresql)")
    dsn = request.getfixturevalue("postgres_database")
    monkeypatch.setattr("proxy.server.BUDGET_RELOAD_SECONDS", 0.1)
    config = settings(
        budgets=[budget("ads-daily", "ads", "20 J", "reject")],
        budget_default_estimate_joules=5,
        ledger=dsn,
        ledger_flush_interval_seconds=0.02,
    )
    meter_a, meter_b = LoadMeter(0.1), LoadMeter(0.1)
    upstream_b = working_upstream(meter_b)
    async with (
        serve(working_upstream(meter_a)) as upstream,
        serve(upstream_b) as other_upstream,
        joulegate(upstream, meter_instance=meter_a, instance="node-a", **config) as (a, app_a),
        joulegate(other_upstream, meter_instance=meter_b, instance="node-b", **config) as (
            b,
            _,
        ),
        aiohttp.ClientSession() as client,
    ):
        for _ in range(2):  # node a spends the tenant's budget
            assert (await chat(client, a, "ads"))[0] == 200
            await settled(app_a)
        labels = '{budget="ads-daily",tenant="ads"}'
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # node b learns it from the shared ledger
            seen = metric_series(await scrape(client, b), "joulegate_budget_used_joules")
            if seen[labels] >= 16 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        status, _, _ = await chat(client, b, "ads")
    assert seen[labels] >= 16
    assert status == 429
    assert upstream_b[BODIES] == []
