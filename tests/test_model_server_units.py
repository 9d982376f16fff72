"""Unit tests for the model server's torch-free parts: fast, no models."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_server import sse
from model_server.cli import parse_listen
from model_server.config import ConfigError, load_config, parse_config
from model_server.errors import APIError
from model_server.handlers.text_generation import parse_request
from model_server.tasks.detokenize import IncrementalText
from model_server.validation import optional_float, optional_int, str_or_list
from model_server.workers import Job, JobCancelled, QueueFullError, WorkerPool

# --- incremental detokenisation ----------------------------------------------------------------

PIECES = st.lists(st.sampled_from(["a", "b", "c", "ab", "bc", " ", "abc", "\n"]), max_size=12)
STOPS = st.lists(st.text(alphabet="abc \n", min_size=1, max_size=3), max_size=3)


def stream(pieces: list[str], stop: list[str]) -> tuple[str, IncrementalText]:
    text = IncrementalText(lambda ids: "".join(pieces[i] for i in ids), stop)
    sent = "".join(text.push(i) for i in range(len(pieces)))
    return sent + text.finish(), text


def reference(pieces: list[str], stop: list[str]) -> str:
    """The text up to the first stop sequence, checked after every token as servers do."""
    for k in range(1, len(pieces) + 1):
        prefix = "".join(pieces[:k])
        hits = [prefix.find(s) for s in stop if s in prefix]
        if hits:
            return prefix[: min(hits)]
    return "".join(pieces)


@given(PIECES, STOPS)
def test_streamed_text_is_the_text_up_to_the_first_stop(pieces: list[str], stop: list[str]) -> None:
    sent, text = stream(pieces, stop)
    assert sent == text.text == reference(pieces, stop)
    assert not any(s in sent for s in stop)


def test_a_possible_stop_is_held_back_until_it_is_not_one() -> None:
    text = IncrementalText(lambda ids: "".join(["Hello", " wor", "ld"][i] for i in ids), ["worm"])
    assert text.push(0) == "Hello"
    assert text.push(1) == " "  # "wor" could begin "worm"
    assert text.push(2) == "world"
    assert not text.stopped


def test_an_incomplete_utf8_character_is_not_sent() -> None:
    decoded = ["caf", "caf\ufffd", "café"]
    text = IncrementalText(lambda ids: decoded[len(ids) - 1])
    assert [text.push(i) for i in range(3)] == ["caf", "", "é"]


# --- SSE, CLI, validation -----------------------------------------------------------------------


def test_sse_frames_exactly_like_openai() -> None:
    assert sse.encode({"a": 1, "b": [None]}) == b'data: {"a":1,"b":[null]}\n\n'
    assert sse.DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("[::1]:9000", ("::1", 9000)),
        (":80", ("127.0.0.1", 80)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8000", "host:", "host:http", "h:70000"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_listen(value)


def test_numbers_reject_booleans_and_say_which_field() -> None:
    with pytest.raises(APIError) as caught:
        optional_int({"n": True}, "n", 1)
    assert caught.value.param == "n" and caught.value.status == 400
    with pytest.raises(APIError):
        optional_float({"t": float("nan")}, "t", 1.0)
    assert optional_int({"n": 2.0}, "n", 1) == 2


def test_str_or_list_limits_items() -> None:
    assert str_or_list({"input": "x"}, "input", max_items=2) == ["x"]
    with pytest.raises(APIError) as caught:
        str_or_list({"input": ["a", "b", "c"]}, "input", max_items=2)
    assert caught.value.param == "input"


def test_chat_request_defaults_and_aliases() -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 9,
        "stop": "END",
    }
    parsed = parse_request(body, chat=True, defaults={"temperature": 0.5})
    assert parsed.messages is not None and parsed.messages[0].content == "hi"
    assert parsed.sampling.max_tokens == 9
    assert parsed.sampling.temperature == 0.5
    assert parsed.sampling.stop == ("END",)


# --- configuration ----------------------------------------------------------------------------


def test_config_resolves_local_paths_and_hub_ids(tmp_path: Path) -> None:
    (tmp_path / "lm").mkdir()
    path = tmp_path / "models.yaml"
    path.write_text(
        "queue_size: 3\ndevice: cpu\nmodels:\n"
        "  - {name: a, task: text-generation, path: ./lm, dtype: float32}\n"
        "  - {name: b, task: embeddings, path: org/some-model, device: cuda:1}\n"
    )
    config = load_config(path)
    assert config.queue_size == 3
    local, hub = config.models
    assert (local.source, local.local, local.device) == (str(tmp_path / "lm"), True, "cpu")
    assert (hub.source, hub.local, hub.device) == ("org/some-model", False, "cuda:1")


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"name": "a", "task": "dance", "path": "x/y"}], "task"),
        ([{"name": "a", "task": "embeddings", "path": "./missing"}], "does not exist"),
        ([{"name": "a", "task": "embeddings", "path": "x/y", "device": "gpu"}], "device"),
        ([{"name": "a", "task": "embeddings", "path": "x/y", "dtype": "int4"}], "dtype"),
        ([{"name": "a", "task": "embeddings", "path": "x/y", "colour": 1}], "unknown keys"),
        ([{"name": "a", "task": "embeddings", "path": "x/y"}] * 2, "duplicate"),
        ([], "non-empty"),
    ],
)
def test_config_errors_say_what_is_wrong(
    tmp_path: Path, models: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": models}, base_dir=tmp_path)


# --- the worker pool ---------------------------------------------------------------------------


async def test_a_full_queue_raises_with_a_retry_after() -> None:
    pool = WorkerPool(queue_size=1)
    release = threading.Event()
    started = threading.Event()

    def block(job: Job[None]) -> None:
        started.set()
        release.wait(10)

    running = pool.submit("cpu", block)
    await asyncio.to_thread(started.wait, 10)
    queued = pool.submit("cpu", lambda job: "ran")
    with pytest.raises(QueueFullError) as caught:
        pool.submit("cpu", lambda job: None)
    assert caught.value.retry_after >= 1
    release.set()
    await running.wait()
    assert await queued.wait() == "ran"
    assert pool.stats().rejected == 1
    await pool.close()


async def test_a_job_cancelled_in_the_queue_never_runs() -> None:
    pool = WorkerPool(queue_size=4)
    release = threading.Event()
    ran: list[str] = []
    blocker = pool.submit("cpu", lambda job: release.wait(10))
    queued = pool.submit("cpu", lambda job: ran.append("oops"))
    queued.cancel()
    release.set()
    await blocker.wait()
    with pytest.raises(JobCancelled):
        await queued.wait()
    assert ran == []
    assert pool.stats().cancelled == 1
    await pool.close()


async def test_events_arrive_in_order_and_errors_propagate() -> None:
    pool = WorkerPool(queue_size=4)

    def work(job: Job[int]) -> int:
        for i in range(5):
            job.emit(i)
        return 42

    job = pool.submit("cpu", work, stream=True)
    assert [e async for e in job.events()] == [0, 1, 2, 3, 4]
    assert job.future.result() == 42

    def fail(job: Job[None]) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await pool.run("cpu", fail)
    assert pool.stats().failed == 1
    await pool.close()


async def test_an_awaiting_handler_cancelled_cancels_its_job() -> None:
    pool = WorkerPool(queue_size=4)
    started = threading.Event()
    seen: list[bool] = []

    def work(job: Job[None]) -> None:
        started.set()
        seen.append(job.wait_for_cancel(10))

    waiter = asyncio.create_task(pool.run("cpu", work))
    await asyncio.to_thread(started.wait, 10)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await pool.wait_for(lambda s: s.in_flight == 0)
    assert seen == [True]
    await pool.close()


def test_errors_have_the_openai_shape() -> None:
    body = json.loads(APIError(400, "bad", param="x").response().text or "{}")
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "code": None, "param": "x"}
    }
