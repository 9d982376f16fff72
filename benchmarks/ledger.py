"""The SQLite ledger: how fast it takes records in, and how fast a report reads 10 M of them.

    .venv/bin/python benchmarks/ledger.py [--records 100000] [--rows 10000000] [--raw]
        [--rows-json PATH]

1. Insert throughput. `SQLiteLedger` with its defaults (WAL, synchronous=FULL: one fsync per
   flush, flushes every 250 ms or per 2,000 records) takes finished `RequestRecord`s through
   `append` on an event loop as fast as the loop can hand them over (never letting more
   than 50,000 wait, as live traffic would not either) until `close()` has committed the
   last one. Throughput = records / (first append to last commit). Also printed: the time
   `append` costs the event loop per record. Target >= 20,000 records/s. Measured twice:
   with time-ordered request ids (UUIDv7-like: they insert at the end of the id index) and
   with random uuid4 ids (each flush then dirties about one index page per row).

2. Report over 10 M requests. A ledger holding `--rows` requests (default 10,000,000: four
   a second for 29 days, 5 tasks x 7 models x 13 tenants) is built in bulk: rows from a
   recursive CTE, in chunks, each chunk rolled up into the hourly totals by the very
   statement a flush runs (the ledger's hourly roll-up commits with its rows), then the
   `started_at` index. The report is `Ledger.totals(start, end, "day")` over all of it:
   per UTC day x task x model x tenant x team, the number of requests, failed requests,
   requests with known energy, estimated ones, and the sums of energy, dynamic energy,
   duration, input and output tokens, images, carbon and facility energy. Both bounds
   fall inside an hour, so the edge hours come from raw rows and the rest from the
   roll-up. The answer is checked against the known totals. Target < 10 s.
   (The id and tenant indexes are not built in bulk: the report reads neither.)

   `--raw` also times what the roll-up replaces: the same per-day GROUP BY straight over
   the raw rows (about 30 s per 10 M rows on a 2-core machine).

Building 10 M rows takes most of the default run (about 1.5 of its 1.75 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import INFO, Row, write_rows
from benchmarks.results import verdict as row_verdict
from proxy.ledger.sqlite import _ROLL_UP, SQLiteLedger
from proxy.records import STATUS_OK, RequestRecord

INSERT_TARGET = 20_000  # records/s
REPORT_TARGET = 10.0  # seconds
START = 1_700_000_000.0  # not on an hour: the report's first edge comes from raw rows
SPACING = 0.25  # seconds between synthetic requests: 4 a second
TASKS = (
    "text-generation",
    "image-generation",
    "embeddings",
    "text-classification",
    "summarization",
)
CHUNK = 1_000_000

_GENERATE = f"""
INSERT INTO requests (id, instance, started_at, ended_at, task, model, tenant, upstream,
    method, path, streaming, status, code, duration_seconds, energy_joules,
    dynamic_energy_joules, devices, meter, estimate, input_tokens, output_tokens)
WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?)
SELECT printf('%08x-0000-4000-8000-%012x', i, i * 2654435761 % 281474976710656), 'node-1',
    {START} + i * {SPACING}, {START} + i * {SPACING} + 0.5,
    CASE i % 5 {" ".join(f"WHEN {k} THEN '{task}'" for k, task in enumerate(TASKS))} END,
    'model-' || (i % 7), 'tenant-' || (i % 13), 'http://127.0.0.1:8000', 'POST',
    '/v1/chat/completions', 0, 'ok', 200, 0.5, (i % 1000) * 0.37, (i % 1000) * 0.2,
    '{{"gpu0":' || ((i % 1000) * 0.37) || '}}', 'nvml', 0, i % 300, i % 200
