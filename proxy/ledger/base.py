"""What every ledger backend shares: the interface, the bounded backlog, the counters.

A ledger sits behind the request path. `append` only converts the record to a row and puts
it in memory; a writer (a thread for SQLite, a task for PostgreSQL) commits rows in
batches, one transaction per flush. When the store fails (disk full, read-only, database
down) the rows stay in the backlog and the writer retries with a growing pause; only when
the backlog is full are new records refused, and each refusal is counted and logged. So a
request never waits for the store and no record is lost without a trace.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.ledger.schema import (
    Group,
    Row,
    Totals,
    merge_measures,
    record_row,
    row_document,
    row_id,
    totals_from_row,
)
from proxy.records import RequestRecord

log = logging.getLogger("joulegate.ledger")

DEFAULT_FLUSH_INTERVAL = 0.25  # seconds: also the most a crash can lose
DEFAULT_BATCH_SIZE = 2000  # rows per transaction when the backlog runs ahead of the interval
DEFAULT_MAX_PENDING = 100_000  # rows held in memory while the store is down (~60 MB)
MAX_RETRY_PAUSE = 5.0  # seconds between attempts while the store keeps failing
LOG_EVERY = 30.0  # seconds between repeated warnings about the same trouble
PERIODS = {"hour": 3600, "day": 86400}


class LedgerError(RuntimeError):
    """The ledger cannot start: its store cannot be opened or migrated."""


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """Counters for metrics: `written`, `failed_flushes`, `dropped` only grow; `queued` is
    the number of records accepted and not yet durable."""

    backend: str
    written: int
    failed_flushes: int
    queued: int
    dropped: int
    flushes: int
    last_flush_seconds: float | None  # how long the last successful flush took
    last_error: str | None


class Backlog:
    """Rows accepted and not yet committed, oldest first, at most `limit` of them.

    `take` moves rows to the batch being written; the writer then calls `committed`, or
    `failed` to put them back in front in their order. Rows in flight still count towards
    `limit` and can still be found by id, so a lookup never misses a record between its
    append and its commit. Thread-safe: the event loop appends, a writer thread takes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self._rows: deque[Row] = deque()
        self._writing: list[Row] = []
        self._newest: dict[str, Row] = {}  # id -> its newest row not yet committed

    def put(self, row: Row) -> bool:
        with self.lock:
            if len(self._rows) + len(self._writing) >= self.limit:
                return False
            self._rows.append(row)
            self._newest[row_id(row)] = row
            return True

    def take(self, count: int) -> list[Row]:
        with self.lock:
            assert not self._writing, "take() while a batch is being written"
            rows = self._rows
            batch = [rows.popleft() for _ in range(min(count, len(rows)))]
            self._writing = batch
            return batch

    def committed(self) -> None:
        with self.lock:
            newest = self._newest
            for row in self._writing:
                if newest.get(row_id(row)) is row:
                    del newest[row_id(row)]
            self._writing = []

    def failed(self, unwritten: list[Row] | None = None) -> None:
        """The batch (or its `unwritten` tail) goes back in front, in order; the rest of
        it is committed."""
        with self.lock:
            if unwritten is not None:
                kept = {id(row) for row in unwritten}
                newest = self._newest
                for row in self._writing:
                    if id(row) not in kept and newest.get(row_id(row)) is row:
                        del newest[row_id(row)]
            self._rows.extendleft(reversed(self._writing if unwritten is None else unwritten))
            self._writing = []

    def discard(self) -> int:
        """Forget everything (the ledger gave up at close); how many rows that was."""
        with self.lock:
            count = len(self._rows) + len(self._writing)
            self._rows.clear()
            self._writing = []
            self._newest.clear()
            return count

    def waiting(self) -> int:
        """Rows not yet taken by the writer."""
        return len(self._rows)

    def find(self, request_id: str) -> Row | None:
        """The newest row with this id not yet committed."""
        with self.lock:
            return self._newest.get(request_id)

    def __len__(self) -> int:
        return len(self._rows) + len(self._writing)


