"""A lean HTTP/1.1 client for the one upstream a proxy talks to, with a keep-alive pool.

aiohttp's ClientSession is general (cookies, redirects, proxies, auth, decompression) and
costs more CPU per request than the aiohttp server in front of it; in a proxy that cost is
paid on every request. This client does only what forwarding needs: one request written in
one go, the status line and headers parsed, and the body handed over as it arrives
(Content-Length, chunked, or until close), with connections kept alive and reused.
RFC 9112 is the reference for message framing.

A connection is a small `asyncio.Protocol` (a bytearray and one waiter), not asyncio's
streams: a small answer usually arrives whole in one segment, and then its head and body are
taken from the buffer without awaiting anything. With streams every read was a coroutine under
its own `asyncio.timeout` (a timer armed and cancelled, a task looked up), which cost about as
much CPU as parsing the answer. Here the read timeout is one timer per connection, armed when
a read first has to wait and moved on lazily when it fires (see `_Connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

_MAX_HEAD_BYTES = 64 * 1024
_READ_BYTES = 64 * 1024
# Past this many received bytes not yet taken, the socket is no longer read (as asyncio's
# StreamReader does at twice its limit): a slow client cannot make a fast upstream's answer
# pile up in memory.
_PAUSE_READING_BYTES = 2 * _READ_BYTES
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


class _Connection(asyncio.Protocol):
    """One connection to the upstream: what it sent so far, and at most one reader waiting.

    Reads take from `buffer` and only wait when it lacks what they need. The read timeout
    (no bytes for `read_timeout` seconds while waiting) costs no timer per read: the first wait
    arms one timer per connection; when it fires it fails the waiting read if that read has
    waited the whole time, else moves itself to that read's deadline, and lapses when no read
    waits. A busy connection so pays one timer per `read_timeout`, not one per read.
    """

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.buffer = bytearray()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.reused = False
        self.eof = False  # the upstream sends nothing more (it closed, or the connection is lost)
        self.error: OSError | None = None  # why the connection was lost, when not a clean close
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[bool] | None = None  # its result: True when it timed out
        self._waiting_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._lost = False
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)
        if len(self.buffer) > _PAUSE_READING_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # nothing more is written after the upstream's end: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._lost = True
        if exc is not None:
            self.error = exc if isinstance(exc, OSError) else ConnectionError(str(exc))
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("Connection lost"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # the pool's side

    def usable(self) -> bool:
        """Kept-alive and idle: not closed by either side, and nothing unasked-for received."""
        return not (self.eof or self.buffer or self.transport.is_closing())

    def close(self) -> None:
        self.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        """Until the kernel took what was written; OSError when the connection went meanwhile."""
        if self.error is not None:
            raise self.error
        if self.transport.is_closing():
            await asyncio.sleep(0)  # a failed send reports the loss on the next loop turn
        if self._lost:
            raise self.error or ConnectionResetError("Connection lost")
        if self._writing_paused:
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    # reads, as asyncio.StreamReader's: IncompleteReadError, LimitOverrunError, OSError

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    async def _more(self) -> None:
        """Until bytes beyond the buffered ones arrive; errors when none can."""
        if self.error is not None:
            raise self.error
        if self.eof:
            raise asyncio.IncompleteReadError(bytes(self.buffer), None)
        if self._reading_paused:  # waiting for more means everything buffered is wanted
            self._reading_paused = False
            self.transport.resume_reading()
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        self._waiting_since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._waiting_since + self.read_timeout, self._check_timeout)
        try:
            timed_out = await waiter
        finally:
            self._waiter = None
        if timed_out:
            raise UpstreamTimeout(f"no bytes from the upstream within {self.read_timeout:g} s")

    def _check_timeout(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms the timer again
        deadline = self._waiting_since + self.read_timeout
        # The loop runs a timer up to one clock resolution early: count that as on time.
        if self._loop.time() + 0.001 >= deadline:
            waiter.set_result(True)
        else:
            self._timer = self._loop.call_at(deadline, self._check_timeout)

    def take(self, size: int) -> bytes:
        """Up to `size` buffered bytes, removed from the buffer."""
        buffer = self.buffer
        if len(buffer) <= size:
            data = bytes(buffer)
            buffer.clear()
        else:
            with memoryview(buffer) as view:  # one copy, not a slice's and then its bytes'
                data = bytes(view[:size])
            del buffer[:size]
        if self._reading_paused and len(buffer) <= _READ_BYTES:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def read_until(self, separator: bytes) -> bytearray:
        """The bytes before `separator` (which is consumed too), at most 64 KiB of them."""
        buffer = self.buffer
        start = 0
        while True:
            end = buffer.find(separator, start)
            if end >= 0:
                if end > _MAX_HEAD_BYTES:
                    raise asyncio.LimitOverrunError("separator beyond the limit", end)
                found = buffer[:end]
                del buffer[: end + len(separator)]
                if self._reading_paused and len(buffer) <= _READ_BYTES:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return found
            if len(buffer) > _MAX_HEAD_BYTES:
                raise asyncio.LimitOverrunError("no separator within the limit", len(buffer))
            start = max(0, len(buffer) - len(separator) + 1)
            await self._more()

    async def read_some(self, size: int) -> bytes:
        """What is buffered (or, when nothing is, what arrives next), up to `size` bytes;
        b"" at a clean end."""
        while not self.buffer:
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            await self._more()
        return self.take(size)

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._more()
        return self.take(size)


@dataclass(eq=False, slots=True)
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
        connection = self._connection
        try:
            if self._chunked:
                async for piece in self._chunks(connection):
                    yield piece
            elif self._until_close:
                while data := await connection.read_some(_READ_BYTES):
                    yield data
            else:
                remaining = self.content_length or 0
                while remaining > 0:
                    data = await connection.read_some(min(remaining, _READ_BYTES))
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

    @staticmethod
    async def _chunks(connection: _Connection) -> AsyncIterator[bytes]:
        while True:
            line = await connection.read_until(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            # RFC 9112: hex digits only. int(text, 16) also takes a sign, 0x and underscores:
            # read more leniently than the upstream meant, a body's end is misplaced and its
            # rest read as the next answer on the kept-alive connection.
            if not 0 < len(size_text) <= 16 or size_text.translate(None, _HEX_DIGITS):
                raise UpstreamClosed(f"bad chunk size {bytes(size_text[:20])!r}")
            size = int(size_text, 16)
            if size == 0:
                while await connection.read_until(b"\r\n"):
                    pass  # trailers: not forwarded
                return
            while size > 0:
                data = await connection.read_some(min(size, _READ_BYTES))
                if not data:
                    raise UpstreamClosed("the connection closed inside a chunk")
                size -= len(data)
                yield data
            if await connection.read_exactly(2) != b"\r\n":
                raise UpstreamClosed("a chunk did not end with CRLF")

    async def read(self) -> bytes:
        """The whole body. One of known length that already arrived (the usual small answer,
        in the same segment as its head) is taken from the buffer at once."""
        length = self.content_length
        if (
            not self._done
            and not self._chunked
            and not self._until_close
            and length is not None
            and len(self._connection.buffer) >= length
        ):
            self._done = True
            return self._connection.take(length)
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


class _Slots:
    """A limit on connections in use: asyncio.Semaphore, except that a free slot is taken by
    a plain call (`take_now`), with no coroutine to make and run. Waiters are served first
    come, first served; a slot handed to a waiter that is cancelled meanwhile is passed on."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as it was cancelled: the next one has it
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)  # still queued: cancelled while waiting

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it directly
                return
        self._free += 1


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
        self._slots = _Slots(limit)
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self.tls else None
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send one request; the caller must `release()` the response (also on errors)."""
        head = self._head(method, target, headers, body)
        if not self._slots.take_now():
            await self._slots.take()
        try:
            return await self._exchange(method, head, body)
        except BaseException:
            self._slots.give()
            raise

    async def _exchange(self, method: str, head: bytes, body: bytes) -> UpstreamResponse:
        for _ in range(2):
            connection = self._idle_connection() or await self._connect()
            try:
                if len(body) < _READ_BYTES:
                    connection.write(head + body)
                else:
                    connection.write(head)
                    connection.write(body)
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
            await _timed(connection.drain(), self.read_timeout)
        except UpstreamError:
            raise
        except OSError as error:
            if connection.reused:
                raise _StaleConnection from None
            raise UpstreamProtocolError(
                f"the upstream closed the connection while the request was sent: {error}"
            ) from None

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        # One join of the pieces: measured about half the CPU of formatting each line first.
        host = self.host_header
        pieces = [method, " ", self.base_path, target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
        for name, value in headers:
            pieces += (name, ": ", value, "\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            pieces += ("Content-Length: ", str(len(body)), "\r\n")
        pieces.append("\r\n")
        # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: the inverse
        # gives the upstream the very bytes the client sent, valid UTF-8 or not.
        return "".join(pieces).encode("utf-8", "surrogateescape")

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        read_timeout = self.read_timeout
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(read_timeout),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"no connection to the upstream within {self.connect_timeout:g} s"
            ) from None
        except OSError as error:
            raise UpstreamRefused(error.strerror or str(error)) from None
        return connection

    async def _response(self, method: str, connection: _Connection) -> UpstreamResponse:
        while True:
            try:
                head = await connection.read_until(b"\r\n\r\n")
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
        keep_alive = version == "HTTP/1.1"
        if "Connection" in headers:
            connection_tokens = {
                token.strip().lower()
                for value in headers.getall("Connection")
                for token in value.split(",")
            }
            keep_alive = (
                "keep-alive" in connection_tokens
                if version == "HTTP/1.0"
                else "close" not in connection_tokens
            )
        transfer = headers.get("Transfer-Encoding", "")
        chunked = bool(transfer) and transfer.rsplit(",", 1)[-1].strip().lower() == "chunked"
        length: int | None = None
        no_body = method == "HEAD" or status in _NO_BODY_STATUSES or status == 101
        # RFC 9112 section 6.3: a Transfer-Encoding overrides any Content-Length (a body that
        # is not chunked last then runs until close); differing lengths or one that is not
        # plain digits ("+5", "1_0", " 5 5") mean the message's end is in doubt.
        if not transfer and (lengths := headers.getall("Content-Length", None)):
            text = lengths[0]
            if not (text.isascii() and text.isdigit()):
                raise UpstreamProtocolError(f"an invalid Content-Length {text[:20]!r}")
            if len(lengths) > 1 and any(other != text for other in lengths):
                raise UpstreamProtocolError("differing Content-Length headers")
            length = int(text)
        until_close = not no_body and not chunked and length is None
        if no_body and length is None:
            length = 0  # (HEAD keeps the length the GET would have)
        return UpstreamResponse(
            status=status,
            reason=reason,
            headers=headers,
            content_length=length,
            _connection=connection,
            _pool=self,
            _chunked=chunked and not no_body,
            _until_close=until_close,
            _keep_alive=keep_alive and not until_close,
            _done=no_body,
        )

    def _put(self, connection: _Connection) -> None:
        self._slots.give()
        if self._closed:
            connection.close()
        else:
            self._idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        self._slots.give()
        connection.close()

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection was found closed before any answer: safe to send again."""


def _parse_head(head: bytes | bytearray) -> tuple[int, str, str, CIMultiDict[str]]:
    # aiohttp writes the client's headers as UTF-8: UTF-8 values from the upstream reach the
    # client byte for byte (latin-1 here would double-encode them); bytes that are not UTF-8
    # cannot, and become U+FFFD rather than text aiohttp's writer would refuse.
    lines = head.decode("utf-8", "replace").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise UpstreamProtocolError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    add = headers.add
    for index in range(1, len(lines)):
        name, colon, value = lines[index].partition(":")
        # A name with space around it, also a folded line's (obs-fold: one that starts with
        # a space or a tab), is refused: RFC 9112 sections 5.1 and 5.2.
        if not colon or not name or name != name.strip():
            raise UpstreamProtocolError(f"a malformed header line: {lines[index][:60]!r}")
        add(name, value.strip())
    return int(code), reason, version, headers
