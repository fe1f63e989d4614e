"""Backups of the adapter: create, verify, restore, and retention.

An archive (:mod:`calejo_server.ops.archive`) is one of three kinds:

``database``
    a logical, backend-neutral dump of every table of the database
    (:mod:`calejo_server.ops.dump`): an archive of SQLite restores into
    PostgreSQL and the other way round
``config``
    the configuration file in use, the certificate folder (the local CA,
    the server certificates and their private keys) and the OPC UA trust
    and CRL folders; every file keeps its mode, and a restore writes the
    files and folders back with the modes they had, so private keys stay
    0600 in 0700 folders (the archive itself is 0600)
``full``
    both

Every archive is verified right after it is written: the manifest and
every digest, its database part restored into a scratch SQLite file, the
row counts compared with the manifest and the audit chain walked
(:func:`verify_archive`). A restore verifies first, then replaces the
database contents (SQLite: a new file swapped in atomically, the old kept
as ``<file>.before-restore``; PostgreSQL: one transaction) at the schema
version the archive records, and the configuration (the old kept as
``*.before-restore``). Archives from a newer schema are refused.

The ``backup:`` section of the configuration (every key optional)::

    backup:
      enabled: true          # scheduled backups inside the adapter
      folder: /var/backup/calejo
      start_delay: 60        # seconds after start before a due backup runs
      schedule:              # hourly, daily, weekly, off, or a duration
        full: daily
        database: hourly
        config: weekly
      keep:                  # how long an archive is kept (a duration)
        full: 7d
        database: 24h
        config: 4w
      max_count: 50          # most archives kept per kind; or per kind:
                             # {full: 10, database: 48, config: 8}

Durations are seconds, or a number with a unit: ``90s``, ``15m``, ``6h``,
``1d``, ``2w``. Without ``folder``, archives go to ``/var/backup/calejo``
when that folder exists and is writable, else to ``<data_dir>/backups``;
full archives in the folder itself, the others in its ``database/`` and
``config/`` folders. Pruning deletes, per kind, the archives older than
``keep`` and the oldest beyond ``max_count``, but never the newest one.
The demonstration configuration schedules no backups.

Backups, verifications, pruning and restores are recorded in the audit log
(BACKUP_CREATED, BACKUP_VERIFIED, BACKUP_VERIFICATION_FAILED,
BACKUP_FAILED, BACKUP_PRUNED, RESTORE_COMPLETED, RESTORE_FAILED) by
``cli:<login>`` or ``system``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import importlib.metadata
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from calejo_server import audit
from calejo_server.config import (
    Config,
    ConfigError,
    load_config,
    section_mapping,
    value_error,
)
from calejo_server.ops.archive import (
    FOLDER_ROLES,
    KINDS,
    MAX_CONFIG_BYTES,
    TEMP_PREFIX,
    ArchiveError,
    ArchiveReader,
    ConfigFolder,
    ConfigSection,
    Content,
    DatabaseSection,
    Kind,
    Manifest,
    Staged,
    TableEntry,
    content_of,
    digest_file,
    parse_archive_name,
    write_archive,
)
from calejo_server.ops.dump import (
    Cancelled,
    ChainCheck,
    DumpError,
    PostgresDatabase,
    PostgresLoader,
    SQLiteDatabase,
    SQLiteLoader,
    Table,
    connect_postgres,
    dump_postgres,
    dump_sqlite,
    locate,
    other_sessions,
    read_lines,
)
from calejo_server.storage.base import AuditRecord, Storage, StorageError

logger = logging.getLogger(__name__)

DEFAULT_FOLDER: Final = Path("/var/backup/calejo")
DATA_DIR_FOLDER: Final = "backups"
SUBFOLDERS: Final[dict[str, str]] = {
    "full": "",
    "database": "database",
    "config": "config",
}

DEFAULT_SCHEDULE: Final[dict[str, float | None]] = {
    "full": 86400.0,
    "database": 3600.0,
    "config": 7 * 86400.0,
}
DEFAULT_KEEP: Final[dict[str, float]] = {
    "full": 7 * 86400.0,
    "database": 86400.0,
    "config": 28 * 86400.0,
}
DEFAULT_MAX_COUNT: Final = 50
DEFAULT_START_DELAY: Final = 60.0

STALE_TEMP_SECONDS: Final = 86400.0
"""Temporary files of an interrupted backup older than this are removed."""

_NAMED: Final = {"hourly": 3600.0, "daily": 86400.0, "weekly": 7 * 86400.0}
_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_OFF: Final = ("off", "never", "none", "false", "no")
_TRUE: Final = ("true", "yes", "on")
_FALSE: Final = ("false", "no", "off")
_KEYS: Final = frozenset(
    {"enabled", "folder", "start_delay", "schedule", "keep", "max_count"}
)
MIN_INTERVAL: Final = 1.0
MAX_DURATION: Final = 10 * 366 * 86400.0

SYSTEM_USER: Final = "system"


class BackupError(Exception):
    """A backup, verification or restore could not be done; the message says why."""


# ---------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True, slots=True)
class BackupSettings:
    """The ``backup:`` section, checked (times in seconds)."""

    enabled: bool = True
    folder: Path | None = None
    start_delay: float = DEFAULT_START_DELAY
    schedule: Mapping[str, float | None] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_SCHEDULE)
    )
    keep: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_KEEP)
    )
    max_count: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(KINDS, DEFAULT_MAX_COUNT)
    )


def parse_backup_settings(config: Config) -> BackupSettings:
    """Read and check the ``backup:`` section; raises ConfigError."""
    where = str(config.source) if config.source else "<demonstration configuration>"
    section = config.raw.get("backup")
    if section is None:
        return BackupSettings()
    reader = _SettingsReader(where)
    node = reader.mapping(section, "backup", _KEYS)

    folder = node.get("folder")
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        raise reader.fail("backup.folder", "a folder path", folder)

    schedule = dict(DEFAULT_SCHEDULE)
    given = reader.mapping(node.get("schedule"), "backup.schedule", frozenset(KINDS))
    for kind, value in given.items():
        schedule[kind] = reader.interval(value, f"backup.schedule.{kind}")

    keep = dict(DEFAULT_KEEP)
    given = reader.mapping(node.get("keep"), "backup.keep", frozenset(KINDS))
    for kind, value in given.items():
        keep[kind] = reader.duration(value, f"backup.keep.{kind}", MIN_INTERVAL)

    max_count: dict[str, int] = dict.fromkeys(KINDS, DEFAULT_MAX_COUNT)
    count = node.get("max_count")
    if isinstance(count, dict):
        given = reader.mapping(count, "backup.max_count", frozenset(KINDS))
        for kind, value in given.items():
            max_count[kind] = reader.count(value, f"backup.max_count.{kind}")
    elif count is not None:
        max_count = dict.fromkeys(KINDS, reader.count(count, "backup.max_count"))

    return BackupSettings(
        enabled=reader.boolean(node.get("enabled", True), "backup.enabled"),
        folder=Path(folder) if folder is not None else None,
        start_delay=reader.duration(
            node.get("start_delay", DEFAULT_START_DELAY), "backup.start_delay", 0.0
        ),
        schedule=schedule,
        keep=keep,
        max_count=max_count,
    )


class _SettingsReader:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, expected: str, got: object) -> ConfigError:
        return value_error(self.where, path, expected, got)

    def mapping(self, node: object, path: str, keys: frozenset[str]) -> dict[str, Any]:
        return section_mapping(self.where, node, path, keys)

    def duration(self, value: object, path: str, low: float) -> float:
        expected = (
            f"a duration of at least {low:g} s: seconds, or a number with a unit "
            "(90s, 15m, 6h, 1d, 2w)"
        )
        seconds = _seconds(value)
        if seconds is None or not low <= seconds <= MAX_DURATION:
            raise self.fail(path, expected, value)
        return seconds

    def interval(self, value: object, path: str) -> float | None:
        if value is None or value is False:
            return None
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _OFF:
                return None
            if word in _NAMED:
                return _NAMED[word]
        seconds = _seconds(value)
        if seconds is None or not MIN_INTERVAL <= seconds <= MAX_DURATION:
            raise self.fail(
                path,
                "hourly, daily, weekly, off, or a duration of at least 1 s "
                "(90s, 15m, 6h, 1d, 2w)",
                value,
            )
        return seconds

    def count(self, value: object, path: str) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(path, "an integer of at least 1", value)
        return value

    def boolean(self, value: object, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE:
            return True
        if isinstance(value, str) and value.strip().lower() in _FALSE:
            return False
        raise self.fail(path, "true or false", value)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        return None
    return float(match[1]) * _UNITS.get(match[2] or "s", 1.0)


def format_duration(seconds: float) -> str:
    """``seconds`` the way an operator writes it: 90s, 15m, 6h, 7d, 4w."""
    for unit, size in (("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------
# Folders.


def backup_root(settings: BackupSettings, config: Config) -> Path:
    """The backup folder: configured, else /var/backup/calejo, else the data's."""
    if settings.folder is not None:
        return settings.folder
    if DEFAULT_FOLDER.is_dir() and os.access(DEFAULT_FOLDER, os.W_OK | os.X_OK):
        return DEFAULT_FOLDER
    return config.server.data_dir / DATA_DIR_FOLDER


