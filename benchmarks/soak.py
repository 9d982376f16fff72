"""Soak: joulegate under steady load for minutes; does its memory keep growing?

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--rate 200] [--warmup 60]
                                        [--prefill N] [--rows-json PATH]

Three processes on loopback: an OpenAI-style chat upstream (`chat_upstream.py`), `joulegate
serve` in front of it as users run it (the synthetic meter, its default SQLite ledger in a
temporary data directory, three tenants' API keys configured) and this process as the load
generator: 32 keep-alive connections sending `--rate` requests a second on a fixed schedule
for `--seconds`. The mix: three in four are whole chat completions, one in four a short
streamed one (5 chunks 10 ms apart); the requests rotate over three models and four API keys
(one unknown), and one in fifty names a model never seen before, so the model label's cap
(`max_models`) and `other` are exercised too. joulegate's resident memory (VmRSS) is read
every 5 s.

Printed: RSS at the start and end of the steady load and the least-squares slope of RSS over
time after `--warmup` seconds, in MB per hour, and every request error (non-200, broken
connection, stream without all its chunks and `[DONE]`). At the end joulegate's
`joulegate_requests_total` and its ledger must count every request sent.

Target: slope < 5 MB/hour and no errors. Why 5: at 200 requests a second an hour is 720,000
requests, so 5 MB/hour is 7 bytes a request, less than any Python object (a float is 24
bytes): a leak of anything per request shows well above it. It is also well above what the
fit can resolve: RSS samples scatter by well under 1 MB, and over 9 minutes of 5 s samples
the slope's standard error is then about 1 MB/hour.

Bounded memory is not a leak, but it fills for a while, and at 200 requests a second it
would read as growth through most of a 10-minute soak: joulegate keeps the last 100,000
finished records in memory for `/joulegate/requests/{id}` (about 1 kB of RSS each), and
its SQLite ledger's page cache takes up to 64 MiB (about 0.45 kB of RSS per row written,
so full after some 150,000 rows). So first `--prefill` requests (by default enough to fill
both, computed from their sizes in `proxy/`) are sent as fast as joulegate takes them,
unmeasured; the RSS then is the figure for joulegate full of what it keeps. With less
prefill the slope is printed but not judged (INFO), and `--prefill 0` shows the fill itself.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    ChatStream,
    Memory,
    chat_request,
    free_port,
    ledger_rows,
    memory,
    raise_open_files_limit,
    read_answer,
    recorded_requests,
    start_joulegate,
    start_upstream,
    stop,
    wait_listening,
)
from benchmarks.results import INFO, Row, verdict, write_rows
from proxy.ledger.sqlite import CACHE_KIB
from proxy.records import RecordStore

TARGET_MB_PER_HOUR = 5.0
RECORD_STORE_CAPACITY = RecordStore().capacity
# RSS the SQLite page cache takes per row written, measured at about 450 bytes; the lower
# figure errs towards more prefill.
LEDGER_CACHE_BYTES_PER_ROW = 400
PREFILL = max(RECORD_STORE_CAPACITY, math.ceil(CACHE_KIB * 1024 / LEDGER_CACHE_BYTES_PER_ROW))
CONNECTIONS = 32
SAMPLE_EVERY = 5.0  # s
STREAM_CHUNKS = 5
CHUNK_INTERVAL = 0.01  # s, the upstream's pace within a stream
MODELS = ("bench-small", "bench-medium", "bench-large")
API_KEYS = ("sk-soak-team-a", "sk-soak-team-b", "sk-soak-team-c", "sk-soak-unknown")
TENANTS = {hashlib.sha256(key.encode()).hexdigest(): key[8:] for key in API_KEYS[:3]}


def request_for(number: int) -> tuple[bytes, int]:
    """Request `number` of the mix, and how many content chunks its stream must bring (0:
    not streamed)."""
    streamed = number % 4 == 3
    model = f"bench-new-{number}" if number % 50 == 7 else MODELS[number % len(MODELS)]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "how much energy did this take?"}],
        "max_tokens": STREAM_CHUNKS if streamed else 8,
        "stream": streamed,
    }
    headers = {"Authorization": f"Bearer {API_KEYS[number % len(API_KEYS)]}"}
    return chat_request(body, headers), STREAM_CHUNKS if streamed else 0


@dataclass
class Load:
    """What the load generator sent and what went wrong."""

    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latest_lag: float = 0.0  # s behind schedule when the last request went out

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int, load: Load
) -> None:
    request, chunks = request_for(number)
    writer.write(request)
    load.sent += 1
    if chunks:
        stream = ChatStream()
        answer = await read_answer(reader, stream.feed)
        if answer.status == 200 and not (stream.done and stream.chunks == chunks):
            load.errors[f"stream with {stream.chunks} of {chunks} chunks"] += 1
    else:
        answer = await read_answer(reader)
        if answer.status == 200 and b'"usage"' not in answer.body:
            load.errors["answer without usage"] += 1
    if answer.status != 200:
        load.errors[f"HTTP {answer.status}"] += 1


async def _connection(
    port: int, load: Load, numbers: range, schedule: tuple[float, float] | None
) -> None:
    """Send requests `numbers` one after another on one keep-alive connection; with a
    schedule (start, rate), request n not before start + n / rate."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for number in numbers:
            if schedule is not None:
                due = schedule[0] + number / schedule[1]
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                load.latest_lag = max(0.0, -delay)
            try:
                await _exchange(reader, writer, number, load)
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                load.errors[type(error).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def send(port: int, first: int, count: int, load: Load, rate: float | None) -> None:
    """Requests first .. first + count - 1 over CONNECTIONS connections: at `rate` a second,
    or with no rate, as fast as they are answered."""
    schedule = (time.monotonic() - first / rate, rate) if rate else None
    await asyncio.gather(
        *(
            _connection(port, load, range(first + k, first + count, CONNECTIONS), schedule)
            for k in range(CONNECTIONS)
        )
    )


@dataclass
class Soak:
    seconds: float
    rate: float
    warmup: float
    prefill: int
    prefill_seconds: float = 0.0
    load: Load = field(default_factory=Load)
    before: Memory | None = None  # joulegate at rest
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s into the soak, MB)
    final: Memory | None = None
    recorded: int = 0
    ledger: int = 0

    @property
    def measured(self) -> list[tuple[float, float]]:
        return [(t, rss) for t, rss in self.samples if t >= self.warmup]

    @property
    def slope_mb_per_hour(self) -> float:
        points = self.measured
        if len(points) < 3:
            return float("nan")
        times, values = zip(*points, strict=True)
        return statistics.linear_regression(times, values).slope * 3600.0

    @property
    def rise_mb(self) -> float:
        """How much the fitted line rises over the measured window: the slope's growth in MB,
        steadier than the difference of two samples."""
        points = self.measured or [(0.0, 0.0)]
        return self.slope_mb_per_hour / 3600.0 * (points[-1][0] - points[0][0])

    @property
    def flowed(self) -> bool:
        """No request failed and joulegate counted, and kept, every one."""
        total = self.prefill + self.load.sent
        return self.load.error_count == 0 and self.recorded == total == self.ledger

    @property
    def judged(self) -> bool:
        """Whether the slope says anything about leaks: not while bounded memory fills."""
        return self.prefill >= PREFILL

    @property
    def passed(self) -> bool:
        return self.slope_mb_per_hour < TARGET_MB_PER_HOUR and self.flowed


