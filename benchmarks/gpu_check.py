"""joulegate on a real GPU: attributed Joules beside NVML's own begin/end energy window.

For a machine with an NVIDIA GPU (and torch with CUDA). It lists the GPUs NVML sees, then
runs matrix-multiply load of several lengths as requests to a small upstream behind joulegate
(the `nvml` meter), one at a time and then concurrently. For each window it reads the
total-energy counter directly before and after (the Zeus way: one window, no attribution) and
prints it beside the sum of the Joules joulegate attributed to the window's requests. Alone, the
two must agree to within the counter's resolution and the idle tails; concurrently, the
requests' shares must add up to the window.

    .venv/bin/python benchmarks/gpu_check.py [--device 0] [--seconds 0.5 1 2] [--rows-json PATH]

Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import INFO, Row, write_rows

MEASURE = "GPU check: joulegate's Joules vs NVML's own window"


def _gpus(pynvml: Any) -> list[tuple[int, str, str]]:
    count = pynvml.nvmlDeviceGetCount()
    found = []
    for index in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        found.append((index, pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetUUID(handle)))
    return found


def _load_app(device: int) -> web.Application:
    """An upstream whose requests keep the GPU busy with bf16 matmuls for `seconds`."""
    import torch

    gpu = torch.device(f"cuda:{device}")
    a = torch.randn(8192, 8192, device=gpu, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=gpu, dtype=torch.bfloat16)
    lock = threading.Lock()  # one stream of work at a time, as a model server's worker

    def burn(seconds: float) -> int:
        done = 0
        with lock:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                torch.matmul(a, b)
                torch.cuda.synchronize(gpu)
                done += 1
        return done

    async def work(request: web.Request) -> web.Response:
        body = await request.json()
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(None, burn, float(body["seconds"]))
        return web.json_response({"usage": {"prompt_tokens": 0, "completion_tokens": done}})

    app = web.Application()
    app.router.add_post("/v1/completions", work)
    return app


async def _run(device: int, lengths: list[float]) -> list[Row]:
    import pynvml

    from proxy.config import load_config
    from proxy.server import create_app
    from proxy.server import serving as serve

    handle = pynvml.nvmlDeviceGetHandleByIndex(device)

    def counter_joules() -> float:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0

    async with serve(_load_app(device)) as upstream:
        config = load_config(
            environ={},
            overrides={
                "upstream": upstream,
                "meter": f"nvml:{device}",
                "log_level": "warning",
                "ledger": "off",
            },
        )
        async with serve(create_app(config)) as proxy, aiohttp.ClientSession() as client:

            async def request(seconds: float) -> float | None:
                async with client.post(
                    proxy + "/v1/completions",
                    json={"model": "matmul", "seconds": seconds},
                    headers={"X-Joulegate-Energy": "inline"},
                ) as response:
                    value = response.headers.get("X-Energy-Joules", "unknown")
                    return None if value == "unknown" else float(value)

            rows = []
            print(f"{'window':<22}{'NVML window J':>15}{'joulegate J':>14}{'diff %':>9}")
            for concurrency in (1, 4):
                for seconds in lengths:
                    await asyncio.sleep(0.5)  # let the counter settle between windows
                    before = counter_joules()
                    shares = await asyncio.gather(*(request(seconds) for _ in range(concurrency)))
                    after = counter_joules()
                    known = [s for s in shares if s is not None]
                    attributed = sum(known) if len(known) == len(shares) else None
                    window = after - before
                    label = f"{concurrency} x {seconds:g} s"
                    measure = f"GPU check {label}: joulegate J vs NVML window J"
                    if attributed is None:
                        print(f"{label:<22}{window:>15.2f}{'unknown':>14}")
                        rows.append(Row(measure, "-", f"unknown vs {window:.2f}", INFO))
                        continue
                    diff = 100.0 * (attributed - window) / window
                    print(f"{label:<22}{window:>15.2f}{attributed:>14.2f}{diff:>9.2f}")
                    value = f"{attributed:.2f} vs {window:.2f} ({diff:+.2f} %)"
                    rows.append(Row(measure, "-", value, INFO))
            return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--seconds", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    arguments = parser.parse_args()
    rows = check(arguments.device, arguments.seconds)
    write_rows(arguments.rows_json, rows)
    return 0


def check(device: int, lengths: list[float]) -> list[Row]:
    """The windows' rows, or one saying why nothing could be checked."""

    def nothing(why: str, detail: object = None) -> list[Row]:
        print(f"gpu_check: {why}{f' ({detail})' if detail else ''}; nothing to check.")
        return [Row(MEASURE, "-", f"no GPU ({detail or why})", INFO)]

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no library, no driver: not a GPU machine
        return nothing("no NVIDIA GPU here", error)
    try:
        gpus = _gpus(pynvml)
        if not gpus:
            return nothing("NVML sees no GPU")
        for index, name, uuid in gpus:
            print(f"gpu{index}: {name} {uuid}")
        try:
            import torch
        except ImportError:
            print("gpu_check: torch is not installed; install the model-server extra.")
            return [Row(MEASURE, "-", "no GPU check: torch is not installed", INFO)]
        if not torch.cuda.is_available():
            return nothing("torch sees no CUDA device")
        return asyncio.run(_run(device, lengths))
    finally:
        pynvml.nvmlShutdown()


if __name__ == "__main__":
    sys.exit(main())
