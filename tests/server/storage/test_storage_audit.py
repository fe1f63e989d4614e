"""The audit log in both backends: append-only, chained, queried, exported."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import itertools
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from calejo_server import audit
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditQuery, AuditRecord, Storage

Opened = Callable[..., Any]
Run = Callable[..., Any]

BASE = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def _records(count: int) -> list[AuditRecord]:
    """A varied log: stations, users, severities, a minute apart."""
    kinds = [
        (audit.SETPOINT_CHANGED, "st1", "alice"),
        (audit.INVALID_AUTHENTICATION, None, "mallory"),
        (audit.EMERGENCY_STOP_ACTIVATED, "st2", "carol"),
        (audit.SETPOINT_REJECTED, "st2", "alice"),
    ]
    records = []
    for k in range(count):
        event_type, station_id, user = kinds[k % len(kinds)]
        records.append(
            AuditRecord(
                event_type=event_type,
                severity=audit.SEVERITY_OF[event_type],
                timestamp=BASE + dt.timedelta(minutes=k),
                user=user,
                source_address="10.0.0.7",
                protocol="REST",
                station_id=station_id,
                pump_id="p1" if station_id else None,
                old_value="40.0",
                new_value="=41.5" if k == 0 else "41.5",
                outcome="accepted",
                details={"k": k},
            )
        )
    return records


class Database:
    """Direct SQL on the test's database, as its owner, around the storage."""

    def __init__(self, backend: str, url: str | None, data_dir: Path) -> None:
        self.backend = backend
        self.url = url
        self.path = data_dir / "calejo.db"

    async def execute(self, *statements: str) -> None:
        if self.backend == "sqlite":
            con = sqlite3.connect(self.path, isolation_level=None)
            try:
                for statement in statements:
                    con.execute(statement)
            finally:
                con.close()
            return
        assert self.url is not None
        conn = await asyncpg.connect(self.url, timeout=5)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def tamper(self, statement: str) -> None:
        """Run ``statement`` with the append-only triggers out of the way."""
        if self.backend == "sqlite":
            await self.execute(
                "DROP TRIGGER compliance_audit_log_no_update",
                "DROP TRIGGER compliance_audit_log_no_delete",
                statement,
            )
            return
        await self.execute(
            "ALTER TABLE compliance_audit_log DISABLE TRIGGER USER",
            statement,
            "ALTER TABLE compliance_audit_log ENABLE TRIGGER USER",
        )


@pytest.fixture
def database(backend: str, database_url: str | None, data_dir: Path) -> Database:
    return Database(backend, database_url, data_dir)


async def _filled(storage: Storage, count: int) -> None:
    records = _records(count)
    for start in range(0, count, 7):
        await storage.write(records[start : start + 7])


def test_the_chain_verifies(opened: Opened, arun: Run) -> None:
    async def main() -> None:
        async with opened() as storage:
            assert await audit.verify(storage) == audit.ChainVerdict(ok=True, checked=0)
            await _filled(storage, 40)
            verdict = await audit.verify(storage)
            rows = [row async for row in storage.audit_iter()]

        assert verdict == audit.ChainVerdict(ok=True, checked=40)
        assert rows[0].prev_hash == audit.GENESIS_HASH
        assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
        assert audit.verify_chain(rows).ok

    arun(main())


def test_large_groups_are_chained_in_order(opened: Opened, arun: Run) -> None:
    records = _records(150)

    async def main() -> None:
        async with opened() as storage:
            await storage.write(records[:70])
            await asyncio.gather(
                *(storage.write(records[k : k + 16]) for k in range(70, 150, 16))
            )
            verdict = await audit.verify(storage)
            rows = [row async for row in storage.audit_iter()]

        assert verdict == audit.ChainVerdict(ok=True, checked=150)
        assert [row.id for row in rows] == list(range(1, 151))
        assert [row.record for row in rows] == records

    arun(main())


