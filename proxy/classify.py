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
KEY_HEADERS = ("api-key", "x-api-key")


# Made once per request: not frozen, since a frozen dataclass is about 5 times slower to
# create (each field set through object.__setattr__). Treat it as read-only all the same.
@dataclass(slots=True)
class Classification:
    task: str
    model: str | None  # None when neither the body nor the path names one
    tenant: str
    streaming: bool
    body: dict[str, Any] | None  # the parsed JSON object, None when the body is not one
    team: str | None = None
    identified: bool = False  # the tenant came from a known key or the trusted header


_MATCHES_KEPT = 1024


class RouteTable:
    """First matching route wins; paths outside the table are task `other`."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = [(self._compile(route.path), route.task) for route in routes]
        # Answers for recent paths: traffic uses a handful of paths, and trying a dozen
        # patterns in order costs more than the rest of classifying. Paths come from
        # clients, so the cache is bounded (emptied when full).
        self._matched: dict[str, tuple[str, str | None]] = {}

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
        known = self._matched.get(path)
        if known is not None:
            return known
        answer: tuple[str, str | None] = ("other", None)
        for regex, task in self._routes:
            found = regex.match(path)
            if found:
                answer = task, found.groupdict().get("model")
                break
        if len(self._matched) >= _MATCHES_KEPT:
            self._matched.clear()
        self._matched[path] = answer
        return answer


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of `Authorization: Bearer <token>`, if the request carries one."""
    authorization = headers.get("Authorization")
    if authorization:
        found = _BEARER.match(authorization)
        if found:
            return found.group(1)
    return None


def api_key_from(headers: Mapping[str, str]) -> str | None:
    """The caller's API key, from `Authorization: Bearer`, `api-key` or `x-api-key`."""
    token = bearer_token(headers)
    if token is not None:
        return token
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def key_digest(api_key: str) -> str:
    """The sha256 hex digest that config uses to name a key without storing it."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\n\r"


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None for anything else (empty, binary, bad UTF-8, array).

    What `json.loads` gives, without its layers of Python around the C scanner: this runs
    for every request's body and every JSON answer. A body that `json.loads` would read as
    UTF-16 or UTF-32 (NUL bytes at its start) still goes through `json.loads`."""
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        if b"\x00" in body[:4]:
            parsed = json.loads(body)
        else:
            text = body.decode("utf-8", "surrogatepass")  # as json.loads decodes UTF-8
            start = len(text) - len(text.lstrip(_JSON_SPACE))
            if text[start : start + 1] != "{":
                return None  # only JSON's own whitespace may come before it
            parsed, end = _DECODER.scan_once(text, start)
            if end != len(text) and text[end:].strip(_JSON_SPACE):
                return None  # more after the object
    except (ValueError, RecursionError, StopIteration):
        return None
    return parsed if isinstance(parsed, dict) else None


_TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Longer than any model id in use (a Hugging Face repo name is at most 96 characters).
MAX_MODEL_NAME = 256


def _usable_model_name(name: Any) -> bool:
    """Whether a client's model name can become a metric label and ledger text: a string of
    printable characters, not too long. A lone surrogate (`"\\ud800"` is valid JSON) cannot
    be encoded as UTF-8, so it would break every later /metrics scrape and its ledger row;
    a NUL is refused by PostgreSQL; a megabyte-long name would bloat every scrape."""
    return isinstance(name, str) and 0 < len(name) <= MAX_MODEL_NAME and name.isprintable()


class Classifier:
    """Task and model from the route and body; tenant from the API key or, behind a gateway
    that authenticates callers itself, from a trusted header it sets (`tenant_header`)."""

    def __init__(
        self,
        routes: Iterable[Route],
        api_keys: Mapping[str, str],
        *,
        teams: Mapping[str, str] | None = None,
        tenant_header: str | None = None,
    ) -> None:
        self._table = RouteTable(routes)
        self._api_keys = dict(api_keys)
        self._teams = dict(teams or {})
        self._tenant_header = tenant_header

    def tenant(self, headers: Mapping[str, str]) -> str:
        return self.identify(headers)[0]

    def identify(self, headers: Mapping[str, str]) -> tuple[str, bool]:
        """The tenant, and whether it was identified (not just `anonymous` by default)."""
        if self._tenant_header is not None:
            named = headers.get(self._tenant_header, "").strip()
            if _TENANT_NAME.fullmatch(named):
                return named, True
        tenant = self.key_tenant(headers)
        return (ANONYMOUS, False) if tenant is None else (tenant, True)

    def key_tenant(self, headers: Mapping[str, str]) -> str | None:
        """The tenant whose configured API key the request carries, if any: the credential
        that proves who a caller is (the trusted header only says who a gateway billed)."""
        key = api_key_from(headers)
        return None if key is None else self._api_keys.get(key_digest(key))

    def classify(self, path: str, headers: Mapping[str, str], body: bytes) -> Classification:
        task, path_model = self._table.match(path)
        parsed = parse_json_object(body)
        model = path_model if _usable_model_name(path_model) else None
        streaming = path.rstrip("/").endswith("_stream")
        if parsed is not None:
            body_model = parsed.get("model")
            if _usable_model_name(body_model):
                model = body_model
            streaming = streaming or parsed.get("stream") is True
        tenant, identified = self.identify(headers)
        return Classification(
            task, model, tenant, streaming, parsed, self._teams.get(tenant), identified
        )
