"""Weight policies: each request's claim on a shared device, judged when it starts.

Attribution splits a shared interval between the requests in flight in proportion to their
weights. `equal` (the default, the paper's measure) gives every request the same claim.
`requested-work` weighs what the request asked for, for servers that batch very unequal
requests together: output tokens for text generation, pixels x steps x images for image
generation. Only what is known at the start can count: the answer's usage comes too late.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.classify import Classification

WeightPolicy = Callable[[Classification], float]

# The reference request that weighs 1.0 under `requested-work`.
_REFERENCE_TOKENS = 256
_REFERENCE_IMAGE_WORK = 512 * 512 * 50
_MIN_WEIGHT, _MAX_WEIGHT = 1 / 64, 64.0


def equal(classification: Classification) -> float:
    return 1.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return None
    return float(value)


def _image_pixels(size: Any) -> float | None:
    if not isinstance(size, str) or "x" not in size:
        return None
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        return None
    return float(int(width) * int(height))


def requested_work(classification: Classification) -> float:
    body = classification.body or {}
    weight = 1.0
    if classification.task == "text-generation":
        parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        tokens = (
            _number(body.get("max_completion_tokens"))
            or _number(body.get("max_tokens"))
            or _number(parameters.get("max_new_tokens"))  # TGI
        )
        if tokens is not None:
            weight = tokens / _REFERENCE_TOKENS
    elif classification.task == "image-generation":
        images = _number(body.get("n")) or 1.0
        pixels = _image_pixels(body.get("size")) or 512.0 * 512.0
        steps = _number(body.get("num_inference_steps")) or 50.0
        weight = images * pixels * steps / _REFERENCE_IMAGE_WORK
    return min(_MAX_WEIGHT, max(_MIN_WEIGHT, weight))


POLICIES: dict[str, WeightPolicy] = {"equal": equal, "requested-work": requested_work}
