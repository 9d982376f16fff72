"""The upstream client against scripted HTTP/1.x servers that send exact bytes."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.upstream import (
    UpstreamClosed,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    _Slots,
)
from tests.servers import closed_port_url

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def scripted(
    script: Script, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that runs `script` on every connection; yields its URL and the requests."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", heads
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
        response = await upstream.request("POST", "/v1/x?q=%2F", [("X-Test", "yes")], b"body!")
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


async def test_request_heads_exactly_as_sent() -> None:
    """A GET carries no Content-Length, a POST with no body says 0, and a header value that
    was not UTF-8 (kept as surrogate escapes) reaches the upstream as its original bytes."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _head(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        raw = b"caf\xe9".decode("utf-8", "surrogateescape")
        for method in ("GET", "POST"):
            response = await upstream.request(method, "/p?q=1", [("X-Raw", raw)], b"")
            await response.read()
            response.release()
        await upstream.close()
    host = url.removeprefix("http://")
    assert seen == [
        f"GET /p?q=1 HTTP/1.1\r\nHost: {host}\r\nX-Raw: caf".encode() + b"\xe9\r\n\r\n",
        f"POST /p?q=1 HTTP/1.1\r\nHost: {host}\r\nX-Raw: caf".encode()
        + b"\xe9\r\nContent-Length: 0\r\n\r\n",
    ]


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
            response = await upstream.request("GET", "/", [], b"")
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
        response = await upstream.request("GET", "/", [], b"")
        assert response.content_length is None
        pieces = response.iter_chunks()
        assert await anext(pieces) == b"first"  # before the server sends the rest
        second.set()
        assert [piece async for piece in pieces] == [b"second"]
        response.release()
        again = await upstream.request("GET", "/", [], b"")
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
        response = await upstream.request("DELETE", "/", [], b"")
        assert response.status == 204 and await response.read() == b""
        response.release()
        head = await upstream.request("HEAD", "/", [], b"")
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
        response = await upstream.request("GET", "/", [], b"")
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
            response = await upstream.request("POST", "/", [], b"x")
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.05)
        await upstream.close()
    assert connections == 2


