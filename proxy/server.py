"""The aiohttp application: joulegate's own endpoints beside the proxied API."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import __version__
from proxy.classify import Classifier
from proxy.config import Config
from proxy.forward import Forwarder
from proxy.metrics import LabelGuard, Metrics
from proxy.recorder import Recorder
from proxy.records import RecordStore

log = logging.getLogger("joulegate")

RECORDER = web.AppKey("recorder", Recorder)
FORWARDER = web.AppKey("forwarder", Forwarder)
CONFIG = web.AppKey("config", Config)


async def health(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    recorder = request.app[RECORDER]
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "upstream": config.upstream,
            "in_flight": len(recorder.in_flight),
        }
    )


async def request_record(request: web.Request) -> web.Response:
    request_id = request.match_info["id"]
    record = request.app[RECORDER].store.get(request_id)
    if record is None:
        return web.json_response(
            {
                "error": {
                    "message": f"No finished request with id {request_id!r} is known.",
                    "type": "not_found_error",
                    "code": "request_not_found",
                    "param": "id",
                }
            },
            status=404,
        )
    return web.json_response(record.to_json())


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RECORDER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: Config) -> web.Application:
    """The whole proxy as an aiohttp application, ready for `web.AppRunner` or `run_app`."""
    guard = LabelGuard(config.tenants, config.models, config.max_models)
    recorder = Recorder(Metrics(guard), RecordStore())
    forwarder = Forwarder(config, Classifier(config.routes, config.api_keys), recorder)

    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[RECORDER] = recorder
    app[FORWARDER] = forwarder

    async def pool(app: web.Application):  # type: ignore[no-untyped-def]
        await forwarder.open()
        yield
        await forwarder.close()

    app.cleanup_ctx.append(pool)
    app.router.add_get("/joulegate/health", health)
    app.router.add_get("/joulegate/requests/{id}", request_record)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    return app


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are drained on the way out."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = create_app(config)
    log.info("joulegate %s: %s -> %s", __version__, config.listen, config.upstream)
    web.run_app(
        app,
        host=config.listen_host,
        port=config.listen_port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        loop=loop,
    )
