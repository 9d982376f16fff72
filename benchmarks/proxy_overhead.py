"""What joulegate costs the traffic: direct vs through joulegate, measured in one run.

A trivial upstream (a small OpenAI-style JSON answer) runs in its own process; joulegate runs
as `joulegate serve` in another, exactly as users start it; the load generator is a third
process speaking keep-alive HTTP/1.1 over raw asyncio streams, so the client costs as little
as possible. Each case is measured at concurrency 1 (latency: what one request pays) and at a
fixed higher concurrency (throughput), and the ratios are printed beside the targets:
proxied throughput >= 50% of direct, added p50 latency <= 1 ms (at concurrency 1).

    .venv/bin/python benchmarks/proxy_overhead.py [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "tiny", "input": "energy per request"}).encode()
REQUEST = (
    b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-bench\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n"
) + BODY

UPSTREAM_SOURCE = """
import sys
from aiohttp import web
import uvloop
ANSWER = {"object": "list", "model": "tiny", "data": [{"object": "embedding", "index": 0,
          "embedding": [0.1, 0.2, 0.3]}], "usage": {"prompt_tokens": 3, "total_tokens": 3}}
async def embeddings(request):
    await request.read()
    return web.json_response(ANSWER)
app = web.Application()
app.router.add_post("/v1/embeddings", embeddings)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
"""


@dataclass(frozen=True)
class Result:
    requests_per_second: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


async def _worker(port: int, stop_at: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            latencies.append(time.perf_counter() - began)
    finally:
        writer.close()


async def _load(port: int, concurrency: int, seconds: float) -> Result:
    warm: list[float] = []
    await asyncio.gather(
        *(_worker(port, time.perf_counter() + 0.5, warm) for _ in range(concurrency))
    )
    latencies: list[float] = []
    began = time.perf_counter()
    await asyncio.gather(
        *(_worker(port, began + seconds, latencies) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(len(latencies) / elapsed, quantiles[49] * 1000, quantiles[98] * 1000)


def measure(port: int, concurrency: int, seconds: float) -> Result:
    try:
        import uvloop

        return uvloop.run(_load(port, concurrency, seconds))
    except ImportError:
        return asyncio.run(_load(port, concurrency, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    arguments = parser.parse_args()

    upstream_port, proxy_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEGATE_")}
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM_SOURCE, str(upstream_port)])
    proxy = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("joulegate")),
            "serve",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--meter",
            "synthetic:200",
        ],
        env=env | {"JOULEGATE_LOG_LEVEL": "warning"},
        cwd=ROOT,
    )
    try:
        wait_listening(upstream_port)
        wait_listening(proxy_port)
        rows = []
        for concurrency in (1, arguments.concurrency):
            direct = measure(upstream_port, concurrency, arguments.seconds)
            proxied = measure(proxy_port, concurrency, arguments.seconds)
            rows.append((concurrency, direct, proxied))
    finally:
        for process in (proxy, upstream):
            process.terminate()
            process.wait(timeout=10)

    print(f"{'case':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for concurrency, direct, proxied in rows:
        for name, result in (("direct", direct), ("through joulegate", proxied)):
            label = f"{name} (c={concurrency})"
            print(
                f"{label:<28}{result.requests_per_second:>10.0f}"
                f"{result.p50_ms:>10.3f}{result.p99_ms:>10.3f}"
            )
    (_, direct_1, proxied_1), (high, direct_n, proxied_n) = rows
    ratio = proxied_n.requests_per_second / direct_n.requests_per_second
    added_p50 = proxied_1.p50_ms - direct_1.p50_ms
    print()
    print(f"throughput ratio at c={high}: {ratio:.2f} (target >= 0.50) {_verdict(ratio >= 0.5)}")
    print(f"added p50 at c=1: {added_p50:.3f} ms (target <= 1 ms) {_verdict(added_p50 <= 1.0)}")
    print(f"added p50 at c={high}: {proxied_n.p50_ms - direct_n.p50_ms:.3f} ms (for reference)")
    return 0


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


if __name__ == "__main__":
    sys.exit(main())
