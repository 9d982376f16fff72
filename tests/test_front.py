"""The front (proxy/front.py): HTTP/1.1 as clients speak it, over raw sockets.

Keep-alive for HTTP/1.1 and HTTP/1.0 clients, pipelined requests answered in order, `Expect:
100-continue`, HEAD, chunked answers of unknown length, and joulegate's own paths answered by
its application (never forwarded) with the connection closed after them.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
from pathlib import Path

from aiohttp import web

from benchmarks.harness import start_joulegate, stop, wait_listening
from proxy.front import ClientRequest, Front, Limits
from proxy.server import RECORDER
from tests.servers import free_port, joulegate, serve, settled
from tests.test_bad_input import _connect, _parse_answer, raw_exchange, read_one_answer

BODY = json.dumps({"model": "m", "input": "x"}).encode()


def _post(path: bytes = b"/v1/embeddings", version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (path, version, extra, len(BODY), BODY)
    )


def _upstream_app(seen: list[str]) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        seen.append(f"{request.method} {request.path_qs}")
        if request.path == "/stream":  # no length: the front must chunk it
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"one ", b"two ", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        return web.json_response({"object": "list", "path": request.path_qs, "data": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    seen: list[str] = []
    async with serve(_upstream_app(seen)) as up, joulegate(up) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            writer.write(b"".join(_post(b"/v1/embeddings?n=%d" % n) for n in range(5)))
            answers = [await read_one_answer(reader) for _ in range(5)]
        finally:
            writer.close()
    assert [json.loads(a.body)["path"] for a in answers] == [
        f"/v1/embeddings?n={n}" for n in range(5)
    ]
    assert len({a.headers["x-request-id"] for a in answers}) == 5
    assert seen == [f"POST /v1/embeddings?n={n}" for n in range(5)]


async def test_an_http_1_0_client_is_kept_alive_only_when_it_asks() -> None:
    async with serve(_upstream_app([])) as up, joulegate(up) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            for _ in range(2):  # two requests on one connection: it stayed open
                writer.write(_post(version=b"1.0", extra=b"Connection: keep-alive\r\n"))
                answer = await read_one_answer(reader)
                assert answer.status == 200
                assert answer.headers["connection"].lower() == b"keep-alive"
        finally:
            writer.close()
        # without asking, the answer says close and the connection ends after it
        plain = await raw_exchange(proxy, _post(version=b"1.0"))
    assert plain.status == 200 and plain.headers["connection"].lower() == b"close"
    assert json.loads(plain.body)["object"] == "list"


async def test_a_client_expecting_100_continue_gets_it_before_sending_its_body() -> None:
    async with serve(_upstream_app([])) as up, joulegate(up) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            head = _post(extra=b"Expect: 100-continue\r\n")[: -len(BODY)]
            writer.write(head)
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(BODY)
            answer = await read_one_answer(reader)
        finally:
            writer.close()
    assert answer.status == 200 and json.loads(answer.body)["object"] == "list"


async def test_head_gets_the_length_without_a_body_and_the_connection_goes_on() -> None:
    async with serve(_upstream_app([])) as up, joulegate(up) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            writer.write(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            head = _parse_answer(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            writer.write(_post())  # the next answer follows at once: no body was sent
            answer = await read_one_answer(reader)
        finally:
            writer.close()
    assert head.status == 200 and int(head.headers["content-length"]) > 0
    assert answer.status == 200 and json.loads(answer.body)["object"] == "list"


async def test_an_answer_of_unknown_length_is_chunked_and_the_connection_kept() -> None:
    async with serve(_upstream_app([])) as up, joulegate(up) as (proxy, _):
        reader, writer = await _connect(proxy)
        try:
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head = _parse_answer(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += data[:-2]
            writer.write(_post())
            after = await read_one_answer(reader)
        finally:
            writer.close()
    assert head.headers["transfer-encoding"] == b"chunked"
    assert body == b"one two three"
    assert after.status == 200


async def test_own_paths_are_answered_by_joulegate_and_never_forwarded() -> None:
    seen: list[str] = []
    async with serve(_upstream_app(seen)) as up, joulegate(up) as (proxy, _):
        health = await raw_exchange(proxy, b"GET /joulegate/health HTTP/1.1\r\nHost: x\r\n\r\n")
        unknown = await raw_exchange(proxy, b"GET /joulegate/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        wrong_method = await raw_exchange(
            proxy, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        metrics = await raw_exchange(proxy, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        scrape = await raw_exchange(proxy, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        # a path that only begins like an own one is the upstream's
        lookalike = await raw_exchange(
            proxy, b"GET /metrics-v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert seen == ["GET /metrics-v2"]
    assert lookalike.status == 200 and json.loads(lookalike.body)["path"] == "/metrics-v2"
    assert scrape.status == 200 and b"joulegate_requests_total" in scrape.body
    assert health.status == 200 and json.loads(health.body)["status"] == "ok"
    assert health.headers["connection"].lower() == b"close"  # raw_exchange read until close
    assert unknown.status == 404 and unknown.error()["code"] == "unknown_endpoint"
    assert wrong_method.status == 404 and wrong_method.error()["code"] == "unknown_endpoint"
    assert metrics.status == 200 and b"joulegate_requests_total" in metrics.body


async def test_a_client_closing_its_connection_while_idle_is_harmless() -> None:
    """Connections opened and dropped without a request (health checkers, scanners) leave
    nothing behind, and the next client is served."""
    async with serve(_upstream_app([])) as up, joulegate(up) as (proxy, _):
        for _ in range(20):
            _, writer = await _connect(proxy)
            writer.close()
        answer = await raw_exchange(proxy, _post(extra=b"Connection: close\r\n"))
    assert answer.status == 200


async def _front_answering_ok(limits: Limits) -> tuple[Front, str]:
    """A bare front whose every request is answered 200 `ok`."""

    async def answer(request: ClientRequest) -> None:
        await request.body.read()
        request.connection.send(200, [("Content-Type", "text/plain")], b"ok")

    front = Front(answer, answer, limits, asyncio.get_running_loop())
    host, port = await front.start("127.0.0.1", 0)
    return front, f"http://{host}:{port}"


async def test_an_idle_connection_closes_after_the_keepalive_timeout_a_busy_one_never() -> None:
    front, base = await _front_answering_ok(Limits(keepalive_timeout=0.4))
    try:
        reader, writer = await _connect(base)
        # requests 0.15 s apart for 0.9 s: each restarts the idle clock, so it stays open
        for _ in range(6):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_one_answer(reader)).body == b"ok"
            await asyncio.sleep(0.15)
        # then idle: closed by the server within the timeout (and a little)
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
    finally:
        await front.shutdown(1.0)


async def test_a_head_that_never_completes_is_cut_at_the_header_timeout() -> None:
    front, base = await _front_answering_ok(Limits(header_timeout=0.3, keepalive_timeout=60))
    try:
        reader, writer = await _connect(base)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head goes on
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        # the header timeout cut it, not the minute-long keep-alive timeout
        assert asyncio.get_running_loop().time() - started < 5.0
        writer.close()
    finally:
        await front.shutdown(1.0)


async def test_an_upgrade_request_is_answered_and_its_connection_closed() -> None:
    """joulegate does not switch protocols: the request is forwarded without its hop-by-hop
    Upgrade, answered, and the connection (whose parser now sees raw bytes) ends."""
    seen: list[str] = []
    async with serve(_upstream_app(seen)) as up, joulegate(up) as (proxy, _):
        answer = await raw_exchange(
            proxy,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
        )
    assert answer.status == 200 and answer.headers["connection"].lower() == b"close"
    assert seen == ["GET /v1/models"]


async def test_a_chunked_body_to_an_own_path_is_bounded_too() -> None:
    async with serve(_upstream_app([])) as up, joulegate(up, max_body_bytes=1000) as (proxy, _):
        chunk = b"x" * 600
        answer = await raw_exchange(
            proxy,
            b"POST /joulegate/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
            + b"0\r\n\r\n",
        )
    assert answer.status == 413 and answer.error()["code"] == "request_too_large"


def test_serve_on_an_address_in_use_says_so_in_one_line_and_never_claims_to_listen(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_joulegate(
            free_port(), port, tmp_path, {"ledger": "off"}, stderr=subprocess.PIPE
        )
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    text = stderr.decode()
    assert f"joulegate: cannot listen on 127.0.0.1:{port}: address already in use" in text
    assert "Traceback" not in text and "listening on" not in text


def test_serve_announces_the_port_it_really_listens_on(tmp_path: Path) -> None:
    """`--listen 127.0.0.1:0` takes a free port; the banner names it, and it answers."""
    process = start_joulegate(free_port(), 0, tmp_path, {"ledger": "off"}, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        first = process.stderr.readline().decode()
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+),", first)
        assert found and int(found[1]) != 0, first
        wait_listening(int(found[1]), process=process)
    finally:
        stop(process)


async def test_a_chunk_that_breaks_mid_body_is_refused_at_once_and_recorded() -> None:
    """The head came, then a broken chunk: 400 now, not after the body timeout."""
    async with (
        serve(_upstream_app([])) as up,
        joulegate(up, client_body_timeout_seconds=30) as (proxy, app),
    ):
        reader, writer = await _connect(proxy)
        try:
            writer.write(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b'Content-Type: application/json\r\n\r\n5\r\n{"a":\r\n'
            )
            await writer.drain()
            await asyncio.sleep(0.2)  # the request is being served, its body half read
            writer.write(b"zz\r\nnot hex\r\n")
            answer = _parse_answer(await asyncio.wait_for(reader.read(), 5))
        finally:
            writer.close()
        await settled(app)
        record = app[RECORDER].store.get(answer.headers["x-request-id"].decode())
    assert answer.status == 400 and answer.error()["code"] == "invalid_http_request"
    assert "chunk" in answer.error()["message"]
    assert record is not None and (record.status, record.code) == ("error", 400)
