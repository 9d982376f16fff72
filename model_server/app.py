"""The aiohttp application, and starting it in-process.

From a test::

    server = await start(config, models=registry)   # 127.0.0.1, a free port
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
    ...
    await server.stop()

``models`` is optional: without it the models in ``config`` are loaded, each on its device's
worker thread, before the server accepts connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from model_server.config import ServerConfig
from model_server.errors import APIError, internal_error, queue_full
from model_server.handlers import encoders, images, meta, summarization, text_generation
from model_server.registry import ModelRegistry, load_registry_on_workers
from model_server.state import STATE, ServerState
from model_server.workers import JobCancelled, QueueFullError, WorkerPool

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: ServerConfig, *, models: ModelRegistry | None = None) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=config.max_body_bytes)
    app[STATE] = ServerState(config=config, pool=WorkerPool(config.queue_size), registry=models)
    app.router.add_post("/v1/chat/completions", text_generation.chat_completions)
    app.router.add_post("/v1/completions", text_generation.completions)
    app.router.add_post("/v1/images/generations", images.generations)
    app.router.add_post("/v1/embeddings", encoders.embeddings)
    app.router.add_post("/v1/classifications", encoders.classifications)
    app.router.add_post("/v1/image-classifications", encoders.image_classifications)
    app.router.add_post("/v1/summarizations", summarization.summarizations)
    app.router.add_get("/v1/models", meta.list_models)
    app.router.add_get("/v1/models/{model}", meta.get_model)
    app.router.add_get("/health", meta.health)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if state.registry is None:
        state.registry = await load_registry_on_workers(state.config, state.pool)
        log.info("loaded %d models", len(state.registry))
    yield
    await state.pool.close()


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI error object, whatever raised it."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except QueueFullError as exc:
        return queue_full(exc.retry_after).response()
    except JobCancelled:
        return APIError(503, "The request was cancelled", type="server_error").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "not_found" if exc.status == 404 else None
        error = APIError(exc.status, exc.reason, code=code, headers=_keep_headers(exc))
        return error.response()
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return internal_error().response()


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k.lower() == "allow"}


@dataclass
class RunningServer:
    """A server started by :func:`start`; ``url`` has no trailing slash."""

    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    models: ModelRegistry | None = None,
    access_log: bool = False,
    shutdown_timeout: float = 5.0,
) -> RunningServer:
    """Start serving on ``host:port`` (port 0 picks a free one) in the running loop.

    ``handler_cancellation`` makes aiohttp cancel a handler whose client disconnected, which
    is what lets an abandoned request stop its generation between tokens.
    """
    app = create_app(config, models=models)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return RunningServer(app=app, runner=runner, host=host, port=bound_port)


async def serve_forever(config: ServerConfig, host: str, port: int) -> None:
    """Run until cancelled (Ctrl-C / SIGTERM in the CLI)."""
    server = await start(config, host, port, access_log=True)
    log.info("joulegate-model-server listening on %s", server.url)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
