"""Reading typed fields out of a JSON request body.

Each reader raises a 400 :class:`~model_server.errors.APIError` whose ``param`` names the
field, so a client always learns which parameter it got wrong. ``bool`` is rejected where a
number is expected because ``True`` is an ``int`` in Python but not in JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from model_server.errors import bad_param

Body = Mapping[str, Any]
_MISSING = object()


def _present(body: Body, name: str) -> bool:
    return body.get(name, _MISSING) not in (_MISSING, None)


def require_str(body: Body, name: str, *, allow_empty: bool = False) -> str:
    if not _present(body, name):
        raise bad_param(name, f"'{name}' is required", code="missing_required_parameter")
    value = body[name]
    if not isinstance(value, str):
        raise bad_param(name, f"'{name}' must be a string", code="invalid_type")
    if not allow_empty and not value.strip():
        raise bad_param(name, f"'{name}' must not be empty")
    return value


def optional_str(body: Body, name: str, default: str | None = None) -> str | None:
    if not _present(body, name):
        return default
    value = body[name]
    if not isinstance(value, str):
        raise bad_param(name, f"'{name}' must be a string", code="invalid_type")
    return value


def optional_int(
    body: Body,
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    if not _present(body, name):
        return default
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_param(name, f"'{name}' must be an integer", code="invalid_type")
    _check_range(name, value, minimum, maximum)
    return value


def optional_float(
    body: Body,
    name: str,
    default: float | None,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float | None:
    if not _present(body, name):
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_param(name, f"'{name}' must be a number", code="invalid_type")
    value = float(value)
    if not math.isfinite(value):
        raise bad_param(name, f"'{name}' must be a finite number")
    if exclusive_minimum and minimum is not None and value <= minimum:
        raise bad_param(name, f"'{name}' must be greater than {minimum:g}, got {value:g}")
    _check_range(name, value, None if exclusive_minimum else minimum, maximum)
    return value


def optional_bool(body: Body, name: str, default: bool) -> bool:
    if not _present(body, name):
        return default
    value = body[name]
    if not isinstance(value, bool):
        raise bad_param(name, f"'{name}' must be a boolean", code="invalid_type")
    return value


def optional_object(body: Body, name: str) -> Mapping[str, Any] | None:
    if not _present(body, name):
        return None
    value = body[name]
    if not isinstance(value, Mapping):
        raise bad_param(name, f"'{name}' must be an object", code="invalid_type")
    return value


def str_or_list(body: Body, name: str, *, max_items: int) -> list[str]:
    """A string or a non-empty list of strings (the OpenAI ``input`` convention)."""
    if not _present(body, name):
        raise bad_param(name, f"'{name}' is required", code="missing_required_parameter")
    value = body[name]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise bad_param(name, f"'{name}' must be a string or a non-empty list of strings")
    if len(items) > max_items:
        raise bad_param(name, f"'{name}' has {len(items)} items; at most {max_items} allowed")
    for item in items:
        if not isinstance(item, str):
            raise bad_param(name, f"'{name}' must be a string or a list of strings")
        if not item:
            raise bad_param(name, f"'{name}' must not contain empty strings")
    return items


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise bad_param(name, f"'{name}' must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise bad_param(name, f"'{name}' must be at most {maximum:g}, got {value:g}")
