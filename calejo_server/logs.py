"""Logging of the adapter process: standard output and rotating files.

The configuration's ``logging:`` section (every key optional)::

    logging:
      level: INFO            # DEBUG, INFO, WARNING, ERROR, CRITICAL
      dir: /var/log/calejo   # also write calejo.log here, rotated
      max_bytes: 10485760    # rotate a file when it reaches this size
      backups: 5             # rotated files kept (calejo.log.1 ... .5)
      access_log: false      # one line per HTTP request (costly under load)

Without ``dir`` the adapter logs to standard output only, which is what a
container or a systemd unit collects.
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
FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
_KEYS = frozenset({"level", "dir", "max_bytes", "backups", "access_log"})


@dataclasses.dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Where the adapter's log goes and how much of it."""

    level: str = "INFO"
    dir: Path | None = None
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
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

    level = section.get("level", "INFO")
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise _error(where, "logging.level", f"one of {', '.join(LEVELS)}", level)

    folder = section.get("dir")
    if folder is not None and (not isinstance(folder, str) or not folder):
        raise _error(where, "logging.dir", "a folder path", folder)

    max_bytes = _integer(section, "max_bytes", 10 * 1024 * 1024, 1024, where)
    backups = _integer(section, "backups", 5, 0, where)

    access_log = section.get("access_log", False)
    if not isinstance(access_log, bool):
        raise _error(where, "logging.access_log", "true or false", access_log)

    return LoggingConfig(
        level=level.upper(),
        dir=Path(folder) if folder else None,
        max_bytes=max_bytes,
        backups=backups,
        access_log=access_log,
    )


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

    if settings.dir is not None:
        try:
            settings.dir.mkdir(parents=True, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    settings.dir / LOG_FILE,
                    maxBytes=settings.max_bytes,
                    backupCount=settings.backups,
                    encoding="utf-8",
                )
            )
        except OSError as exc:
            raise ConfigError(
                f"logging.dir: expected a writable folder, got {settings.dir} "
                f"({exc.strerror or exc})",
                key_path="logging.dir",
            ) from exc

    for handler in handlers:
        handler.setFormatter(formatter)
        handler._calejo = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(settings.level)

    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO if settings.access_log else logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).propagate = True

    return handlers
