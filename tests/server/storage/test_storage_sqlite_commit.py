"""How the SQLite backend commits: on the loop, synced before the answer.

A small group is committed on the event loop, but acknowledged only after
an ``fdatasync`` of the WAL, which runs off the loop (the loop keeps
serving meanwhile); a database locked by another process is
waited for on the writer thread, never on the loop; the WAL is
checkpointed by the sync thread, so it stays small however many commits
go by; a WAL that cannot be synced sends the writes to the spool, from
which they reach the database once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
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


def _noting(
    monkeypatch: pytest.MonkeyPatch, method: str, note: Callable[[], None]
) -> None:
    """``SQLiteStorage.<method>`` calls ``note()`` first, then does its work."""
    real = getattr(SQLiteStorage, method)

    def noted(self: SQLiteStorage) -> None:
        note()
        real(self)

    monkeypatch.setattr(SQLiteStorage, method, noted)


async def _stored_ks(storage: SQLiteStorage) -> list[Any]:
    """The ``k`` of each stored audit row that has one, in the log's order."""
    rows = await storage.audit_query(AuditQuery(limit=100))
    return [row.record.details["k"] for row in rows if "k" in row.record.details]


class HeldSyncer:
    """Stands in for the core's FileSyncer: the same eventfds, but each sync
    is done (really, with fdatasync) only when the test says so, or fails
    with ``failure`` while that is set."""

    made: list[HeldSyncer] = []

    def __init__(self, path: Path) -> None:
        self.path = os.fsencode(path)
        self.request_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.asked = 0
        self.hold = False
        self.failure = 0
        self.ended = False
        self.exit_errno: int | None = None
        HeldSyncer.made.append(self)

    def request(self) -> None:
        self.asked += 1
        if not self.hold:
            self.finish()

    def finish(self) -> None:
        if not self.failure:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        os.eventfd_write(self.done_fd, 1 + 2 * self.failure)

    def outcome(self) -> int | None:
        try:
            return (os.eventfd_read(self.done_fd) - 1) // 2
        except BlockingIOError:
            return None

    def end(self, failure: int) -> None:
        """The thread ends by itself, answering a waiting sync as the core's
        does: with the errno it ended on."""
        self.ended, self.exit_errno = True, failure
        os.eventfd_write(self.done_fd, 1 + 2 * failure)

    def alive(self) -> bool:
        return not self.ended

    def stop(self, timeout: float = 5.0) -> bool:
        os.close(self.request_fd)
        os.close(self.done_fd)
        return True


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> type[HeldSyncer]:
    HeldSyncer.made = []
    monkeypatch.setattr(sqlite_backend, "FileSyncer", HeldSyncer)
    return HeldSyncer


def test_the_answer_waits_for_the_wal_sync_and_the_loop_does_not(
    data_dir: Path, setpoint_records: Records, held: type[HeldSyncer]
) -> None:
    async def main() -> None:
        storage = _storage(data_dir)
        await storage.open()
        try:
            (syncer,) = held.made
            assert syncer.path == os.fsencode(data_dir / "calejo.db-wal")
            syncer.hold = True
            write = asyncio.create_task(
                storage.write(setpoint_records("north", "p1", 30.0, 1))
            )
            await _wait_for(lambda: syncer.asked == 1, 5, "the WAL sync to start")
            started = time.monotonic()
            for _ in range(20):
                await asyncio.sleep(0.01)
            assert time.monotonic() - started < 1.0, "the loop waited on the disk"
            assert not write.done(), "answered before the WAL was on disk"

            syncer.finish()
            await asyncio.wait_for(write, 5)
            rows = await storage.audit_query(AuditQuery())
            assert [row.record.details.get("k") for row in rows] == [1]
        finally:
            await storage.close()

    run(main())