def kind_folder(root: Path, kind: str) -> Path:
    """Where archives of ``kind`` go: full in the root, the others beneath."""
    sub = SUBFOLDERS[kind]
    return root / sub if sub else root


@dataclasses.dataclass(frozen=True, slots=True)
class ArchiveFile:
    """An archive found in a backup folder, by its name."""

    path: Path
    kind: Kind
    created_at: dt.datetime


def list_archives(root: Path, kind: Kind) -> list[ArchiveFile]:
    """The archives of ``kind`` in its folder, newest first."""
    folder = kind_folder(root, kind)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        parsed = parse_archive_name(entry.name)
        if (
            parsed is None
            or parsed[0] != kind
            or not entry.is_file(follow_symlinks=False)
        ):
            continue
        found.append(ArchiveFile(Path(entry.path), parsed[0], parsed[1]))
    found.sort(key=lambda a: (a.created_at, a.path.name), reverse=True)
    return found


# ---------------------------------------------------------------------------
# Retention.


@dataclasses.dataclass(frozen=True, slots=True)
class Pruned:
    """An archive deleted (or, in a dry run, to be deleted), and why."""

    path: Path
    kind: Kind
    created_at: dt.datetime
    reason: str


def prune(
    root: Path,
    settings: BackupSettings,
    *,
    now: dt.datetime | None = None,
    kinds: Sequence[Kind] = KINDS,
    dry_run: bool = False,
) -> list[Pruned]:
    """Delete, per kind, archives older than ``keep`` and beyond ``max_count``.

    The newest archive of a kind is always kept, however old. Ages come
    from the archive names (the UTC time each was created), measured at
    ``now``. Temporary files of interrupted backups whose modification time
    is more than a day old are removed as well.
    """
    moment = now if now is not None else dt.datetime.now(dt.UTC)
    pruned: list[Pruned] = []
    for kind in kinds:
        archives = list_archives(root, kind)
        keep = dt.timedelta(seconds=settings.keep[kind])
        limit = settings.max_count[kind]
        for index, archive in enumerate(archives):
            if index == 0:
                continue
            if moment - archive.created_at > keep:
                reason = f"older than {format_duration(settings.keep[kind])}"
            elif index >= limit:
                reason = f"beyond the newest {limit}"
            else:
                continue
            pruned.append(Pruned(archive.path, kind, archive.created_at, reason))
        if not dry_run:
            _remove_stale_temp(kind_folder(root, kind), time.time())

    if dry_run:
        return pruned
    done = []
    for item in pruned:
        try:
            item.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning(
                "backup: cannot prune %s: %s", item.path, exc.strerror or exc
            )
            continue
        logger.info("backup: pruned %s (%s)", item.path, item.reason)
        done.append(item)
    return done


