"""Bad input through a running joulegate in front of a real local upstream: HTTP that cannot
be parsed, bodies that are not what their route expects, odd bytes, slow clients, made-up
models and keys by the thousand, and odd ids on the lookup API.

Every error joulegate answers itself is in the OpenAI error format, nothing crashes, and the
proxy keeps serving other clients afterwards.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.records import RequestRecord
from proxy.server import RECORDER
from tests.servers import joulegate, serve, settled
from tests.test_ledger import until

# ---- a real upstream that keeps what reached it, byte for byte ----


@dataclass(frozen=True)
class Received:
    method: str
    target: str  # path and query as sent
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass
class Upstream:
    url: str
    received: list[Received] = field(default_factory=list)

    def header(self, index: int, name: bytes) -> bytes:
        return next(v for k, v in self.received[index].headers if k.lower() == name.lower())


# A UTF-8 header value the upstream sends back: the client must get these very bytes.
UPSTREAM_NOTE = "café ✓ 模型"


@asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    """Answers 200 JSON naming the request's model, as a server that accepts any model does
    (so joulegate learns model labels from it). Bodies stay compressed as sent."""
    state = Upstream("")

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        state.received.append(
            Received(request.method, request.raw_path, tuple(request.raw_headers), body)
        )
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError, RecursionError):
            model = None
        document = {"object": "chat.completion", "model": model, "choices": []}
        return web.json_response(document, headers={"X-Upstream-Note": UPSTREAM_NOTE})

    # Limits far above joulegate's, so whatever joulegate passes on reaches this handler.
    limits = {"max_field_size": 1 << 20, "max_line_size": 1 << 20, "max_headers": 10_000}
    app = web.Application(
        client_max_size=1024**3, handler_args={"auto_decompress": False, **limits}
    )
    app.router.add_route("*", "/{tail:.*}", answer)
    async with serve(app) as url:
        state.url = url
        yield state


# ---- raw HTTP, for bytes no HTTP client library would send ----


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, bytes]  # lower-cased names, raw values
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI-format error this answer carries (and it is JSON, not aiohttp's text)."""
        assert self.headers["content-type"].startswith(b"application/json"), self.headers
        document = json.loads(self.body)
        assert set(document) == {"error"}
        assert {"message", "type", "code"} <= set(document["error"])
        assert document["error"]["message"] and document["error"]["type"]
        return document["error"]


def _parse_answer(data: bytes) -> RawAnswer:
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, f"no complete answer: {data[:200]!r}"
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body)


async def _connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(base)
    assert url.host is not None and url.port is not None
    return await asyncio.open_connection(url.host, url.port)


async def raw_exchange(base: str, request: bytes) -> RawAnswer:
    """Send `request` as is; read the answer until the server closes the connection (the
    requests here say `Connection: close`, and joulegate closes after an error of its own)."""
    reader, writer = await _connect(base)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return _parse_answer(data)


