"""`joulegate grafana push` against a fake Grafana: the requests grafana-client sends.

The fake implements the few Grafana HTTP API endpoints push calls (datasource by uid, folders,
dashboards/db) with Grafana's status codes, and records every request.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from proxy.cli import main
from proxy.grafana import FOLDER_UID, PUSHED_DATASOURCE_UID, dashboards
from tests.servers import closed_port_url, serve

pytest.importorskip("grafana_client", reason="needs grafana-client")

TOKEN = "glsa_test-token"


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class FakeGrafana:
    requests: list[Seen] = field(default_factory=list)
    datasources: dict[str, Any] = field(default_factory=dict)
    folders: dict[str, Any] = field(default_factory=dict)
    dashboards: dict[str, Any] = field(default_factory=dict)

    def calls(self) -> list[tuple[str, str]]:
        return [(seen.method, seen.path) for seen in self.requests]

    def bodies(self, method: str, path: str) -> list[Any]:
        return [seen.body for seen in self.requests if (seen.method, seen.path) == (method, path)]


FAKE = web.AppKey("fake", FakeGrafana)


def not_found(message: str) -> web.Response:
    return web.json_response({"message": message}, status=404)


def create_fake_grafana(prefix: str = "") -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        fake = request.app[FAKE]
        authorization = request.headers.get("Authorization")
        fake.requests.append(
            Seen(request.method, request.path.removeprefix(prefix), authorization, body)
        )
        if authorization != f"Bearer {TOKEN}":
            return web.json_response({"message": "Unauthorized"}, status=401)
        return await handler(request)

    async def get_datasource(request: web.Request) -> web.Response:
        found = request.app[FAKE].datasources.get(request.match_info["uid"])
        return web.json_response(found) if found else not_found("Data source not found")

    async def create_datasource(request: web.Request) -> web.Response:
        body = await request.json()
        if body["uid"] in request.app[FAKE].datasources:
            return web.json_response({"message": "data source exists"}, status=409)
        request.app[FAKE].datasources[body["uid"]] = body
        return web.json_response({"id": 1, "message": "Datasource added", "datasource": body})

    async def update_datasource(request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        if uid not in request.app[FAKE].datasources:
            return not_found("Data source not found")
        request.app[FAKE].datasources[uid] = await request.json()
        return web.json_response({"id": 1, "message": "Datasource updated"})

    async def get_folder(request: web.Request) -> web.Response:
        found = request.app[FAKE].folders.get(request.match_info["uid"])
        return web.json_response(found) if found else not_found("folder not found")

    async def create_folder(request: web.Request) -> web.Response:
        body = await request.json()
        request.app[FAKE].folders[body["uid"]] = {**body, "id": 7, "version": 1}
        return web.json_response(request.app[FAKE].folders[body["uid"]])

    async def update_folder(request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        if uid not in request.app[FAKE].folders:
            return not_found("folder not found")
        request.app[FAKE].folders[uid].update(await request.json())
        return web.json_response(request.app[FAKE].folders[uid])

    async def save_dashboard(request: web.Request) -> web.Response:
        body = await request.json()
        dashboard = body["dashboard"]
        fake = request.app[FAKE]
        if body.get("folderUid") not in fake.folders:
            return web.json_response({"message": "folder not found"}, status=400)
        if dashboard["uid"] in fake.dashboards and not body.get("overwrite"):
            return web.json_response({"message": "version-mismatch"}, status=412)
        fake.dashboards[dashboard["uid"]] = body
        return web.json_response(
            {
                "id": 1,
                "uid": dashboard["uid"],
                "url": f"{prefix}/d/{dashboard['uid']}/slug",
                "status": "success",
                "version": 1,
            }
        )

    app = web.Application(middlewares=[record])
    app[FAKE] = FakeGrafana()
    api = f"{prefix}/api"
    app.router.add_get(api + "/datasources/uid/{uid}", get_datasource)
    app.router.add_put(api + "/datasources/uid/{uid}", update_datasource)
    app.router.add_post(api + "/datasources", create_datasource)
    app.router.add_get(api + "/folders/{uid}", get_folder)
    app.router.add_put(api + "/folders/{uid}", update_folder)
    app.router.add_post(api + "/folders", create_folder)
    app.router.add_post(api + "/dashboards/db", save_dashboard)
    return app


async def push(*arguments: str) -> int:
    """The CLI in a thread: grafana-client is synchronous, the fake runs on this loop."""
    return await asyncio.to_thread(main, ["grafana", "push", *arguments])


async def test_first_push_creates_datasource_folder_and_dashboards(
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = create_fake_grafana()
    async with serve(app) as url:
        code = await push("--url", url, "--token", TOKEN, "--datasource-url", "http://prom:9090")
    assert code == 0, capsys.readouterr().err
    fake = app[FAKE]
    expected = dashboards()
    assert fake.calls() == [
        ("GET", f"/api/datasources/uid/{PUSHED_DATASOURCE_UID}"),
        ("POST", "/api/datasources"),
        ("GET", f"/api/folders/{FOLDER_UID}"),
        ("POST", "/api/folders"),
        *[("POST", "/api/dashboards/db")] * len(expected),
    ]
    assert all(seen.authorization == f"Bearer {TOKEN}" for seen in fake.requests)
    (datasource,) = fake.bodies("POST", "/api/datasources")
    assert datasource == {
        "uid": PUSHED_DATASOURCE_UID,
        "name": "Prometheus (joulegate)",
        "type": "prometheus",
        "access": "proxy",
        "url": "http://prom:9090",
        "jsonData": {"timeInterval": "15s", "httpMethod": "POST"},
    }
    assert fake.bodies("POST", "/api/folders") == [{"title": "joulegate", "uid": FOLDER_UID}]
    saved = fake.bodies("POST", "/api/dashboards/db")
    assert [body["dashboard"]["uid"] for body in saved] == [d["uid"] for d in expected.values()]
    for body, generated in zip(saved, expected.values(), strict=True):
        assert body["overwrite"] is True
        assert body["folderUid"] == FOLDER_UID
        # The generated dashboard, opening on the pushed datasource.
        want = copy.deepcopy(generated)
        want["templating"]["list"][0]["current"] = {
            "selected": True,
            "text": "Prometheus (joulegate)",
            "value": PUSHED_DATASOURCE_UID,
        }
        assert body["dashboard"] == want
    out = capsys.readouterr().out
    assert "created datasource Prometheus (joulegate) -> http://prom:9090" in out
    assert "saved dashboard joulegate: inference energy /d/joulegate-energy/slug" in out


async def test_pushing_again_updates_in_place(capsys: pytest.CaptureFixture[str]) -> None:
    app = create_fake_grafana()
    async with serve(app) as url:
        arguments = ("--url", url, "--token", TOKEN, "--datasource-url", "http://prom:9090")
        assert await push(*arguments) == 0
        app[FAKE].requests.clear()
        arguments = ("--url", url, "--token", TOKEN, "--datasource-url", "http://prom2:9090")
        assert await push(*arguments, "--folder", "Energy") == 0
    fake = app[FAKE]
    assert ("POST", "/api/datasources") not in fake.calls()
    assert ("POST", "/api/folders") not in fake.calls()
    (update,) = fake.bodies("PUT", f"/api/datasources/uid/{PUSHED_DATASOURCE_UID}")
    assert update["url"] == "http://prom2:9090"
    assert fake.datasources[PUSHED_DATASOURCE_UID]["url"] == "http://prom2:9090"
    (folder,) = fake.bodies("PUT", f"/api/folders/{FOLDER_UID}")
    assert folder["title"] == "Energy" and folder["overwrite"] is True
    assert len(fake.bodies("POST", "/api/dashboards/db")) == len(dashboards())
    assert "updated datasource" in capsys.readouterr().out


async def test_without_datasource_url_the_dashboards_are_pushed_unchanged() -> None:
    app = create_fake_grafana()
    async with serve(app) as url:
        assert await push("--url", url, "--token", TOKEN) == 0
    fake = app[FAKE]
    assert not [call for call in fake.calls() if "datasources" in call[1]]
    saved = [body["dashboard"] for body in fake.bodies("POST", "/api/dashboards/db")]
    assert saved == list(dashboards().values())


async def test_grafana_under_a_sub_path() -> None:
    app = create_fake_grafana(prefix="/grafana")
    async with serve(app) as url:
        assert await push("--url", f"{url}/grafana", "--token", TOKEN) == 0
    assert app[FAKE].calls()[-1] == ("POST", "/api/dashboards/db")


async def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    app = create_fake_grafana()
    async with serve(app) as url:
        assert await push("--url", url) == 0
    assert {seen.authorization for seen in app[FAKE].requests} == {f"Bearer {TOKEN}"}


async def test_a_refused_token_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    app = create_fake_grafana()
    async with serve(app) as url:
        assert await push("--url", url, "--token", "wrong") == 1
    assert app[FAKE].dashboards == {}
    err = capsys.readouterr().err
    assert err.startswith("joulegate: grafana push: Grafana answered 401") and err.count("\n") == 1


async def test_an_unreachable_grafana_fails_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = closed_port_url()
    assert await push("--url", url, "--token", TOKEN, "--timeout", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"joulegate: grafana push: cannot reach Grafana at {url}")


def test_no_token_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert main(["grafana", "push", "--url", "http://127.0.0.1:1"]) == 2
    assert "--token" in capsys.readouterr().err
