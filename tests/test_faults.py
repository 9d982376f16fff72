"""Faults, each injected into a running joulegate: a misbehaving upstream, a failing GPU meter,
a ledger on a disk that turns read-only, SIGTERM with 200 streams in flight, kill -9 and
restart.

In each, joulegate keeps serving what it can (a normal request afterwards succeeds), the
fault shows in the metrics, energy that is unknown is null (never 0), and nothing already
recorded is lost.

Already covered elsewhere, so not repeated here: the upstream closing mid-stream
(test_proxy.py), a GPU lost from the start (test_energy.py), a full disk under the SQLite
ledger and kill -9 integrity under load (test_ledger_sqlite.py), SIGTERM under
request/response load (test_ledger_proxy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.meter.nvml import NvmlMeter
from proxy.metrics import UPSTREAM_ERROR_REASONS
from proxy.server import RECORDER, SAMPLER
from tests.fakes.fake_nvml import FakeGpu, FakeNvml
from tests.servers import free_port, joulegate, metric_series, serve, settled
from tests.test_ledger import until
from tests.test_ledger_sqlite import tiny_disk

CHAT = "/v1/chat/completions"
STREAM_REQUEST = {"model": "m", "stream": True, "messages": []}
EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n']
DONE = b"data: [DONE]\n\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
# Short, so that silences are noticed quickly; the scripted upstream answers in microseconds.
READ_TIMEOUT = 0.5


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# ---- a scripted upstream on loopback: well-behaved, unless a request asks for a fault ----


@dataclass
class Scripted:
    """What a fault script may wait for, and the connections it served."""

    go: asyncio.Event = field(default_factory=asyncio.Event)  # the test says: fault now
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # the test is over
    requests: int = 0
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)


Fault = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Scripted], Awaitable[None]]


async def _silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted) -> None:
    await s.stop.wait()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on, with a linger time of 0."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _answers(data: bytes) -> Fault:
    """Writes `data` as the answer, then closes the connection."""

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted
    ) -> None:
        writer.write(data)
        await writer.drain()

    return answer


async def _reset_at_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted
) -> None:
    _reset(writer)


def _streams_then(fault: Fault) -> Fault:
    """Starts a chunked SSE answer with two events, then does `fault`."""

    async def stream(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted
    ) -> None:
        writer.write(SSE_HEAD + b"".join(_chunk(event) for event in EVENTS))
        await writer.drain()
        await fault(reader, writer, s)

    return stream


async def _answer_on_go(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted
) -> None:
    await s.go.wait()
    await _answer_normally(writer)


async def _reset_on_go(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Scripted
) -> None:
    await s.go.wait()  # the client holds the first events: no data can be lost to the RST
    _reset(writer)


FAULTS: dict[str, Fault] = {
    "answer_on_go": _answer_on_go,  # no fault: a request held in flight until the test says
    "silence": _silence,
    "not_http": _answers(b"\x16\x03\x01\x02\x00 this is no HTTP\r\n\r\n"),
    "bad_status_line": _answers(b"HTTP/1.1 OK 200\r\nContent-Length: 0\r\n\r\n"),
    "closes_before_answering": _answers(b""),
    "reset_before_answering": _reset_at_once,
    "reset_before_reading_the_body": _reset_at_once,
    "signed_content_length": _answers(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}"),
    "differing_content_lengths": _answers(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}"
    ),
    "short_body": _answers(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"cut": '
    ),
    "long_body_cut_short": _answers(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (2 * 1024 * 1024, bytes(100_000))
    ),
    "silence_mid_stream": _streams_then(_silence),
    "reset_mid_stream": _streams_then(_reset_on_go),
    "bad_chunk_size": _streams_then(_answers(b"zz\r\nzz\r\n")),
    # Python's int(text, 16) takes these; RFC 9112's chunk-size is hex digits only.
    "signed_chunk_size": _streams_then(_answers(b"+1\r\nx\r\n0\r\n\r\n")),
    "prefixed_chunk_size": _streams_then(_answers(b"0x1\r\nx\r\n0\r\n\r\n")),
    "endless_chunk_size": _streams_then(_answers(b"f" * 70_000)),
    "chunk_without_crlf": _streams_then(_answers(b"5\r\nhelloXX")),
}


async def _answer_normally(writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD + b"".join(_chunk(event) for event in [*EVENTS, DONE]) + b"0\r\n\r\n")
    await writer.drain()


@asynccontextmanager
async def scripted_upstream(port: int = 0) -> AsyncIterator[tuple[str, Scripted]]:
    """A raw HTTP/1.1 server on 127.0.0.1: a short SSE stream on every request, kept alive,
    unless the request's `X-Fault` header names one of FAULTS."""
    state = Scripted()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        state.connections[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                state.requests += 1
                headers = dict(
                    line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:-2]
                )
                fault = headers.get("X-Fault")
                if fault != "reset_before_reading_the_body":
                    await reader.readexactly(int(headers.get("Content-Length", "0")))
                if fault is None:
                    await _answer_normally(writer)
                    continue
                await FAULTS[fault](reader, writer, state)
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            state.connections.pop(task, None)

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound}", state
    finally:
        server.close()
        state.stop.set()
        for writer in state.connections.values():
            writer.close()  # kept-alive connections too: their handlers see the end and return
        await asyncio.wait_for(asyncio.gather(*state.connections, return_exceptions=True), 5)
        await server.wait_closed()


