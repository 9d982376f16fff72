"""Soak: joulegate under steady load for minutes; does its memory keep growing?

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--rate 200] [--warmup 60]
                                        [--prefill auto|N] [--rows-json PATH]

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
would read as growth through a short soak: with its ledger on, joulegate keeps the last
10,000 finished records in memory for `/joulegate/requests/{id}` (about 1 kB of RSS each),
and its SQLite ledger's page cache takes up to 8 MiB (about 0.4 kB of RSS per row written,
so full after some 20,000 rows). So first comes a prefill, unmeasured: whole answers, as
fast as joulegate takes them, in blocks of 10,000, until RSS stops growing (two blocks in a
row adding under 0.5 MB each, 50 bytes a request) and at least the record store's capacity
(`--prefill auto`, the default; at most 400,000), or exactly `--prefill N`. The RSS then is
the figure for joulegate full of what it keeps. When the prefill did not reach that plateau
the slope is printed but not judged (INFO); `--prefill 0` shows the fill itself.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (
    ChatStream,
    Memory,
    chat_request,
    joulegate_stack,
    memory,
    read_answer,
    recorded_requests,
)
from benchmarks.results import INFO, Row, verdict, write_rows
from proxy.records import RECORDS_KEPT_WITH_LEDGER

TARGET_MB_PER_HOUR = 5.0
PREFILL_MIN = RECORDS_KEPT_WITH_LEDGER  # the record store full, at least
PREFILL_BLOCK = 10_000  # requests between two looks at RSS
PREFILL_FLAT_MB = 0.5  # a block adding less than this (50 bytes a request) adds nothing
PREFILL_MAX = 400_000
CONNECTIONS = 32
SAMPLE_EVERY = 5.0  # s
STREAM_CHUNKS = 5
CHUNK_INTERVAL = 0.01  # s, the upstream's pace within a stream
MODELS = ("bench-small", "bench-medium", "bench-large")
API_KEYS = ("sk-soak-team-a", "sk-soak-team-b", "sk-soak-team-c", "sk-soak-unknown")
TENANTS = {hashlib.sha256(key.encode()).hexdigest(): key[8:] for key in API_KEYS[:3]}


def request_for(number: int, streaming: bool = True) -> tuple[bytes, int]:
    """Request `number` of the mix, and how many content chunks its stream must bring (0:
    not streamed). Every fourth request on each connection streams, unless not `streaming`."""
    turn = number // CONNECTIONS  # requests number, number + 32, ... share a connection
    streamed = streaming and turn % 4 == 3
    model = f"bench-new-{number}" if number % 50 == 7 else MODELS[number % len(MODELS)]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "how much energy did this take?"}],
        "max_tokens": STREAM_CHUNKS if streamed else 8,
        "stream": streamed,
    }
    headers = {"Authorization": f"Bearer {API_KEYS[(number + turn) % len(API_KEYS)]}"}
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
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    number: int,
    load: Load,
    streaming: bool,
) -> None:
    request, chunks = request_for(number, streaming)
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
    port: int,
    load: Load,
    numbers: range,
    schedule: tuple[float, float] | None,
    streaming: bool,
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
                await _exchange(reader, writer, number, load, streaming)
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                load.errors[type(error).__name__] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def send(
    port: int, first: int, count: int, load: Load, rate: float | None, streaming: bool = True
) -> None:
    """Requests first .. first + count - 1 of the mix over CONNECTIONS connections: at `rate`
    a second, or with no rate, as fast as they are answered; without `streaming`, all of
    them whole answers."""
    schedule = (time.monotonic() - first / rate, rate) if rate else None
    await asyncio.gather(
        *(
            _connection(
                port, load, range(first + k, first + count, CONNECTIONS), schedule, streaming
            )
            for k in range(CONNECTIONS)
        )
    )


@dataclass
class Soak:
    seconds: float
    rate: float
    warmup: float
    prefill: int  # requests sent before the steady load
    prefill_seconds: float = 0.0
    prefill_flat: bool = False  # whether RSS had stopped growing by the prefill's end
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
        return self.prefill_flat

    @property
    def passed(self) -> bool:
        return self.slope_mb_per_hour < TARGET_MB_PER_HOUR and self.flowed


async def prefill(port: int, pid: int, minimum: int, maximum: int) -> tuple[int, bool]:
    """Whole answers (they fill the same memory as streams, without waiting on chunks) as
    fast as joulegate takes them, in blocks, until RSS stops growing and at least `minimum`
    were sent, or `maximum` were; (requests sent, whether RSS had stopped growing)."""
    load = Load()
    sent, flat_blocks, rss = 0, 0, memory(pid).rss_mb
    while sent < maximum and (sent < minimum or flat_blocks < 2):
        block = min(PREFILL_BLOCK, maximum - sent)
        await send(port, sent, block, load, None, streaming=False)
        sent += block
        now = memory(pid).rss_mb
        flat_blocks = flat_blocks + 1 if now - rss < PREFILL_FLAT_MB * block / PREFILL_BLOCK else 0
        rss = now
    if load.error_count:
        raise RuntimeError(f"the prefill had errors: {dict(load.errors)}")
    return sent, flat_blocks >= 2


async def _soak(port: int, pid: int, soak: Soak, prefill_range: tuple[int, int]) -> None:
    soak.before = memory(pid)
    began = time.monotonic()
    soak.prefill, soak.prefill_flat = await prefill(port, pid, *prefill_range)
    soak.prefill_seconds = time.monotonic() - began
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


def run(seconds: float, rate: float, warmup: float, prefill_count: int | None = None) -> Soak:
    """The soak, after a prefill of `prefill_count` requests, or with None until joulegate's
    RSS stops growing (see the module's docstring)."""
    import uvloop

    soak = Soak(seconds, rate, warmup, 0)
    prefill_range = (
        (PREFILL_MIN, PREFILL_MAX) if prefill_count is None else (prefill_count, prefill_count)
    )
    with joulegate_stack("soak", CHUNK_INTERVAL, {"api_keys": json.dumps(TENANTS)}) as stack:
        time.sleep(1.0)
        uvloop.run(_soak(stack.port, stack.pid, soak, prefill_range))
    assert stack.ledger_rows is not None
    soak.ledger = stack.ledger_rows
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


def prefill_argument(text: str) -> int | None:
    """`auto` (None) or a number of requests."""
    return None if text == "auto" else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="steady load, after prefill")
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second")
    parser.add_argument("--warmup", type=float, help="s left out of the slope (default 60)")
    parser.add_argument(
        "--prefill",
        type=prefill_argument,
        default=None,
        help="requests sent first, as fast as answered; auto (the default): until RSS stops "
        "growing",
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
            f"({soak.prefill / soak.prefill_seconds:,.0f}/s); RSS "
            + ("had stopped growing" if soak.prefill_flat else "was still growing")
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