@pytest.mark.parametrize("statement", ["UPDATE", "DELETE"])
def test_the_log_refuses_update_and_delete(
    opened: Opened, arun: Run, database: Database, statement: str
) -> None:
    sql = {
        "UPDATE": "UPDATE compliance_audit_log SET outcome = 'forged' WHERE id = 2",
        "DELETE": "DELETE FROM compliance_audit_log WHERE id = 2",
    }[statement]

    async def main() -> None:
        async with opened() as storage:
            await _filled(storage, 3)
            with pytest.raises(
                (sqlite3.IntegrityError, asyncpg.InsufficientPrivilegeError),
                match=f"append-only: {statement} refused",
            ):
                await database.execute(sql)
            assert (await audit.verify(storage)).ok

    arun(main())


@pytest.mark.postgres
def test_postgresql_refuses_truncate(
    postgres_url: str, data_dir: Path, arun: Run
) -> None:
    storage = open_storage(postgres_url, data_dir)

    async def main() -> None:
        await storage.open()
        try:
            await _filled(storage, 3)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE"):
                await Database("postgresql", postgres_url, data_dir).execute(
                    "TRUNCATE compliance_audit_log"
                )
        finally:
            await storage.close()

    arun(main())


@pytest.mark.parametrize(
    ("statement", "bad_id", "reason"),
    [
        (
            "UPDATE compliance_audit_log SET new_value = '20.0' WHERE id = 13",
            13,
            "row 13: content changed",
        ),
        (
            "UPDATE compliance_audit_log SET user_name = NULL WHERE id = 1",
            1,
            "row 1: content changed",
        ),
        (
            "UPDATE compliance_audit_log SET hash = prev_hash WHERE id = 7",
            7,
            "row 7: content changed",
        ),
        (
            "UPDATE compliance_audit_log SET prev_hash = hash WHERE id = 9",
            9,
            "row 9: link broken",
        ),
        ("DELETE FROM compliance_audit_log WHERE id = 5", 6, "row 5 is missing"),
        (
            "DELETE FROM compliance_audit_log WHERE id IN (5, 6, 7)",
            8,
            "rows 5 to 7 are missing",
        ),
        ("DELETE FROM compliance_audit_log WHERE id = 1", 2, "row 1 is missing"),
        ("DELETE FROM compliance_audit_log WHERE id >= 19", 19, "rows 19 to 20"),
    ],
)
def test_tampering_is_found_and_named(
    opened: Opened,
    arun: Run,
    database: Database,
    statement: str,
    bad_id: int,
    reason: str,
) -> None:
    async def main() -> None:
        async with opened() as storage:
            await _filled(storage, 20)
            await database.tamper(statement)
            verdict = await storage.audit_verify()

        assert not verdict.ok
        assert verdict.first_bad_id == bad_id, verdict
        assert verdict.reason is not None and reason in verdict.reason, verdict

    arun(main())


def test_details_changed_inside_the_json_are_found(
    opened: Opened, arun: Run, database: Database, backend: str
) -> None:
    statement = {
        "sqlite": "UPDATE compliance_audit_log SET details = '{\"k\":99}' WHERE id = 4",
        "postgresql": (
            "UPDATE compliance_audit_log SET details = '{\"k\": 99}' WHERE id = 4"
        ),
    }[backend]

    async def main() -> None:
        async with opened() as storage:
            await _filled(storage, 6)
            await database.tamper(statement)
            verdict = await storage.audit_verify()
        assert (verdict.ok, verdict.first_bad_id) == (False, 4)

    arun(main())


def test_appends_continue_the_chain_after_reopening(opened: Opened, arun: Run) -> None:
    async def main() -> None:
        async with opened() as storage:
            await _filled(storage, 5)
        async with opened() as storage:
            await _filled(storage, 5)
            verdict = await storage.audit_verify()
            rows = await storage.audit_query(AuditQuery(limit=100))
        assert verdict == audit.ChainVerdict(ok=True, checked=10)
        assert [row.id for row in rows] == list(range(1, 11))

    arun(main())


