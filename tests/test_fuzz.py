"""Fuzzing for crashes: the classifier and the usage readers take whatever a client or an
upstream sends, so no input may make them raise.

tests/test_usage.py splits one fixed stream at every offset; here the streams themselves are
generated: events in any order, any of SSE's three line endings, garbage between them.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.classify import MAX_MODEL_NAME, Classification, Classifier, key_digest
from proxy.config import DEFAULT_ROUTES, Route
from proxy.forward import _read_usage
from proxy.records import RequestRecord
from proxy.tasks import TASKS
from proxy.usage import SSEUsageReader, Usage, image_count, usage_from_json
from tests.test_records import record as a_record

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- the classifier ----

KNOWN_KEY = "sk-fuzz-tenant"
CLASSIFIER = Classifier(
    [
        *DEFAULT_ROUTES,
        Route("/models/{model:path}", "text-classification"),
        Route("/tgi/{model}/generate", "text-generation"),
    ],
    {key_digest(KNOWN_KEY): "fuzz-tenant"},
    teams={"fuzz-tenant": "fuzz-team"},
    tenant_header="X-Tenant",
)
# Any code point, lone surrogates included: aiohttp decodes header bytes with surrogateescape.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), ANY_TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """JSON that is almost a chat request, then maybe broken: any type for `model` and
    `stream`, deep nesting, truncation, bytes that are not UTF-8, or no JSON at all."""
    kind = draw(st.sampled_from(["object", "value", "nested", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "nested":
        depth = draw(st.integers(1, 5_000))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"model": "m", "x": [']))
        return opener * depth + draw(st.sampled_from([b"", b"]" * depth, b"1"]))
    if kind == "value":
        document: Any = draw(JSON_VALUES)
    else:
        document = draw(st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=3))
        document["model"] = draw(st.one_of(JSON_VALUES, ANY_TEXT))
        document["stream"] = draw(JSON_VALUES)
    body = json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "truncate", "insert"]))
    at = draw(st.integers(0, len(body)))
    if damage == "truncate":
        return body[:at]
    if damage == "insert":
        return body[:at] + draw(st.binary(min_size=1, max_size=4)) + body[at:]
    return body


HEADERS = st.one_of(
    st.dictionaries(ANY_TEXT, ANY_TEXT, max_size=4),
    st.fixed_dictionaries(
        {},
        optional={
            "Authorization": st.one_of(
                ANY_TEXT, st.just(f"Bearer {KNOWN_KEY}"), ANY_TEXT.map("Bearer {}".format)
            ),
            "api-key": ANY_TEXT,
            "x-api-key": st.one_of(ANY_TEXT, st.just(KNOWN_KEY)),
            "X-Tenant": st.one_of(ANY_TEXT, st.just("team-from-gateway")),
            "Content-Type": st.sampled_from(
                ["application/json", "text/plain", "multipart/form-data; boundary=x", ""]
            ),
        },
    ),
)
PATHS = st.one_of(
    ANY_TEXT.map(lambda text: "/" + text),
    st.sampled_from([route.path for route in DEFAULT_ROUTES]),
    ANY_TEXT.map(lambda text: f"/models/{text}"),
    ANY_TEXT.map(lambda text: f"/tgi/{text}/generate"),
    st.just("/generate_stream/"),
)


@FUZZ
@given(path=PATHS, headers=HEADERS, body=request_bodies())
def test_the_classifier_classifies_anything(
    path: str, headers: dict[str, str], body: bytes
) -> None:
    classification = CLASSIFIER.classify(path, CIMultiDict(headers), body)
    assert isinstance(classification, Classification)
    assert classification.task in TASKS
    assert isinstance(classification.streaming, bool)
    model = classification.model
    if model is not None:  # what becomes a label and ledger text: printable, bounded, UTF-8
        assert 0 < len(model) <= MAX_MODEL_NAME and model.isprintable()
        model.encode("utf-8")
    assert classification.tenant in {"anonymous", "fuzz-tenant", "team-from-gateway"} or (
        classification.tenant == headers.get("X-Tenant", "").strip()
    )
    if classification.body is not None:
        assert isinstance(classification.body, dict)
        stated = classification.body.get("model")
        if isinstance(stated, str) and stated.isprintable() and len(stated) <= MAX_MODEL_NAME:
            assert model == stated or not stated
        assert classification.streaming == (
            classification.body.get("stream") is True or path.rstrip("/").endswith("_stream")
        )


# ---- the JSON usage reader ----


@FUZZ
@given(
    document=st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries(
            {"usage": st.one_of(JSON_VALUES, st.dictionaries(ANY_TEXT, JSON_VALUES))},
            optional={"details": JSON_VALUES, "data": JSON_VALUES},
        ),
        st.fixed_dictionaries(
            {"details": st.fixed_dictionaries({"generated_tokens": JSON_VALUES})},
        ),
    )
)
def test_json_usage_of_any_document(document: Any) -> None:
    usage = usage_from_json(document)
    assert usage is None or isinstance(usage, Usage)
    if usage is not None:
        for count in (usage.input_tokens, usage.output_tokens, usage.images, usage.pixels):
            assert count is None or (type(count) is int and count >= 0)
    images = image_count(document)
    assert images is None or (type(images) is int and images >= 0)


def _record() -> RequestRecord:
    return a_record(
        "fuzz",
        task="image-generation",
        path="/v1/images/generations",
        upstream="http://127.0.0.1:1",
        started_at=0.0,
        start=0.0,
    )


@FUZZ
@given(body=request_bodies())
def test_any_json_answer_body_is_read_or_ignored(body: bytes) -> None:
    """What joulegate does with a JSON answer of known length: usage and image count."""
    record = _record()
    _read_usage(record, body)
    for count in (record.input_tokens, record.output_tokens, record.images):
        assert count is None or (type(count) is int and count >= 0)


# ---- the SSE usage reader ----

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
EXPECTED = Usage(input_tokens=11, output_tokens=7)
LINE_ENDINGS = [b"\n", b"\r\n", b"\r"]


def _event(lines: list[bytes], ending: bytes) -> bytes:
    """One SSE event: its lines, each ended, then a blank line."""
    return b"".join(line + ending for line in lines) + ending


def _chunk_line(words: str) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": words}}]}
    return b"data: " + json.dumps(chunk).encode()


# Bytes that may sit on one SSE line: anything but CR and LF.
LINE_TEXT = st.binary(max_size=40).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
OTHER_EVENTS = st.one_of(
    ANY_TEXT.map(lambda words: [_chunk_line(words)]),
    LINE_TEXT.map(lambda text: [b": " + text]),  # a comment (keep-alive)
    LINE_TEXT.map(lambda text: [b"data: " + text]),  # garbage data
    LINE_TEXT.map(lambda text: [b"event: ping", b"id: " + text, b"retry: 100"]),
    LINE_TEXT.map(lambda text: [b'data: {"usage": {' + text]),  # looks like usage, is not JSON
    st.sampled_from(
        [
            [b'data: {"usage": null, "choices": []}'],
            [b'data: {"usage": [1, 2], "choices": []}'],
            [b'data: {"usage": "18 tokens"}'],
            [b"data: [DONE]"],
            [b"data:"],
        ]
    ),
)
USAGE_EVENTS = st.sampled_from(
    [
        [b'data: {"choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}"],
        [b'data:{"choices":[],"usage":' + json.dumps(USAGE, indent=None).encode() + b"}"],
        # One JSON document over two data lines (SSE joins them with a newline).
        [b'data: {"choices": [],', b'data: "usage": ' + json.dumps(USAGE).encode() + b"}"],
    ]
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], int]:
    """A valid SSE stream as its events, each with its own line ending, and the index of
    the one usage-only event among them."""
    events = [
        _event(lines, draw(st.sampled_from(LINE_ENDINGS)))
        for lines in draw(st.lists(OTHER_EVENTS, max_size=8))
    ]
    at = draw(st.integers(0, len(events)))
    events.insert(at, _event(draw(USAGE_EVENTS), draw(st.sampled_from(LINE_ENDINGS))))
    return events, at


def _split(stream: bytes, offsets: list[int]) -> list[bytes]:
    cuts = sorted({0, len(stream), *(o for o in offsets if o <= len(stream))})
    return [stream[start:end] for start, end in itertools.pairwise(cuts)]


def _complete_without_usage(events: list[bytes], usage_at: int, received: int) -> bytes:
    """What a stripping reader may have sent once `received` bytes came: every event that
    is complete by then, except the usage event."""
    sent, end = [], 0
    for index, event in enumerate(events):
        end += len(event)
        if end > received:
            break
        if index != usage_at:
            sent.append(event)
    return b"".join(sent)


@FUZZ
@given(
    stream=streams(),
    offsets=st.lists(st.integers(0, 2_000), max_size=20),
    strip=st.booleans(),
)
def test_usage_is_found_in_any_valid_stream_split_anywhere(
    stream: tuple[list[bytes], int], offsets: list[int], strip: bool
) -> None:
    events, usage_at = stream
    whole = b"".join(events)
    reader = SSEUsageReader(strip_usage_chunk=strip)
    sent, received = b"", 0
    for chunk in _split(whole, offsets):
        out = reader.feed(chunk)
        received += len(chunk)
        sent += out
        if strip:  # held back: only the event still incomplete, never a complete one
            assert sent == _complete_without_usage(events, usage_at, received)
        else:  # passing through: every byte goes on the moment it came
            assert out == chunk
    sent += reader.flush()
    assert reader.usage == EXPECTED
    assert sent == (_complete_without_usage(events, usage_at, len(whole)) if strip else whole)


@FUZZ
@given(
    stream=streams(),
    offsets=st.lists(st.integers(0, 2_000), max_size=20),
    strip=st.booleans(),
    cut=st.integers(0, 2_000),
)
def test_a_stream_cut_short_never_raises(
    stream: tuple[list[bytes], int], offsets: list[int], strip: bool, cut: int
) -> None:
    """The upstream closes anywhere, even inside the usage event: no error, and a usage found
    is the real one."""
    whole = b"".join(stream[0])[:cut]
    reader = SSEUsageReader(strip_usage_chunk=strip)
    sent = [reader.feed(chunk) for chunk in _split(whole, offsets)]
    sent.append(reader.flush())
    assert reader.usage in (None, EXPECTED)
    if not strip:
        assert b"".join(sent) == whole
