"""The ledger's tables, the row a record becomes, and the versioned migrations of both backends.

Two tables hold the data:

- `requests`: one row per finished request, never prompt or output text and never a key.
  `seq` orders rows for paging (with `started_at`); the unique key `(id, instance,
  started_at)` makes a retried flush harmless (a row already there is skipped) and serves
  lookups by id. Indexes: `started_at` for time ranges, `(tenant, started_at)` for one
  tenant's requests. Task-level questions are aggregate questions and go to
  `request_totals`, so `requests` carries no task index (each index costs every insert).
- `request_totals`: the hourly roll-up (UTC hour the request *started* in) per instance,
  task, model, tenant and team, updated in the same transaction as the rows it counts.
  Reports read it instead of grouping millions of raw rows: on SQLite a `GROUP BY` over
  10 M raw rows takes 30 s or more, over their roll-up under 2 s (benchmarks/ledger.py).
  Hourly, because grid carbon intensity changes by the hour. `model` and `team` are `''`
  for none there, as unique keys never match NULLs.

Sums are NULL while no request of a group had the figure (an unknown is never a fake 0);
`energy_requests` says how many requests' energy a sum covers.

Migrations run in order at start, each in one transaction with its `schema_version` row,
so a crash mid-migration leaves the previous version intact. Released migrations are never
edited; a change of schema is a new migration at the end of `MIGRATIONS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from json.encoder import encode_basestring_ascii as _quote
from operator import attrgetter, itemgetter
from typing import Any

from proxy.records import RequestRecord

# The columns of `requests` a row fills, in row order: first those copied from the record's
# attributes of the same name, then those computed from it. Any a record lacks are NULL;
# `facility_energy_joules` and `carbon_grams` are NULL too where energy is unknown.
COPIED: tuple[str, ...] = (
    "id",
    "started_at",
    "task",
    "model",
    "tenant",
    "team",
    "upstream",
    "method",
    "path",
    "streaming",
    "status",
    "code",
    "reason",
    "duration_seconds",
    "energy_joules",
    "dynamic_energy_joules",
    "meter",
    "estimate",
    "input_tokens",
    "output_tokens",
    "images",
    "pixels",
    "steps",
    "facility_energy_joules",
    "carbon_grams",
    "carbon_intensity_g_per_kwh",
    "degraded",  # since schema 2
)
COMPUTED: tuple[str, ...] = ("instance", "ended_at", "devices")
COLUMNS: tuple[str, ...] = COPIED + COMPUTED
_ID = COLUMNS.index("id")
_BOOLEAN_COLUMNS = ("streaming", "estimate")
_INTEGER_COLUMNS = frozenset({"code", "input_tokens", "output_tokens", "images", "pixels", "steps"})
_REAL_COLUMNS = frozenset(
    {
        "started_at",
        "ended_at",
        "duration_seconds",
        "energy_joules",
        "dynamic_energy_joules",
        "facility_energy_joules",
        "carbon_grams",
        "carbon_intensity_g_per_kwh",
    }
)
_REQUIRED = ("id", "instance", "task", "tenant", "status")  # NOT NULL text columns

# The roll-up's key (besides the hour) and its measures, as stored in `request_totals`.
TOTALS_KEY: tuple[str, ...] = ("instance", "task", "model", "tenant", "team")
TOTALS_COUNTS: tuple[str, ...] = (
    "requests",
    "failed_requests",
    "energy_requests",
    "estimated_requests",
)
TOTALS_SUMS: tuple[str, ...] = (
    "energy_joules",
    "dynamic_energy_joules",
    "duration_seconds",
    "input_tokens",
    "output_tokens",
    "images",
    "carbon_grams",
    "facility_energy_joules",
)
TOTALS_MEASURES = TOTALS_COUNTS + TOTALS_SUMS

Row = tuple[Any, ...]


def _text(value: Any) -> str | None:
    return value if value is None or type(value) is str else str(value)


def _integer(value: Any) -> int | None:
    return value if value is None or type(value) is int else int(value)


def _real(value: Any) -> float | None:
    """A float, or None for unknown: NaN and infinities are no measurement."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _kinds(name: str) -> tuple[Callable[[Any], Any], frozenset[type]]:
    """How to type a column's value, and the types that need no typing."""
    if name in _INTEGER_COLUMNS:
        return _integer, frozenset({int, type(None)})
    if name in _REAL_COLUMNS:
        return _real, frozenset({float, int, type(None)})
    if name in _BOOLEAN_COLUMNS:
        return bool, frozenset({bool})
    return _text, frozenset({str, type(None)})


