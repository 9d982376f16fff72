"""Who may read what: the admin token, tenant-scoped reads of records and budgets, the metrics
token, joulegate's own upstream key, and secrets that never reach a log or the ledger.

Every test runs a real joulegate in front of a real (fake OpenAI) upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.classify import key_digest
from proxy.config import load_config
from proxy.server import RECORDER, create_app
from tests.fake_openai import SEEN, create_fake_openai
from tests.servers import free_port, joulegate, serve, settled

ALPHA_KEY = "sk-alpha-0c1d2e3f4a5b6c7d"
BETA_KEY = "sk-beta-9a8b7c6d5e4f3a2b"
STRANGER_KEY = "sk-stranger-1122334455"  # a key no tenant has
ADMIN_TOKEN = "admin-tok-5f6e7d8c9b0a1b2c"
METRICS_TOKEN = "metrics-tok-a1b2c3d4e5f6"
UPSTREAM_KEY = "sk-upstream-e5f6a7b8c9d0"
API_KEYS = {key_digest(ALPHA_KEY): "alpha", key_digest(BETA_KEY): "beta"}
GUARDED = {"api_keys": API_KEYS, "admin_token": ADMIN_TOKEN}
UNKNOWN_ID = "never-sent"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def chat(
    client: aiohttp.ClientSession,
    proxy: str,
    request_id: str,
    headers: Mapping[str, str],
    *,
    stream: bool = False,
) -> None:
    """One chat completion through the proxy, answered 200 by the upstream."""
    body = {"model": "m", "messages": [], "stream": stream}
    async with client.post(
        proxy + "/v1/chat/completions", json=body, headers={"X-Request-Id": request_id, **headers}
    ) as response:
        await response.read()
        assert response.status == 200
        assert response.headers["X-Request-Id"] == request_id


async def get(
    client: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    """Status, JSON body (text when it is not JSON) and headers of a GET."""
    async with client.get(url, headers=headers or {}) as response:
        text = await response.text()
        is_json = response.content_type == "application/json"
        return response.status, json.loads(text) if is_json else text, response.headers


def assert_unauthorized(answer: tuple[int, Any, Mapping[str, str]], code: str) -> None:
    status, body, headers = answer
    assert status == 401, body
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == code
    assert headers["WWW-Authenticate"].startswith("Bearer ")


async def assert_like_an_unknown_id(
    client: aiohttp.ClientSession, proxy: str, request_id: str, headers: Mapping[str, str]
) -> None:
    """Another tenant's record answers exactly as an id nobody sent: its existence is secret."""
    status, body, _ = await get(client, f"{proxy}/joulegate/requests/{request_id}", headers)
    unknown_status, unknown, _ = await get(
        client, f"{proxy}/joulegate/requests/{UNKNOWN_ID}", headers
    )
    assert (status, unknown_status) == (404, 404)
    unknown["error"]["message"] = unknown["error"]["message"].replace(
        repr(UNKNOWN_ID), repr(request_id)
    )
    assert body == unknown
    assert body["error"]["code"] == "request_not_found"


async def record_tenant(
    client: aiohttp.ClientSession, proxy: str, request_id: str, headers: Mapping[str, str]
) -> str:
    status, body, _ = await get(client, f"{proxy}/joulegate/requests/{request_id}", headers)
    assert status == 200, body
    assert body["id"] == request_id
    return body["tenant"]


# ---- without an admin token: open, as today ----