def _remove_stale_temp(folder: Path, now: float) -> None:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.name.startswith((TEMP_PREFIX, ".calejo-staging-")):
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP_SECONDS:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            logger.info("backup: removed %s left by an interrupted backup", entry.path)


# ---------------------------------------------------------------------------
# Creating an archive.


def adapter_version() -> str:
    try:
        return importlib.metadata.version("calejo-control-adapter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def config_folders(config: Config) -> list[tuple[str, Path]]:
    """The folders a configuration backup holds, by role (see FOLDER_ROLES)."""
    from calejo_server import certs
    from calejo_server.protocols.opcua import parse_opcua_config

    options = parse_opcua_config(config)
    folders = [
        ("certificates", certs.certificate_folder(config)),
        ("opcua_trusted", options.trust_dir),
        ("opcua_crl", options.crl_dir),
    ]
    return [(role, Path(path)) for role, path in folders if path is not None]


def collect_config(config: Config) -> tuple[ConfigSection | None, list[Staged]]:
    """The configuration part: the file in use and the existing folders."""
    if config.source is None:
        return None, []
    source = Path(config.source)
    try:
        stat = source.stat()
        data = source.read_bytes()
    except OSError as exc:
        raise BackupError(
            f"cannot read the configuration file {source}: {exc.strerror or exc}"
        ) from exc
    staged = [Staged(f"config/{source.name}", data=data, mode=stat.st_mode & 0o777)]
    total = len(data)

    folders = []
    seen: set[Path] = set()
    for role, folder in config_folders(config):
        resolved = folder.resolve()
        if resolved in seen or not folder.is_dir():
            continue
        seen.add(resolved)
        folders.append(
            ConfigFolder(role, str(folder.absolute()), folder.stat().st_mode & 0o777)
        )
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            relative = path.relative_to(folder).as_posix()
            content = path.read_bytes()
            total += len(content)
            if total > MAX_CONFIG_BYTES:
                raise BackupError(
                    f"the configuration folders hold more than {MAX_CONFIG_BYTES} "
                    f"bytes (at {path}); expected certificates and trust lists"
                )
            staged.append(
                Staged(
                    f"config/{role}/{relative}",
                    data=content,
                    mode=path.stat().st_mode & 0o777,
                )
            )

    section = ConfigSection(
        file=source.name,
        source=str(source),
        mode=stat.st_mode & 0o777,
        folders=tuple(folders),
    )
    return section, staged


async def create_archive(
    kind: Kind,
    config: Config,
    folder: Path,
    *,
    created_by: str,
    cancel: threading.Event | None = None,
) -> Path:
    """Dump and write one archive of ``kind`` into ``folder``; its path."""
    created_at = dt.datetime.now(dt.UTC)
    folder = folder.absolute()
    database = locate(config.database.url, config.server.data_dir)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True, mode=0o700)

    with tempfile.TemporaryDirectory(prefix=".calejo-staging-", dir=folder) as staging:
        members: list[Staged] = []
        database_section = None
        if kind in ("full", "database"):
            database_section, parts = await _dump(database, Path(staging), cancel)
            members.extend(parts)

        config_section = None
        if kind in ("full", "config"):
            config_section, files = await asyncio.to_thread(collect_config, config)
            if config_section is None and kind == "config":
                raise BackupError(
                    "no configuration file in use (the demonstration "
                    "configuration): nothing to back up; pass --config"
                )
            members.extend(files)

        contents = await asyncio.to_thread(lambda: [content_of(m) for m in members])
        manifest = Manifest(
            kind=kind,
            created_at=created_at,
            adapter_version=adapter_version(),
            host=socket.gethostname(),
            created_by=created_by,
            backend=database.backend,
            database=database_section,
            config=config_section,
            contents=tuple(contents),
        )
        return await asyncio.to_thread(
            write_archive, folder, kind, manifest, members, cancel
        )