async def _soak(port: int, pid: int, soak: Soak) -> None:
    soak.before = memory(pid)
    began = time.monotonic()
    await send(port, 0, soak.prefill, soak.load, None)
    soak.prefill_seconds = time.monotonic() - began
    soak.load.sent = 0  # prefill requests are counted apart
    prefill_errors = soak.load.error_count
    if prefill_errors:
        raise RuntimeError(f"the prefill had errors: {dict(soak.load.errors)}")
    total = round(soak.seconds * soak.rate)
    began = time.monotonic()
    sending = asyncio.create_task(send(port, soak.prefill, total, soak.load, soak.rate))
    while not sending.done():
        soak.samples.append((time.monotonic() - began, memory(pid).rss_mb))
        await asyncio.wait([sending], timeout=SAMPLE_EVERY)
    await sending
    soak.samples.append((time.monotonic() - began, memory(pid).rss_mb))
    soak.recorded = await recorded_requests(port, soak.prefill + soak.load.sent)
    soak.final = memory(pid)


def run(seconds: float, rate: float, warmup: float, prefill: int) -> Soak:
    import uvloop

    raise_open_files_limit()
    soak = Soak(seconds, rate, warmup, prefill)
    upstream_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="joulegate-soak-") as scratch:
        data_dir = Path(scratch)
        upstream = start_upstream(upstream_port, CHUNK_INTERVAL)
        proxy = start_joulegate(
            upstream_port, proxy_port, data_dir, {"api_keys": json.dumps(TENANTS)}
        )
        try:
            wait_listening(upstream_port, process=upstream)
            wait_listening(proxy_port, process=proxy)
            time.sleep(1.0)
            uvloop.run(_soak(proxy_port, proxy.pid, soak))
        finally:
            stop(proxy, upstream)
        soak.ledger = ledger_rows(data_dir)
    return soak


