"""How the SQLite backend commits: on the loop, synced before the answer.

A small group is committed on the event loop, but acknowledged only after
an ``fdatasync`` of the WAL, by the loop while the disk is quick and by the
sync thread when it is slow; a database locked by another process is
waited for on the writer thread, never on the loop; the WAL is
checkpointed by the sync thread, so it stays small however many commits
go by; a WAL that cannot be synced sends the writes to the spool, from
which they reach the database once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from calejo_server.storage import sqlite as sqlite_backend
from calejo_server.storage.base import AuditQuery, Record
from calejo_server.storage.sqlite import SQLiteStorage
from tests.server.storage.conftest import run

Records = Callable[..., list[Record]]


def _storage(data_dir: Path, **options: Any) -> SQLiteStorage:
    return SQLiteStorage(data_dir / "calejo.db", data_dir, **options)


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def test_a_slow_disk_is_synced_off_the_loop_before_the_answer(
    data_dir: Path, setpoint_records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "LOOP_SYNC_SECONDS", 0.0)
    release = threading.Event()
    synced: list[str] = []
    real_sync = sqlite_backend.os.fdatasync

    def held_sync(fd: int) -> None:
        synced.append(sqlite_backend.os.readlink(f"/proc/self/fd/{fd}"))
        release.wait(10)
        real_sync(fd)

    async def main() -> None:
        storage = _storage(data_dir)
        await storage.open()
        try:
            monkeypatch.setattr(sqlite_backend.os, "fdatasync", held_sync)
            write = asyncio.create_task(
                storage.write(setpoint_records("north", "p1", 30.0, 1))
            )
            await _wait_for(lambda: bool(synced), 5, "the WAL sync to start")
            started = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.01)
            assert time.monotonic() - started < 1.0, "the loop waited on the disk"
            assert not write.done(), "answered before the WAL was on disk"
            release.set()
            await asyncio.wait_for(write, 5)
        finally:
            release.set()
            await storage.close()

    run(main())
    assert synced[0] == str((data_dir / "calejo.db-wal").resolve())


def test_a_fast_disk_is_synced_on_the_loop_and_a_slow_one_is_not(
    data_dir: Path, setpoint_records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sync = sqlite_backend.os.fdatasync
    slow = threading.Event()
    synced: list[tuple[str, bool]] = []
    pending: list[asyncio.Task[None]] = []

    def watched_sync(fd: int) -> None:
        answered = bool(pending) and pending[-1].done()
        synced.append((threading.current_thread().name, answered))
        if slow.is_set():
            time.sleep(0.005)
        real_sync(fd)

    async def write(k: int) -> None:
        task = asyncio.create_task(
            storage.write(setpoint_records("north", "p1", 30.0 + k, k))
        )
        pending.append(task)
        await task

    async def main() -> None:
        await storage.open()
        try:
            monkeypatch.setattr(sqlite_backend.os, "fdatasync", watched_sync)
            for k in range(3):
                await write(k)
            slow.set()
            for k in range(3, 10):
                await write(k)
        finally:
            await storage.close()

    storage = _storage(data_dir)
    run(main())
    loop_thread = threading.current_thread().name
    assert not any(answered for _, answered in synced), "answered before the sync"
    threads = [name for name, _ in synced]
    assert threads[:3] == [loop_thread] * 3
    assert threads[-1].startswith("calejo-sqlite-sync"), threads


def test_a_database_locked_elsewhere_is_waited_for_off_the_loop(
    data_dir: Path, setpoint_records: Records
) -> None:
    async def main() -> None:
        storage = _storage(data_dir, busy_timeout=10.0)
        await storage.open()
        other = sqlite3.connect(data_dir / "calejo.db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            write = asyncio.create_task(
                storage.write(setpoint_records("north", "p1", 31.0, 1))
            )
            # The loop keeps turning while the write waits for the lock.
            started = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.01)
            assert time.monotonic() - started < 1.0
            assert not write.done()

            other.execute("COMMIT")
            await asyncio.wait_for(write, 5)
            assert storage.health().state == "ok"
            rows = await storage.audit_query(AuditQuery())
            assert [row.record.details["k"] for row in rows] == [1]
        finally:
            other.close()
            await storage.close()

    run(main())


def test_the_wal_is_checkpointed_and_stays_small(
    data_dir: Path, setpoint_records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "CHECKPOINT_COMMITS", 10)
    checkpoints: list[float] = []
    real_checkpoint = SQLiteStorage._checkpoint

    def counted(self: SQLiteStorage) -> None:
        checkpoints.append(time.monotonic())
        real_checkpoint(self)

    monkeypatch.setattr(SQLiteStorage, "_checkpoint", counted)

    async def main() -> None:
        storage = _storage(data_dir)
        await storage.open()
        try:
            for k in range(400):
                await storage.write(setpoint_records("north", f"p{k % 8}", 30.0, k))
            wal = (data_dir / "calejo.db-wal").stat().st_size
            rows = await storage.audit_query(AuditQuery(limit=1000))
        finally:
            await storage.close()
        # 400 commits of a few pages each would leave several MB unchecked.
        assert wal < 1_000_000, f"WAL of {wal} bytes"
        assert len(rows) == 400

    run(main())
    assert len(checkpoints) >= 30


def test_a_wal_that_cannot_be_synced_spools_and_delivers_once(
    data_dir: Path, setpoint_records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = threading.Event()
    failing.set()
    real_sync = sqlite_backend.os.fdatasync

    def flaky_sync(fd: int) -> None:
        if failing.is_set():
            raise OSError(5, "Input/output error")
        real_sync(fd)

    async def main() -> None:
        storage = _storage(data_dir, retry_first=0.05, retry_max=0.1)
        await storage.open()
        try:
            monkeypatch.setattr(sqlite_backend.os, "fdatasync", flaky_sync)
            for k in range(5):
                await storage.write(setpoint_records("north", "p1", 30.0 + k, k))
            health = storage.health()
            assert health.state == "degraded", health
            assert "Input/output error" in (health.last_error or "")

            failing.clear()
            await _wait_for(
                lambda: storage.health().state == "ok", 10, "the spool delivered"
            )
            rows = await storage.audit_query(AuditQuery(limit=100))
            written = [
                row.record.details["k"] for row in rows if "k" in row.record.details
            ]
            assert written == [0, 1, 2, 3, 4]
            assert (await storage.audit_verify()).ok
        finally:
            failing.clear()
            await storage.close()

    run(main())