def test_audit_query_filters_and_pages(opened: Opened, arun: Run) -> None:
    async def main() -> None:
        async with opened() as storage:
            await _filled(storage, 24)

            async def ids(**filters: Any) -> list[int]:
                rows = await storage.audit_query(AuditQuery(**filters))
                return [row.id for row in rows]

            assert await ids(limit=1000) == list(range(1, 25))
            assert await ids(severity="HIGH") == list(range(2, 25, 4))
            assert await ids(severity="CRITICAL") == list(range(3, 25, 4))
            assert await ids(event_type=audit.SETPOINT_REJECTED) == list(
                range(4, 25, 4)
            )
            assert await ids(station_id="st2") == sorted(
                [*range(3, 25, 4), *range(4, 25, 4)]
            )
            assert await ids(user="mallory") == list(range(2, 25, 4))
            assert await ids(
                since=BASE + dt.timedelta(minutes=10),
                until=BASE + dt.timedelta(minutes=12),
            ) == [11, 12, 13]
            assert await ids(since=BASE + dt.timedelta(hours=1)) == []
            assert await ids(user="alice", severity="LOW", station_id="st1") == list(
                range(1, 25, 4)
            )

            pages: list[list[int]] = []
            after = 0
            while True:
                page = await ids(after_id=after, limit=5, user="alice")
                if not page:
                    break
                pages.append(page)
                after = page[-1]
            assert pages == [
                [1, 4, 5, 8, 9],
                [12, 13, 16, 17, 20],
                [21, 24],
            ]

            since = [
                row.id
                async for row in storage.audit_iter(BASE + dt.timedelta(minutes=20))
            ]
            assert since == [21, 22, 23, 24]

    arun(main())


def test_export_csv_and_json(opened: Opened, arun: Run) -> None:
    async def main() -> tuple[str, str, int, int, int]:
        async with opened() as storage:
            await _filled(storage, 6)
            as_csv = io.StringIO()
            as_json = io.StringIO()
            partial = io.StringIO()
            csv_count = await audit.export(storage, "csv", as_csv)
            json_count = await audit.export(storage, "json", as_json)
            since_count = await audit.export(
                storage, "json", partial, since=BASE + dt.timedelta(minutes=4)
            )
        return as_csv.getvalue(), as_json.getvalue(), csv_count, json_count, since_count

    text_csv, text_json, csv_count, json_count, since_count = arun(main())

    assert (csv_count, json_count, since_count) == (6, 6, 2)
    table = list(csv.DictReader(io.StringIO(text_csv)))
    assert [int(r["id"]) for r in table] == list(range(1, 7))
    assert list(table[0]) == list(audit.EXPORT_COLUMNS)
    assert table[0]["new_value"] == "'=41.5"
    assert table[1]["new_value"] == "41.5"
    assert table[1]["event_type"] == audit.INVALID_AUTHENTICATION
    assert json.loads(table[2]["details"]) == {"k": 2}
    assert table[0]["timestamp"] == "2025-03-01T12:00:00.000000+00:00"

    items = json.loads(text_json)
    assert [item["id"] for item in items] == list(range(1, 7))
    assert items[0]["new_value"] == "=41.5"
    assert items[5]["details"] == {"k": 5}
    assert items[1]["prev_hash"] == items[0]["hash"]


def test_verify_is_bounded_by_the_head_and_sees_concurrent_appends(
    opened: Opened, arun: Run
) -> None:
    async def main() -> None:
        async with opened() as storage:
            await _filled(storage, 10)
            verdict, _ = await asyncio.gather(
                storage.audit_verify(), _filled(storage, 10)
            )
            assert verdict.ok and verdict.checked in range(10, 21)
            assert (await storage.audit_verify()).checked == 20

    arun(main())
