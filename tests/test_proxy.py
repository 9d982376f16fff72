"""End-to-end: real upstream servers on loopback, the real proxy, real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.forward import new_request_id
from proxy.server import RECORDER
from tests.fake_openai import SEEN, create_fake_openai
from tests.servers import closed_port_url, joulegate, serve, settled


def _echo_app() -> web.Application:
    """Answers with what it received: method, path with query, headers and body."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body.decode("latin-1"),
            },
            headers={"X-Upstream": "yes", "Keep-Alive": "timeout=5", "Proxy-Authenticate": "x"},
        )

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _record(app: web.Application, request_id: str):
    """The finished record of a request; the proxy finishes it right after the last byte."""
    recorder = app[RECORDER]
    for _ in range(200):
        record = recorder.store.get(request_id)
        if record is not None:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"request {request_id} was never recorded")


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_path_and_query_is_forwarded(method: str) -> None:
    async with serve(_echo_app()) as upstream, joulegate(upstream) as (proxy, _):
        async with aiohttp.ClientSession() as client:
            path = "/some/p%20ath;x=1/deep?a=1&b=%2F&a=2"
            url = URL(proxy + path, encoded=True)  # exactly these bytes, no requoting
            async with client.request(method, url, data=b"payload\x00\xff") as response:
                assert response.status == 200
                echoed = await response.json()
    assert echoed["method"] == method
    assert echoed["path_qs"] == path
    assert echoed["body"] == "payload\x00\xff"


async def test_non_json_body_is_forwarded_untouched_and_classified_by_route() -> None:
    body = b"\xff\xfe not json {"
    async with serve(_echo_app()) as upstream, joulegate(upstream) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy + "/v1/embeddings", data=body) as response:
                echoed = await response.json()
                request_id = response.headers["X-Request-Id"]
    assert echoed["body"].encode("latin-1") == body
    record = await _record(app, request_id)
    assert (record.task, record.model) == ("embeddings", None)


async def test_large_bodies_pass_and_oversized_bodies_get_413() -> None:
    async with (
        serve(_echo_app()) as upstream,
        joulegate(upstream, max_body_bytes=4096) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy + "/v1/embeddings", data=b"x" * 4096) as response:
                assert response.status == 200
                assert len((await response.json())["body"]) == 4096
            async with client.post(proxy + "/v1/embeddings", data=b"x" * 4097) as response:
                assert response.status == 413
                error = (await response.json())["error"]
                request_id = response.headers["X-Request-Id"]

            async def chunked():  # no Content-Length: the limit must hold while reading
                for _ in range(10):
                    yield b"y" * 1000

            async with client.post(proxy + "/v1/embeddings", data=chunked()) as response:
                assert response.status == 413
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert "4096" in error["message"]
    record = await _record(app, request_id)
    assert (record.status, record.code) == ("error", 413)


async def test_refused_upstream_gives_502_in_openai_format() -> None:
    async with joulegate(closed_port_url()) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy + "/v1/chat/completions", json={"model": "m"}) as response:
                assert response.status == 502
                body = await response.json()
                request_id = response.headers["X-Request-Id"]
    assert body["error"]["code"] == "upstream_unavailable"
    assert set(body["error"]) >= {"message", "type", "code"}
    record = await _record(app, request_id)
    assert (record.status, record.code, record.model) == ("error", 502, "m")


async def test_slow_upstream_gives_504() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", slow)
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, read_timeout_seconds=0.2) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy + "/v1/chat/completions", json={}) as response:
                assert response.status == 504
                body = await response.json()
                request_id = response.headers["X-Request-Id"]
        release.set()
    assert body["error"]["code"] == "upstream_timeout"
    record = await _record(app, request_id)
    assert (record.status, record.code) == ("error", 504)


async def test_first_chunk_reaches_the_client_while_upstream_still_pauses() -> None:
    """No timing involved: the upstream does not send its second chunk until the client
    has received the first, so a buffering proxy would deadlock (and time out)."""
    client_got_first = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await asyncio.wait_for(client_got_first.wait(), 10)
        await response.write(b'data: {"n": 2}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.wait_for(client_got_first.wait(), 10)
        await response.write(b"second")
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", stream)
    upstream_app.router.add_get("/download", chunked)
    async with serve(upstream_app) as upstream, joulegate(upstream) as (proxy, _):
        async with aiohttp.ClientSession() as client:
            for method, path, first in [
                ("POST", "/v1/chat/completions", b'data: {"n": 1}\n\n'),
                ("GET", "/download", b"first"),
            ]:
                client_got_first.clear()
                async with client.request(method, proxy + path, json={"stream": True}) as response:
                    received = b""
                    while len(received) < len(first):
                        received += await asyncio.wait_for(response.content.readany(), 5)
                    assert received == first
                    client_got_first.set()
                    rest = await asyncio.wait_for(response.content.read(), 5)
                assert rest in (b'data: {"n": 2}\n\ndata: [DONE]\n\n', b"second")


async def test_upstream_closing_mid_stream_ends_the_client_stream_and_records_abort() -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        assert request.transport is not None
        request.transport.close()
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", broken)
    async with serve(upstream_app) as upstream, joulegate(upstream) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy + "/v1/chat/completions", json={"model": "m", "stream": True}
            ) as response:
                assert response.status == 200
                body = await asyncio.wait_for(response.content.read(), 5)
                request_id = response.headers["X-Request-Id"]
    assert body == b'data: {"n": 1}\n\n'  # read() returned: the chunked stream ended cleanly
    record = await _record(app, request_id)
    assert record.status == "aborted"
    assert record.reason == "upstream closed mid-answer"


