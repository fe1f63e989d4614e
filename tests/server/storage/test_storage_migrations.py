"""Versioned migrations, opening, and choosing the backend from the URL."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from calejo_server.storage import open_storage
from calejo_server.storage.base import StationStateRecord, StorageError
from calejo_server.storage.durable import load_migrations
from calejo_server.storage.postgres import PostgresStorage
from calejo_server.storage.sqlite import SQLiteStorage, split_script

Opened = Callable[..., Any]
Run = Callable[..., Any]

TABLES = {
    "compliance_audit_log",
    "audit_chain_head",
    "schema_migrations",
    "setpoints",
    "plans",
    "emergency_stops",
    "station_states",
    "stations",
    "users",
    "roles",
    "tokens",
}


async def _sql(
    backend: str, database_url: str | None, data_dir: Path, query: str
) -> list[tuple[Any, ...]]:
    """Run ``query`` on the test's database, around the storage."""
    if backend == "sqlite":
        con = sqlite3.connect(data_dir / "calejo.db")
        try:
            with con:
                return [tuple(row) for row in con.execute(query)]
        finally:
            con.close()
    assert database_url is not None
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


def _table_names_query(backend: str) -> str:
    if backend == "sqlite":
        return "SELECT name FROM sqlite_master WHERE type = 'table'"
    return (
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema()"
    )


def test_every_backend_has_the_same_migrations() -> None:
    sqlite = [(m.version, m.name) for m in load_migrations("sqlite")]
    postgresql = [(m.version, m.name) for m in load_migrations("postgresql")]
    assert sqlite == postgresql
    assert sqlite[0] == (1, "initial")


def test_a_fresh_database_gets_every_migration(
    opened: Opened,
    arun: Run,
    backend: str,
    database_url: str | None,
    data_dir: Path,
) -> None:
    async def main() -> None:
        async with opened():
            pass
        tables = {
            r[0]
            for r in await _sql(
                backend, database_url, data_dir, _table_names_query(backend)
            )
        }
        versions = await _sql(
            backend,
            database_url,
            data_dir,
            "SELECT version, name FROM schema_migrations",
        )
        assert tables >= TABLES
        assert versions == [(m.version, m.name) for m in load_migrations(backend)]

    arun(main())


def test_reopening_applies_nothing_again_and_keeps_the_data(
    opened: Opened,
    arun: Run,
    backend: str,
    database_url: str | None,
    data_dir: Path,
) -> None:
    query = "SELECT version, applied_at FROM schema_migrations ORDER BY version"

    async def main() -> None:
        async with opened() as storage:
            await storage.write([StationStateRecord("st1", None, True)])
        first = await _sql(backend, database_url, data_dir, query)
        async with opened() as storage:
            snapshot = await storage.load()
        async with opened():
            pass
        assert await _sql(backend, database_url, data_dir, query) == first
        assert [s.station_id for s in snapshot.station_states] == ["st1"]

    arun(main())


def test_a_newer_schema_is_refused(
    opened: Opened,
    arun: Run,
    backend: str,
    database_url: str | None,
    data_dir: Path,
) -> None:
    async def main() -> None:
        async with opened():
            pass
        await _sql(
            backend,
            database_url,
            data_dir,
            "INSERT INTO schema_migrations (version, name, applied_at) "
            "VALUES (999, 'from_the_future', '2030-01-01T00:00:00+00:00')",
        )
        storage = open_storage(database_url, data_dir)
        with pytest.raises(StorageError, match="version 999, newer than this adapter"):
            await storage.open()
        await storage.close()

    arun(main())


def test_split_script_keeps_trigger_bodies_whole() -> None:
    script = (
        "-- a comment\nCREATE TABLE a (x INTEGER);\n"
        "CREATE TRIGGER t BEFORE DELETE ON a\nBEGIN\n"
        "    SELECT RAISE(ABORT, 'no; never');\nEND;\n"
        "INSERT INTO a VALUES (1);\n-- trailing comment\n"
    )
    statements = split_script(script)
    assert len(statements) == 3
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path, arun: Run) -> None:
    storage = open_storage(None, tmp_path)

    async def main() -> None:
        await storage.open()
        await storage.close()

    arun(main())
    path = tmp_path / "calejo.db"
    assert path.stat().st_mode & 0o077 == 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_sqlite_refuses_a_file_that_is_not_a_database(
    tmp_path: Path, arun: Run
) -> None:
    path = tmp_path / "calejo.db"
    path.write_bytes(b"this is not a database file, not at all" * 100)
    storage = SQLiteStorage(path, tmp_path)

    async def main() -> None:
        with pytest.raises(StorageError, match="cannot open the database"):
            await storage.open()
        await storage.close()

    arun(main())


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    default = open_storage(None, tmp_path)
    assert isinstance(default, SQLiteStorage)
    assert default.path == tmp_path / "calejo.db"

    relative = open_storage("sqlite:///state/adapter.db", tmp_path)
    assert isinstance(relative, SQLiteStorage)
    assert relative.path == Path("state/adapter.db")

    absolute = open_storage("sqlite:////var/lib/calejo/adapter.db", tmp_path)
    assert isinstance(absolute, SQLiteStorage)
    assert absolute.path == Path("/var/lib/calejo/adapter.db")

    postgres = open_storage("postgresql://calejo:secret@db.example:5433", tmp_path)
    assert isinstance(postgres, PostgresStorage)
    assert postgres.where() == "postgresql at db.example:5433/calejo"

    named = open_storage("postgres://db.example/plant_7", tmp_path)
    assert isinstance(named, PostgresStorage)
    assert named.where() == "postgresql at db.example:5432/plant_7"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/calejo", "expected a database url starting sqlite://"),
        ("sqlite:///:memory:", "in-memory database is not durable"),
        ("sqlite://server/file.db", "no host"),
        ("postgresql://u:hunter2@db/x/../y?x", None),
    ],
)
def test_open_storage_refuses_unknown_urls(
    url: str, message: str | None, tmp_path: Path
) -> None:
    if message is None:
        open_storage(url, tmp_path)
        return
    with pytest.raises(StorageError, match=message) as caught:
        open_storage(url, tmp_path)
    assert "hunter2" not in str(caught.value)


def test_open_storage_hides_the_password_in_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as caught:
        open_storage("oracle://scott:tiger@db/orcl", tmp_path)
    assert "tiger" not in str(caught.value)


def test_unreachable_postgresql_fails_open_quickly(tmp_path: Path, arun: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = PostgresStorage(
        f"postgresql://postgres@127.0.0.1:{port}/calejo", tmp_path, connect_timeout=1
    )

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"unreachable \(connection refused\)"):
            await storage.open()
        assert time.monotonic() - started < 5
        await storage.close()

    arun(main())