class Pacer:
    """When a writer flushes: every `interval`, at once when a batch is full, only after a
    growing pause once the store has failed, and at close again and again until the backlog
    is empty or `close_timeout` has passed."""

    def __init__(self, interval: float, close_timeout: float) -> None:
        self.interval = interval
        self.close_timeout = close_timeout
        self.healthy = True
        self.next_flush = time.monotonic() + interval
        self.give_up_at: float | None = None

    def wait(self, *, closing: bool, batch_ready: bool) -> float:
        """Seconds to wait before the next flush; 0: flush now."""
        now = time.monotonic()
        if closing:
            if self.give_up_at is None:
                self.give_up_at = now + self.close_timeout
            if self.healthy:
                return 0.0
            return max(0.0, min(self.next_flush, self.give_up_at) - now)
        if self.healthy and batch_ready:
            return 0.0
        return max(0.0, self.next_flush - now)

    def flushed(self, retry_after: float | None, *, batch_ready: bool) -> None:
        """After a flush: `retry_after` is None when it worked, else the pause to take."""
        self.healthy = retry_after is None
        if retry_after is not None:
            self.next_flush = time.monotonic() + retry_after
        elif not batch_ready:
            self.next_flush = time.monotonic() + self.interval

    def out_of_time(self) -> bool:
        return self.give_up_at is not None and time.monotonic() >= self.give_up_at


