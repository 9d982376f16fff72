"""A real, throw-away PostgreSQL server for tests: one cluster per session, one database per test.

Use from a test module with ``pytest_plugins = ["tests.postgres_fixtures"]``. The cluster
is made with the Debian packages' ``initdb`` (``/usr/lib/postgresql/*/bin``, or ``initdb``
on PATH) in a temporary directory, started on a free loopback port with ``pg_ctl -w`` and
stopped (and removed) at the end of the session. PostgreSQL refuses to run as root, so as
root the cluster belongs to the ``postgres`` user and its commands run through ``runuser``.
Tests skip, saying why, only where no ``initdb`` is installed or asyncpg is missing.

Durability is switched off in this cluster (``fsync=off``): the tests are about joulegate's
behaviour, not about PostgreSQL surviving power cuts, and this keeps them fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

SUPERUSER = "postgres"


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@dataclass
class Cluster:
    bindir: Path
    datadir: Path
    port: int
    run_as: str | None  # the OS user that owns the cluster when we are root

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def run(self, tool: str, *arguments: str, as_owner: bool = True) -> str:
        command = [str(self.bindir / tool), *arguments]
        if as_owner and self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        if completed.returncode != 0:
            raise RuntimeError(f"{tool} failed: {completed.stderr.strip() or completed.stdout}")
        return completed.stdout

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self.run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-qAtc",
            sql,
            as_owner=False,  # a client over TCP: any OS user will do
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self.datadir / "server.log")
        self.run(
            "pg_ctl", "-D", str(self.datadir / "data"), "-l", log, "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.run("pg_ctl", "-D", str(self.datadir / "data"), "-m", "immediate", "-w", "stop")


def create_cluster() -> Cluster:
    """initdb a cluster in a fresh temporary directory and start it; raises on failure."""
    bindir = find_bindir()
    if bindir is None:
        raise FileNotFoundError("no initdb")
    run_as = None
    datadir = Path(tempfile.mkdtemp(prefix="joulegate-pg-"))
    if os.geteuid() == 0:
        run_as = SUPERUSER
        owner = pwd.getpwnam(run_as)
        os.chown(datadir, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(bindir, datadir, free_port(), run_as)
    cluster.run(
        "initdb",
        "-D",
        str(datadir / "data"),
        "-U",
        SUPERUSER,
        "--auth=trust",
        "--no-sync",
        "--encoding=UTF8",
        "--locale=C",
    )
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A running throw-away PostgreSQL cluster for the session (skips only without initdb)."""
    pytest.importorskip("asyncpg", reason="the PostgreSQL ledger needs asyncpg")
    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to own a cluster")
    cluster = create_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn(postgres_cluster: Cluster) -> str:
    """The DSN of the session cluster's superuser on its `postgres` database."""
    return postgres_cluster.dsn


_schemas = itertools.count()


@pytest.fixture
def postgres_database(postgres_cluster: Cluster) -> Iterator[str]:
    """A fresh, empty schema of the session cluster's database, as a DSN whose
    `search_path` puts it first: as good as a database of its own, and 20 times faster to
    make. Dropped after the test."""
    name = f"test_{os.getpid()}_{next(_schemas)}"
    postgres_cluster.psql(f"CREATE SCHEMA {name}")
    try:
        yield f"{postgres_cluster.dsn}?search_path={name}"
    finally:
        postgres_cluster.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


class Relay:
    """A TCP relay in front of a server, to cut it off and bring it back like a network or
    server outage: `cut()` drops every connection and refuses new ones; `restore()`
    accepts again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def up(self) -> bool:
        return self._server is not None

    async def restore(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
