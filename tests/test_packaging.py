"""The proxy stays light: its image carries no torch, and importing it never loads one."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers", "tokenizers", "safetensors", "PIL")


def test_the_proxy_dependencies_exclude_the_model_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        for dep in project["dependencies"]
    }
    assert not names & {h.lower() for h in HEAVY}
    assert {"torch", "transformers", "diffusers"} <= {
        dep.split(">")[0].split("=")[0].strip()
        for dep in project["optional-dependencies"]["model-server"]
    }


def test_importing_the_proxy_loads_no_model_library() -> None:
    code = (
        "import sys, proxy.cli, proxy.server, proxy.demo, proxy.forward, proxy.meter;"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_proxy_image_installs_without_the_model_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    proxy_stage = dockerfile.split("FROM ")[1]
    assert "AS proxy" in proxy_stage
    assert "model-server]" not in proxy_stage
    assert "torch" not in proxy_stage.lower()
