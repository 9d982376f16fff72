"""joulegate's memory while it holds 1,000 concurrent SSE streams open.

    .venv/bin/python benchmarks/streams_memory.py [--streams 1000] [--seconds 60]
        [--prefill auto|N] [--rows-json PATH]

Three processes on loopback: an OpenAI-style chat upstream (`chat_upstream.py`) that sends one
chat chunk a second on every stream, `joulegate serve` in front of it as users run it (the
synthetic meter, its default SQLite ledger in a temporary data directory), and this process as
the client: it opens `--streams` streaming chat requests at once (in batches of 100, 50 ms
apart, so the listen backlog is never the bottleneck) and holds each open for `--seconds`,
while it reads joulegate's resident memory every second from /proc (VmRSS, and VmHWM for the
peak over its whole life, between samples included).

Target: peak RSS <= 200 MB. Also printed: RSS before the load and after the streams end. It
checks that every stream received every chunk and `[DONE]`, that joulegate counted every
request in `joulegate_requests_total`, and that its ledger holds a row for each: a figure of
memory is worth nothing if the streams did not really flow or were not all recorded.

First joulegate gets the soak's whole answers, as fast as it takes them, until its RSS stops
growing (`--prefill auto`, the default; `--prefill N`: N of them), so the streams meet a
joulegate full of what it keeps in memory (recent records, the ledger's page cache), as after
a day of traffic; `--prefill 0` measures a fresh one.

joulegate runs with its defaults, but for more streams than its upstream pool holds
(`upstream_connections`, 1,024: each open stream holds one upstream connection, so the rest
would wait for one), and every process raises its soft limit on open files to the hard limit
(joulegate does that itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
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
from benchmarks.soak import PREFILL_MAX, PREFILL_MIN, prefill, prefill_argument
from proxy.config import Config

TARGET_PEAK_MB = 200.0
CHUNK_INTERVAL = 1.0  # s between chunks on each stream
BATCH = 100  # streams opened together
BATCH_PAUSE = 0.05  # s between batches


@dataclass
class Stream(ChatStream):
    """What one client stream received, and how it ended."""

    status: int = 0
    error: str | None = None


@dataclass
class Outcome:
    streams: list[Stream]
    expected: int  # chunks each stream should receive
    before: Memory
    samples: list[tuple[float, Memory]] = field(default_factory=list)
    after: Memory | None = None
    recorded: int = 0
    ledger: int = 0
    ramp_seconds: float = 0.0
    prefill: int = 0  # requests joulegate had served before the streams

    @property
    def complete(self) -> int:
        return sum(s.status == 200 and s.done and s.chunks == self.expected for s in self.streams)

    @property
    def peak_mb(self) -> float:
        """VmHWM: the peak over joulegate's whole life, between samples included."""
        return self.after.peak_mb if self.after else 0.0

    @property
    def sampled_peak_mb(self) -> float:
        return max((m.rss_mb for _, m in self.samples), default=0.0)


