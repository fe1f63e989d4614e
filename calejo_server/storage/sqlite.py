"""The embedded SQLite backend: one file, WAL, durable on commit.

Writing uses one connection. A group of a few records (the common case: a
setpoint with its audit row) is committed on the event loop itself, which
costs less than handing it to a thread and taking the GIL back; a larger
group, a delivery from the spool, and a commit that finds the database
locked by another process go to the writer thread, which may wait. Either
way the commit only writes the WAL (``synchronous=NORMAL``) and the
callers are answered after an ``fdatasync`` of the WAL file: what is
acknowledged is on disk, as with ``synchronous=FULL``. The sync runs on
a thread of the core's :class:`~calejo_core.filesync.FileSyncer` that
never takes the GIL, so the loop goes on serving while the disk syncs and
hears of the outcome through an eventfd. Every so many commits the sync
thread checkpoints the WAL into the database file, on a connection of its
own, before the next commit starts (automatic checkpoints, which would
run inside a commit on the loop, are off). Reading happens on a third
thread with its own connection, so reads do not wait for writes. Times
are stored as ISO 8601 UTC text with microseconds, JSON documents as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import functools
import itertools
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from calejo_core.filesync import FileSyncer
from calejo_server import audit
from calejo_server.storage.base import (
    AlertQuery,
    AlertRecord,
    AlertRow,
    AuditQuery,
    AuditRecord,
    AuditRow,
    ChainVerdict,
    EmergencyStopRecord,
    PlanRecord,
    Record,
    RoleRecord,
    SetpointRecord,
    Snapshot,
    StationRecord,
    StationStateRecord,
    StorageError,
    TokenRecord,
    UserRecord,
    utcnow,
)
from calejo_server.storage.durable import (
    BatchRejected,
    DurableStorage,
    Unavailable,
    check_schema_version,
    emergency_stop_scope,
    load_migrations,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

PAGE_ROWS = 1000
"""Audit rows read per step by audit_iter."""

MAX_QUERY_ROWS = 10_000
"""Most rows one audit_query returns."""

LOOP_COMMIT_RECORDS = 64
"""Most records a commit on the event loop carries; more go to the writer
thread (a batch of a thousand setpoints would hold the loop for ms)."""

CHECKPOINT_COMMITS = 200
"""Commits after which the sync thread checkpoints the WAL."""

CHECKPOINT_SECONDS = 1.0
"""Seconds after which it checkpoints all the same."""

MAX_ROWS_PER_INSERT = 32
"""Most rows one multi-row INSERT carries (an audit row has 16 parameters)."""

_AUDIT_COLUMNS = (
    "id, uid, timestamp, severity, event_type, user_name, source_address, "
    "protocol, station_id, pump_id, old_value, new_value, outcome, details, "
    "prev_hash, hash"
)

_INSERT_AUDIT = (
    f"INSERT INTO compliance_audit_log ({_AUDIT_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_UPSERTS: dict[type[Any], str] = {
    SetpointRecord: (
        "INSERT INTO setpoints (station_id, pump_id, requested, target, applied, "
        "outcome, source, user_name, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (station_id, pump_id) DO UPDATE SET "
        "requested = excluded.requested, target = excluded.target, "
        "applied = excluded.applied, outcome = excluded.outcome, "
        "source = excluded.source, user_name = excluded.user_name, at = excluded.at"
    ),
    PlanRecord: (
        "INSERT INTO plans (plan_id, version, received_at, body, user_name) "
        "VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (plan_id) DO UPDATE SET version = excluded.version, "
        "received_at = excluded.received_at, body = excluded.body, "
        "user_name = excluded.user_name WHERE excluded.version >= plans.version"
    ),
    EmergencyStopRecord: (
        "INSERT INTO emergency_stops (level, scope, station_id, pump_id, active, "
        "reason, operator, at, since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (level, scope) DO UPDATE SET station_id = excluded.station_id, "
        "pump_id = excluded.pump_id, active = excluded.active, "
        "reason = excluded.reason, operator = excluded.operator, "
        "at = excluded.at, since = excluded.since"
    ),
    StationStateRecord: (
        "INSERT INTO station_states (station_id, last_fresh_at, failsafe) "
        "VALUES (?, ?, ?) ON CONFLICT (station_id) DO UPDATE SET "
        "last_fresh_at = excluded.last_fresh_at, failsafe = excluded.failsafe"
    ),
    StationRecord: (
        "INSERT INTO stations (station_id, definition) VALUES (?, ?) "
        "ON CONFLICT (station_id) DO UPDATE SET definition = excluded.definition"
    ),
    UserRecord: (
        "INSERT INTO users (user_id, username, email, role, password_hash, active, "
        "must_change_password, failed_logins, locked_until, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (user_id) DO UPDATE SET username = excluded.username, "
        "email = excluded.email, role = excluded.role, "
        "password_hash = excluded.password_hash, active = excluded.active, "
        "must_change_password = excluded.must_change_password, "
        "failed_logins = excluded.failed_logins, "
        "locked_until = excluded.locked_until, created_at = excluded.created_at, "
        "updated_at = excluded.updated_at"
    ),
    RoleRecord: (
        "INSERT INTO roles (role, permissions) VALUES (?, ?) "
        "ON CONFLICT (role) DO UPDATE SET permissions = excluded.permissions"
    ),
    TokenRecord: (
        "INSERT INTO tokens (token_hash, user_id, created_at, expires_at, revoked) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO UPDATE SET "
        "user_id = excluded.user_id, created_at = excluded.created_at, "
        "expires_at = excluded.expires_at, revoked = excluded.revoked"
    ),
    AlertRecord: (
        "INSERT INTO alerts (alert_id, kind, severity, summary, station_id, "
        "pump_id, first_raised, last_raised, repeat_count, details, deliveries) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (alert_id) DO UPDATE SET kind = excluded.kind, "
        "severity = excluded.severity, summary = excluded.summary, "
        "station_id = excluded.station_id, pump_id = excluded.pump_id, "
        "first_raised = excluded.first_raised, last_raised = excluded.last_raised, "
        "repeat_count = excluded.repeat_count, details = excluded.details, "
        "deliveries = excluded.deliveries"
    ),
}

_REPLACED: dict[type[Any], Callable[[Any], Any]] = {
    SetpointRecord: lambda record: (record.station_id, record.pump_id),
    StationStateRecord: lambda record: record.station_id,
}
"""Records whose upsert replaces every column of their row: of several in
one transaction only the last is written, which leaves the same row."""

_ALERT_COLUMNS = (
    "seq, alert_id, kind, severity, summary, station_id, pump_id, first_raised, "
    "last_raised, repeat_count, details, deliveries"
)

_REJECTED_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    ValueError,
    TypeError,
    OverflowError,
)


def _text_time(moment: dt.datetime) -> str:
    """``moment`` as stored: ISO 8601 with microseconds.

    The records of one change share one time (a setpoint's audit row,
    setpoint and station state), and a commit carries a few changes: the
    texts of recent UTC times are kept (dict operations are atomic, so any
    thread may ask).
    """
    if moment.tzinfo is not dt.UTC:
        return moment.isoformat(timespec="microseconds")
    text = _TIME_TEXTS.get(moment)
    if text is None:
        if len(_TIME_TEXTS) >= MAX_TIME_TEXTS:
            _TIME_TEXTS.clear()
        text = _TIME_TEXTS[moment] = moment.isoformat(timespec="microseconds")
    return text


MAX_TIME_TEXTS = 256
_TIME_TEXTS: dict[dt.datetime, str] = {}


def _text_time_or_none(moment: dt.datetime | None) -> str | None:
    return None if moment is None else _text_time(moment)


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _time_or_none(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


_JSON_TEXT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _json_text(value: object) -> str:
    """A JSON document as stored (read back with json.loads). orjson writes
    what the records hold once they are JSON-safe; the standard library
    takes what it refuses (integers over 64 bits, keys that are not text)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _JSON_TEXT.encode(value)


