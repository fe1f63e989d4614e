"""The spool: its file format, delivery at open, and SQLite's degraded mode."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from calejo_server import audit
from calejo_server.storage.base import (
    AuditQuery,
    AuditRecord,
    EmergencyStopRecord,
    PlanRecord,
    Record,
    RoleRecord,
    SetpointRecord,
    StationRecord,
    StationStateRecord,
    StorageHealth,
    TokenRecord,
    UserRecord,
    utcnow,
)
from calejo_server.storage.spool import (
    Spool,
    SpoolFormatError,
    decode_batch,
    encode_batch,
)
from calejo_server.storage.sqlite import SQLiteStorage

Opened = Callable[..., Any]
Run = Callable[..., Any]

AT = dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


def _one_of_each() -> list[Record]:
    return [
        AuditRecord(
            event_type=audit.PLAN_RECEIVED,
            severity=audit.LOW,
            timestamp=AT,
            user="optimizer",
            details={"intervals": [1, 2], "note": "ünïcode"},
        ),
        SetpointRecord("st1", "p1", None, 35.0, 30.5, "clamped", "REST", None, AT),
        PlanRecord("night", 4, AT, {"pumps": []}, "optimizer"),
        EmergencyStopRecord("pump", "st1", "p1", True, "leak", "carol", AT, AT),
        StationStateRecord("st1", None, True),
        StationRecord("st1", {"name": "North"}),
        UserRecord(
            "u1",
            "alice",
            "a@example.org",
            "admin",
            "hash",
            True,
            False,
            0,
            None,
            AT,
            AT,
        ),
        RoleRecord("auditor", ("read_pump_status", "view_audit_log")),
        TokenRecord("f" * 64, "u1", AT, AT + dt.timedelta(hours=12), False),
    ]


def test_every_record_type_survives_a_spool_line() -> None:
    records = _one_of_each()
    line = encode_batch(records)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_batch(line[:-1]) == records


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"v":1,"records":[{"type":"setpoint"', "not JSON"),
        (b"[1, 2, 3]", "expected a batch of spool format 1"),
        (b'{"v":2,"records":[]}', "expected a batch of spool format 1"),
        (b'{"v":1,"records":[]}', "non-empty list of records"),
        (b'{"v":1,"records":[{"type":"bomb"}]}', "known record type"),
        (b'{"v":1,"records":[{"type":"station"}]}', "missing field 'station_id'"),
        (
            b'{"v":1,"records":[{"type":"station_state","station_id":"s",'
            b'"last_fresh_at":"yesterday","failsafe":true}]}',
            "ISO 8601",
        ),
        (
            b'{"v":1,"records":[{"type":"station_state","station_id":"s",'
            b'"last_fresh_at":"2025-01-01T00:00:00","failsafe":true}]}',
            "UTC offset",
        ),
        (b"\xff\xfe\x00garbage", "not JSON"),
    ],
)
def test_a_bad_spool_line_is_named(line: bytes, message: str) -> None:
    with pytest.raises(SpoolFormatError, match=message):
        decode_batch(line)


def test_bad_and_torn_lines_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool" / "x.jsonl")
    first = [StationStateRecord("st1", None, True)]
    second = [StationStateRecord("st2", AT, False)]
    spool.append([first])
    with open(spool.path, "ab") as f:
        f.write(b"{not json\n\n")
    spool.append([second])
    with open(spool.path, "ab") as f:
        f.write(b'{"v":1,"records":[{"type":"stat')

    with caplog.at_level(logging.ERROR):
        chunk = spool.read(0, 0)
    assert [(line, records) for line, records in chunk.batches] == [
        (1, first),
        (4, second),
    ]
    assert chunk.records == 2 and chunk.line == 4
    assert spool.tail(chunk.end).startswith(b'{"v":1')
    assert f"spool {spool.path} line 2 skipped" in caplog.text

    spool.close()
    third = [StationStateRecord("st3", None, False)]
    spool.append([third])
    again = spool.read(0, 0)
    assert [records for _, records in again.batches] == [first, second, third]
    assert spool.count_records() == 3

    spool.remove()
    assert not spool.path.exists()
    assert spool.read(0, 0).batches == []


def _leftover_spool(data_dir: Path, backend: str) -> tuple[Spool, list[list[Record]]]:
    """The spool a crashed process left: good lines, a bad one, a torn end."""
    spool = Spool(data_dir / "spool" / f"{backend}.jsonl")
    batches: list[list[Record]] = []
    for k in range(5):
        batches.append(
            [
                StationStateRecord("st1", AT + dt.timedelta(seconds=k), False),
                AuditRecord(
                    event_type=audit.SETPOINT_CHANGED,
                    severity=audit.LOW,
                    timestamp=AT + dt.timedelta(seconds=k),
                    details={"k": k},
                ),
            ]
        )
    spool.append(batches[:3])
    with open(spool.path, "ab") as f:
        f.write(b"garbage in the middle\n")
    spool.append(batches[3:])
    with open(spool.path, "ab") as f:
        f.write(b'{"v":1,"records":[{"type":"audit","event_t')
    spool.close()
    return spool, batches


def test_a_spool_left_by_a_crash_is_delivered_at_open(
    opened: Opened,
    arun: Run,
    backend: str,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool, batches = _leftover_spool(data_dir, backend)

    async def main() -> None:
        with caplog.at_level(logging.INFO):
            async with opened() as storage:
                assert storage.health().state == "ok"
                rows = await storage.audit_query(AuditQuery())
                snapshot = await storage.load()
                verdict = await storage.audit_verify()

        assert not spool.path.exists()
        assert [row.record.details.get("k") for row in rows[:-1]] == list(range(5))
        assert [row.record.uid for row in rows[:-1]] == [b[1].uid for b in batches]
        assert rows[-1].record.event_type == audit.STORAGE_RECOVERED
        assert snapshot.station_states[0].last_fresh_at == AT + dt.timedelta(seconds=4)
        assert verdict.ok
        assert caplog.text.count(f"spool {spool.path} line 4 skipped") == 1
        assert f"spool {spool.path} line 7 skipped: torn by a crash" in caplog.text

    arun(main())


def test_spooled_records_already_in_the_database_land_once(
    opened: Opened, arun: Run, backend: str, data_dir: Path
) -> None:
    async def main() -> None:
        spool = Spool(data_dir / "spool" / f"{backend}.jsonl")
        first = [AuditRecord(event_type="A", severity="LOW")]
        second = [AuditRecord(event_type="B", severity="LOW")]
        async with opened() as storage:
            await storage.write(first)
        spool.append([first, second])
        spool.close()
        async with opened() as storage:
            rows = await storage.audit_query(AuditQuery())
            verdict = await storage.audit_verify()
        assert [row.record.event_type for row in rows] == [
            "A",
            "B",
            audit.STORAGE_RECOVERED,
        ]
        assert verdict.ok

    arun(main())


def test_sqlite_spools_while_the_database_is_locked(
    data_dir: Path,
    arun: Run,
    setpoint_records: Callable[..., list[Record]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process holding the write lock makes SQLite degraded, not stuck."""
    storage = SQLiteStorage(
        data_dir / "calejo.db",
        data_dir,
        busy_timeout=0.1,
        retry_first=0.05,
        retry_max=0.2,
    )
    seen: list[StorageHealth] = []
    storage.add_health_listener(seen.append)
    release = threading.Event()
    locked = threading.Event()

    def hold_the_lock() -> None:
        con = sqlite3.connect(data_dir / "calejo.db", isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(20)
            con.execute("ROLLBACK")
        finally:
            con.close()

    async def main() -> None:
        await storage.open()
        try:
            await storage.write(setpoint_records("st1", "p1", 40.0, 0))
            holder = threading.Thread(target=hold_the_lock)
            holder.start()
            assert await asyncio.to_thread(locked.wait, 10)

            for k in range(1, 11):
                await storage.write(setpoint_records("st1", "p1", 40.0 + k, k))
            health = storage.health()
            assert health.state == "degraded"
            assert health.spooled == 31  # 10 writes of 3, and STORAGE_DEGRADED
            assert "database is locked" in health.detail
            assert storage.spool_path.exists()

            release.set()
            await asyncio.to_thread(holder.join, 10)
            await _wait_for(lambda: storage.health().state == "ok", 10)
            await storage.write(setpoint_records("st1", "p1", 99.0, 11))

            rows = await storage.audit_query(AuditQuery(limit=1000))
            snapshot = await storage.load()
            verdict = await storage.audit_verify()
        finally:
            release.set()
            await storage.close()

        events = [row.record.event_type for row in rows]
        assert events == (
            [audit.SETPOINT_CHANGED, audit.STORAGE_DEGRADED]
            + [audit.SETPOINT_CHANGED] * 10
            + [audit.STORAGE_RECOVERED, audit.SETPOINT_CHANGED]
        )
        ks = [
            r.record.details["k"]
            for r in rows
            if r.record.event_type == "SETPOINT_CHANGED"
        ]
        assert ks == list(range(12))
        assert [s.target for s in snapshot.setpoints] == [99.0]
        assert verdict.ok
        assert [h.state for h in seen] == ["ok", "degraded", "ok", "down"]
        assert not storage.spool_path.exists()
        assert "storage degraded: sqlite at" in caplog.text

    with caplog.at_level(logging.INFO):
        arun(main())


async def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def test_utcnow_is_aware() -> None:
    assert utcnow().tzinfo is dt.UTC