async def test_without_an_admin_token_the_endpoints_stay_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="joulegate")
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, api_keys=API_KEYS) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        await chat(client, proxy, "open-1", bearer(ALPHA_KEY))
        await settled(app)
        assert await record_tenant(client, proxy, "open-1", {}) == "alpha"
        assert await record_tenant(client, proxy, "open-1", bearer(BETA_KEY)) == "alpha"
        assert (await get(client, proxy + "/joulegate/budgets"))[:2] == (200, {"budgets": []})
        assert (await get(client, proxy + "/metrics"))[0] == 200
    warnings = [r for r in caplog.records if "admin_token" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING

    caplog.clear()
    for settings in ({}, GUARDED):  # no tenant keys, or an admin token: nothing to warn about
        create_app(load_config(environ={}, overrides={"ledger": "off", **settings}))
    assert not [r for r in caplog.records if "admin_token" in r.getMessage()]


# ---- with an admin token: the admin reads everything, a tenant its own ----


async def test_admin_token_guards_records_and_each_tenant_reads_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, **GUARDED) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        await chat(client, proxy, "alpha-1", bearer(ALPHA_KEY))
        await chat(client, proxy, "beta-1", {"x-api-key": BETA_KEY}, stream=True)
        await chat(client, proxy, "anon-1", {})
        await chat(client, proxy, "stranger-1", bearer(STRANGER_KEY))
        await settled(app)
        records = f"{proxy}/joulegate/requests"

        # No credential, or one that is neither the admin token nor a tenant's key: 401.
        assert_unauthorized(await get(client, f"{records}/alpha-1"), "admin_token_required")
        for wrong in (
            bearer(ADMIN_TOKEN + "x"),
            bearer(ADMIN_TOKEN[:-1]),
            bearer(STRANGER_KEY),
            {"api-key": STRANGER_KEY},
            {"Authorization": ADMIN_TOKEN},  # not a Bearer credential
        ):
            assert_unauthorized(
                await get(client, f"{records}/alpha-1", wrong), "invalid_admin_token"
            )
        assert_unauthorized(
            await get(client, f"{records}/{UNKNOWN_ID}"), "admin_token_required"
        )  # 401 before any lookup: an outsider learns nothing about ids either

        # The admin reads every record.
        for request_id, tenant in [
            ("alpha-1", "alpha"),
            ("beta-1", "beta"),
            ("anon-1", "anonymous"),
            ("stranger-1", "anonymous"),
        ]:
            assert await record_tenant(client, proxy, request_id, bearer(ADMIN_TOKEN)) == tenant

        # A tenant reads its own, with any header the classifier takes its key from.
        for alpha in (bearer(ALPHA_KEY), {"api-key": ALPHA_KEY}, {"x-api-key": ALPHA_KEY}):
            assert await record_tenant(client, proxy, "alpha-1", alpha) == "alpha"
            for others in ("beta-1", "anon-1", "stranger-1"):
                await assert_like_an_unknown_id(client, proxy, others, alpha)
        assert await record_tenant(client, proxy, "beta-1", bearer(BETA_KEY)) == "beta"
        await assert_like_an_unknown_id(client, proxy, "alpha-1", bearer(BETA_KEY))

        # Liveness probes never need a credential.
        assert (await get(client, proxy + "/joulegate/health"))[0] == 200
        assert (await get(client, proxy + "/joulegate/budgets", bearer(ADMIN_TOKEN)))[:2] == (
            200,
            {"budgets": []},
        )
    logged = caplog.text
    assert "alpha-1" in logged  # the access log was on, and captured
    for secret in (ALPHA_KEY, BETA_KEY, STRANGER_KEY, ADMIN_TOKEN):
        assert secret not in logged


async def test_tenant_reads_from_the_ledger_are_scoped_after_a_restart(tmp_path: Path) -> None:
    settings = {**GUARDED, "ledger": "sqlite", "data_dir": str(tmp_path)}
    async with serve(create_fake_openai()) as upstream:
        async with (
            joulegate(upstream, **settings) as (proxy, app),
            aiohttp.ClientSession() as client,
        ):
            await chat(client, proxy, "kept-alpha", bearer(ALPHA_KEY))
            await chat(client, proxy, "kept-beta", {"api-key": BETA_KEY})
            await settled(app)
        # A new proxy over the same ledger: its memory is empty, so every read is the ledger's.
        async with (
            joulegate(upstream, **settings) as (proxy, app),
            aiohttp.ClientSession() as client,
        ):
            store = app[RECORDER].store
            assert store.get("kept-alpha") is None and store.get("kept-beta") is None
            assert await record_tenant(client, proxy, "kept-alpha", bearer(ALPHA_KEY)) == "alpha"
            assert await record_tenant(client, proxy, "kept-beta", bearer(BETA_KEY)) == "beta"
            await assert_like_an_unknown_id(client, proxy, "kept-beta", bearer(ALPHA_KEY))
            await assert_like_an_unknown_id(client, proxy, "kept-alpha", {"x-api-key": BETA_KEY})
            for request_id in ("kept-alpha", "kept-beta"):
                await record_tenant(client, proxy, request_id, bearer(ADMIN_TOKEN))
            assert_unauthorized(
                await get(client, f"{proxy}/joulegate/requests/kept-alpha"), "admin_token_required"
            )


