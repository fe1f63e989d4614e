"""Logging of the adapter process: standard output and rotating files.

The configuration's ``logging:`` section (every key optional)::

    logging:
      level: INFO              # DEBUG, INFO, WARNING, ERROR, CRITICAL
      folder: /var/log/calejo  # also write calejo.log here, rotated by size
      max_bytes: 10485760      # rotate the file when it would pass this size
      backup_count: 5          # rotated files kept (calejo.log.1 ... .5)
      access_log: false        # one line per HTTP request (costly under load)

Without ``folder`` (or with ``folder: false``) the adapter logs to
standard output only, which is what a container or a systemd unit
collects; ``folder: true`` means ``/var/log/calejo``. ``dir`` and
``backups`` are accepted as older names of ``folder`` and
``backup_count`` (at least 1: the log in the folder never grows past
``max_bytes`` times ``backup_count + 1``). The folder is created (mode
0750) if missing.
"""

from __future__ import annotations

import dataclasses
import logging
import logging.handlers
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from calejo_server.config import ConfigError

logger = logging.getLogger(__name__)

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FILE = "calejo.log"
DEFAULT_FOLDER = Path("/var/log/calejo")
FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
_KEYS = frozenset(
    {"level", "folder", "dir", "max_bytes", "backup_count", "backups", "access_log"}
)
_ALIASES = (("folder", "dir"), ("backup_count", "backups"))


@dataclasses.dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Where the adapter's log goes and how much of it."""

    level: str = "INFO"
    folder: Path | None = None
    max_bytes: int = 10 * 1024 * 1024
    backup_count: int = 5
    access_log: bool = False


class _UTCFormatter(logging.Formatter):
    """ISO 8601 times in UTC with milliseconds: 2026-01-31T12:00:00.123Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def parse_logging(raw: Mapping[str, Any], source: Path | None = None) -> LoggingConfig:
    """Read and check the ``logging:`` section of the whole document ``raw``."""
    section = raw.get("logging")
    if section is None:
        return LoggingConfig()

    where = str(source) if source is not None else "<configuration>"
    if not isinstance(section, Mapping):
        raise _error(where, "logging", "a mapping", section)

    for key in section:
        if key not in _KEYS:
            raise _error(
                where, f"logging.{key}", f"one of {', '.join(sorted(_KEYS))}", key
            )

    for name, older in _ALIASES:
        if name in section and older in section:
            raise _error(
                where, f"logging.{older}", f"only one of {name} and {older}", older
            )

    level = section.get("level", "INFO")
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise _error(where, "logging.level", f"one of {', '.join(LEVELS)}", level)

    key = "folder" if "folder" in section else "dir"
    folder = _folder(section.get(key), f"logging.{key}", where)
    max_bytes = _integer(section, "max_bytes", 10 * 1024 * 1024, 1024, where)
    key = "backup_count" if "backup_count" in section else "backups"
    backup_count = _integer(section, key, 5, 1, where)

    access_log = section.get("access_log", False)
    if not isinstance(access_log, bool):
        raise _error(where, "logging.access_log", "true or false", access_log)

    return LoggingConfig(
        level=level.upper(),
        folder=folder,
        max_bytes=max_bytes,
        backup_count=backup_count,
        access_log=access_log,
    )


def _folder(value: object, path: str, where: str) -> Path | None:
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_FOLDER
    if not isinstance(value, str) or not value:
        raise _error(where, path, "a folder path, true or false", value)
    return Path(value)


def _integer(
    section: Mapping[str, Any], key: str, default: int, minimum: int, where: str
) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _error(where, f"logging.{key}", f"an integer >= {minimum}", value)
    return value


def _error(where: str, path: str, expected: str, got: object) -> ConfigError:
    shown = repr(got)
    return ConfigError(
        f"{where}: {path}: expected {expected}, got {shown}",
        source=where,
        key_path=path,
        expected=expected,
        got=shown,
    )


def setup_logging(
    settings: LoggingConfig, stream: TextIO | None = None
) -> list[logging.Handler]:
    """Send the log to ``stream`` (standard output) and, if set, to files.

    Replaces the handlers this function installed before, so calling it
    twice (tests, a reload) does not duplicate lines. Returns the handlers
    it installed.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_calejo", False):
            root.removeHandler(handler)
            handler.close()

    formatter = _UTCFormatter(FORMAT)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(stream if stream is not None else sys.stdout)
    ]

    if settings.folder is not None:
        handlers.append(_file_handler(settings))

    for handler in handlers:
        handler.setFormatter(formatter)
        handler._calejo = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(settings.level)

    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO if settings.access_log else logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).propagate = True

    # asyncua logs every node of its standard address space and every
    # request at INFO; the OPC UA server logs what an operator needs itself.
    quiet = logging.DEBUG if settings.level == "DEBUG" else logging.WARNING
    logging.getLogger("asyncua").setLevel(quiet)

    return handlers


def _file_handler(settings: LoggingConfig) -> logging.Handler:
    """``calejo.log`` in the folder, rotated by size."""
    assert settings.folder is not None
    path = settings.folder / LOG_FILE
    try:
        settings.folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        return logging.handlers.RotatingFileHandler(
            path,
            maxBytes=settings.max_bytes,
            backupCount=settings.backup_count,
            encoding="utf-8",
        )
    except OSError as exc:
        raise ConfigError(
            f"logging.folder: expected a writable folder, got {settings.folder} "
            f"({exc.strerror or exc})",
            key_path="logging.folder",
        ) from exc
