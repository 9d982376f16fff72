"""Device and dtype choices shared by every task loader."""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch

from model_server.config import ConfigError, ModelSpec


def resolve_device(spec: str) -> str:
    """``auto`` is the first GPU when there is one, else the CPU; a missing GPU is an error."""
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    index = 0 if spec == "cuda" else int(spec.partition(":")[2])
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPUs")
    return f"cuda:{index}"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is float16 on a GPU (half the memory traffic, hence energy) and float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def pretrained_kwargs(spec: ModelSpec, device: str) -> dict[str, Any]:
    """Arguments for every ``from_pretrained``: dtype, and no network for local folders."""
    quiet_progress_bars()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(spec.dtype, device)}
    if spec.local:
        kwargs["local_files_only"] = True
    return kwargs


def has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def quiet_progress_bars() -> None:
    """Loading and denoising progress bars are noise in a server's log."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