_CONVERTERS, _TYPES = zip(*(_kinds(name) for name in COPIED), strict=True)
_POSITION = {name: position for position, name in enumerate(COLUMNS)}
_REQUIRED_POSITIONS = tuple(_POSITION[name] for name in (*_REQUIRED, "started_at"))
_STARTED_AT, _DURATION = _POSITION["started_at"], _POSITION["duration_seconds"]
_reals = itemgetter(*(_POSITION[name] for name in COPIED if name in _REAL_COLUMNS))
_required = itemgetter(*_REQUIRED_POSITIONS)
# Copying a RequestRecord's attributes in one C call keeps `append` cheap on the event loop.
_copy_attributes = attrgetter(*COPIED)
_FAST = set(COPIED) <= {field.name for field in fields(RequestRecord)}


def record_row(record: RequestRecord | Mapping[str, Any], instance: str) -> Row:
    """The `requests` row of a finished record (a `RequestRecord` or its `to_json()`).

    Values are typed here, so that one the store would refuse is refused at append (and
    counted) instead of failing a whole batch; NaN and infinite figures become NULL
    (unknown), and a missing column is NULL. This runs on the event loop for every request,
    so a well-typed `RequestRecord` takes a fast path: copied in one call and checked for
    types without a Python loop, a few microseconds in all."""
    if type(record) is not RequestRecord and isinstance(record, Mapping):
        copied = _typed(record.get)
        devices = record.get("devices")
    else:
        copied = _copy_attributes(record) if _FAST else _typed(partial(_attribute, record))
        # The figures are all finite if their sum is; a sum of finite figures that overflows
        # only sends the record down the typed path, which keeps them as they are.
        if not (
            all(map(frozenset.__contains__, _TYPES, map(type, copied)))
            and math.isfinite(sum(filter(None, _reals(copied))))
        ):
            copied = _typed(dict(zip(COPIED, copied, strict=True)).get)
        devices = getattr(record, "devices", None)
    started_at, duration = copied[_STARTED_AT], copied[_DURATION]
    row = (
        *copied,
        instance,
        None if started_at is None or duration is None else started_at + duration,
        _devices_json(devices) if devices else None,
    )
    if None in _required(row):
        for position in _REQUIRED_POSITIONS:
            if row[position] is None:
                raise ValueError(f"record without a {COLUMNS[position]}: {row[_ID]!r}")
    return row


def _attribute(record: object, name: str) -> Any:
    return getattr(record, name, None)


def _typed(get: Callable[..., Any]) -> tuple[Any, ...]:
    return tuple(convert(get(name)) for convert, name in zip(_CONVERTERS, COPIED, strict=True))


def _devices_json(devices: Mapping[str, Any]) -> str:
    """`{"gpu0": 12.5, "gpu1": null}`: JSON as `json.dumps` writes it, a few times faster
    for these small maps; an unknown or non-finite figure is null."""
    parts = []
    for name, value in devices.items():  # a loop, not a generator: a third faster here
        joules = _real(value)
        parts.append(f"{_quote(str(name))}:{'null' if joules is None else repr(joules)}")
    return "{" + ",".join(parts) + "}"


def row_id(row: Row) -> str:
    return row[_ID]


def row_document(row: Mapping[str, Any] | Row) -> dict[str, Any]:
    """A stored row as the JSON document `/joulegate/requests/{id}` serves: the keys of
    `RequestRecord.to_json()` plus the ledger's own `instance` and `ended_at`."""
    values = row if isinstance(row, Mapping) else dict(zip(COLUMNS, row, strict=True))
    document = {name: values[name] for name in COLUMNS}
    for name in _BOOLEAN_COLUMNS:
        document[name] = bool(document[name])
    devices = document["devices"]
    document["devices"] = json.loads(devices) if isinstance(devices, str) else devices or {}
    return document


@dataclass(frozen=True, slots=True)
class Totals:
    """One group of a report: requests that started in one period (UTC hour or day) with
    the same task, model, tenant and team, summed over instances."""

    period_start: int  # Unix seconds of the period's first second (UTC)
    task: str
    model: str | None
    tenant: str
    team: str | None
    requests: int
    failed_requests: int  # status other than ok: aborted or answered by joulegate itself
    energy_requests: int  # requests whose energy is known; the energy sums cover these
    estimated_requests: int
    energy_joules: float | None
    dynamic_energy_joules: float | None
    duration_seconds: float | None
    input_tokens: int | None
    output_tokens: int | None
    images: int | None
    carbon_grams: float | None
    facility_energy_joules: float | None


