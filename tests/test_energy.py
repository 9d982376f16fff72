"""End-to-end energy: the real proxy, a real upstream, the synthetic or fake-NVML meter."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from proxy.meter.nvml import NvmlMeter
from proxy.server import RECORDER
from tests.fake_openai import create_fake_openai
from tests.fakes.fake_nvml import FakeNvml
from tests.servers import joulegate, metric_series, serve, settled

WATTS = 100.0
INTERVAL = 0.02


def _sleepy_upstream(seconds: float, gate: asyncio.Barrier | None = None) -> web.Application:
    """Answers after `seconds` (after all `gate` parties arrived, when given)."""

    async def work(request: web.Request) -> web.Response:
        await request.read()
        if gate is not None:
            await gate.wait()
        await asyncio.sleep(seconds)
        return web.json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", work)
    return app


async def _post(client: aiohttp.ClientSession, url: str, **headers: str) -> str:
    async with client.post(
        url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers
    ) as response:
        assert response.status == 200
        await response.read()
        return response.headers["X-Request-Id"]


async def test_a_lone_request_gets_watts_times_its_duration() -> None:
    settings = {"meter": f"synthetic:{WATTS}", "sample_interval_seconds": INTERVAL}
    async with (
        serve(_sleepy_upstream(0.3)) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            request_id = await _post(client, proxy)
        await settled(app)
        record = app[RECORDER].store.get(request_id)
    assert record is not None
    assert record.meter == "synthetic"
    assert record.energy_joules is not None and record.duration_seconds is not None
    assert record.duration_seconds >= 0.3
    # The span runs from forwarding to the last byte; it differs from the record's duration by
    # the time taken to read the body: far less than one sampling interval.
    assert abs(record.energy_joules - WATTS * record.duration_seconds) <= WATTS * INTERVAL
    assert record.devices == {"synthetic0": record.energy_joules}
    assert record.estimate is False


async def test_concurrent_identical_requests_share_equally() -> None:
    n = 4
    gate = asyncio.Barrier(n)
    settings = {"meter": f"synthetic:{WATTS}", "sample_interval_seconds": INTERVAL}
    async with (
        serve(_sleepy_upstream(0.4, gate)) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            ids = await asyncio.gather(*(_post(client, proxy) for _ in range(n)))
        await settled(app)
        records = [app[RECORDER].store.get(request_id) for request_id in ids]
        attributor = app[RECORDER].attributor
        assert attributor is not None
    energies = [record.energy_joules for record in records if record is not None]
    assert len(energies) == n and all(e is not None for e in energies)
    # Each was alone in flight for at most a few ms: the 0.4 s they shared dominates.
    overlap_share = WATTS * 0.4 / n
    for energy in energies:
        assert overlap_share * 0.95 <= energy <= overlap_share * 1.25
    assert max(energies) - min(energies) <= 0.1 * overlap_share
    assert abs(sum(energies) - attributor.attributed["synthetic0"]) < 1e-9 * sum(energies)


async def test_idle_energy_is_unattributed_and_everything_adds_up_in_metrics() -> None:
    settings = {"meter": f"synthetic:{WATTS}", "sample_interval_seconds": INTERVAL}
    async with (
        serve(_sleepy_upstream(0.1)) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            await _post(client, proxy)
            await asyncio.sleep(0.3)  # idle
            await _post(client, proxy)
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
    attributed = sum(metric_series(exposition, "joulegate_energy_joules_total").values())
    unattributed = metric_series(exposition, "joulegate_unattributed_energy_joules_total")
    device = metric_series(exposition, "joulegate_device_energy_joules_total")
    assert set(unattributed) == {'{device="synthetic0"}'}
    assert set(device) == {'{device="synthetic0",meter="synthetic"}'}
    assert unattributed['{device="synthetic0"}'] >= WATTS * 0.3 * 0.9
    assert 2 * WATTS * 0.1 * 0.9 <= attributed <= 2 * WATTS * 0.1 * 1.5
    metered = device['{device="synthetic0",meter="synthetic"}']
    assert abs(attributed + unattributed['{device="synthetic0"}'] - metered) <= 1e-9 * metered
    histogram = metric_series(exposition, "joulegate_request_energy_joules_count")
    assert sum(histogram.values()) == 2
    assert metric_series(exposition, "joulegate_meter_up") == {'{meter="synthetic"}': 1.0}
    power = metric_series(exposition, "joulegate_device_power_watts")
    assert abs(power['{device="synthetic0"}'] - WATTS) < 1e-6 * WATTS


async def test_inline_energy_in_a_header_and_as_a_last_stream_event() -> None:
    settings = {"meter": f"synthetic:{WATTS}", "sample_interval_seconds": INTERVAL}
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            inline = {"X-Joulegate-Energy": "inline"}
            async with client.post(
                proxy + "/v1/embeddings", json={"model": "m", "input": "x"}, headers=inline
            ) as response:
                header = response.headers.get("X-Energy-Joules")
                request_id = response.headers["X-Request-Id"]
            async with client.post(
                proxy + "/v1/embeddings", json={"model": "m", "input": "x"}
            ) as response:
                assert "X-Energy-Joules" not in response.headers  # off by default
            async with client.post(
                proxy + "/v1/chat/completions",
                json={"model": "m", "messages": [], "stream": True},
                headers=inline,
            ) as response:
                stream = await response.text()
                stream_id = response.headers["X-Request-Id"]
        records = app[RECORDER].store
        record, stream_record = records.get(request_id), records.get(stream_id)
    assert header is not None and record is not None and record.energy_joules is not None
    assert float(header) == round(record.energy_joules, 6)
    events = [event for event in stream.split("\n\n") if event]
    assert events[-2] == "data: [DONE]"
    name, data = events[-1].split("\n")
    assert name == "event: joulegate.energy"
    energy = json.loads(data.removeprefix("data: "))
    assert stream_record is not None
    assert energy["id"] == stream_id
    assert energy["energy_joules"] == stream_record.energy_joules
    assert energy["meter"] == "synthetic"


async def test_a_lost_gpu_gives_unknown_energy_never_zero_and_traffic_flows() -> None:
    nvml = FakeNvml(count=1)
    meter = NvmlMeter(nvml)
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, meter_instance=meter, sample_interval_seconds=INTERVAL) as (proxy, app),
    ):
        nvml.gpus[0].lose()
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy + "/v1/embeddings", json={"model": "m", "input": "x"}
            ) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-Id"]
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
            async with client.get(proxy + "/joulegate/health") as response:
                health = await response.json()
        record = app[RECORDER].store.get(request_id)
    assert record is not None
    assert record.energy_joules is None
    assert record.devices == {"gpu0": None}
    assert record.meter == "nvml"
    assert metric_series(exposition, "joulegate_meter_up") == {'{meter="nvml"}': 0.0}
    assert metric_series(exposition, "joulegate_metered_requests_total") == {
        '{quality="unknown",task="embeddings"}': 1.0
    }
    assert "joulegate_request_energy_joules_count" not in exposition.replace("# ", "")
    assert health["status"] == "ok"
    assert health["meter"]["up"] is False


async def test_requested_work_weights_split_shared_time_by_what_was_asked() -> None:
    gate = asyncio.Barrier(2)
    settings = {
        "meter": f"synthetic:{WATTS}",
        "sample_interval_seconds": INTERVAL,
        "weights": "requested-work",
    }
    async with (
        serve(_sleepy_upstream(0.4, gate)) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):

        async def post(max_tokens: int) -> str:
            body = {"model": "m", "messages": [], "max_tokens": max_tokens}
            async with client.post(proxy + "/v1/chat/completions", json=body) as response:
                await response.read()
                return response.headers["X-Request-Id"]

        async with aiohttp.ClientSession() as client:
            big, small = await asyncio.gather(post(768), post(256))
        await settled(app)
        store = app[RECORDER].store
        big_record, small_record = store.get(big), store.get(small)
    assert big_record is not None and small_record is not None
    assert big_record.energy_joules is not None and small_record.energy_joules is not None
    assert 2.7 <= big_record.energy_joules / small_record.energy_joules <= 3.1


def test_weight_policies() -> None:
    from proxy.classify import Classification
    from proxy.weights import equal, requested_work

    def weigh(task: str, body: dict) -> float:
        return requested_work(Classification(task, "m", "anonymous", False, body))

    assert equal(Classification("text-generation", "m", "a", False, {"max_tokens": 9})) == 1.0
    assert weigh("text-generation", {"max_tokens": 512}) == 2.0
    assert weigh("text-generation", {"max_completion_tokens": 128, "max_tokens": 512}) == 0.5
    assert weigh("text-generation", {"parameters": {"max_new_tokens": 64}}) == 0.25
    assert weigh("text-generation", {"max_tokens": "lots"}) == 1.0
    assert weigh("image-generation", {"n": 2, "size": "1024x1024"}) == 8.0
    assert weigh("image-generation", {"size": "512x512", "num_inference_steps": 25}) == 0.5
    assert weigh("image-generation", {"n": 10**9}) == 64.0
    assert weigh("embeddings", {"input": "x"}) == 1.0