# ---- budgets ----

BUDGETS = [
    {"name": "alpha-daily", "tenant": "alpha", "limit": "0.001 J", "window": "day"},
    {
        "name": "beta-hourly",
        "tenant": "beta",
        "task": "text-generation",
        "limit": "5 kWh",
        "window": "rolling:1h",
        "action": "reject",
    },
    {"name": "fleet", "tenant": "*", "limit": "10 kWh", "window": "day"},
]
for _budget in BUDGETS:
    _budget.setdefault("action", "alert")


async def test_budgets_show_their_state_to_the_admin_and_each_tenant_its_own() -> None:
    settings = {**GUARDED, "budgets": BUDGETS}
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, **settings) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        await chat(client, proxy, "spend-1", bearer(ALPHA_KEY))
        await settled(app)
        spent = app[RECORDER].store.get("spend-1")
        assert spent is not None and spent.energy_joules is not None
        url = proxy + "/joulegate/budgets"
        status, admin, _ = await get(client, url, bearer(ADMIN_TOKEN))
        alpha = (await get(client, url, bearer(ALPHA_KEY)))[1]
        beta = (await get(client, url, {"x-api-key": BETA_KEY}))[1]
        assert_unauthorized(await get(client, url), "admin_token_required")
        assert_unauthorized(await get(client, url, bearer(STRANGER_KEY)), "invalid_admin_token")
    now = time.time()
    assert status == 200
    by_name = {budget["name"]: budget for budget in admin["budgets"]}
    assert list(by_name) == ["alpha-daily", "beta-hourly", "fleet"]  # configuration order

    daily = by_name["alpha-daily"]
    assert daily["scope"] == {"tenant": "alpha", "model": None, "task": None}
    assert daily["action"] == "alert" and daily["window"] == "day"
    assert daily["limit_joules"] == 0.001
    assert daily["used_joules"] == pytest.approx(spent.energy_joules)
    assert daily["remaining_joules"] == 0.0 and daily["exceeded"] is True
    assert daily["window_start"] <= now < daily["window_end"]
    assert daily["window_end"] - daily["window_start"] == 86400  # a UTC day

    hourly = by_name["beta-hourly"]
    assert hourly["scope"] == {"tenant": "beta", "model": None, "task": "text-generation"}
    assert hourly["action"] == "reject" and hourly["window"] == "rolling:3600s"
    assert hourly["used_joules"] == 0.0 and hourly["exceeded"] is False
    assert hourly["remaining_joules"] == hourly["limit_joules"] == 5 * 3.6e6
    assert hourly["window_end"] - hourly["window_start"] == pytest.approx(3600)
    assert hourly["rejected_requests"] == 0

    fleet = by_name["fleet"]
    assert fleet["used_joules"] == pytest.approx(spent.energy_joules)  # every tenant's spending
    assert fleet["scope"]["tenant"] == "*"

    # A tenant sees its own budgets: not the other's, nor the fleet's (the others' spending).
    assert alpha == {"budgets": [daily]}
    assert [budget["name"] for budget in beta["budgets"]] == ["beta-hourly"]


# ---- the metrics token ----


