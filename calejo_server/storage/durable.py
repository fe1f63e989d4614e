"""Group commit, the spool fallback and its delivery, shared by the backends.

:class:`DurableStorage` turns concurrent :meth:`write` calls into few
transactions: calls queue up while one transaction is being committed and
the next transaction takes all of them, after one turn of the event loop so
that the requests read in that turn join it (each call still all-or-nothing:
should the database refuse one call's data, the group is retried call by
call and only that call fails). Each caller returns once its transaction
has committed.

When the database does not answer, the group that failed and every later
one go to the spool (:mod:`calejo_server.storage.spool`) and the storage
is *degraded*. A background task retries with backoff; once the database
answers it delivers the spool in order, before any newer write, with
audit rows keyed by uid so a record that did reach the database before the
failure lands only once, then removes the file and the storage is *ok*
again. A spool left by a process that died is delivered by :meth:`open`.

A backend implements :meth:`_connect`, :meth:`_disconnect` and
:meth:`_commit`, raising :class:`Unavailable` when the database does not
answer and :class:`BatchRejected` when it refuses the data.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import datetime as dt
import importlib.resources
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from calejo_server import audit
from calejo_server.storage.base import (
    AuditRecord,
    EmergencyStopRecord,
    HealthState,
    Record,
    SetpointRecord,
    StationStateRecord,
    Storage,
    StorageError,
    StorageHealth,
)
from calejo_server.storage.spool import RECORD_TYPES, RejectedLog, Spool

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_GROUP_BATCHES = 1024
"""Most write() calls committed in one transaction."""

MAX_DELIVERY_BATCHES = 512
"""Most spooled batches delivered in one transaction."""

FINAL_DELIVERY_BATCHES = 64
"""A spool with fewer batches left than this is finished under the mode lock."""

CLOSE_TIMEOUT = 10.0
"""Seconds close() waits for queued writes to be committed or spooled."""


class Unavailable(Exception):
    """The database did not answer.

    Whether the transaction committed is unknown: it is spooled and
    delivered again, and delivery skips audit rows already stored.
    """


class BatchRejected(Exception):
    """The database refused the data of a transaction; nothing was committed."""


# ---------------------------------------------------------------------------
# Records as they are stored.


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldKinds:
    texts: tuple[str, ...]
    times: tuple[str, ...]
    mappings: tuple[str, ...]
    sequences: tuple[str, ...]


def _kinds_of(cls: type[Any]) -> _FieldKinds:
    texts: list[str] = []
    times: list[str] = []
    mappings: list[str] = []
    sequences: list[str] = []
    for field in dataclasses.fields(cls):
        kind = str(field.type)
        if "datetime" in kind:
            times.append(field.name)
        elif kind.startswith("dict"):
            mappings.append(field.name)
        elif kind.startswith("tuple"):
            sequences.append(field.name)
        elif kind.startswith("str"):
            texts.append(field.name)
    return _FieldKinds(tuple(texts), tuple(times), tuple(mappings), tuple(sequences))


_KINDS = {cls: _kinds_of(cls) for cls in RECORD_TYPES.values()}


def normalise(record: object) -> Record:
    """``record`` as it will be stored: text without NUL or lone surrogates,
    times in UTC (a naive time is taken as UTC), JSON documents made
    JSON-safe (see :func:`calejo_server.audit.json_safe`), a non-finite
    requested setpoint as None.

    Raises :class:`StorageError` for anything that is not a storage record.
    """
    cls = type(record)
    if cls is AuditRecord:
        assert isinstance(record, AuditRecord)
        return audit.normalise_audit_record(record)
    if _plain_state(record):
        return record  # type: ignore[return-value]
    kinds = _KINDS.get(cls)
    if kinds is None:
        raise StorageError(
            f"expected a storage record ({', '.join(c.__name__ for c in _KINDS)}), "
            f"got {cls.__name__}"
        )

    changes: dict[str, Any] = {}
    for name in kinds.texts:
        value = getattr(record, name)
        if isinstance(value, str):
            cleaned = audit.clean_text(value)
            if cleaned is not value:
                changes[name] = cleaned
    for name in kinds.times:
        value = getattr(record, name)
        if value is None:
            continue
        if not isinstance(value, dt.datetime):
            raise StorageError(
                f"{cls.__name__}.{name}: expected a datetime, "
                f"got {type(value).__name__}"
            )
        if value.tzinfo is not dt.UTC:
            changes[name] = dt.datetime.fromisoformat(audit.iso_utc(value))
    for name in kinds.mappings:
        value = getattr(record, name)
        if not isinstance(value, dict):
            raise StorageError(
                f"{cls.__name__}.{name}: expected a dict, got {type(value).__name__}"
            )
        if not audit.is_json_safe(value):
            changes[name] = audit.json_safe(value)
    for name in kinds.sequences:
        value = getattr(record, name)
        cleaned_items = tuple(audit.clean_text(str(item)) for item in value)
        if cleaned_items != value:
            changes[name] = cleaned_items
    if cls is SetpointRecord:
        requested = getattr(record, "requested")  # noqa: B009
        if isinstance(requested, float) and not math.isfinite(requested):
            changes["requested"] = None
    normalised: Record = record  # type: ignore[assignment]
    if not changes:
        return normalised
    return dataclasses.replace(normalised, **changes)


def _plain_state(record: object) -> bool:
    """The quick look at the records of every setpoint: a pump's setpoint
    and its station's state as the engine makes them (ASCII text, UTC
    times, a finite request) are stored as they are."""
    cls = type(record)
    if cls is SetpointRecord:
        assert isinstance(record, SetpointRecord)
        requested = record.requested
        return (
            record.at.__class__ is dt.datetime
            and record.at.tzinfo is dt.UTC
            and (
                requested is None
                or (type(requested) is float and math.isfinite(requested))
            )
            and audit.plain_texts(
                record.station_id,
                record.pump_id,
                record.outcome,
                record.source,
                record.user,
            )
        )
    if cls is StationStateRecord:
        assert isinstance(record, StationStateRecord)
        fresh = record.last_fresh_at
        return (
            fresh is None or (fresh.__class__ is dt.datetime and fresh.tzinfo is dt.UTC)
        ) and audit.plain_texts(record.station_id)
    return False


def emergency_stop_scope(record: EmergencyStopRecord) -> str:
    """The key of an emergency stop within its level."""
    if record.level == "system":
        return ""
    if record.level == "station":
        return record.station_id or ""
    return f"{record.station_id or ''}/{record.pump_id or ''}"


# ---------------------------------------------------------------------------
# Migrations.


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def load_migrations(backend: str) -> list[Migration]:
    """The migrations shipped for ``backend``, in version order."""
    folder = importlib.resources.files("calejo_server.storage").joinpath(
        "migrations", backend
    )
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8"))
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise StorageError(
            f"{backend} migrations: expected versions 1 to {len(found)} "
            f"without gaps, found {versions}"
        )
    return found


def check_schema_version(backend: str, where: str, version: int) -> None:
    """Refuse a database whose schema is newer than these migrations."""
    known = len(load_migrations(backend))
    if version > known:
        raise StorageError(
            f"{where}: database schema is at version {version}, newer than this "
            f"adapter knows (version {known}); upgrade the adapter or point it "
            "at another database"
        )


# ---------------------------------------------------------------------------
# The storage.


@dataclasses.dataclass(slots=True)
class _Pending:
    records: list[Record]
    future: asyncio.Future[None]


_Phase = Literal["new", "open", "closing", "closed"]


class DurableStorage(Storage):
    """A :class:`Storage` with group commit and a spool; see the module."""

    backend: str

    def __init__(
        self,
        data_dir: Path,
        *,
        retry_first: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.spool_path = self.data_dir / "spool" / f"{self.backend}.jsonl"
        self._spool = Spool(self.spool_path)
        self._rejected = RejectedLog(
            self.data_dir / "spool" / f"{self.backend}-rejected.jsonl"
        )
        self._retry_first = retry_first
        self._retry_max = retry_max

        self._phase: _Phase = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._mode_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None
        self._deliverer: asyncio.Task[None] | None = None
        self._io = ThreadPoolExecutor(
            1, thread_name_prefix=f"calejo-{self.backend}-spool"
        )

        self._spooling = False
        self._spooled_records = 0
        self._spool_offset = 0
        self._spool_line = 0
        self._delivered = 0
        self._degraded_at: float | None = None
        self._errors = 0
        self._last_error: str | None = None
        self._state: HealthState = "down"
        self._detail = "not open"

    # -- what a backend provides

    @abc.abstractmethod
    def where(self) -> str:
        """The database, for messages: ``postgresql at 127.0.0.1:5432/calejo``."""

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Connect and migrate; :class:`Unavailable` if the database is away."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Close every connection (never raises)."""

    @abc.abstractmethod
    async def _commit(
        self, batches: Sequence[Sequence[Record]], *, dedupe: bool
    ) -> None:
        """Commit ``batches`` in order in one transaction.

        With ``dedupe``, audit records whose uid is already stored are left
        out (they reached the database before a failure). Raises
        :class:`Unavailable` or :class:`BatchRejected`.
        """

    # -- life cycle

    async def open(self) -> None:
        if self._phase != "new":
            raise StorageError(f"{self.where()}: storage was already opened")

        try:
            await self._connect()
            if await self._run_io(self._spool.size) > 0:
                await self._deliver_leftover_spool()
        except Unavailable as exc:
            await self._abandon_open()
            raise StorageError(f"{self.where()} unreachable ({exc})") from exc
        except BaseException:
            await self._abandon_open()
            raise

        self._loop = asyncio.get_running_loop()
        self._phase = "open"
        self._set_state("ok", self.where())
        self._committer = asyncio.create_task(
            self._run_committer(), name=f"calejo-{self.backend}-committer"
        )
        logger.info("storage open: %s", self.where())

    async def _abandon_open(self) -> None:
        await self._disconnect()
        await self._run_io(self._spool.close)
        self._io.shutdown(wait=True)
        self._phase = "closed"

    async def _deliver_leftover_spool(self) -> None:
        self._spooling = True
        self._spooled_records = await self._run_io(self._spool.count_records)
        logger.warning(
            "storage: delivering %d records left in spool %s by an earlier run",
            self._spooled_records,
            self.spool_path,
        )
        try:
            await self._drain()
        except Unavailable as exc:
            raise StorageError(
                f"{self.where()}: could not deliver the spool {self.spool_path} "
                f"left by an earlier run ({exc}); it stays on disk for the next start"
            ) from exc

    async def close(self) -> None:
        if self._phase in ("new", "closed"):
            self._phase = "closed"
            self._io.shutdown(wait=False)
            return
        if self._phase == "closing":
            return

        self._phase = "closing"
        self._wakeup.set()
        if self._committer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._committer), CLOSE_TIMEOUT)
            except TimeoutError:
                logger.error(
                    "storage: %d writes still queued after %.0f s at close; "
                    "they are failed",
                    len(self._pending),
                    CLOSE_TIMEOUT,
                )
                self._committer.cancel()
                self._fail(self._pending, StorageError("storage closed"))
                self._pending = []
        if self._deliverer is not None:
            self._deliverer.cancel()
            await asyncio.gather(self._deliverer, return_exceptions=True)
        await self._disconnect()
        await self._run_io(self._spool.close)
        self._io.shutdown(wait=True)

        self._phase = "closed"
        self._set_state("down", "closed")
        if self._spooling:
            logger.warning(
                "storage closed with %d records in spool %s; they are delivered "
                "at the next start",
                self._spooled_records,
                self.spool_path,
            )
        logger.info("storage closed: %s", self.where())

    # -- health

    def health(self) -> StorageHealth:
        return StorageHealth(
            state=self._state,
            backend=self.backend,
            detail=self._detail,
            spooled=self._spooled_records,
            errors=self._errors,
            last_error=self._last_error,
        )

    def _set_state(self, state: HealthState, detail: str) -> None:
        changed = state != self._state
        self._state = state
        self._detail = detail
        if changed:
            self._notify_health(self.health())

    def _note_error(self, exc: BaseException) -> None:
        self._errors += 1
        self._last_error = str(exc) or type(exc).__name__

    # -- writing

    async def write(self, records: Sequence[Record]) -> None:
        if self._phase != "open":
            raise StorageError(f"{self.where()}: storage is {self._phase_word()}")
        if not records:
            return

        batch = [normalise(record) for record in records]
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append(_Pending(batch, future))
        self._wakeup.set()
        await future

    def _phase_word(self) -> str:
        return {"new": "not open", "closing": "closing", "closed": "closed"}.get(
            self._phase, "open"
        )

    async def _run_committer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                # One turn of the loop first: requests already read in this
                # turn join the group rather than wait for the next commit.
                await asyncio.sleep(0)
                group = self._pending[:MAX_GROUP_BATCHES]
                del self._pending[:MAX_GROUP_BATCHES]
                try:
                    await self._commit_group(group)
                except Exception as exc:
                    logger.exception("storage: unexpected failure committing writes")
                    self._fail(group, StorageError(f"{self.where()}: {exc}"))
            if self._phase != "open":
                return

    async def _commit_group(self, group: list[_Pending]) -> None:
        async with self._mode_lock:
            if not self._spooling:
                try:
                    await self._commit([p.records for p in group], dedupe=False)
                except Unavailable as exc:
                    await self._enter_degraded(exc)
                except BatchRejected:
                    group = await self._commit_each(group)
                else:
                    self._resolve(group)
                    return
            if group:
                await self._spool_group(group)

    async def _commit_each(self, group: list[_Pending]) -> list[_Pending]:
        """Commit each call alone; returns the calls left when the DB went away."""
        for index, pending in enumerate(group):
            try:
                await self._commit([pending.records], dedupe=True)
            except BatchRejected as exc:
                self._note_error(exc)
                logger.error("storage: %s refused a write: %s", self.where(), exc)
                self._fail(
                    [pending], StorageError(f"{self.where()} refused the write: {exc}")
                )
            except Unavailable as exc:
                await self._enter_degraded(exc)
                return group[index:]
            else:
                self._resolve([pending])
        return []

    async def _spool_group(self, group: list[_Pending]) -> None:
        batches = [p.records for p in group]
        try:
            await self._run_io(self._spool.append, batches)
        except OSError as exc:
            self._note_error(exc)
            logger.error("storage: cannot write spool %s: %s", self.spool_path, exc)
            self._fail(
                group,
                StorageError(
                    f"{self.where()} unavailable and spool {self.spool_path} "
                    f"not writable ({exc})"
                ),
            )
            return
        self._spooled_records += sum(len(records) for records in batches)
        self._detail = self._degraded_detail()
        self._resolve(group)

    async def _enter_degraded(self, exc: Unavailable) -> None:
        self._note_error(exc)
        self._spooling = True
        self._degraded_at = time.monotonic()
        logger.warning(
            "storage degraded: %s unreachable (%s); spooling to %s",
            self.where(),
            exc,
            self.spool_path,
        )
        notice = AuditRecord(
            event_type=audit.STORAGE_DEGRADED,
            severity=audit.SEVERITY_OF[audit.STORAGE_DEGRADED],
            details={
                "backend": self.backend,
                "database": self.where(),
                "error": audit.clean_text(str(exc)),
                "spool": str(self.spool_path),
            },
        )
        try:
            await self._run_io(self._spool.append, [[notice]])
        except OSError as spool_exc:
            logger.error(
                "storage: cannot write spool %s: %s", self.spool_path, spool_exc
            )
        else:
            self._spooled_records += 1
        self._set_state("degraded", self._degraded_detail())
        if self._deliverer is None or self._deliverer.done():
            self._deliverer = asyncio.create_task(
                self._run_deliverer(), name=f"calejo-{self.backend}-deliverer"
            )

    def _degraded_detail(self) -> str:
        return (
            f"{self.where()} unreachable ({self._last_error}); "
            f"{self._spooled_records} records spooled to {self.spool_path}"
        )

    # -- delivering the spool

    async def _run_deliverer(self) -> None:
        delay = self._retry_first
        attempts = 0
        while self._spooling and self._phase == "open":
            await asyncio.sleep(delay)
            attempts += 1
            try:
                await self._drain()
            except Unavailable as exc:
                self._note_error(exc)
                self._detail = self._degraded_detail()
                delay = min(delay * 2, self._retry_max)
                logger.log(
                    logging.WARNING if attempts % 10 == 0 else logging.DEBUG,
                    "storage: %s still unreachable after %d attempts (%s); "
                    "%d records spooled",
                    self.where(),
                    attempts,
                    exc,
                    self._spooled_records,
                )
            except Exception as exc:
                self._note_error(exc)
                delay = min(delay * 2, self._retry_max)
                logger.exception("storage: delivering spool %s failed", self.spool_path)

    async def _drain(self) -> None:
        """Deliver the spool in order, then leave spooling; raises Unavailable.

        The bulk of the spool is delivered while new writes keep being
        appended to it; once what is left is small, the rest is delivered
        under the mode lock, which holds new writes back for that one short
        step so that the spool can end.
        """
        while await self._deliver_next() >= FINAL_DELIVERY_BATCHES:
            pass
        async with self._mode_lock:
            while await self._deliver_next():
                pass
            await self._finish_delivery()

    async def _deliver_next(self) -> int:
        """Deliver the next chunk of the spool; the batches in it (0 at the end)."""
        chunk = await self._run_io(
            self._spool.read, self._spool_offset, self._spool_line
        )
        if chunk.end == self._spool_offset:
            return 0
        await self._deliver(chunk.batches)
        self._delivered += len(chunk.batches)
        self._spool_offset = chunk.end
        self._spool_line = chunk.line
        self._spooled_records = max(0, self._spooled_records - chunk.records)
        return max(1, len(chunk.batches))

    async def _deliver(self, batches: list[tuple[int, list[Record]]]) -> None:
        for start in range(0, len(batches), MAX_DELIVERY_BATCHES):
            part = batches[start : start + MAX_DELIVERY_BATCHES]
            try:
                await self._commit([records for _, records in part], dedupe=True)
            except BatchRejected:
                await self._deliver_each(part)

    async def _deliver_each(self, batches: list[tuple[int, list[Record]]]) -> None:
        for line, records in batches:
            try:
                await self._commit([records], dedupe=True)
            except BatchRejected as exc:
                self._note_error(exc)
                logger.error(
                    "spool %s line %d refused by %s (%s); kept in %s",
                    self.spool_path,
                    line,
                    self.where(),
                    exc,
                    self._rejected.path,
                )
                await self._run_io(self._rejected.append, records, str(exc))

    async def _finish_delivery(self) -> None:
        """At the end of the spool (mode lock held): record it, remove it."""
        tail = await self._run_io(self._spool.tail, self._spool_offset)
        if tail:
            logger.error(
                "spool %s line %d skipped: torn by a crash (%d bytes, no newline)",
                self.spool_path,
                self._spool_line + 1,
                len(tail),
            )

        outage = (
            time.monotonic() - self._degraded_at
            if self._degraded_at is not None
            else None
        )
        notice = AuditRecord(
            event_type=audit.STORAGE_RECOVERED,
            severity=audit.SEVERITY_OF[audit.STORAGE_RECOVERED],
            details={
                "backend": self.backend,
                "database": self.where(),
                "delivered_batches": self._delivered,
                "outage_seconds": round(outage, 3) if outage is not None else None,
            },
        )
        await self._commit([[notice]], dedupe=False)
        await self._run_io(self._spool.remove)

        delivered = self._delivered
        self._spooling = False
        self._spooled_records = 0
        self._spool_offset = 0
        self._spool_line = 0
        self._delivered = 0
        self._degraded_at = None
        logger.info(
            "storage recovered: %s answers again; %d spooled batches delivered",
            self.where(),
            delivered,
        )
        self._set_state("ok", self.where())

    # -- helpers

    async def _run_io(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, func, *args)

    @staticmethod
    def _resolve(group: Sequence[_Pending]) -> None:
        for pending in group:
            if not pending.future.done():
                pending.future.set_result(None)

    @staticmethod
    def _fail(group: Sequence[_Pending], exc: StorageError) -> None:
        for pending in group:
            if not pending.future.done():
                pending.future.set_exception(exc)
