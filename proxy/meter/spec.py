"""Parsing ``--meter SPEC`` strings into a typed request for a meter.

Parsing is separate from opening so that a typo is reported, with the accepted
forms, before any hardware is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

MeterKind = Literal["auto", "nvml", "cpu", "synthetic", "trace"]
GpuSelector = int | str  # an NVML index, or a "GPU-..." UUID

FORMS = "auto, nvml, nvml:0,1, nvml:GPU-<uuid>, cpu, synthetic:WATTS[xN], trace:FILE"

_UUID = re.compile(r"GPU-[0-9A-Za-z-]+")
_LABEL = re.compile(r"gpu(\d+)")
_SYNTHETIC = re.compile(r"(?P<watts>[^x]+?)(?:x(?P<count>\d+))?")


class MeterSpecError(ValueError):
    """A meter spec (or a file it names) that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """What a spec string asks for."""

    kind: MeterKind
    gpus: tuple[GpuSelector, ...] | None = None  # nvml: None = every visible GPU
    watts: float = 0.0  # synthetic: constant power per device
    count: int = 1  # synthetic: number of devices
    path: str | None = None  # trace: the CSV file


def parse_spec(spec: str) -> MeterSpec:
    """Parse a meter spec; raises MeterSpecError with the accepted forms on a bad one."""
    if not isinstance(spec, str):
        raise MeterSpecError(f"meter spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind in ("auto", "cpu"):
        if sep:
            _fail(spec, f"{kind} takes no argument")
        return MeterSpec(kind=kind)
    if kind == "nvml":
        if not sep:
            return MeterSpec(kind="nvml")
        return MeterSpec(kind="nvml", gpus=_parse_gpus(spec, arg.split(",")))
    if kind == "synthetic":
        return _parse_synthetic(spec, arg if sep else "")
    if kind == "trace":
        path = arg.strip()
        if not path:
            _fail(spec, "trace needs a file: trace:FILE")
        return MeterSpec(kind="trace", path=path)
    _fail(spec, "unknown meter")


def parse_gpus(items: Sequence[int | str]) -> tuple[GpuSelector, ...]:
    """Normalise a GPU selection given outside the spec (config, ``devices=``)."""
    return _parse_gpus(",".join(str(item) for item in items), [str(item) for item in items])


def _parse_gpus(spec: str, items: Sequence[str]) -> tuple[GpuSelector, ...]:
    selected: list[GpuSelector] = []
    for raw in items:
        item = raw.strip()
        label = _LABEL.fullmatch(item)
        if item.isdigit() or label:
            selector: GpuSelector = int(label.group(1) if label else item)
        elif _UUID.fullmatch(item):
            selector = item
        else:
            _fail(spec, f"GPU {item!r} is neither an index, gpuN, nor a GPU-<uuid>")
        if selector in selected:
            _fail(spec, f"GPU {item!r} is listed twice")
        selected.append(selector)
    if not selected:
        _fail(spec, "no GPU listed")
    return tuple(selected)


def _parse_synthetic(spec: str, arg: str) -> MeterSpec:
    match = _SYNTHETIC.fullmatch(arg.strip())
    if match is None:
        _fail(spec, "synthetic needs a power in watts: synthetic:WATTS or synthetic:WATTSxN")
    try:
        watts = float(match.group("watts"))
    except ValueError:
        _fail(spec, f"{match.group('watts')!r} is not a number of watts")
    if not (math.isfinite(watts) and watts >= 0):
        _fail(spec, "watts must be a finite number >= 0")
    count = int(match.group("count")) if match.group("count") is not None else 1
    if count < 1:
        _fail(spec, "synthetic needs at least one device")
    return MeterSpec(kind="synthetic", watts=watts, count=count)


def _fail(spec: str, why: str) -> NoReturn:
    raise MeterSpecError(f"bad meter spec {spec!r}: {why} (accepted: {FORMS})")