async def test_metrics_token_guards_metrics_while_health_stays_open() -> None:
    async with (
        serve(create_fake_openai()) as upstream,
        aiohttp.ClientSession() as client,
    ):
        async with joulegate(upstream, api_keys=API_KEYS, metrics_token=METRICS_TOKEN) as (
            proxy,
            _,
        ):
            metrics = proxy + "/metrics"
            assert_unauthorized(await get(client, metrics), "metrics_token_required")
            assert_unauthorized(
                await get(client, metrics, bearer(ALPHA_KEY)), "invalid_metrics_token"
            )
            status, exposition, headers = await get(client, metrics, bearer(METRICS_TOKEN))
            assert status == 200 and "joulegate_meter_up" in exposition
            assert headers["Content-Type"].startswith("text/plain")
            assert (await get(client, proxy + "/joulegate/health"))[0] == 200
            # Without an admin token, records stay open: the two tokens are independent.
            assert (await get(client, proxy + "/joulegate/budgets"))[0] == 200

        async with joulegate(upstream, **GUARDED, metrics_token=METRICS_TOKEN) as (proxy, _):
            metrics = proxy + "/metrics"
            assert (await get(client, metrics, bearer(ADMIN_TOKEN)))[0] == 200
            assert (await get(client, metrics, bearer(METRICS_TOKEN)))[0] == 200
            assert_unauthorized(
                await get(client, metrics, bearer(BETA_KEY)), "invalid_metrics_token"
            )
            # The metrics token is Prometheus's, not an admin's: it reads no records.
            assert_unauthorized(
                await get(client, proxy + "/joulegate/budgets", bearer(METRICS_TOKEN)),
                "invalid_admin_token",
            )
            assert (await get(client, proxy + "/joulegate/health"))[0] == 200

        async with joulegate(upstream, **GUARDED) as (proxy, _):  # admin token only
            assert (await get(client, proxy + "/metrics"))[0] == 200


# ---- credentials towards the upstream ----


async def test_without_an_upstream_key_the_clients_credentials_pass_through() -> None:
    upstream_app = create_fake_openai()
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, api_keys=API_KEYS) as (proxy, _),
        aiohttp.ClientSession() as client,
    ):
        await chat(client, proxy, "through-1", bearer(ALPHA_KEY))
        await chat(client, proxy, "through-2", {"x-api-key": BETA_KEY, "api-key": STRANGER_KEY})
    first, second = upstream_app[SEEN].headers
    assert first["Authorization"] == f"Bearer {ALPHA_KEY}"
    assert (second["x-api-key"], second["api-key"]) == (BETA_KEY, STRANGER_KEY)
    assert "Authorization" not in second


