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
import tempfile
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


# The floor any aiohttp-based proxy pays: read, forward with a pooled ClientSession, answer.
# No classification, metering or header hygiene: what joulegate adds is the difference.
MINIMAL_PROXY_SOURCE = """
import sys
import aiohttp, uvloop
from aiohttp import web
UPSTREAM = "http://127.0.0.1:" + sys.argv[2]
async def handle(request):
    body = await request.read()
    async with request.app["session"].request(
        request.method, UPSTREAM + request.raw_path, data=body,
        headers={"Content-Type": request.headers.get("Content-Type", "")},
    ) as upstream:
        data = await upstream.read()
        return web.Response(body=data, status=upstream.status,
                            headers={"Content-Type": upstream.headers["Content-Type"]})
async def session(app):
    app["session"] = aiohttp.ClientSession()
    yield
    await app["session"].close()
app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            loop=uvloop.new_event_loop())
"""


@dataclass(frozen=True)
class Result:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None = None  # of the process answering the load generator


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    await asyncio.gather(*(_worker(port, began + seconds, latencies) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(len(latencies) / elapsed, quantiles[49] * 1000, quantiles[98] * 1000)


def measure(port: int, concurrency: int, seconds: float, pid: int | None = None) -> Result:
    """Load `port` at `concurrency`; with `pid`, also that process's CPU time per request."""
    import uvloop

    before = cpu_seconds(pid) if pid else 0.0
    result = uvloop.run(_load(port, concurrency, seconds))
    if not pid:
        return result
    spent = cpu_seconds(pid) - before
    requests = result.requests_per_second * seconds * (1 + 0.5 / seconds)  # warm-up included
    return Result(result.requests_per_second, result.p50_ms, result.p99_ms, spent / requests * 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    arguments = parser.parse_args()

    upstream_port, minimal_port, proxy_port = free_port(), free_port(), free_port()
    data_dir = tempfile.TemporaryDirectory(prefix="joulegate-bench-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULEGATE_")}
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM_SOURCE, str(upstream_port)])
    minimal = subprocess.Popen(
        [sys.executable, "-c", MINIMAL_PROXY_SOURCE, str(minimal_port), str(upstream_port)]
    )
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
        # with its default SQLite ledger, as users run it, in a throw-away directory
        env=env | {"JOULEGATE_LOG_LEVEL": "warning", "JOULEGATE_DATA_DIR": data_dir.name},
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    cases = {
        "direct": (upstream_port, upstream.pid),
        "minimal aiohttp proxy": (minimal_port, minimal.pid),
        "through joulegate": (proxy_port, proxy.pid),
    }
    results: dict[tuple[str, int], Result] = {}
    try:
        for port, _ in cases.values():
            wait_listening(port)
        for concurrency in (1, arguments.concurrency):
            for name, (port, pid) in cases.items():
                results[name, concurrency] = measure(port, concurrency, arguments.seconds, pid)
    finally:
        for process in (proxy, minimal, upstream):
            process.terminate()
            process.wait(timeout=10)
        data_dir.cleanup()

    high = arguments.concurrency
    print(f"{'case':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}")
    for (name, concurrency), result in results.items():
        cpu = f"{result.cpu_us_per_request:.0f}" if result.cpu_us_per_request else "-"
        print(
            f"{name + f' (c={concurrency})':<34}{result.requests_per_second:>9.0f}"
            f"{result.p50_ms:>9.3f}{result.p99_ms:>9.3f}{cpu:>12}"
        )
    direct_1, proxied_1 = results["direct", 1], results["through joulegate", 1]
    direct_n, proxied_n = results["direct", high], results["through joulegate", high]
    minimal_n = results["minimal aiohttp proxy", high]
    ratio = proxied_n.requests_per_second / direct_n.requests_per_second
    floor = minimal_n.requests_per_second / direct_n.requests_per_second
    added_p50 = proxied_1.p50_ms - direct_1.p50_ms
    print()
    print(f"throughput ratio at c={high}: {ratio:.2f} (target >= 0.50) {_verdict(ratio >= 0.5)}")
    print(f"  the minimal aiohttp proxy's ratio, same run: {floor:.2f}")
    print(f"added p50 at c=1: {added_p50:.3f} ms (target <= 1 ms) {_verdict(added_p50 <= 1.0)}")
    print(f"added p50 at c={high}: {proxied_n.p50_ms - direct_n.p50_ms:.3f} ms (for reference)")
    return 0


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


if __name__ == "__main__":
    sys.exit(main())
