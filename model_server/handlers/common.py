"""Request plumbing shared by every inference handler."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from model_server.errors import APIError, queue_full, unsupported
from model_server.registry import LoadedModel
from model_server.state import state_of
from model_server.validation import require_str
from model_server.workers import Job, QueueFullError

T = TypeVar("T")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; anything else is a 400."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object")
    return body


def resolve_model(request: web.Request, body: dict[str, Any], task: str) -> LoadedModel:
    name = require_str(body, "model")
    return state_of(request).models.get(name, task)


def submit(
    request: web.Request, model: LoadedModel, fn: Callable[[Job[T]], T], *, stream: bool = False
) -> Job[T]:
    """Queue work on the model's device; a full queue becomes 503 with Retry-After."""
    try:
        return state_of(request).pool.submit(model.device, fn, stream=stream)
    except QueueFullError as exc:
        raise queue_full(exc.retry_after) from exc


async def run(request: web.Request, model: LoadedModel, fn: Callable[[Job[T]], T]) -> T:
    return await submit(request, model, fn).wait()


def reject_if_set(body: dict[str, Any], *names: str) -> None:
    """OpenAI fields this server cannot honour: better a 400 than a silent difference."""
    for name in names:
        value = body.get(name)
        if value not in (None, False, 0, [], {}):
            raise unsupported(name)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
