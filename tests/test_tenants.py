"""Tenants and teams: from API keys or a trusted gateway header; unknown callers refused
when a key is required."""

from __future__ import annotations

import aiohttp

from proxy.classify import key_digest
from proxy.server import RECORDER
from tests.fake_openai import SEEN, create_fake_openai
from tests.servers import joulegate, metric_series, serve, settled

KEY = "sk-search-team-key"


async def test_keys_teams_and_required_keys() -> None:
    upstream_app = create_fake_openai()
    settings = {
        "api_keys": {key_digest(KEY): "search"},
        "teams": {"search": "platform"},
        "require_api_key": True,
    }
    async with serve(upstream_app) as upstream, joulegate(upstream, **settings) as (proxy, app):
        async with aiohttp.ClientSession() as client:
            body = {"model": "m", "input": "x"}
            async with client.post(
                proxy + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}
            ) as response:
                assert response.status == 200
                known = response.headers["X-Request-Id"]
            for headers in ({"Authorization": "Bearer sk-stolen"}, {}):
                async with client.post(
                    proxy + "/v1/embeddings", json=body, headers=headers
                ) as response:
                    assert response.status == 401
                    error = (await response.json())["error"]
                    assert error["code"] == "invalid_api_key"
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
        store = app[RECORDER].store
    record = store.get(known)
    assert record is not None
    assert (record.tenant, record.team) == ("search", "platform")
    assert len(upstream_app[SEEN].bodies) == 1  # refused requests never reached the upstream
    requests = metric_series(exposition, "joulegate_requests_total")
    assert requests['{code="401",model="m",task="embeddings",tenant="anonymous"}'] == 2.0
    assert KEY not in exposition


async def test_a_trusted_gateway_header_names_the_tenant() -> None:
    settings = {"tenant_header": "X-Tenant", "teams": {"ads": "growth"}}
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            ids = {}
            for tenant in ("ads", "made-up-tenant", "bad tenant!"):
                async with client.post(
                    proxy + "/v1/embeddings",
                    json={"model": "m", "input": "x"},
                    headers={"X-Tenant": tenant},
                ) as response:
                    ids[tenant] = response.headers["X-Request-Id"]
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
        store = app[RECORDER].store
    ads, made_up, bad = (store.get(ids[t]) for t in ("ads", "made-up-tenant", "bad tenant!"))
    assert ads is not None and (ads.tenant, ads.team) == ("ads", "growth")
    assert made_up is not None and made_up.tenant == "made-up-tenant"
    assert bad is not None and bad.tenant == "anonymous"  # not a tenant name: ignored
    labels = metric_series(exposition, "joulegate_requests_total")
    assert 'tenant="made-up-tenant"' not in exposition  # outside the configured set: other
    assert labels['{code="200",model="m",task="embeddings",tenant="other"}'] == 1.0
    assert labels['{code="200",model="m",task="embeddings",tenant="ads"}'] == 1.0
