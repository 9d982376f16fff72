"""The SQLite ledger's own promises: one transaction per flush, a crash loses at most the last
flush interval and never corrupts the file, and a full disk only delays records."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ledger.schema import COLUMNS, record_row
from proxy.ledger.sqlite import (
    SHAPES_PER_SIZE,
    SHARE_FROM_ROWS,
    Shapes,
    SQLiteLedger,
    _statement,
    migrate,
)
from tests.test_ledger import make_record, until

ROOT = Path(__file__).resolve().parent.parent


async def test_one_transaction_per_flush(tmp_path: Path) -> None:
    statements: list[str] = []

    def traced(path: str) -> sqlite3.Connection:
        connection = sqlite3.connect(path, check_same_thread=False)
        connection.set_trace_callback(statements.append)
        return connection

    ledger = SQLiteLedger(
        tmp_path / "joulegate.db",
        instance="n",
        connect=traced,
        flush_interval=60,
        batch_size=100,
    )
    await ledger.start()
    statements.clear()  # the migration's own transaction is not a flush
    for number in range(250):
        ledger.append(make_record(number))
    await until(lambda: ledger.stats().written == 200)
    await ledger.close()

    assert ledger.stats().flushes == 3
    assert statements.count("BEGIN IMMEDIATE") == 3
    assert statements.count("COMMIT") == 3
    assert not any(statement.startswith("ROLLBACK") for statement in statements)


async def test_the_file_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "deep" / "er" / "joulegate.db", instance="n")
    await ledger.start()  # makes the data directory as well
    await ledger.close()
    with sqlite3.connect(ledger.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with pytest.raises(ValueError):
        SQLiteLedger(tmp_path / "x.db", instance="n", synchronous="OFF")


# ---- kill -9 under load ----

_CHILD = textwrap.dedent(
    """
    import asyncio, mmap, struct, sys, time
    from proxy.ledger.sqlite import SQLiteLedger

    async def main(path, counters_path):
        ledger = SQLiteLedger(path, instance="child")  # the defaults: 250 ms, synchronous=FULL
        await ledger.start()
        with open(counters_path, "r+b") as file:
            counters = mmap.mmap(file.fileno(), 32)
        number = 0
        slowest = 0.0
        print("ready", flush=True)
        while True:
            for _ in range(10):
                now = time.time()
                ledger.append({
                    "id": str(number), "task": "text-generation", "model": "m",
                    "tenant": "t", "status": "ok", "started_at": now,
                    "duration_seconds": 0.5, "energy_joules": 1.0, "devices": {"gpu0": 1.0},
                })
                number += 1
                counters[0:16] = struct.pack("<qd", number, now)  # appended, and when
            stats = ledger.stats()
            slowest = max(slowest, stats.last_flush_seconds or 0.0)
            counters[16:32] = struct.pack("<qd", stats.written, slowest)  # acknowledged
            await asyncio.sleep(0.002)

    asyncio.run(main(*sys.argv[1:3]))
    """
)
FLUSH_INTERVAL = 0.25  # the default
SLACK = 0.15  # seconds: scheduling on a busy machine


def test_kill_9_under_load_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    """A process appending a few thousand records a second is killed with SIGKILL at a
    moment unrelated to its flushes.

    The file passes `PRAGMA integrity_check`; every record a flush acknowledged is there; the
    rows are exactly the first N appended (no holes) and agree with the roll-up; and the
    records lost were all appended within the last flush interval plus the flush being
    written at the kill (bounded by the slowest flush the child saw, plus some slack): the
    newest committed record is at most that much older than the last one appended."""
    database = tmp_path / "joulegate.db"
    counters_path = tmp_path / "counters"
    counters_path.write_bytes(bytes(32))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(database), str(counters_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(1.0 + (time.time_ns() // 1000 % 1000) / 5000)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    appended, last_append, acknowledged, slowest_flush = struct.unpack(
        "<qdqd", counters_path.read_bytes()
    )

    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored, highest, newest = connection.execute(
            "SELECT count(*), max(CAST(id AS INTEGER)), max(started_at) FROM requests"
        ).fetchone()
        (totalled,) = connection.execute("SELECT sum(requests) FROM request_totals").fetchone()
    assert appended > 1000, "the child did not get going"
    assert stored >= acknowledged > 0
    assert highest == stored - 1  # a prefix of what was appended: no holes
    assert totalled == stored  # the roll-up commits with its rows, never apart
    lost_window = last_append - newest if stored < appended else 0.0
    bound = FLUSH_INTERVAL + slowest_flush + SLACK
    assert lost_window <= bound, (
        f"lost {appended - stored} records appended over {lost_window:.3f}s "
        f"(slowest flush {slowest_flush:.3f}s)"
    )


# ---- a real full disk ----


@contextlib.contextmanager
def tiny_disk(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected failures still run")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


async def test_a_full_disk_delays_records_and_loses_none(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        ledger = SQLiteLedger(disk / "joulegate.db", instance="n", flush_interval=0.02)
        await ledger.start()
        ledger.append(make_record(0))
        await until(lambda: ledger.stats().written == 1)

        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as file:
            while True:
                file.write(bytes(4096))
        for number in range(1, 401):
            ledger.append(make_record(number, reason="x" * 200))
        await until(lambda: ledger.stats().failed_flushes >= 1)
        stats = ledger.stats()
        assert stats.written == 1 and stats.queued == 400 and stats.dropped == 0
        assert "full" in (stats.last_error or "")
        assert await ledger.get("req-400") is not None

        filler.unlink()
        await until(lambda: ledger.stats().written == 401, timeout=10)
        await ledger.close()
        with sqlite3.connect(ledger.path) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert connection.execute("SELECT count(*) FROM requests").fetchone() == (401,)


@pytest.mark.parametrize("rows", [1, SHARE_FROM_ROWS - 1, SHARE_FROM_ROWS, 1500])
async def test_rows_come_back_exactly_when_values_repeat_across_a_batch(
    tmp_path: Path, rows: int
) -> None:
    """A batch where most columns hold one value (bound once) and some do not: every stored
    row is the row appended, value for value and type for type."""
    path = tmp_path / "joulegate.db"
    ledger = SQLiteLedger(path, instance="n", flush_interval=60, batch_size=rows)
    await ledger.start()
    appended = []
    for number in range(rows):
        record = make_record(number, energy=12.5, images=None)
        # Equal values of other types: 1 and 1.0 in a REAL column, 0.0 and -0.0 (which
        # SQLite stores as 0.0 however it is bound).
        record.dynamic_energy_joules = -0.0 if number % 2 else 0.0
        record.carbon_grams = 0.25 + number  # a figure that differs in every row
        record.duration_seconds = 1 if number % 3 else 1.0
        record.model = "tiny-gpt2" if number < rows - 1 else "other"  # one differs at the end
        ledger.append(record)
        appended.append(record_row(record, "n"))
    await until(lambda: ledger.stats().written == rows)
    await ledger.close()

    with contextlib.closing(sqlite3.connect(path)) as connection:
        stored = connection.execute(
            f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY seq"
        ).fetchall()
    assert len(stored) == rows
    for row, expected in zip(stored, appended, strict=True):
        for name, value, wanted in zip(COLUMNS, row, expected, strict=True):
            if isinstance(wanted, bool):
                wanted = int(wanted)
            if isinstance(wanted, float) or name == "duration_seconds":
                assert type(value) is float and value == wanted, name  # == on floats is exact
            else:
                assert (type(value), value) == (type(wanted), wanted), name


def test_a_piece_size_prepares_few_statement_shapes_and_every_row_stays_exact() -> None:
    """Pieces whose constant columns differ each time: at most SHAPES_PER_SIZE sharing
    statements per size (each is a prepared statement SQLite keeps), rows exact whatever
    the shape they went in with."""
    connection = sqlite3.connect(":memory:", isolation_level=None)
    migrate(connection)
    shapes: Shapes = {}
    used: set[str] = set()
    appended = []
    for piece in range(8):
        rows = []
        for number in range(SHARE_FROM_ROWS):
            varying = {
                "tenant": f"t{number % 2}" if piece & 1 else "t",
                "model": f"m{number % 2}" if piece & 2 else "m",
                "reason": f"r{number % 2}" if piece & 4 else None,
            }
            record = make_record(piece * 1000 + number, **varying)
            rows.append(record_row(record, "n"))
        sql, parameters = _statement(rows, shapes)
        connection.execute(sql, parameters)
        used.add(sql)
        appended += rows
    assert len(shapes[SHARE_FROM_ROWS]) <= SHAPES_PER_SIZE
    assert len(used) <= SHAPES_PER_SIZE + 1  # and the statement that shares nothing
    stored = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY seq")
    assert [tuple(row) for row in stored] == [
        tuple(int(v) if isinstance(v, bool) else v for v in row) for row in appended
    ]
