"""joulegate in front of the real model server: every route, the OpenAI SDK as the client.

The tiny random models run on the CPU behind joulegate (synthetic meter, 20 ms samples); the
SDK talks to the proxy exactly as it would to OpenAI. Each test checks what the client sees
and what joulegate recorded for it (by ``X-Request-Id``). Synchronisation is by the model
server's counters (``WorkerPool.wait_for``), its step hook and joulegate's recorder, never by
sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import openai
import pytest
from aiohttp import web

from model_server.config import TASKS
from proxy.records import STATUS_ABORTED, STATUS_OK, RequestRecord
from proxy.server import RECORDER
from tests.servers import joulegate, metric_series, settled

if TYPE_CHECKING:
    from model_server.app import RunningServer
    from model_server.workers import Job, WorkerPool, WorkerStats
    from tests.model_server_fixtures import Blocker, StartServer

EXTRA = "needs the model-server extra: pip install -e '.[model-server]'"
for _needed in ("torch", "transformers", "diffusers", "tokenizers", "PIL"):
    pytest.importorskip(_needed, reason=EXTRA)
from PIL import Image  # noqa: E402  (after the skip: PIL comes with the extra)

from model_server.workers import STEP_TOKEN  # noqa: E402

pytest_plugins = ["tests.model_server_fixtures"]

LM = "tiny-gpt2"
SD = "tiny-sd"
EMBEDDER = "tiny-bert-embeddings"
CLASSIFIER = "tiny-bert-sentiment"
SUMMARIZER = "tiny-t5"
VIT = "tiny-vit"
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]
IGNORE_EOS = {"ignore_eos": True}
SETTINGS = {"meter": "synthetic:100", "sample_interval_seconds": 0.02}
HOLD_TIMEOUT = 10.0  # how long a wait may take before the test fails (only on failure)


def new_id() -> str:
    return f"gw-{uuid.uuid4().hex}"


def with_id(request_id: str) -> dict[str, str]:
    return {"X-Request-Id": request_id}


@dataclass
class Gateway:
    """joulegate (``url``, ``app``) in front of ``server``, and clients that talk to joulegate."""

    url: str
    app: web.Application
    server: RunningServer
    sdk: openai.AsyncOpenAI
    http: aiohttp.ClientSession

    @property
    def pool(self) -> WorkerPool:
        return self.server.state.pool

    async def post(self, path: str, body: Any, request_id: str) -> tuple[int, dict[str, Any], Any]:
        """POST through joulegate with plain aiohttp (routes the SDK does not have)."""
        async with self.http.post(self.url + path, json=body, headers=with_id(request_id)) as r:
            assert r.headers["X-Request-Id"] == request_id
            return r.status, await r.json(), r.headers

    async def record(self, request_id: str) -> RequestRecord:
        """joulegate's finished record for the request, once its energy is settled."""
        await settled(self.app, timeout=HOLD_TIMEOUT)
        record = self.app[RECORDER].store.get(request_id)
        assert record is not None, f"no record for {request_id}"
        return record

    async def metrics(self) -> str:
        async with self.http.get(self.url + "/metrics") as response:
            assert response.status == 200
            return await response.text()


@asynccontextmanager
async def gateway_over(server: RunningServer) -> AsyncIterator[Gateway]:
    async with (
        joulegate(server.url, **SETTINGS) as (url, app),
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as sdk,
        aiohttp.ClientSession() as http,
    ):
        yield Gateway(url, app, server, sdk, http)


@pytest.fixture
async def gateway(model_server: RunningServer) -> AsyncIterator[Gateway]:
    async with gateway_over(model_server) as gateway:
        yield gateway


async def wait_for(pool: WorkerPool, predicate: Callable[[WorkerStats], bool]) -> WorkerStats:
    async with asyncio.timeout(HOLD_TIMEOUT):
        return await pool.wait_for(predicate)


def assert_metered(record: RequestRecord, task: str, model: str, code: int = 200) -> None:
    """An answer that reached the client in full, with its energy from the synthetic meter."""
    assert record.task == task
    assert record.model == model
    assert record.status == STATUS_OK, record.reason
    assert record.code == code
    assert record.meter == "synthetic"
    assert record.energy_joules is not None and record.energy_joules > 0
    assert record.devices.keys() == {"synthetic0"}