async def read_one_answer(reader: asyncio.StreamReader) -> RawAnswer:
    """One answer of known length from a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    answer = _parse_answer(head)
    length = int(answer.headers["content-length"])
    answer.body = await asyncio.wait_for(reader.readexactly(length), 10)
    return answer


async def served_normally(proxy: str) -> None:
    """Another client is served as ever: the proxy did not crash, hang or stop accepting."""
    async with aiohttp.ClientSession() as client:
        async with client.post(
            proxy + "/v1/chat/completions", json={"model": "well-behaved"}
        ) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["model"] == "well-behaved"


async def finished_record(app: web.Application, request_id: str) -> RequestRecord:
    recorder = app[RECORDER]
    for _ in range(500):
        record = recorder.store.get(request_id)
        if record is not None:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"request {request_id} was never recorded")


# ---- 1. HTTP aiohttp's parser refuses: answered in the OpenAI format ----


async def test_a_request_line_over_the_limit_gets_414_in_openai_format() -> None:
    async with upstream() as up, joulegate(up.url) as (proxy, _):
        target = b"/v1/chat/completions?q=" + b"a" * 9000
        answer = await raw_exchange(proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 414
        error = answer.error()
        assert (error["code"], error["type"]) == ("url_too_long", "invalid_request_error")
        assert "8190" in error["message"]
        await served_normally(proxy)
    assert [r.body for r in up.received] == [b'{"model": "well-behaved"}']


async def test_with_equal_limits_a_long_request_line_is_431_and_says_so() -> None:
    """aiohttp's error names the limit only: set equal, the two cannot be told apart."""
    async with upstream() as up, joulegate(up.url, max_header_bytes=8190) as (proxy, _):
        answer = await raw_exchange(proxy, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 431
    assert "target or a header field" in answer.error()["message"]
    assert not up.received


def _request_with(headers: Iterable[bytes]) -> bytes:
    return b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + (
        b"".join(line + b"\r\n" for line in headers) + b"\r\n"
    )


@pytest.mark.parametrize(
    ("settings", "headers", "limit"),
    [
        pytest.param(
            {"max_header_bytes": 1024}, [b"X-Big: " + b"t" * 1100], "1024", id="long-field"
        ),
        pytest.param({}, [b"Authorization: Bearer " + b"t" * 17_000], "16384", id="default-16KiB"),
        pytest.param({"max_headers": 10}, [b"X-H%d: 1" % i for i in range(9)], "10", id="too-many"),
        pytest.param({}, [b"X-H%d: 1" % i for i in range(127)], "128", id="default-count"),
    ],
)
async def test_header_fields_over_the_limits_get_431_in_openai_format(
    settings: dict[str, Any], headers: list[bytes], limit: str
) -> None:
    async with upstream() as up, joulegate(up.url, **settings) as (proxy, _):
        answer = await raw_exchange(proxy, _request_with(headers))
        assert answer.status == 431
        error = answer.error()
        assert (error["code"], error["type"]) == (
            "header_fields_too_large",
            "invalid_request_error",
        )
        assert limit in error["message"]
        # Just under the limits passes: one field fewer, or a field a little shorter.
        fewer = headers[:-1] if len(headers) > 1 else [headers[0][: int(limit) - 10]]
        assert (await raw_exchange(proxy, _request_with(fewer))).status == 200
        await served_normally(proxy)
    assert len(up.received) == 2  # the request under the limits and the normal one


async def test_a_12kb_bearer_token_passes_by_default() -> None:
    """Access tokens with many claims outgrow aiohttp's 8 KiB limit: 16 KiB by default."""
    async with upstream() as up, joulegate(up.url) as (proxy, _):
        token = b"t" * 12_000
        answer = await raw_exchange(proxy, _request_with([b"Authorization: Bearer " + token]))
        assert answer.status == 200
    assert up.header(0, b"Authorization") == b"Bearer " + token


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "HTTPS", id="tls-hello"),
        pytest.param(b"HELLO\r\n\r\n", "", id="not-http"),
        pytest.param(b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", "url", id="raw-byte-path"),
        pytest.param(b"GET /v1/models?q=\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", "url", id="query"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n", "", id="nul-header"),
        pytest.param(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            "chunk",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\nabc",
            "",
            id="two-lengths",
        ),
    ],
)
async def test_requests_that_are_not_http_get_400_in_openai_format(
    request_bytes: bytes, reason: str
) -> None:
    async with upstream() as up, joulegate(up.url) as (proxy, _):
        answer = await raw_exchange(proxy, request_bytes)
        assert answer.status == 400
        error = answer.error()
        assert (error["code"], error["type"]) == ("invalid_http_request", "invalid_request_error")
        assert reason.lower() in error["message"].lower()
        await served_normally(proxy)
    assert len(up.received) == 1  # the normal request only


async def test_a_failure_inside_joulegate_gets_500_in_openai_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in joulegate is answered 500 in the OpenAI format, never a traceback or plain
    text: on a forwarded path (the front answers) and on its own endpoints (the aiohttp
    application's middleware answers). The request is still recorded."""

    async def broken_exchange(*args: object) -> None:
        raise RuntimeError("a bug")

    def broken_reader(*args: object) -> None:
        raise RuntimeError("a bug")

    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    forwarded_request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(chat), chat)
    )
    async with upstream() as up, joulegate(up.url) as (proxy, app):
        monkeypatch.setattr("proxy.forward.Forwarder._exchange", broken_exchange)
        monkeypatch.setattr("proxy.access.AccessControl.reader", broken_reader)
        forwarded = await raw_exchange(proxy, forwarded_request)
        own = await raw_exchange(proxy, b"GET /joulegate/budgets HTTP/1.1\r\nHost: x\r\n\r\n")
        await settled(app)
        record = app[RECORDER].store.get(forwarded.headers["x-request-id"].decode())
    for answer in (forwarded, own):
        assert answer.status == 500
        error = answer.error()
        assert (error["code"], error["type"]) == ("internal_error", "server_error")
        assert "a bug" not in error["message"]  # no internals to the client
    assert record is not None and record.status == "error" and record.code == 500