FROM n
"""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def synthetic_records(count: int, ordered_ids: bool = False) -> list[RequestRecord]:
    """Finished records as the Recorder publishes them; ids random (uuid4), or time-ordered
    (48 bits of milliseconds, then random bits, as UUIDv7)."""
    generator = random.Random(1)
    records = []
    for number in range(count):
        request_id = uuid.UUID(int=generator.getrandbits(128), version=4).hex
        if ordered_ids:
            request_id = f"{int(START * 1000) + number:012x}{request_id[12:]}"
        record = RequestRecord(
            id=request_id,
            task=TASKS[number % 5],
            model=f"model-{number % 7}",
            tenant=f"tenant-{number % 13}",
            streaming=False,
            method="POST",
            path="/v1/chat/completions",
            upstream="http://127.0.0.1:8000",
            started_at=START + number * 0.001,
            start=float(number),
        )
        record.finish(number + 0.5, STATUS_OK, 200)
        record.input_tokens, record.output_tokens = 14, 8
        record.energy_joules, record.dynamic_energy_joules = 12.5, 6.25
        record.devices = {"gpu0": 12.5}
        record.meter = "nvml"
        records.append(record)
    return records


async def insert_throughput(
    directory: Path, count: int, ordered_ids: bool
) -> tuple[float, float, int]:
    """(records/s end to end, microseconds of event loop per append, flushes)."""
    records = synthetic_records(count, ordered_ids)
    ledger = SQLiteLedger(directory / f"insert-{ordered_ids}.db", instance="bench")
    await ledger.start()
    appending = 0.0
    began = time.perf_counter()
    for offset in range(0, count, 1000):
        mark = time.perf_counter()
        for record in records[offset : offset + 1000]:
            ledger.append(record)
        appending += time.perf_counter() - mark
        while ledger.stats().queued > 50_000:
            await asyncio.sleep(0.002)
        await asyncio.sleep(0)
    await ledger.close()
    elapsed = time.perf_counter() - began
    stats = ledger.stats()
    assert stats.written == count and stats.dropped == 0, stats
    return count / elapsed, appending / count * 1e6, stats.flushes


async def build(path: Path, rows: int) -> float:
    """A ledger of `rows` synthetic requests, made as described above; seconds taken."""
    began = time.perf_counter()
    ledger = SQLiteLedger(path, instance="bench")
    await ledger.start()  # the real schema, by the real migrations
    await ledger.close()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = OFF")  # bulk only: the file is thrown away
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute("PRAGMA cache_size = -1000000")
    indexes = connection.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' "
        "AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        connection.execute(f"DROP INDEX {name}")
    for first in range(0, rows, CHUNK):
        connection.execute("BEGIN")
        (before,) = connection.execute("SELECT coalesce(max(seq), 0) FROM requests").fetchone()
        connection.execute(_GENERATE, (first, min(rows, first + CHUNK) - 1))
        connection.execute(_ROLL_UP, (before,))
        connection.execute("COMMIT")
        print(f"  built {min(rows, first + CHUNK):>11,} rows", end="\r", file=sys.stderr)
    for name, sql in indexes:
        if name == "requests_started_at":
            connection.execute(sql)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.close()
    print(file=sys.stderr)
    return time.perf_counter() - began


def expected_energy(rows: int) -> float:
    """Sum of (i % 1000) * 0.37 for i below `rows`: what the report must find."""
    whole, rest = divmod(rows, 1000)
    return 0.37 * (whole * 999 * 1000 / 2 + rest * (rest - 1) / 2)


async def report(path: Path, rows: int) -> tuple[float, int]:
    """(seconds for the report, groups in it); checks its totals."""
    ledger = SQLiteLedger(path, instance="bench")
    await ledger.start()
    try:
        end = START + rows * SPACING
        began = time.perf_counter()
        totals = await ledger.totals(START, end, "day")
        elapsed = time.perf_counter() - began
    finally:
        await ledger.close()
    requests = sum(group.requests for group in totals)
    energy = sum(group.energy_joules or 0.0 for group in totals)
    assert requests == rows, (requests, rows)
    assert abs(energy - expected_energy(rows)) <= 1e-6 * expected_energy(rows), energy
    return elapsed, len(totals)


def raw_report(path: Path) -> float:
    """The same per-day groups straight from the raw rows, as without a roll-up."""
    connection = sqlite3.connect(path)
    began = time.perf_counter()
    connection.execute(
        "SELECT CAST(started_at / 86400 AS INTEGER) AS day, task, model, tenant, team, "
        "count(*), sum(energy_joules), sum(dynamic_energy_joules), sum(input_tokens), "
        "sum(output_tokens) FROM requests GROUP BY day, task, model, tenant, team"
    ).fetchall()
    connection.close()
    return time.perf_counter() - began


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records to insert")
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in the report")
    parser.add_argument("--raw", action="store_true", help="also time a raw GROUP BY")
    parser.add_argument("--dir", type=Path, help="where to put the files (default: a temp dir)")
    parser.add_argument("--rows-json", type=Path, help="also write the result rows here")
    arguments = parser.parse_args()
    rows = []

    with tempfile.TemporaryDirectory(dir=arguments.dir, prefix="joulegate-ledger-") as scratch:
        directory = Path(scratch)
        print(f"SQLite {sqlite3.sqlite_version}; files in {directory}")

        # joulegate's own ids are time-ordered; client-chosen ids (X-Request-Id) may be
        # random, so their rate is shown too, as the baseline for what ordering buys.
        for ordered_ids, kind in ((True, "time-ordered ids"), (False, "random uuid4 ids")):
            rate, append_us, flushes = await insert_throughput(
                directory, arguments.records, ordered_ids
            )
            target = (
                f"target >= {INSERT_TARGET:,}   {verdict(rate >= INSERT_TARGET)}"
                if ordered_ids
                else "(baseline: clients' random ids)"
            )
            print(
                f"  insert, {kind:<17} {rate:>8,.0f} records/s   {target}   "
                f"({arguments.records:,} records, {flushes} flushes, "
                f"append {append_us:.1f} us on the loop)"
            )
            rows.append(
                Row(
                    f"ledger (SQLite) insert throughput, {kind}",
                    f">= {INSERT_TARGET:,}/s" if ordered_ids else "- (baseline)",
                    f"{rate:,.0f} records/s",
                    row_verdict(rate >= INSERT_TARGET) if ordered_ids else INFO,
                )
            )

        path = directory / "report.db"
        built = await build(path, arguments.rows)
        size = path.stat().st_size / 2**20
        print(f"report: built {arguments.rows:,} rows in {built:.0f}s ({size:,.0f} MiB)")
        seconds, groups = await report(path, arguments.rows)
        print(
            f"  report over {arguments.rows:,} requests   {seconds:.3f} s   target < "
            f"{REPORT_TARGET:.0f} s   {verdict(seconds < REPORT_TARGET)}   ({groups:,} groups "
            "of day x task x model x tenant x team)"
        )
        rows.append(
            Row(
                f"report over {arguments.rows:,} ledger rows (by day)",
                f"< {REPORT_TARGET:.0f} s",
                f"{seconds:.2f} s",
                row_verdict(seconds < REPORT_TARGET),
            )
        )
        if arguments.raw:
            print(f"  the same GROUP BY over the raw rows: {raw_report(path):.1f} s")
    write_rows(arguments.rows_json, rows)
    return 0  # a benchmark reports; the tests are what fail


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
