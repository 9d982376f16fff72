"""The model server's configuration: which models to load, where, and how big the queues are.

A YAML file such as::

    queue_size: 16            # jobs that may wait per device (the running one not counted)
    device: auto              # default for every model: auto | cpu | cuda | cuda:N
    dtype: auto               # default for every model: auto | float32 | float16 | bfloat16
    models:
      - name: tiny-gpt2       # the id clients send as "model"
        task: text-generation
        path: ./tiny-gpt2     # a local directory (relative to this file) or a Hub id
        defaults:             # request defaults for fields the client leaves out
          max_tokens: 64

This module only parses and checks; it never imports torch, so a bad file fails fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS: tuple[str, ...] = (
    "text-generation",
    "image-generation",
    "embeddings",
    "text-classification",
    "summarization",
    "image-classification",
)
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
DEFAULT_QUEUE_SIZE = 16
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class ConfigError(ValueError):
    """The configuration file is unusable; the message says where and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve. ``source`` is a local directory or, when ``local`` is false, a Hub id."""

    name: str
    task: str
    source: str
    local: bool = True
    dtype: str = "auto"
    device: str = "auto"
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelSpec, ...]
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def load_config(path: str | Path) -> ServerConfig:
    """Read and check a YAML config; relative model paths resolve against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw, base_dir=path.parent.resolve(), where=str(path))


def parse_config(raw: object, *, base_dir: Path, where: str = "config") -> ServerConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping")
    unknown = set(raw) - {"models", "queue_size", "max_body_bytes", "device", "dtype"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    queue_size = _positive_int(raw.get("queue_size", DEFAULT_QUEUE_SIZE), f"{where}: queue_size")
    max_body = _positive_int(
        raw.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES), f"{where}: max_body_bytes"
    )
    default_device = _device(raw.get("device", "auto"), f"{where}: device")
    default_dtype = _dtype(raw.get("dtype", "auto"), f"{where}: dtype")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{where}: 'models' must be a non-empty list")
    models = tuple(
        _model(item, base_dir, f"{where}: models[{i}]", default_device, default_dtype)
        for i, item in enumerate(models_raw)
    )
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: duplicate model names {duplicates}")
    return ServerConfig(models=models, queue_size=queue_size, max_body_bytes=max_body)


def _model(
    item: object, base_dir: Path, where: str, default_device: str, default_dtype: str
) -> ModelSpec:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = set(item) - {"name", "task", "path", "dtype", "device", "defaults"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    task = item.get("task")
    if task not in TASKS:
        raise ConfigError(f"{where} ({name}): 'task' must be one of {list(TASKS)}, got {task!r}")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where} ({name}): 'path' must be a directory or a Hub id")
    source, local = _resolve_source(path, base_dir)
    if local and not Path(source).is_dir():
        raise ConfigError(f"{where} ({name}): model directory {source} does not exist")
    defaults = item.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{where} ({name}): 'defaults' must be a mapping")
    return ModelSpec(
        name=name,
        task=task,
        source=source,
        local=local,
        dtype=_dtype(item.get("dtype", default_dtype), f"{where} ({name}): dtype"),
        device=_device(item.get("device", default_device), f"{where} ({name}): device"),
        defaults=dict(defaults),
    )


def _resolve_source(path: str, base_dir: Path) -> tuple[str, bool]:
    """Local when it looks like a path or exists beside the config; otherwise a Hub id."""
    expanded = Path(path).expanduser()
    if path.startswith(("/", ".", "~")) or expanded.is_absolute():
        return str((base_dir / expanded).resolve()), True
    beside = base_dir / expanded
    if beside.exists():
        return str(beside.resolve()), True
    return path, False


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _dtype(value: object, where: str) -> str:
    if value not in DTYPES:
        raise ConfigError(f"{where} must be one of {list(DTYPES)}, got {value!r}")
    return str(value)


def _device(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if value in ("auto", "cpu", "cuda"):
        return value
    prefix, _, index = value.partition(":")
    if prefix == "cuda" and index.isdigit():
        return value
    raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, got {value!r}")
