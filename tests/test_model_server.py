"""The model server end to end: real HTTP on 127.0.0.1, tiny random models, OpenAI SDK client.

Synchronisation is by the server's own counters (``WorkerPool.wait_for``) and by test hooks
that hold a job at a known point, never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import openai
import pytest

from model_server.app import RunningServer, start
from model_server.cli import main as cli_main
from model_server.config import ServerConfig
from model_server.workers import STEP_DENOISE, STEP_TOKEN, Job, WorkerPool, WorkerStats

if TYPE_CHECKING:
    from tests.model_server_fixtures import Blocker, StartServer

EXTRA = "needs the model-server extra: pip install -e '.[model-server]'"
for _needed in ("torch", "transformers", "diffusers", "tokenizers", "PIL"):
    pytest.importorskip(_needed, reason=EXTRA)
from PIL import Image  # noqa: E402  (after the skip: PIL comes with the extra)

from model_server.tiny import ensure_tiny_models  # noqa: E402  (imports torch)

pytest_plugins = ["tests.model_server_fixtures"]

LM = "tiny-gpt2"
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]
HOLD_TIMEOUT = 10.0  # how long a test hook holds a job before giving up (only on failure)


@pytest.fixture
async def client(model_server: RunningServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=model_server.url + "/v1", api_key="unused", max_retries=0
    ) as sdk:
        yield sdk


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, server: RunningServer, path: str, body: Any
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with http.post(server.url + path, json=body) as response:
        return response.status, await response.json(), response.headers


async def wait_for(pool: WorkerPool, predicate: Callable[[WorkerStats], bool]) -> WorkerStats:
    async with asyncio.timeout(HOLD_TIMEOUT):
        return await pool.wait_for(predicate)


def hold_after(
    kind: str, count: int, reached: Callable[[], None]
) -> Callable[[Job[Any], str], None]:
    """A step hook: after ``count`` steps of ``kind``, report it and wait for cancellation."""

    def hook(job: Job[Any], step: str) -> None:
        if step == kind and job.steps.get(kind) == count:
            reached()
            job.wait_for_cancel(HOLD_TIMEOUT)

    return hook


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1]), events
    return [e.removeprefix("data: ") for e in events[:-2]]


# --- discovery ------------------------------------------------------------------------------


async def test_models_lists_every_tiny_model_with_its_task(
    client: openai.AsyncOpenAI, tiny_config: ServerConfig
) -> None:
    models = [m async for m in client.models.list()]
    assert {m.id: m.task for m in models} == {s.name: s.task for s in tiny_config.models}  # type: ignore[attr-defined]
    assert all(m.object == "model" for m in models)
    one = await client.models.retrieve(LM)
    assert one.id == LM


async def test_health_reports_queue_state(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(model_server.url + "/health") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ok"
    assert body["models"] == 6
    assert body["stats"]["in_flight"] == 0


async def test_unknown_route_and_model_are_openai_404s(
    client: openai.AsyncOpenAI, model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    async with http.get(model_server.url + "/v1/nothing") as response:
        assert response.status == 404
        assert set((await response.json())["error"]) == {"message", "type", "code", "param"}


# --- text generation ---------------------------------------------------------------------------


async def test_chat_completion_reports_usage(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=LM, messages=CHAT, max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens > len("Hello! How are you today?") // 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


async def test_chat_uses_the_chat_template(
    client: openai.AsyncOpenAI, model_server: RunningServer
) -> None:
    runner = model_server.state.models.find(LM).runner
    rendered = runner.tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    expected = len(runner.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    reply = await client.chat.completions.create(model=LM, messages=CHAT, max_tokens=1)
    assert reply.usage is not None and reply.usage.prompt_tokens == expected


async def test_chat_stream_matches_the_non_streamed_answer(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {"model": LM, "messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = await client.chat.completions.create(**args)
    stream = await client.chat.completions.create(**args, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


async def test_chat_stream_include_usage_adds_a_usage_only_chunk(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": LM,
        "messages": CHAT,
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(model_server.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_events(await response.text())]
    *chunks, last = events
    assert all("usage" in c and c["usage"] is None for c in chunks)
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stream_without_include_usage_has_no_usage_key(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": LM, "prompt": "The quick", "max_tokens": 4, "stream": True}
    async with http.post(model_server.url + "/v1/completions", json=body) as response:
        events = [json.loads(e) for e in sse_events(await response.text())]
    assert events and all("usage" not in e for e in events)
    assert all(e["object"] == "text_completion" for e in events)


async def test_sdk_stream_with_include_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=LM,
        messages=CHAT,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_completions_stream_and_not(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {"model": LM, "prompt": "Energy per request", "max_tokens": 6}
    whole = await client.completions.create(**args, temperature=0)
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.prompt_tokens > 0
    stream = await client.completions.create(**args, temperature=0, stream=True)
    text = "".join([c.choices[0].text async for c in stream])
    assert text == whole.choices[0].text


async def test_stop_sequence_ends_the_text_before_it(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {
        "model": LM,
        "prompt": "The quick",
        "temperature": 0,
        "max_tokens": 24,
        "extra_body": {"ignore_eos": True},
    }
    free = await client.completions.create(**args)
    text = free.choices[0].text
    candidates = [text[i : i + 2] for i in range(2, len(text) - 2)]
    stop = next(c for c in candidates if "\ufffd" not in c and c.strip())
    expected = text[: text.index(stop)]
    stopped = await client.completions.create(**args, stop=[stop])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    stream = await client.completions.create(**args, stop=stop, stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == expected


async def test_seed_makes_sampling_reproducible(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = {"model": LM, "messages": CHAT, "max_tokens": 10, "top_p": 0.9}
    first = await client.chat.completions.create(**args, seed=7)
    again = await client.chat.completions.create(**args, seed=7)
    assert first.choices[0].message.content == again.choices[0].message.content


async def test_n_returns_that_many_choices(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=LM, messages=CHAT, max_tokens=2, n=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens == 6


async def test_a_prompt_beyond_the_context_is_a_400_even_when_streaming(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": LM, "prompt": "joules " * 600, "max_tokens": 1, "stream": True}
    status, answer, _ = await post(http, model_server, "/v1/completions", body)
    assert status == 400
    assert answer["error"]["param"] == "prompt"
    assert answer["error"]["code"] == "context_length_exceeded"


# --- cancellation -------------------------------------------------------------------------------


async def test_a_cancelled_stream_stops_generating(
    client: openai.AsyncOpenAI, model_server: RunningServer
) -> None:
    pool = model_server.state.pool
    loop = asyncio.get_running_loop()
    holding = asyncio.Event()
    pool.step_hook = hold_after(STEP_TOKEN, 2, lambda: loop.call_soon_threadsafe(holding.set))
    stream = await client.chat.completions.create(
        model=LM,
        messages=CHAT,
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = await anext(aiter(stream))
    assert first.choices[0].delta.role == "assistant"
    async with asyncio.timeout(HOLD_TIMEOUT):
        await holding.wait()
    await stream.close()  # the client goes away mid-stream
    stats = await wait_for(pool, lambda s: s.in_flight == 0)
    assert stats.cancelled == 1
    assert stats.generated_tokens == 2  # the hook held token 2 until the cancellation


async def test_a_cancelled_request_stops_generating(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    pool = model_server.state.pool
    loop = asyncio.get_running_loop()
    holding = asyncio.Event()
    pool.step_hook = hold_after(STEP_TOKEN, 1, lambda: loop.call_soon_threadsafe(holding.set))
    body = {"model": LM, "messages": CHAT, "max_tokens": 200, "ignore_eos": True}
    request = asyncio.create_task(post(http, model_server, "/v1/chat/completions", body))
    async with asyncio.timeout(HOLD_TIMEOUT):
        await holding.wait()
    request.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await request
    stats = await wait_for(pool, lambda s: s.in_flight == 0)
    assert stats.cancelled == 1
    assert stats.generated_tokens == 1


async def test_a_cancelled_image_request_stops_denoising(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    pool = model_server.state.pool
    loop = asyncio.get_running_loop()
    holding = asyncio.Event()
    pool.step_hook = hold_after(STEP_DENOISE, 1, lambda: loop.call_soon_threadsafe(holding.set))
    body = {"model": "tiny-sd", "prompt": "a teapot", "num_inference_steps": 50}
    request = asyncio.create_task(post(http, model_server, "/v1/images/generations", body))
    async with asyncio.timeout(HOLD_TIMEOUT):
        await holding.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    stats = await wait_for(pool, lambda s: s.in_flight == 0)
    assert stats.cancelled == 1
    assert stats.denoising_steps == 1


# --- queueing -------------------------------------------------------------------------------------


async def test_concurrent_requests_queue_and_all_succeed(
    client: openai.AsyncOpenAI,
    model_server: RunningServer,
    blockers: Callable[[WorkerPool, str], Blocker],
) -> None:
    pool = model_server.state.pool
    blocker = blockers(pool, "cpu")
    requests = [
        asyncio.create_task(
            client.chat.completions.create(
                model=LM, messages=CHAT, max_tokens=3, extra_body={"ignore_eos": True}
            )
        )
        for _ in range(4)
    ]
    await wait_for(pool, lambda s: s.in_flight == 5)
    assert [d.waiting for d in pool.devices()] == [4]
    blocker.release.set()
    replies = await asyncio.gather(*requests)
    assert [r.usage.completion_tokens for r in replies if r.usage] == [3, 3, 3, 3]
    stats = pool.stats()
    assert stats.max_in_flight == 5
    assert stats.completed == 5


async def test_a_full_queue_answers_503_with_retry_after(
    start_model_server: StartServer,
    blockers: Callable[[WorkerPool, str], Blocker],
    http: aiohttp.ClientSession,
) -> None:
    server = await start_model_server(queue_size=1)
    pool = server.state.pool
    running = blockers(pool, "cpu")
    await asyncio.to_thread(running.started.wait, HOLD_TIMEOUT)
    blockers(pool, "cpu")  # fills the one queue slot
    body = {"model": LM, "messages": CHAT, "max_tokens": 1}
    async with http.post(server.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["error"]["code"] == "queue_full"
    assert pool.stats().rejected == 1


async def test_a_request_cancelled_while_queued_never_runs(
    model_server: RunningServer,
    blockers: Callable[[WorkerPool, str], Blocker],
    http: aiohttp.ClientSession,
) -> None:
    pool = model_server.state.pool
    blocker = blockers(pool, "cpu")
    body = {"model": LM, "messages": CHAT, "max_tokens": 50}
    request = asyncio.create_task(post(http, model_server, "/v1/chat/completions", body))
    await wait_for(pool, lambda s: s.in_flight == 2)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    # The server notices the disconnect and cancels the queued job; then let the blocker go.
    await wait_for(pool, lambda s: s.cancel_requests == 1)
    blocker.release.set()
    stats = await wait_for(pool, lambda s: s.in_flight == 0)
    assert stats.cancelled == 1
    assert stats.generated_tokens == 0


# --- other tasks ---------------------------------------------------------------------------------


async def test_embeddings_are_unit_vectors_in_float_and_base64(client: openai.AsyncOpenAI) -> None:
    texts = ["Energy per request", "The quick brown fox"]
    floats = await client.embeddings.create(
        model="tiny-bert-embeddings", input=texts, encoding_format="float"
    )
    packed = await client.embeddings.create(model="tiny-bert-embeddings", input=texts)
    assert [d.index for d in floats.data] == [0, 1]
    for plain, decoded in zip(floats.data, packed.data, strict=True):
        assert len(plain.embedding) == 32
        assert math.isclose(math.fsum(x * x for x in plain.embedding), 1.0, rel_tol=1e-5)
        assert decoded.embedding == pytest.approx(plain.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts)
    short = await client.embeddings.create(
        model="tiny-bert-embeddings", input="joules", dimensions=8, encoding_format="float"
    )
    assert len(short.data[0].embedding) == 8
    tokens = await client.embeddings.create(
        model="tiny-bert-embeddings", input=[[2, 10, 11, 3]], encoding_format="float"
    )
    assert tokens.usage.prompt_tokens == 4


async def test_images_are_pngs_of_the_requested_size(client: openai.AsyncOpenAI) -> None:
    answer = await client.images.generate(
        model="tiny-sd",
        prompt="a teapot on a desk",
        n=2,
        size="32x48",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"num_inference_steps": 3, "guidance_scale": 4.0, "seed": 1},
    )
    assert answer.data is not None and len(answer.data) == 2
    for item in answer.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (32, 48)
    usage = answer.model_extra["usage"] if answer.usage is None else answer.usage.model_dump()
    assert usage["images"] == 2
    assert usage["pixels"] == 2 * 32 * 48
    assert usage["steps"] == 3


async def test_text_classification(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "tiny-bert-sentiment", "input": ["great", "awful service"]}
    status, answer, _ = await post(http, model_server, "/v1/classifications", body)
    assert status == 200
    assert len(answer["data"]) == 2
    for index, item in enumerate(answer["data"]):
        assert item["index"] == index
        assert {x["label"] for x in item["labels"]} == {"negative", "positive"}
        assert math.isclose(sum(x["score"] for x in item["labels"]), 1.0, rel_tol=1e-5)
        assert item["label"] == item["labels"][0]["label"]
    assert answer["usage"]["prompt_tokens"] >= 2 * 3  # [CLS] text [SEP]


async def test_summarization(model_server: RunningServer, http: aiohttp.ClientSession) -> None:
    body = {
        "model": "tiny-t5",
        "input": ["The quick brown fox jumps over the lazy dog.", "Energy is measured."],
        "max_tokens": 5,
    }
    status, answer, _ = await post(http, model_server, "/v1/summarizations", body)
    assert status == 200
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert all(isinstance(d["summary"], str) for d in answer["data"])
    usage = answer["usage"]
    assert 2 <= usage["completion_tokens"] <= 2 * 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_image_classification(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    images = []
    for size in ((40, 30), (64, 64)):
        buffer = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    images[1] = "data:image/png;base64," + images[1]
    body = {"model": "tiny-vit", "image": images, "top_k": 2}
    status, answer, _ = await post(http, model_server, "/v1/image-classifications", body)
    assert status == 200
    assert [len(d["labels"]) for d in answer["data"]] == [2, 2]
    assert all(d["label"] in {"cat", "dog", "teapot"} for d in answer["data"])
    assert answer["usage"] == {"images": 2, "pixels": 40 * 30 + 64 * 64}


# --- bad requests ---------------------------------------------------------------------------------

MSG = {"model": LM, "messages": CHAT}
SD = {"model": "tiny-sd", "prompt": "x"}
EMB = {"model": "tiny-bert-embeddings", "input": "x"}
PNG_NOT = base64.b64encode(b"definitely not an image").decode()
BAD_REQUESTS = [
    ("/v1/chat/completions", {**MSG, "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {**MSG, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**MSG, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**MSG, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/chat/completions", {**MSG, "max_tokens": 100_000}, "max_tokens"),
    ("/v1/chat/completions", {**MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {**MSG, "n": 0}, "n"),
    ("/v1/chat/completions", {**MSG, "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {**MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**MSG, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"model": LM}, "messages"),
    ("/v1/chat/completions", {"model": LM, "messages": [{"role": "x", "content": ""}]}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT}, "model"),
    ("/v1/chat/completions", {**MSG, "model": "tiny-bert-embeddings"}, "model"),
    ("/v1/completions", {"model": LM, "prompt": 5}, "prompt"),
    ("/v1/images/generations", {**SD, "size": "big"}, "size"),
    ("/v1/images/generations", {**SD, "size": "33x32"}, "size"),
    ("/v1/images/generations", {**SD, "n": 11}, "n"),
    ("/v1/images/generations", {**SD, "response_format": "url"}, "response_format"),
    ("/v1/images/generations", {**SD, "num_inference_steps": 0}, "num_inference_steps"),
    ("/v1/images/generations", {"model": "tiny-sd", "prompt": ""}, "prompt"),
    ("/v1/embeddings", {"model": "tiny-bert-embeddings", "input": []}, "input"),
    ("/v1/embeddings", {**EMB, "dimensions": 1000}, "dimensions"),
    ("/v1/embeddings", {**EMB, "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"model": "tiny-bert-embeddings", "input": [[1, 10**9]]}, "input"),
    ("/v1/classifications", {"model": "tiny-bert-sentiment", "input": 5}, "input"),
    ("/v1/summarizations", {"model": "tiny-t5", "input": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/image-classifications", {"model": "tiny-vit", "image": "not base64!"}, "image"),
    ("/v1/image-classifications", {"model": "tiny-vit", "image": PNG_NOT}, "image"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
async def test_bad_parameters_are_400s_naming_the_field(
    model_server: RunningServer, http: aiohttp.ClientSession, path: str, body: Any, param: str
) -> None:
    status, answer, _ = await post(http, model_server, path, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]


async def test_the_sdk_sees_the_param_of_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=LM, messages=CHAT, temperature=2.5)
    assert caught.value.param == "temperature"
    assert "temperature" in caught.value.message


async def test_a_body_that_is_not_json_is_a_400(
    model_server: RunningServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(model_server.url + "/v1/embeddings", data=b"{nope") as response:
        assert response.status == 400
        assert "JSON" in (await response.json())["error"]["message"]


# --- start-up paths -----------------------------------------------------------------------------


async def test_start_loads_the_models_itself(
    tiny_config: ServerConfig, http: aiohttp.ClientSession
) -> None:
    only = tuple(m for m in tiny_config.models if m.task == "embeddings")
    server = await start(replace(tiny_config, models=only))
    try:
        body = {"model": only[0].name, "input": "hello"}
        status, answer, _ = await post(http, server, "/v1/embeddings", body)
        assert status == 200 and len(answer["data"]) == 1
    finally:
        await server.stop()


def test_ensure_tiny_models_reuses_a_built_directory(tiny_models_config_path: Path) -> None:
    before = tiny_models_config_path.stat().st_mtime_ns
    assert ensure_tiny_models(tiny_models_config_path.parent) == tiny_models_config_path
    assert tiny_models_config_path.stat().st_mtime_ns == before


def test_cli_rejects_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: x\n    task: dancing\n    path: ./x\n")
    assert cli_main(["--listen", "127.0.0.1:0", "--config", str(bad)]) == 2
    assert "task" in capsys.readouterr().err