class Throttle:
    """Log a recurring trouble once at once, then at most every `every` seconds."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._last = -math.inf

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


class Ledger(abc.ABC):
    """Durable storage of finished request records.

    Lifecycle: `await start()` (opens the store and migrates it; raises LedgerError when it
    cannot), then `append` for every published record, then `await close()` (writes
    everything still in memory). Queries work between start and close."""

    backend = "?"

    def __init__(
        self,
        *,
        instance: str,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        close_timeout: float = 10.0,
    ) -> None:
        if flush_interval <= 0 or batch_size <= 0 or max_pending < batch_size:
            raise ValueError("need flush_interval > 0 and 0 < batch_size <= max_pending")
        self.instance = instance
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.close_timeout = close_timeout
        self.backlog = Backlog(max_pending)
        self._written = 0
        self._failed_flushes = 0
        self._dropped = 0
        self._flushes = 0
        self._last_error: str | None = None
        self._last_flush_seconds: float | None = None
        self._failing_since: float | None = None
        self._closed = False
        self._drop_log = Throttle()
        self._fail_log = Throttle()

    # ---- the request path ----

    def append(self, record: RequestRecord | Mapping[str, Any]) -> None:
        """Accept a finished record for writing; call it on the event loop's thread (records
        appended before `start` wait for it). Never blocks, never raises: a record that
        cannot be kept (backlog full, ledger closed, unserialisable) is counted as dropped."""
        try:
            row = record_row(record, self.instance)
        except Exception:
            self._drop(1, "a record could not be converted to a row")
            log.debug("unconvertible record", exc_info=True)
            return
        if self._closed:
            self._drop(1, "append after close")
            return
        if not self.backlog.put(row):
            self._drop(1, f"backlog full ({self.backlog.limit} records waiting for the store)")
            return
        if self.backlog.waiting() % self.batch_size == 0:  # once per batch, not per record
            self._wake()

    def stats(self) -> LedgerStats:
        return LedgerStats(
            backend=self.backend,
            written=self._written,
            failed_flushes=self._failed_flushes,
            queued=len(self.backlog),
            dropped=self._dropped,
            flushes=self._flushes,
            last_flush_seconds=self._last_flush_seconds,
            last_error=self._last_error,
        )

    # ---- lifecycle ----

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Write everything accepted so far, then release the store. If the store stays
        down for `close_timeout` seconds, what is left is counted as dropped and logged."""

    # ---- queries ----

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The newest record with this id, as a JSON document; records still in memory
        count, so a record is found from the moment it was appended."""
        row = self.backlog.find(request_id)
        if row is not None:
            return row_document(row)
        return await self._get_stored(request_id)

    @abc.abstractmethod
    async def _get_stored(self, request_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def iter_records(
        self,
        start: float,
        end: float,
        *,
        batch_size: int = 5000,
        tenant: str | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Committed records that started in [start, end) (Unix seconds), oldest first, in
        lists of up to `batch_size` documents; optionally one tenant's only. Paged by key,
        so memory stays flat over any range and rows written meanwhile do not shift pages."""

    async def totals(self, start: float, end: float, period: str = "day") -> list[Totals]:
        """Per period (UTC `hour` or `day`), task, model, tenant and team: requests, energy,
        tokens... of the committed records that started in [start, end), over all instances.

        Whole hours come from the hourly roll-up; the partial hours at either edge from the
        raw rows, so any bounds are exact and a month of traffic costs a few thousand rows."""
        step = PERIODS.get(period)
        if step is None:
            raise ValueError(f"period must be one of {sorted(PERIODS)}, got {period!r}")
        if not end > start:
            return []
        first_hour = math.ceil(start / 3600) * 3600
        last_hour = math.floor(end / 3600) * 3600
        if first_hour < last_hour:
            hours: tuple[int, int] | None = (first_hour, last_hour)
            edges = [
                (low, high) for low, high in ((start, first_hour), (last_hour, end)) if high > low
            ]
        else:
            hours, edges = None, [(start, end)]
        merged: dict[tuple[int, tuple[str, ...]], tuple[Any, ...]] = {}
        for period_start, key, measures in await self._groups(hours, edges, step):
            known = merged.get((period_start, key))
            merged[(period_start, key)] = (
                measures if known is None else merge_measures(known, measures)
            )
        return [
            totals_from_row(period_start, key, measures)
            for (period_start, key), measures in sorted(merged.items())
        ]

    @abc.abstractmethod
    async def _groups(
        self, hours: tuple[int, int] | None, edges: list[tuple[float, float]], step: int
    ) -> list[Group]:
        """In one snapshot of the store: the roll-up's groups for whole `hours` [first, last)
        and the same groups computed from raw rows that started within each of `edges`,
        by period of `step` seconds and key."""

    # ---- for the writers ----

    def _batch_ready(self) -> bool:
        return self.backlog.waiting() >= self.batch_size

    @abc.abstractmethod
    def _wake(self) -> None:
        """A batch is ready: have the writer flush now instead of at its next interval."""

    def _drop(self, count: int, why: str) -> None:
        with self.backlog.lock:
            self._dropped += count
            total = self._dropped
        if self._drop_log.ready():
            log.error("ledger: %d record(s) dropped (%d in all): %s", count, total, why)

    def _flushed(self, count: int, began: float) -> None:
        """A flush that `began` (monotonic time) committed `count` rows."""
        self._written += count
        self._flushes += 1
        self._last_flush_seconds = time.monotonic() - began
        if self._failing_since is not None:
            log.warning(
                "ledger: store writable again after %.1fs; %d records waiting",
                time.monotonic() - self._failing_since,
                len(self.backlog),
            )
            self._failing_since = None
            self._fail_log = Throttle()

    def _flush_failed(self, error: BaseException, why: str | None = None) -> float:
        """Count a failed flush and say how long to wait before the next attempt; `why`
        says what the error's own text leaves out."""
        self._failed_flushes += 1
        self._last_error = f"{type(error).__name__}: {error}" + (f" ({why})" if why else "")
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        if self._fail_log.ready():
            log.error(
                "ledger: flush failed (%d so far), %d records kept in memory: %s",
                self._failed_flushes,
                len(self.backlog),
                self._last_error,
            )
        failing_for = time.monotonic() - self._failing_since
        return min(MAX_RETRY_PAUSE, max(self.flush_interval, failing_for / 2))

    def _gave_up(self) -> None:
        lost = self.backlog.discard()
        if lost:
            with self.backlog.lock:
                self._dropped += lost
            log.error(
                "ledger: store still failing after %.0fs at close; %d records NOT written (%s)",
                self.close_timeout,
                lost,
                self._last_error,
            )
