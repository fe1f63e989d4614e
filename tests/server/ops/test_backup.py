"""Backup and restore of a populated adapter, on SQLite and PostgreSQL.

An adapter (``calejo serve``) is populated over its REST API and stopped;
``calejo backup`` writes an archive; the data is changed or wiped;
``calejo restore`` brings it back. Every table is then compared row by
row with what it held when the backup was taken (read straight from the
database, not through the backup code): equal, except that the audit log
has exactly one row more, RESTORE_COMPLETED, and its chain verifies. A
restarted adapter then serves the restored state.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.server.ops.backup_support import (
    ADMIN_PASSWORD,
    OPERATOR_PASSWORD,
    audit_events,
    auth,
    calejo,
    config_text,
    neutral_rows,
    populate,
    table_rows,
)
from tests.server.storage.conftest import (  # the storage tests' fixtures
    postgres_database,
    postgres_server,
    postgres_url,
)

__all__ = ["postgres_database", "postgres_server", "postgres_url"]

AUDIT = "compliance_audit_log"
HEAD = "audit_chain_head"


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data folder) or a fresh PostgreSQL schema's URL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


def _env(database_url: str | None) -> dict[str, str]:
    env = {"CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


def _archive(result: Any) -> Path:
    assert result.returncode == 0, result.stdout + result.stderr
    for line in result.stdout.splitlines():
        if line.startswith("written: "):
            return Path(line.split(": ", 1)[1])
    raise AssertionError(f"no archive named in:\n{result.stdout}")


def _assert_restored(
    before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]
) -> None:
    """Every table as before; the audit log one RESTORE_COMPLETED row longer."""
    assert set(after) == set(before)
    for name in before:
        if name in (AUDIT, HEAD):
            continue
        assert after[name] == before[name], f"table {name} differs after restore"

    old = sorted(before[AUDIT], key=lambda r: r[0])
    new = sorted(after[AUDIT], key=lambda r: r[0])
    assert new[: len(old)] == old
    assert audit_events(new[len(old) :]) == ["RESTORE_COMPLETED"]
    assert new[-1][5].startswith("cli:")
    assert after[HEAD][0][1] == before[HEAD][0][1] + 1


def _wipe(database_url: str | None, data_dir: Path) -> None:
    if database_url is None:
        for name in ("calejo.db", "calejo.db-wal", "calejo.db-shm"):
            (data_dir / name).unlink(missing_ok=True)
        return

    async def drop() -> None:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            schema = await conn.fetchval("SELECT current_schema()")
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(drop(), 30))


def test_round_trip_restores_every_table_row_by_row(
    adapter_factory: Callable[..., Any], tmp_path: Path, database_url: str | None
) -> None:
    adapter = adapter_factory(config=config_text(), env=_env(database_url))
    populate(adapter.api)
    assert adapter.stop() == 0, adapter.output
    config = tmp_path / "calejo-0.yaml"
    data_dir = adapter.data_dir
    env = adapter.env
    before = table_rows(database_url, data_dir)
    assert {"OLGA", "VIC"} <= {row[1].upper() for row in before["users"]}
    assert "EMERGENCY_STOP_ACTIVATED" in audit_events(before[AUDIT])
    assert "INVALID_AUTHENTICATION" in audit_events(before[AUDIT])
    assert len(before["setpoints"]) == 3 and len(before["plans"]) == 1

    archive = _archive(calejo(["backup", "full", "--config", str(config)], env))
    assert archive.parent == data_dir / "backups"
    assert archive.stat().st_mode & 0o777 == 0o600

    changed = calejo(["users", "deactivate", "olga", "--config", str(config)], env)
    assert changed.returncode == 0, changed.stderr
    config.write_text(config.read_text() + "# edited after the backup\n")
    assert table_rows(database_url, data_dir)["users"] != before["users"]

    restored = calejo(
        ["restore", "full", str(archive), "--yes", "--config", str(config)], env
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "audit chain: " in restored.stdout
    _assert_restored(before, table_rows(database_url, data_dir))
    assert "edited after the backup" not in config.read_text()
    assert "edited after" in Path(f"{config}.before-restore").read_text()
    if database_url is None:
        kept = sqlite3.connect(data_dir / "calejo.db.before-restore")
        try:
            active = kept.execute(
                "SELECT active FROM users WHERE username = 'olga'"
            ).fetchone()
        finally:
            kept.close()
        assert active == (0,)
    verify = calejo(["audit", "verify", "--config", str(config)], env)
    assert verify.returncode == 0, verify.stdout

    _wipe(database_url, data_dir)
    again = calejo(
        ["restore", "database", str(archive), "--yes", "--config", str(config)], env
    )
    assert again.returncode == 0, again.stdout + again.stderr
    _assert_restored(before, table_rows(database_url, data_dir))

    _assert_serves_restored_state(adapter_factory, data_dir, database_url)


def _assert_serves_restored_state(
    adapter_factory: Callable[..., Any], data_dir: Path, database_url: str | None
) -> None:
    """A new adapter on the restored data: logins, setpoints, latched stop."""
    adapter = adapter_factory(
        config=config_text(), env=_env(database_url), data_dir=data_dir
    )
    try:
        login = httpx.post(
            f"{adapter.api}/auth/login",
            json={"username": "olga", "password": OPERATOR_PASSWORD},
            timeout=10,
        )
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        south = httpx.get(
            f"{adapter.api}/pump-stations/south/emergency-stop-status",
            headers=auth(token),
            timeout=10,
        )
        assert south.status_code == 200 and south.json()["active"] is True, south.text
        north = httpx.get(
            f"{adapter.api}/pump-stations/north", headers=auth(token), timeout=10
        ).json()
        targets = {p["pump_id"]: p["target"] for p in north["pumps"]}
        assert targets["p1"] == 42.5
        assert targets["p2"] == 30.25
    finally:
        assert adapter.stop() == 0, adapter.output


@pytest.mark.postgres
@pytest.mark.parametrize("source", ["sqlite", "postgresql"])
def test_archive_restores_into_the_other_backend(
    adapter_factory: Callable[..., Any],
    tmp_path: Path,
    postgres_url: str,
    source: str,
) -> None:
    source_url = postgres_url if source == "postgresql" else None
    target_url = None if source == "postgresql" else postgres_url
    adapter = adapter_factory(config=config_text(), env=_env(source_url))
    populate(adapter.api)
    assert adapter.stop() == 0, adapter.output
    config = tmp_path / "calejo-0.yaml"
    before = table_rows(source_url, adapter.data_dir)

    archive = _archive(
        calejo(["backup", "database", "--config", str(config)], adapter.env)
    )
    assert archive.parent == adapter.data_dir / "backups" / "database"

    target_dir = tmp_path / "target-data"
    env = {k: v for k, v in adapter.env.items() if k not in ("DATABASE_URL",)} | {
        "CALEJO_DATA_DIR": str(target_dir)
    }
    if target_url is not None:
        env["DATABASE_URL"] = target_url
    restored = calejo(
        ["restore", "database", str(archive), "--yes", "--config", str(config)], env
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr

    _assert_restored(
        neutral_rows(before), neutral_rows(table_rows(target_url, target_dir))
    )
    verify = calejo(["audit", "verify", "--config", str(config)], env)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    _assert_serves_restored_state(adapter_factory, target_dir, target_url)


def test_backup_of_a_missing_database_is_refused(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CALEJO_") and k != "DATABASE_URL"
    } | {"CALEJO_DATA_DIR": str(tmp_path / "nowhere")}
    config = tmp_path / "calejo.yaml"
    config.write_text(config_text())

    result = calejo(["backup", "database", "--config", str(config)], env)

    assert result.returncode == 1
    assert f"no database at {tmp_path / 'nowhere' / 'calejo.db'}" in result.stderr
    assert not (tmp_path / "nowhere" / "calejo.db").exists()
