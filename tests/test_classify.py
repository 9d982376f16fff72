"""Classification: task from the route, model from body or path, tenant from the API key."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.classify import (
    ANONYMOUS,
    Classifier,
    RouteTable,
    api_key_from,
    key_digest,
    parse_json_object,
)
from proxy.config import DEFAULT_ROUTES, Route

KEY_A = "sk-live-tenant-a-0123456789"
KEY_B = "sk-live-tenant-b-9876543210"
API_KEYS = {key_digest(KEY_A): "team-a", key_digest(KEY_B): "team-b"}
EXTRA_ROUTES = (
    Route("/models/{model:path}", "text-classification"),
    Route("/tgi/{model}/generate", "text-generation"),
    Route("/detect/{model}", "object-detection"),
)


@pytest.fixture
def classifier() -> Classifier:
    return Classifier(DEFAULT_ROUTES + EXTRA_ROUTES, API_KEYS)


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({name.replace("_", "-"): value for name, value in values.items()})


NO_HEADERS: CIMultiDict[str] = CIMultiDict()


# ---- tasks from the default route table ----


@pytest.mark.parametrize(
    ("path", "task"),
    [
        ("/v1/chat/completions", "text-generation"),
        ("/v1/completions", "text-generation"),
        ("/generate", "text-generation"),
        ("/generate_stream", "text-generation"),
        ("/v1/images/generations", "image-generation"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/audio/transcriptions", "speech-recognition"),
        ("/v1/audio/speech", "text-to-speech"),
        ("/v1/chat/completions/", "text-generation"),  # a trailing slash is the same route
    ],
)
def test_default_routes(classifier: Classifier, path: str, task: str) -> None:
    result = classifier.classify(path, NO_HEADERS, b"")
    assert result.task == task
    assert result.model is None


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/v1/models",
        "/v1/chat",
        "/v1/chat/completions/extra",
        "/V1/CHAT/COMPLETIONS",
        "/v1/chat/completionsX",
        "/x/v1/chat/completions",
        "/generatex",
        "/joulegate/health",
        "/models/",
        "/detect/a/b",
    ],
)
def test_unknown_paths_are_other(classifier: Classifier, path: str) -> None:
    result = classifier.classify(path, NO_HEADERS, b'{"model": "m"}')
    assert result.task == "other"
    assert result.model == "m"  # the body still names the model


def test_regex_characters_in_routes_are_literal() -> None:
    table = RouteTable([Route("/v1/a.b+(c)", "embeddings")])
    assert table.match("/v1/a.b+(c)") == ("embeddings", None)
    assert table.match("/v1/aXb+(c)") == ("other", None)
    assert table.match("/v1/a.bb(c)") == ("other", None)


def test_first_matching_route_wins() -> None:
    table = RouteTable(
        [Route("/models/special", "summarization"), Route("/models/{model}", "embeddings")]
    )
    assert table.match("/models/special") == ("summarization", None)
    assert table.match("/models/other") == ("embeddings", "other")


def test_empty_route_table() -> None:
    assert RouteTable([]).match("/v1/chat/completions") == ("other", None)


# ---- models ----


@pytest.mark.parametrize(
    ("path", "task", "model"),
    [
        ("/models/org/name", "text-classification", "org/name"),
        ("/models/distilbert-base-uncased", "text-classification", "distilbert-base-uncased"),
        ("/models/a/b/c", "text-classification", "a/b/c"),
        ("/tgi/llama-3/generate", "text-generation", "llama-3"),
        ("/detect/detr-resnet-50", "object-detection", "detr-resnet-50"),
        ("/detect/detr-resnet-50/", "object-detection", "detr-resnet-50"),
    ],
)
def test_path_captures_model(classifier: Classifier, path: str, task: str, model: str) -> None:
    result = classifier.classify(path, NO_HEADERS, b"")
    assert (result.task, result.model) == (task, model)


def test_trailing_slash_is_not_part_of_a_path_model(classifier: Classifier) -> None:
    """`/models/org/name/` is the same route and model as `/models/org/name`, as for `{model}`:
    otherwise one model shows up under two label values."""
    assert classifier.classify("/detect/detr/", NO_HEADERS, b"").model == "detr"
    assert classifier.classify("/models/org/name/", NO_HEADERS, b"").model == "org/name"


def test_single_segment_model_does_not_cross_slashes(classifier: Classifier) -> None:
    assert classifier.classify("/tgi/org/name/generate", NO_HEADERS, b"").task == "other"


def test_body_model_beats_path_model(classifier: Classifier) -> None:
    result = classifier.classify("/models/org/name", NO_HEADERS, b'{"model": "from-body"}')
    assert result.model == "from-body"
    assert result.task == "text-classification"


@pytest.mark.parametrize("body_model", ["", None, 42, ["x"], {"name": "x"}, True])
def test_body_model_that_is_not_a_name_keeps_path_model(
    classifier: Classifier, body_model: object
) -> None:
    body = json.dumps({"model": body_model}).encode()
    assert classifier.classify("/models/org/name", NO_HEADERS, body).model == "org/name"
    assert classifier.classify("/v1/embeddings", NO_HEADERS, body).model is None


def test_model_from_body(classifier: Classifier) -> None:
    body = json.dumps({"model": "gpt2", "messages": [{"role": "user", "content": "hi"}]})
    result = classifier.classify("/v1/chat/completions", NO_HEADERS, body.encode())
    assert result.model == "gpt2"
    assert result.body == json.loads(body)


def test_model_none_when_absent(classifier: Classifier) -> None:
    result = classifier.classify("/v1/embeddings", NO_HEADERS, b'{"input": "x"}')
    assert result.model is None
    assert result.body == {"input": "x"}


# ---- streaming ----


@pytest.mark.parametrize(
    ("path", "body", "streaming"),
    [
        ("/v1/chat/completions", b'{"stream": true}', True),
        ("/v1/chat/completions", b'{"stream": false}', False),
        ("/v1/chat/completions", b'{"stream": "true"}', False),
        ("/v1/chat/completions", b'{"stream": 1}', False),
        ("/v1/chat/completions", b"{}", False),
        ("/v1/chat/completions", b"", False),
        ("/generate_stream", b'{"inputs": "hi"}', True),
        ("/generate_stream", b"", True),
        ("/generate_stream/", b"not json", True),
        ("/generate", b'{"inputs": "hi"}', False),
    ],
)
def test_streaming(classifier: Classifier, path: str, body: bytes, streaming: bool) -> None:
    assert classifier.classify(path, NO_HEADERS, body).streaming is streaming


# ---- tenants ----


@pytest.mark.parametrize(
    ("request_headers", "tenant"),
    [
        (headers(Authorization=f"Bearer {KEY_A}"), "team-a"),
        (headers(authorization=f"bearer {KEY_B}"), "team-b"),
        (headers(Authorization=f"  BEARER   {KEY_A}  "), "team-a"),
        (headers(api_key=KEY_A), "team-a"),
        (headers(x_api_key=KEY_B), "team-b"),
        (headers(X_Api_Key=f" {KEY_B} "), "team-b"),
        (headers(Authorization="Basic dXNlcjpwYXNz", api_key=KEY_B), "team-b"),
        (headers(Authorization="Bearer sk-unknown"), ANONYMOUS),
        (headers(api_key="sk-unknown"), ANONYMOUS),
        (headers(Authorization="Bearer"), ANONYMOUS),
        (headers(Authorization=f"Token {KEY_A}"), ANONYMOUS),
        (headers(api_key="   "), ANONYMOUS),
        (headers(Authorization=key_digest(KEY_A)), ANONYMOUS),  # the digest is not a key
        (headers(api_key=key_digest(KEY_A)), ANONYMOUS),
        (NO_HEADERS, ANONYMOUS),
    ],
)
def test_tenant(classifier: Classifier, request_headers: CIMultiDict[str], tenant: str) -> None:
    assert classifier.classify("/v1/embeddings", request_headers, b"").tenant == tenant
    assert classifier.tenant(request_headers) == tenant


def test_bearer_beats_key_headers() -> None:
    both = headers(Authorization=f"Bearer {KEY_A}", x_api_key=KEY_B)
    assert api_key_from(both) == KEY_A


def test_api_key_from_plain_dict() -> None:
    assert api_key_from({"Authorization": "Bearer abc"}) == "abc"
    assert api_key_from({"x-api-key": "def"}) == "def"
    assert api_key_from({}) is None


def test_key_digest_is_sha256_hex() -> None:
    assert key_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    # Header values that were not UTF-8 arrive surrogate-escaped and still hash to their bytes.
    raw = b"sk-\xff\xfe"
    assert key_digest(raw.decode("utf-8", "surrogateescape")) == (hashlib.sha256(raw).hexdigest())


def test_no_api_keys_configured_means_everyone_is_anonymous() -> None:
    plain = Classifier(DEFAULT_ROUTES, {})
    assert plain.classify("/v1/embeddings", headers(api_key=KEY_A), b"").tenant == ANONYMOUS


# ---- bodies that are not JSON objects ----


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"not json at all",
        b'{"model": "gpt2", ',
        b'{"model": "\xff\xfe"}',
        b"\xff\xfe\x00\x01",
        b'["model", "gpt2"]',
        b'"gpt2"',
        b"42",
        b"null",
        b"\x89PNG\r\n\x1a\n\x00\x00",
        b'{"a":' * 5000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"--boundary\r\nContent-Disposition: form-data; name=file\r\n\r\n\x00\x01",
    ],
)
def test_non_object_bodies_classified_by_route(classifier: Classifier, body: bytes) -> None:
    result = classifier.classify("/v1/audio/transcriptions", headers(api_key=KEY_A), body)
    assert result.task == "speech-recognition"
    assert result.body is None
    assert result.model is None
    assert result.streaming is False
    assert result.tenant == "team-a"


def test_json_object_with_leading_whitespace(classifier: Classifier) -> None:
    result = classifier.classify("/v1/embeddings", NO_HEADERS, b' \n\t{"model": "e5"}\n')
    assert result.body == {"model": "e5"}
    assert result.model == "e5"


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_json_object(b"[{}]") is None
    assert parse_json_object(b"") is None
    assert parse_json_object(b"{") is None


def _json_loads_object(body: bytes) -> object:
    """What parse_json_object must give: json.loads, for a body that starts like an object."""
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


_JSON_TEXTS = st.builds(
    lambda value, before, after, encoding: (before + json.dumps(value) + after).encode(
        encoding, "surrogatepass"
    ),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
    st.sampled_from(["", " ", "\n\t", "\x0b", "\x0c", "\ufeff"]),
    st.sampled_from(["", " ", "\r\n", "x", "{}", "\x0c"]),
    st.sampled_from(["utf-8", "utf-16-le", "utf-32-be"]),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_JSON_TEXTS, st.binary(max_size=40).map(lambda raw: b"{" + raw)))
def test_parse_json_object_reads_what_json_loads_reads(body: bytes) -> None:
    assert repr(parse_json_object(body)) == repr(_json_loads_object(body))


# ---- fuzz: classify never raises ----

# Header values as aiohttp produces them: any bytes, decoded as UTF-8 with surrogateescape.
header_values = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
    st.sampled_from([f"Bearer {KEY_A}", KEY_B, "Bearer ", "bearer\t\tx"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(
        st.sampled_from(["model", "stream", "messages", "prompt", "input"]) | st.text(max_size=6),
        json_values,
        max_size=5,
    ).map(lambda document: json.dumps(document).encode()),
    st.sampled_from([b'{"a":' * 5000, b"{" * 5000, b'{"model":' * 3000 + b'"x"']),
)
paths = st.one_of(
    st.text(max_size=60),
    st.sampled_from([route.path for route in DEFAULT_ROUTES + EXTRA_ROUTES]),
    st.text(max_size=30).map(lambda rest: "/models/" + rest),
)


@settings(max_examples=150, deadline=None)
@given(
    path=paths,
    header_items=st.dictionaries(
        st.sampled_from(["Authorization", "api-key", "x-api-key", "Content-Type", "X-Other"]),
        header_values,
        max_size=4,
    ),
    body=bodies,
)
def test_classify_never_raises(path: str, header_items: dict[str, str], body: bytes) -> None:
    classifier = Classifier(DEFAULT_ROUTES + EXTRA_ROUTES, API_KEYS)
    result = classifier.classify(path, CIMultiDict(header_items), body)
    assert result.tenant in {"team-a", "team-b", ANONYMOUS}
    assert isinstance(result.streaming, bool)
    assert result.model is None or (isinstance(result.model, str) and result.model)
    assert result.body is None or isinstance(result.body, dict)
    assert result.task in {route.task for route in DEFAULT_ROUTES + EXTRA_ROUTES} | {"other"}


def test_route_answers_are_remembered_per_path_and_the_memory_stays_bounded() -> None:
    """Repeated paths answer the same as the first time (from memory), and a client sending
    ever new paths cannot grow that memory past its bound."""
    table = RouteTable(DEFAULT_ROUTES)
    first = table.match("/models/bert-base/infer")
    assert table.match("/models/bert-base/infer") == first
    assert table.match("/v1/chat/completions") == ("text-generation", None)
    assert table.match("/v1/chat/completions") == ("text-generation", None)
    for number in range(5000):
        assert table.match(f"/made-up/{number}") == ("other", None)
    assert len(table._matched) <= 1024
    assert table.match("/v1/chat/completions") == ("text-generation", None)