# ---- the client's side ----


async def _stream(
    client: aiohttp.ClientSession, proxy: str, fault: str | None = None
) -> tuple[int, bytes, str]:
    """A streaming chat request: the status, the whole body, the request id."""
    headers = {"X-Fault": fault} if fault else {}
    async with client.post(proxy + CHAT, json=STREAM_REQUEST, headers=headers) as response:
        body = await asyncio.wait_for(response.read(), 10)
        return response.status, body, response.headers["X-Request-Id"]


async def _document(client: aiohttp.ClientSession, proxy: str, request_id: str) -> dict[str, Any]:
    async with client.get(f"{proxy}/joulegate/requests/{request_id}") as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _exposition(client: aiohttp.ClientSession, proxy: str) -> str:
    async with client.get(proxy + "/metrics") as response:
        return await response.text()


def _upstream_errors(exposition: str) -> dict[str, float]:
    series = metric_series(exposition, "joulegate_upstream_errors_total")
    return {label.split('"')[1]: value for label, value in series.items()}


async def _normal_exchange_works(
    client: aiohttp.ClientSession, proxy: str, app: web.Application
) -> dict[str, Any]:
    """A normal stream passes whole, and its record says so: joulegate still serves."""
    status, body, request_id = await _stream(client, proxy)
    assert (status, body) == (200, b"".join([*EVENTS, DONE]))
    await settled(app)
    document = await _document(client, proxy, request_id)
    assert (document["status"], document["code"]) == ("ok", 200)
    assert document["energy_joules"] is not None
    return document


# ---- 1. upstream faults ----


