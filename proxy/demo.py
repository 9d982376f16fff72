"""`joulegate demo`: the model server on tiny local models, joulegate in front, a mixed
workload, and the per-task table in the study's units beside the study's own figures.

The model server runs as its own process (it brings torch; the proxy never imports it), and
joulegate runs in this one, exactly as `joulegate serve` would run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.config import Config, load_config
from proxy.records import STATUS_OK, RequestRecord
from proxy.server import RECORDER, SAMPLER, create_app, serving
from proxy.study import study_figures

JOULES_PER_WH = 3600.0
PROMPTS = (
    "Why does image generation use so much more energy than classification?",
    "Write a haiku about a data centre at night.",
    "Summarise the benefits of metering energy per request.",
    "What is the capital of France?",
)


@dataclass(frozen=True, slots=True)
class DemoCall:
    task: str
    path: str
    body: Callable[[int, dict[str, Any]], dict[str, Any]]  # (round, state) -> JSON body


def _image(state: dict[str, Any]) -> str:
    return state.get("image", "")


WORKLOAD: tuple[DemoCall, ...] = (
    DemoCall(
        "text-generation",
        "/v1/chat/completions",
        lambda i, _: {
            "model": "tiny-gpt2",
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": 32,
            "stream": i % 2 == 1,
        },
    ),
    DemoCall(
        "image-generation",
        "/v1/images/generations",
        lambda i, _: {
            "model": "tiny-sd",
            "prompt": "a lighthouse at dusk",
            "response_format": "b64_json",
            "seed": i,
        },
    ),
    DemoCall(
        "embeddings",
        "/v1/embeddings",
        lambda i, _: {"model": "tiny-bert-embeddings", "input": list(PROMPTS)},
    ),
    DemoCall(
        "text-classification",
        "/v1/classifications",
        lambda i, _: {"model": "tiny-bert-sentiment", "input": PROMPTS[i % len(PROMPTS)]},
    ),
    DemoCall(
        "summarization",
        "/v1/summarizations",
        lambda i, _: {"model": "tiny-t5", "input": " ".join(PROMPTS), "max_tokens": 16},
    ),
    DemoCall(
        "image-classification",
        "/v1/image-classifications",
        lambda i, state: {"model": "tiny-vit", "image": _image(state)},
    ),
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "-" * (width - filled)
    print(f"\r  [{bar}] {done}/{total} {label:<22}", end="", file=sys.stderr, flush=True)


async def _wait_healthy(session: aiohttp.ClientSession, url: str, server: subprocess.Popen[bytes]):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the model server exited with code {server.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError("the model server did not become healthy within 300 s")


async def _send(
    session: aiohttp.ClientSession, proxy: str, call: DemoCall, round_: int, state: dict[str, Any]
) -> str:
    async with session.post(proxy + call.path, json=call.body(round_, state)) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{call.path} answered {response.status}: {body[:200]!r}")
        if call.task == "image-generation" and "image" not in state:
            state["image"] = json.loads(body)["data"][0]["b64_json"]
        return response.headers["X-Request-Id"]


def format_table(records: list[RequestRecord], meter: str, estimate: bool) -> str:
    """Wh per request and kWh per 1,000 requests by task, beside the study's Table 2 means."""
    study = study_figures()
    lines = [
        f"{'task':<22}{'requests':>9}{'Wh/request':>13}{'kWh/1k req':>12}"
        f"{'study kWh/1k':>14}{'':>3}",
    ]
    means: dict[str, float] = {}
    for call in WORKLOAD:
        done = [r for r in records if r.task == call.task and r.status == STATUS_OK]
        known = [r.energy_joules for r in done if r.energy_joules is not None]
        figure = study.get(call.task)
        reference = f"{figure.kwh_per_1000_mean:.3f}" if figure else "-"
        if not known:
            lines.append(
                f"{call.task:<22}{len(done):>9}{'unknown':>13}{'unknown':>12}{reference:>14}"
            )
            continue
        wh = sum(known) / len(known) / JOULES_PER_WH
        means[call.task] = wh
        # 1 Wh per request is 1 kWh per 1,000 requests: the same number, in the study's unit.
        lines.append(f"{call.task:<22}{len(done):>9}{wh:>13.3e}{wh:>12.3e}{reference:>14}")
    kind = "an estimate" if estimate else "a measurement"
    if meter in ("synthetic", "trace"):
        kind = "simulated power, not a measurement"
    lines.append(f"meter: {meter} ({kind}); study: A100-SXM4-80GB, batch size 1, CodeCarbon.")
    if "image-generation" in means and means.get("text-generation"):
        ratio = means["image-generation"] / means["text-generation"]
        study_ratio = (
            study["image-generation"].kwh_per_1000_mean / study["text-generation"].kwh_per_1000_mean
        )
        lines.append(
            f"image / text generation: {ratio:.1f}x here, {study_ratio:.1f}x in the study"
            " (tiny random models on this machine: compare the spread, not the sizes)."
        )
    return "\n".join(lines)


async def run_demo(config: Config, rounds: int, keep_serving: bool) -> int:
    model_port = _free_port()
    model_url = f"http://127.0.0.1:{model_port}"
    descriptor, log_name = tempfile.mkstemp(prefix="joulegate-model-server-", suffix=".log")
    log = os.fdopen(descriptor, "wb")
    keep_log = False
    print(f"starting the model server on tiny local models ({model_url})...", file=sys.stderr)
    server = subprocess.Popen(
        [sys.executable, "-m", "model_server", "--listen", f"127.0.0.1:{model_port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            try:
                await _wait_healthy(session, model_url, server)
            except RuntimeError as error:
                print(f"joulegate demo: {error}; its log: {log_name}", file=sys.stderr)
                keep_log = True
                return 1
            config = load_config(
                environ={},
                overrides={
                    "upstream": model_url,
                    "meter": config.meter,
                    "listen": config.listen,
                    "log_level": "warning",
                    "ledger": "off",  # the demo's records live in memory only
                },
            )
            app = create_app(config)
            async with serving(app, config.listen_host, config.listen_port) as proxy:
                meter = app[SAMPLER].meter
                print(f"joulegate on {proxy}, meter {meter.name}", file=sys.stderr)
                total = rounds * len(WORKLOAD)
                state: dict[str, Any] = {}
                ids = []
                for round_ in range(rounds):
                    for call in WORKLOAD:
                        _progress(len(ids), total, call.task)
                        ids.append(await _send(session, proxy, call, round_, state))
                _progress(total, total, "done")
                print(file=sys.stderr)
                recorder = app[RECORDER]
                while recorder.pending or recorder.in_flight:
                    await asyncio.sleep(0.05)
                records = [r for r in map(recorder.store.get, ids) if r is not None]
                print(format_table(records, meter.name, meter.estimate))
                print(
                    f"\nmetrics: {proxy}/metrics\nrecords: {proxy}/joulegate/requests/{ids[0]}"
                    f"\nhealth:  {proxy}/joulegate/health"
                )
                if keep_serving:
                    print("serving until Ctrl-C...", file=sys.stderr)
                    await _until_signal()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if not keep_log:
            os.unlink(log_name)
    return 0


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
