"""Usage from JSON answers and from server-sent-event streams, split at any byte."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.usage import SSEUsageReader, Usage, image_count, usage_from_json

MAX_HELD_BACK = 64 * 1024

# ---- usage_from_json ----


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
            },
            Usage(input_tokens=9, output_tokens=12),
            id="openai-chat",
        ),
        pytest.param(
            {
                "object": "text_completion",
                "choices": [{"text": "x", "index": 0, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21},
            },
            Usage(input_tokens=5, output_tokens=16),
            id="openai-completions",
        ),
        pytest.param(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": "e5",
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            },
            Usage(input_tokens=8),
            id="openai-embeddings",
        ),
        pytest.param(
            {
                "object": "response",
                "usage": {
                    "input_tokens": 36,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 87,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 123,
                },
            },
            Usage(input_tokens=36, output_tokens=87),
            id="responses-input-output",
        ),
        pytest.param(
            {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}},
            Usage(input_tokens=0, output_tokens=0),
            id="zero-is-a-count",
        ),
        pytest.param(
            {
                "generated_text": "Hello world",
                "details": {
                    "finish_reason": "length",
                    "generated_tokens": 20,
                    "seed": None,
                    "prefill": [],
                    "tokens": [],
                },
            },
            Usage(output_tokens=20),
            id="tgi-details",
        ),
        pytest.param(
            {
                "created": 1700000000,
                "data": [{"b64_json": "aGk="}, {"b64_json": "aGk="}],
                "usage": {"images": 2, "pixels": 2 * 512 * 512, "steps": 4},
            },
            Usage(images=2, pixels=524288, steps=4),
            id="model-server-images",
        ),
        pytest.param(
            {
                "usage": {
                    "prompt_tokens": -1,
                    "completion_tokens": True,
                    "images": "2",
                    "pixels": 1.5,
                    "steps": None,
                }
            },
            Usage(),
            id="junk-counts",
        ),
        pytest.param(
            {"usage": {"input_tokens": False, "output_tokens": "7"}},
            Usage(),
            id="junk-responses-counts",
        ),
        pytest.param({"usage": {}}, Usage(), id="empty-usage"),
        pytest.param({"details": {"generated_tokens": -3}}, Usage(), id="tgi-negative"),
        pytest.param({"details": {"generated_tokens": "3"}}, Usage(), id="tgi-string"),
    ],
)
def test_usage_from_json(document: object, expected: Usage) -> None:
    assert usage_from_json(document) == expected


@pytest.mark.parametrize(
    "document",
    [
        None,
        [],
        [{"usage": {"prompt_tokens": 1}}],
        "usage",
        42,
        {},
        {"usage": None},
        {"usage": [1, 2]},
        {"usage": "prompt_tokens=3"},
        {"choices": [{"delta": {"content": "x"}}], "usage": None},
        {"details": None},
        {"details": {"finish_reason": "length"}},
        {"details": "generated_tokens"},
    ],
)
def test_usage_from_json_reports_none(document: object) -> None:
    assert usage_from_json(document) is None


def test_usage_beats_details() -> None:
    document = {"usage": {"completion_tokens": 4}, "details": {"generated_tokens": 9}}
    assert usage_from_json(document) == Usage(output_tokens=4)


@pytest.mark.parametrize(
    ("document", "count"),
    [
        ({"created": 1, "data": [{"url": "a"}, {"url": "b"}, {"url": "c"}]}, 3),
        ({"data": [{"b64_json": "x"}]}, 1),
        ({"data": []}, 0),
        ({"data": "not a list"}, None),
        ({"data": {"0": {}}}, None),
        ({}, None),
        ([{"url": "a"}], None),
        (None, None),
    ],
)
def test_image_count(document: object, count: int | None) -> None:
    assert image_count(document) == count


# ---- streams ----

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
USAGE_EVENT = (
    b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt2","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"
)


def chunk_event(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt2",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


BEFORE_USAGE = (
    b": keep-alive comment\n\n"
    + chunk_event({"role": "assistant", "content": ""})
    + chunk_event({"content": "Hello"})
    + chunk_event({"content": ' "usage": {not json'})
    + chunk_event({"content": " world"})
    + chunk_event({}, finish="length")
)
AFTER_USAGE = b"data: [DONE]\n\n"
STREAM = BEFORE_USAGE + USAGE_EVENT + AFTER_USAGE
STREAM_WITHOUT_USAGE = BEFORE_USAGE + AFTER_USAGE
EXPECTED_USAGE = Usage(input_tokens=9, output_tokens=3)


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


def split(stream: bytes, offsets: Iterable[int]) -> list[bytes]:
    cuts = sorted({0, len(stream), *offsets})
    return [stream[start:end] for start, end in itertools.pairwise(cuts)]


def run_reader(reader: SSEUsageReader, chunks: Iterable[bytes]) -> bytes:
    """Feed every chunk; return all the bytes sent to the client, flush included."""
    sent = []
    for chunk in chunks:
        out = reader.feed(chunk)
        if not reader.strip_usage_chunk:
            assert out is chunk or out == chunk  # pass-through never changes or holds a chunk
        sent.append(out)
    sent.append(reader.flush())
    return b"".join(sent)


def test_stream_fixture_holds_one_usage_only_event() -> None:
    assert STREAM.count(b'"choices":[]') == 1
    assert STREAM.replace(USAGE_EVENT, b"") == STREAM_WITHOUT_USAGE


@pytest.mark.parametrize("strip", [False, True])
def test_whole_stream_in_one_chunk(strip: bool) -> None:
    reader = SSEUsageReader(strip_usage_chunk=strip)
    sent = run_reader(reader, [STREAM])
    assert sent == (STREAM_WITHOUT_USAGE if strip else STREAM)
    assert reader.usage == EXPECTED_USAGE


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("transform", [lambda s: s, crlf], ids=["lf", "crlf"])
def test_split_at_every_offset(strip: bool, transform) -> None:
    stream = transform(STREAM)
    expected = transform(STREAM_WITHOUT_USAGE) if strip else stream
    for offset in range(len(stream) + 1):
        reader = SSEUsageReader(strip_usage_chunk=strip)
        assert run_reader(reader, split(stream, [offset])) == expected, offset
        assert reader.usage == EXPECTED_USAGE, offset


@pytest.mark.parametrize("strip", [False, True])
@pytest.mark.parametrize("transform", [lambda s: s, crlf], ids=["lf", "crlf"])
def test_one_byte_chunks(strip: bool, transform) -> None:
    stream = transform(STREAM)
    reader = SSEUsageReader(strip_usage_chunk=strip)
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert run_reader(reader, chunks) == (transform(STREAM_WITHOUT_USAGE) if strip else stream)
    assert reader.usage == EXPECTED_USAGE


@settings(max_examples=150, deadline=None)
@given(
    offsets=st.lists(st.integers(0, len(crlf(STREAM))), max_size=40),
    strip=st.booleans(),
    use_crlf=st.booleans(),
)
def test_random_splits(offsets: list[int], strip: bool, use_crlf: bool) -> None:
    transform = crlf if use_crlf else (lambda s: s)
    stream = transform(STREAM)
    reader = SSEUsageReader(strip_usage_chunk=strip)
    sent = run_reader(reader, split(stream, [o for o in offsets if o <= len(stream)]))
    assert sent == (transform(STREAM_WITHOUT_USAGE) if strip else stream)
    assert reader.usage == EXPECTED_USAGE


@settings(max_examples=100, deadline=None)
@given(usage_start=st.integers(0, len(USAGE_EVENT)), cuts=st.lists(st.integers(1, 40)))
def test_usage_event_shredded_into_many_chunks(usage_start: int, cuts: list[int]) -> None:
    """Cut the usage event into many pieces, starting at any offset inside it."""
    base = len(BEFORE_USAGE) + usage_start
    offsets = [base]
    for step in cuts:
        offsets.append(offsets[-1] + step)
    for strip in (False, True):
        reader = SSEUsageReader(strip_usage_chunk=strip)
        sent = run_reader(reader, split(STREAM, [o for o in offsets if o <= len(STREAM)]))
        assert sent == (STREAM_WITHOUT_USAGE if strip else STREAM)
        assert reader.usage == EXPECTED_USAGE


def test_stream_without_usage() -> None:
    for strip in (False, True):
        reader = SSEUsageReader(strip_usage_chunk=strip)
        assert run_reader(reader, split(STREAM_WITHOUT_USAGE, range(0, 2000, 37))) == (
            STREAM_WITHOUT_USAGE
        )
        assert reader.usage is None


@pytest.mark.parametrize("strip", [False, True])
def test_usage_event_without_trailing_blank_line(strip: bool) -> None:
    """The upstream closes right after the usage chunk: flush still finds (and strips) it."""
    stream = BEFORE_USAGE + USAGE_EVENT.rstrip(b"\n")
    reader = SSEUsageReader(strip_usage_chunk=strip)
    assert run_reader(reader, split(stream, [len(stream) - 5])) == (
        BEFORE_USAGE if strip else stream
    )
    assert reader.usage == EXPECTED_USAGE


def test_pass_through_forwards_incomplete_events_at_once() -> None:
    reader = SSEUsageReader(strip_usage_chunk=False)
    assert reader.feed(b'data: {"choices": [{"delta": {"content": "He') == (
        b'data: {"choices": [{"delta": {"content": "He'
    )
    assert reader.flush() == b""


def test_strip_holds_only_the_incomplete_event() -> None:
    reader = SSEUsageReader(strip_usage_chunk=True)
    first = chunk_event({"content": "a"})
    assert reader.feed(first + b'data: {"cho') == first
    assert reader.feed(b'ices": []}\n\n') == b'data: {"choices": []}\n\n'  # no usage: kept
    assert reader.flush() == b""


def test_strip_keeps_usage_on_chunks_with_choices() -> None:
    """vLLM's continuous usage stats put usage on every chunk: none of them is usage-only."""
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"b"}}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    reader = SSEUsageReader(strip_usage_chunk=True)
    assert run_reader(reader, split(stream, [10, 100, 150])) == stream
    assert reader.usage == Usage(input_tokens=4, output_tokens=2)


