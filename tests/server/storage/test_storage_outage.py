"""A PostgreSQL outage in the middle of a stream of writes.

The test's own PostgreSQL server is stopped the hard way (``pg_ctl stop -m
immediate``) while writers keep going; writes must keep returning, the
storage must say it is degraded and spool; when the server is back every
acknowledged record must be in the database exactly once, in order, and
the chain must verify.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from calejo_server import audit
from calejo_server.storage.base import AuditQuery, Record, StorageHealth
from calejo_server.storage.postgres import PostgresStorage

pytestmark = pytest.mark.postgres

Run = Callable[..., Any]

WRITERS = 4


@dataclasses.dataclass
class Acked:
    """What each writer was told is durable, in order."""

    uids: list[list[str]] = dataclasses.field(
        default_factory=lambda: [[] for _ in range(WRITERS)]
    )
    last_value: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(u) for u in self.uids)


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            for t in asyncio.all_tasks():
                coro = t.get_coro()
                print("TASK", t.get_name())
                while coro is not None:
                    frame = getattr(coro, "cr_frame", None) or getattr(
                        coro, "ag_frame", None
                    )
                    if frame is not None:
                        print(
                            "   ",
                            frame.f_code.co_filename,
                            frame.f_lineno,
                            frame.f_code.co_name,
                        )
                    coro = getattr(coro, "cr_await", None) or getattr(
                        coro, "ag_await", None
                    )
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def test_writes_survive_a_postgresql_outage(
    private_postgres: Any,
    data_dir: Path,
    arun: Run,
    setpoint_records: Callable[..., list[Record]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = private_postgres
    url = server.url()
    storage = PostgresStorage(
        url,
        data_dir,
        connect_timeout=1.0,
        command_timeout=2.0,
        retry_first=0.05,
        retry_max=0.3,
    )
    transitions: list[StorageHealth] = []
    storage.add_health_listener(transitions.append)
    acked = Acked()
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        k = 0
        while not stop.is_set():
            records = setpoint_records(f"st{w}", "p1", float(k), k)
            await storage.write(records)
            acked.uids[w].append(records[2].uid)  # type: ignore[union-attr]
            acked.last_value[f"st{w}"] = float(k)
            k += 1
            await asyncio.sleep(0.002)

    async def main() -> None:
        await storage.open()
        writers = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        try:
            await _wait_for(lambda: acked.count >= 40, 15, "writes before the outage")
            await asyncio.to_thread(server.stop, "immediate")
            before = acked.count

            await _wait_for(
                lambda: storage.health().state == "degraded", 10, "degraded"
            )
            await _wait_for(lambda: acked.count >= before + 80, 15, "writes while down")
            degraded = storage.health()
            assert degraded.spooled > 0
            assert "unreachable" in degraded.detail
            assert storage.spool_path.exists()
            assert storage.spool_path.stat().st_size > 0

            await asyncio.to_thread(server.start)
            await _wait_for(lambda: storage.health().state == "ok", 20, "recovered")
            recovered_at = acked.count
            await _wait_for(
                lambda: acked.count >= recovered_at + 20, 10, "writes after"
            )
        finally:
            stop.set()
            await asyncio.gather(*writers, return_exceptions=True)
        for task in writers:
            assert task.exception() is None, task.exception()

        verdict = await storage.audit_verify()
        snapshot = await storage.load()
        rows = [row async for row in storage.audit_iter()]
        await storage.close()

        assert verdict.ok, verdict
        assert verdict.checked == len(rows)
        stored = [row.record.uid for row in rows]
        assert len(stored) == len(set(stored)), "a record landed twice"
        position = {uid: index for index, uid in enumerate(stored)}
        for w in range(WRITERS):
            assert all(uid in position for uid in acked.uids[w]), "an ack was lost"
            places = [position[uid] for uid in acked.uids[w]]
            assert places == sorted(places), f"writer {w} out of order"

        events = [row.record.event_type for row in rows]
        assert events.count(audit.STORAGE_DEGRADED) == 1
        assert events.count(audit.STORAGE_RECOVERED) == 1
        assert events.index(audit.STORAGE_DEGRADED) < events.index(
            audit.STORAGE_RECOVERED
        )
        assert {s.station_id: s.target for s in snapshot.setpoints} == acked.last_value
        assert [h.state for h in transitions] == ["ok", "degraded", "ok", "down"]
        assert not storage.spool_path.exists()

        conn = await asyncpg.connect(url, timeout=5)
        try:
            duplicates = await conn.fetchval(
                "SELECT count(*) FROM (SELECT uid FROM compliance_audit_log "
                "GROUP BY uid HAVING count(*) > 1) AS d"
            )
        finally:
            await conn.close()
        assert duplicates == 0

    with caplog.at_level(logging.INFO):
        arun(main(), timeout=90)
    assert "storage degraded: postgresql at 127.0.0.1:" in caplog.text
    assert "storage recovered: postgresql at 127.0.0.1:" in caplog.text


def test_reads_fail_clearly_while_postgresql_is_down(
    private_postgres: Any, data_dir: Path, arun: Run
) -> None:
    server = private_postgres
    storage = PostgresStorage(
        server.url(), data_dir, connect_timeout=1.0, command_timeout=2.0
    )

    async def main() -> None:
        await storage.open()
        try:
            await asyncio.to_thread(server.stop, "immediate")
            with pytest.raises(Exception, match="read failed") as caught:
                await storage.audit_query(AuditQuery())
            assert type(caught.value).__name__ == "StorageError"
        finally:
            await storage.close()

    arun(main(), timeout=60)


def test_a_spool_waits_for_postgresql_at_open(
    private_postgres: Any,
    data_dir: Path,
    arun: Run,
    setpoint_records: Callable[..., list[Record]],
) -> None:
    """Records spooled before a crash stay on disk until PostgreSQL answers."""
    server = private_postgres
    options: dict[str, Any] = {
        "connect_timeout": 1.0,
        "command_timeout": 2.0,
        "retry_first": 0.05,
        "retry_max": 0.2,
    }

    async def main() -> None:
        storage = PostgresStorage(server.url(), data_dir, **options)
        await storage.open()
        await asyncio.to_thread(server.stop, "immediate")
        records = setpoint_records("st1", "p1", 44.0, 0)
        await storage.write(records)
        assert storage.health().state == "degraded"
        await storage.close()
        assert storage.spool_path.exists()

        again = PostgresStorage(server.url(), data_dir, **options)
        with pytest.raises(Exception, match="unreachable"):
            await again.open()
        assert storage.spool_path.exists()

        await asyncio.to_thread(server.start)
        third = PostgresStorage(server.url(), data_dir, **options)
        await third.open()
        try:
            rows = await third.audit_query(AuditQuery())
            snapshot = await third.load()
        finally:
            await third.close()
        assert records[2].uid in [row.record.uid for row in rows]  # type: ignore[union-attr]
        assert [s.target for s in snapshot.setpoints] == [44.0]
        assert not storage.spool_path.exists()

    arun(main(), timeout=60)