def _state_row(record: Record) -> tuple[Any, ...]:
    """The upsert parameters of one state record."""
    if isinstance(record, SetpointRecord):
        return (
            record.station_id,
            record.pump_id,
            record.requested,
            record.target,
            record.applied,
            record.outcome,
            record.source,
            record.user,
            _text_time(record.at),
        )
    if isinstance(record, StationStateRecord):
        return (
            record.station_id,
            _text_time_or_none(record.last_fresh_at),
            int(record.failsafe),
        )
    if isinstance(record, EmergencyStopRecord):
        return (
            record.level,
            emergency_stop_scope(record),
            record.station_id,
            record.pump_id,
            int(record.active),
            record.reason,
            record.operator,
            _text_time(record.at),
            _text_time_or_none(record.since),
        )
    if isinstance(record, PlanRecord):
        return (
            record.plan_id,
            record.version,
            _text_time(record.received_at),
            _json_text(record.body),
            record.user,
        )
    if isinstance(record, StationRecord):
        return (record.station_id, _json_text(record.definition))
    if isinstance(record, UserRecord):
        return (
            record.user_id,
            record.username,
            record.email,
            record.role,
            record.password_hash,
            int(record.active),
            int(record.must_change_password),
            record.failed_logins,
            _text_time_or_none(record.locked_until),
            _text_time(record.created_at),
            _text_time(record.updated_at),
        )
    if isinstance(record, RoleRecord):
        return (record.role, _json_text(list(record.permissions)))
    if isinstance(record, TokenRecord):
        return (
            record.token_hash,
            record.user_id,
            _text_time(record.created_at),
            _text_time(record.expires_at),
            int(record.revoked),
        )
    if isinstance(record, AlertRecord):
        return (
            record.alert_id,
            record.kind,
            record.severity,
            record.summary,
            record.station_id,
            record.pump_id,
            _text_time(record.first_raised),
            _text_time(record.last_raised),
            record.repeat_count,
            _json_text(record.details),
            _json_text(record.deliveries),
        )
    raise TypeError(f"expected a state record, got {type(record).__name__}")


