"""What the load benchmarks share: child processes, /proc readings and a lean HTTP/1.1 client.

joulegate is always measured as users run it, `joulegate serve` in its own process, so its
memory and CPU time can be read from /proc without the load generator's mixed in. The client
speaks keep-alive HTTP/1.1 over raw asyncio streams: it costs far less CPU per request than
aiohttp's client, which matters on a small machine where the load generator, the upstream and
joulegate share the cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHAT_UPSTREAM = Path(__file__).resolve().parent / "chat_upstream.py"


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the new soft limit.

    A thousand streams are a thousand sockets in the client and the upstream (two thousand in
    joulegate), and the soft limit is often 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(
    port: int, timeout: float = 30.0, process: subprocess.Popen[Any] | None = None
) -> None:
    """Block until something accepts on `port`; fail early if `process` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Memory:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MB (10^6 bytes)."""

    rss_mb: float
    peak_mb: float


def memory(pid: int) -> Memory:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024 / 1e6  # kB in /proc are KiB
    return Memory(values["VmRSS"], values["VmHWM"])


def start_upstream(port: int, chunk_interval: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CHAT_UPSTREAM), str(port), "--chunk-interval", str(chunk_interval)]
    )


def start_joulegate(
    upstream_port: int,
    port: int,
    data_dir: Path,
    settings: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """`joulegate serve` on the synthetic meter with its default SQLite ledger in `data_dir`.

    `settings` are further configuration keys, passed as JOULEGATE_* variables; none of the
    caller's own JOULEGATE_* variables reach it. `popen`: more arguments for Popen.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("JOULEGATE_")}
    env |= {"JOULEGATE_LOG_LEVEL": "warning", "JOULEGATE_DATA_DIR": str(data_dir)}
    env |= {f"JOULEGATE_{key.upper()}": value for key, value in (settings or {}).items()}
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("joulegate")),
            "serve",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--listen",
            f"127.0.0.1:{port}",
            "--meter",
            "synthetic:200",
        ],
        env=env,
        cwd=ROOT,
        **popen,
    )


def stop(*processes: subprocess.Popen[Any]) -> None:
    """SIGTERM each (joulegate drains and flushes its ledger), then wait; kill if stuck."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stack:
    """joulegate in front of the chat upstream, as `joulegate_stack` runs them."""

    port: int  # joulegate's
    pid: int  # joulegate's
    data_dir: Path
    ledger_rows: int | None = None  # rows in its ledger, once it has stopped


@contextmanager
def joulegate_stack(
    name: str, chunk_interval: float, settings: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """The chat upstream and `joulegate serve` in front of it (`start_joulegate` with
    `settings`) on free ports, with a scratch data directory; on leaving, both are stopped
    (joulegate by SIGTERM: it flushes its ledger) and `ledger_rows` is read before the
    directory goes. Raises this process's open-files limit first, for many connections."""
    raise_open_files_limit()
    upstream_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix=f"joulegate-{name}-") as scratch:
        data_dir = Path(scratch)
        upstream = start_upstream(upstream_port, chunk_interval)
        proxy = start_joulegate(upstream_port, proxy_port, data_dir, settings)
        stack = Stack(proxy_port, proxy.pid, data_dir)
        try:
            wait_listening(upstream_port, process=upstream)
            wait_listening(proxy_port, process=proxy)
            yield stack
        finally:
            stop(proxy, upstream)
        stack.ledger_rows = ledger_rows(data_dir)


# --- HTTP/1.1 over raw asyncio streams -------------------------------------------------------


def request_bytes(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def chat_request(body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> bytes:
    return request_bytes(
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


async def read_answer(
    reader: asyncio.StreamReader, on_data: Callable[[bytes], None] | None = None
) -> Answer:
    """One HTTP/1.1 answer: its body by Content-Length or chunked framing.

    With `on_data`, each piece of body is handed over as it arrives (for SSE) and the body
    returned is empty.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked = None, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    pieces: list[bytes] = []
    keep = on_data or pieces.append
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            keep(data[:-2])
    elif length is not None:
        keep(await reader.readexactly(length))
    else:
        keep(await reader.read())  # until close
    return Answer(status, b"".join(pieces))


async def get(port: int, path: str) -> Answer:
    """One GET on a fresh connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes("GET", path))
        return await read_answer(reader)
    finally:
        writer.close()


@dataclass
class ChatStream:
    """What an SSE chat stream brought: its content chunks, and whether `[DONE]` ended it."""

    chunks: int = 0
    done: bool = False
    _pending: bytes = b""

    def feed(self, data: bytes) -> None:
        """Count the SSE events in `data`, which may split an event anywhere."""
        events = (self._pending + data).split(b"\n\n")
        self._pending = events.pop()
        for event in events:
            if event == b"data: [DONE]":
                self.done = True
            elif b'"content"' in event:
                self.chunks += 1


def requests_total(exposition: str) -> dict[str, float]:
    """joulegate_requests_total by HTTP code, summed over the other labels."""
    totals: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith("joulegate_requests_total{"):
            labels, _, value = line.rpartition(" ")
            code = labels.partition('code="')[2].partition('"')[0]
            totals[code] = totals.get(code, 0.0) + float(value)
    return totals


async def recorded_requests(port: int, expected: int, timeout: float = 30.0) -> int:
    """joulegate's own count of proxied requests (all codes), once it reaches `expected`
    or `timeout` passes: records are published once the meter has read past their end."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await get(port, "/metrics")
        count = int(sum(requests_total(answer.body.decode()).values()))
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


def ledger_rows(data_dir: Path) -> int:
    """Rows in the SQLite ledger joulegate kept in `data_dir` (read after it stopped)."""
    import sqlite3

    connection = sqlite3.connect(data_dir / "joulegate.db")
    try:
        return connection.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        connection.close()