async def test_client_disconnect_cancels_the_upstream_request() -> None:
    upstream_cancelled = asyncio.Event()
    first_sent = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(b'data: {"token": 0}\n\n')
            first_sent.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            upstream_cancelled.set()
            raise
        return response

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", endless)
    async with serve(upstream_app) as upstream, joulegate(upstream) as (proxy, app):
        client = aiohttp.ClientSession()
        response = await client.post(
            proxy + "/v1/chat/completions", json={"model": "m", "stream": True}
        )
        request_id = response.headers["X-Request-Id"]
        await asyncio.wait_for(response.content.readany(), 5)
        await first_sent.wait()
        response.close()  # the client walks away mid-stream
        await client.close()
        await asyncio.wait_for(upstream_cancelled.wait(), 5)
        record = await _record(app, request_id)
    assert record.status == "aborted"
    assert record.reason == "client disconnected"
    assert record.code == 200


async def test_header_hygiene() -> None:
    async with serve(_echo_app()) as upstream, joulegate(upstream) as (proxy, _):
        async with aiohttp.ClientSession(skip_auto_headers=["Accept-Encoding"]) as client:
            async with client.post(
                proxy + "/v1/embeddings",
                data=b"{}",
                headers={
                    "Connection": "keep-alive, X-Hop",
                    "X-Hop": "must not pass",
                    "TE": "trailers",
                    "Proxy-Authorization": "Basic c2VjcmV0",
                    "Keep-Alive": "timeout=5",
                    "X-Forwarded-For": "10.0.0.1",
                    "X-Custom": "kept",
                    "Authorization": "Bearer sk-upstream-needs-this",
                    "X-Request-Id": "req-123.abc",
                },
            ) as response:
                echoed = await response.json()
                response_headers = response.headers
    received = {name.lower(): value for name, value in echoed["headers"]}
    for hop in ["x-hop", "te", "proxy-authorization", "keep-alive"]:
        assert hop not in received, hop
    assert "x-hop" not in received.get("connection", "").lower()  # the pool's own, if any
    assert received["x-custom"] == "kept"
    assert received["authorization"] == "Bearer sk-upstream-needs-this"
    assert received["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-forwarded-host"] == proxy.removeprefix("http://")
    assert received["x-request-id"] == "req-123.abc"
    assert "accept-encoding" not in received  # the proxy adds nothing the client did not send
    assert response_headers["X-Request-Id"] == "req-123.abc"
    assert response_headers["X-Upstream"] == "yes"
    assert "Keep-Alive" not in response_headers
    assert "Proxy-Authenticate" not in response_headers
    assert len(response_headers.getall("Date")) == 1
    assert len(response_headers.getall("Server")) == 1


@pytest.mark.parametrize("offered", ["", "has space", "x" * 200, "../../etc", "ünïcode"])
async def test_insane_request_ids_are_replaced(offered: str) -> None:
    async with serve(_echo_app()) as upstream, joulegate(upstream) as (proxy, _):
        async with aiohttp.ClientSession() as client:
            headers = {"X-Request-Id": offered} if offered.isascii() else {}
            async with client.get(proxy + "/", headers=headers) as response:
                request_id = response.headers["X-Request-Id"]
                echoed = await response.json()
    assert request_id != offered
    assert len(request_id) == 32
    assert CIMultiDict(echoed["headers"])["X-Request-Id"] == request_id


async def test_usage_is_injected_for_streams_and_the_extra_chunk_stripped() -> None:
    upstream_app = create_fake_openai()
    async with serve(upstream_app) as upstream, joulegate(upstream) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            request = {"model": "tiny", "stream": True, "messages": [], "max_tokens": 4}
            async with client.post(proxy + "/v1/chat/completions", json=request) as response:
                text = await response.text()
                request_id = response.headers["X-Request-Id"]
            asked = request | {"stream_options": {"include_usage": True}}
            async with client.post(proxy + "/v1/chat/completions", json=asked) as response:
                text_with_usage = await response.text()
                asked_id = response.headers["X-Request-Id"]
    seen = upstream_app[SEEN].bodies
    assert seen[0]["stream_options"] == {"include_usage": True}
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert len(chunks) == 4
    assert all(chunk["choices"] for chunk in chunks)  # the usage-only chunk was stripped
    assert '"choices": []' in text_with_usage  # but kept for a client that asked for it
    for rid in (request_id, asked_id):
        record = await _record(app, rid)
        assert (record.input_tokens, record.output_tokens, record.streaming) == (5, 4, True)


