"""Client connections: what joulegate answers when a client's bytes are not a request it can
forward, and how long a client may take to send a request head.

aiohttp answers HTTP it cannot parse (a request line or header field over its limits, too many
headers, garbage) itself, in plain text, before any handler or middleware runs, and has no
hook for that answer (aio-libs/aiohttp#3287). OpenAI clients parse `{"error": {...}}`, so
joulegate serves its application through `ProxyRunner`, whose connections are
`ClientConnection`s: aiohttp's own `RequestHandler` with those answers in the OpenAI error
format and a timer for request heads that arrive too slowly (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from proxy.config import Config
from proxy.errors import error_response

log = logging.getLogger("joulegate")

# aiohttp's limit on the request target (path and query), kept: OpenAI-style APIs put
# everything in the body, and nginx's default buffer for the request line is 8 KiB too.
MAX_REQUEST_LINE_BYTES = 8190
# How long an idle kept-alive connection stays open: `web.run_app`'s default, longer than the
# 60 s idle timeout of common load balancers in front, so they close first.
KEEPALIVE_TIMEOUT_SECONDS = 75.0
# aiohttp's text for the header-count limit, the same in its C and Python parsers.
_TOO_MANY_HEADERS = "Too many headers received"


def connection_settings(config: Config) -> dict[str, Any]:
    """The keyword arguments `ProxyRunner` passes to every `ClientConnection`."""
    return {
        "max_line_size": MAX_REQUEST_LINE_BYTES,
        "max_field_size": config.max_header_bytes,
        "max_headers": config.max_headers,
        "client_header_timeout": config.client_header_timeout_seconds,
        "keepalive_timeout": KEEPALIVE_TIMEOUT_SECONDS,
        # A compressed request body is forwarded as the client compressed it, with its
        # Content-Encoding: aiohttp would otherwise inflate it and the upstream get plain
        # bytes labelled gzip.
        "auto_decompress": False,
    }


class ClientConnection(web.RequestHandler):
    """aiohttp's connection handler, answering in the OpenAI error format and closing
    connections whose request head is not complete within `client_header_timeout` seconds of
    its first byte (nginx's client_header_timeout)."""

    __slots__ = ("_head_timeout", "_head_timer")

    def __init__(
        self, manager: web.Server, *, client_header_timeout: float = 60.0, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = client_header_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Waiting for a request after these bytes: they began a head that is not complete. A
        # head that arrives in one read never arms the timer.
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(self._head_timeout, self._head_too_slow)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            log.debug(
                "closing a connection from %s: no complete request head in %g s",
                self.peername,
                self._head_timeout,
            )
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, or to a handler that raised, in
        the OpenAI error format. The connection is closed after it, as aiohttp does."""
        if isinstance(exc, HttpProcessingError):
            # The client's mistake, not joulegate's: one line at debug, as aiohttp logs
            # non-HTTP traffic, so a scanner cannot fill the log with tracebacks.
            log.debug("unparseable request from %s: %r", request.remote, exc)
            status, text, code = self._client_error(exc)
            error_type = "invalid_request_error"
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error_type = "server_error"
            if status == 504:
                text, code = "joulegate timed out while handling the request.", "timeout"
            else:
                text, code = "joulegate failed while handling the request.", "internal_error"
        if request.writer.output_size > 0:  # part of an answer went out: nothing can follow
            raise ConnectionError("an answer was already started; closing the connection")
        response = error_response(status, text, error_type, code)
        response.force_close()
        return response

    def _client_error(self, exc: HttpProcessingError) -> tuple[int, str, str]:
        """Status, message and code for a request aiohttp's parser refused."""
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else None
            if limit == self.max_field_size:
                # aiohttp names only the limit, so equal limits cannot be told apart.
                what = "target or a header field" if limit == self.max_line_size else "header field"
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
        reason = exc.message.strip().splitlines()[0].rstrip(":") if exc.message else ""
        if reason == _TOO_MANY_HEADERS:
            return (
                431,
                f"The request has more header fields than the limit of {self.max_headers}.",
                "header_fields_too_large",
            )
        return 400, f"The request is not valid HTTP/1.1: {reason}.", "invalid_http_request"


class _ConnectionFactory(web.Server):
    """aiohttp's low-level server, making `ClientConnection`s for each accepted socket."""

    def __call__(self) -> web.RequestHandler:
        return ClientConnection(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """`web.AppRunner` whose connections are `ClientConnection`s; its keyword arguments
    (`connection_settings`) reach them as aiohttp's do."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ConnectionFactory  # the same server, making joulegate's connections
        return server