async def test_an_upstream_key_replaces_the_clients_credentials() -> None:
    upstream_app = create_fake_openai()
    async with (
        serve(upstream_app) as upstream,
        joulegate(upstream, api_keys=API_KEYS, upstream_api_key=UPSTREAM_KEY) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        await chat(client, proxy, "own-key-1", bearer(ALPHA_KEY))
        await chat(client, proxy, "own-key-2", {"x-api-key": BETA_KEY, "api-key": BETA_KEY})
        await chat(client, proxy, "own-key-3", {"authorization": f"bearer {STRANGER_KEY}"})
        await chat(client, proxy, "own-key-4", {})
        await settled(app)
        store = app[RECORDER].store
        tenants = [store.get(f"own-key-{n}").tenant for n in range(1, 5)]  # type: ignore[union-attr]
    # The client's key still names its tenant here; the upstream sees joulegate's key only.
    assert tenants == ["alpha", "beta", "anonymous", "anonymous"]
    for seen in upstream_app[SEEN].headers:
        assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert not {"api-key", "x-api-key"} & {name.lower() for name in seen}
        assert not any(key in str(seen) for key in (ALPHA_KEY, BETA_KEY, STRANGER_KEY))


# ---- secrets never reach a log or the ledger ----


async def _wait_until_listening(client: aiohttp.ClientSession, base: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with client.get(base + "/joulegate/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "joulegate did not start: " + log.read_text()[-2000:]
        await asyncio.sleep(0.1)


async def _wait_until_written(client: aiohttp.ClientSession, base: str, count: int) -> None:
    """Until the ledger wrote `count` records to its file: then the WAL holds them."""
    deadline = time.monotonic() + 10
    while True:
        async with client.get(base + "/joulegate/health") as response:
            ledger = (await response.json())["ledger"]
        if ledger["written"] >= count:
            return
        assert time.monotonic() < deadline, f"ledger wrote {ledger} of {count}"
        await asyncio.sleep(0.05)


def _files_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


async def test_raw_keys_and_tokens_never_reach_a_log_or_the_ledger(tmp_path: Path) -> None:
    """`joulegate serve` at log level debug, with the access log on and a SQLite ledger:
    traffic with tenants' keys, unknown keys and every token, then everything it printed and
    every byte of the ledger's files (database and write-ahead log) searched for each."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config_file = tmp_path / "joulegate.yaml"
    config_file.write_text(
        yaml.safe_dump({"api_keys": API_KEYS, "metrics_token": METRICS_TOKEN, "log_level": "debug"})
    )
    output = tmp_path / "joulegate.log"  # a file, not a pipe: debug output never blocks it
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEGATE_")}
    env |= {
        "JOULEGATE_DATA_DIR": str(data_dir),
        "JOULEGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "JOULEGATE_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "JOULEGATE_LEDGER_FLUSH_INTERVAL_SECONDS": "0.05",
    }
    upstream_app = create_fake_openai()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secrets = [ALPHA_KEY, BETA_KEY, STRANGER_KEY, "sk-unknown-77aa88bb99", ADMIN_TOKEN]
    secrets += [METRICS_TOKEN, UPSTREAM_KEY]
    async with serve(upstream_app) as upstream:
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [
                    *(str(Path(sys.executable).with_name("joulegate")), "serve"),
                    *("--config", str(config_file), "--upstream", upstream),
                    *("--listen", f"127.0.0.1:{port}", "--meter", "synthetic:100"),
                ],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            async with aiohttp.ClientSession() as client:
                await _wait_until_listening(client, base, output)
                senders: list[dict[str, str]] = [
                    bearer(ALPHA_KEY),
                    {"x-api-key": BETA_KEY},
                    {"api-key": ALPHA_KEY},
                    bearer(STRANGER_KEY),
                    {"api-key": "sk-unknown-77aa88bb99"},
                    bearer(ADMIN_TOKEN),
                    bearer(METRICS_TOKEN),
                ]
                for n, headers in enumerate(senders):
                    await chat(client, base, f"secret-{n}", headers, stream=n % 2 == 1)
                await _wait_until_written(client, base, len(senders))
                for headers in (bearer(ADMIN_TOKEN), bearer(ALPHA_KEY), bearer(STRANGER_KEY)):
                    await get(client, f"{base}/joulegate/requests/secret-0", headers)
                    await get(client, f"{base}/joulegate/budgets", headers)
                for headers in (bearer(METRICS_TOKEN), bearer(ADMIN_TOKEN), bearer(BETA_KEY)):
                    await get(client, base + "/metrics", headers)
                assert await record_tenant(client, base, "secret-2", bearer(ADMIN_TOKEN)) == (
                    "alpha"
                )
                while_running = _files_bytes(data_dir)
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = await asyncio.get_running_loop().run_in_executor(None, process.wait, 30)
    after_exit = _files_bytes(data_dir)
    printed = output.read_text(errors="replace")
    assert returncode == 0, printed[-2000:]
    # The searches below look where the secrets would be: the access log at debug, the
    # banner, and the ledger's files holding the records.
    assert "tenant=alpha" in printed and "listening on" in printed
    assert any(name.endswith("-wal") for name in while_running), sorted(while_running)
    assert any(b"secret-0" in content and b"alpha" in content for content in while_running.values())
    assert len(upstream_app[SEEN].headers) == len(senders)
    assert all(h["Authorization"] == f"Bearer {UPSTREAM_KEY}" for h in upstream_app[SEEN].headers)
    for secret in secrets:
        assert secret not in printed, f"{secret} printed"
        for snapshot in (while_running, after_exit):
            for name, content in snapshot.items():
                assert secret.encode() not in content, f"{secret} in {name}"
