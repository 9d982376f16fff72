"""Say what a request is before it is forwarded: task, model, tenant and whether it streams.

Nothing here trusts the body: a body that is not JSON (or not an object) is classified by its
route alone and forwarded untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config import Route

ANONYMOUS = "anonymous"
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
# Headers that carry API keys in the OpenAI, Azure OpenAI and Anthropic styles.
_KEY_HEADERS = ("api-key", "x-api-key")


@dataclass(frozen=True, slots=True)
class Classification:
    task: str
    model: str | None  # None when neither the body nor the path names one
    tenant: str
    streaming: bool
    body: dict[str, Any] | None  # the parsed JSON object, None when the body is not one


class RouteTable:
    """First matching route wins; paths outside the table are task `other`."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = [(self._compile(route.path), route.task) for route in routes]

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        literal_parts = re.split(r"(\{model(?::path)?\})", pattern)
        regex = "".join(
            "(?P<model>.+?)"
            if part == "{model:path}"
            else "(?P<model>[^/]+)"
            if part == "{model}"
            else re.escape(part)
            for part in literal_parts
        )
        return re.compile(regex + r"/?\Z")

    def match(self, path: str) -> tuple[str, str | None]:
        """The task for `path` and the model named in it, if the route captures one."""
        for regex, task in self._routes:
            found = regex.match(path)
            if found:
                return task, found.groupdict().get("model")
        return "other", None


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """The caller's API key, from `Authorization: Bearer`, `api-key` or `x-api-key`."""
    authorization = headers.get("Authorization")
    if authorization:
        found = _BEARER.match(authorization)
        if found:
            return found.group(1)
    for name in _KEY_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def key_digest(api_key: str) -> str:
    """The sha256 hex digest that config uses to name a key without storing it."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None for anything else (empty, binary, bad UTF-8, array)."""
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


class Classifier:
    def __init__(self, routes: Iterable[Route], api_keys: Mapping[str, str]) -> None:
        self._table = RouteTable(routes)
        self._api_keys = dict(api_keys)

    def tenant(self, headers: Mapping[str, str]) -> str:
        key = api_key_from(headers)
        if key is None:
            return ANONYMOUS
        return self._api_keys.get(key_digest(key), ANONYMOUS)

    def classify(self, path: str, headers: Mapping[str, str], body: bytes) -> Classification:
        task, path_model = self._table.match(path)
        parsed = parse_json_object(body)
        model = path_model
        streaming = path.rstrip("/").endswith("_stream")
        if parsed is not None:
            body_model = parsed.get("model")
            if isinstance(body_model, str) and body_model:
                model = body_model
            streaming = streaming or parsed.get("stream") is True
        return Classification(task, model, self.tenant(headers), streaming, parsed)