# ---- 2. bodies that are not what the route expects: forwarded untouched ----

NESTED = b"[" * 100_000


@pytest.mark.parametrize(
    ("body", "model", "streaming"),
    [
        pytest.param(b'{"model": "m\xff\xfe", "stream": true}', None, False, id="bad-utf8"),
        pytest.param(b'{"model": "gpt-x", "messages": [{"role": "us', None, False, id="cut"),
        pytest.param(b'[{"model": "gpt-x"}]', None, False, id="a-list"),
        pytest.param(b"42", None, False, id="a-number"),
        pytest.param(b'"gpt-x"', None, False, id="a-string"),
        pytest.param(b"null", None, False, id="null"),
        pytest.param(b"", None, False, id="empty"),
        pytest.param(b'{"model": 7, "stream": false}', None, False, id="model-number"),
        pytest.param(b'{"model": ["gpt-x"]}', None, False, id="model-list"),
        pytest.param(b'{"model": {"name": "gpt-x"}}', None, False, id="model-object"),
        pytest.param(b'{"model": ""}', None, False, id="model-empty"),
        pytest.param(b'{"model": "gpt-x", "stream": "true"}', "gpt-x", False, id="stream-text"),
        pytest.param(b'{"model": "gpt-x", "stream": 1}', "gpt-x", False, id="stream-number"),
        pytest.param(NESTED, None, False, id="100k-brackets"),
        pytest.param(b'{"model": "gpt-x", "x": ' + NESTED, None, False, id="100k-in-object"),
        pytest.param(b'{"model": "gpt-x", "x": ' + b"{" * 1000, None, False, id="deep-braces"),
        pytest.param(b'\xef\xbb\xbf{"model": "gpt-x"}', None, False, id="utf8-bom"),
        pytest.param('{"model": "gpt-x"}'.encode("utf-16"), None, False, id="utf16"),
    ],
)
async def test_bodies_that_are_not_a_chat_request_are_forwarded_untouched(
    body: bytes, model: str | None, streaming: bool
) -> None:
    async with upstream() as up, joulegate(up.url) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-Id"]
        record = await finished_record(app, request_id)
    assert [r.body for r in up.received] == [body]
    assert (record.task, record.model, record.streaming) == ("text-generation", model, streaming)
    assert (record.status, record.code) == ("ok", 200)


async def test_nesting_at_pythons_recursion_limit_never_fails_a_request() -> None:
    """Around the depth where json.loads gives up, the body is parsed in one place and may be
    rewritten (stream usage is asked for) in another: neither may raise."""
    async with upstream() as up, joulegate(up.url) as (proxy, _):
        async with aiohttp.ClientSession() as client:
            for depth in range(900, 1100, 7):
                body = b'{"model": "m", "stream": true, "x": ' + b"[" * depth + b"]" * depth + b"}"
                async with client.post(proxy + "/v1/chat/completions", data=body) as response:
                    assert response.status == 200, depth
    assert len(up.received) == len(range(900, 1100, 7))


