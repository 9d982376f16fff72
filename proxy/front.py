"""The client side of the proxy: HTTP/1.1 connections, parsed by aiohttp's C parser and
answered without a web framework.

Why not aiohttp's web server for the proxied API: its request and response objects, router
and per-request bookkeeping cost more CPU per request than everything joulegate itself does
(measured on 2 cores: a trivial aiohttp handler 118 µs a request, the whole proxy path through
it about 750 µs), and a proxy pays that on every request. Here a connection is an
`asyncio.Protocol` feeding aiohttp's own HTTP parser (so limits, chunked bodies and parse
errors behave as aiohttp's do), each request is one task, and an answer is written as bytes.
(`HttpRequestParser` and `BaseProtocol` are aiohttp's building blocks rather than its public
web API, hence the `aiohttp>=3.14,<4` pin; tests/test_front.py and the proxy tests hold them
to what joulegate needs.)

joulegate's own endpoints (`/metrics`, `/joulegate/...`) stay an aiohttp application: the
front passes those requests, bytes as sent, to it over an internal Unix socket and relays its
answer, after which the client connection closes (a scrape every few seconds does not notice).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from proxy import __version__
from proxy.errors import error_body

log = logging.getLogger("joulegate")

# aiohttp's limit on the request target (path and query), kept: OpenAI-style APIs put
# everything in the body, and nginx's default buffer for the request line is 8 KiB too.
MAX_REQUEST_LINE_BYTES = 8190
# How long an idle kept-alive connection stays open: aiohttp's `web.run_app` default, longer
# than the 60 s idle timeout of common load balancers in front, so they close first.
KEEPALIVE_TIMEOUT_SECONDS = 75.0
# Paths joulegate answers itself (through its aiohttp application); everything else is
# forwarded.
METRICS_PATH = "/metrics"
OWN_PREFIX = "/joulegate/"
SERVER = f"joulegate/{__version__}"
_READ_BUFFER = 2**16
# aiohttp's text for the header-count limit, the same in its C and Python parsers.
_TOO_MANY_HEADERS = "Too many headers received"
_NO_BODY_STATUSES = frozenset({204, 304})
# Pipelined requests parsed ahead of the one being answered; past this, reading pauses.
_MAX_QUEUED_REQUESTS = 16


class InvalidBody(Exception):
    """A request body whose framing broke off (a bad chunk): its message says how, for the
    client."""


class BodyRefused(Exception):
    """Why a request body was not read whole: the answer to give, and the record's reason."""

    def __init__(self, status: int, message: str, code: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.reason = reason


def received_body(request: ClientRequest, limit: int) -> bytes | None:
    """The whole request body when it all came with the head (the usual small request) and
    is within `limit`: taken at once, with no coroutine to run. None when `read_body` must
    wait for it, answer `Expect: 100-continue`, or refuse it."""
    content = request.body
    if not content.is_eof() or content.exception() is not None:
        return None
    if (request.content_length or 0) > limit or content.total_bytes > limit:
        return None
    if "Expect" in request.headers:
        return None
    return content.read_nowait()


async def read_body(request: ClientRequest, limit: int, timeout: float) -> bytes:
    """The whole request body; `BodyRefused` when it is larger than `limit` bytes, its
    framing broke (a bad chunk), or the client paused longer than `timeout` seconds between
    two reads (nginx's client_body_timeout). Bytes already received are taken without a
    timer: only a read that has to wait arms one, so a body that came with its head costs
    nothing more. A client waiting for `100 Continue` gets it first."""
    if (request.content_length or 0) > limit:
        raise _too_large(limit)
    content = request.body
    if content.is_eof() and not content.total_bytes:
        return b""  # no body at all (GET): nothing to wait for
    if request.headers.get("Expect", "").lower() == "100-continue":
        request.connection.send_continue()
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = content.read_nowait()
            if not chunk:
                if content.at_eof():
                    break
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
                if not chunk:
                    break
            size += len(chunk)
            if size > limit:  # a chunked body has no length to check up front
                raise _too_large(limit)
            chunks.append(chunk)
            if content.at_eof():
                break
    except TimeoutError:
        message = f"The request body stopped arriving: nothing came for {timeout:g} s."
        raise BodyRefused(408, message, "client_body_timeout", "client body timeout") from None
    except InvalidBody as error:
        raise BodyRefused(400, str(error), "invalid_http_request", "invalid request body") from None
    return b"".join(chunks)


def _too_large(limit: int) -> BodyRefused:
    message = f"Request body is larger than the limit of {limit} bytes."
    return BodyRefused(413, message, "request_too_large", "request body too large")


class ListenError(Exception):
    """The address to serve on cannot be had."""


@dataclass(frozen=True)
class Limits:
    """What a client's request head may be, and how long it may take."""

    max_line_size: int = MAX_REQUEST_LINE_BYTES
    max_field_size: int = 16 * 1024
    max_headers: int = 128
    header_timeout: float = 60.0
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_SECONDS


class ClientRequest:
    """One request as a client sent it: what forwarding reads of it, and its answer's writer."""

    __slots__ = ("body", "connection", "headers", "message", "method", "target", "version")

    def __init__(
        self, message: RawRequestMessage, body: StreamReader, connection: ClientConnection
    ) -> None:
        self.message = message
        self.body = body  # aiohttp's StreamReader: read_nowait, readany, at_eof
        self.connection = connection
        self.method: str = message.method
        self.headers: CIMultiDictProxy[str] = message.headers
        self.target: str = message.path  # path and query, as sent
        self.version = message.version

    @property
    def path(self) -> str:
        """The path, percent-decoded (what routes match)."""
        return self.message.url.path

    @property
    def raw_path(self) -> str:
        """The path without the query, as sent (percent-encoded, so always ASCII)."""
        return self.message.url.raw_path

    @property
    def content_length(self) -> int | None:
        text = self.headers.get("Content-Length")
        return int(text) if text is not None and text.isdigit() else None

    @property
    def remote(self) -> str:
        return self.connection.peer

    @property
    def host(self) -> str:
        return self.headers.get("Host") or self.connection.local

    @property
    def scheme(self) -> str:
        return "http"


def _bodiless(status: int) -> bool:
    """Whether an answer with this status never has a body (RFC 9110: 1xx, 204, 304)."""
    return status in _NO_BODY_STATUSES or 100 <= status < 200


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


_date_second = 0
_date_lines = ""


def _date_and_server() -> str:
    """The Date and Server header lines every answer carries, formatted once a second."""
    global _date_second, _date_lines
    now = int(time.time())
    if now != _date_second:
        date = email.utils.formatdate(now, usegmt=True)
        _date_second, _date_lines = now, f"\r\nDate: {date}\r\nServer: {SERVER}"
    return _date_lines


class ClientConnection(BaseProtocol):
    """One client connection: requests parsed as they arrive and answered one at a time, in
    order (pipelined requests wait their turn); a client that leaves cancels its request."""

    def __init__(self, front: Front) -> None:
        super().__init__(front.loop)
        self.front = front
        limits = front.limits
        self._parser = HttpRequestParser(
            self,
            front.loop,
            _READ_BUFFER,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=False,  # a compressed body is forwarded as compressed
        )
        self.peer = ""
        self.local = ""
        self._queue: deque[tuple[RawRequestMessage, StreamReader]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._payload: StreamReader | None = None  # the body of the request being answered
        # One timer per connection, for the keep-alive and header timeouts: armed when the
        # connection turns idle (or a head starts) and not already armed, and on firing
        # checks the deadline of the moment, so a busy connection costs no timer per request.
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = front.loop.time()
        self._closing = False
        self._head_started = False  # bytes of a head that is not complete yet
        # The current answer: whether it started, its framing, and whether to close after.
        self._started = False
        self._chunked = False
        self._head_only = False
        self._close_after = False
        self._version = (1, 1)

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        if isinstance(local, tuple):
            host = f"[{local[0]}]" if ":" in local[0] else local[0]
            self.local = f"{host}:{local[1]}"
        self.front.connections.add(self)
        self._watch()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.front.connections.discard(self)
        self._closing = True
        self._disarm()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: its upstream request stops too
        self._queue.clear()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """aiohttp's body reader calls this whenever a body is read below its low-water mark,
        and BaseProtocol's answer feeds the parser an empty buffer: a wasted parse per
        request. Only reading that flow control paused has anything to resume."""
        if self._reading_paused:
            super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            messages, _upgraded, _tail = self._parser.feed_data(data)
        except HttpProcessingError as error:
            self._refuse_unparseable(error)
            return
        if messages:
            self._queue.extend(messages)
            self._head_started = False
            if len(self._queue) >= _MAX_QUEUED_REQUESTS and not self._buffer_paused:
                self._pause_reading_for_buffer()  # a client pipelining without waiting
            if self._task is None:
                self._next()
        elif data and self._task is None and not self._head_started:
            # Bytes that began a head: it must be complete within the header timeout.
            self._head_started = True
            self._idle_since = self.front.loop.time()
            self._watch()

    def eof_received(self) -> bool:
        return False  # close when the client half-closes

    # ---- requests, one at a time ----

    def _next(self) -> None:
        if self._closing or not self._queue:
            self._task = None
            if not self._closing and self.transport is not None:
                self._idle_since = self.front.loop.time()
                self._watch()
            return
        message, payload = self._queue.popleft()
        self._payload = payload
        if self._buffer_paused and len(self._queue) < _MAX_QUEUED_REQUESTS:
            self._resume_reading_for_buffer()
        self._version = (message.version.major, message.version.minor)
        self._started = self._chunked = self._head_only = False
        # An upgrade (or CONNECT) leaves the parser reading raw bytes: joulegate does not
        # switch protocols, so the connection ends with this answer.
        self._close_after = message.should_close or message.upgrade or self.front.stopping
        self._task = self.front.loop.create_task(self._serve(message, payload))

    async def _serve(self, message: RawRequestMessage, payload: StreamReader) -> None:
        request = ClientRequest(message, payload, self)
        try:
            await self.front.handler(request)(request)
        except asyncio.CancelledError:
            self._closing = True
            raise
        except Exception:
            log.exception("error handling a request from %s", self.peer)
            if not self._started:
                self.send_error(
                    500,
                    "joulegate failed while handling the request.",
                    "server_error",
                    "internal_error",
                    close=True,
                )
            self.close()
        finally:
            # A body the handler did not read leaves the parser mid-message: the next request
            # cannot be found, so the connection cannot be kept.
            if self._close_after or self._closing or not payload.is_eof():
                self.close()
            self._task = None
            if not self._closing:
                self._next()

    # ---- answers ----

    def send(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        *,
        reason: str | None = None,
        close: bool = False,
    ) -> None:
        """A whole answer in one write."""
        if close:
            self._close_after = True
        if _bodiless(status):
            body = b""
        head = self._head(status, reason, headers, len(body))
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(head + body)
        self._started = True

    def send_error(
        self,
        status: int,
        message: str,
        error_type: str,
        code: str,
        headers: Mapping[str, str] | None = None,
        *,
        param: str | None = None,
        close: bool = False,
    ) -> None:
        """joulegate's own answer, in the OpenAI error format."""
        fields = [("Content-Type", "application/json; charset=utf-8"), *(headers or {}).items()]
        body = error_body(message, error_type, code, param)
        self.send(status, fields, body, close=close)

    def send_continue(self) -> None:
        """`100 Continue` to a client that waits for it before sending its body."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def start(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        *,
        reason: str | None = None,
        head_only: bool = False,
    ) -> None:
        """An answer's head; its body follows through `write` and `end`. Without a length
        it is chunked (to HTTP/1.0 clients: until the connection closes)."""
        self._head_only = head_only or _bodiless(status)
        self._chunked = length is None and self.version11 and not self._head_only
        if length is None and not self._chunked and not self._head_only:
            self._close_after = True
        head = self._head(status, reason, headers, length)
        self._started = True
        await self._write(head)

    async def write(self, data: bytes) -> None:
        if self._head_only or not data:
            return
        if self._chunked:
            await self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            await self._write(data)

    async def end(self, tail: bytes = b"") -> None:
        if self._head_only:
            return
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(tail), tail) if tail else b""
            await self._write(chunk + b"0\r\n\r\n")
        elif tail:
            await self._write(tail)

    async def pass_through(self, source: asyncio.StreamReader) -> None:
        """An answer that is already HTTP, its bytes as they come until `source` ends; the
        connection closes after it (where it ends is known only from its closing)."""
        self._close_after = True
        self._started = True
        while data := await source.read(_READ_BUFFER):
            await self._write(data)

    def abort(self) -> None:
        """End an answer that cannot be completed: closing tells the client it is short."""
        self._close_after = True
        if self.transport is not None:
            self.transport.close()

    async def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        if self._paused:
            await self._drain_helper()

    @property
    def answered(self) -> bool:
        """Whether the current request's answer has begun: nothing else can be sent."""
        return self._started

    @property
    def version11(self) -> bool:
        return self._version >= (1, 1)

    def _head(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        length: int | None,
    ) -> bytes:
        # One join of the pieces, as the upstream request's head is built.
        pieces = ["HTTP/1.1 ", str(status), " ", _reason(status) if reason is None else reason]
        for name, value in headers:
            pieces += ("\r\n", name, ": ", value)
        pieces.append(_date_and_server())
        if length is not None:
            if not _bodiless(status):
                pieces += ("\r\nContent-Length: ", str(length))
        elif self._chunked:
            pieces.append("\r\nTransfer-Encoding: chunked")
        if self._close_after or self.front.stopping:
            self._close_after = True
            pieces.append("\r\nConnection: close")
        elif self._version < (1, 1):
            pieces.append("\r\nConnection: keep-alive")  # HTTP/1.0 assumes close unless told
        pieces.append("\r\n\r\n")
        return "".join(pieces).encode("utf-8", "surrogateescape")

    # ---- closing ----

    def close(self) -> None:
        self._closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> None:
        if self._task is None:
            self.close()
        else:
            self._close_after = True

    def _deadline(self) -> float:
        limits = self.front.limits
        timeout = limits.header_timeout if self._head_started else limits.keepalive_timeout
        return self._idle_since + timeout

    def _watch(self) -> None:
        """Make sure a timer fires by the idle connection's deadline."""
        deadline = self._deadline()
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return
            self._timer.cancel()
        self._timer = self.front.loop.call_at(deadline, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing or self._task is not None:
            return  # busy: the timer is armed again when the connection turns idle
        deadline = self._deadline()
        if self.front.loop.time() < deadline - 0.001:
            self._timer = self.front.loop.call_at(deadline, self._on_timer)
            return
        if self._head_started:
            log.debug(
                "closing a connection from %s: no complete request head in %g s",
                self.peer,
                self.front.limits.header_timeout,
            )
        self.close()

    def _refuse_unparseable(self, error: HttpProcessingError) -> None:
        """aiohttp's parser refused the bytes: an OpenAI-format answer, then close (as aiohttp
        does: where the next request would start is unknown). The client's mistake, not
        joulegate's: one line at debug, so a scanner cannot fill the log."""
        log.debug("unparseable request from %s: %r", self.peer, error)
        status, text, code = parse_error_answer(error, self.front.limits)
        self._queue.clear()
        self._closing = True
        if self._task is not None:
            # The body being read broke off: its reader learns why at once (and the answer
            # says so) rather than waiting out the body timeout.
            if self._payload is not None and not self._payload.is_eof():
                self._payload.set_exception(InvalidBody(text))
            return  # any answer goes out before the connection closes
        self.send_error(status, text, "invalid_request_error", code, close=True)
        self.close()


def parse_error_answer(error: HttpProcessingError, limits: Limits) -> tuple[int, str, str]:
    """Status, message and code for a request aiohttp's parser refused."""
    if isinstance(error, LineTooLong):
        limit = error.args[1] if len(error.args) > 1 else None
        if limit == limits.max_field_size:
            # aiohttp names only the limit, so equal limits cannot be told apart.
            what = "target or a header field" if limit == limits.max_line_size else "header field"
            return (
                431,
                f"A request {what} is longer than the limit of {limit} bytes.",
                "header_fields_too_large",
            )
        return (
            414,
            f"The request target (path and query) is longer than the limit of {limit} bytes.",
            "url_too_long",
        )
    reason = error.message.strip().splitlines()[0].rstrip(":") if error.message else ""
    if reason == _TOO_MANY_HEADERS:
        return (
            431,
            f"The request has more header fields than the limit of {limits.max_headers}.",
            "header_fields_too_large",
        )
    return 400, f"The request is not valid HTTP/1.1: {reason}.", "invalid_http_request"


class Front:
    """The listening side: accepts client connections and hands each request to `forward`, or
    to joulegate's own application for its own paths; on `shutdown`, stops accepting, lets
    the requests in flight finish for up to `shutdown_timeout` seconds, then cancels them."""

    def __init__(
        self,
        forward: Callable[[ClientRequest], Awaitable[None]],
        own: Callable[[ClientRequest], Awaitable[None]],
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.forward = forward
        self.own = own
        self.limits = limits
        self.loop = loop
        self.connections: set[ClientConnection] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None

    def handler(self, request: ClientRequest) -> Callable[[ClientRequest], Awaitable[None]]:
        """Who answers `request`: joulegate's own application, or the forwarder."""
        path = request.target.partition("?")[0]
        if path == METRICS_PATH or path.startswith(OWN_PREFIX):
            return self.own
        return self.forward

    async def start(self, host: str, port: int) -> tuple[str, int]:
        try:
            self._server = await self.loop.create_server(
                lambda: ClientConnection(self), host, port, backlog=1024
            )
        except OSError as error:  # in use, not this host's address, a privileged port
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise ListenError(f"cannot listen on {host}:{port}: {reason.lower()}") from None
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def shutdown(self, timeout: float) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close_if_idle()
        tasks = [c._task for c in self.connections if c._task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def relay_to_unix_socket(
    request: ClientRequest, path: str, max_body: int, body_timeout: float
) -> None:
    """joulegate's own endpoints: the request (its head rebuilt, asking to close after) to its
    aiohttp application on the Unix socket `path`, and the answer's bytes back as they come;
    the client connection closes after it."""
    connection = request.connection
    try:
        body = await read_body(request, max_body, body_timeout)
    except BodyRefused as refusal:
        connection.send_error(
            refusal.status, refusal.message, "invalid_request_error", refusal.code, close=True
        )
        return
    lines = [f"{request.method} {request.target} HTTP/1.1"]
    lines.extend(
        f"{name}: {value}"
        for name, value in request.headers.items()
        if name.lower() not in ("connection", "keep-alive", "content-length", "transfer-encoding")
    )
    lines.append("Connection: close")
    lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    reader, writer = await asyncio.open_unix_connection(sock=_connected_unix_socket(path))
    try:
        writer.write(head + body)
        await connection.pass_through(reader)
    finally:
        writer.close()


def _connected_unix_socket(path: str) -> socket.socket:
    """A connection to the Unix socket `path`, made here because uvloop's own refuses abstract
    addresses (a leading NUL). Connecting to a listening Unix socket completes at once."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listening_unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at `path` (abstract when it starts with a NUL), for aiohttp's
    `SockSite`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