async def _stream(port: int, chunks: int, stream: Stream, opened: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        stream.error = f"connect: {error}"
        opened.set()
        return
    try:
        body = {
            "model": "bench",
            "stream": True,
            "max_tokens": chunks,
            "messages": [{"role": "user", "content": "hold on"}],
        }
        writer.write(chat_request(body, {"Connection": "close"}))
        opened.set()
        answer = await read_answer(reader, stream.feed)
        stream.status = answer.status
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        stream.error = f"{type(error).__name__}: {error}"
    finally:
        opened.set()
        writer.close()


async def _sample(pid: int, samples: list[tuple[float, Memory]], stop_sampling: asyncio.Event):
    began = time.monotonic()
    while not stop_sampling.is_set():
        samples.append((time.monotonic() - began, memory(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_sampling.wait(), 1.0)


async def hold_streams(
    port: int, pid: int, count: int, seconds: float, prefill: int = 0
) -> Outcome:
    chunks = max(1, round(seconds / CHUNK_INTERVAL))
    outcome = Outcome([Stream() for _ in range(count)], chunks, memory(pid))
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(_sample(pid, outcome.samples, stop_sampling))
    began = time.monotonic()
    tasks = []
    for first in range(0, count, BATCH):
        batch = []
        for stream in outcome.streams[first : first + BATCH]:
            opened = asyncio.Event()
            tasks.append(asyncio.create_task(_stream(port, chunks, stream, opened)))
            batch.append(opened.wait())
        await asyncio.gather(*batch)
        await asyncio.sleep(BATCH_PAUSE)
    outcome.ramp_seconds = time.monotonic() - began
    await asyncio.gather(*tasks)
    outcome.recorded = await recorded_requests(port, prefill + count) - prefill
    await asyncio.sleep(2.0)  # let joulegate settle before "after"
    stop_sampling.set()
    await sampler
    outcome.after = memory(pid)
    return outcome


def run(count: int, seconds: float, prefill_count: int | None = None) -> Outcome:
    """Start the upstream and joulegate, hold the streams, stop both; the outcome. First
    `prefill_count` of the soak's whole answers, as fast as answered (None: until joulegate's
    RSS stops growing)."""
    import uvloop

    pool = Config().upstream_connections
    settings = {} if count < pool else {"upstream_connections": str(count + 16)}
    with joulegate_stack("streams", CHUNK_INTERVAL, settings) as stack:
        sent = 0
        if prefill_count != 0:
            low, high = (
                (PREFILL_MIN, PREFILL_MAX)
                if prefill_count is None
                else (prefill_count, prefill_count)
            )
            sent, _ = uvloop.run(prefill(stack.port, stack.pid, low, high))
        time.sleep(2.0)  # the sampler and ledger start; "before" is joulegate at rest
        outcome = uvloop.run(hold_streams(stack.port, stack.pid, count, seconds, sent))
    assert stack.ledger_rows is not None  # read after SIGTERM: joulegate flushed everything
    outcome.ledger = stack.ledger_rows - sent
    outcome.prefill = sent
    return outcome


def rows(outcome: Outcome, count: int, seconds: float) -> list[Row]:
    assert outcome.after is not None
    flowed = outcome.complete == count and outcome.recorded == count == outcome.ledger
    return [
        Row(
            f"peak RSS, {count:,} SSE streams held {seconds:g} s"
            + (f", after {outcome.prefill:,} requests" if outcome.prefill else ""),
            f"<= {TARGET_PEAK_MB:.0f} MB",
            f"{outcome.peak_mb:.0f} MB (before {outcome.before.rss_mb:.0f}, "
            f"after {outcome.after.rss_mb:.0f})",
            verdict(outcome.peak_mb <= TARGET_PEAK_MB and flowed),
        ),
        Row(
            f"{count:,} streams: all chunks delivered, all recorded",
            "all",
            f"{outcome.complete:,} complete, {outcome.recorded:,} in metrics, "
            f"{outcome.ledger:,} in ledger",
            verdict(flowed),
        ),
        Row(
            "RSS per open stream (highest sample - before)",
            "-",
            f"{(outcome.sampled_peak_mb - outcome.before.rss_mb) * 1e3 / count:.0f} kB",
            INFO,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each stream lasts")
    parser.add_argument(
        "--prefill",
        type=prefill_argument,
        default=None,
        help="requests before the streams; auto (the default): until joulegate's RSS stops "
        "growing (see soak.py)",
    )
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    arguments = parser.parse_args()

    outcome = run(arguments.streams, arguments.seconds, arguments.prefill)
    assert outcome.after is not None
    print(f"{'t s':>6}{'RSS MB':>9}")
    for elapsed, sample in outcome.samples[:: max(1, len(outcome.samples) // 20)]:
        print(f"{elapsed:>6.0f}{sample.rss_mb:>9.1f}")
    failed = [s for s in outcome.streams if s.error or not s.done]
    print(
        f"\n{arguments.streams:,} streams opened in {outcome.ramp_seconds:.1f} s, "
        f"{outcome.expected} chunks each over {arguments.seconds:g} s"
    )
    print(
        f"  complete: {outcome.complete:,}; failed: {len(failed):,}"
        + (f" (first: {failed[0].error or f'{failed[0].chunks} chunks'})" if failed else "")
    )
    print(
        f"  joulegate RSS: before {outcome.before.rss_mb:.1f} MB, peak {outcome.peak_mb:.1f} MB "
        f"(VmHWM {outcome.after.peak_mb:.1f}), after {outcome.after.rss_mb:.1f} MB"
    )
    print(f"  recorded: {outcome.recorded:,} in metrics, {outcome.ledger:,} in the ledger\n")
    table = rows(outcome, arguments.streams, arguments.seconds)
    for row in table:
        print(f"{row.measure}: {row.value} (target {row.target}) {row.verdict}")
    write_rows(arguments.rows_json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