@pytest.mark.parametrize(
    "model_json",
    [
        pytest.param(r'"\ud800"', id="lone-surrogate"),
        pytest.param(r'"gpt\udfff-x"', id="low-surrogate"),
        pytest.param(r'"a\u0000b"', id="nul"),
        pytest.param(r'"line\nbreak"', id="newline"),
        pytest.param('"' + "m" * 10_000 + '"', id="10k-chars"),
    ],
)
async def test_model_names_no_scrape_or_ledger_could_hold_are_unknown(
    tmp_path: Path, model_json: str
) -> None:
    """Before: a lone surrogate learned as a label made every later /metrics scrape fail with
    500, and the ledger dropped the record."""
    body = ('{"model": ' + model_json + "}").encode()
    async with (
        upstream() as up,
        joulegate(up.url, ledger=f"sqlite:{tmp_path / 'ledger.db'}") as (proxy, app),
    ):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy + "/v1/chat/completions", data=body) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-Id"]
            record = await finished_record(app, request_id)
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                assert response.status == 200
                exposition = await response.text()
            await served_normally(proxy)
        ledger = app[RECORDER].ledger
        assert ledger is not None
        await until(lambda: ledger.stats().written >= 2)
        assert ledger.stats().dropped == 0
        stored = await ledger.get(request_id)
    assert up.received[0].body == body
    assert record.model is None
    assert stored is not None and stored["model"] is None
    assert 'model="unknown"' in exposition


async def test_odd_bytes_in_path_query_and_headers_reach_the_upstream_byte_for_byte(
    tmp_path: Path,
) -> None:
    targets = [
        b"/v1/chat/completions/%FF%FE/..%2F..%2Fetc%2Fpasswd/%00/%ED%A0%80?q=%C3%28&n=%00&&=",
        b"/v1/embeddings?x=%FF&y=%E2%82&z=" + b"%25" * 50,
    ]
    odd_headers = [
        b"X-Odd: \xff\xfe\x80 tab\there",
        "X-Utf8: café ✓ 模型".encode(),
        b"X-Api-Key: sk-\xff\xfe",  # not UTF-8: no tenant, no crash
        b"X-Empty:",
        b"X-Request-Id: ../../\xff",  # not a sane id: joulegate makes its own
    ]
    async with (
        upstream() as up,
        joulegate(up.url, ledger=f"sqlite:{tmp_path / 'ledger.db'}") as (proxy, app),
    ):
        ids = []
        for target in targets:
            request = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            request += b"".join(line + b"\r\n" for line in odd_headers)
            request += b"Content-Length: 2\r\n\r\n{}"
            answer = await raw_exchange(proxy, request)
            assert answer.status == 200
            assert answer.headers["x-request-id"] != b"../../\xff"
            ids.append(answer.headers["x-request-id"].decode())
        records = [await finished_record(app, request_id) for request_id in ids]
        ledger = app[RECORDER].ledger
        assert ledger is not None
        await until(lambda: ledger.stats().written >= 2)
        assert ledger.stats().dropped == 0
        stored = [await ledger.get(request_id) for request_id in ids]
    for index, target in enumerate(targets):
        received = up.received[index]
        assert received.target.encode() == target
        for line in odd_headers[:4]:
            name, _, value = line.partition(b":")
            assert up.header(index, name) == value.strip()
        assert received.body == b"{}"
    assert [(r.task, r.model, r.tenant) for r in records] == [
        ("other", None, "anonymous"),
        ("embeddings", None, "anonymous"),
    ]
    # The path as sent, without the query: ASCII, so any ledger can keep it.
    assert [r.path for r in records] == [t.partition(b"?")[0].decode() for t in targets]
    assert [document["path"] for document in stored if document] == [r.path for r in records]


async def test_utf8_header_values_from_the_upstream_reach_the_client_byte_for_byte() -> None:
    async with upstream() as up, joulegate(up.url) as (proxy, _):
        answer = await raw_exchange(
            proxy, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert answer.headers["x-upstream-note"] == UPSTREAM_NOTE.encode()


async def test_a_compressed_body_is_forwarded_as_the_client_compressed_it() -> None:
    """aiohttp inflated request bodies by default, so the upstream got plain JSON labelled
    `Content-Encoding: gzip`, and failed to read it."""
    body = gzip.compress(b'{"model": "gpt-x"}')
    async with upstream() as up, joulegate(up.url) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy + "/v1/chat/completions",
                data=body,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            ) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-Id"]
        record = await finished_record(app, request_id)
    assert up.received[0].body == body
    assert up.header(0, b"Content-Encoding") == b"gzip"
    assert (record.task, record.model) == ("text-generation", None)  # by its route alone


# ---- 3. slow clients ----

