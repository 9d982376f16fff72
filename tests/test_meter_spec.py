"""Parsing --meter specs, and rejecting bad ones with a clear one-line message."""

from __future__ import annotations

import pytest

from proxy.meter import MeterSpecError, open_meter, parse_spec
from proxy.meter.spec import MeterSpec, parse_gpus


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", MeterSpec(kind="auto")),
        (" AUTO ", MeterSpec(kind="auto")),
        ("nvml", MeterSpec(kind="nvml")),
        ("nvml:0,1", MeterSpec(kind="nvml", gpus=(0, 1))),
        ("nvml: 3 ", MeterSpec(kind="nvml", gpus=(3,))),
        ("nvml:gpu2", MeterSpec(kind="nvml", gpus=(2,))),
        (
            "nvml:GPU-5d2a1c3e-aaaa-bbbb-cccc-0123456789ab,1",
            MeterSpec(kind="nvml", gpus=("GPU-5d2a1c3e-aaaa-bbbb-cccc-0123456789ab", 1)),
        ),
        ("cpu", MeterSpec(kind="cpu")),
        ("synthetic:200", MeterSpec(kind="synthetic", watts=200.0, count=1)),
        ("synthetic:12.5", MeterSpec(kind="synthetic", watts=12.5, count=1)),
        ("synthetic:0", MeterSpec(kind="synthetic", watts=0.0, count=1)),
        ("synthetic:200x2", MeterSpec(kind="synthetic", watts=200.0, count=2)),
        ("trace:/data/run 1.csv", MeterSpec(kind="trace", path="/data/run 1.csv")),
        ("trace:C:/x.csv", MeterSpec(kind="trace", path="C:/x.csv")),
    ],
)
def test_good_specs(spec: str, expected: MeterSpec) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "unknown meter"),
        ("gpu", "unknown meter"),
        ("rapl", "unknown meter"),
        ("auto:1", "takes no argument"),
        ("cpu:4", "takes no argument"),
        ("nvml:", "neither an index"),
        ("nvml:a", "neither an index"),
        ("nvml:-1", "neither an index"),
        ("nvml:0,,1", "neither an index"),
        ("nvml:0,0", "listed twice"),
        ("nvml:1,gpu1", "listed twice"),
        ("nvml:GPU-", "neither an index"),
        ("synthetic", "needs a power"),
        ("synthetic:", "needs a power"),
        ("synthetic:abc", "not a number"),
        ("synthetic:-5", ">= 0"),
        ("synthetic:nan", ">= 0"),
        ("synthetic:inf", ">= 0"),
        ("synthetic:200x0", "at least one device"),
        ("synthetic:200x", "needs a power"),
        ("synthetic:200x2x3", "needs a power"),
        ("trace", "needs a file"),
        ("trace:  ", "needs a file"),
    ],
)
def test_bad_specs_say_why_on_one_line(spec: str, why: str) -> None:
    with pytest.raises(MeterSpecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert why in message
    assert repr(spec) in message
    assert "accepted:" in message
    assert "\n" not in message


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(MeterSpecError, ValueError)
    with pytest.raises(ValueError):
        open_meter("bogus")


def test_non_string_spec_is_rejected() -> None:
    with pytest.raises(MeterSpecError):
        parse_spec(200)  # type: ignore[arg-type]


def test_gpu_selection_from_config() -> None:
    assert parse_gpus([0, "gpu1", "2", "GPU-ab-cd"]) == (0, 1, 2, "GPU-ab-cd")
    with pytest.raises(MeterSpecError):
        parse_gpus([])
    with pytest.raises(MeterSpecError):
        parse_gpus(["gpu0", 0])


def test_devices_and_spec_selection_conflict() -> None:
    with pytest.raises(MeterSpecError, match="both"):
        open_meter("nvml:0", devices=[1])
