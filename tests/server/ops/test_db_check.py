"""``calejo db check`` on SQLite and PostgreSQL: whole, then damaged."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from calejo_server import audit, cli
from calejo_server.ops import db_check
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditRecord
from tests.server.storage.conftest import (  # the storage tests' fixtures
    postgres_database,
    postgres_server,
    postgres_url,
)

__all__ = ["postgres_database", "postgres_server", "postgres_url"]


def fill(url: str | None, data: Path) -> None:
    async def main() -> None:
        storage = open_storage(url, data)
        await storage.open()
        try:
            await storage.write(
                [
                    AuditRecord(event_type=audit.ADAPTER_STARTED, severity="LOW"),
                    AuditRecord(event_type=audit.LOGIN_SUCCESS, severity="LOW"),
                ]
            )
        finally:
            await storage.close()

    asyncio.run(main())


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "data"
    monkeypatch.delenv("CALEJO_CONFIG", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("CALEJO_DATA_DIR", str(folder))
    return folder


def failed(checks: list[db_check.Check]) -> dict[str, str]:
    return {check.name: check.detail for check in checks if not check.ok}


def test_every_table_the_migrations_create_is_expected() -> None:
    assert {"compliance_audit_log", "audit_chain_head", "alerts", "users"} <= (
        db_check.expected_tables()
    )


def test_a_whole_sqlite_database_passes(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(None, data)

    code = cli.main(["db", "check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok   integrity: PRAGMA integrity_check: ok" in out
    assert "ok   audit chain: intact: 2 rows verified" in out
    assert "database check passed: 7 checks" in out


def test_a_damaged_sqlite_database_fails_naming_each_problem(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(None, data)
    con = sqlite3.connect(data / "calejo.db")
    con.execute("DROP TRIGGER compliance_audit_log_no_delete")
    con.execute("DELETE FROM compliance_audit_log WHERE id = 2")
    con.execute("DROP TABLE alerts")
    con.execute("DELETE FROM schema_migrations WHERE version = 2")
    con.commit()
    con.close()

    code = cli.main(["db", "check"])
    problems = failed(db_check.check_sqlite(_database(data)))
    assert code == 1
    assert problems["tables"] == "missing: alerts"
    assert "older than this adapter's 2" in problems["schema version"]
    assert "accepts DELETE" in problems["append-only triggers"]
    assert "rows 2 to 2 are missing" in problems["audit chain"]
    assert "database check failed:" in capsys.readouterr().out


def test_no_database_file_is_a_failure(data: Path) -> None:
    problems = failed(db_check.check_sqlite(_database(data)))
    assert "no database file there" in problems["database"]


def _database(data: Path) -> db_check.SQLiteDatabase:
    return db_check.SQLiteDatabase((data / "calejo.db").absolute())


@pytest.mark.postgres
def test_postgresql_whole_then_tampered(
    postgres_url: str,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fill(postgres_url, data)
    monkeypatch.setenv("DATABASE_URL", postgres_url)

    assert cli.main(["db", "check", "--format", "json"]) == 0, capsys.readouterr().out
    assert '"ok": true' in capsys.readouterr().out

    async def tamper() -> None:
        conn = await asyncpg.connect(postgres_url.split("?")[0], timeout=10)
        try:
            schema = postgres_url.rsplit("search_path=", 1)[1]
            await conn.execute(f"SET search_path = {schema}")
            await conn.execute(
                "ALTER TABLE compliance_audit_log "
                "DISABLE TRIGGER compliance_audit_log_append_only"
            )
            await conn.execute("UPDATE compliance_audit_log SET user_name = 'mallory'")
        finally:
            await conn.close()

    asyncio.run(tamper())
    assert cli.main(["db", "check"]) == 1
    out = capsys.readouterr().out
    assert (
        "FAIL append-only triggers: compliance_audit_log accepts DELETE, UPDATE" in out
    )
    assert "FAIL audit chain: broken at row id 1" in out