def test_tgi_stream_details() -> None:
    token = {"id": 1, "text": " a", "logprob": -0.1, "special": False}
    events = [
        {"index": 1, "token": token, "generated_text": None, "details": None},
        {"index": 2, "token": token, "generated_text": None, "details": None},
        {
            "index": 3,
            "token": token,
            "generated_text": "a a a",
            "details": {"finish_reason": "length", "generated_tokens": 3, "seed": None},
        },
    ]
    stream = b"".join(b"data:" + json.dumps(e).encode() + b"\n\n" for e in events)
    for strip in (False, True):
        reader = SSEUsageReader(strip_usage_chunk=strip)
        assert run_reader(reader, split(stream, range(0, len(stream), 13))) == stream
        assert reader.usage == Usage(output_tokens=3)


def test_multi_line_data_and_other_fields() -> None:
    usage_event = (
        b'event: message\nid: 42\ndata: {"choices": [],\n'
        b'data: "usage": {"prompt_tokens": 2, "completion_tokens": 1}}\n\n'
    )
    stream = chunk_event({"content": "x"}) + usage_event + b"retry: 1000\n\n" + AFTER_USAGE
    reader = SSEUsageReader(strip_usage_chunk=True)
    assert run_reader(reader, split(stream, [7, 200, 260])) == stream.replace(usage_event, b"")
    assert reader.usage == Usage(input_tokens=2, output_tokens=1)