async def test_usage_injection_can_be_turned_off() -> None:
    upstream_app = create_fake_openai()
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, inject_stream_usage=False) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            request = {"model": "tiny", "stream": True, "messages": []}
            async with client.post(proxy + "/v1/chat/completions", json=request) as response:
                await response.read()
                request_id = response.headers["X-Request-Id"]
    assert "stream_options" not in upstream_app[SEEN].bodies[0]
    record = await _record(app, request_id)
    assert record.output_tokens is None  # unknown, never a made-up 0


async def test_openai_sdk_works_unchanged_through_the_proxy() -> None:
    openai = pytest.importorskip("openai")
    upstream_app = create_fake_openai()
    async with serve(upstream_app) as upstream, joulegate(upstream) as (proxy, app):
        sdk = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="sk-test", max_retries=0)
        chat = await sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content == "energy is what"
        assert chat.usage is not None and chat.usage.completion_tokens == 3

        stream = await sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [chunk async for chunk in stream]
        assert "".join(p.choices[0].delta.content or "" for p in pieces) == "".join(
            ["energy", "is", "what", "we", "meter", "per", "request"]
        )
        assert all(p.usage is None for p in pieces)

        streamed_with_usage = await sdk.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        last = [chunk async for chunk in streamed_with_usage][-1]
        assert last.usage is not None and last.usage.completion_tokens == 7

        completion = await sdk.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert completion.choices[0].text == "energy is"

        stream = await sdk.completions.create(model="tiny", prompt="hi", stream=True, max_tokens=2)
        assert "".join([c.choices[0].text async for c in stream]) == "energyis"

        embedding = await sdk.embeddings.create(model="tiny", input=["a", "b"])
        assert len(embedding.data) == 2 and embedding.usage.prompt_tokens == 6
        await sdk.close()

        recorder = app[RECORDER]
        await settled(app)
        tasks = sorted(record.task for record in recorder.store._records.values())
    assert tasks == ["embeddings"] + ["text-generation"] * 5


async def test_metrics_count_requests_with_bounded_labels() -> None:
    tenant_key = "sk-team-a"
    from proxy.classify import key_digest

    upstream_app = create_fake_openai()
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, api_keys={key_digest(tenant_key): "team-a"}, max_models=2) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            for model in ["m1", "m2", "m3", "m4"]:
                async with client.post(
                    proxy + "/v1/embeddings",
                    json={"model": model, "input": "x"},
                    headers={"Authorization": f"Bearer {tenant_key}"},
                ) as response:
                    assert response.status == 200
            async with client.post(
                proxy + "/v1/embeddings",
                json={"model": "m1", "input": "x"},
                headers={"Authorization": "Bearer sk-unknown"},
            ) as response:
                assert response.status == 200
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
            async with client.get(proxy + "/joulegate/health") as response:
                health = await response.json()
    assert (
        'joulegate_requests_total{code="200",model="m1",task="embeddings",tenant="team-a"} 1.0'
        in exposition
    )
    assert 'model="m3"' not in exposition and 'model="m4"' not in exposition
    assert (
        'joulegate_requests_total{code="200",model="other",task="embeddings",tenant="team-a"} 2.0'
        in exposition
    )
    assert 'tenant="anonymous"} 1.0' in exposition
    assert "sk-team-a" not in exposition
    assert 'joulegate_request_duration_seconds_count{model="m1",task="embeddings"} 2.0' in (
        exposition
    )
    assert 'joulegate_tokens_total{direction="input",model="m1",task="embeddings"' in exposition
    assert health["status"] == "ok"


async def test_request_record_endpoint() -> None:
    async with serve(create_fake_openai()) as upstream, joulegate(upstream) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy + "/v1/embeddings",
                json={"model": "tiny", "input": "secret prompt text"},
                headers={"X-Request-Id": "my-request-1"},
            ) as response:
                assert response.headers["X-Request-Id"] == "my-request-1"
            await _record(app, "my-request-1")
            async with client.get(proxy + "/joulegate/requests/my-request-1") as response:
                record = await response.json()
            async with client.get(proxy + "/joulegate/requests/nothing-here") as response:
                missing_status = response.status
                missing = await response.json()
    required = {"id", "task", "model", "tenant", "status", "duration_seconds", "energy_joules"}
    assert required | {"dynamic_energy_joules", "meter", "devices"} <= set(record)
    assert record["id"] == "my-request-1"
    assert record["input_tokens"] == 3
    assert "secret prompt text" not in json.dumps(record)
    assert missing_status == 404
    assert missing["error"]["code"] == "request_not_found"


def test_new_request_ids_are_unique_time_ordered_and_32_hex_digits() -> None:
    """The UUIDv7 layout: a millisecond clock first (the ledger's index grows at its end),
    then random digits, drawn in batches, that never repeat across a batch's edge."""
    ids = [new_request_id() for _ in range(5000)]  # several 4 KiB batches of random digits
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)
    assert [request_id[:12] for request_id in ids] == sorted(r[:12] for r in ids)
    assert len({request_id[12:] for request_id in ids}) == len(ids)
