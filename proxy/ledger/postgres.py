"""The fleet ledger: many joulegate instances writing one PostgreSQL database (asyncpg).

Each flush is one transaction: the batch goes in with binary `COPY` into a temporary table
(the fastest way in), then one statement moves it into `requests`, skipping rows already
there, and adds exactly the rows it inserted to the hourly totals. So a flush retried after
an ambiguous failure (connection lost at commit) neither duplicates rows nor double-counts
totals. Roll-up keys include the instance, so instances never contend for the same totals
row; keys are taken in one order, so they never deadlock either.

Migrations take a transaction-scoped advisory lock: of several instances starting at once,
one migrates and the others then find the schema current.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from proxy.ledger.base import Ledger, LedgerError, Pacer, log
from proxy.ledger.schema import (
    COLUMNS,
    INTEGER_MEASURES,
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

if TYPE_CHECKING:
    import asyncpg

MIGRATION_LOCK = 0x6A6F756C65  # "joule": the advisory lock key for schema migrations
_STAGING = "joulegate_incoming"
_CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} ON COMMIT DELETE ROWS AS "
    f"SELECT {', '.join(COLUMNS)} FROM requests WITH NO DATA"
)
_MOVE = (
    f"WITH inserted AS (INSERT INTO requests ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM {_STAGING} ON CONFLICT DO NOTHING RETURNING *) "
    + totals_select("postgresql", "inserted", "true")
)
_SELECT = f"SELECT seq, {', '.join(COLUMNS)} FROM requests"
_KEY = "task, coalesce(model, ''), tenant, coalesce(team, '')"
_ROLLED_UP = (
    "SELECT hour - hour % $1, task, model, tenant, team, "
    + ", ".join(
        f"sum({name})::bigint" if name in INTEGER_MEASURES else f"sum({name})"
        for name in TOTALS_MEASURES
    )
    + " FROM request_totals WHERE hour >= $2 AND hour < $3 GROUP BY 1, 2, 3, 4, 5"
)
_HOUR = hour_expression("postgresql")
_RAW_TOTALS = (
    f"SELECT {_HOUR} - {_HOUR} % $1, {_KEY}, {', '.join(measure_expressions('postgresql'))} "
    "FROM requests WHERE started_at >= $2 AND started_at < $3 GROUP BY 1, 2, 3, 4, 5"
)


def redact(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rpartition("@")
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}"))


class PostgresLedger(Ledger):
    backend = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        instance: str,
        pool_size: int = 4,
        command_timeout: float = 30.0,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        **options: Any,
    ) -> None:
        super().__init__(instance=instance, **options)
        check_migrations(migrations)
        self.dsn = dsn
        self.pool_size = pool_size
        self.command_timeout = command_timeout
        self._migrations = migrations
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._closing = False

    def describe(self) -> str:
        return redact(self.dsn)

    # ---- lifecycle ----

    async def start(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=self.command_timeout,
                timeout=self.command_timeout,
            )
            async with self._pool.acquire() as connection:
                await migrate(connection, self._migrations)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, SchemaTooNew) as error:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            raise LedgerError(f"cannot open the ledger {self.describe()}: {error}") from error
        self._writer = asyncio.create_task(self._run(), name="ledger-write")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            try:  # the writer gives up by itself after close_timeout, unless stuck in a call
                await asyncio.wait_for(asyncio.shield(self._writer), self.close_timeout + 1)
            except TimeoutError:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
                self._gave_up()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self.command_timeout)
            except (TimeoutError, OSError):
                self._pool.terminate()

    def _wake(self) -> None:
        self._wakeup.set()

    # ---- the writer task ----

    async def _run(self) -> None:
        pacer = Pacer(self.flush_interval, self.close_timeout)
        while True:
            closing = self._closing
            wait = pacer.wait(closing=closing, batch_ready=self._batch_ready())
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                self._wakeup.clear()
                continue
            batch = self.backlog.take(self.batch_size)
            retry_after = await self._flush(batch) if batch else None
            pacer.flushed(retry_after, batch_ready=self._batch_ready())
            if closing and not len(self.backlog):
                return
            if closing and pacer.out_of_time():
                self._gave_up()
                return

    async def _flush(self, batch: list[Row]) -> float | None:
        began = time.monotonic()
        try:
            await self._write(batch)
        except _data_errors():
            return await self._write_one_by_one(batch, began)
        except Exception as error:  # the store: connection refused or lost, timeout, disk...
            self.backlog.failed()
            return self._flush_failed(error)
        self.backlog.committed()
        self._flushed(len(batch), began)
        return None

    async def _write(self, batch: list[Row]) -> None:
        assert self._pool is not None
        timeout = self.command_timeout
        async with self._pool.acquire(timeout=timeout) as connection, connection.transaction():
            await connection.execute(_CREATE_STAGING, timeout=timeout)
            await connection.copy_records_to_table(
                _STAGING, records=batch, columns=COLUMNS, timeout=timeout
            )
            await connection.execute(_MOVE, timeout=timeout)

    async def _write_one_by_one(self, batch: list[Row], began: float) -> float | None:
        """A batch the store refused for its content: keep every row it takes, drop (and
        count) the ones it refuses, so one bad row never blocks the rest forever."""
        written = 0
        for position, row in enumerate(batch):
            try:
                await self._write([row])
            except _data_errors() as error:
                self._drop(1, f"the store refused a record ({type(error).__name__}: {error})")
            except Exception as error:
                self._written += written
                self.backlog.failed(batch[position:])
                return self._flush_failed(error)
            else:
                written += 1
        self.backlog.committed()
        self._flushed(written, began)
        return None

    # ---- queries ----

    async def _fetch(self, sql: str, *arguments: Any) -> list[Any]:
        import asyncpg

        if self._pool is None:
            raise LedgerError("the ledger is not open")
        try:
            return await self._pool.fetch(sql, *arguments, timeout=self.command_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise LedgerError(f"ledger {self.describe()} unreadable: {error}") from error

    async def _get_stored(self, request_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(
            f"{_SELECT} WHERE id = $1 ORDER BY started_at DESC, seq DESC LIMIT 1", request_id
        )
        return row_document(tuple(rows[0])[1:]) if rows else None

    async def iter_records(
        self,
        start: float,
        end: float,
        *,
        batch_size: int = 5000,
        tenant: str | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        # Keyset paging on (started_at, seq): seq starts at 1, so (start, 0) is before all.
        where = "started_at < $1 AND (started_at, seq) > ($2, $3)"
        if tenant is not None:
            where += " AND tenant = $5"
        sql = f"{_SELECT} WHERE {where} ORDER BY started_at, seq LIMIT $4"
        after: tuple[float, int] = (float(start), 0)
        while True:
            extra = (tenant,) if tenant is not None else ()
            rows = await self._fetch(sql, float(end), *after, batch_size, *extra)
            if rows:
                yield [row_document(tuple(row)[1:]) for row in rows]
            if len(rows) < batch_size:
                return
            after = (rows[-1]["started_at"], rows[-1]["seq"])

    async def _groups(
        self, hours: tuple[int, int] | None, edges: list[tuple[float, float]], step: int
    ) -> list[Group]:
        import asyncpg

        if self._pool is None:
            raise LedgerError("the ledger is not open")
        rows: list[Any] = []
        try:
            async with (
                self._pool.acquire(timeout=self.command_timeout) as connection,
                connection.transaction(isolation="repeatable_read", readonly=True),
            ):
                if hours is not None:
                    rows += await connection.fetch(_ROLLED_UP, step, *hours)
                for low, high in edges:
                    rows += await connection.fetch(_RAW_TOTALS, step, float(low), float(high))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise LedgerError(f"ledger {self.describe()} unreadable: {error}") from error
        return as_groups(rows)


def _data_errors() -> tuple[type[BaseException], ...]:
    """Errors about the rows themselves rather than the store: retrying cannot help.
    (asyncpg's client-side encoding errors are ValueErrors.)"""
    import asyncpg

    return (
        asyncpg.DataError,
        asyncpg.IntegrityConstraintViolationError,
        ValueError,
        TypeError,
        OverflowError,
    )


async def migrate(
    connection: asyncpg.Connection, migrations: tuple[Migration, ...] = MIGRATIONS
) -> int:
    """Bring the database to the newest version in `migrations`, in one transaction under
    an advisory lock; running it again changes nothing. Returns the version it is at."""
    check_migrations(migrations)
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
            "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        current = await connection.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        if current > len(migrations):
            raise SchemaTooNew(current, len(migrations))
        for migration in migrations[current:]:
            for statement in migration.postgresql:
                await connection.execute(statement)
            await connection.execute(
                "INSERT INTO schema_version VALUES ($1, $2, $3)",
                migration.version,
                migration.description,
                time.time(),
            )
            log.info(
                "ledger: schema migrated to version %d (%s)",
                migration.version,
                migration.description,
            )
    return max(current, len(migrations))
