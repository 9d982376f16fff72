"""Answers joulegate gives itself, in the OpenAI error format clients already parse."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


def error_body(message: str, error_type: str, code: str, param: str | None = None) -> bytes:
    """`{"error": {"message", "type", "code", "param"}}`, as JSON bytes."""
    error = {"message": message, "type": error_type, "code": code, "param": param}
    return json.dumps({"error": error}).encode()


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    """`{"error": {"message", "type", "code", "param"}}` with the given HTTP status."""
    return web.Response(
        text=error_body(message, error_type, code, param).decode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )
