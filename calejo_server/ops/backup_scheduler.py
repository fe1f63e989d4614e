"""Backups inside the running adapter, on the configured schedule.

:class:`BackupScheduler` runs one task. Each kind (full, database,
config) with a schedule is due one interval after its newest archive in
the backup folder (so a restart neither skips nor repeats a backup), and
never sooner than ``start_delay`` seconds after the adapter started. Due
backups run one at a time, in a worker thread where they read and write
files, so the event loop keeps serving SCADA. Each archive is verified
right after it is written, then the kind's folder is pruned.

A failed backup is logged as an ERROR, recorded as BACKUP_FAILED, raised
as a ``backup_failed`` alert of severity HIGH when the adapter has an
alert service, shown in ``/health/detailed`` (component ``backup``, which
does not change the adapter's overall status), and tried again after
:data:`RETRY_AFTER` seconds (or the kind's interval, when shorter).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import inspect
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from calejo_server.api.health import ComponentHealth
from calejo_server.ops.archive import KINDS, Kind
from calejo_server.ops.backup import (
    SYSTEM,
    BackupError,
    BackupSettings,
    backup_root,
    kind_folder,
    list_archives,
    parse_backup_settings,
    run_backup,
)
from calejo_server.ops.dump import Cancelled

logger = logging.getLogger(__name__)

RETRY_AFTER: Final = 300.0
"""Seconds before a failed backup is tried again."""

MAX_SLEEP: Final = 60.0
"""The longest single wait: the schedule is looked at again at least this often."""

STOP_TIMEOUT: Final = 3.0


@dataclasses.dataclass(slots=True)
class KindStatus:
    """What happened to one kind of backup so far."""

    interval: float
    next_at: float
    last_success_at: float | None = None
    last_archive: str | None = None
    last_failure_at: float | None = None
    last_error: str | None = None

    @property
    def failing(self) -> bool:
        return self.last_failure_at is not None and (
            self.last_success_at is None or self.last_failure_at > self.last_success_at
        )


class BackupScheduler:
    """Scheduled backups of one adapter (see the module).

    ``adapter`` needs ``config`` and ``storage``; its ``health`` registry
    (if any) gets a ``backup`` component, and its ``alerts`` service (if
    any, looked up at each failure) gets ``backup_failed`` alerts.
    """

    name = "backup"

    def __init__(
        self,
        adapter: Any,
        settings: BackupSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.adapter = adapter
        self.config = adapter.config
        self.settings = (
            settings if settings is not None else parse_backup_settings(self.config)
        )
        self.root = backup_root(self.settings, self.config)
        self.clock = clock
        self.status: dict[Kind, KindStatus] = {}
        self._cancel = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: Kind | None = None

    @property
    def active(self) -> bool:
        """Whether backups are scheduled in this adapter."""
        return (
            self.settings.enabled
            and not self.config.demo
            and any(self.settings.schedule[kind] for kind in KINDS)
        )

    async def start(self) -> None:
        health = getattr(self.adapter, "health", None)
        if health is not None:
            health.register(self.name, self.health)
        if not self.active:
            reason = (
                "the demonstration configuration"
                if self.config.demo
                else "backup.enabled is false or every schedule is off"
            )
            logger.info("backup: no scheduled backups (%s)", reason)
            return

        now = self.clock()
        earliest = now + self.settings.start_delay
        for kind in KINDS:
            interval = self.settings.schedule[kind]
            if not interval:
                continue
            try:
                archives = await asyncio.to_thread(list_archives, self.root, kind)
            except OSError as exc:
                logger.warning(
                    "backup: cannot look into %s (%s); the %s backup is due first",
                    kind_folder(self.root, kind),
                    exc.strerror or exc,
                    kind,
                )
                archives = []
            due = earliest
            if archives:
                due = max(earliest, archives[0].created_at.timestamp() + interval)
            self.status[kind] = KindStatus(interval=interval, next_at=due)
        self._task = asyncio.create_task(self._run(), name="calejo-backup")
        logger.info(
            "backup: scheduled into %s: %s",
            self.root,
            ", ".join(
                f"{kind} every {s.interval:g} s, next at {_iso(s.next_at)}"
                for kind, s in self.status.items()
            ),
        )

    async def stop(self) -> None:
        """Stop; a backup under way notices within a step and is discarded."""
        self._cancel.set()
        task, self._task = self._task, None
        if task is None:
            return
        if self._running is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._cancel.is_set():
            kind = min(self.status, key=lambda k: self.status[k].next_at)
            delay = self.status[kind].next_at - self.clock()
            if delay > 0:
                await asyncio.sleep(min(delay, MAX_SLEEP))
                continue
            await self.run_once(kind)

    async def run_once(self, kind: Kind) -> Path | None:
        """Back up ``kind`` now; the archive, or None when it failed."""
        status = self.status.get(kind)
        folder = kind_folder(self.root, kind)
        self._running = kind
        try:
            outcome = await run_backup(
                kind,
                self.config,
                getattr(self.adapter, "storage", None),
                folder,
                actor=SYSTEM,
                prune_with=(self.root, self.settings),
                cancel=self._cancel,
            )
        except Cancelled:
            logger.info("backup: %s backup stopped by the shutdown", kind)
            return None
        except BackupError as exc:
            await self._failed(kind, status, str(exc))
            return None
        except Exception as exc:
            logger.exception("backup: %s backup failed unexpectedly", kind)
            await self._failed(kind, status, f"unexpected error: {exc!r}")
            return None
        finally:
            self._running = None

        now = self.clock()
        if status is not None:
            status.last_success_at = now
            status.last_archive = str(outcome.path)
            status.next_at = now + status.interval
        return outcome.path

    async def _failed(self, kind: Kind, status: KindStatus | None, error: str) -> None:
        now = self.clock()
        logger.error("backup: %s", error)
        if status is not None:
            status.last_failure_at = now
            status.last_error = error
            status.next_at = now + min(status.interval, RETRY_AFTER)

        alerts = getattr(self.adapter, "alerts", None)
        if alerts is None:
            return
        try:
            raised = alerts.raise_alert(
                "backup_failed",
                "HIGH",
                f"{kind} backup failed",
                details={
                    "kind": kind,
                    "folder": str(kind_folder(self.root, kind)),
                    "error": error,
                },
            )
            if inspect.isawaitable(raised):
                await raised
        except Exception:
            logger.exception("backup: raising the backup_failed alert failed")

    def health(self) -> ComponentHealth:
        """The ``backup`` component of /health/detailed (never critical)."""
        if not self.active:
            return ComponentHealth(
                "not_configured", "no scheduled backups", critical=False
            )
        data: dict[str, Any] = {"folder": str(self.root)}
        failing = []
        for kind, status in self.status.items():
            data[kind] = {
                "every_seconds": status.interval,
                "next_at": _iso(status.next_at),
                "last_success_at": _iso(status.last_success_at),
                "last_archive": status.last_archive,
                "last_failure_at": _iso(status.last_failure_at),
                "last_error": status.last_error,
            }
            if status.failing:
                failing.append(f"{kind}: {status.last_error}")
        if failing:
            return ComponentHealth("degraded", "; ".join(failing), data, critical=False)
        running = f"; {self._running} backup running" if self._running else ""
        return ComponentHealth(
            "ok", f"backups into {self.root}{running}", data, critical=False
        )


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    with contextlib.suppress(OverflowError, OSError, ValueError):
        return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")
    return None