# Totals are built from query rows by position: the measures must keep the roll-up's order.
assert tuple(field.name for field in fields(Totals))[5:] == TOTALS_MEASURES


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema, in each backend's dialect. `version` starts at 1."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


_SQLITE_V1 = (
    """CREATE TABLE requests (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        instance TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        task TEXT NOT NULL,
        model TEXT,
        tenant TEXT NOT NULL,
        team TEXT,
        upstream TEXT,
        method TEXT,
        path TEXT,
        streaming INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL,
        code INTEGER,
        reason TEXT,
        duration_seconds REAL,
        energy_joules REAL,
        dynamic_energy_joules REAL,
        devices TEXT,
        meter TEXT,
        estimate INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER,
        output_tokens INTEGER,
        images INTEGER,
        pixels INTEGER,
        steps INTEGER,
        facility_energy_joules REAL,
        carbon_grams REAL,
        carbon_intensity_g_per_kwh REAL
    )""",
    "CREATE UNIQUE INDEX requests_key ON requests (id, instance, started_at)",
    "CREATE INDEX requests_started_at ON requests (started_at)",
    "CREATE INDEX requests_tenant ON requests (tenant, started_at)",
    """CREATE TABLE request_totals (
        hour INTEGER NOT NULL,
        instance TEXT NOT NULL,
        task TEXT NOT NULL,
        model TEXT NOT NULL,
        tenant TEXT NOT NULL,
        team TEXT NOT NULL,
        requests INTEGER NOT NULL,
        failed_requests INTEGER NOT NULL,
        energy_requests INTEGER NOT NULL,
        estimated_requests INTEGER NOT NULL,
        energy_joules REAL,
        dynamic_energy_joules REAL,
        duration_seconds REAL,
        input_tokens INTEGER,
        output_tokens INTEGER,
        images INTEGER,
        carbon_grams REAL,
        facility_energy_joules REAL,
        PRIMARY KEY (hour, task, tenant, model, team, instance)
    ) WITHOUT ROWID""",
)

_POSTGRESQL_V1 = (
    """CREATE TABLE requests (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL,
        instance TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        task TEXT NOT NULL,
        model TEXT,
        tenant TEXT NOT NULL,
        team TEXT,
        upstream TEXT,
        method TEXT,
        path TEXT,
        streaming BOOLEAN NOT NULL DEFAULT false,
        status TEXT NOT NULL,
        code INTEGER,
        reason TEXT,
        duration_seconds DOUBLE PRECISION,
        energy_joules DOUBLE PRECISION,
        dynamic_energy_joules DOUBLE PRECISION,
        devices JSONB,
        meter TEXT,
        estimate BOOLEAN NOT NULL DEFAULT false,
        input_tokens BIGINT,
        output_tokens BIGINT,
        images BIGINT,
        pixels BIGINT,
        steps BIGINT,
        facility_energy_joules DOUBLE PRECISION,
        carbon_grams DOUBLE PRECISION,
        carbon_intensity_g_per_kwh DOUBLE PRECISION
    )""",
    "CREATE UNIQUE INDEX requests_key ON requests (id, instance, started_at)",
    "CREATE INDEX requests_started_at ON requests (started_at, seq)",
    "CREATE INDEX requests_tenant ON requests (tenant, started_at, seq)",
    """CREATE TABLE request_totals (
        hour BIGINT NOT NULL,
        instance TEXT NOT NULL,
        task TEXT NOT NULL,
        model TEXT NOT NULL,
        tenant TEXT NOT NULL,
        team TEXT NOT NULL,
        requests BIGINT NOT NULL,
        failed_requests BIGINT NOT NULL,
        energy_requests BIGINT NOT NULL,
        estimated_requests BIGINT NOT NULL,
        energy_joules DOUBLE PRECISION,
        dynamic_energy_joules DOUBLE PRECISION,
        duration_seconds DOUBLE PRECISION,
        input_tokens BIGINT,
        output_tokens BIGINT,
        images BIGINT,
        carbon_grams DOUBLE PRECISION,
        facility_energy_joules DOUBLE PRECISION,
        PRIMARY KEY (hour, task, tenant, model, team, instance)
    )""",
)

_ADD_DEGRADED = ("ALTER TABLE requests ADD COLUMN degraded TEXT",)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "requests and their hourly totals", _SQLITE_V1, _POSTGRESQL_V1),
    Migration(2, "what an energy budget changed on a request", _ADD_DEGRADED, _ADD_DEGRADED),
)