@pytest.mark.parametrize(
    ("fault", "code", "error_code", "reason"),
    [
        ("silence", 504, "upstream_timeout", "timeout"),
        ("not_http", 502, "bad_upstream_response", "invalid_response"),
        ("bad_status_line", 502, "bad_upstream_response", "invalid_response"),
        ("closes_before_answering", 502, "bad_upstream_response", "invalid_response"),
        ("reset_before_answering", 502, "bad_upstream_response", "invalid_response"),
        ("signed_content_length", 502, "bad_upstream_response", "invalid_response"),
        ("differing_content_lengths", 502, "bad_upstream_response", "invalid_response"),
        ("short_body", 502, "bad_upstream_response", "closed_mid_answer"),
    ],
)
async def test_a_fault_before_the_answer_started_is_a_502_or_504_in_openai_format(
    fault: str, code: int, error_code: str, reason: str
) -> None:
    async with (
        scripted_upstream() as (upstream, _),
        joulegate(upstream, read_timeout_seconds=READ_TIMEOUT) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        before = await _normal_exchange_works(client, proxy, app)
        status, body, request_id = await _stream(client, proxy, fault)
        await settled(app)
        document = await _document(client, proxy, request_id)
        await _normal_exchange_works(client, proxy, app)
        exposition = await _exposition(client, proxy)
        assert await _document(client, proxy, before["id"]) == before
    assert status == code
    error = json.loads(body)["error"]
    assert error["code"] == error_code and error["type"] == "upstream_error"
    assert set(error) >= {"message", "type", "code", "param"}
    assert (document["status"], document["code"]) == ("error", code)
    assert document["energy_joules"] is not None  # the synthetic meter knows: measured
    assert _upstream_errors(exposition) == {
        name: 1.0 if name == reason else 0.0 for name in UPSTREAM_ERROR_REASONS
    }
    requests = metric_series(exposition, "joulegate_requests_total")
    assert sum(value for labels, value in requests.items() if f'code="{code}"' in labels) == 1


async def test_a_refusing_upstream_counts_and_traffic_resumes_when_it_listens() -> None:
    """The 502 itself is test_proxy's; here: the counter, and recovery on the same proxy."""
    port = free_port()
    async with (
        joulegate(f"http://127.0.0.1:{port}") as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        status, _, refused_id = await _stream(client, proxy)
        async with scripted_upstream(port):
            await _normal_exchange_works(client, proxy, app)
        await settled(app)
        refused = await _document(client, proxy, refused_id)
        exposition = await _exposition(client, proxy)
    assert status == 502 and refused["status"] == "error"
    assert _upstream_errors(exposition)["refused"] == 1.0


@pytest.mark.parametrize(
    ("fault", "reason", "label"),
    [
        ("silence_mid_stream", "upstream timed out mid-answer", "timeout"),
        ("reset_mid_stream", "upstream closed mid-answer", "closed_mid_answer"),
        ("bad_chunk_size", "upstream closed mid-answer", "closed_mid_answer"),
        ("signed_chunk_size", "upstream closed mid-answer", "closed_mid_answer"),
        ("prefixed_chunk_size", "upstream closed mid-answer", "closed_mid_answer"),
        ("endless_chunk_size", "upstream closed mid-answer", "closed_mid_answer"),
        ("chunk_without_crlf", "upstream closed mid-answer", "closed_mid_answer"),
    ],
)
async def test_a_fault_mid_stream_ends_the_client_stream_cleanly_and_records_an_abort(
    fault: str, reason: str, label: str
) -> None:
    async with (
        scripted_upstream() as (upstream, scripted),
        joulegate(upstream, read_timeout_seconds=READ_TIMEOUT) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        before = await _normal_exchange_works(client, proxy, app)
        async with client.post(
            proxy + CHAT, json=STREAM_REQUEST, headers={"X-Fault": fault}
        ) as response:
            received = b""
            while len(received) < len(b"".join(EVENTS)):
                received += await asyncio.wait_for(response.content.readany(), 5)
            scripted.go.set()
            received += await asyncio.wait_for(response.content.read(), 10)  # no error: clean
            status, request_id = response.status, response.headers["X-Request-Id"]
        await settled(app)
        document = await _document(client, proxy, request_id)
        await _normal_exchange_works(client, proxy, app)
        exposition = await _exposition(client, proxy)
        assert await _document(client, proxy, before["id"]) == before
    assert status == 200
    assert received == b"".join(EVENTS)  # what came before the fault, and nothing made up
    assert (document["status"], document["code"], document["reason"]) == ("aborted", 200, reason)
    assert document["energy_joules"] is not None  # aborted streams are metered too
    assert _upstream_errors(exposition) == {
        name: 1.0 if name == label else 0.0 for name in UPSTREAM_ERROR_REASONS
    }


async def test_a_long_answer_cut_short_is_cut_for_the_client_too_never_silently_short() -> None:
    """An answer of promised length (over 1 MiB, so streamed) that breaks off: its length
    cannot be kept, so the client's connection is closed and its HTTP library says the body
    is incomplete, where ending it cleanly would pass a truncated file off as whole."""
    async with (
        scripted_upstream() as (upstream, _),
        joulegate(upstream, read_timeout_seconds=READ_TIMEOUT) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        async with client.get(
            proxy + "/download", headers={"X-Fault": "long_body_cut_short"}
        ) as response:
            assert response.headers["Content-Length"] == str(2 * 1024 * 1024)
            request_id = response.headers["X-Request-Id"]
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        await settled(app)
        document = await _document(client, proxy, request_id)
        await _normal_exchange_works(client, proxy, app)
        exposition = await _exposition(client, proxy)
    assert (document["status"], document["reason"]) == ("aborted", "upstream closed mid-answer")
    assert _upstream_errors(exposition)["closed_mid_answer"] == 1


async def test_an_upstream_resetting_while_a_large_body_is_sent_gives_a_502() -> None:
    """Bodies of 64 KiB and more are written apart from the head and drained: a reset then
    surfaces while writing, not while reading the answer."""
    body = {"model": "m", "messages": [], "padding": "x" * 8 * 1024 * 1024}
    async with (
        scripted_upstream() as (upstream, _),
        joulegate(upstream, read_timeout_seconds=READ_TIMEOUT) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        await _normal_exchange_works(client, proxy, app)  # so the pool reuses a connection
        async with client.post(
            proxy + CHAT, json=body, headers={"X-Fault": "reset_before_reading_the_body"}
        ) as response:
            status, error = response.status, (await response.json())["error"]
        await _normal_exchange_works(client, proxy, app)
        exposition = await _exposition(client, proxy)
    assert (status, error["code"]) == (502, "bad_upstream_response")
    assert _upstream_errors(exposition)["invalid_response"] == 1


# ---- 2. the GPU meter failing mid-run ----

WATTS = 300.0
SAMPLE_INTERVAL = 0.02


@asynccontextmanager
async def burning(gpu: FakeGpu, watts: float) -> AsyncIterator[None]:
    """The fake GPU draws `watts`: its energy counter climbs with time, its power reads so."""
    gpu.power_mw = round(watts * 1000)

    async def climb() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gpu.add_joules(watts * (now - last))
            last = now

    task = asyncio.create_task(climb())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class GpuRig:
    """joulegate metering one fake GPU through NVML, in front of the scripted upstream."""

    proxy: str
    app: web.Application
    client: aiohttp.ClientSession
    gpu: FakeGpu
    meter: NvmlMeter
    upstream: Scripted

    async def request(self) -> dict[str, Any]:
        """One streaming request, answered: its published record."""
        status, body, request_id = await _stream(self.client, self.proxy)
        assert (status, body) == (200, b"".join([*EVENTS, DONE]))  # traffic flows
        await settled(self.app)
        return await _document(self.client, self.proxy, request_id)

    async def measured(self) -> dict[str, Any]:
        document = await self.request()
        assert document["energy_joules"] is not None and document["energy_joules"] > 0
        assert document["devices"]["gpu0"] == document["energy_joules"]
        return document

    async def held(self, fault: Callable[[], None]) -> dict[str, Any]:
        """A request in flight while `fault` happens and the meter reads it: its record."""
        seen = self.upstream.requests
        task = asyncio.create_task(_stream(self.client, self.proxy, "answer_on_go"))
        await until(lambda: self.upstream.requests > seen)
        fault()
        samples = self.samples()
        await until(lambda: self.samples() >= samples + 2)  # read, and handed to attribution
        self.upstream.go.set()
        status, body, request_id = await task
        assert (status, body) == (200, b"".join([*EVENTS, DONE]))
        await settled(self.app)
        return await _document(self.client, self.proxy, request_id)

    def samples(self) -> int:
        return int(self.app[SAMPLER].snapshot()["samples"])  # type: ignore[call-overload]

    async def scrape(self) -> Scrape:
        exposition = await _exposition(self.client, self.proxy)
        return Scrape(
            up=metric_series(exposition, "joulegate_meter_up")['{meter="nvml"}'],
            device_joules=metric_series(exposition, "joulegate_device_energy_joules_total")[
                '{device="gpu0",meter="nvml"}'
            ],
            read_errors=metric_series(exposition, "joulegate_meter_read_errors_total")[
                '{meter="nvml"}'
            ],
            unknown=sum(
                value
                for labels, value in metric_series(
                    exposition, "joulegate_metered_requests_total"
                ).items()
                if 'quality="unknown"' in labels
            ),
        )

    def device(self) -> dict[str, Any]:
        return self.meter.describe()["devices"][0]  # type: ignore[index]


@dataclass(frozen=True)
class Scrape:
    up: float
    device_joules: float
    read_errors: float
    unknown: float


@asynccontextmanager
async def gpu_rig(**settings: Any) -> AsyncIterator[GpuRig]:
    nvml = FakeNvml(count=1)
    gpu = nvml.gpus[0]
    gpu.energy_mj = 5_000_000_000  # 5 MJ since the driver loaded: a reset is a long way down
    meter = NvmlMeter(nvml)
    async with (
        burning(gpu, WATTS),
        scripted_upstream() as (upstream, scripted),
        joulegate(
            upstream, meter_instance=meter, sample_interval_seconds=SAMPLE_INTERVAL, **settings
        ) as (proxy, app),
        aiohttp.ClientSession() as client,
    ):
        yield GpuRig(proxy, app, client, gpu, meter, scripted)


def _non_decreasing(scrapes: list[Scrape]) -> bool:
    joules = [scrape.device_joules for scrape in scrapes]
    return joules == sorted(joules)


async def test_a_gpu_lost_mid_run_reads_unknown_then_metering_resumes() -> None:
    async with gpu_rig() as rig:
        before = await rig.measured()
        healthy = await rig.scrape()

        rig.gpu.lose()
        await until(lambda: not rig.meter.up)
        during = await rig.request()
        lost = await rig.scrape()
        async with rig.client.get(rig.proxy + "/joulegate/health") as response:
            health = await response.json()

        rig.gpu.recover()
        await until(lambda: rig.meter.up)
        after = await rig.measured()
        recovered = await rig.scrape()
        assert await _document(rig.client, rig.proxy, before["id"]) == before
    assert (healthy.up, lost.up, recovered.up) == (1.0, 0.0, 1.0)
    assert during["energy_joules"] is None and during["devices"] == {"gpu0": None}
    assert during["dynamic_energy_joules"] is None and during["meter"] == "nvml"
    assert health["status"] == "ok" and health["meter"]["up"] is False
    assert "GPU is lost" in health["meter"]["error"]
    assert healthy.read_errors == 0 < lost.read_errors <= recovered.read_errors
    assert (healthy.unknown, lost.unknown, recovered.unknown) == (0, 1, 1)
    assert _non_decreasing([healthy, lost, recovered])
    assert recovered.device_joules > lost.device_joules  # metering resumed
    assert after["energy_joules"] > 0


async def test_a_counter_reset_mid_request_makes_that_request_unknown_never_negative() -> None:
    """A driver reload restarts NVML's energy counter near 0. The energy between the last
    reading before and the first after is unknown: the request across it gets null, the
    device counter neither drops nor jumps, and the requests after are measured again."""
    async with gpu_rig() as rig:
        began = time.monotonic()
        before = await rig.measured()
        healthy = await rig.scrape()

        def reset() -> None:
            rig.gpu.energy_mj = 1_000

        across = await rig.held(reset)
        after = await rig.measured()
        last = await rig.scrape()
        elapsed = time.monotonic() - began
        assert await _document(rig.client, rig.proxy, before["id"]) == before
        device = rig.device()
    assert device["counter_resets"] == 1
    assert across["energy_joules"] is None and across["devices"] == {"gpu0": None}
    assert after["energy_joules"] > 0
    assert last.up == 1.0 and last.read_errors >= 1
    assert _non_decreasing([healthy, last])
    # Less than the GPU drew since the start: neither the reset's 5 MJ step down nor a jump.
    assert last.device_joules <= WATTS * elapsed


async def test_the_energy_counter_turning_unsupported_mid_run_falls_back_to_power() -> None:
    """NVML_ERROR_NOT_SUPPORTED from the energy counter mid-run: the meter integrates power
    from then on; the request across the switch is unknown; if power fails too the meter is
    down until it answers again."""
    async with gpu_rig() as rig:
        before = await rig.measured()
        healthy = await rig.scrape()

        def unsupported() -> None:
            rig.gpu.energy_supported = False

        across = await rig.held(unsupported)
        assert rig.device()["source"] == "power"
        on_power = await rig.measured()
        switched = await rig.scrape()

        rig.gpu.power_supported = False
        await until(lambda: not rig.meter.up)
        during = await rig.request()
        down = await rig.scrape()

        rig.gpu.power_supported = True
        await until(lambda: rig.meter.up)
        after = await rig.measured()
        last = await rig.scrape()
        assert await _document(rig.client, rig.proxy, before["id"]) == before
    assert across["energy_joules"] is None
    assert on_power["energy_joules"] > 0 and after["energy_joules"] > 0
    assert during["energy_joules"] is None
    assert (healthy.up, switched.up, down.up, last.up) == (1.0, 1.0, 0.0, 1.0)
    assert _non_decreasing([healthy, switched, down, last])
    assert last.device_joules > down.device_joules
    assert last.unknown == 2


# ---- 3. the ledger's disk turning read-only ----


async def _remount(disk: Path, mode: str) -> None:
    """`mount -o remount,MODE`; Linux refuses `ro` while a file on it is open for writing."""
    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], capture_output=True)
    assert done.returncode == 0, f"remount,{mode}: {done.stderr.decode().strip()}"


async def test_a_ledger_disk_turning_read_only_keeps_records_in_memory_then_writes_all(
    tmp_path: Path,
) -> None:
    """The disk goes read-only under a running joulegate, then read-write again.

    Linux refuses `remount,ro` while a file on the disk is open for writing, and the ledger's
    writer holds its connection from its first flush on. So a first joulegate records some
    requests and stops, and a second one, on the same disk, meets the read-only disk at its
    first flush: its records wait in memory, then are all written, beside the first ones."""
    settings = {"ledger": "sqlite", "ledger_flush_interval_seconds": 0.02}
    with tiny_disk(tmp_path / "disk", "2m") as disk:
        async with (
            scripted_upstream() as (upstream, _),
            aiohttp.ClientSession() as client,
        ):

            async def requests(proxy: str, app: web.Application, count: int) -> list[str]:
                ids = []
                for _ in range(count):
                    status, body, request_id = await _stream(client, proxy)
                    assert (status, body) == (200, b"".join([*EVENTS, DONE]))  # traffic flows
                    ids.append(request_id)
                await settled(app)
                return ids

            async with joulegate(upstream, data_dir=str(disk), **settings) as (proxy, app):
                earlier = await requests(proxy, app, 5)

            async with joulegate(upstream, data_dir=str(disk), **settings) as (proxy, app):
                ledger = app[RECORDER].ledger
                assert ledger is not None
                await _remount(disk, "ro")
                later = await requests(proxy, app, 5)
                await until(lambda: ledger.stats().failed_flushes >= 2)

                stats = ledger.stats()
                assert (stats.written, stats.queued, stats.dropped) == (0, 5, 0)
                assert "read-only" in (stats.last_error or "")
                async with client.get(proxy + "/joulegate/health") as response:
                    health = (await response.json())["ledger"]
                assert (health["queued"], health["dropped"]) == (5, 0)
                exposition = await _exposition(client, proxy)
                assert metric_series(exposition, "joulegate_ledger_queued_records") == {
                    '{backend="sqlite"}': 5.0
                }
                failed = metric_series(exposition, "joulegate_ledger_failed_flushes_total")
                assert failed['{backend="sqlite"}'] >= 2
                # SQLite cannot open a WAL file on a read-only disk: a record only in the
                # store is unavailable for now, said in the OpenAI error format.
                async with client.get(f"{proxy}/joulegate/requests/{earlier[0]}") as response:
                    assert response.status == 503
                    assert (await response.json())["error"]["code"] == "ledger_unavailable"
                for request_id in later:  # found in memory meanwhile
                    assert (await _document(client, proxy, request_id))["status"] == "ok"

                await _remount(disk, "rw")
                await until(lambda: ledger.stats().written == 5, timeout=15)
                for request_id in earlier:  # from the ledger: this process never saw them
                    assert (await _document(client, proxy, request_id))["status"] == "ok"
                assert ledger.stats().dropped == 0
        with sqlite3.connect(disk / "joulegate.db") as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            stored = [row[0] for row in connection.execute("SELECT id FROM requests")]
    assert sorted(stored) == sorted(earlier + later)


# ---- 4. and 5.: joulegate as its own process, over a SQLite ledger ----

CHUNK_EVERY = 0.1  # seconds between an SSE stream's events


def _sse_upstream() -> web.Application:
    """Streams `X-Chunks` events (25 unless asked), one every CHUNK_EVERY, then [DONE]."""

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(int(request.headers.get("X-Chunks", "25"))):
            await response.write(b'data: {"n": %d}\n\n' % number)
            await asyncio.sleep(CHUNK_EVERY)
        await response.write(DONE)
        return response

    app = web.Application()
    app.router.add_post(CHAT, stream)
    return app


@asynccontextmanager
async def joulegate_process(
    upstream: str, data_dir: Path, **settings: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process, Path]]:
    """`joulegate serve` with the SQLite ledger in `data_dir`, listening: its URL, its
    process and the file its stderr goes to. Killed if the test did not stop it."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("JOULEGATE_")}
    env |= {"JOULEGATE_DATA_DIR": str(data_dir), "JOULEGATE_LOG_LEVEL": "warning"}
    env |= {f"JOULEGATE_{name.upper()}": value for name, value in settings.items()}
    command = [str(Path(sys.executable).with_name("joulegate")), "serve", "--upstream", upstream]
    command += ["--listen", f"127.0.0.1:{port}", "--meter", "synthetic:100"]
    log = data_dir / f"joulegate-{port}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 30
            while True:
                assert process.returncode is None, "joulegate exited at start"
                try:
                    async with client.get(base + "/joulegate/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline, "joulegate did not start listening"
                    await asyncio.sleep(0.05)
        yield base, process, log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _stored(data_dir: Path) -> dict[str, list[tuple[str, float | None]]]:
    """The ledger's rows by request id: (status, energy_joules) of each; and the file is whole."""
    with sqlite3.connect(data_dir / "joulegate.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = connection.execute("SELECT id, status, energy_joules FROM requests").fetchall()
    stored: dict[str, list[tuple[str, float | None]]] = {}
    for request_id, status, energy in rows:
        stored.setdefault(request_id, []).append((status, energy))
    return stored


STREAMS = 200


@dataclass
class ClientStream:
    """What one client saw of its stream."""

    request_id: str
    body: bytes = b""
    clean: bool = True  # ended without a transport error


async def test_sigterm_with_200_streams_in_flight_lets_each_finish_and_records_each_once(
    tmp_path: Path,
) -> None:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limits[0] < 4 * STREAMS:  # this process holds 200 client and 200 upstream sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limits[1], 4096), limits[1]))
    streams = [ClientStream(f"stream-{number}") for number in range(STREAMS)]
    started = asyncio.Semaphore(0)
    async with (
        serve(_sse_upstream()) as upstream,
        joulegate_process(upstream, tmp_path) as (base, process, log),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
    ):

        async def one(stream: ClientStream) -> None:
            headers = {"X-Request-Id": stream.request_id}
            try:
                async with client.post(
                    base + CHAT, json=STREAM_REQUEST, headers=headers
                ) as response:
                    assert response.status == 200
                    stream.body = await response.content.readany()
                    started.release()
                    stream.body += await response.content.read()
            except aiohttp.ClientPayloadError:
                stream.clean = False

        tasks = [asyncio.create_task(one(stream)) for stream in streams]
        for _ in streams:
            await asyncio.wait_for(started.acquire(), 30)
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        returncode = await asyncio.wait_for(process.wait(), 30)
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert returncode == 0, log.read_text()[-2000:]
    assert all(stream.clean for stream in streams)
    completed = {stream.request_id for stream in streams if stream.body.endswith(DONE)}
    assert len(completed) == STREAMS  # the shutdown waited for every stream
    stored = _stored(tmp_path)
    assert set(stored) == {stream.request_id for stream in streams}
    for stream in streams:
        ((status, energy),) = stored[stream.request_id]  # exactly one row each
        assert status == ("ok" if stream.request_id in completed else "aborted")
        assert energy is not None and energy > 0


async def test_sigterm_cuts_streams_longer_than_the_shutdown_timeout_and_records_them(
    tmp_path: Path,
) -> None:
    """A stream that would outlast the orchestrator's grace period is cut at
    `shutdown_timeout_seconds` and recorded as aborted; a short one still finishes."""
    long_stream, short_stream = ClientStream("long-stream"), ClientStream("short-stream")
    started = asyncio.Semaphore(0)
    async with (
        serve(_sse_upstream()) as upstream,
        joulegate_process(upstream, tmp_path, shutdown_timeout_seconds="1") as (base, process, _),
        aiohttp.ClientSession() as client,
    ):

        async def one(stream: ClientStream, chunks: int) -> None:
            headers = {"X-Request-Id": stream.request_id, "X-Chunks": str(chunks)}
            try:
                async with client.post(base + CHAT, json=STREAM_REQUEST, headers=headers) as answer:
                    stream.body = await answer.content.readany()
                    started.release()
                    stream.body += await answer.content.read()
            except aiohttp.ClientPayloadError:
                stream.clean = False

        # 300 chunks take 30 s, beyond the default timeout's 20 s; 5 take half a second.
        tasks = [
            asyncio.create_task(one(long_stream, 300)),
            asyncio.create_task(one(short_stream, 5)),
        ]
        for _ in tasks:
            await asyncio.wait_for(started.acquire(), 30)
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 15)
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert returncode == 0
    assert short_stream.body.endswith(DONE)
    assert not long_stream.body.endswith(DONE)
    stored = _stored(tmp_path)
    assert [status for status, _ in stored["short-stream"]] == ["ok"]
    assert [status for status, _ in stored["long-stream"]] == ["aborted"]


async def test_after_kill_9_a_restart_serves_keeps_what_was_flushed_and_adds_to_it(
    tmp_path: Path,
) -> None:
    """kill -9 with streams in flight (their records are lost: they never finished), then
    `joulegate serve` again on the same data directory."""
    quick = {"X-Chunks": "1"}
    async with (
        serve(_sse_upstream()) as upstream,
        aiohttp.ClientSession() as client,
    ):

        async def request(base: str, **headers: str) -> str:
            async with client.post(base + CHAT, json=STREAM_REQUEST, headers=headers) as response:
                assert response.status == 200
                assert (await response.read()).endswith(DONE)
                return response.headers["X-Request-Id"]

        async def health(base: str) -> dict[str, Any]:
            async with client.get(base + "/joulegate/health") as response:
                return await response.json()

        async with joulegate_process(upstream, tmp_path) as (base, process, _):
            before = [await request(base, **quick) for _ in range(20)]
            deadline = time.monotonic() + 10
            while (await health(base))["ledger"]["written"] < len(before):
                assert time.monotonic() < deadline, "the records were never flushed"
                await asyncio.sleep(0.05)

            async def cut() -> None:
                with contextlib.suppress(aiohttp.ClientError):  # the process will be gone
                    async with client.post(base + CHAT, json=STREAM_REQUEST) as response:
                        await response.read()

            in_flight = [asyncio.create_task(cut()) for _ in range(5)]
            while (await health(base))["in_flight"] < len(in_flight):
                assert time.monotonic() < deadline, "the streams never started"
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
            await asyncio.wait_for(asyncio.gather(*in_flight), 10)

        async with joulegate_process(upstream, tmp_path) as (base, process, log):
            for request_id in before:  # from the ledger: this process's memory is empty
                async with client.get(f"{base}/joulegate/requests/{request_id}") as response:
                    assert response.status == 200
                    document = await response.json()
                assert (document["status"], document["code"]) == ("ok", 200)
                assert document["energy_joules"] is not None
            after = [await request(base, **quick) for _ in range(10)]
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0, log.read_text()[-2000:]
    stored = _stored(tmp_path)  # and PRAGMA integrity_check is ok
    assert set(stored) == set(before) | set(after)
    assert all(len(rows) == 1 and rows[0][0] == "ok" for rows in stored.values())