@pytest.mark.parametrize("body", [b"x", b"x" * (1024 * 1024)], ids=["small", "1MiB"])
async def test_a_kept_alive_connection_closed_as_the_request_arrives_is_retried(
    body: bytes,
) -> None:
    """The upstream closes an idle connection just as the next request reaches it (no answer
    at all, or a reset while a large body is still being sent): sent again on a new one."""
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await _head(reader)
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Connection: %d\r\n\r\nok" % connections
        )
        await writer.drain()
        await _head(reader)  # the next request: closed on, unanswered

    async with scripted(script) as (url, _):
        upstream = pool(url)
        seen = []
        for _ in range(2):
            response = await upstream.request("POST", "/", [], body)
            assert await response.read() == b"ok"
            seen.append(response.headers["X-Connection"])
            response.release()
        await upstream.close()
    assert seen == ["1", "2"]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 2000 OK\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Le", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello", UpstreamProtocolError),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            UpstreamProtocolError,
        ),
        (b"HTTP/1.1 200 OK\r\nX: 1\r\n folded: 2\r\n\r\n", UpstreamProtocolError),
        (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", UpstreamProtocolError),
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
            await upstream.request("GET", "/", [], b"")
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
            response = await upstream.request("GET", "/", [], b"")
            with pytest.raises(UpstreamClosed):
                await response.read()
            response.release()
        await upstream.close()


async def test_refused_and_silent_upstreams() -> None:
    refused = pool(closed_port_url())
    with pytest.raises(UpstreamRefused):
        await refused.request("GET", "/", [], b"")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with scripted(silent) as (url, _):
        upstream = pool(url, read_timeout=0.1)
        with pytest.raises(UpstreamTimeout):
            await upstream.request("GET", "/", [], b"")
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
            response = await upstream.request("GET", "/", [], b"")
            await response.read()
            response.release()

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.sleep(0.1)
        release.set()
        await asyncio.gather(*tasks)
        await upstream.close()
    assert peak == 2


@pytest.mark.parametrize("size", [b"+5", b"-5", b"0x5", b"5_0", b"", b" ", b"12345678901234567"])
async def test_a_chunk_size_that_is_not_plain_hex_ends_the_answer(size: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n")
        writer.write(b"hello\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("GET", "/", [], b"")
        with pytest.raises(UpstreamClosed, match="bad chunk size"):
            await response.read()
        response.release()
        assert upstream._idle == []
        await upstream.close()


async def test_answers_split_at_every_byte_are_framed_the_same() -> None:
    """Heads, lengths and chunk lines arrive in pieces in real traffic: a separator cut in two
    (\\r | \\n\\r\\n) must still be found, and a body of known length that came after its head
    read whole."""
    answers = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    )

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        for index in range(len(answers)):
            writer.write(answers[index : index + 1])
            await writer.drain()
            await asyncio.sleep(0.002)
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        first = await upstream.request("GET", "/", [], b"")
        assert first.content_length == 5 and await first.read() == b"hello"
        first.release()
        # the second answer was already on its way: the same connection carries it
        connection = upstream._idle[0]
        second = await upstream._response("GET", connection)
        assert await second.read() == b"abcde"
        second.release()
        await upstream.close()


async def test_bytes_left_after_an_answer_keep_its_connection_out_of_the_pool() -> None:
    """An upstream that sends more than the answer it framed would have that rest read as the
    answer to the next request: its connection is not reused."""
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _head(reader)
        extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale" if connections == 1 else b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
        await writer.drain()
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        bodies = []
        for _ in range(2):
            response = await upstream.request("GET", "/", [], b"")
            bodies.append(await response.read())
            response.release()
        await upstream.close()
    assert bodies == [b"ok", b"ok"]
    assert connections == 2


async def test_a_large_request_body_arrives_whole() -> None:
    received: list[bytes] = []
    body = bytes(range(256)) * 4096  # 1 MiB: sent in its own write, then drained

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _head(reader)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        received.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("POST", "/", [], body)
        assert await response.read() == b"ok"
        response.release()
        await upstream.close()
    assert received == [body]


async def test_a_slow_reader_stops_the_upstream_rather_than_buffering_its_answer() -> None:
    body = bytes(range(256)) * 16384  # 4 MiB

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("GET", "/", [], b"")
        pieces = response.iter_chunks()
        received = [await anext(pieces)]
        await asyncio.sleep(0.3)  # the upstream could send all 4 MiB meanwhile
        assert len(response._connection.buffer) < 512 * 1024
        received += [piece async for piece in pieces]
        assert b"".join(received) == body
        response.release()
        await upstream.close()


async def test_a_stalled_answer_times_out_mid_body_and_its_connection_is_dropped() -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _head(reader)
        if connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
            await writer.drain()
            await reader.read()  # silent until the client gives up
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url, read_timeout=0.2)
        response = await upstream.request("GET", "/", [], b"")
        with pytest.raises(UpstreamTimeout):
            await response.read()
        response.release()
        again = await upstream.request("GET", "/", [], b"")
        assert await again.read() == b"ok"
        again.release()
        await upstream.close()
    assert connections == 2


async def test_bytes_that_keep_coming_keep_a_slow_answer_alive() -> None:
    """The read timeout is silence, not the answer's whole duration: pieces 0.1 s apart for
    0.8 s are read whole under a 0.5 s read timeout."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        pieces = [
            b"HTTP/1.1 200 OK\r\n",
            b"Content-Length: 6\r\n\r\n",
            *(b"%d" % i for i in range(6)),
        ]
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.1)
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url, read_timeout=0.5)
        response = await upstream.request("GET", "/", [], b"")
        assert await response.read() == b"012345"
        response.release()
        await upstream.close()


@pytest.mark.parametrize("second_answer_after", [0.3, None])
async def test_a_timer_armed_by_an_earlier_request_moves_to_a_later_waits_deadline(
    second_answer_after: float | None,
) -> None:
    """One timer serves all reads of a connection. The first request arms it (due at 0.5 s);
    it fires 0.2 s into the second request's wait, and must neither fail that wait (answered
    after 0.3 s) nor lapse (a silent upstream must still time out, 0.5 s into the wait)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await _head(reader)
        if second_answer_after is None:
            await reader.read()  # silent until the client gives up
            return
        await asyncio.sleep(second_answer_after)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url, read_timeout=0.5)
        first = await upstream.request("GET", "/", [], b"")  # arms the timer
        assert await first.read() == b"ok"
        first.release()
        await asyncio.sleep(0.3)
        async with asyncio.timeout(3):  # a timer that lapsed would wait forever
            if second_answer_after is None:
                with pytest.raises(UpstreamTimeout):
                    await upstream.request("GET", "/", [], b"")
            else:
                second = await upstream.request("GET", "/", [], b"")
                assert await second.read() == b"ok"
                second.release()
        await upstream.close()


