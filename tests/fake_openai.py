"""A small OpenAI-compatible upstream that records what reached it, for end-to-end tests."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

WORDS = ["energy", "is", "what", "we", "meter", "per", "request"]


@dataclass
class Seen:
    """What the upstream received: one entry per request."""

    bodies: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chunk(kind: str, model: str, choice: dict[str, Any] | None, usage: Any) -> bytes:
    document: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [] if choice is None else [choice],
    }
    if usage is not ...:
        document["usage"] = usage
    return b"data: " + json.dumps(document).encode() + b"\n\n"


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    body = await request.json()
    request.app[SEEN].bodies.append(body)
    request.app[SEEN].headers.append(dict(request.headers))
    model = body.get("model", "tiny")
    words = WORDS[: int(body.get("max_tokens") or len(WORDS))]
    prompt_tokens = 5
    if not body.get("stream"):
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": " ".join(words), "finish_reason": "stop"}
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": _usage(prompt_tokens, len(words)),
            }
        )
    include_usage = (body.get("stream_options") or {}).get("include_usage") is True
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    usage_field: Any = None if include_usage else ...
    for index, word in enumerate(words):
        last = index == len(words) - 1
        if kind == "chat":
            choice = {
                "index": 0,
                "delta": {"content": word},
                "finish_reason": "stop" if last else None,
            }
        else:
            choice = {"index": 0, "text": word, "finish_reason": "stop" if last else None}
        await response.write(_chunk(kind, model, choice, usage_field))
    if include_usage:
        await response.write(_chunk(kind, model, None, _usage(prompt_tokens, len(words))))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[SEEN].bodies.append(body)
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return web.json_response(
        {
            "object": "list",
            "model": body.get("model", "tiny"),
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                for i in range(len(inputs))
            ],
            "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
        }
    )


def create_fake_openai() -> web.Application:
    app = web.Application()
    app[SEEN] = Seen()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app