async def _dump(
    database: SQLiteDatabase | PostgresDatabase,
    staging: Path,
    cancel: threading.Event | None,
) -> tuple[DatabaseSection, list[Staged]]:
    if isinstance(database, SQLiteDatabase):
        dump = await asyncio.to_thread(dump_sqlite, database, staging, cancel)
    else:
        dump = await dump_postgres(database, staging, cancel)
    section = DatabaseSection(
        backend=dump.backend,
        source=dump.source,
        schema_version=dump.schema_version,
        tables=tuple(TableEntry(t.table, t.rows) for t in dump.tables),
        chain_head=dump.chain_head,
    )
    parts = [Staged(t.table.part, source=t.path) for t in dump.tables]
    return section, parts


# ---------------------------------------------------------------------------
# Verifying an archive.


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """One line of a verification."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok    ' if self.ok else 'FAILED'} {self.name}: {self.detail}"


@dataclasses.dataclass(slots=True)
class Verification:
    """The checks of one archive; ``config_files`` holds its verified config."""

    path: Path
    checks: list[Check] = dataclasses.field(default_factory=list)
    manifest: Manifest | None = None
    config_files: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def failure(self) -> Check | None:
        for check in self.checks:
            if not check.ok:
                return check
        return None


Report = Callable[[Check], None]


def verify_archive(
    path: Path,
    *,
    scratch_dir: Path | None = None,
    report: Report | None = None,
    cancel: threading.Event | None = None,
) -> Verification:
    """Check an archive completely; never raises for a bad archive.

    The manifest and every part's size and SHA-256; the database part
    restored into a scratch SQLite file (whichever backend it came from),
    its row counts against the manifest and its audit chain walked to the
    head the manifest records; the configuration file parsed as YAML.
    Each check is passed to ``report`` as it completes. Runs on the
    calling thread.
    """
    result = Verification(Path(path).absolute())

    def add(name: str, ok: bool, detail: str) -> None:
        check = Check(name, ok, detail)
        result.checks.append(check)
        if report is not None:
            report(check)

    try:
        with (
            ArchiveReader(result.path) as archive,
            tempfile.TemporaryDirectory(
                prefix="calejo-verify-", dir=scratch_dir
            ) as scratch,
        ):
            manifest = archive.manifest
            result.manifest = manifest
            add("manifest", True, describe(manifest))
            loader = None
            if manifest.database is not None:
                loader = SQLiteLoader(
                    Path(scratch) / "scratch.db",
                    manifest.database.schema_version,
                    [entry.table for entry in manifest.database.tables],
                )
            try:
                for part in archive.parts():
                    _verify_part(part, manifest, loader, result, add, cancel)
                if loader is not None and manifest.database is not None:
                    for check in loaded_checks(
                        manifest.database, loader.count, loader.chain()
                    ):
                        add(check.name, check.ok, check.detail)
            finally:
                if loader is not None:
                    loader.close()
    except ArchiveError as exc:
        add(exc.part, False, exc.reason)
    except DumpError as exc:
        name, _, detail = str(exc).partition(": ")
        add(name if detail else "database", False, detail or str(exc))
    except OSError as exc:
        add("scratch", False, f"cannot restore into a scratch database: {exc}")
    return result


def _verify_part(
    part: Any,
    manifest: Manifest,
    loader: SQLiteLoader | None,
    result: Verification,
    add: Callable[[str, bool, str], None],
    cancel: threading.Event | None,
) -> None:
    if part.path.startswith("database/"):
        assert loader is not None and manifest.database is not None
        entry = manifest.database.table(part.path)
        assert entry is not None
        rows = _load_checked(
            part, lambda lines: loader.load(entry.table, lines, cancel)
        )
        add(part.path, True, f"sha256 ok, {part.content.size} bytes, {rows} rows")
        return

    data = part.read(MAX_CONFIG_BYTES)
    result.config_files[part.path] = data
    detail = f"sha256 ok, {len(data)} bytes"
    config = manifest.config
    if config is not None and part.path == config.file_part:
        try:
            document = yaml.safe_load(data.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ArchiveError(part.path, f"not a readable YAML file ({exc})") from exc
        if document is not None and not isinstance(document, dict):
            raise ArchiveError(part.path, "expected a YAML mapping of sections")
        detail += f", a YAML mapping of {len(document or {})} sections"
    add(part.path, True, detail)


def _load_checked(part: Any, load: Callable[[Iterator[bytes]], int]) -> int:
    """Load a part; when loading fails, a digest mismatch is the better error."""
    try:
        rows = load(read_lines(part.chunks(), part.path))
    except DumpError:
        part.finish()
        raise
    part.finish()
    return rows


def loaded_checks(
    database: DatabaseSection, count: Callable[[str], int], chain: ChainCheck
) -> list[Check]:
    """Row counts and the audit chain of a loaded database, against the manifest."""
    checks = []
    wrong = []
    for entry in database.tables:
        held = count(entry.table.name)
        if held != entry.rows:
            wrong.append(
                Check(
                    entry.table.part,
                    False,
                    f"table {entry.table.name} holds {held} rows after loading, "
                    f"the manifest lists {entry.rows}",
                )
            )
    checks.extend(wrong)
    if not wrong:
        checks.append(
            Check(
                "rows",
                True,
                f"{len(database.tables)} tables, {database.rows} rows, as the "
                "manifest lists",
            )
        )

    verdict = chain.verdict
    if not verdict.ok:
        checks.append(
            Check(
                "audit chain",
                False,
                f"broken at row {verdict.first_bad_id}: {verdict.reason}",
            )
        )
    elif chain.head != database.chain_head:
        checks.append(
            Check(
                "audit chain",
                False,
                f"the chain ends at row {chain.head[0]} ({chain.head[1][:16]}...), "
                f"the manifest records row {database.chain_head[0]} "
                f"({database.chain_head[1][:16]}...)",
            )
        )
    else:
        checks.append(
            Check(
                "audit chain",
                True,
                f"{verdict.checked} rows verified, head row {chain.head[0]} "
                f"{chain.head[1][:16]}...",
            )
        )
    return checks


def describe(manifest: Manifest) -> str:
    """One line about an archive, for operators."""
    text = (
        f"{manifest.kind} backup, format 1, created "
        f"{manifest.created_at.isoformat(timespec='seconds')} by "
        f"{manifest.created_by} on {manifest.host} (adapter "
        f"{manifest.adapter_version})"
    )
    if manifest.database is not None:
        db = manifest.database
        text += (
            f"; database {db.backend} schema {db.schema_version}, "
            f"{len(db.tables)} tables, {db.rows} rows"
        )
    if manifest.config is not None:
        text += f"; config {manifest.config.file or 'folders only'}"
        if manifest.config.folders:
            text += " with " + ", ".join(f.role for f in manifest.config.folders)
    return text


# ---------------------------------------------------------------------------
# Restoring.


@dataclasses.dataclass(frozen=True, slots=True)
class RestorePlan:
    """What a restore will replace, for the confirmation and the audit log."""

    kind: Kind
    database: SQLiteDatabase | PostgresDatabase | None
    config_file: Path | None
    folders: tuple[tuple[ConfigFolder, Path], ...]

    def lines(self) -> list[str]:
        lines = []
        if self.database is not None:
            lines.append(f"database: replace every table of {self.database.where()}")
        if self.config_file is not None:
            lines.append(f"config: replace {self.config_file}")
        for folder, target in self.folders:
            lines.append(f"config: replace folder {target} ({folder.role})")
        return lines


def restore_parts(kind: Kind) -> tuple[bool, bool]:
    """Whether a restore of ``kind`` touches (the database, the config)."""
    return kind in ("full", "database"), kind in ("full", "config")


def plan_restore(
    kind: Kind, manifest: Manifest, verification: Verification, config: Config
) -> RestorePlan:
    """Check that the archive holds what ``kind`` restores; where it goes."""
    wants_database, wants_config = restore_parts(kind)
    if kind == "full" and manifest.kind != "full":
        raise BackupError(
            f"restore full: expected a full archive, got a {manifest.kind} archive; "
            f"use restore {manifest.kind}"
        )
    if wants_database and manifest.database is None:
        raise BackupError(
            f"restore database: the archive ({manifest.kind}) holds no database part"
        )
    if wants_config and kind == "config" and manifest.config is None:
        raise BackupError(
            f"restore config: the archive ({manifest.kind}) holds no config part"
        )

    database = None
    if wants_database:
        database = locate(config.database.url, config.server.data_dir)

    config_file: Path | None = None
    folders: tuple[tuple[ConfigFolder, Path], ...] = ()
    section = manifest.config
    if wants_config and section is not None:
        if section.file is not None:
            if config.source is not None:
                config_file = Path(config.source)
            elif section.source is not None:
                config_file = Path(section.source)
            else:
                raise BackupError(
                    "restore config: no configuration file in use and none recorded "
                    "in the archive; pass --config FILE to say where it goes"
                )
        folders = _folder_targets(section, verification, config_file, config)
    return RestorePlan(kind, database, config_file, folders)


def _folder_targets(
    section: ConfigSection,
    verification: Verification,
    config_file: Path | None,
    config: Config,
) -> tuple[tuple[ConfigFolder, Path], ...]:
    """Where each folder goes: as the restored configuration names it here."""
    if not section.folders:
        return ()
    restored = config
    file_part = section.file_part
    if file_part is not None and config_file is not None:
        data = verification.config_files[file_part]
        with tempfile.TemporaryDirectory(prefix="calejo-restore-") as scratch:
            probe = Path(scratch) / (config_file.name or "calejo.yaml")
            probe.write_bytes(data)
            try:
                restored = load_config(probe)
            except ConfigError as exc:
                raise BackupError(
                    f"restore config: the archived configuration does not load "
                    f"here ({exc}); set the variables it needs and try again"
                ) from exc
    targets = dict(config_folders(restored))
    return tuple(
        (folder, targets[folder.role])
        for folder in section.folders
        if folder.role in targets
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreResult:
    plan: RestorePlan
    rows: int
    kept: tuple[Path, ...]


async def restore_archive(
    path: Path,
    plan: RestorePlan,
    verification: Verification,
    *,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Replace the database and/or configuration with the archive's.

    ``verification`` must be a passing :func:`verify_archive` of ``path``;
    the archive is read again and every digest checked again while the
    database is loaded, which only takes effect (a commit, a file swap)
    once all of them matched.
    """
    manifest = verification.manifest
    assert manifest is not None and verification.ok
    kept: list[Path] = []
    rows = 0

    if plan.database is not None:
        assert manifest.database is not None
        if isinstance(plan.database, SQLiteDatabase):
            previous = await asyncio.to_thread(
                _restore_sqlite, path, plan.database, manifest, cancel
            )
            if previous is not None:
                kept.append(previous)
        else:
            await _restore_postgres(path, plan.database, manifest, cancel)
        rows = manifest.database.rows

    if plan.config_file is not None or plan.folders:
        kept.extend(await asyncio.to_thread(_restore_config, plan, verification))
    return RestoreResult(plan, rows, tuple(kept))


