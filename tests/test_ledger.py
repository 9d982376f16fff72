"""The durable ledger, the same behaviour on both backends: SQLite and a real PostgreSQL.

Each test runs against a `store`: a place the ledger writes to that the test can break and
mend. SQLite breaks through its connection factory, which then fails every write as a
read-only file system does; PostgreSQL breaks for real, through a TCP relay that drops every
connection and refuses new ones, as a database that went down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sqlite3
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from proxy.ledger import (
    COLUMNS,
    MIGRATIONS,
    Ledger,
    LedgerError,
    Migration,
    open_ledger,
    parse_spec,
)
from proxy.ledger.base import Backlog
from proxy.ledger.postgres import PostgresLedger, redact
from proxy.ledger.schema import record_row
from proxy.ledger.sqlite import SQLiteLedger
from proxy.records import STATUS_ABORTED, STATUS_OK, RequestRecord

pytest_plugins = ["tests.postgres_fixtures"]

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: not on an hour, so edges get tested
TASKS = ("text-generation", "image-generation", "embeddings")
TENANTS = ("team-search", "team-ads", "anonymous")


def make_record(
    number: int,
    started_at: float | None = None,
    *,
    task: str = "text-generation",
    tenant: str = "team-search",
    energy: float | None = 12.5,
    **fields: Any,
) -> RequestRecord:
    """A finished, metered record, as the Recorder publishes it."""
    record = RequestRecord(
        id=f"req-{number}",
        task=task,
        model="tiny-gpt2",
        tenant=tenant,
        streaming=number % 2 == 0,
        method="POST",
        path="/v1/chat/completions",
        upstream="http://127.0.0.1:8000",
        started_at=T0 + number if started_at is None else started_at,
        start=1000.0,
    )
    record.finish(1000.75, STATUS_OK, 200)
    record.input_tokens = 14
    record.output_tokens = 8
    record.energy_joules = energy
    record.dynamic_energy_joules = None if energy is None else energy / 2
    record.devices = {"gpu0": energy, "gpu1": None}
    record.meter = "nvml"
    record.estimate = number % 3 == 0
    for name, value in fields.items():
        setattr(record, name, value)
    return record


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def everything(ledger: Ledger, **filters: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async for batch in ledger.iter_records(0, 2**40, **filters):
        found += batch
    return found


# ---- the stores ----


class _Breakable(sqlite3.Connection):
    """A connection that fails every write transaction while `broken` is set, with the
    error SQLite gives on a file system remounted read-only."""

    broken: threading.Event

    def execute(self, sql: str, *arguments: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if self.broken.is_set() and sql.startswith("BEGIN IMMEDIATE"):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return super().execute(sql, *arguments)


class SQLiteStore:
    backend = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.path = directory / "data" / "joulegate.db"
        self.broken = threading.Event()
        self._factory = type("Breakable", (_Breakable,), {"broken": self.broken})

    def connect(self, path: str) -> sqlite3.Connection:
        return sqlite3.connect(path, check_same_thread=False, factory=self._factory)

    def open(self, **options: Any) -> Ledger:
        options.setdefault("instance", "node-a")
        return SQLiteLedger(self.path, connect=self.connect, **options)

    async def break_down(self) -> None:
        self.broken.set()

    async def mend(self) -> None:
        self.broken.clear()

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as connection:
            return connection.execute(sql).fetchall()

    async def columns(self, table: str) -> set[str]:
        return {row[1] for row in await self.query(f"PRAGMA table_info({table})")}


class PostgresStore:
    backend = "postgresql"

    def __init__(self, dsn: str) -> None:
        from tests.postgres_fixtures import Relay  # a plugin of this module: imported late

        self.dsn = dsn
        self.relay = Relay(urlsplit(dsn).port or 5432)

    def relayed(self) -> str:
        """The same database, through the relay."""
        parts = urlsplit(self.dsn)
        return urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{self.relay.port}"))

    def open(self, **options: Any) -> Ledger:
        options.setdefault("instance", "node-a")
        options.setdefault("command_timeout", 3.0)
        return PostgresLedger(self.relayed(), **options)

    async def break_down(self) -> None:
        await self.relay.cut()

    async def mend(self) -> None:
        await self.relay.restore()

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        import asyncpg

        connection = await asyncpg.connect(self.dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    async def columns(self, table: str) -> set[str]:
        rows = await self.query(
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = current_schema() AND table_name = '{table}'"
        )
        return {row[0] for row in rows}


Store = SQLiteStore | PostgresStore


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the ledger goes: a directory for SQLite, a fresh database's DSN for PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path)
    return request.getfixturevalue("postgres_database")


@pytest.fixture
async def store(backend: str) -> AsyncIterator[Store]:
    if not backend.startswith("postgresql://"):
        yield SQLiteStore(Path(backend))
        return
    postgres = PostgresStore(backend)
    await postgres.relay.restore()
    yield postgres
    await postgres.relay.cut()


@pytest.fixture
async def opened(store: Store) -> AsyncIterator[Callable[..., Any]]:
    """Open and start a ledger on the store; every one opened is closed after the test."""
    ledgers: list[Ledger] = []

    async def _open(**options: Any) -> Ledger:
        ledger = store.open(**options)
        await ledger.start()
        ledgers.append(ledger)
        return ledger

    yield _open
    await store.mend()
    for ledger in ledgers:
        await ledger.close()


# ---- behaviour, on both backends ----


async def test_a_record_comes_back_as_it_was_published(opened: Callable[..., Any]) -> None:
    ledger = await opened(flush_interval=0.05)
    record = make_record(7, reason=None, images=2, pixels=2 * 512 * 512, steps=20)
    ledger.append(record)
    from_memory = await ledger.get("req-7")  # found at once, before any flush
    await until(lambda: ledger.stats().written == 1)
    stored = await ledger.get("req-7")

    expected = record.to_json()
    for document in (from_memory, stored):
        assert document is not None
        assert {key: document[key] for key in expected} == expected
        assert document["instance"] == "node-a"
        assert document["ended_at"] == pytest.approx(T0 + 7 + 0.75)
        assert document["team"] is None and document["carbon_grams"] is None
    assert stored == from_memory
    assert await ledger.get("req-unknown") is None


async def test_unknown_energy_stays_unknown(opened: Callable[..., Any]) -> None:
    ledger = await opened(flush_interval=0.05)
    ledger.append(make_record(1, energy=None))
    await until(lambda: ledger.stats().written == 1)
    document = await ledger.get("req-1")
    assert document is not None
    assert document["energy_joules"] is None and document["dynamic_energy_joules"] is None
    (totals,) = await ledger.totals(T0, T0 + 10)
    assert totals.requests == 1 and totals.energy_requests == 0
    assert totals.energy_joules is None  # never a fake 0


async def test_close_writes_everything(store: Store, opened: Callable[..., Any]) -> None:
    ledger = await opened(flush_interval=60, batch_size=5000, max_pending=10_000)
    for number in range(3000):
        ledger.append(make_record(number))
    assert ledger.stats().written == 0  # nothing due yet: the interval is a minute
    await ledger.close()
    assert ledger.stats().written == 3000 and ledger.stats().queued == 0

    reopened = await opened()
    assert len(await everything(reopened)) == 3000


async def test_full_batches_flush_before_the_interval(opened: Callable[..., Any]) -> None:
    ledger = await opened(flush_interval=60, batch_size=100)
    for number in range(250):
        ledger.append(make_record(number))
    await until(lambda: ledger.stats().written == 200)
    assert ledger.stats().flushes == 2 and ledger.stats().queued == 50
    await ledger.close()
    assert ledger.stats().flushes == 3 and ledger.stats().written == 250


async def test_an_outage_keeps_records_in_memory_and_writes_them_after(
    store: Store, opened: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    ledger = await opened(flush_interval=0.02)
    ledger.append(make_record(0))
    await until(lambda: ledger.stats().written == 1)

    await store.break_down()
    for number in range(1, 51):
        ledger.append(make_record(number))  # never blocks, never raises
    await until(lambda: ledger.stats().failed_flushes >= 2)
    stats = ledger.stats()
    assert (stats.written, stats.queued, stats.dropped) == (1, 50, 0)
    assert stats.last_error
    assert any("flush failed" in message for message in caplog.messages)
    found = await ledger.get("req-50")  # still served, from memory
    assert found is not None and found["id"] == "req-50"

    await store.mend()
    await until(lambda: ledger.stats().written == 51)
    assert ledger.stats().queued == 0
    assert [record["id"] for record in await everything(ledger)] == [
        f"req-{number}" for number in range(51)
    ]


async def test_a_full_backlog_drops_and_counts(
    store: Store, opened: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    ledger = await opened(flush_interval=0.02, batch_size=10, max_pending=20)
    await store.break_down()
    for number in range(30):
        ledger.append(make_record(number))
    stats = ledger.stats()
    assert (stats.queued, stats.dropped) == (20, 10)
    assert any("dropped" in message for message in caplog.messages)
    await store.mend()
    await until(lambda: ledger.stats().written == 20)


async def test_close_gives_up_on_a_dead_store_and_says_how_much(
    store: Store, opened: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    ledger = await opened(flush_interval=0.02, close_timeout=0.3)
    await store.break_down()
    for number in range(5):
        ledger.append(make_record(number))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.ERROR, logger="joulegate.ledger"):
        await ledger.close()
    assert loop.time() - began < 3.5
    assert ledger.stats().dropped == 5 and ledger.stats().queued == 0
    assert any("5 records NOT written" in message for message in caplog.messages)
    ledger.append(make_record(99))  # after close: counted, not raised
    assert ledger.stats().dropped == 6


async def test_bad_records_are_counted_not_raised_and_do_not_block_others(
    opened: Callable[..., Any],
) -> None:
    ledger = await opened(flush_interval=0.02)
    ledger.append(make_record(1, task=None))  # no task: refused at once
    ledger.append(make_record(2, input_tokens="many"))  # not a number: refused at once
    assert ledger.stats().dropped == 2
    ledger.append(make_record(3))
    ledger.append(make_record(4, input_tokens=2**70))  # too large for the store's integer
    ledger.append(make_record(5))
    await until(lambda: ledger.stats().written == 2)
    assert ledger.stats().dropped == 3
    assert [record["id"] for record in await everything(ledger)] == ["req-3", "req-5"]


async def test_a_retried_flush_neither_duplicates_rows_nor_totals(
    opened: Callable[..., Any],
) -> None:
    ledger = await opened(flush_interval=0.02)
    record = make_record(1)
    ledger.append(record)
    ledger.append(record)  # the same row twice, as a retry after a lost commit would
    await until(lambda: ledger.stats().written == 2)
    assert len(await everything(ledger)) == 1
    (totals,) = await ledger.totals(T0, T0 + 10)
    assert totals.requests == 1 and totals.energy_joules == pytest.approx(12.5)


async def test_records_between_two_times_in_batches(opened: Callable[..., Any]) -> None:
    ledger = await opened(flush_interval=0.02, batch_size=1000)
    for number in range(1200):
        # pairs share a start time, so paging must not lose or repeat ties
        ledger.append(make_record(number, T0 + number // 2, tenant=TENANTS[number % 3]))
    await until(lambda: ledger.stats().written == 1200)

    batches = [batch async for batch in ledger.iter_records(T0 + 100, T0 + 500, batch_size=77)]
    assert all(len(batch) <= 77 for batch in batches)
    ids = [record["id"] for batch in batches for record in batch]
    assert ids == [f"req-{number}" for number in range(200, 1000)]

    ads = [record async for batch in ledger.iter_records(T0, T0 + 50) for record in batch]
    assert ads == [
        record async for batch in ledger.iter_records(T0, T0 + 50, batch_size=3) for record in batch
    ]
    only_ads = [
        record["id"]
        async for batch in ledger.iter_records(T0, T0 + 50, tenant="team-ads", batch_size=4)
        for record in batch
    ]
    assert only_ads == [f"req-{number}" for number in range(100) if number % 3 == 1]


async def test_totals_match_the_raw_records_for_any_bounds(opened: Callable[..., Any]) -> None:
    ledger = await opened(flush_interval=0.02, batch_size=500)
    generator = random.Random(4)
    records = []
    for number in range(1500):
        started_at = T0 + generator.uniform(0, 3 * 86400)
        energy = None if number % 11 == 0 else round(generator.uniform(0.1, 500), 3)
        record = make_record(
            number,
            started_at,
            task=generator.choice(TASKS),
            tenant=generator.choice(TENANTS),
            energy=energy,
            model=generator.choice(["tiny-gpt2", None]),
        )
        if number % 7 == 0:
            record.status = STATUS_ABORTED
        records.append(record)
        ledger.append(record)
    await until(lambda: ledger.stats().written == 1500)

    def expected(start: float, end: float, step: int) -> dict[tuple[Any, ...], list[Any]]:
        groups: dict[tuple[Any, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, 0.0, 0])
        for record in records:
            if start <= record.started_at < end:
                period = int(record.started_at // 3600 * 3600) // step * step
                group = groups[(period, record.task, record.model, record.tenant)]
                group[0] += 1
                group[1] += record.status != STATUS_OK
                group[2] += record.energy_joules is not None
                group[3] += record.energy_joules or 0.0
                group[4] += record.input_tokens
        return groups

    bounds = [
        (T0, T0 + 3 * 86400),  # not on hours: both edges from raw rows
        (1_699_999_200.0, 1_700_172_000.0),  # on hours: all from the roll-up
        (T0 + 7200.5, T0 + 7300.25),  # inside one hour
        (T0 + 5000, T0 + 90_000),
    ]
    for start, end in bounds:
        for period, step in (("hour", 3600), ("day", 86400)):
            totals = await ledger.totals(start, end, period)
            found = {
                (t.period_start, t.task, t.model, t.tenant): [
                    t.requests,
                    t.failed_requests,
                    t.energy_requests,
                    t.energy_joules or 0.0,
                    t.input_tokens,
                ]
                for t in totals
            }
            want = expected(start, end, step)
            assert found.keys() == want.keys(), (start, end, period)
            for key, values in want.items():
                assert found[key][:3] == values[:3] and found[key][4] == values[4]
                assert found[key][3] == pytest.approx(values[3])
    assert await ledger.totals(T0 + 10, T0) == []
    with pytest.raises(ValueError):
        await ledger.totals(T0, T0 + 10, "week")


async def test_two_instances_share_one_store(store: Store, opened: Callable[..., Any]) -> None:
    first = await opened(instance="node-a", flush_interval=0.02)
    second = await opened(instance="node-b", flush_interval=0.02)
    for number in range(100):
        first.append(make_record(number))
        second.append(make_record(number))  # the same ids on another node
    await until(lambda: first.stats().written == second.stats().written == 100)
    rows = await everything(first)
    assert len(rows) == 200 and {row["instance"] for row in rows} == {"node-a", "node-b"}
    (totals,) = await first.totals(T0, T0 + 1000)
    assert totals.requests == 200
    assert totals.energy_joules == pytest.approx(200 * 12.5)


async def test_instances_starting_together_migrate_once(store: Store) -> None:
    ledgers = [store.open(instance=f"node-{n}") for n in range(3)]
    await asyncio.gather(*(ledger.start() for ledger in ledgers))
    for ledger in ledgers:
        await ledger.close()
    current = [(migration.version,) for migration in MIGRATIONS]
    assert await store.query("SELECT version FROM schema_version ORDER BY 1") == current


# ---- migrations ----

NEXT = len(MIGRATIONS) + 1  # the version a test migration takes after the real ones
ADD_NOTE = Migration(
    NEXT,
    "a note on each request (test only)",
    sqlite=(
        "ALTER TABLE requests ADD COLUMN note TEXT",
        "CREATE INDEX requests_note ON requests (note)",
    ),
    postgresql=(
        "ALTER TABLE requests ADD COLUMN note TEXT",
        "CREATE INDEX requests_note ON requests (note)",
    ),
)
BROKEN = Migration(
    NEXT,
    "half a migration",
    sqlite=("ALTER TABLE requests ADD COLUMN half TEXT", "THIS IS NOT SQL"),
    postgresql=("ALTER TABLE requests ADD COLUMN half TEXT", "THIS IS NOT SQL"),
)


async def test_migrations_upgrade_an_older_store_in_place(store: Store) -> None:
    old = store.open(migrations=MIGRATIONS, flush_interval=0.02)
    await old.start()
    old.append(make_record(1))
    await old.close()

    for _ in range(2):  # and a second start changes nothing
        new = store.open(migrations=(*MIGRATIONS, ADD_NOTE), flush_interval=0.02)
        await new.start()
        assert await new.get("req-1") is not None
        new.append(make_record(2))
        await new.close()
    versions = await store.query("SELECT version, description FROM schema_version ORDER BY 1")
    assert [version for version, _ in versions] == list(range(1, NEXT + 1))
    assert "note" in await store.columns("requests")
    assert (await store.query("SELECT count(*) FROM requests"))[0][0] == 2


async def test_a_failed_migration_leaves_the_previous_version_whole(store: Store) -> None:
    old = store.open(flush_interval=0.02)
    await old.start()
    old.append(make_record(1))
    await old.close()

    with pytest.raises(LedgerError):
        await store.open(migrations=(*MIGRATIONS, BROKEN)).start()
    versions = await store.query("SELECT version FROM schema_version ORDER BY 1")
    assert [row[0] for row in versions] == list(range(1, NEXT))
    assert "half" not in await store.columns("requests")
    assert (await store.query("SELECT count(*) FROM requests"))[0][0] == 1


async def test_a_version_1_store_gains_the_degraded_column(store: Store) -> None:
    first = store.open(migrations=MIGRATIONS[:1])
    await first.start()  # the schema as the first release left it
    await first.close()
    assert "degraded" not in await store.columns("requests")
    ledger = store.open(flush_interval=0.02)
    await ledger.start()
    record = make_record(7)
    record.degraded = "max_tokens 512→64"
    ledger.append(record)
    await ledger.close()
    reopened = store.open()
    await reopened.start()
    stored = await reopened.get("req-7")
    await reopened.close()
    assert stored is not None and stored["degraded"] == "max_tokens 512→64"


async def test_a_store_from_a_newer_joulegate_is_refused(store: Store) -> None:
    newer = store.open(migrations=(*MIGRATIONS, ADD_NOTE))
    await newer.start()
    await newer.close()
    with pytest.raises(LedgerError, match="newer than this joulegate"):
        await store.open(migrations=MIGRATIONS).start()


# ---- specs and conversions ----


def test_backlog_finds_rows_until_committed_and_keeps_order() -> None:
    backlog = Backlog(limit=4)
    rows = [record_row(make_record(number), "n") for number in range(3)]
    newer = record_row(make_record(0, T0 + 99), "n")
    assert all(backlog.put(row) for row in [*rows, newer])
    assert not backlog.put(rows[0])  # full
    assert backlog.find("req-0") is newer  # the newest row of an id
    batch = backlog.take(2)
    assert backlog.find("req-1") is rows[1]  # in flight, still found
    backlog.failed(batch[1:])  # the first was written, the second goes back
    assert backlog.find("req-1") is rows[1] and len(backlog) == 3
    assert backlog.take(10) == [rows[1], rows[2], newer]
    backlog.committed()
    assert backlog.find("req-0") is None and len(backlog) == 0


def test_specs() -> None:
    assert parse_spec("sqlite").kind == "sqlite"
    assert (
        parse_spec("sqlite:/var/lib/joulegate/ledger.db").target == "/var/lib/joulegate/ledger.db"
    )
    assert parse_spec("postgresql://u:p@db:5432/joulegate").kind == "postgresql"
    assert parse_spec("postgres://db/joulegate").kind == "postgresql"
    assert parse_spec("off").kind == "off"
    for bad in ("mysql://db", "sqlite:", ""):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_open_ledger(tmp_path: Path) -> None:
    ledger = open_ledger("sqlite", tmp_path, instance="n1")
    assert isinstance(ledger, SQLiteLedger) and ledger.path == tmp_path / "joulegate.db"
    assert isinstance(open_ledger("sqlite:/x/y.db", tmp_path), SQLiteLedger)
    fleet = open_ledger("postgresql://joulegate:secret@db:5432/ledger", tmp_path)
    assert isinstance(fleet, PostgresLedger) and fleet.instance
    assert "secret" not in fleet.describe()
    assert open_ledger("off", tmp_path) is None


def test_redact() -> None:
    assert redact("postgresql://u:pw@h:1/d") == "postgresql://u:***@h:1/d"
    assert redact("postgresql://h/d") == "postgresql://h/d"


def test_rows_hold_no_text_beyond_labels() -> None:
    """There is no column for a body, a prompt, an answer or a key."""
    assert not {"prompt", "messages", "input", "output", "body", "api_key", "key"} & set(COLUMNS)
    assert len(record_row(make_record(1), "node")) == len(COLUMNS)


def test_rows_keep_finite_figures_and_make_nan_and_infinities_unknown() -> None:
    """Figures are checked on the row's fast path by their sum: one that overflows (each
    figure finite) must still keep every figure, and a NaN or an infinity becomes NULL."""
    huge = make_record(1, energy=1e308, carbon_grams=1e308)
    row = dict(zip(COLUMNS, record_row(huge, "node"), strict=True))
    assert (row["energy_joules"], row["carbon_grams"]) == (1e308, 1e308)
    assert row["dynamic_energy_joules"] == 5e307
    assert record_row(huge.to_json(), "node") == record_row(huge, "node")

    broken = make_record(2, energy=math.nan, carbon_grams=math.inf, duration_seconds=-math.inf)
    row = dict(zip(COLUMNS, record_row(broken, "node"), strict=True))
    assert row["energy_joules"] is row["carbon_grams"] is row["duration_seconds"] is None
    assert row["ended_at"] is None and row["devices"] == '{"gpu0":null,"gpu1":null}'
    assert (row["started_at"], row["input_tokens"]) == (T0 + 2, 14)
    assert record_row(broken.to_json(), "node") == record_row(broken, "node")
