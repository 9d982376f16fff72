"""Fixtures for tests that need the model server: tiny models, served in-process.

Use them from a test module with ``pytest_plugins = ["tests.model_server_fixtures"]``.
The tiny models are built and loaded once per session; each test gets its own server (and
its own worker threads) over them, on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from model_server.app import RunningServer, start
from model_server.config import ServerConfig, load_config
from model_server.registry import ModelRegistry, load_registry
from model_server.workers import Job, WorkerPool

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture(scope="session")
def tiny_models_config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers", reason="needs the model-server extra")
    from model_server.tiny import build_tiny_models  # imports torch

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_config(tiny_models_config_path: Path) -> ServerConfig:
    return load_config(tiny_models_config_path)


@pytest.fixture(scope="session")
def tiny_registry(tiny_config: ServerConfig) -> ModelRegistry:
    return load_registry(tiny_config)


@pytest.fixture
async def start_model_server(
    tiny_config: ServerConfig, tiny_registry: ModelRegistry
) -> AsyncIterator[StartServer]:
    """A factory: ``await start_model_server(queue_size=1)``; every server is stopped after."""
    servers: list[RunningServer] = []

    async def _start(**overrides: object) -> RunningServer:
        config = replace(tiny_config, **overrides)  # type: ignore[arg-type]
        server = await start(config, models=tiny_registry)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.state.pool.step_hook = None
        await server.stop()


@pytest.fixture
async def model_server(start_model_server: StartServer) -> RunningServer:
    return await start_model_server()


class Blocker:
    """A job that occupies a device thread until released: makes queueing deterministic."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, job: Job[None]) -> None:
        self.started.set()
        if not self.release.wait(30):
            raise TimeoutError("blocker was never released")


@pytest.fixture
def blockers(start_model_server: StartServer) -> Iterator[Callable[[WorkerPool, str], Blocker]]:
    """``block(pool, device)`` puts a Blocker on the device; all are released at teardown.

    It depends on ``start_model_server`` so that it is torn down (releasing the threads)
    before the servers are stopped.
    """
    made: list[Blocker] = []

    def block(pool: WorkerPool, device: str) -> Blocker:
        blocker = Blocker()
        pool.submit(device, blocker)
        made.append(blocker)
        return blocker

    yield block
    for blocker in made:
        blocker.release.set()
