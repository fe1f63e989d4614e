"""Fixtures for the storage tests: both backends, and PostgreSQL servers.

``backend`` runs a test once on SQLite and once on PostgreSQL; ``database_url``
gives the URL of a fresh, empty database for it (None for SQLite: the
default file in the test's data folder).

PostgreSQL comes two ways:

- the shared server at 127.0.0.1:5432 (user postgres, trust): one database
  per test session (``calejo_test_<pid>_<random>``, dropped at the end) and
  one schema per test inside it (``postgres_url``). When the server does not
  answer, ``pg_ctlcluster --skip-systemctl-redirect 15 main start`` is tried
  once; if it still does not answer the tests skip, or fail under CI=true.
- a private server for tests that stop and start it (``private_postgres``,
  defined in tests/server/conftest.py and shared with the adapter tests):
  initdb into a temporary folder (as the ``postgres`` user when running as
  root) once per session, copied for each test, started on a free port with
  its socket in that folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from calejo_server import audit
from calejo_server.storage import open_storage
from calejo_server.storage.base import (
    AuditRecord,
    Record,
    SetpointRecord,
    StationStateRecord,
    Storage,
    utcnow,
)

T = TypeVar("T")

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 5432
TEST_TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# Running coroutines from plain tests, bounded.


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coro`` in a fresh event loop, failing after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def arun() -> Callable[..., Any]:
    """:func:`run`, for tests: ``arun(main())``."""
    return run


# ---------------------------------------------------------------------------
# The shared PostgreSQL server.


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if _under_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
    pytest.skip(reason)


async def _answers(dsn: str) -> str | None:
    """None when a server answers at ``dsn``, else why not."""
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def _shared_dsn(database: str = "postgres") -> str:
    return f"postgresql://postgres@{SHARED_HOST}:{SHARED_PORT}/{database}"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The DSN of the shared server's maintenance database, once it answers."""
    problem = run(_answers(_shared_dsn()))
    if problem is not None and shutil.which("pg_ctlcluster"):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        problem = run(_answers(_shared_dsn()))
    if problem is not None:
        _skip_or_fail(f"no PostgreSQL at {SHARED_HOST}:{SHARED_PORT} ({problem})")
    return _shared_dsn()


@pytest.fixture(scope="session")
def postgres_database(postgres_server: str) -> Iterator[str]:
    """A database of its own for this test session; dropped at the end."""
    name = f"calejo_test_{os.getpid()}_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(postgres_server, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_server, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run(create())
    try:
        yield name
    finally:
        run(drop())


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A URL whose tables land in a fresh schema of the session database."""
    schema = f"t_{secrets.token_hex(6)}"
    dsn = _shared_dsn(postgres_database)

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run(execute(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{dsn}?search_path={schema}"
    finally:
        run(execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


# ---------------------------------------------------------------------------
# Both backends.


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data folder) or a fresh PostgreSQL schema's URL."""
    if backend == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def opened(
    database_url: str | None, data_dir: Path
) -> Callable[..., contextlib.AbstractAsyncContextManager[Storage]]:
    """``async with opened() as storage``: the test's storage, open."""

    @contextlib.asynccontextmanager
    async def factory(**options: Any) -> AsyncIterator[Storage]:
        storage = make_storage(database_url, data_dir, **options)
        await storage.open()
        try:
            yield storage
        finally:
            await storage.close()

    return factory


def make_storage(database_url: str | None, data_dir: Path, **options: Any) -> Storage:
    """open_storage, or the backend class itself when options are given."""
    if not options:
        return open_storage(database_url, data_dir)
    if database_url is None:
        from calejo_server.storage.sqlite import SQLiteStorage

        return SQLiteStorage(data_dir / "calejo.db", data_dir, **options)
    from calejo_server.storage.postgres import PostgresStorage

    return PostgresStorage(database_url, data_dir, **options)


# ---------------------------------------------------------------------------
# A private PostgreSQL server that a test may stop and start: the
# ``private_postgres`` fixture lives in tests/server/conftest.py, shared
# with the adapter's end-to-end durability tests.


# ---------------------------------------------------------------------------
# Records.


def setpoint_write(
    station_id: str, pump_id: str, value: float, k: int, user: str = "operator"
) -> list[Record]:
    """What one audited setpoint write stores: setpoint, station state, audit."""
    now = utcnow()
    return [
        SetpointRecord(
            station_id=station_id,
            pump_id=pump_id,
            requested=value,
            target=value,
            applied=value,
            outcome="accepted",
            source="REST",
            user=user,
            at=now,
        ),
        StationStateRecord(station_id=station_id, last_fresh_at=now, failsafe=False),
        AuditRecord(
            event_type=audit.SETPOINT_CHANGED,
            severity=audit.LOW,
            user=user,
            source_address="127.0.0.1",
            protocol="REST",
            station_id=station_id,
            pump_id=pump_id,
            new_value=f"{value:.1f}",
            outcome="accepted",
            details={"k": k, "requested": value},
        ),
    ]


@pytest.fixture
def setpoint_records() -> Callable[..., list[Record]]:
    """:func:`setpoint_write`, for tests."""
    return setpoint_write