def test_cr_only_line_endings() -> None:
    stream = STREAM.replace(b"\n", b"\r")
    reader = SSEUsageReader(strip_usage_chunk=True)
    sent = run_reader(reader, split(stream, range(0, len(stream), 29)))
    assert sent == STREAM_WITHOUT_USAGE.replace(b"\n", b"\r")
    assert reader.usage == EXPECTED_USAGE


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 20_000), min_size=1, max_size=30), strip=st.booleans())
def test_stream_without_blank_lines_is_not_held_back(sizes: list[int], strip: bool) -> None:
    reader = SSEUsageReader(strip_usage_chunk=strip)
    received = sent = 0
    pieces = []
    for size in sizes:
        chunk = (b"data: " + b"x" * size + b"\n")[:size]
        received += len(chunk)
        out = reader.feed(chunk)
        sent += len(out)
        pieces.append((chunk, out))
        assert received - sent <= MAX_HELD_BACK
    tail = reader.flush()
    assert b"".join(out for _, out in pieces) + tail == b"".join(chunk for chunk, _ in pieces)


def test_one_endless_event_is_released_past_64_kib() -> None:
    reader = SSEUsageReader(strip_usage_chunk=True)
    line = b"data: " + b"y" * 1000 + b"\n"
    received = sent = 0
    for _ in range(200):
        received += len(line)
        sent += len(reader.feed(line))
        assert received - sent <= MAX_HELD_BACK
    assert sent >= received - MAX_HELD_BACK > 0
    end = reader.feed(b"\n")
    assert sent + len(end) == received + 1  # the blank line completes what was held
    assert reader.flush() == b""


# ---- fuzz ----

fragments = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"data: ",
            b"data:",
            b"\n",
            b"\r",
            b"\r\n",
            b"\n\n",
            b'{"usage": {',
            b'"prompt_tokens": 3',
            b'"completion_tokens": -1',
            b'"choices": [], ',
            b'{"details": {"generated_tokens": 2}}',
            b"}",
            b"[DONE]",
            b'"usage":{' * 50,
            b"\xff\xfe",
            USAGE_EVENT,
        ]
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(fragments, max_size=30),
    offsets=st.lists(st.integers(0, 1200), max_size=15),
    strip=st.booleans(),
)
def test_arbitrary_bytes_never_raise(pieces: list[bytes], offsets: list[int], strip: bool) -> None:
    stream = b"".join(pieces)
    reader = SSEUsageReader(strip_usage_chunk=strip)
    sent = run_reader(reader, split(stream, [o for o in offsets if o <= len(stream)]))
    if strip:
        assert len(sent) <= len(stream)
        if b'"usage"' not in stream:
            assert sent == stream
    else:
        assert sent == stream
    assert reader.usage is None or isinstance(reader.usage, Usage)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(900, 20_000), strip=st.booleans())
def test_deeply_nested_usage_never_raises(depth: int, strip: bool) -> None:
    stream = b'data: {"choices": [], "usage": {"a":' + b"[" * depth + b"\n\n"
    reader = SSEUsageReader(strip_usage_chunk=strip)
    sent = run_reader(reader, split(stream, [len(stream) // 2]))
    assert sent == stream
    assert reader.usage is None
