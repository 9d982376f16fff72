"""Task runners: the only code that imports torch, transformers and diffusers.

Each module exposes ``load(spec, device) -> runner``; the runner's methods run on the device's
worker thread and receive the :class:`~model_server.workers.Job` so they can count steps and
stop when the client goes away. Modules are imported on demand, so a server without an image
model never pays for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from model_server.config import ModelSpec

_MODULES: dict[str, str] = {
    "text-generation": "model_server.tasks.text_generation",
    "image-generation": "model_server.tasks.image_generation",
    "embeddings": "model_server.tasks.embeddings",
    "text-classification": "model_server.tasks.text_classification",
    "summarization": "model_server.tasks.summarization",
    "image-classification": "model_server.tasks.image_classification",
}


def load_runner(spec: ModelSpec, device: str) -> Any:
    """Load ``spec`` onto ``device`` (blocking; call it on that device's thread)."""
    module = importlib.import_module(_MODULES[spec.task])
    return module.load(spec, device)
