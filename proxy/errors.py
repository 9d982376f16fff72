"""Answers joulegate gives itself, in the OpenAI error format clients already parse."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    """`{"error": {"message", "type", "code", "param"}}` with the given HTTP status."""
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param}}
    return web.json_response(body, status=status, headers=headers)