def test_the_real_syncer_syncs_the_wal(
    data_dir: Path, setpoint_records: Records
) -> None:
    async def main() -> None:
        storage = _storage(data_dir)
        await storage.open()
        try:
            syncer = storage._wal_syncer
            assert syncer is not None and syncer.alive()
            assert syncer.path == os.fsencode(data_dir / "calejo.db-wal")
            for k in range(20):
                await storage.write(setpoint_records("north", "p1", 30.0, k))
        finally:
            await storage.close()
        assert not syncer.alive()

    run(main())


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
    _noting(monkeypatch, "_checkpoint", lambda: checkpoints.append(time.monotonic()))

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
    data_dir: Path, setpoint_records: Records, held: type[HeldSyncer]
) -> None:
    async def main() -> None:
        storage = _storage(data_dir, retry_first=0.05, retry_max=0.1)
        await storage.open()
        (syncer,) = held.made
        try:
            syncer.failure = errno.EIO
            for k in range(5):
                await storage.write(setpoint_records("north", "p1", 30.0 + k, k))
            health = storage.health()
            assert health.state == "degraded", health
            assert "Input/output error" in (health.last_error or "")

            syncer.failure = 0
            await _wait_for(
                lambda: storage.health().state == "ok", 10, "the spool delivered"
            )
            assert await _stored_ks(storage) == [0, 1, 2, 3, 4]
            assert (await storage.audit_verify()).ok
        finally:
            syncer.failure = 0
            await storage.close()

    run(main())


def test_without_its_sync_thread_the_wal_is_synced_on_a_pool_thread(
    data_dir: Path,
    setpoint_records: Records,
    held: type[HeldSyncer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    synced_on: list[str] = []
    _noting(
        monkeypatch,
        "_sync_wal",
        lambda: synced_on.append(threading.current_thread().name),
    )

    async def main() -> None:
        storage = _storage(data_dir)
        await storage.open()
        try:
            (syncer,) = held.made
            await storage.write(setpoint_records("north", "p1", 30.0, 0))
            assert (syncer.asked, synced_on) == (1, [])

            # Its thread ends while a sync is asked for and unanswered.
            syncer.hold = True
            first = asyncio.create_task(
                storage.write(setpoint_records("north", "p1", 31.0, 1))
            )
            await _wait_for(lambda: syncer.asked == 2, 5, "the second sync")
            with caplog.at_level(logging.WARNING, "calejo_server.storage.sqlite"):
                syncer.end(errno.EBADF)
                await asyncio.wait_for(first, 5)  # spooled, not lost
                for k in range(2, 6):
                    await storage.write(setpoint_records("north", "p1", 30.0, k))
                await _wait_for(
                    lambda: storage.health().state == "ok", 10, "the spool delivered"
                )

            assert "the WAL sync thread ended (Bad file descriptor)" in caplog.text
            assert syncer.asked == 2
            assert synced_on and all(
                name.startswith("calejo-sqlite-sync") for name in synced_on
            )
            assert storage._wal_syncer is None
            assert sorted(await _stored_ks(storage)) == [0, 1, 2, 3, 4, 5]
            assert (await storage.audit_verify()).ok
        finally:
            await storage.close()

    run(main())


def test_a_sync_thread_that_ends_during_a_wait_gets_no_more_requests(
    data_dir: Path, held: type[HeldSyncer]
) -> None:
    async def main() -> None:
        storage = _storage(data_dir)
        await storage.open()
        try:
            (syncer,) = held.made
            syncer.hold = True
            # A sync whose caller went away stays outstanding; the next
            # caller waits for it first.
            gone = asyncio.create_task(storage._sync())
            await _wait_for(lambda: syncer.asked == 1, 5, "the first sync")
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            waiting = asyncio.create_task(storage._sync())
            await asyncio.sleep(0.05)
            assert not waiting.done()

            syncer.end(errno.EBADF)
            await asyncio.wait_for(waiting, 5)  # synced on a pool thread
            assert syncer.asked == 1
            assert storage._wal_syncer is None
        finally:
            await storage.close()

    run(main())
