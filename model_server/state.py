"""What the handlers share: the config, the device threads and the loaded models."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from model_server.config import ServerConfig
from model_server.registry import ModelRegistry
from model_server.workers import WorkerPool


@dataclass
class ServerState:
    config: ServerConfig
    pool: WorkerPool
    registry: ModelRegistry | None = None  # set once the models are loaded
    started: float = field(default_factory=time.time)

    @property
    def models(self) -> ModelRegistry:
        if self.registry is None:
            raise RuntimeError("models are not loaded yet")
        return self.registry


STATE = web.AppKey("model_server_state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]
