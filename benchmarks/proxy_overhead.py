"""What joulegate costs the traffic: direct vs through joulegate, measured in one run.

A trivial upstream (a small OpenAI-style JSON answer) runs in its own process; joulegate runs
as `joulegate serve` in another, exactly as users start it; the load generator is a third
process speaking keep-alive HTTP/1.1 over raw asyncio streams, so the client costs as little
as possible. Each case is measured at concurrency 1 (latency: what one request pays) and at a
fixed higher concurrency (throughput), and the ratios are printed beside the targets:
proxied throughput >= 50% of direct, added p50 latency <= 1 ms (at concurrency 1).

Two references are measured in the same run: a minimal aiohttp proxy (the floor any aiohttp
proxy pays) and nginx, the reverse proxy people compare with, when it is installed. nginx runs
from a generated configuration in a temporary directory, set up as one would proxy SSE: one
worker process (plus its master, whose CPU time is counted too; joulegate is one process on
one event loop as well), keep-alive to the upstream (64 idle connections, HTTP/1.1,
`Connection: ""`), `proxy_buffering off`, no access log, and `keepalive_requests` raised on
both sides (by default nginx closes a keep-alive connection after 1,000 requests).

    .venv/bin/python benchmarks/proxy_overhead.py [--seconds 5] [--concurrency 32]
        [--nginx PATH] [--rows-json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import cpu_seconds, free_port, start_joulegate, wait_listening
from benchmarks.results import INFO, Row, verdict, write_rows

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


NGINX_CONFIG = """
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000000;
    upstream model_server {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://model_server;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(
    nginx: str, directory: Path, port: int, upstream_port: int
) -> subprocess.Popen[bytes]:
    """nginx as a reverse proxy to the upstream, in the foreground, all its files in
    `directory`. As root, its worker runs as the same user (nginx's default, `nobody`, could
    not reach the temporary directory)."""
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    config = directory / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(user=user, dir=directory, port=port, upstream_port=upstream_port)
    )
    return subprocess.Popen(
        [nginx, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
        stderr=subprocess.DEVNULL,
    )


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (nginx's master and its worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(child) for child in children.read_text().split()] if children.exists() else []
    return [pid, *found]


@dataclass(frozen=True)
class Result:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None = None  # of the processes answering the load generator


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


async def _load(port: int, concurrency: int, seconds: float) -> tuple[Result, int]:
    """The result of `seconds` of load after 0.5 s of warm-up, and all requests sent."""
    warm: list[float] = []
    await asyncio.gather(
        *(_worker(port, time.perf_counter() + 0.5, warm) for _ in range(concurrency))
    )
    latencies: list[float] = []
    began = time.perf_counter()
    await asyncio.gather(*(_worker(port, began + seconds, latencies) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    quantiles = statistics.quantiles(latencies, n=100)
    result = Result(len(latencies) / elapsed, quantiles[49] * 1000, quantiles[98] * 1000)
    return result, len(warm) + len(latencies)


def measure(port: int, concurrency: int, seconds: float, pids: Sequence[int] = ()) -> Result:
    """Load `port` at `concurrency`; with `pids`, also their CPU time per request."""
    import uvloop

    before = sum(map(cpu_seconds, pids))
    result, requests = uvloop.run(_load(port, concurrency, seconds))
    if not pids:
        return result
    spent = sum(map(cpu_seconds, pids)) - before
    return Result(result.requests_per_second, result.p50_ms, result.p99_ms, spent / requests * 1e6)


DIRECT, MINIMAL, JOULEGATE, NGINX = (
    "direct",
    "minimal aiohttp proxy",
    "through joulegate",
    "through nginx",
)


def rows(results: dict[tuple[str, int], Result], high: int, nginx_missing: str | None) -> list[Row]:
    """The headline figures: joulegate against its targets, the references as INFO."""

    def ratio(name: str) -> float:
        return results[name, high].requests_per_second / results[DIRECT, high].requests_per_second

    def added_p50(name: str) -> float:
        return results[name, 1].p50_ms - results[DIRECT, 1].p50_ms

    def throughput(name: str) -> str:
        rps, direct = (results[case, high].requests_per_second for case in (name, DIRECT))
        return f"{ratio(name):.2f} ({rps:,.0f} vs {direct:,.0f} req/s)"

    def latency(name: str) -> str:
        p50, direct = (results[case, 1].p50_ms for case in (name, DIRECT))
        return f"{added_p50(name):+.3f} ms (p50 {p50:.3f} vs {direct:.3f} ms)"

    def cpu(name: str) -> str:
        figure = results[name, high].cpu_us_per_request
        return "-" if figure is None else f"{figure:.0f} us"

    table = [
        Row(
            f"joulegate throughput / direct, c={high}",
            ">= 0.50",
            throughput(JOULEGATE),
            verdict(ratio(JOULEGATE) >= 0.5),
        ),
        Row(
            "joulegate added p50 latency, c=1",
            "<= 1 ms",
            latency(JOULEGATE),
            verdict(added_p50(JOULEGATE) <= 1.0),
        ),
    ]
    if nginx_missing:
        table.append(Row("nginx", "reference", nginx_missing, INFO))
    else:
        table += [
            Row(f"nginx throughput / direct, c={high}", "reference", throughput(NGINX), INFO),
            Row("nginx added p50 latency, c=1", "reference", latency(NGINX), INFO),
        ]
    table.append(
        Row(
            f"minimal aiohttp proxy throughput / direct, c={high}",
            "reference",
            throughput(MINIMAL),
            INFO,
        )
    )
    cpus = f"joulegate {cpu(JOULEGATE)}"
    if not nginx_missing:
        cpus += f", nginx {cpu(NGINX)}"
    cpus += f", minimal aiohttp proxy {cpu(MINIMAL)}"
    table.append(Row(f"proxy CPU per request, c={high}", "-", cpus, INFO))
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--nginx", help="the nginx binary (default: nginx on PATH, else /usr/sbin/nginx)"
    )
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    arguments = parser.parse_args()
    nginx = arguments.nginx or shutil.which("nginx") or "/usr/sbin/nginx"
    nginx_missing = None if os.access(nginx, os.X_OK) else f"not installed ({nginx})"

    upstream_port, minimal_port, proxy_port, nginx_port = (free_port() for _ in range(4))
    scratch = tempfile.TemporaryDirectory(prefix="joulegate-bench-")
    data_dir = Path(scratch.name) / "data"
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM_SOURCE, str(upstream_port)])
    minimal = subprocess.Popen(
        [sys.executable, "-c", MINIMAL_PROXY_SOURCE, str(minimal_port), str(upstream_port)]
    )
    # with its default SQLite ledger, as users run it, in a throw-away directory
    proxy = start_joulegate(upstream_port, proxy_port, data_dir, stderr=subprocess.DEVNULL)
    processes = [proxy, minimal, upstream]
    cases = {
        DIRECT: (upstream_port, upstream.pid),
        MINIMAL: (minimal_port, minimal.pid),
        JOULEGATE: (proxy_port, proxy.pid),
    }
    if not nginx_missing:
        nginx_dir = Path(scratch.name) / "nginx"
        nginx_dir.mkdir()
        server = start_nginx(nginx, nginx_dir, nginx_port, upstream_port)
        processes.append(server)
        cases[NGINX] = (nginx_port, server.pid)
    results: dict[tuple[str, int], Result] = {}
    try:
        for name, (port, _) in cases.items():
            try:
                wait_listening(port, process=processes[-1] if name == NGINX else None)
            except RuntimeError:
                if name != NGINX:
                    raise
                error_log = Path(scratch.name) / "nginx" / "error.log"
                logged = error_log.read_text().strip() if error_log.exists() else ""
                last_line = (logged.splitlines() or ["nothing in its error log"])[-1]
                nginx_missing = f"did not start: {last_line[:120]}"
        if nginx_missing:
            cases.pop(NGINX, None)
        pids = {
            name: process_tree(pid) if name == NGINX else [pid] for name, (_, pid) in cases.items()
        }
        for concurrency in (1, arguments.concurrency):
            for name, (port, _) in cases.items():
                results[name, concurrency] = measure(
                    port, concurrency, arguments.seconds, pids[name]
                )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
        scratch.cleanup()

    high = arguments.concurrency
    print(f"{'case':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}")
    for (name, concurrency), result in results.items():
        cpu = f"{result.cpu_us_per_request:.0f}" if result.cpu_us_per_request else "-"
        print(
            f"{name + f' (c={concurrency})':<34}{result.requests_per_second:>9.0f}"
            f"{result.p50_ms:>9.3f}{result.p99_ms:>9.3f}{cpu:>12}"
        )
    if nginx_missing:
        print(f"nginx: {nginx_missing}")
    print()
    table = rows(results, high, nginx_missing)
    for row in table:
        print(f"{row.measure}: {row.value} (target {row.target}) {row.verdict}")
    direct_n, proxied_n = results[DIRECT, high], results[JOULEGATE, high]
    print(f"(added p50 at c={high}: {proxied_n.p50_ms - direct_n.p50_ms:.3f} ms, for reference)")
    write_rows(arguments.rows_json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
