"""The outputs layer's durable record: every finished request, written to a store.

``open_ledger(spec, data_dir)`` turns the ``ledger`` setting into a :class:`Ledger`:

- ``sqlite`` (the default): ``<data_dir>/joulegate.db``, one file per instance;
- ``sqlite:PATH``: that file (relative paths are taken from ``data_dir``);
- ``postgresql://user@host:port/db`` (or ``postgres://``): one database shared by a fleet;
- ``off``: no ledger (``open_ledger`` returns None).

The Recorder calls ``append(record)`` for every published record; the server awaits
``start()`` at start-up and ``close()`` at shut-down, after the recorder has drained.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.ledger.base import Ledger, LedgerError, LedgerStats
from proxy.ledger.schema import COLUMNS, MIGRATIONS, Migration, SchemaTooNew, Totals

__all__ = [
    "COLUMNS",
    "DB_FILE",
    "MIGRATIONS",
    "Ledger",
    "LedgerError",
    "LedgerSpec",
    "LedgerStats",
    "Migration",
    "SchemaTooNew",
    "Totals",
    "open_ledger",
    "parse_spec",
]

DB_FILE = "joulegate.db"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True, slots=True)
class LedgerSpec:
    kind: str  # "sqlite", "postgresql" or "off"
    target: str  # the file (relative to the data directory unless absolute), or the DSN


def parse_spec(spec: str) -> LedgerSpec:
    """Check a ``ledger`` setting without opening anything (for configuration errors)."""
    text = spec.strip()
    if text in ("off", "none"):
        return LedgerSpec("off", "")
    if text == "sqlite":
        return LedgerSpec("sqlite", DB_FILE)
    if text.startswith("sqlite:"):
        path = text.removeprefix("sqlite:")
        if not path:
            raise ValueError("expected sqlite:PATH with a file name")
        return LedgerSpec("sqlite", path)
    if text.startswith(_POSTGRES_SCHEMES):
        return LedgerSpec("postgresql", text)
    raise ValueError(f"expected sqlite, sqlite:PATH, postgresql://... or off, got {spec!r}")


def open_ledger(
    spec: str,
    data_dir: str | Path,
    *,
    instance: str | None = None,
    **options: Any,
) -> Ledger | None:
    """The ledger a ``ledger`` setting names, not yet started (``await ledger.start()``).

    ``instance`` names this proxy in a shared ledger (default: the host name); ``options``
    go to the backend: ``flush_interval``, ``batch_size``, ``max_pending``,
    ``close_timeout``, and ``synchronous`` (SQLite) or ``pool_size``, ``command_timeout``
    (PostgreSQL)."""
    parsed = parse_spec(spec)
    instance = instance or socket.gethostname()
    if parsed.kind == "off":
        return None
    if parsed.kind == "postgresql":
        from proxy.ledger.postgres import PostgresLedger

        return PostgresLedger(parsed.target, instance=instance, **options)
    from proxy.ledger.sqlite import SQLiteLedger

    return SQLiteLedger(Path(data_dir) / parsed.target, instance=instance, **options)
