"""Server-sent events exactly as the OpenAI API frames them.

Each event is one ``data: <json>\\n\\n`` line and the stream ends with ``data: [DONE]\\n\\n``.
Every event is written (and so flushed) as soon as it exists: joulegate and the clients
measure time to first token from these writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-like proxies not to buffer
}


def encode(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=HEADERS)
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, payload: Mapping[str, Any]) -> None:
    await response.write(encode(payload))


async def finish(response: web.StreamResponse) -> None:
    await response.write(DONE)
    await response.write_eof()
