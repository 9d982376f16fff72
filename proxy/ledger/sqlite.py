"""The default ledger: one SQLite file in the data directory, written by one thread.

Durability. The file is in WAL mode: a transaction is appended to the write-ahead log and
committed by a single write of its commit frame, so a crash at any moment leaves either
the whole flush or none of it, and never a torn database. `synchronous=FULL` fsyncs the
log at every commit. That is what makes the loss bound hold for power cuts and kernel
panics, not only for a killed process (`NORMAL` would survive `kill -9` as well, but after
a power cut could lose every commit since the last checkpoint, which is far more than one
flush interval). The price is one fsync per flush, at most four a second at the default
250 ms interval however heavy the traffic, as rows are batched: one transaction per flush,
its rows in multi-row INSERTs (see ROWS_PER_INSERT).

One writer thread owns the write connection; queries run on one reader thread with its own
connection (WAL lets them read while the writer writes), so the event loop never waits on
the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

from proxy.ledger.base import Ledger, LedgerError, Pacer, log
from proxy.ledger.schema import (
    COLUMNS,
    MIGRATIONS,
    TOTALS_MEASURES,
    Group,
    Migration,
    Row,
    SchemaTooNew,
    as_groups,
    check_migrations,
    hour_expression,
    measure_expressions,
    row_document,
    totals_select,
)

Connect = Callable[[str], sqlite3.Connection]
SYNCHRONOUS = ("FULL", "NORMAL", "EXTRA")
# The page cache is memory joulegate keeps for good (about 0.4 kB of RSS per row written
# until full), so it stays small: 8 MiB. Measured over 200,000 records on 2 cores, 64 MiB
# bought nothing (time-ordered ids 23,400 records/s against 25,400 at 8 MiB and 27,100 at
# SQLite's default 2 MiB; random uuid4 ids 13,500 / 14,300 / 13,500). Checkpointing every
# 4,000 WAL pages (16 MiB) instead of 1,000 copies each hot page back to the database file
# less often.
CACHE_KIB = 8 * 1024
# How long a connection waits for another's lock (several instances on one file).
BUSY_SECONDS = 5.0
CHECKPOINT_PAGES = 4000

# Rows go in as multi-row INSERTs of 1,024 rows (within SQLite's 32,766 bound parameters),
# the rest in power-of-two pieces: about one statement step per thousand rows rather than
# one per row, as `executemany` would, so the writer thread hands the GIL to the event loop
# and waits to take it back once per statement instead of once per row (~5 % less CPU and
# ~10 % more records a second under load), with few statement shapes to prepare: 11 sizes,
# times the sets of columns shared (below) that traffic shows.
ROWS_PER_INSERT = 1024
assert ROWS_PER_INSERT * len(COLUMNS) <= 32_766


# Binding is most of what a flush costs the event loop: about 0.1 us a value, with the GIL
# held, so the loop waits meanwhile (31 values a row: 3 us). A column whose value is the same
# in every row of a piece (the instance, upstream and meter; under steady traffic often the
# task, model, tenant, status, and the NULLs) is bound once, as a numbered parameter that
# every row names. Measured on 2 cores: a piece of 1,024 rows binds in a third of the time.
# Pieces of fewer rows gain too little to be worth a statement shape of their own.
SHARE_FROM_ROWS = 64
# Each shape is a statement SQLite keeps prepared: 3.6 MB for one of 1,024 rows. So a size
# has at most two shapes that share columns (the first two sets traffic showed); a piece
# whose set is neither shares the largest of them that it can, or none.
SHAPES_PER_SIZE = 2
Shapes = dict[int, list[tuple[int, ...]]]  # rows in a piece -> the column sets it shares


@functools.lru_cache(maxsize=64)
def _insert(rows: int, shared: tuple[int, ...] = ()) -> str:
    """A multi-row INSERT of `rows` rows whose columns at `shared` positions are bound once,
    as ?1, ?2...; the other columns follow row by row."""
    numbers = {position: number for number, position in enumerate(shared, start=1)}
    varying = [position for position in range(len(COLUMNS)) if position not in numbers]
    tuples = []
    following = len(shared) + 1
    for _ in range(rows):
        slots = dict(numbers)
        for position in varying:
            slots[position] = following
            following += 1
        tuples.append("(" + ", ".join(f"?{slots[p]}" for p in range(len(COLUMNS))) + ")")
    return (
        f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES {', '.join(tuples)} "
        "ON CONFLICT DO NOTHING"
    )


def _same_in_all(values: tuple[Any, ...]) -> bool:
    """Whether one bound value can stand for all of `values`: equal ones store alike (a REAL
    column keeps 1.0 for 1 and 1.0, and SQLite stores -0.0 as 0.0 in any case)."""
    return values.count(values[0]) == len(values)


def _statement(rows: list[Row], shapes: Shapes) -> tuple[str, list[Any]]:
    """The INSERT for one piece of rows and its parameters; `shapes` are the sharing
    statements this connection has used so far (it may gain one)."""
    if len(rows) >= SHARE_FROM_ROWS:
        columns = list(zip(*rows, strict=True))
        constant = {p for p, values in enumerate(columns) if _same_in_all(values)}
        if len(constant) <= len(COLUMNS) - 2:  # two vary at least (the id always does)
            known = shapes.setdefault(len(rows), [])
            shared = max((s for s in known if constant.issuperset(s)), key=len, default=())
            if len(shared) < len(constant) and len(known) < SHAPES_PER_SIZE:
                shared = tuple(sorted(constant))
                known.append(shared)
            if shared:
                varying = [p for p in range(len(COLUMNS)) if p not in shared]
                parameters = [columns[p][0] for p in shared]
                parameters += chain.from_iterable(map(itemgetter(*varying), rows))
                return _insert(len(rows), shared), parameters
    return _insert(len(rows)), list(chain.from_iterable(rows))


def _pieces(rows: list[Row]) -> Iterator[list[Row]]:
    """`rows` cut into pieces of 1,024 rows and then of falling powers of two."""
    first = 0
    while first < len(rows):
        size = min(ROWS_PER_INSERT, 1 << ((len(rows) - first).bit_length() - 1))
        yield rows[first : first + size]
        first += size


_ROLL_UP = totals_select("sqlite", "requests", "seq > ?")
_SELECT = f"SELECT seq, {', '.join(COLUMNS)} FROM requests"
_STARTED_AT = 1 + COLUMNS.index("started_at")  # its place in a _SELECT row
_KEY = "task, coalesce(model, ''), tenant, coalesce(team, '')"
_ROLLED_UP = (
    f"SELECT hour - hour % ?, task, model, tenant, team, "
    f"{', '.join(f'sum({name})' for name in TOTALS_MEASURES)} "
    "FROM request_totals WHERE hour >= ? AND hour < ? GROUP BY 1, 2, 3, 4, 5"
)
_HOUR = hour_expression("sqlite")
_RAW_TOTALS = (
    f"SELECT {_HOUR} - {_HOUR} % ?, {_KEY}, {', '.join(measure_expressions('sqlite'))} "
    "FROM requests WHERE started_at >= ? AND started_at < ? GROUP BY 1, 2, 3, 4, 5"
)
# Errors about the rows themselves rather than the store: retrying the batch cannot help.
_DATA_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    OverflowError,
    TypeError,
    ValueError,
)


def default_connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, check_same_thread=False)


class SQLiteLedger(Ledger):
    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        instance: str,
        synchronous: str = "FULL",
        connect: Connect = default_connect,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        **options: Any,
    ) -> None:
        super().__init__(instance=instance, **options)
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        check_migrations(migrations)
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self._connect_factory = connect
        self._migrations = migrations
        self._wakeup = threading.Event()
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None
        self._write_connection: sqlite3.Connection | None = None
        self._shapes: Shapes = {}  # the writer thread's own
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-read")
        self._read_connection: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    # ---- lifecycle ----

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._migrate)
        except (sqlite3.Error, OSError, SchemaTooNew) as error:
            raise LedgerError(f"cannot open the ledger {self.path}: {error}") from error
        self._writer = threading.Thread(target=self._run, name="ledger-write", daemon=True)
        self._writer.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wakeup.set()
        if self._writer is not None:
            # The writer gives up by itself after close_timeout, unless stuck in a system
            # call (a hung network file system): then stop waiting and say what is lost.
            await asyncio.to_thread(self._writer.join, self.close_timeout + 5)
            if self._writer.is_alive():
                self._gave_up()
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)

    def _wake(self) -> None:
        self._wakeup.set()

    # ---- connections ----

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connect_factory(str(self.path))
        connection.isolation_level = None  # transactions are explicit: BEGIN ... COMMIT
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")
        connection.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        connection.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
        _use_wal(connection)
        connection.execute(f"PRAGMA synchronous = {self.synchronous}")
        return connection

    def _migrate(self) -> None:
        connection = self._open()
        try:
            migrate(connection, self._migrations)
        finally:
            connection.close()

    # ---- the writer thread ----

    def _run(self) -> None:
        pacer = Pacer(self.flush_interval, self.close_timeout)
        try:
            while True:
                closing = self._closing.is_set()
                wait = pacer.wait(closing=closing, batch_ready=self._batch_ready())
                if wait > 0:
                    self._wakeup.wait(wait)
                    self._wakeup.clear()
                    continue
                batch = self.backlog.take(self.batch_size)
                retry_after = self._flush(batch) if batch else None
                pacer.flushed(retry_after, batch_ready=self._batch_ready())
                if closing and not len(self.backlog):
                    break
                if closing and pacer.out_of_time():
                    self._gave_up()
                    break
        except BaseException:  # never expected: say so loudly
            log.exception("ledger: writer thread died; %d records not written", len(self.backlog))
            raise
        finally:
            self._disconnect()

    def _flush(self, batch: list[Row]) -> float | None:
        """Write one batch in one transaction; None when the store took it, else how long
        to wait before trying again."""
        began = time.monotonic()
        try:
            self._write(batch)
        except _DATA_ERRORS:
            return self._write_one_by_one(batch, began)
        except Exception as error:
            return self._failed(batch, error)
        self.backlog.committed()
        self._flushed(len(batch), began)
        return None

    def _failed(self, unwritten: list[Row], error: Exception) -> float:
        self.backlog.failed(unwritten)
        self._disconnect()
        return self._flush_failed(error, self._read_only())

    def _read_only(self) -> str | None:
        """On a file system remounted read-only, SQLite says "unable to open database file"
        or "attempt to write a readonly database": name the cause for whoever reads the
        health endpoint or the log."""
        try:
            read_only = bool(os.statvfs(self.path.parent).f_flag & os.ST_RDONLY)
        except OSError:
            return None
        return "the file system is read-only" if read_only else None

    def _write(self, batch: list[Row]) -> None:
        if self._write_connection is None:
            self._write_connection = self._open()
        connection = self._write_connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            (before,) = connection.execute("SELECT coalesce(max(seq), 0) FROM requests").fetchone()
            for rows in _pieces(batch):
                connection.execute(*_statement(rows, self._shapes))
            connection.execute(_ROLL_UP, (before,))
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            raise

    def _write_one_by_one(self, batch: list[Row], began: float) -> float | None:
        """A batch the store refused for its content: keep every row it takes, drop (and
        count) the ones it refuses, so one bad row never blocks the rest forever."""
        written = 0
        for position, row in enumerate(batch):
            try:
                self._write([row])
            except _DATA_ERRORS as error:
                self._drop(1, f"the store refused a record ({type(error).__name__}: {error})")
            except Exception as error:  # the store itself failed meanwhile: retry the rest
                self._written += written
                return self._failed(batch[position:], error)
            else:
                written += 1
        self.backlog.committed()
        self._flushed(written, began)
        return None

    def _disconnect(self) -> None:
        connection, self._write_connection = self._write_connection, None
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    # ---- queries, on the reader thread ----

    async def _read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._query, query)

    def _query(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            if self._read_connection is None:
                self._read_connection = self._open()
                self._read_connection.execute("PRAGMA query_only = 1")
            return query(self._read_connection)
        except sqlite3.Error as error:
            self._close_reader()
            raise LedgerError(f"ledger {self.path} unreadable: {error}") from error

    def _close_reader(self) -> None:
        connection, self._read_connection = self._read_connection, None
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    async def _get_stored(self, request_id: str) -> dict[str, Any] | None:
        def query(connection: sqlite3.Connection) -> Row | None:
            return connection.execute(
                f"{_SELECT} WHERE id = ? ORDER BY started_at DESC, seq DESC LIMIT 1",
                (request_id,),
            ).fetchone()

        row = await self._read(query)
        return None if row is None else row_document(row[1:])

    async def iter_records(
        self,
        start: float,
        end: float,
        *,
        batch_size: int = 5000,
        tenant: str | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        # Keyset paging on (started_at, seq): seq starts at 1, so (start, 0) is before all.
        where = "started_at < ? AND (started_at, seq) > (?, ?)"
        if tenant is not None:
            where += " AND tenant = ?"
        sql = f"{_SELECT} WHERE {where} ORDER BY started_at, seq LIMIT ?"
        after: tuple[float, int] = (start, 0)
        while True:
            parameters = (end, *after, *((tenant,) if tenant is not None else ()), batch_size)

            def query(connection: sqlite3.Connection, parameters: tuple = parameters) -> list[Row]:
                return connection.execute(sql, parameters).fetchall()

            rows = await self._read(query)
            if rows:
                yield [row_document(row[1:]) for row in rows]
            if len(rows) < batch_size:
                return
            after = (rows[-1][_STARTED_AT], rows[-1][0])  # (started_at, seq) of the last row

    async def _groups(
        self, hours: tuple[int, int] | None, edges: list[tuple[float, float]], step: int
    ) -> list[Group]:
        def query(connection: sqlite3.Connection) -> list[Row]:
            connection.execute("BEGIN")  # one snapshot for all parts of the report
            try:
                rows = []
                if hours is not None:
                    rows += connection.execute(_ROLLED_UP, (step, *hours)).fetchall()
                for low, high in edges:
                    rows += connection.execute(_RAW_TOTALS, (step, low, high)).fetchall()
                return rows
            finally:
                connection.execute("COMMIT")

        return as_groups(await self._read(query))


def _use_wal(connection: sqlite3.Connection, wait_seconds: float = BUSY_SECONDS) -> None:
    """Switch the file to WAL. The switch needs the file to itself, and SQLite answers it
    "database is locked" at once, without its busy wait, when another connection is taking
    a lock at that moment (several instances starting together): so retry, for as long as
    the busy timeout would have waited."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(connection: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring the store to the newest version in `migrations`, in one transaction that also
    holds off other writers (`BEGIN IMMEDIATE`); running it again changes nothing. Returns
    the version the store is at."""
    check_migrations(migrations)
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        (current,) = connection.execute(
            "SELECT coalesce(max(version), 0) FROM schema_version"
        ).fetchone()
        if current > len(migrations):
            raise SchemaTooNew(current, len(migrations))
        for migration in migrations[current:]:
            for statement in migration.sqlite:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                (migration.version, migration.description, time.time()),
            )
            log.info("ledger: schema migrated to version %d (%s)", *_named(migration))
        connection.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        raise
    return max(current, len(migrations))


def _named(migration: Migration) -> tuple[int, str]:
    return migration.version, migration.description