SLOW = {"client_header_timeout_seconds": 0.5, "client_body_timeout_seconds": 0.5}


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent before closing the connection (it must close within `within`)."""
    return await asyncio.wait_for(reader.read(), within)


async def test_a_request_head_trickled_past_the_header_timeout_is_cut_off() -> None:
    async with upstream() as up, joulegate(up.url, **SLOW) as (proxy, _):
        reader, writer = await _connect(proxy)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")

        async def trickle() -> None:
            for _ in range(100):  # 20 s at most; the header timeout is 0.5 s
                await asyncio.sleep(0.2)
                writer.write(b"a")
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            await served_normally(proxy)  # while the slow head is being sent
            assert await _closed_by_server(reader, within=10) == b""
        finally:
            trickling.cancel()
            writer.close()
        await served_normally(proxy)
    assert [r.body for r in up.received] == [b'{"model": "well-behaved"}'] * 2


async def test_a_head_in_pieces_and_an_idle_kept_alive_connection_are_not_cut_off() -> None:
    """The timer runs from a head's first byte to its last: a complete head disarms it, so
    an idle connection between requests is the keep-alive timeout's business."""
    async with upstream() as up, joulegate(up.url, **SLOW) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            writer.write(b"GET /v1/models HTTP/1.1\r\n")
            await asyncio.sleep(0.1)
            writer.write(b"Host: x\r\n\r\n")
            assert (await read_one_answer(reader)).status == 200
            await asyncio.sleep(1.0)  # twice the header timeout, idle
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_one_answer(reader)).status == 200
        finally:
            writer.close()
    assert len(up.received) == 2


@pytest.mark.parametrize(
    ("head", "first_part"),
    [
        pytest.param(b"Content-Length: 100\r\n", b'{"model": "slow"', id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b'5\r\n{"mod\r\n', id="chunked"),
    ],
)
async def test_a_request_body_stalled_past_the_body_timeout_gets_408(
    head: bytes, first_part: bytes
) -> None:
    async with upstream() as up, joulegate(up.url, **SLOW) as (proxy, app):
        reader, writer = await _connect(proxy)
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            writer.write(first_part)  # then nothing more
            stalled = asyncio.create_task(_closed_by_server(reader, within=10))
            await served_normally(proxy)  # meanwhile
            answer = _parse_answer(await stalled)  # the 408, then the server closed
        finally:
            writer.close()
        assert answer.status == 408
        error = answer.error()
        assert (error["code"], error["type"]) == ("client_body_timeout", "invalid_request_error")
        assert answer.headers["connection"] == b"close"
        record = await finished_record(app, answer.headers["x-request-id"].decode())
        await served_normally(proxy)
    assert [r.body for r in up.received] == [b'{"model": "well-behaved"}'] * 2  # not the slow
    assert (record.status, record.code, record.reason) == ("error", 408, "client body timeout")
    assert record.task == "text-generation"


async def test_a_body_whose_pauses_stay_under_the_body_timeout_is_forwarded() -> None:
    """nginx's client_body_timeout: the pause between two reads, not the whole body's time."""
    pieces = [b'{"model": ', b'"patient"', b", ", b'"x": ', b"1", b"}"]
    body = b"".join(pieces)
    async with upstream() as up, joulegate(up.url, **SLOW) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            for piece in pieces:  # about 0.9 s in all, 0.15 s apart
                await asyncio.sleep(0.15)
                writer.write(piece)
            answer = await read_one_answer(reader)
        finally:
            writer.close()
    assert answer.status == 200
    assert [r.body for r in up.received] == [body]


# ---- 4. made-up models and keys by the thousand: bounded series ----

KNOWN_KEY = "sk-known-tenant"


