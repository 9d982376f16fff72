"""/v1/chat/completions and /v1/completions, streaming and not."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from model_server import sse
from model_server.errors import APIError, bad_param, internal_error, unsupported
from model_server.handlers.common import (
    new_id,
    now,
    read_json,
    reject_if_set,
    resolve_model,
    submit,
)
from model_server.registry import LoadedModel
from model_server.schemas import (
    ChatMessage,
    SamplingParams,
    TextDelta,
    TextGenerationRequest,
    TextGenerationResult,
    TextStarted,
)
from model_server.validation import (
    optional_bool,
    optional_float,
    optional_int,
    optional_object,
)

log = logging.getLogger(__name__)
TASK = "text-generation"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP = 4
MAX_N = 16
MAX_TOKENS_LIMIT = 1_000_000


@dataclass(frozen=True)
class _Format:
    """How one endpoint names things: the only differences between chat and completions."""

    chat: bool
    id_prefix: str
    object: str
    chunk_object: str


CHAT = _Format(True, "chatcmpl", "chat.completion", "chat.completion.chunk")
COMPLETION = _Format(False, "cmpl", "text_completion", "text_completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, COMPLETION)


async def _serve(request: web.Request, fmt: _Format) -> web.StreamResponse:
    body = await read_json(request)
    model = resolve_model(request, body, TASK)
    parsed = parse_request(body, fmt.chat, model.spec.defaults)
    stream = optional_bool(body, "stream", False)
    options = optional_object(body, "stream_options")
    if options is not None and not stream:
        raise bad_param("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = bool(options and options.get("include_usage") is True)
    if stream and parsed.n > 1:
        raise unsupported("n", "streaming supports n=1 only")
    runner = model.runner
    if not stream:
        job = submit(request, model, lambda job: runner.run(parsed, job))
        result = await job.wait()
        return web.json_response(_completion_body(fmt, model, result))
    job = submit(request, model, lambda job: runner.run(parsed, job), stream=True)
    return await _stream(request, fmt, model, job, include_usage)


def parse_request(
    body: Mapping[str, Any], chat: bool, defaults: Mapping[str, Any]
) -> TextGenerationRequest:
    reject_if_set(dict(body), "logprobs", "top_logprobs", "tools", "functions")
    if not chat:
        reject_if_set(dict(body), "echo", "suffix")
        best_of = optional_int(body, "best_of", 1, minimum=1)
        if best_of != 1:
            raise unsupported("best_of")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if optional_float(body, penalty, 0.0, minimum=-2.0, maximum=2.0):
            raise unsupported(penalty)
    max_tokens = optional_int(
        body, "max_tokens", defaults.get("max_tokens"), minimum=1, maximum=MAX_TOKENS_LIMIT
    )
    if chat:
        max_tokens = optional_int(
            body, "max_completion_tokens", max_tokens, minimum=1, maximum=MAX_TOKENS_LIMIT
        )
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", defaults, 1.0, minimum=0.0, maximum=2.0),
        top_p=_top_p(body, defaults),
        stop=_stop(body),
        seed=optional_int(body, "seed", None),
        ignore_eos=optional_bool(body, "ignore_eos", bool(defaults.get("ignore_eos", False))),
    )
    n = optional_int(body, "n", 1, minimum=1, maximum=MAX_N)
    assert n is not None
    if chat:
        return TextGenerationRequest(sampling=sampling, messages=_messages(body), n=n)
    return TextGenerationRequest(sampling=sampling, prompt=_prompt(body), n=n)


def _float(
    body: Mapping[str, Any],
    name: str,
    defaults: Mapping[str, Any],
    fallback: float,
    *,
    minimum: float,
    maximum: float,
) -> float:
    value = optional_float(
        body, name, float(defaults.get(name, fallback)), minimum=minimum, maximum=maximum
    )
    assert value is not None
    return value


def _top_p(body: Mapping[str, Any], defaults: Mapping[str, Any]) -> float:
    value = optional_float(
        body,
        "top_p",
        float(defaults.get("top_p", 1.0)),
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
    )
    assert value is not None
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_param("stop", "'stop' must be a non-empty string or a list of them")
    if len(items) > MAX_STOP:
        raise bad_param("stop", f"'stop' may hold at most {MAX_STOP} sequences")
    return tuple(items)


def _messages(body: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    raw = body.get("messages")
    if raw is None:
        raise bad_param("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise bad_param("messages", "'messages' must be a non-empty list")
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad_param("messages", f"messages[{index}] must be an object")
        role = item.get("role")
        if role not in ROLES:
            raise bad_param("messages", f"messages[{index}].role must be one of {sorted(ROLES)}")
        messages.append(ChatMessage(role=role, content=_content(item.get("content"), index)))
    return tuple(messages)


def _content(content: object, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise unsupported("messages", f"messages[{index}]: only text content is supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_param("messages", f"messages[{index}]: a text part needs 'text'")
            texts.append(text)
        return "".join(texts)
    raise bad_param("messages", f"messages[{index}].content must be a string or a list of parts")


def _prompt(body: Mapping[str, Any]) -> str:
    value = body.get("prompt")
    if value is None:
        raise bad_param("prompt", "'prompt' is required", "missing_required_parameter")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, list):
        raise unsupported("prompt", "send one prompt (a string) per request")
    if not isinstance(value, str):
        raise bad_param("prompt", "'prompt' must be a string")
    return value


def _usage(result: TextGenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _completion_body(
    fmt: _Format, model: LoadedModel, result: TextGenerationResult
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for index, choice in enumerate(result.choices):
        entry: dict[str, Any] = {"index": index}
        if fmt.chat:
            entry["message"] = {"role": "assistant", "content": choice.text}
        else:
            entry["text"] = choice.text
        entry["logprobs"] = None
        entry["finish_reason"] = choice.finish_reason
        choices.append(entry)
    return {
        "id": new_id(fmt.id_prefix),
        "object": fmt.object,
        "created": now(),
        "model": model.name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(result),
    }


class _Chunks:
    """Builds the chunks of one stream, all with the same id, created time and model."""

    def __init__(self, fmt: _Format, model: LoadedModel, include_usage: bool) -> None:
        self.fmt = fmt
        self.id = new_id(fmt.id_prefix)
        self.created = now()
        self.model = model.name
        self.include_usage = include_usage

    def chunk(self, text: str | None, finish_reason: str | None, *, first: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.fmt.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        return self._wrap([choice], None)

    def usage(self, result: TextGenerationResult) -> dict:
        return self._wrap([], _usage(result))

    def _wrap(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": self.fmt.chunk_object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = usage
        return payload


async def _stream(
    request: web.Request,
    fmt: _Format,
    model: LoadedModel,
    job: Any,
    include_usage: bool,
) -> web.StreamResponse:
    """Relay the job's events as SSE; a client that leaves cancels the job.

    The response is only opened once the job reports it started, so an error found while
    preparing the prompt (e.g. too long) is still an ordinary JSON error with a status code.
    """
    chunks = _Chunks(fmt, model, include_usage)
    response: web.StreamResponse | None = None
    try:
        async for event in job.events():
            if isinstance(event, TextStarted):
                response = await sse.open_stream(request)
                if fmt.chat:
                    await sse.send(response, chunks.chunk("", None, first=True))
            elif isinstance(event, TextDelta) and response is not None:
                await sse.send(response, chunks.chunk(event.text, None))
        if response is None:
            return web.json_response(_completion_body(fmt, model, job.future.result()))
        try:
            result: TextGenerationResult = job.future.result()
        except APIError as exc:
            await sse.send(response, exc.body())
            await sse.finish(response)
            return response
        except Exception:
            log.exception("generation failed mid-stream")
            await sse.send(response, internal_error().body())
            await sse.finish(response)
            return response
        await sse.send(response, chunks.chunk(None, result.choices[0].finish_reason))
        if include_usage:
            await sse.send(response, chunks.usage(result))
        await sse.finish(response)
        return response
    except ConnectionResetError:  # the client went away while we wrote
        return response if response is not None else web.Response(status=499)
    finally:
        job.cancel()  # no-op when finished; otherwise stop generating for nobody
