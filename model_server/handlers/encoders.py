"""Non-generative tasks: /v1/embeddings (OpenAI format) and the classification routes.

The classification routes are this server's own (OpenAI has none); their shape is documented
in ``model_server/README.md``. Every answer carries ``usage`` with what was processed.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from model_server.errors import bad_param
from model_server.handlers.common import new_id, now, read_json, resolve_model, run
from model_server.schemas import (
    ClassificationRequest,
    ClassificationResult,
    EmbeddingRequest,
    EmbeddingResult,
    ImageClassificationRequest,
)
from model_server.validation import optional_int, optional_str, str_or_list

MAX_INPUTS = 2048
MAX_IMAGES = 64


async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = resolve_model(request, body, "embeddings")
    encoding = optional_str(body, "encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_param("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    parsed = _embedding_request(body)
    runner = model.runner
    runner.check(parsed)
    result: EmbeddingResult = await run(request, model, lambda job: runner.run(parsed, job))
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, encoding)}
        for i, v in enumerate(result.vectors)
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": model.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


async def classifications(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = resolve_model(request, body, "text-classification")
    parsed = ClassificationRequest(
        texts=tuple(str_or_list(body, "input", max_items=MAX_INPUTS)), top_k=_top_k(body)
    )
    runner = model.runner
    result: ClassificationResult = await run(request, model, lambda job: runner.run(parsed, job))
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return web.json_response(_labels_body(model.name, result, usage))


async def image_classifications(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = resolve_model(request, body, "image-classification")
    images = tuple(_decode_base64(item, index) for index, item in enumerate(_images(body)))
    parsed = ImageClassificationRequest(images=images, top_k=_top_k(body))
    runner = model.runner
    result: ClassificationResult = await run(request, model, lambda job: runner.run(parsed, job))
    usage = {"images": result.images, "pixels": result.pixels}
    return web.json_response(_labels_body(model.name, result, usage))


def _embedding_request(body: Mapping[str, Any]) -> EmbeddingRequest:
    dimensions = optional_int(body, "dimensions", None, minimum=1)
    value = body.get("input")
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return EmbeddingRequest(token_ids=(tuple(value),), dimensions=dimensions)
    if isinstance(value, list) and value and all(isinstance(t, list) for t in value):
        if len(value) > MAX_INPUTS:
            raise bad_param("input", f"at most {MAX_INPUTS} inputs per request")
        if not all(row and all(_is_int(t) for t in row) for row in value):
            raise bad_param("input", "token arrays must be non-empty lists of integers")
        return EmbeddingRequest(token_ids=tuple(tuple(r) for r in value), dimensions=dimensions)
    texts = str_or_list(body, "input", max_items=MAX_INPUTS)
    return EmbeddingRequest(texts=tuple(texts), dimensions=dimensions)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encode_vector(vector: tuple[float, ...], encoding: str | None) -> list[float] | str:
    """``base64`` is little-endian float32, which the OpenAI SDK asks for by default."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


def _top_k(body: Mapping[str, Any]) -> int | None:
    return optional_int(body, "top_k", None, minimum=1)


def _images(body: Mapping[str, Any]) -> list[str]:
    value = body.get("image")
    if value is None:
        raise bad_param("image", "'image' is required", "missing_required_parameter")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise bad_param("image", "'image' must be a base64 string or a list of them")
    if len(items) > MAX_IMAGES:
        raise bad_param("image", f"at most {MAX_IMAGES} images per request")
    return items


def _decode_base64(value: str, index: int) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL."""
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_param("image", f"image {index} is not valid base64") from exc
    if not data:
        raise bad_param("image", f"image {index} is empty")
    return data


def _labels_body(name: str, result: ClassificationResult, usage: dict[str, int]) -> dict:
    data = []
    for index, ranked in enumerate(result.labels):
        data.append(
            {
                "index": index,
                "label": ranked[0].label,
                "score": ranked[0].score,
                "labels": [{"label": r.label, "score": r.score} for r in ranked],
            }
        )
    return {
        "id": new_id("cls"),
        "object": "list",
        "created": now(),
        "model": name,
        "data": data,
        "usage": usage,
    }