def labels(label_string: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', label_string))


def png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- one exchange per route, with its record checked ----------------------------------------


async def check_chat(gw: Gateway) -> None:
    """Not streamed; the id is joulegate's own, read back from the answer's headers."""
    raw = await gw.sdk.chat.completions.with_raw_response.create(
        model=LM, messages=CHAT, max_tokens=5, extra_body=IGNORE_EOS
    )
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    record = await gw.record(raw.headers["X-Request-Id"])
    assert_metered(record, "text-generation", LM)
    assert record.streaming is False
    assert record.input_tokens == reply.usage.prompt_tokens
    assert record.output_tokens == 5


async def check_chat_stream_without_usage(gw: Gateway) -> None:
    """joulegate asks upstream for usage on the client's behalf and hides that chunk again."""
    request_id = new_id()
    stream = await gw.sdk.chat.completions.create(
        model=LM,
        messages=CHAT,
        max_tokens=6,
        stream=True,
        extra_body=IGNORE_EOS,
        extra_headers=with_id(request_id),
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk reached the client
    record = await gw.record(request_id)
    assert_metered(record, "text-generation", LM)
    assert record.streaming is True
    # The same messages, not streamed: the upstream's own count of the prompt.
    whole = await gw.sdk.chat.completions.create(model=LM, messages=CHAT, max_tokens=1)
    assert whole.usage is not None
    assert record.input_tokens == whole.usage.prompt_tokens
    assert record.output_tokens == 6


async def check_chat_stream_with_usage(gw: Gateway) -> None:
    request_id = new_id()
    stream = await gw.sdk.chat.completions.create(
        model=LM,
        messages=CHAT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
        extra_headers=with_id(request_id),
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None  # the client asked: it gets it
    assert last.usage.completion_tokens == 4
    assert all(chunk.usage is None for chunk in chunks[:-1])
    record = await gw.record(request_id)
    assert_metered(record, "text-generation", LM)
    assert record.input_tokens == last.usage.prompt_tokens
    assert record.output_tokens == 4


async def check_completions(gw: Gateway) -> None:
    args: dict[str, Any] = {"model": LM, "prompt": "Energy per request", "temperature": 0}
    whole_id, stream_id = new_id(), new_id()
    whole = await gw.sdk.completions.create(
        **args, max_tokens=5, extra_body=IGNORE_EOS, extra_headers=with_id(whole_id)
    )
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    stream = await gw.sdk.completions.create(
        **args, max_tokens=5, stream=True, extra_body=IGNORE_EOS, extra_headers=with_id(stream_id)
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    for request_id in (whole_id, stream_id):
        record = await gw.record(request_id)
        assert_metered(record, "text-generation", LM)
        assert record.input_tokens == whole.usage.prompt_tokens
        assert record.output_tokens == 5


async def check_embeddings(gw: Gateway) -> None:
    request_id = new_id()
    answer = await gw.sdk.embeddings.create(
        model=EMBEDDER,
        input=["Energy per request", "The quick brown fox"],
        extra_headers=with_id(request_id),
    )
    assert len(answer.data) == 2 and len(answer.data[0].embedding) == 32
    record = await gw.record(request_id)
    assert_metered(record, "embeddings", EMBEDDER)
    assert record.input_tokens == answer.usage.prompt_tokens > 2
    assert record.output_tokens is None


async def check_images(gw: Gateway) -> str:
    """Two 16x16 images in 2 steps; returns the first, as base64 PNG."""
    request_id = new_id()
    answer = await gw.sdk.images.generate(
        model=SD,
        prompt="a teapot on a desk",
        n=2,
        size="16x16",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "seed": 1},
        extra_headers=with_id(request_id),
    )
    assert answer.data is not None and len(answer.data) == 2
    first = answer.data[0].b64_json
    assert first is not None
    assert Image.open(io.BytesIO(base64.b64decode(first))).size == (16, 16)
    usage = answer.model_extra["usage"] if answer.usage is None else answer.usage.model_dump()
    assert (usage["images"], usage["pixels"], usage["steps"]) == (2, 2 * 16 * 16, 2)
    record = await gw.record(request_id)
    assert_metered(record, "image-generation", SD)
    assert record.images == 2
    assert record.pixels == 2 * 16 * 16
    assert record.steps == 2
    assert record.input_tokens == usage["input_tokens"]
    return first


async def check_image_classification(gw: Gateway, image: str) -> None:
    width, height = Image.open(io.BytesIO(base64.b64decode(image))).size
    request_id = new_id()
    body = {"model": VIT, "image": image, "top_k": 2}
    status, answer, _ = await gw.post("/v1/image-classifications", body, request_id)
    assert status == 200, answer
    assert len(answer["data"]) == 1 and len(answer["data"][0]["labels"]) == 2
    assert answer["usage"] == {"images": 1, "pixels": width * height}
    record = await gw.record(request_id)
    assert_metered(record, "image-classification", VIT)
    assert record.images == 1
    assert record.pixels == width * height


async def check_classification(gw: Gateway) -> None:
    request_id = new_id()
    body = {"model": CLASSIFIER, "input": ["great", "awful service"]}
    status, answer, _ = await gw.post("/v1/classifications", body, request_id)
    assert status == 200, answer
    assert [item["index"] for item in answer["data"]] == [0, 1]
    record = await gw.record(request_id)
    assert_metered(record, "text-classification", CLASSIFIER)
    assert record.input_tokens == answer["usage"]["prompt_tokens"] >= 2 * 3
    assert record.output_tokens is None


async def check_summarization(gw: Gateway) -> None:
    request_id = new_id()
    body = {"model": SUMMARIZER, "input": "The quick brown fox jumps over the lazy dog."}
    status, answer, _ = await gw.post("/v1/summarizations", {**body, "max_tokens": 5}, request_id)
    assert status == 200, answer
    assert isinstance(answer["data"][0]["summary"], str)
    usage = answer["usage"]
    record = await gw.record(request_id)
    assert_metered(record, "summarization", SUMMARIZER)
    assert record.input_tokens == usage["prompt_tokens"] > 0
    assert record.output_tokens == usage["completion_tokens"]
    assert 1 <= record.output_tokens <= 5


# --- every route ------------------------------------------------------------------------------


async def test_chat_through_joulegate(gateway: Gateway) -> None:
    await check_chat(gateway)
    await check_chat_stream_without_usage(gateway)
    await check_chat_stream_with_usage(gateway)


async def test_completions_through_joulegate(gateway: Gateway) -> None:
    await check_completions(gateway)


async def test_embeddings_through_joulegate(gateway: Gateway) -> None:
    await check_embeddings(gateway)


async def test_images_then_their_classification_through_joulegate(gateway: Gateway) -> None:
    await check_image_classification(gateway, await check_images(gateway))


async def test_text_classification_and_summarization_through_joulegate(
    gateway: Gateway,
) -> None:
    await check_classification(gateway)
    await check_summarization(gateway)


async def test_a_stream_without_include_usage_reaches_the_client_as_openai_sends_it(
    gateway: Gateway,
) -> None:
    """On the wire, not only through the SDK: no usage-only chunk, then ``[DONE]``."""
    request_id = new_id()
    body = {"model": LM, "prompt": "The quick", "max_tokens": 3, "ignore_eos": True}
    async with gateway.http.post(
        gateway.url + "/v1/completions", json={**body, "stream": True}, headers=with_id(request_id)
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.text()
    assert raw.endswith("data: [DONE]\n\n")
    events = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
    assert events and all(event["choices"] for event in events)
    # (The events keep the `"usage": null` that the injected include_usage made the upstream
    # add: harmless to OpenAI clients, so not asserted either way.)
    assert all(event.get("usage") is None for event in events)
    record = await gateway.record(request_id)
    assert record.output_tokens == 3


# --- cancellation -------------------------------------------------------------------------------


async def test_a_cancelled_stream_stops_generation_upstream(gateway: Gateway) -> None:
    pool = gateway.pool
    loop = asyncio.get_running_loop()
    holding = asyncio.Event()

    def hold_at_token_2(job: Job[Any], step: str) -> None:
        """On the device thread: after token 2, wait for the cancellation to arrive."""
        if step == STEP_TOKEN and job.steps.get(STEP_TOKEN) == 2:
            loop.call_soon_threadsafe(holding.set)
            job.wait_for_cancel(HOLD_TIMEOUT)

    pool.step_hook = hold_at_token_2
    request_id = new_id()
    stream = await gateway.sdk.chat.completions.create(
        model=LM,
        messages=CHAT,
        max_tokens=200,
        stream=True,
        extra_body=IGNORE_EOS,
        extra_headers=with_id(request_id),
    )
    chunks = aiter(stream)
    first = await anext(chunks)
    assert first.choices[0].delta.role == "assistant"
    async with asyncio.timeout(HOLD_TIMEOUT):
        await holding.wait()
    await stream.close()  # the client goes away mid-stream
    stats = await wait_for(pool, lambda s: s.in_flight == 0)
    assert stats.cancel_requests == 1
    assert stats.cancelled == 1
    assert stats.completed == 0
    assert stats.generated_tokens == 2 < 200  # the hook held token 2 until the cancellation
    record = await gateway.record(request_id)
    assert record.status == STATUS_ABORTED
    assert record.reason == "client disconnected"
    assert record.code == 200  # the answer had started
    assert record.task == "text-generation" and record.model == LM
    # Aborted streams are metered too.
    assert record.energy_joules is not None and record.energy_joules > 0
    assert record.meter == "synthetic"


# --- queueing -------------------------------------------------------------------------------------


async def test_concurrent_requests_queue_and_all_succeed(
    gateway: Gateway, blockers: Callable[[WorkerPool, str], Blocker]
) -> None:
    pool = gateway.pool
    blocker = blockers(pool, "cpu")
    ids = [new_id() for _ in range(4)]
    requests = [
        asyncio.create_task(
            gateway.sdk.chat.completions.create(
                model=LM,
                messages=CHAT,
                max_tokens=3,
                extra_body=IGNORE_EOS,
                extra_headers=with_id(request_id),
            )
        )
        for request_id in ids
    ]
    await wait_for(pool, lambda s: s.in_flight == 5)
    assert [device.waiting for device in pool.devices()] == [4]
    assert set(gateway.app[RECORDER].in_flight) == set(ids)  # all four in joulegate at once
    blocker.release.set()
    replies = await asyncio.gather(*requests)
    assert [reply.usage.completion_tokens for reply in replies if reply.usage] == [3, 3, 3, 3]
    assert pool.stats().completed == 5
    records = [await gateway.record(request_id) for request_id in ids]
    for record in records:
        assert_metered(record, "text-generation", LM)
        assert record.output_tokens == 3


async def test_a_full_queue_gets_the_upstreams_503_with_retry_after(
    start_model_server: StartServer, blockers: Callable[[WorkerPool, str], Blocker]
) -> None:
    server = await start_model_server(queue_size=1)
    pool = server.state.pool
    running = blockers(pool, "cpu")
    assert await asyncio.to_thread(running.started.wait, HOLD_TIMEOUT)
    blockers(pool, "cpu")  # fills the one queue slot
    async with gateway_over(server) as gw:
        body = {"model": LM, "messages": CHAT, "max_tokens": 1}
        async with gw.http.post(server.url + "/v1/chat/completions", json=body) as direct:
            assert direct.status == 503
            direct_body = await direct.json()
        request_id = new_id()
        with pytest.raises(openai.InternalServerError) as caught:
            await gw.sdk.chat.completions.create(**body, extra_headers=with_id(request_id))
        error = caught.value
        assert error.status_code == 503
        assert int(error.response.headers["Retry-After"]) >= 1
        assert error.response.headers["X-Request-Id"] == request_id
        assert error.code == "queue_full"
        assert error.body == direct_body["error"]  # the upstream's OpenAI error, intact
        assert set(direct_body["error"]) == {"message", "type", "code", "param"}
        assert pool.stats().rejected == 2
        record = await gw.record(request_id)
    # The upstream's answer reached the client in full: ok, with the upstream's status.
    assert_metered(record, "text-generation", LM, code=503)
    assert record.output_tokens is None


# --- bad parameters -------------------------------------------------------------------------------

SDK_BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("chat", {"model": LM, "messages": CHAT, "temperature": 3}, "temperature"),
    ("chat", {"model": LM, "messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("chat", {"model": LM, "messages": CHAT, "stream": True, "n": 2}, "n"),
    ("chat", {"model": LM, "messages": CHAT, "logprobs": True}, "logprobs"),
    ("completions", {"model": LM, "prompt": "x", "stream": True, "top_p": 0}, "top_p"),
    ("embeddings", {"model": EMBEDDER, "input": "x", "dimensions": 1000}, "dimensions"),
    ("images", {"model": SD, "prompt": "x", "size": "33x32"}, "size"),
    ("images", {"model": SD, "prompt": "x", "extra_body": {"num_inference_steps": 0}},
     "num_inference_steps"),
]  # fmt: skip
HTTP_BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/classifications", {"model": CLASSIFIER, "input": 5}, "input"),
    ("/v1/summarizations", {"model": SUMMARIZER, "input": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/image-classifications", {"model": VIT, "image": "not base64!"}, "image"),
]


async def test_bad_parameters_get_the_upstreams_400_naming_the_field(gateway: Gateway) -> None:
    sdk = gateway.sdk
    create = {
        "chat": sdk.chat.completions.create,
        "completions": sdk.completions.create,
        "embeddings": sdk.embeddings.create,
        "images": sdk.images.generate,
    }
    task = {
        "chat": "text-generation",
        "completions": "text-generation",
        "embeddings": "embeddings",
        "images": "image-generation",
        "/v1/classifications": "text-classification",
        "/v1/summarizations": "summarization",
        "/v1/image-classifications": "image-classification",
    }
    for route, args, param in SDK_BAD_REQUESTS:
        request_id = new_id()
        with pytest.raises(openai.BadRequestError) as caught:
            await create[route](**args, extra_headers=with_id(request_id))
        error = caught.value
        assert error.param == param, (route, args, error.body)
        assert isinstance(error.body, dict) and error.body["param"] == param
        assert error.body["type"] == "invalid_request_error"
        assert error.response.headers["X-Request-Id"] == request_id
        record = await gateway.record(request_id)
        assert_metered(record, task[route], args["model"], code=400)
    for path, body, param in HTTP_BAD_REQUESTS:
        request_id = new_id()
        status, answer, _ = await gateway.post(path, body, request_id)
        assert status == 400, (path, answer)
        assert answer["error"]["param"] == param, (path, answer)
        record = await gateway.record(request_id)
        assert_metered(record, task[path], body["model"], code=400)
    assert gateway.pool.stats().submitted == 0  # nothing bad reached a device


# --- metrics --------------------------------------------------------------------------------------


async def test_metrics_after_a_mix_of_every_task_add_up(gateway: Gateway) -> None:
    await check_chat(gateway)
    await check_chat_stream_without_usage(gateway)
    await check_completions(gateway)
    await check_embeddings(gateway)
    await check_image_classification(gateway, await check_images(gateway))
    await check_classification(gateway)
    await check_summarization(gateway)
    with pytest.raises(openai.NotFoundError):  # a made-up model never becomes a label
        await gateway.sdk.embeddings.create(model="no-such-model", input="x")
    await settled(gateway.app, timeout=HOLD_TIMEOUT)
    exposition = await gateway.metrics()

    requests = {
        tuple(sorted(labels(key).items())): value
        for key, value in metric_series(exposition, "joulegate_requests_total").items()
    }
    by_task: dict[str, float] = {}
    for key, value in requests.items():
        by_task[dict(key)["task"]] = by_task.get(dict(key)["task"], 0.0) + value
    assert set(by_task) == set(TASKS)
    assert by_task["text-generation"] == 1 + 2 + 2  # chat, its stream and one more, completions
    assert (
        requests[
            (("code", "404"), ("model", "other"), ("task", "embeddings"), ("tenant", "anonymous"))
        ]
        == 1
    )
    models = {dict(key)["model"] for key in requests}
    assert models == {LM, SD, EMBEDDER, CLASSIFIER, SUMMARIZER, VIT, "other"}

    # Conservation: attributed + unattributed = metered, on the device, to float precision.
    attributed = math.fsum(metric_series(exposition, "joulegate_energy_joules_total").values())
    unattributed = metric_series(exposition, "joulegate_unattributed_energy_joules_total")
    device = metric_series(exposition, "joulegate_device_energy_joules_total")
    assert set(unattributed) == {'{device="synthetic0"}'}
    assert set(device) == {'{device="synthetic0",meter="synthetic"}'}
    metered = device['{device="synthetic0",meter="synthetic"}']
    assert attributed > 0 and metered > attributed
    assert math.isclose(attributed + unattributed['{device="synthetic0"}'], metered, rel_tol=1e-9)
    energy_by_task = {
        labels(key)["task"]
        for key, value in metric_series(exposition, "joulegate_energy_joules_total").items()
        if value > 0
    }
    assert energy_by_task == set(TASKS)
    generated = metric_series(exposition, "joulegate_images_total")
    assert generated['{model="tiny-sd",tenant="anonymous"}'] == 2


async def test_images_total_counts_generated_images_only(gateway: Gateway) -> None:
    await check_image_classification(gateway, png(40, 30))
    await settled(gateway.app, timeout=HOLD_TIMEOUT)
    exposition = await gateway.metrics()
    assert metric_series(exposition, "joulegate_images_total") == {}
