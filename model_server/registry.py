"""The loaded models, looked up by the ``model`` field of a request.

Loading is separate from serving so that tests (and joulegate's own tests) can load the tiny
models once per session and start as many servers as they like over them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from model_server.config import ModelSpec, ServerConfig
from model_server.errors import bad_param, model_not_found
from model_server.workers import WorkerPool


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: ``runner`` is the task object from ``model_server.tasks``."""

    spec: ModelSpec
    device: str
    runner: Any = field(repr=False)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def task(self) -> str:
        return self.spec.task


class ModelRegistry:
    def __init__(self, models: Iterable[LoadedModel]) -> None:
        self._models = {m.name: m for m in models}

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def find(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise model_not_found(name)
        return model

    def get(self, name: str, task: str) -> LoadedModel:
        """The model called ``name``, which must serve ``task`` (else 400 on ``model``)."""
        model = self.find(name)
        if model.task != task:
            raise bad_param(
                "model",
                f"The model '{name}' is a {model.task} model and cannot serve {task} requests",
            )
        return model


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load one model (blocking). Imports torch and the task's libraries."""
    from model_server.tasks import load_runner
    from model_server.tasks.loading import resolve_device

    device = resolve_device(spec.device)
    return LoadedModel(spec=spec, device=device, runner=load_runner(spec, device))


def load_registry(config: ServerConfig) -> ModelRegistry:
    """Load every model in the calling thread: for tests and tools, not for a live server."""
    return ModelRegistry(load_model(spec) for spec in config.models)


async def load_registry_on_workers(config: ServerConfig, pool: WorkerPool) -> ModelRegistry:
    """Load each model on its device's thread, so that thread is the only one touching it."""
    from model_server.tasks.loading import resolve_device

    models = []
    for spec in config.models:
        device = resolve_device(spec.device)
        models.append(await pool.run(device, lambda job, spec=spec: load_model(spec)))
    return ModelRegistry(models)
