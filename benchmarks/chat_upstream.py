"""An OpenAI-style chat upstream for the load benchmarks, run as its own process.

    python benchmarks/chat_upstream.py PORT [--chunk-interval SECONDS]

`POST /v1/chat/completions` answers a whole chat completion, or with `"stream": true` an SSE
stream of `max_tokens` content chunks, one every `--chunk-interval` seconds (the first after
one interval), then the usage chunk when `stream_options.include_usage` asks for it (joulegate
asks for it on its clients' behalf), then `data: [DONE]`. It answers with the model it was
asked for and remembers nothing between requests, so its own memory stays flat however long
a soak runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from benchmarks.harness import raise_open_files_limit

CHUNK_INTERVAL = web.AppKey("chunk_interval", float)


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": 9,
        "completion_tokens": completion_tokens,
        "total_tokens": 9 + completion_tokens,
    }


def _event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = str(body.get("model", "bench"))
    tokens = int(body.get("max_tokens") or 4)
    base = {"id": "chatcmpl-bench", "created": int(time.time()), "model": model}
    if not body.get("stream"):
        message = {"role": "assistant", "content": " ".join(["joule"] * tokens)}
        return web.json_response(
            base
            | {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": _usage(tokens),
            }
        )
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    interval = request.app[CHUNK_INTERVAL]
    chunk = base | {"object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None
    for index in range(tokens):
        await asyncio.sleep(interval)
        delta = {"content": "joule "} if index else {"role": "assistant", "content": "joule "}
        last = index == tokens - 1
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if last else None}
        await response.write(_event(chunk | {"choices": [choice]}))
    if include_usage:
        await response.write(_event(chunk | {"choices": [], "usage": _usage(tokens)}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--chunk-interval", type=float, default=1.0)
    arguments = parser.parse_args()
    raise_open_files_limit()
    app = web.Application()
    app[CHUNK_INTERVAL] = arguments.chunk_interval
    app.router.add_post("/v1/chat/completions", chat)
    import uvloop

    web.run_app(
        app,
        host="127.0.0.1",
        port=arguments.port,
        access_log=None,
        print=None,
        backlog=4096,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