def _audit_row(row: Sequence[Any]) -> AuditRow:
    record = AuditRecord(
        uid=row[1],
        timestamp=_time(row[2]),
        severity=row[3],
        event_type=row[4],
        user=row[5],
        source_address=row[6],
        protocol=row[7],
        station_id=row[8],
        pump_id=row[9],
        old_value=row[10],
        new_value=row[11],
        outcome=row[12],
        details=json.loads(row[13]),
    )
    return AuditRow(id=row[0], record=record, prev_hash=row[14], hash=row[15])


def _alert_row(row: Sequence[Any]) -> AlertRow:
    record = AlertRecord(
        alert_id=row[1],
        kind=row[2],
        severity=row[3],
        summary=row[4],
        station_id=row[5],
        pump_id=row[6],
        first_raised=_time(row[7]),
        last_raised=_time(row[8]),
        repeat_count=row[9],
        details=json.loads(row[10]),
        deliveries=json.loads(row[11]),
    )
    return AlertRow(seq=row[0], record=record)


def _insert_many(
    con: sqlite3.Connection, insert: str, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Run ``insert`` (one ``VALUES (?, ...)`` row) for ``rows``, many per statement.

    One statement of up to :data:`MAX_ROWS_PER_INSERT` rows is one step of
    SQLite, and the thread holds the GIL between steps: executemany()
    gives it up and waits to retake it once per row, behind the event
    loop, where this gives it up once per statement. The rows are taken in
    order, as executemany() takes them.
    """
    for start in range(0, len(rows), MAX_ROWS_PER_INSERT):
        part = rows[start : start + MAX_ROWS_PER_INSERT]
        if len(part) == 1:
            con.execute(insert, part[0])
            continue
        con.execute(_many_rows(insert, len(part)), list(itertools.chain(*part)))


@functools.lru_cache(maxsize=128)
def _many_rows(insert: str, count: int) -> str:
    """``insert`` with ``count`` rows in its VALUES clause."""
    head, found, rest = insert.partition("VALUES (")
    row, closed, tail = rest.partition(")")
    if not found or not closed:
        raise ValueError(f"expected an INSERT with one VALUES row, got {insert!r}")
    return f"{head}VALUES " + ", ".join([f"({row})"] * count) + tail


def split_script(script: str) -> list[str]:
    """The statements of an SQL script (triggers with their inner ``;`` whole)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements


class SQLiteStorage(DurableStorage):
    """Storage in one SQLite file; see the module."""

    backend = "sqlite"

    def __init__(
        self,
        path: Path,
        data_dir: Path,
        *,
        busy_timeout: float = 5.0,
        retry_first: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        super().__init__(data_dir, retry_first=retry_first, retry_max=retry_max)
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="calejo-sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="calejo-sqlite-reader")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="calejo-sqlite-sync")
        self._wcon: sqlite3.Connection | None = None
        self._rcon: sqlite3.Connection | None = None
        self._ccon: sqlite3.Connection | None = None
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        self._wal_syncer: FileSyncer | None = None
        self._wal_sync: asyncio.Future[int] | None = None
        self._unchecked = 0
        self._checked_at = 0.0

    def where(self) -> str:
        return f"sqlite at {self.path}"

    # -- connections (each used only on its own thread)

    async def _connect(self) -> None:
        try:
            await self._in_writer(self._connect_writer)
            await self._in_reader(self._connect_reader)
            self._start_wal_syncer()
        except sqlite3.Error as exc:
            raise StorageError(
                f"{self.where()}: cannot open the database ({exc})"
            ) from exc
        except OSError as exc:
            raise StorageError(
                f"{self.where()}: cannot create the file ({exc})"
            ) from exc

    async def _disconnect(self) -> None:
        self._stop_wal_syncer()
        pairs = (
            (self._syncer, "_ccon"),
            (self._writer, "_wcon"),
            (self._reader, "_rcon"),
        )
        for executor, name in pairs:
            # RuntimeError: the executor was shut down by an earlier call.
            with contextlib.suppress(RuntimeError):
                await asyncio.get_running_loop().run_in_executor(
                    executor, self._close_connection, name
                )
            executor.shutdown(wait=True)

    def _close_connection(self, name: str) -> None:
        con = getattr(self, name)
        setattr(self, name, None)
        if con is None:
            return
        try:
            con.close()
        except sqlite3.Error as exc:
            logger.warning("%s: closing a connection failed: %s", self.where(), exc)

    def _open_connection(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        con = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(
                    f"{self.where()}: expected journal mode wal, got {mode!r}"
                )
            con.execute("PRAGMA synchronous = FULL")
            # Statement journals and sorts in memory: a multi-row insert
            # would otherwise create and delete a file in /var/tmp.
            con.execute("PRAGMA temp_store = MEMORY")
        except BaseException:
            con.close()
            raise
        return con

    def _connect_writer(self) -> None:
        con = self._open_connection()
        try:
            self._migrate(con)
            self._prune_tokens(con)
            # From here on a commit writes the WAL only and _sync_wal makes
            # it durable; checkpoints are the sync thread's, and a locked
            # database is never waited for on the event loop.
            con.execute("PRAGMA synchronous = NORMAL")
            con.execute("PRAGMA wal_autocheckpoint = 0")
            con.execute("PRAGMA busy_timeout = 0")
        except BaseException:
            con.close()
            raise
        self._wcon = con

    def _connect_reader(self) -> None:
        con = self._open_connection()
        con.execute("PRAGMA query_only = 1")
        self._rcon = con

    def _migrate(self, con: sqlite3.Connection) -> None:
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for migration in load_migrations(self.backend):
            con.execute("BEGIN IMMEDIATE")
            try:
                current = con.execute(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations"
                ).fetchone()[0]
                check_schema_version(self.backend, self.where(), current)
                if migration.version <= current:
                    con.execute("ROLLBACK")
                    continue
                for statement in split_script(migration.sql):
                    con.execute(statement)
                con.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) "
                    "VALUES (?, ?, ?)",
                    (migration.version, migration.name, _text_time(utcnow())),
                )
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                con.execute("ROLLBACK")
                raise StorageError(
                    f"{self.where()}: migration {migration.version:04d}_"
                    f"{migration.name} failed: {exc}"
                ) from exc
            except BaseException:
                con.execute("ROLLBACK")
                raise
            logger.info(
                "%s: applied migration %04d_%s",
                self.where(),
                migration.version,
                migration.name,
            )

    def _prune_tokens(self, con: sqlite3.Connection) -> None:
        con.execute("DELETE FROM tokens WHERE expires_at < ?", (_text_time(utcnow()),))

    # -- writing (on the writer thread)

    async def _commit(
        self, batches: Sequence[Sequence[Record]], *, dedupe: bool
    ) -> None:
        small = sum(len(records) for records in batches) <= LOOP_COMMIT_RECORDS
        if small and not dedupe and self._wcon is not None:
            try:
                self._commit_now(batches, dedupe)
            except _Locked:
                await self._in_writer(self._commit_now, batches, dedupe, True)
        else:
            await self._in_writer(self._commit_now, batches, dedupe, True)

        await self._sync()
        if self._checkpoint_due():
            await self._in_syncer(self._checkpoint)

    def _commit_now(
        self,
        batches: Sequence[Sequence[Record]],
        dedupe: bool,
        patient: bool = False,
    ) -> None:
        """Write ``batches`` in one transaction (to the WAL, not yet synced).

        Raises :class:`_Locked` when another process holds the database
        and ``patient`` is false (nothing was written); when true, waits
        for it up to the busy timeout.
        """
        try:
            if self._wcon is None:
                self._connect_writer()
            assert self._wcon is not None
            con = self._wcon
            if patient:
                con.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout * 1000)}")
            try:
                con.execute("BEGIN IMMEDIATE")
            finally:
                if patient:
                    con.execute("PRAGMA busy_timeout = 0")
        except sqlite3.OperationalError as exc:
            if not patient and _is_locked(exc):
                raise _Locked(str(exc)) from exc
            self._close_connection("_wcon")
            raise Unavailable(str(exc)) from exc
        except (sqlite3.Error, OSError, StorageError) as exc:
            self._close_connection("_wcon")
            raise Unavailable(str(exc)) from exc

        try:
            self._apply(con, batches, dedupe)
            con.execute("COMMIT")
        except _REJECTED_ERRORS as exc:
            self._rollback(con)
            raise BatchRejected(str(exc)) from exc
        except sqlite3.Error as exc:
            self._rollback(con)
            self._close_connection("_wcon")
            raise Unavailable(str(exc)) from exc
        except BaseException:
            self._rollback(con)
            raise

    # -- syncing the WAL

    def _start_wal_syncer(self) -> None:
        if self._wal_syncer is not None:
            return
        syncer = FileSyncer(self._wal_path)
        asyncio.get_running_loop().add_reader(syncer.done_fd, self._wal_synced)
        self._wal_syncer = syncer

    def _stop_wal_syncer(self) -> None:
        syncer, self._wal_syncer = self._wal_syncer, None
        if syncer is None:
            return
        asyncio.get_running_loop().remove_reader(syncer.done_fd)
        if not syncer.stop():
            logger.warning("%s: the WAL sync thread did not end", self.where())

    def _wal_synced(self) -> None:
        """The syncer's eventfd turned readable: its sync is done."""
        syncer, waiter = self._wal_syncer, self._wal_sync
        outcome = syncer.outcome() if syncer is not None else None
        if outcome is None:
            return
        self._wal_sync = None
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def _sync(self) -> None:
        """Put every commit so far on disk, off the loop.

        The file syncer runs one sync at a time: a sync still running for
        a commit whose caller went away is waited for first. Without the
        syncer (its thread ended), a thread of the pool syncs instead.
        """
        syncer = self._live_syncer()
        while self._wal_sync is not None:
            await asyncio.shield(self._wal_sync)
            syncer = self._live_syncer()
        if syncer is None:
            await self._in_syncer(self._sync_wal)
            return

        self._wal_sync = waiter = asyncio.get_running_loop().create_future()
        syncer.request()
        failure = await asyncio.shield(waiter)
        if failure:
            raise Unavailable(
                f"syncing {self._wal_path} failed: {os.strerror(failure)}"
            )

    def _live_syncer(self) -> FileSyncer | None:
        """The file syncer, or None once its thread has ended.

        The thread notes why it ended before it answers the sync it leaves,
        and only then stops being alive: either sign means it takes no
        more requests. The first caller to see it says so; from then on the
        WAL is synced on a pool thread, and a sync the thread left
        unanswered counts as failed (its commits go to the spool and reach
        the database once).
        """
        syncer = self._wal_syncer
        if syncer is None:
            return None
        if syncer.exit_errno is None and syncer.alive():
            return syncer

        failure = syncer.exit_errno
        logger.warning(
            "%s: the WAL sync thread ended (%s); the WAL is synced on a pool "
            "thread from now on",
            self.where(),
            os.strerror(failure) if failure else "no error",
        )
        self._stop_wal_syncer()
        waiter, self._wal_sync = self._wal_sync, None
        if waiter is not None and not waiter.done():
            waiter.set_result(failure or errno.EIO)
        return None

    def _sync_wal(self) -> None:
        """Put every commit so far on disk, on the calling thread.

        The WAL file is opened by name each time, so the sync always
        reaches the file SQLite writes now.
        """
        try:
            fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise Unavailable(f"syncing {self._wal_path} failed: {exc}") from exc

    def _checkpoint_due(self) -> bool:
        """Every so many commits, or seconds, the WAL is checkpointed."""
        self._unchecked += 1
        now = time.monotonic()
        if self._unchecked < CHECKPOINT_COMMITS and (
            now - self._checked_at < CHECKPOINT_SECONDS
        ):
            return False
        self._unchecked = 0
        self._checked_at = now
        return True

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file, between two commits.

        No commit runs meanwhile (the committer waits for it), so the
        checkpoint takes the whole WAL and the next commit starts it
        afresh. A failure is logged and left to the next one: the WAL then
        grows, and nothing acknowledged is at risk.
        """
        try:
            if self._ccon is None:
                con = self._open_connection()
                con.execute("PRAGMA synchronous = NORMAL")
                con.execute("PRAGMA busy_timeout = 0")
                self._ccon = con
            self._ccon.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except (sqlite3.Error, OSError, StorageError) as exc:
            logger.warning("%s: WAL checkpoint failed: %s", self.where(), exc)
            self._close_connection("_ccon")

    def _rollback(self, con: sqlite3.Connection) -> None:
        try:
            if con.in_transaction:
                con.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.warning("%s: rollback failed: %s", self.where(), exc)

    def _apply(
        self, con: sqlite3.Connection, batches: Sequence[Sequence[Record]], dedupe: bool
    ) -> None:
        audits: list[AuditRecord] = []
        states: dict[type[Any], list[tuple[Any, ...]]] = {}
        latest: dict[type[Any], dict[Any, Record]] = {}
        for records in batches:
            for record in records:
                if type(record) is AuditRecord:
                    audits.append(record)
                    continue
                cls = type(record)
                key = _REPLACED.get(cls)
                if key is not None:
                    latest.setdefault(cls, {})[key(record)] = record
                else:
                    states.setdefault(cls, []).append(_state_row(record))

        if audits:
            if dedupe:
                audits = self._unstored(con, audits)
            self._append_audit(con, audits)
        for cls, rows in states.items():
            con.executemany(_UPSERTS[cls], rows)
        for cls, kept in latest.items():
            _insert_many(con, _UPSERTS[cls], [_state_row(r) for r in kept.values()])

    def _unstored(
        self, con: sqlite3.Connection, audits: list[AuditRecord]
    ) -> list[AuditRecord]:
        stored: set[str] = set()
        uids = [record.uid for record in audits]
        for start in range(0, len(uids), 500):
            part = uids[start : start + 500]
            marks = ", ".join("?" * len(part))
            stored.update(
                row[0]
                for row in con.execute(
                    f"SELECT uid FROM compliance_audit_log WHERE uid IN ({marks})", part
                )
            )
        fresh: list[AuditRecord] = []
        for record in audits:
            if record.uid not in stored:
                stored.add(record.uid)
                fresh.append(record)
        return fresh

    def _append_audit(self, con: sqlite3.Connection, audits: list[AuditRecord]) -> None:
        if not audits:
            return
        last_id, last_hash = con.execute(
            "SELECT last_id, last_hash FROM audit_chain_head WHERE id = 1"
        ).fetchone()
        rows = []
        for record in audits:
            last_id += 1
            stamp = _text_time(record.timestamp)
            utc = record.timestamp.tzinfo is dt.UTC
            digest = audit.chain_hash(last_hash, record, stamp if utc else None)
            rows.append(
                (
                    last_id,
                    record.uid,
                    stamp,
                    record.severity,
                    record.event_type,
                    record.user,
                    record.source_address,
                    record.protocol,
                    record.station_id,
                    record.pump_id,
                    record.old_value,
                    record.new_value,
                    record.outcome,
                    _json_text(record.details),
                    last_hash,
                    digest,
                )
            )
            last_hash = digest
        _insert_many(con, _INSERT_AUDIT, rows)
        con.execute(
            "UPDATE audit_chain_head SET last_id = ?, last_hash = ? WHERE id = 1",
            (last_id, last_hash),
        )

    # -- reading (on the reader thread)

    async def load(self) -> Snapshot:
        return await self._read(self._load_now)

    def _load_now(self, con: sqlite3.Connection) -> Snapshot:
        now = _text_time(utcnow())
        con.execute("BEGIN")
        try:
            return Snapshot(
                users=[
                    UserRecord(
                        user_id=r[0],
                        username=r[1],
                        email=r[2],
                        role=r[3],
                        password_hash=r[4],
                        active=bool(r[5]),
                        must_change_password=bool(r[6]),
                        failed_logins=r[7],
                        locked_until=_time_or_none(r[8]),
                        created_at=_time(r[9]),
                        updated_at=_time(r[10]),
                    )
                    for r in con.execute(
                        "SELECT user_id, username, email, role, password_hash, active, "
                        "must_change_password, failed_logins, locked_until, "
                        "created_at, updated_at FROM users ORDER BY username, user_id"
                    )
                ],
                roles=[
                    RoleRecord(role=r[0], permissions=tuple(json.loads(r[1])))
                    for r in con.execute(
                        "SELECT role, permissions FROM roles ORDER BY role"
                    )
                ],
                tokens=[
                    TokenRecord(
                        token_hash=r[0],
                        user_id=r[1],
                        created_at=_time(r[2]),
                        expires_at=_time(r[3]),
                        revoked=bool(r[4]),
                    )
                    for r in con.execute(
                        "SELECT token_hash, user_id, created_at, expires_at, revoked "
                        "FROM tokens WHERE revoked = 0 AND expires_at > ? "
                        "ORDER BY created_at",
                        (now,),
                    )
                ],
                setpoints=[
                    SetpointRecord(
                        station_id=r[0],
                        pump_id=r[1],
                        requested=r[2],
                        target=r[3],
                        applied=r[4],
                        outcome=r[5],
                        source=r[6],
                        user=r[7],
                        at=_time(r[8]),
                    )
                    for r in con.execute(
                        "SELECT station_id, pump_id, requested, target, applied, "
                        "outcome, source, user_name, at FROM setpoints "
                        "ORDER BY station_id, pump_id"
                    )
                ],
                plans=[
                    PlanRecord(
                        plan_id=r[0],
                        version=r[1],
                        received_at=_time(r[2]),
                        body=json.loads(r[3]),
                        user=r[4],
                    )
                    for r in con.execute(
                        "SELECT plan_id, version, received_at, body, user_name "
                        "FROM plans ORDER BY received_at, plan_id"
                    )
                ],
                emergency_stops=[
                    EmergencyStopRecord(
                        level=r[0],
                        station_id=r[1],
                        pump_id=r[2],
                        active=bool(r[3]),
                        reason=r[4],
                        operator=r[5],
                        at=_time(r[6]),
                        since=_time_or_none(r[7]),
                    )
                    for r in con.execute(
                        "SELECT level, station_id, pump_id, active, reason, operator, "
                        "at, since FROM emergency_stops ORDER BY level, scope"
                    )
                ],
                station_states=[
                    StationStateRecord(
                        station_id=r[0],
                        last_fresh_at=_time_or_none(r[1]),
                        failsafe=bool(r[2]),
                    )
                    for r in con.execute(
                        "SELECT station_id, last_fresh_at, failsafe "
                        "FROM station_states ORDER BY station_id"
                    )
                ],
                stations=[
                    StationRecord(station_id=r[0], definition=json.loads(r[1]))
                    for r in con.execute(
                        "SELECT station_id, definition FROM stations "
                        "ORDER BY station_id"
                    )
                ],
            )
        finally:
            con.execute("COMMIT")

    async def audit_query(self, query: AuditQuery) -> list[AuditRow]:
        sql, params = _audit_filter(query)
        limit = max(1, min(query.limit, MAX_QUERY_ROWS))
        return await self._read(self._select_audit, sql, [*params, limit])

    def _select_audit(
        self, con: sqlite3.Connection, where: str, params: list[Any]
    ) -> list[AuditRow]:
        cursor = con.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM compliance_audit_log WHERE {where} "
            "ORDER BY id LIMIT ?",
            params,
        )
        return [_audit_row(row) for row in cursor]

    async def alerts_query(self, query: AlertQuery) -> list[AlertRow]:
        sql, params = _alert_filter(query)
        limit = max(1, min(query.limit, MAX_QUERY_ROWS))
        return await self._read(self._select_alerts, sql, [*params, limit])

    def _select_alerts(
        self, con: sqlite3.Connection, where: str, params: list[Any]
    ) -> list[AlertRow]:
        cursor = con.execute(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE {where} "
            "ORDER BY seq DESC LIMIT ?",
            params,
        )
        return [_alert_row(row) for row in cursor]

    async def audit_iter(
        self, since: dt.datetime | None = None
    ) -> AsyncIterator[AuditRow]:
        after = 0
        while True:
            query = AuditQuery(since=since, after_id=after, limit=PAGE_ROWS)
            rows = await self.audit_query(query)
            for row in rows:
                yield row
            if len(rows) < PAGE_ROWS:
                return
            after = rows[-1].id

    async def audit_verify(self) -> ChainVerdict:
        return await self._read(self._verify_now)

    def _verify_now(self, con: sqlite3.Connection) -> ChainVerdict:
        verifier = audit.ChainVerifier()
        con.execute("BEGIN")
        try:
            head = con.execute(
                "SELECT last_id, last_hash FROM audit_chain_head WHERE id = 1"
            ).fetchone()
            cursor = con.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM compliance_audit_log "
                "WHERE id <= ? ORDER BY id",
                (head[0],),
            )
            while True:
                rows = cursor.fetchmany(PAGE_ROWS)
                if not rows or not all(verifier.feed(_audit_row(r)) for r in rows):
                    break
        finally:
            con.execute("COMMIT")
        return verifier.finish((head[0], head[1]))

    async def _read(self, func: Callable[..., T], *args: Any) -> T:
        if self._phase != "open" or self._rcon is None:
            raise StorageError(f"{self.where()}: storage is {self._phase_word()}")
        con = self._rcon
        try:
            return await self._in_reader(func, con, *args)
        except sqlite3.Error as exc:
            self._note_error(exc)
            raise StorageError(f"{self.where()}: read failed ({exc})") from exc

    # -- threads

    async def _in_writer(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, func, *args
        )

    async def _in_reader(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, func, *args
        )

    async def _in_syncer(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._syncer, func, *args
        )


class _Locked(Exception):
    """Another process holds the database; the commit did not start."""


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _audit_filter(query: AuditQuery) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters for ``query`` (ISO text times)."""
    clauses = ["id > ?"]
    params: list[Any] = [query.after_id]
    if query.severity is not None:
        clauses.append("severity = ?")
        params.append(query.severity)
    if query.event_type is not None:
        clauses.append("event_type = ?")
        params.append(query.event_type)
    if query.since is not None:
        clauses.append("timestamp >= ?")
        params.append(audit.iso_utc(query.since))
    if query.until is not None:
        clauses.append("timestamp <= ?")
        params.append(audit.iso_utc(query.until))
    if query.station_id is not None:
        clauses.append("station_id = ?")
        params.append(query.station_id)
    if query.user is not None:
        clauses.append("user_name = ?")
        params.append(query.user)
    return " AND ".join(clauses), params


def _alert_filter(query: AlertQuery) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters for ``query`` (ISO text times)."""
    clauses = ["1 = 1"]
    params: list[Any] = []
    if query.before_seq is not None:
        clauses.append("seq < ?")
        params.append(query.before_seq)
    if query.severity is not None:
        clauses.append("severity = ?")
        params.append(query.severity)
    if query.kind is not None:
        clauses.append("kind = ?")
        params.append(query.kind)
    if query.since is not None:
        clauses.append("last_raised >= ?")
        params.append(audit.iso_utc(query.since))
    if query.station_id is not None:
        clauses.append("station_id = ?")
        params.append(query.station_id)
    return " AND ".join(clauses), params
