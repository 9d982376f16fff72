"""A lean HTTP/1.1 client for the one upstream a proxy talks to, with a keep-alive pool.

aiohttp's ClientSession is general (cookies, redirects, proxies, auth, decompression) and
costs more CPU per request than the aiohttp server in front of it; in a proxy that cost is
paid on every request. This client does only what forwarding needs: one request written in
one go, the status line and headers parsed, and the body handed over as it arrives
(Content-Length, chunked, or until close), with connections kept alive and reused.
RFC 9112 is the reference for message framing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

_MAX_HEAD_BYTES = 64 * 1024
_READ_BYTES = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class UpstreamError(Exception):
    """The upstream could not be asked or did not answer properly."""


class UpstreamRefused(UpstreamError):
    """No connection could be made (refused, unreachable, DNS)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No connection or no bytes within the configured time."""


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not HTTP/1.x, or closed before answering."""


class UpstreamClosed(UpstreamError):
    """The upstream closed the connection in the middle of the body."""


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def usable(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        self.writer.close()


@dataclass(eq=False)
class UpstreamResponse:
    status: int
    reason: str
    headers: CIMultiDict[str]
    content_length: int | None  # None: chunked or until close
    _connection: _Connection
    _pool: UpstreamPool
    _chunked: bool
    _until_close: bool
    _keep_alive: bool
    _done: bool = False
    _released: bool = field(default=False, repr=False)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, decoded from its framing, as it arrives (never waits to fill a buffer)."""
        if self._done:
            return
        reader = self._connection.reader
        timeout = self._pool.read_timeout
        try:
            if self._chunked:
                async for piece in self._chunks(reader, timeout):
                    yield piece
            elif self._until_close:
                while data := await _timed(reader.read(_READ_BYTES), timeout):
                    yield data
            else:
                remaining = self.content_length or 0
                while remaining > 0:
                    data = await _timed(reader.read(min(remaining, _READ_BYTES)), timeout)
                    if not data:
                        raise UpstreamClosed(f"{remaining} bytes of the body never came")
                    remaining -= len(data)
                    yield data
        except UpstreamError:  # UpstreamTimeout is an OSError (a TimeoutError) too
            raise
        except (OSError, asyncio.IncompleteReadError) as error:  # closed, reset, unreachable
            raise UpstreamClosed(str(error) or type(error).__name__) from None
        except asyncio.LimitOverrunError:
            raise UpstreamClosed("a chunk-size or trailer line longer than 64 KiB") from None
        self._done = True

    async def _chunks(self, reader: asyncio.StreamReader, timeout: float) -> AsyncIterator[bytes]:
        while True:
            line = await _timed(reader.readuntil(b"\r\n"), timeout)
            size_text = line.split(b";", 1)[0].strip()
            # RFC 9112: hex digits only. int(text, 16) also takes a sign, 0x and underscores:
            # read more leniently than the upstream meant, a body's end is misplaced and its
            # rest read as the next answer on the kept-alive connection.
            if not 0 < len(size_text) <= 16 or size_text.translate(None, _HEX_DIGITS):
                raise UpstreamClosed(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while await _timed(reader.readuntil(b"\r\n"), timeout) != b"\r\n":
                    pass  # trailers: not forwarded
                return
            while size > 0:
                data = await _timed(reader.read(min(size, _READ_BYTES)), timeout)
                if not data:
                    raise UpstreamClosed("the connection closed inside a chunk")
                size -= len(data)
                yield data
            if await _timed(reader.readexactly(2), timeout) != b"\r\n":
                raise UpstreamClosed("a chunk did not end with CRLF")

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_chunks()])

    def release(self) -> None:
        """Back to the pool when the body was read whole and the connection may be kept."""
        if self._released:
            return
        self._released = True
        if self._done and self._keep_alive and self._connection.usable():
            self._pool._put(self._connection)
        else:
            self._pool._discard(self._connection)


async def _timed(awaitable: Awaitable[Any], timeout: float) -> Any:
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise UpstreamTimeout(f"no bytes from the upstream within {timeout:g} s") from None


class UpstreamPool:
    """Keep-alive connections to one `http://` or `https://` base URL, at most `limit` open."""

    def __init__(
        self, base_url: str, *, limit: int, connect_timeout: float, read_timeout: float
    ) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self.tls else None
        self._closed = False

    async def request(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> UpstreamResponse:
        """Send one request; the caller must `release()` the response (also on errors)."""
        head = self._head(method, target, headers, body)
        await self._slots.acquire()
        try:
            return await self._exchange(method, head, body)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, method: str, head: bytes, body: bytes) -> UpstreamResponse:
        for _ in range(2):
            connection = await self._get()
            try:
                connection.writer.write(head + body if len(body) < _READ_BYTES else head)
                if len(body) >= _READ_BYTES:
                    connection.writer.write(body)
                    await self._drain(connection)
                return await self._response(method, connection)
            except _StaleConnection:
                connection.close()  # a kept-alive connection the upstream had closed: retry
                continue
            except BaseException:
                connection.close()
                raise
        raise UpstreamProtocolError("the upstream closed the connection before answering")

    async def _drain(self, connection: _Connection) -> None:
        """Wait until a large body is handed to the kernel; an upstream that closed or reset
        the connection meanwhile shows here, before any answer is read."""
        try:
            await _timed(connection.writer.drain(), self.read_timeout)
        except UpstreamError:
            raise
        except OSError as error:
            if connection.reused:
                raise _StaleConnection from None
            raise UpstreamProtocolError(
                f"the upstream closed the connection while the request was sent: {error}"
            ) from None

    def _head(self, method: str, target: str, headers: CIMultiDict[str], body: bytes) -> bytes:
        lines = [f"{method} {self.base_path}{target} HTTP/1.1", f"Host: {self.host_header}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: the inverse
        # gives the upstream the very bytes the client sent, valid UTF-8 or not.
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    async def _get(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                    limit=_MAX_HEAD_BYTES,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"no connection to the upstream within {self.connect_timeout:g} s"
            ) from None
        except OSError as error:
            raise UpstreamRefused(error.strerror or str(error)) from None
        return _Connection(reader, writer)

    async def _response(self, method: str, connection: _Connection) -> UpstreamResponse:
        while True:
            try:
                head = await _timed(connection.reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except asyncio.IncompleteReadError as error:
                if connection.reused and not error.partial:
                    raise _StaleConnection from None
                raise UpstreamProtocolError("the upstream closed before answering") from None
            except asyncio.LimitOverrunError:
                raise UpstreamProtocolError("the upstream's headers are too large") from None
            except UpstreamError:  # a timeout: UpstreamTimeout is an OSError too
                raise
            except OSError as error:  # reset, unreachable
                if connection.reused:
                    raise _StaleConnection from None
                raise UpstreamProtocolError(str(error)) from None
            status, reason, version, headers = _parse_head(head)
            if 100 <= status < 200 and status != 101:
                continue  # interim answers (100 Continue, 103 Early Hints): the real one follows
            break
        connection_tokens = {
            token.strip().lower()
            for value in headers.getall("Connection", [])
            for token in value.split(",")
        }
        keep_alive = (
            "keep-alive" in connection_tokens
            if version == "HTTP/1.0"
            else "close" not in connection_tokens
        )
        transfer = headers.get("Transfer-Encoding", "").lower()
        chunked = transfer.rsplit(",", 1)[-1].strip() == "chunked"
        length: int | None = None
        no_body = method == "HEAD" or status in _NO_BODY_STATUSES or status == 101
        # RFC 9112 section 6.3: a Transfer-Encoding overrides any Content-Length (a body that
        # is not chunked last then runs until close); differing lengths or one that is not
        # plain digits ("+5", "1_0", " 5 5") mean the message's end is in doubt.
        if not transfer and "Content-Length" in headers:
            lengths = headers.getall("Content-Length")
            text = lengths[0]
            if not (text.isascii() and text.isdigit()):
                raise UpstreamProtocolError(f"an invalid Content-Length {text[:20]!r}")
            if len(lengths) > 1 and any(other != text for other in lengths):
                raise UpstreamProtocolError("differing Content-Length headers")
            length = int(text)
        until_close = not no_body and not chunked and length is None
        response = UpstreamResponse(
            status=status,
            reason=reason,
            headers=headers,
            content_length=0 if no_body else length,
            _connection=connection,
            _pool=self,
            _chunked=chunked and not no_body,
            _until_close=until_close,
            _keep_alive=keep_alive and not until_close,
        )
        if no_body:
            response._done = True
            if length is not None:
                response.content_length = length  # HEAD: the length the GET would have
        return response

    def _put(self, connection: _Connection) -> None:
        self._slots.release()
        if self._closed:
            connection.close()
        else:
            self._idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        self._slots.release()
        connection.close()

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection was found closed before any answer: safe to send again."""


def _parse_head(head: bytes) -> tuple[int, str, str, CIMultiDict[str]]:
    # aiohttp writes the client's headers as UTF-8: UTF-8 values from the upstream reach the
    # client byte for byte (latin-1 here would double-encode them); bytes that are not UTF-8
    # cannot, and become U+FFFD rather than text aiohttp's writer would refuse.
    lines = head[:-4].decode("utf-8", "replace").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise UpstreamProtocolError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[:1] in (" ", "\t"):
            raise UpstreamProtocolError(f"a malformed header line: {line[:60]!r}")
        headers.add(name, value.strip())
    return int(code), reason, version, headers
