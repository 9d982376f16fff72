"""Who may read joulegate's own endpoints: the admin, one tenant, or anyone.

Records and budgets say how much each tenant spends, which a tenant's competitor or a
curious colleague should not read. With `admin_token` set, the admin token reads everything
and a tenant's API key reads that tenant's own records and budgets only; without it the
endpoints stay open, as a proxy on a developer's laptop should be. `/metrics` has its own
token (`metrics_token`) because Prometheus holds it, not a person.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.classify import api_key_from, bearer_token
from proxy.errors import error_response


@dataclass(frozen=True, slots=True)
class Reader:
    """Who asks: `tenant` None reads everything (the admin, or nobody configured one)."""

    tenant: str | None

    def may_read(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


EVERYONE = Reader(None)


def _same(offered: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal a token's prefix."""
    return hmac.compare_digest(
        offered.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _unauthorized(message: str, code: str, invalid: bool) -> web.Response:
    challenge = 'Bearer realm="joulegate"' + (', error="invalid_token"' if invalid else "")
    return error_response(
        401, message, "authentication_error", code, headers={"WWW-Authenticate": challenge}
    )


class AccessControl:
    """Checks the credential of a request to joulegate's own endpoints.

    `key_tenant` is the classifier's lookup of a request's API key (the same headers and
    digests as for proxied traffic), so a tenant reads with the key it sends requests with."""

    def __init__(
        self,
        admin_token: str | None,
        metrics_token: str | None,
        key_tenant: Callable[[Mapping[str, str]], str | None],
    ) -> None:
        self.admin_token = admin_token
        self.metrics_token = metrics_token
        self.key_tenant = key_tenant

    def _is_admin(self, token: str | None) -> bool:
        return token is not None and self.admin_token is not None and _same(token, self.admin_token)

    def reader(self, headers: Mapping[str, str]) -> Reader | web.Response:
        """Who may read records and budgets, or the 401 to answer."""
        if self.admin_token is None or self._is_admin(bearer_token(headers)):
            return EVERYONE
        tenant = self.key_tenant(headers)
        if tenant is not None:
            return Reader(tenant)
        if api_key_from(headers) is None and "Authorization" not in headers:
            return _unauthorized(
                "This endpoint requires `Authorization: Bearer <admin token>` or a tenant's"
                " API key.",
                "admin_token_required",
                invalid=False,
            )
        return _unauthorized(
            "The credential is neither the admin token nor a known API key.",
            "invalid_admin_token",
            invalid=True,
        )

    def metrics_refusal(self, headers: Mapping[str, str]) -> web.Response | None:
        """None when `/metrics` may be read (no metrics token, or the metrics or admin token),
        else the 401 to answer."""
        if self.metrics_token is None:
            return None
        token = bearer_token(headers)
        if token is not None and (_same(token, self.metrics_token) or self._is_admin(token)):
            return None
        if token is None and "Authorization" not in headers:
            return _unauthorized(
                "/metrics requires `Authorization: Bearer <metrics token>`.",
                "metrics_token_required",
                invalid=False,
            )
        return _unauthorized("The metrics token is not valid.", "invalid_metrics_token", True)