async def test_a_reset_mid_body_is_closed_and_a_reset_idle_connection_is_replaced() -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _head(reader)
        if connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        # SO_LINGER 0: the close sends RST, not FIN
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("GET", "/", [], b"")
        with pytest.raises(UpstreamClosed):
            await response.read()
        response.release()
        for _ in range(2):  # the second finds the first's connection reset: a new one
            response = await upstream.request("GET", "/", [], b"")
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.1)
        await upstream.close()
    assert connections == 3


async def test_a_304_has_no_body_whatever_its_length_says_and_keeps_its_connection() -> None:
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _head(reader)
        writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with scripted(script) as (url, _):
        upstream = pool(url)
        response = await upstream.request("GET", "/", [], b"")
        assert response.status == 304 and await response.read() == b""
        response.release()
        again = await upstream.request("GET", "/", [], b"")
        assert await again.read() == b"ok"
        again.release()
        await upstream.close()
    assert connections == 1


# A self-signed certificate for 127.0.0.1 and localhost, valid from 2000 to 2100 so that no
# machine's clock finds it not yet or no longer valid; made once, for these tests only, with
# `openssl ca -selfsign -startdate 20000101000000Z -enddate 21000101000000Z`.
TEST_CERTIFICATE = """\
-----BEGIN CERTIFICATE-----
MIIBgzCCASmgAwIBAgIBATAKBggqhkjOPQQDAjAiMSAwHgYDVQQDDBdqb3VsZWdh
dGUgdGVzdCB1cHN0cmVhbTAgFw0wMDAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAw
MFowIjEgMB4GA1UEAwwXam91bGVnYXRlIHRlc3QgdXBzdHJlYW0wWTATBgcqhkjO
PQIBBggqhkjOPQMBBwNCAAT6OfxwWEqmaJfjM8eGIpyGS4cu+9oW/X1KJSVkcnRu
Ozue6PLcBtoJmhmcwdjaKfuL/6jjiipFTMMm7o0wkU81o04wTDAPBgNVHRMBAf8E
BTADAQH/MBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9zdDAdBgNVHQ4EFgQUHqWh
g43cYG7SQVgxVlQVH21BWZIwCgYIKoZIzj0EAwIDSAAwRQIgcKG5OOIMYtZQOWCF
/dKYlk2tSAzihJs80IbV9iIqs6sCIQCEC52RfcT2MBAtyBdDA4z4xC8qKUaFO+Z8
dg7gpL7ZHw==
-----END CERTIFICATE-----
"""
TEST_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNTQlKb9N3QuHY30d
4TWObu4gbMvXSjdi9REkKm0gTpahRANCAAT6OfxwWEqmaJfjM8eGIpyGS4cu+9oW
/X1KJSVkcnRuOzue6PLcBtoJmhmcwdjaKfuL/6jjiipFTMMm7o0wkU81
-----END PRIVATE KEY-----
"""


async def test_https_upstream_verified_against_the_trust_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https is verified against the system's trust store (SSL_CERT_FILE names a private CA);
    an untrusted certificate is no connection. Over TLS a kept-alive connection the upstream
    closed is replaced too, and chunked bodies read as over plain TCP."""
    certificate = tmp_path / "upstream.pem"
    certificate.write_text(TEST_CERTIFICATE)
    key = tmp_path / "upstream.key"
    key.write_text(TEST_KEY)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certificate, key)
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):  # then the upstream closes the kept-alive connection
            await _head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"6\r\nsecure\r\n0\r\n\r\n")
            await writer.drain()

    async with scripted(script, server_context) as (url, _):
        assert url.startswith("https://")
        untrusted = pool(url)
        with pytest.raises(UpstreamRefused):
            await untrusted.request("GET", "/", [], b"")
        await untrusted.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
        upstream = pool(url)
        for _ in range(4):
            response = await upstream.request("GET", "/", [], b"")
            assert await response.read() == b"secure"
            response.release()
        await upstream.close()
    assert connections == 2


async def test_a_slot_handed_to_a_cancelled_waiter_goes_to_the_next() -> None:
    slots = _Slots(1)
    assert slots.take_now()
    first = asyncio.ensure_future(slots.take())
    second = asyncio.ensure_future(slots.take())
    queued = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    queued.cancel()  # cancelled while waiting: it never holds a slot
    await asyncio.sleep(0)
    slots.give()  # handed to the first waiter...
    first.cancel()  # ...cancelled before it could run: the slot must not be lost
    await asyncio.sleep(0)
    assert first.cancelled() and queued.cancelled()
    await asyncio.wait_for(second, 1)
    assert not slots.take_now()  # the second holds the only slot
    slots.give()
    assert slots.take_now()
    assert not slots.take_now()
