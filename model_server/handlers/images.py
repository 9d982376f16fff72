"""/v1/images/generations: OpenAI's image API over a diffusers pipeline.

``usage`` reports what was produced (``images``, ``pixels`` = width x height x images,
``steps`` = denoising steps run) because that, not tokens, is what drives image-generation
energy; joulegate reads these fields.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from model_server.errors import bad_param, unsupported
from model_server.handlers.common import now, read_json, resolve_model, run
from model_server.schemas import ImageRequest, ImageResult
from model_server.validation import optional_float, optional_int, optional_str, require_str

TASK = "image-generation"
MAX_IMAGES = 10
MAX_SIDE = 4096
MAX_STEPS = 1000
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


async def generations(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = resolve_model(request, body, TASK)
    runner = model.runner
    parsed = parse_request(body, model.spec.defaults, runner.default_size)
    runner.check(parsed)
    result: ImageResult = await run(request, model, lambda job: runner.run(parsed, job))
    return web.json_response(
        {
            "created": now(),
            "data": [{"b64_json": base64.b64encode(png).decode()} for png in result.png_images],
            "usage": {
                "images": len(result.png_images),
                "pixels": result.width * result.height * len(result.png_images),
                "steps": result.steps,
                "input_tokens": result.prompt_tokens,
            },
        }
    )


def parse_request(
    body: Mapping[str, Any], defaults: Mapping[str, Any], default_size: int
) -> ImageRequest:
    prompt = require_str(body, "prompt")
    response_format = optional_str(body, "response_format", "b64_json")
    if response_format == "url":
        raise unsupported("response_format", "only response_format 'b64_json' is supported")
    if response_format != "b64_json":
        raise bad_param("response_format", "'response_format' must be 'b64_json'")
    width, height = _size(optional_str(body, "size", defaults.get("size")), default_size)
    n = optional_int(body, "n", 1, minimum=1, maximum=MAX_IMAGES)
    steps = optional_int(
        body,
        "num_inference_steps",
        int(defaults.get("num_inference_steps", DEFAULT_STEPS)),
        minimum=1,
        maximum=MAX_STEPS,
    )
    guidance = optional_float(
        body,
        "guidance_scale",
        float(defaults.get("guidance_scale", DEFAULT_GUIDANCE)),
        minimum=0.0,
        maximum=100.0,
    )
    assert n is not None and steps is not None and guidance is not None
    return ImageRequest(
        prompt=prompt,
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        negative_prompt=optional_str(body, "negative_prompt"),
        seed=optional_int(body, "seed", None),
    )


def _size(value: str | None, default_size: int) -> tuple[int, int]:
    if value is None or value == "auto":
        return default_size, default_size
    match = _SIZE.match(value)
    if match is None:
        raise bad_param("size", f"'size' must look like WIDTHxHEIGHT, e.g. 512x512, got {value!r}")
    width, height = int(match[1]), int(match[2])
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise bad_param("size", f"width and height must be between 1 and {MAX_SIDE}")
    return width, height
