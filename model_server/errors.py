"""OpenAI-format errors.

Every failure leaves the server as ``{"error": {"message", "type", "code", "param"}}`` so the
OpenAI SDKs (and joulegate, which records the status code) see the same shape they get from
the real API. Handlers raise :class:`APIError`; the middleware in ``app.py`` turns it, and
anything unexpected, into a JSON response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web


@dataclass(eq=False)  # exceptions compare and hash by identity
class APIError(Exception):
    """An error that is meant for the client, with the HTTP status it should get."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad_param(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 that names the offending field, as the OpenAI API does."""
    return APIError(400, message, code=code, param=param)


def unsupported(param: str, message: str | None = None) -> APIError:
    """A 400 for an OpenAI field this server understands but cannot honour."""
    return APIError(
        400,
        message or f"'{param}' is not supported by this server",
        code="unsupported_parameter",
        param=param,
    )


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model '{name}' does not exist on this server",
        code="model_not_found",
        param="model",
    )


def queue_full(retry_after: int) -> APIError:
    """503 with Retry-After: the device queue is full; the client should come back later."""
    return APIError(
        503,
        "The server is overloaded: the device queue is full, retry later",
        type="server_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def internal_error() -> APIError:
    """What the client sees for a bug: nothing from the exception, which may contain input."""
    return APIError(500, "The server had an error processing the request", type="server_error")
