"""Backups inside a running adapter: on schedule, verified, pruned, alerted.

Two tests run a real ``calejo serve`` with a schedule of a second: one
checks the archives it writes (verified with ``calejo verify-backup``,
pruned to ``max_count``, audited as the system, shown in
``/health/detailed``); the other points the backups at a file, where no
folder can be made, and checks the ERROR log line, the BACKUP_FAILED
audit row, the ``backup_failed`` alert and the degraded component. The
last test starts the scheduler itself with an injected clock to check
when each kind is first due after a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from calejo_server.api.health import HealthRegistry
from calejo_server.config import load_config
from calejo_server.ops.archive import archive_name
from calejo_server.ops.backup_scheduler import BackupScheduler
from tests.server.ops.backup_support import ADMIN_PASSWORD, auth, calejo, config_text

WAIT = 40.0


def _admin(api: str) -> str:
    answer = httpx.post(
        f"{api}/auth/login",
        json={"username": "admin", "password": ADMIN_PASSWORD},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert isinstance(token, str)
    return token


def _wait_for(
    what: str, probe: Callable[[], Any], adapter: Any, timeout: float = WAIT
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {timeout} s:\n{adapter.output}")


def _audit(api: str, token: str, event_type: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{api}/audit-log",
        params={"event_type": event_type, "limit": 100},
        headers=auth(token),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entries"]
    assert isinstance(entries, list)
    return entries


def test_scheduled_backups_are_verified_pruned_and_audited(
    adapter_factory: Callable[..., Any], tmp_path: Path
) -> None:
    folder = tmp_path / "bk"
    adapter = adapter_factory(
        config=config_text(
            backup={
                "folder": str(folder),
                "start_delay": 0,
                "schedule": {"full": "off", "database": 1, "config": "off"},
                "max_count": {"database": 2},
            }
        ),
        env={"CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    token = _admin(adapter.api)

    pruned = _wait_for(
        "a pruned scheduled backup",
        lambda: _audit(adapter.api, token, "BACKUP_PRUNED"),
        adapter,
    )
    health = httpx.get(f"{adapter.api}/health/detailed", timeout=10).json()
    created = _audit(adapter.api, token, "BACKUP_CREATED")
    verified = _audit(adapter.api, token, "BACKUP_VERIFIED")
    assert adapter.stop() == 0, adapter.output

    component = health["components"]["backup"]
    assert component["state"] == "ok", component
    assert component["folder"] == str(folder)
    assert component["database"]["every_seconds"] == 1.0
    assert component["database"]["last_archive"].startswith(str(folder / "database"))
    assert "full" not in component
    assert health["status"] == "ok"

    assert len(created) >= 3 and len(verified) >= 3
    for entry in (*created, *verified, *pruned):
        assert entry["user"] == "system"
        assert entry["protocol"] == "SYSTEM"
    assert pruned[0]["details"]["kind"] == "database"

    archives = sorted((folder / "database").glob("calejo-database-*.tar.gz"))
    assert 1 <= len(archives) <= 2
    assert not list(folder.glob("calejo-full-*"))
    assert not (folder / "config").exists()
    assert not [p for p in (folder / "database").iterdir() if p.name.startswith(".")]
    newest = archives[-1]
    assert newest.stat().st_mode & 0o777 == 0o600
    assert str(newest) in {e["details"]["archive"] for e in created}

    check = calejo(["verify-backup", str(newest)], adapter.env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "audit chain: " in check.stdout


def test_failed_scheduled_backup_logs_audits_alerts_and_shows(
    adapter_factory: Callable[..., Any], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the backup folder should be\n")
    adapter = adapter_factory(
        config=config_text(
            backup={
                "folder": str(blocker),
                "start_delay": 0,
                "schedule": {"full": "off", "database": 1, "config": "off"},
            }
        ),
        env={"CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    token = _admin(adapter.api)

    def alerts() -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{adapter.api}/alerts",
            params={"kind": "backup_failed"},
            headers=auth(token),
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        found = answer.json()["alerts"]
        assert isinstance(found, list)
        return found

    (alert,) = _wait_for("a backup_failed alert", alerts, adapter)
    failed = _wait_for(
        "BACKUP_FAILED", lambda: _audit(adapter.api, token, "BACKUP_FAILED"), adapter
    )
    component = httpx.get(f"{adapter.api}/health/detailed", timeout=10).json()[
        "components"
    ]["backup"]
    assert adapter.stop() == 0, adapter.output

    assert alert["severity"] == "HIGH"
    assert alert["summary"] == "database backup failed"
    assert alert["details"]["kind"] == "database"
    assert str(blocker) in alert["details"]["error"]
    assert failed[0]["severity"] == "HIGH"
    assert failed[0]["user"] == "system"
    assert failed[0]["details"]["stage"] == "create"
    assert component["state"] == "degraded"
    assert str(blocker) in component["detail"]
    errors = [
        line
        for line in adapter.output.splitlines()
        if " ERROR " in line and "calejo_server.ops.backup_scheduler" in line
    ]
    assert (
        errors and f"database backup into {blocker / 'database'} failed" in (errors[0])
    ), adapter.output
    assert "Traceback" not in adapter.output


def test_first_backup_after_a_restart_waits_for_its_interval(tmp_path: Path) -> None:
    root = tmp_path / "bk"
    path = tmp_path / "calejo.yaml"
    path.write_text(
        config_text(
            backup={
                "folder": str(root),
                "start_delay": 30,
                "schedule": {"full": "daily", "database": "hourly", "config": "off"},
            }
        )
    )
    config = load_config(path, environ={})
    now = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
    recent = now - dt.timedelta(minutes=10)
    (root / "database").mkdir(parents=True)
    (root / "database" / archive_name("database", recent)).write_bytes(b"")
    (root / archive_name("full", now - dt.timedelta(days=3))).write_bytes(b"")
    health = HealthRegistry()
    adapter = types.SimpleNamespace(config=config, storage=None, health=health)
    scheduler = BackupScheduler(adapter, clock=now.timestamp)

    async def started() -> dict[str, float]:
        await scheduler.start()
        try:
            return {kind: s.next_at for kind, s in scheduler.status.items()}
        finally:
            await scheduler.stop()

    due = asyncio.run(asyncio.wait_for(started(), 10))

    assert due == {
        "database": recent.timestamp() + 3600,
        "full": now.timestamp() + 30,
    }
    _, components = health.check()
    body = json.loads(json.dumps(components["backup"].to_dict()))
    assert body["state"] == "ok"
    assert body["database"]["next_at"] == "2030-06-01T12:50:00+00:00"
    assert components["backup"].critical is False
