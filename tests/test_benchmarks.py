"""The GPU benchmarks say plainly that there is no GPU, and succeed, where there is none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.parametrize("script", ["gpu_check.py", "gpu_tasks.py"])
def test_gpu_benchmarks_exit_cleanly_without_a_gpu(script: str) -> None:
    if _has_gpu():
        pytest.skip("a GPU is visible here: the benchmark would run for real")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no" in done.stdout.lower() and "gpu" in done.stdout.lower()
    assert "nothing" in done.stdout.lower()
