"""/v1/summarizations: {model, input, max_tokens, min_tokens} -> one summary per input."""

from __future__ import annotations

from aiohttp import web

from model_server.errors import bad_param
from model_server.handlers.common import new_id, now, read_json, resolve_model, run
from model_server.schemas import SummarizationRequest, SummarizationResult
from model_server.validation import optional_int, str_or_list

TASK = "summarization"
MAX_INPUTS = 64
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 4096


async def summarizations(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = resolve_model(request, body, TASK)
    default = int(model.spec.defaults.get("max_tokens", DEFAULT_MAX_TOKENS))
    max_tokens = optional_int(body, "max_tokens", default, minimum=1, maximum=MAX_TOKENS_LIMIT)
    min_tokens = optional_int(body, "min_tokens", 0, minimum=0, maximum=MAX_TOKENS_LIMIT)
    assert max_tokens is not None and min_tokens is not None
    if min_tokens > max_tokens:
        raise bad_param("min_tokens", "'min_tokens' must not exceed 'max_tokens'")
    parsed = SummarizationRequest(
        texts=tuple(str_or_list(body, "input", max_items=MAX_INPUTS)),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
    )
    runner = model.runner
    result: SummarizationResult = await run(request, model, lambda job: runner.run(parsed, job))
    return web.json_response(
        {
            "id": new_id("sum"),
            "object": "list",
            "created": now(),
            "model": model.name,
            "data": [{"index": i, "summary": s} for i, s in enumerate(result.summaries)],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }
    )