def _same_manifest(archive: ArchiveReader, manifest: Manifest) -> None:
    if archive.manifest.to_json() != manifest.to_json():
        raise ArchiveError(
            "manifest.json", "changed since it was verified; verify and restore again"
        )


def _restore_sqlite(
    path: Path,
    database: SQLiteDatabase,
    manifest: Manifest,
    cancel: threading.Event | None,
) -> Path | None:
    assert manifest.database is not None
    section = manifest.database
    target = database.path
    target.parent.mkdir(parents=True, exist_ok=True)
    new = target.with_name(f"{target.name}.restore-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        new.unlink()

    loader = SQLiteLoader(
        new, section.schema_version, [entry.table for entry in section.tables]
    )
    try:
        with ArchiveReader(path) as archive:
            _same_manifest(archive, manifest)
            for part in archive.parts():
                entry = section.table(part.path)
                if entry is None:
                    part.finish()
                    continue
                _load_checked(
                    part, functools.partial(_load_sqlite, loader, entry.table, cancel)
                )
        _raise_failed(loaded_checks(section, loader.count, loader.chain()))
        loader.commit()
        return swap_sqlite(new, target)
    except BaseException:
        loader.close()
        with contextlib.suppress(FileNotFoundError):
            new.unlink()
        raise


def _load_sqlite(
    loader: SQLiteLoader,
    table: Table,
    cancel: threading.Event | None,
    lines: Iterator[bytes],
) -> int:
    return loader.load(table, lines, cancel)


def _raise_failed(checks: Sequence[Check]) -> None:
    for check in checks:
        if not check.ok:
            raise BackupError(f"{check.name}: {check.detail}")


def swap_sqlite(new: Path, target: Path) -> Path | None:
    """Put ``new`` in place of ``target`` atomically; the old is kept.

    The old database is checkpointed first so that it is whole in its
    own file (no -wal beside it), then kept as ``<name>.before-restore``.
    Returns that path, or None when there was no old database.
    """
    before = target.with_name(f"{target.name}.before-restore")
    previous = None
    if target.exists():
        _checkpoint(target)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                before.with_name(before.name + suffix).unlink()
        link = target.with_name(f"{target.name}.before-restore-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.link(target, link)
        os.replace(link, before)
        previous = before
    os.replace(new, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return previous


def _checkpoint(path: Path) -> None:
    import sqlite3

    try:
        con = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    except sqlite3.Error as exc:
        logger.warning("restore: %s could not be checkpointed: %s", path, exc)
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise BackupError(
            f"{path}: its write-ahead log {wal.name} could not be folded in; is "
            "another process still using the database?"
        )
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


async def _restore_postgres(
    path: Path,
    database: PostgresDatabase,
    manifest: Manifest,
    cancel: threading.Event | None,
) -> None:
    assert manifest.database is not None
    section = manifest.database
    conn = await connect_postgres(database, create=True)
    try:
        sessions = await other_sessions(conn)
        if sessions:
            raise BackupError(
                f"{database.where()}: {len(sessions)} other session(s) use the "
                f"database ({'; '.join(sessions[:5])}); stop every adapter and "
                "client on it before restoring"
            )
        async with conn.transaction():
            loader = PostgresLoader(
                conn,
                database,
                section.schema_version,
                [entry.table for entry in section.tables],
            )
            await loader.begin()
            with ArchiveReader(path) as archive:
                _same_manifest(archive, manifest)
                for part in archive.parts():
                    entry = section.table(part.path)
                    if entry is None:
                        part.finish()
                        continue
                    await _load_checked_async(part, loader, entry.table, cancel)
            await loader.end()
            counts = {
                entry.table.name: await loader.count(entry.table.name)
                for entry in section.tables
            }
            _raise_failed(
                loaded_checks(section, counts.__getitem__, await loader.chain())
            )
    finally:
        await conn.close()


async def _load_checked_async(
    part: Any, loader: PostgresLoader, table: Table, cancel: threading.Event | None
) -> int:
    try:
        rows = await loader.load(table, read_lines(part.chunks(), part.path), cancel)
    except DumpError:
        part.finish()
        raise
    part.finish()
    return rows


def _restore_config(plan: RestorePlan, verification: Verification) -> list[Path]:
    manifest = verification.manifest
    assert manifest is not None and manifest.config is not None
    section = manifest.config
    kept = []

    if plan.config_file is not None and section.file_part is not None:
        data = verification.config_files[section.file_part]
        previous = _replace_file(plan.config_file, data, section.mode)
        if previous is not None:
            kept.append(previous)

    for folder, target in plan.folders:
        prefix = f"config/{folder.role}/"
        files = [
            (name[len(prefix) :], data, _mode_of(manifest, name))
            for name, data in verification.config_files.items()
            if name.startswith(prefix)
        ]
        previous = _replace_folder(target, files, folder.mode)
        if previous is not None:
            kept.append(previous)
    return kept


def _mode_of(manifest: Manifest, path: str) -> int:
    content: Content | None = manifest.content(path)
    return content.mode if content is not None else 0o600


def _replace_file(target: Path, data: bytes, mode: int) -> Path | None:
    """Write ``target`` atomically; keep the old one as ``*.before-restore``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        previous = None
        if target.exists():
            previous = target.with_name(f"{target.name}.before-restore")
            shutil.copy2(target, previous)
        os.replace(temp, target)
        return previous
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _replace_folder(
    target: Path, files: Sequence[tuple[str, bytes, int]], mode: int
) -> Path | None:
    """Build the folder beside ``target``, then swap it in; keep the old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    new = target.with_name(f".{target.name}.restore-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(mode=0o700)
    try:
        for relative, data, file_mode in files:
            path = new / relative
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                os.fchmod(file.fileno(), file_mode)
                os.fsync(file.fileno())
        os.chmod(new, mode)

        previous = None
        if target.exists():
            previous = target.with_name(f"{target.name}.before-restore")
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(target, previous)
        os.rename(new, target)
        return previous
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def set_spool_aside(config: Config, backend: str) -> Path | None:
    """Move the spool of ``backend`` aside: its records belong to the old data."""
    spool = config.server.data_dir / "spool" / f"{backend}.jsonl"
    try:
        if spool.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    aside = spool.with_name(f"{spool.name}.before-restore")
    os.replace(spool, aside)
    logger.warning(
        "restore: records spooled for the replaced database kept in %s", aside
    )
    return aside


# ---------------------------------------------------------------------------
# A backup from start to end: create, verify, record, prune.


@dataclasses.dataclass(frozen=True, slots=True)
class BackupOutcome:
    path: Path
    manifest: Manifest
    verification: Verification
    sha256: str
    size: int
    pruned: tuple[Pruned, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Actor:
    """Who makes an audited change: ``cli:<login>`` over CLI, or the system."""

    user: str
    protocol: str


SYSTEM: Final = Actor(SYSTEM_USER, "SYSTEM")


def audit_record(event: str, actor: Actor, details: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(
        event_type=event,
        severity=audit.severity_of(event),
        user=actor.user,
        protocol=actor.protocol,
        details=dict(details),
    )


async def record(storage: Storage | None, records: Sequence[AuditRecord]) -> None:
    """Write audit records; BackupError when the storage refuses them."""
    if storage is None or not records:
        return
    try:
        await storage.write(records)
    except StorageError as exc:
        raise BackupError(f"the audit log could not record it: {exc}") from exc


async def run_backup(
    kind: Kind,
    config: Config,
    storage: Storage | None,
    folder: Path,
    *,
    actor: Actor,
    prune_with: tuple[Path, BackupSettings] | None = None,
    cancel: threading.Event | None = None,
    report: Report | None = None,
) -> BackupOutcome:
    """Create, verify, record and (with ``prune_with``) prune one backup.

    A backup that cannot be written or fails verification is recorded as
    BACKUP_FAILED (the failed archive is deleted) and raises BackupError.
    """
    started = time.monotonic()
    try:
        path = await create_archive(
            kind, config, folder, created_by=actor.user, cancel=cancel
        )
    except Cancelled:
        raise
    except (BackupError, DumpError, ArchiveError, OSError, ConfigError) as exc:
        reason = str(exc) or type(exc).__name__
        await _record_failure(storage, actor, kind, folder, "create", reason)
        raise BackupError(f"{kind} backup into {folder} failed: {reason}") from exc

    try:
        verification = await asyncio.to_thread(
            verify_archive, path, report=report, cancel=cancel
        )
    except BaseException:
        # Stopped before it was verified: an unverified archive is not kept.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    if not verification.ok:
        failure = verification.failure
        reason = f"{failure.name}: {failure.detail}" if failure else "no checks ran"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await _record_failure(storage, actor, kind, folder, "verify", reason)
        raise BackupError(f"{kind} backup {path.name} failed verification: {reason}")

    sha256, size = await asyncio.to_thread(digest_file, path)
    manifest = verification.manifest
    assert manifest is not None
    details = _archive_details(path, manifest, sha256, size)
    details["seconds"] = round(time.monotonic() - started, 3)
    records = [
        audit_record(audit.BACKUP_CREATED, actor, details),
        audit_record(
            audit.BACKUP_VERIFIED,
            actor,
            {
                "archive": str(path),
                "sha256": sha256,
                "checks": len(verification.checks),
            },
        ),
    ]

    pruned: list[Pruned] = []
    if prune_with is not None:
        root, settings = prune_with
        pruned = await asyncio.to_thread(prune, root, settings, kinds=(kind,))
        if pruned:
            records.append(
                audit_record(
                    audit.BACKUP_PRUNED,
                    actor,
                    {
                        "kind": kind,
                        "archives": [str(p.path) for p in pruned],
                        "reasons": [p.reason for p in pruned],
                    },
                )
            )
    logger.info(
        "backup: %s archive %s written and verified (%d bytes, %.1f s)",
        kind,
        path,
        size,
        time.monotonic() - started,
    )
    await record(storage, records)
    return BackupOutcome(path, manifest, verification, sha256, size, tuple(pruned))


def _archive_details(
    path: Path, manifest: Manifest, sha256: str, size: int
) -> dict[str, Any]:
    details: dict[str, Any] = {
        "kind": manifest.kind,
        "archive": str(path),
        "sha256": sha256,
        "size": size,
        "created_at": manifest.created_at.isoformat(),
        "backend": manifest.backend,
    }
    if manifest.database is not None:
        details["schema_version"] = manifest.database.schema_version
        details["tables"] = len(manifest.database.tables)
        details["rows"] = manifest.database.rows
        details["audit_chain_head"] = manifest.database.chain_head[0]
    if manifest.config is not None:
        details["config_file"] = manifest.config.source
    return details


async def _record_failure(
    storage: Storage | None,
    actor: Actor,
    kind: Kind,
    folder: Path,
    stage: str,
    reason: str,
) -> None:
    try:
        await record(
            storage,
            [
                audit_record(
                    audit.BACKUP_FAILED,
                    actor,
                    {
                        "kind": kind,
                        "folder": str(folder),
                        "stage": stage,
                        "error": reason,
                    },
                )
            ],
        )
    except BackupError as exc:
        logger.error("backup: the failure could not be recorded: %s", exc)


def verification_record(verification: Verification, actor: Actor) -> AuditRecord:
    """BACKUP_VERIFIED or BACKUP_VERIFICATION_FAILED for a verification."""
    details: dict[str, Any] = {
        "archive": str(verification.path),
        "checks": len(verification.checks),
    }
    if verification.manifest is not None:
        details["kind"] = verification.manifest.kind
        details["created_at"] = verification.manifest.created_at.isoformat()
    failure = verification.failure
    if failure is None:
        return audit_record(audit.BACKUP_VERIFIED, actor, details)
    details["part"] = failure.name
    details["error"] = failure.detail
    return audit_record(audit.BACKUP_VERIFICATION_FAILED, actor, details)


def restore_record(
    result: RestoreResult, verification: Verification, actor: Actor
) -> AuditRecord:
    """RESTORE_COMPLETED for a restore."""
    manifest = verification.manifest
    assert manifest is not None
    plan = result.plan
    details: dict[str, Any] = {
        "kind": plan.kind,
        "archive": str(verification.path),
        "archive_kind": manifest.kind,
        "created_at": manifest.created_at.isoformat(),
        "kept": [str(p) for p in result.kept],
    }
    if plan.database is not None and manifest.database is not None:
        details["database"] = plan.database.where()
        details["source"] = manifest.database.source
        details["schema_version"] = manifest.database.schema_version
        details["rows"] = result.rows
        details["audit_chain_head"] = manifest.database.chain_head[0]
    if plan.config_file is not None:
        details["config_file"] = str(plan.config_file)
    if plan.folders:
        details["folders"] = {folder.role: str(t) for folder, t in plan.folders}
    return audit_record(audit.RESTORE_COMPLETED, actor, details)


__all__ = [
    "FOLDER_ROLES",
    "Actor",
    "BackupError",
    "BackupOutcome",
    "BackupSettings",
    "Check",
    "Pruned",
    "RestorePlan",
    "RestoreResult",
    "Verification",
    "backup_root",
    "kind_folder",
    "list_archives",
    "parse_backup_settings",
    "plan_restore",
    "prune",
    "restore_archive",
    "run_backup",
    "verify_archive",
]