async def check_made_up_names_stay_bounded(count: int) -> None:
    """`count` requests, each with its own model name and its own unknown API key (and a
    few with a configured key), 32 at a time; then every metric family's series count."""
    max_models = 20
    async with (
        upstream() as up,
        joulegate(
            up.url,
            max_models=max_models,
            api_keys={hashlib.sha256(KNOWN_KEY.encode()).hexdigest(): "known"},
        ) as (proxy, app),
    ):
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=connector) as client:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(count):
                queue.put_nowait(index)

            async def worker() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    key = KNOWN_KEY if index % 100 == 0 else f"sk-made-up-{index}"
                    async with client.post(
                        proxy + "/v1/chat/completions",
                        json={"model": f"made-up-model-{index}"},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as response:
                        assert response.status == 200
                        await response.read()

            await asyncio.gather(*(worker() for _ in range(32)))
            await settled(app, timeout=30)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
    assert len(up.received) == count
    families = _label_values(exposition)
    models = families["model"]
    assert len(models) == max_models + 1 and "other" in models  # the first learned, then other
    assert families["tenant"] == {"known", "anonymous"}
    series = _series_per_family(exposition)
    # task x model x tenant (x code, x direction: one value each here)
    for family in ("joulegate_requests_total", "joulegate_energy_joules_total"):
        assert series[family] <= (max_models + 1) * 2, family


def _label_values(exposition: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', exposition):
        found.setdefault(name, set()).add(value)
    return found


def _series_per_family(exposition: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            counts[name] = counts.get(name, 0) + 1
    return counts


async def test_10000_made_up_models_and_keys_give_bounded_series() -> None:
    """About 12 s on two cores."""
    await check_made_up_names_stay_bounded(10_000)


# ---- 5. odd ids on the lookup API ----

INVALID_IDS = [
    pytest.param("..%2F..%2Fetc%2Fpasswd", id="traversal"),
    pytest.param("../../etc/passwd", id="traversal-raw"),
    pytest.param("a" * 8_000, id="8000-chars"),
    pytest.param("a" * 129, id="129-chars"),
    pytest.param("caf%C3%A9", id="unicode"),
    pytest.param("%F0%9F%94%A5", id="emoji"),
    pytest.param("%FF%FE", id="not-utf8"),
    pytest.param("%00", id="nul"),
    pytest.param("abc%00def", id="nul-inside"),
    pytest.param("'%20OR%201=1%20--", id="sql"),
    pytest.param("1;DROP%20TABLE%20records", id="sql-drop"),
    pytest.param("", id="empty"),
    pytest.param("a/b", id="slash"),
    pytest.param("%20", id="space"),
]


@pytest.mark.parametrize("odd_id", INVALID_IDS)
async def test_ids_that_could_never_be_a_request_id_get_400(tmp_path: Path, odd_id: str) -> None:
    async with (
        upstream() as up,
        joulegate(up.url, ledger=f"sqlite:{tmp_path / 'ledger.db'}") as (proxy, _),
    ):
        async with aiohttp.ClientSession() as client:
            url = URL(proxy + "/joulegate/requests/" + odd_id, encoded=True)
            async with client.get(url) as response:
                assert response.status == 400
                error = (await response.json())["error"]
    assert (error["code"], error["param"]) == ("invalid_request_id", "id")
    assert not up.received  # never forwarded


async def test_a_10kb_id_is_over_the_request_line_limit_414_never_500(tmp_path: Path) -> None:
    async with (
        upstream() as up,
        joulegate(up.url, ledger=f"sqlite:{tmp_path / 'ledger.db'}") as (proxy, _),
    ):
        answer = await raw_exchange(
            proxy, b"GET /joulegate/requests/" + b"a" * 10_240 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert answer.status == 414
    assert answer.error()["code"] == "url_too_long"
    assert not up.received


@pytest.mark.parametrize(
    "unknown_id", ["0123456789abcdef", "a" * 128, "req-1:2.3_x", "OR-1", "v1..2", "-"]
)
async def test_well_formed_unknown_ids_get_404_and_known_ones_their_record(
    tmp_path: Path, unknown_id: str
) -> None:
    """With a SQLite ledger, so the lookup reaches the ledger's query too."""
    async with (
        upstream() as up,
        joulegate(up.url, ledger=f"sqlite:{tmp_path / 'ledger.db'}") as (proxy, app),
    ):
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy + "/joulegate/requests/" + unknown_id) as response:
                assert response.status == 404
                error = (await response.json())["error"]
            async with client.post(
                proxy + "/v1/chat/completions", json={"model": "m"}, headers={"X-Request-Id": "k"}
            ) as response:
                assert response.status == 200
            await finished_record(app, "k")
            async with client.get(proxy + "/joulegate/requests/k") as response:
                assert response.status == 200
                assert (await response.json())["model"] == "m"
    assert (error["code"], error["param"]) == ("request_not_found", "id")
