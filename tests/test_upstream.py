"""The upstream client against scripted HTTP/1.x servers that send exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from multidict import CIMultiDict

from proxy.upstream import (
    UpstreamClosed,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
)
from tests.servers import closed_port_url

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that runs `script` on every connection; yields its URL and the requests."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads
    finally:
        server.close()
        await server.wait_closed()


def pool(url: str, read_timeout: float = 5.0) -> UpstreamPool:
    return UpstreamPool(url, limit=4, connect_timeout=1.0, read_timeout=read_timeout)


async def _head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_request_bytes_and_a_content_length_answer() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _head(reader)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        seen.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 201 Made It\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello")
        await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url + "/base/")
        response = await upstream.request(
            "POST", "/v1/x?q=%2F", CIMultiDict([("X-Test", "yes")]), b"body!"
        )
        assert (response.status, response.reason) == (201, "Made It")
        assert response.headers.getall("X-A") == ["1", "2"]
        assert await response.read() == b"hello"
        response.release()
        await upstream.close()
    request = seen[0].decode()
    assert request.startswith("POST /base/v1/x?q=%2F HTTP/1.1\r\n")
    assert f"Host: {url.removeprefix('http://')}\r\n" in request
    assert "X-Test: yes\r\n" in request and "Content-Length: 5\r\n" in request
    assert request.endswith("\r\n\r\nbody!")


async def test_keep_alive_reuses_one_connection() -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await _head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        for _ in range(5):
            response = await upstream.request("GET", "/", CIMultiDict(), b"")
            assert await response.read() == b"ok"
            response.release()
        await upstream.close()
    assert connections == 1


async def test_chunked_with_extensions_and_trailers_arrives_piece_by_piece() -> None:
    second = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nfirst\r\n")
        await writer.drain()
        await second.wait()
        writer.write(b"6\r\nsecond\r\n0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()
        await _head(reader)  # the connection stays usable for the next request
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("GET", "/", CIMultiDict(), b"")
        assert response.content_length is None
        pieces = response.iter_chunks()
        assert await anext(pieces) == b"first"  # before the server sends the rest
        second.set()
        assert [piece async for piece in pieces] == [b"second"]
        response.release()
        again = await upstream.request("GET", "/", CIMultiDict(), b"")
        assert again.status == 200 and await again.read() == b""
        again.release()
        await upstream.close()


async def test_interim_answers_are_skipped_and_no_body_statuses_have_none() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
        )
        await writer.drain()
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n")  # a HEAD answer
        await writer.drain()
        await _head(reader)

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("DELETE", "/", CIMultiDict(), b"")
        assert response.status == 204 and await response.read() == b""
        response.release()
        head = await upstream.request("HEAD", "/", CIMultiDict(), b"")
        assert head.content_length == 123 and await head.read() == b""
        head.release()
        await upstream.close()


async def test_body_until_close_and_connection_close() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("GET", "/", CIMultiDict(), b"")
        assert await response.read() == b"until the end"
        response.release()
        assert upstream._idle == []  # not reusable: its end was the connection's end
        await upstream.close()


async def test_a_stale_kept_alive_connection_is_retried_once() -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # then the server closes the idle connection, as upstreams do after a timeout

    async with scripted(script) as (url, _):
        upstream = pool(url)
        for _ in range(2):
            response = await upstream.request("POST", "/", CIMultiDict(), b"x")
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.05)
        await upstream.close()
    assert connections == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 2000 OK\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Le", UpstreamProtocolError),
    ],
)
async def test_garbage_answers_are_protocol_errors(answer: bytes, error: type) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(answer)
        await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        with pytest.raises(error):
            await upstream.request("GET", "/", CIMultiDict(), b"")
        await upstream.close()


async def test_a_short_body_and_a_bad_chunk_are_closed_mid_answer() -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ]
    )

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(next(answers))
        await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        for _ in range(2):
            response = await upstream.request("GET", "/", CIMultiDict(), b"")
            with pytest.raises(UpstreamClosed):
                await response.read()
            response.release()
        await upstream.close()


async def test_refused_and_silent_upstreams() -> None:
    refused = pool(closed_port_url())
    with pytest.raises(UpstreamRefused):
        await refused.request("GET", "/", CIMultiDict(), b"")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with scripted(silent) as (url, _):
        upstream = pool(url, read_timeout=0.1)
        with pytest.raises(UpstreamTimeout):
            await upstream.request("GET", "/", CIMultiDict(), b"")
        await upstream.close()


async def test_the_pool_never_opens_more_than_its_limit() -> None:
    open_now = peak = 0
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while True:
                await _head(reader)
                await release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        finally:
            open_now -= 1

    async with scripted(script) as (url, _):
        upstream = UpstreamPool(url, limit=2, connect_timeout=1.0, read_timeout=5.0)

        async def one() -> None:
            response = await upstream.request("GET", "/", CIMultiDict(), b"")
            await response.read()
            response.release()

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.sleep(0.1)
        release.set()
        await asyncio.gather(*tasks)
        await upstream.close()
    assert peak == 2
