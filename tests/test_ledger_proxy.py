"""The ledger behind the real proxy: records outlive the process, SIGTERM loses none."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from proxy.ledger import open_ledger
from proxy.records import RECORDS_KEPT, RECORDS_KEPT_WITH_LEDGER
from proxy.server import RECORDER
from tests.fake_openai import create_fake_openai
from tests.servers import free_port, joulegate, metric_series, serve, settled


async def test_records_outlive_the_proxy_and_are_served_from_the_ledger(tmp_path: Path) -> None:
    settings = {"ledger": "sqlite", "data_dir": str(tmp_path), "carbon_intensity": 300}
    async with serve(create_fake_openai()) as upstream:
        async with joulegate(upstream, **settings) as (proxy, app):
            async with aiohttp.ClientSession() as client:
                async with client.post(
                    proxy + "/v1/embeddings",
                    json={"model": "m", "input": "x"},
                    headers={"X-Request-Id": "kept-1"},
                ) as response:
                    assert response.status == 200
                await settled(app)
                async with client.get(proxy + "/metrics") as response:
                    exposition = await response.text()
            first = app[RECORDER].store.get("kept-1")
        assert first is not None and first.energy_joules is not None
        # A new proxy over the same data directory: its memory is empty, its ledger is not.
        async with joulegate(upstream, **settings) as (proxy, app):
            assert app[RECORDER].store.get("kept-1") is None
            async with aiohttp.ClientSession() as client:
                async with client.get(proxy + "/joulegate/requests/kept-1") as response:
                    assert response.status == 200
                    stored = await response.json()
                async with client.get(proxy + "/joulegate/health") as response:
                    health = await response.json()
    assert stored["id"] == "kept-1"
    assert stored["task"] == "embeddings" and stored["input_tokens"] == 3
    assert stored["energy_joules"] == first.energy_joules
    assert stored["carbon_grams"] == first.carbon_grams
    assert health["ledger"]["backend"] == "sqlite" and health["ledger"]["dropped"] == 0
    written = metric_series(exposition, "joulegate_ledger_records_written_total")
    queued = metric_series(exposition, "joulegate_ledger_queued_records")
    assert sum(written.values()) + sum(queued.values()) == 1


async def test_sigterm_under_load_drains_and_every_completed_request_is_in_the_ledger(
    tmp_path: Path,
) -> None:
    upstream_app = create_fake_openai()
    async with serve(upstream_app) as upstream:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEGATE_")}
        env |= {"JOULEGATE_DATA_DIR": str(tmp_path), "JOULEGATE_LOG_LEVEL": "warning"}
        joulegate_bin = Path(sys.executable).with_name("joulegate")
        process = await asyncio.create_subprocess_exec(
            str(joulegate_bin),
            "serve",
            "--upstream",
            upstream,
            "--listen",
            f"127.0.0.1:{port}",
            "--meter",
            "synthetic:100",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        completed: list[str] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 30
            while True:  # until it listens
                try:
                    async with client.get(base + "/joulegate/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline, "joulegate did not start"
                    await asyncio.sleep(0.1)

            async def load(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    request_id = f"w{worker}-{n}"
                    n += 1
                    try:
                        async with client.post(
                            base + "/v1/chat/completions",
                            json={"model": "m", "messages": [], "stream": n % 2 == 0},
                            headers={"X-Request-Id": request_id},
                        ) as response:
                            await response.read()
                            if response.status == 200:
                                completed.append(request_id)
                    except aiohttp.ClientError:
                        return  # the proxy stopped listening

            workers = [asyncio.create_task(load(w)) for w in range(8)]
            while len(completed) < 200:
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(process.wait(), 30)
            stop.set()
            await asyncio.gather(*workers)
        stderr = (await process.stderr.read()).decode() if process.stderr else ""
    assert returncode == 0, stderr[-2000:]

    ledger = open_ledger("sqlite", tmp_path)
    assert ledger is not None
    await ledger.start()
    try:
        stored = {}
        async for batch in ledger.iter_records(0, time.time() + 60):
            stored.update({row["id"]: row for row in batch})
    finally:
        await ledger.close()
    missing = [request_id for request_id in completed if request_id not in stored]
    assert not missing, f"{len(missing)} of {len(completed)} completed requests lost"
    assert all(stored[i]["energy_joules"] is not None for i in completed)


async def test_memory_keeps_fewer_records_when_a_ledger_answers_for_the_rest(
    tmp_path: Path,
) -> None:
    """With a ledger every record stays findable, so memory keeps only the newest
    (RECORDS_KEPT_WITH_LEDGER, about 10 MB); without one, memory is the only copy."""
    async with serve(create_fake_openai()) as upstream:
        async with joulegate(upstream, ledger="sqlite", data_dir=str(tmp_path)) as (_, app):
            assert app[RECORDER].store.capacity == RECORDS_KEPT_WITH_LEDGER
        async with joulegate(upstream, ledger="off") as (_, app):
            assert app[RECORDER].store.capacity == RECORDS_KEPT
    assert RECORDS_KEPT_WITH_LEDGER < RECORDS_KEPT
