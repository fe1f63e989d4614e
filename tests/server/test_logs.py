"""The ``logging:`` section and the rotating log files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calejo_server.config import ConfigError
from calejo_server.logs import (
    DEFAULT_FOLDER,
    LOG_FILE,
    LoggingConfig,
    parse_logging,
    setup_logging,
)


@pytest.fixture
def restore_root() -> Iterator[None]:
    """Leave the root logger as the test found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_without_a_section_logs_go_to_standard_output_only() -> None:
    settings = parse_logging({})

    assert settings == LoggingConfig()
    assert settings.folder is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"folder": "/srv/log"}, Path("/srv/log")),
        ({"dir": "/srv/log"}, Path("/srv/log")),
        ({"folder": True}, DEFAULT_FOLDER),
        ({"folder": False}, None),
    ],
)
def test_folder_names(section: dict[str, Any], expected: Path | None) -> None:
    assert parse_logging({"logging": section}).folder == expected


def test_backup_count_and_its_older_name() -> None:
    assert parse_logging({"logging": {"backup_count": 3}}).backup_count == 3
    assert parse_logging({"logging": {"backups": 4}}).backup_count == 4


@pytest.mark.parametrize(
    ("section", "key_path", "shown"),
    [
        ({"level": "LOUD"}, "logging.level", "'LOUD'"),
        ({"folder": 12}, "logging.folder", "12"),
        ({"folder": ""}, "logging.folder", "''"),
        ({"max_bytes": 10}, "logging.max_bytes", "10"),
        ({"backup_count": 0}, "logging.backup_count", "0"),
        ({"backup_count": True}, "logging.backup_count", "True"),
        ({"folder": "/a", "dir": "/b"}, "logging.dir", "'dir'"),
        ({"backups": 2, "backup_count": 2}, "logging.backups", "'backups'"),
        ({"rotate": "daily"}, "logging.rotate", "'rotate'"),
    ],
)
def test_bad_values_name_the_key(
    section: dict[str, Any], key_path: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as error:
        parse_logging({"logging": section}, Path("/etc/calejo.yaml"))

    assert error.value.key_path == key_path
    assert "/etc/calejo.yaml" in str(error.value)
    assert shown in str(error.value)


@pytest.mark.usefixtures("restore_root")
def test_writing_past_max_bytes_rotates_and_keeps_backup_count(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "logs" / "calejo"
    settings = parse_logging(
        {"logging": {"folder": str(folder), "max_bytes": 1024, "backup_count": 2}}
    )
    stream = (tmp_path / "stdout.txt").open("w", encoding="utf-8")
    handlers = setup_logging(settings, stream)
    log = logging.getLogger("calejo_server.test_logs")

    for number in range(200):
        log.info("line %03d %s", number, "x" * 40)
    for handler in handlers:
        handler.flush()
    stream.close()

    names = sorted(path.name for path in folder.iterdir())
    assert names == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
    for path in folder.iterdir():
        assert path.stat().st_size <= 1024, path
    assert "line 199" in (folder / LOG_FILE).read_text(encoding="utf-8")
    assert "line 000" not in "".join(p.read_text() for p in folder.iterdir())
    assert "line 000" in (tmp_path / "stdout.txt").read_text(encoding="utf-8")


@pytest.mark.usefixtures("restore_root")
def test_a_second_setup_replaces_the_handlers(tmp_path: Path) -> None:
    settings = parse_logging({"logging": {"folder": str(tmp_path)}})
    stream = (tmp_path / "stdout.txt").open("w", encoding="utf-8")

    first = setup_logging(settings, stream)
    second = setup_logging(settings, stream)

    root = logging.getLogger().handlers
    assert not [handler for handler in first if handler in root]
    assert all(handler in root for handler in second)
    for handler in second:
        logging.getLogger().removeHandler(handler)
        handler.close()
    stream.close()


def test_an_unwritable_folder_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    settings = parse_logging({"logging": {"folder": str(blocker / "logs")}})

    with pytest.raises(ConfigError) as error:
        setup_logging(settings)

    assert error.value.key_path == "logging.folder"
    assert str(blocker / "logs") in str(error.value)