def check_migrations(migrations: tuple[Migration, ...]) -> None:
    """Versions must run 1, 2, 3... so that `schema_version` alone says what was applied."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(f"migration {migration.version} out of order (expected {expected})")


class SchemaTooNew(RuntimeError):
    """The store was migrated by a newer joulegate: writing it with older code could lose
    columns, so this one refuses rather than guesses."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"ledger schema version {found} is newer than this joulegate knows ({known}); "
            "upgrade joulegate or point it at another ledger"
        )


# ---- SQL shared by the roll-up and by reports, per dialect ----


def hour_expression(dialect: str, column: str = "started_at") -> str:
    if dialect == "sqlite":
        return f"(CAST({column} / 3600 AS INTEGER) * 3600)"
    return f"(floor({column} / 3600) * 3600)::bigint"


def measure_expressions(dialect: str) -> tuple[str, ...]:
    """Aggregates over `requests` rows, in `TOTALS_MEASURES` order: the roll-up stores
    exactly what a report would compute from the raw rows."""
    integer = "" if dialect == "sqlite" else "::bigint"  # PostgreSQL sums bigints as numeric
    estimate = "estimate <> 0" if dialect == "sqlite" else "estimate"
    return (
        f"count(*){integer}",
        f"sum(CASE WHEN status <> 'ok' THEN 1 ELSE 0 END){integer}",
        f"count(energy_joules){integer}",
        f"sum(CASE WHEN {estimate} THEN 1 ELSE 0 END){integer}",
        "sum(energy_joules)",
        "sum(dynamic_energy_joules)",
        "sum(duration_seconds)",
        f"sum(input_tokens){integer}",
        f"sum(output_tokens){integer}",
        f"sum(images){integer}",
        "sum(carbon_grams)",
        "sum(facility_energy_joules)",
    )


INTEGER_MEASURES = frozenset(TOTALS_COUNTS) | {"input_tokens", "output_tokens", "images"}


def totals_upsert_clause(table: str = "request_totals") -> str:
    """`ON CONFLICT` for adding new counts to an hour's existing totals (both dialects).
    A NULL sum stays NULL only while neither side knows the figure."""
    counts = [f"{name} = {table}.{name} + excluded.{name}" for name in TOTALS_COUNTS]
    sums = [
        f"{name} = coalesce({table}.{name} + excluded.{name}, {table}.{name}, excluded.{name})"
        for name in TOTALS_SUMS
    ]
    return "ON CONFLICT (hour, task, tenant, model, team, instance) DO UPDATE SET " + ", ".join(
        counts + sums
    )


def totals_select(dialect: str, source: str, where: str) -> str:
    """Hourly groups of `source` rows (a table or CTE with the `requests` columns), in the
    column order of `request_totals`; ordered so that concurrent writers lock keys alike."""
    columns = ["hour", *TOTALS_KEY, *TOTALS_MEASURES]
    keys = [
        hour_expression(dialect),
        "instance",
        "task",
        "coalesce(model, '')",
        "tenant",
        "coalesce(team, '')",
    ]
    selected = ", ".join(keys + list(measure_expressions(dialect)))
    group = ", ".join(str(position) for position in range(1, len(keys) + 1))
    return (
        f"INSERT INTO request_totals ({', '.join(columns)}) "
        f"SELECT {selected} FROM {source} WHERE {where} GROUP BY {group} ORDER BY {group} "
        + totals_upsert_clause()
    )


# A report group: period start, (task, model, tenant, team) with '' for none, the measures.
Group = tuple[int, tuple[str, ...], tuple[Any, ...]]
_GROUP_KEY = len(TOTALS_KEY)  # instance, summed over in reports, gives its place to period


def as_groups(rows: Iterable[Sequence[Any]]) -> list[Group]:
    """Report query rows (period, task, model, tenant, team, measures...) as groups."""
    return [(int(row[0]), tuple(row[1:_GROUP_KEY]), tuple(row[_GROUP_KEY:])) for row in rows]


def totals_from_row(period_start: int, key: tuple[str, ...], measures: tuple[Any, ...]) -> Totals:
    task, model, tenant, team = key
    return Totals(period_start, task, model or None, tenant, team or None, *measures)


def merge_measures(left: tuple[Any, ...], right: tuple[Any, ...]) -> tuple[Any, ...]:
    """Add two groups' measures: counts add, sums add where known."""
    return tuple(
        a + b if a is not None and b is not None else a if b is None else b
        for a, b in zip(left, right, strict=True)
    )
