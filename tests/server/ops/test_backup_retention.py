"""The ``backup:`` section, the backup folder, and pruning by age and count.

Pruning is driven by the creation time in each archive's name and an
injected "now", so nothing sleeps; files that are not our archives are
never touched.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from calejo_server.config import ConfigError, load_config
from calejo_server.ops import backup as ops_backup
from calejo_server.ops.archive import archive_name
from calejo_server.ops.backup import (
    BackupSettings,
    backup_root,
    kind_folder,
    parse_backup_settings,
    prune,
)
from tests.server.ops.backup_support import ADMIN_PASSWORD, calejo, config_text

NOW = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def _load(tmp_path: Path, backup: object) -> Any:
    path = tmp_path / "calejo.yaml"
    path.write_text(config_text(backup=backup))  # type: ignore[arg-type]
    return load_config(path, environ={})


def test_defaults_follow_the_design(tmp_path: Path) -> None:
    settings = parse_backup_settings(_load(tmp_path, {}))

    assert settings.enabled is True
    assert settings.folder is None
    assert settings.start_delay == 60.0
    assert dict(settings.schedule) == {
        "full": 86400.0,
        "database": 3600.0,
        "config": 7 * 86400.0,
    }
    assert dict(settings.keep) == {
        "full": 7 * 86400.0,
        "database": 86400.0,
        "config": 28 * 86400.0,
    }
    assert set(settings.max_count.values()) == {50}


def test_durations_words_and_counts_are_read(tmp_path: Path) -> None:
    settings = parse_backup_settings(
        _load(
            tmp_path,
            {
                "enabled": True,
                "folder": str(tmp_path / "bk"),
                "start_delay": "0s",
                "schedule": {"full": "6h", "database": 900, "config": "off"},
                "keep": {"database": "2d", "config": "1w"},
                "max_count": {"full": 3},
            },
        )
    )

    assert settings.folder == tmp_path / "bk"
    assert settings.start_delay == 0.0
    assert dict(settings.schedule) == {
        "full": 21600.0,
        "database": 900.0,
        "config": None,
    }
    assert settings.keep["database"] == 172800.0
    assert settings.keep["config"] == 604800.0
    assert settings.keep["full"] == 7 * 86400.0
    assert dict(settings.max_count) == {"full": 3, "database": 50, "config": 50}

    one = parse_backup_settings(_load(tmp_path, {"max_count": 4}))
    assert set(one.max_count.values()) == {4}


@pytest.mark.parametrize(
    ("backup", "key", "words"),
    [
        ({"schedule": {"database": "sometimes"}}, "backup.schedule.database", "hourly"),
        ({"schedule": {"database": 0}}, "backup.schedule.database", "at least 1 s"),
        ({"schedule": {"weekly": "daily"}}, "backup.schedule.weekly", "unknown key"),
        ({"keep": {"full": "-1d"}}, "backup.keep.full", "a duration"),
        ({"max_count": 0}, "backup.max_count", "an integer of at least 1"),
        ({"max_count": {"config": "many"}}, "backup.max_count.config", "integer"),
        ({"enabled": "maybe"}, "backup.enabled", "true or false"),
        ({"folder": ""}, "backup.folder", "a folder path"),
        ({"retention": 3}, "backup.retention", "unknown key"),
        ("hourly", "backup", "a mapping"),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path, backup: object, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as error:
        parse_backup_settings(_load(tmp_path, backup))

    message = str(error.value)
    assert error.value.key_path == key
    assert message.startswith(f"{tmp_path / 'calejo.yaml'}: {key}: ")
    assert words in message


def test_commands_and_the_adapter_refuse_bad_settings(
    tmp_path: Path, adapter_factory: Callable[..., Any], make_env: Any
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(config_text(backup={"keep": {"database": "forever"}}))
    env = make_env(tmp_path / "data")

    result = calejo(["backup", "database", "--config", str(config)], env)
    assert result.returncode == 2
    assert "backup.keep.database" in result.stderr
    assert "'forever'" in result.stderr

    adapter = adapter_factory(
        config=config_text(backup={"schedule": {"full": "now and then"}}),
        env={"CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD},
        wait=False,
    )
    assert adapter.process.wait(60) == 2
    adapter.close()
    assert "backup.schedule.full" in adapter.output


def test_backup_folder_default_and_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _load(tmp_path, {})
    settings = BackupSettings()
    system = tmp_path / "var-backup-calejo"
    monkeypatch.setattr(ops_backup, "DEFAULT_FOLDER", system)

    assert backup_root(settings, config) == config.server.data_dir / "backups"
    system.mkdir()
    assert backup_root(settings, config) == system
    configured = BackupSettings(folder=tmp_path / "mine")
    assert backup_root(configured, config) == tmp_path / "mine"

    assert kind_folder(system, "full") == system
    assert kind_folder(system, "database") == system / "database"
    assert kind_folder(system, "config") == system / "config"


def _archives(root: Path, kind: str, ages: list[float]) -> list[Path]:
    """Empty archives of ``kind``, created ``ages`` hours before NOW."""
    folder = kind_folder(root, kind)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for hours in ages:
        path = folder / archive_name(kind, NOW - dt.timedelta(hours=hours))  # type: ignore[arg-type]
        path.write_bytes(b"")
        paths.append(path)
    return paths


def test_prune_by_age_and_count_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "bk"
    full = _archives(root, "full", [1, 30, 24 * 6, 24 * 8, 24 * 30])
    database = _archives(root, "database", [0.5, 1, 2, 3, 4, 5, 6, 30])
    config = _archives(root, "config", [24 * 40, 24 * 50])
    stray = [root / "notes.txt", root / "calejo-full-latest.tar.gz"]
    for path in stray:
        path.write_text("not an archive")
    wrong_folder = root / archive_name("database", NOW - dt.timedelta(days=90))
    wrong_folder.write_bytes(b"")
    stale = root / "database" / ".calejo-backup-abc.tmp"
    fresh = root / "database" / ".calejo-backup-def.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    settings = BackupSettings(
        keep={"full": 7 * 86400, "database": 86400, "config": 28 * 86400},
        max_count={"full": 50, "database": 5, "config": 50},
    )

    planned = prune(root, settings, now=NOW, dry_run=True)
    assert all(path.exists() for path in full + database + config)

    done = prune(root, settings, now=NOW)

    assert [p.path for p in done] == [p.path for p in planned]
    reasons = {p.path: p.reason for p in done}
    assert reasons == {
        full[3]: "older than 1w",
        full[4]: "older than 1w",
        database[5]: "beyond the newest 5",
        database[6]: "beyond the newest 5",
        database[7]: "older than 1d",
        config[1]: "older than 4w",
    }
    assert [p.exists() for p in full] == [True, True, True, False, False]
    assert [p.exists() for p in database] == [True] * 5 + [False] * 3
    assert [p.exists() for p in config] == [True, False], "the newest stays"
    assert all(path.exists() for path in stray)
    assert wrong_folder.exists()
    assert not stale.exists()
    assert fresh.exists()


def test_prune_command_lists_deletes_and_records(tmp_path: Path, make_env: Any) -> None:
    config = tmp_path / "calejo.yaml"
    config.write_text(
        config_text(backup={"folder": str(tmp_path / "bk"), "keep": {"config": "1d"}})
    )
    env = make_env(tmp_path / "data")
    now = dt.datetime.now(dt.UTC)
    folder = tmp_path / "bk" / "config"
    folder.mkdir(parents=True)
    old = folder / archive_name("config", now - dt.timedelta(days=3))
    new = folder / archive_name("config", now - dt.timedelta(hours=1))
    old.write_bytes(b"")
    new.write_bytes(b"")

    dry = calejo(["backup", "prune", "--dry-run", "--config", str(config)], env)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete: {old} (config, older than 1d)" in dry.stdout
    assert old.exists()

    done = calejo(["backup", "prune", "--config", str(config)], env)
    assert done.returncode == 0, done.stderr
    assert f"deleted: {old} (config, older than 1d)" in done.stdout
    assert not old.exists() and new.exists()

    export = calejo(
        ["audit", "export", "--format", "json", "--config", str(config)], env
    )
    last = json.loads(export.stdout)[-1]
    assert last["event_type"] == "BACKUP_PRUNED"
    assert last["details"]["archives"] == [str(old)]