def rows(soak: Soak) -> list[Row]:
    start, end = (soak.measured or soak.samples)[0][1], soak.samples[-1][1]
    total = soak.prefill + soak.load.sent
    minutes = f"{soak.seconds / 60:g} min" if soak.seconds >= 60 else f"{soak.seconds:g} s"
    value = (
        f"{soak.slope_mb_per_hour:+.1f} MB/h ({start:.0f} -> {end:.0f} MB; "
        f"{soak.load.error_count} errors in {soak.load.sent:,}; "
        f"{soak.recorded:,}/{total:,} recorded)"
    )
    if not soak.judged:
        value = f"caches still filling, not judged: {value}"
    result = [
        Row(
            f"soak RSS slope, {soak.rate:g} req/s for {minutes}",
            f"< {TARGET_MB_PER_HOUR:g} MB/h after {soak.warmup:g} s, no errors",
            value,
            verdict(soak.passed) if soak.judged or not soak.flowed else INFO,
        )
    ]
    if soak.prefill:
        result.append(
            Row(
                f"RSS after {soak.prefill:,} requests (prefill)",
                "-",
                f"{soak.samples[0][1]:.0f} MB (at rest before: "
                f"{soak.before.rss_mb if soak.before else 0:.0f} MB)",
                INFO,
            )
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="steady load, after prefill")
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second")
    parser.add_argument("--warmup", type=float, help="s left out of the slope (default 60)")
    parser.add_argument(
        "--prefill",
        type=int,
        default=PREFILL,
        help="requests sent first, as fast as answered (default: enough to fill the record "
        f"store and the ledger's page cache, {PREFILL:,})",
    )
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    arguments = parser.parse_args()
    warmup = arguments.warmup
    if warmup is None:
        warmup = min(60.0, arguments.seconds / 4)

    soak = run(arguments.seconds, arguments.rate, warmup, arguments.prefill)
    if soak.prefill:
        print(
            f"prefill: {soak.prefill:,} requests in {soak.prefill_seconds:.0f} s "
            f"({soak.prefill / soak.prefill_seconds:,.0f}/s)"
        )
    print(f"{'t s':>6}{'RSS MB':>9}")
    step = max(1, len(soak.samples) // 25)
    for elapsed, rss in soak.samples[::step]:
        print(f"{elapsed:>6.0f}{rss:>9.1f}")
    print(
        f"\n{soak.load.sent:,} requests at {soak.rate:g}/s over {soak.seconds:g} s "
        f"(last one {soak.load.latest_lag * 1000:.0f} ms behind schedule)"
    )
    print(
        f"  errors: {soak.load.error_count}"
        + (f" {dict(soak.load.errors)}" if soak.load.errors else "")
    )
    print(
        f"  recorded: {soak.recorded:,} in metrics, {soak.ledger:,} in the ledger "
        f"(of {soak.prefill + soak.load.sent:,} sent, prefill included)"
    )
    if soak.final:
        print(f"  joulegate VmHWM {soak.final.peak_mb:.1f} MB")
    print()
    table = rows(soak)
    for row in table:
        print(f"{row.measure}: {row.value} (target {row.target}) {row.verdict}")
    write_rows(arguments.rows_json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
