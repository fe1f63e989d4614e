"""Records through write() and load(), on both backends; group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import time
import uuid
from collections.abc import Callable
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
    StorageError,
    TokenRecord,
    UserRecord,
    new_uid,
    utcnow,
)
from calejo_server.storage.sqlite import _many_rows, _text_time

Opened = Callable[..., Any]
Run = Callable[..., Any]


def _at(minutes: float) -> dt.datetime:
    return dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=minutes)


def _user(user_id: str, username: str, **changes: Any) -> UserRecord:
    user = UserRecord(
        user_id=user_id,
        username=username,
        email=f"{username}@example.org",
        role="operator",
        password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        active=True,
        must_change_password=False,
        failed_logins=0,
        locked_until=None,
        created_at=_at(0),
        updated_at=_at(0),
    )
    return dataclasses.replace(user, **changes)


def test_every_record_type_round_trips(opened: Opened, arun: Run) -> None:
    now = utcnow()
    valid_token = TokenRecord(
        token_hash="a" * 64,
        user_id="u1",
        created_at=now,
        expires_at=now + dt.timedelta(hours=1),
        revoked=False,
    )
    records: list[Record] = [
        _user("u1", "alice", locked_until=_at(30), failed_logins=2),
        _user("u2", "bob", active=False, must_change_password=True),
        RoleRecord(role="operator", permissions=("read_pump_status", "emergency_stop")),
        RoleRecord(role="viewer", permissions=()),
        valid_token,
        dataclasses.replace(valid_token, token_hash="b" * 64, revoked=True),
        dataclasses.replace(
            valid_token, token_hash="c" * 64, expires_at=now - dt.timedelta(seconds=1)
        ),
        SetpointRecord(
            station_id="st1",
            pump_id="p1",
            requested=55.5,
            target=50.0,
            applied=42.25,
            outcome="clamped",
            source="plan:night",
            user=None,
            at=_at(1),
        ),
        SetpointRecord(
            station_id="st1",
            pump_id="p2",
            requested=None,
            target=35.0,
            applied=35.0,
            outcome="rejected",
            source="MODBUS",
            user="scada",
            at=_at(2),
        ),
        PlanRecord(
            plan_id="night",
            version=3,
            received_at=_at(3),
            body={"pumps": [{"pump_id": "p1", "intervals": [{"setpoint": 41.5}]}]},
            user="optimizer",
        ),
        EmergencyStopRecord(
            level="system",
            station_id=None,
            pump_id=None,
            active=True,
            reason="flooding",
            operator="carol",
            at=_at(4),
            since=_at(4),
        ),
        EmergencyStopRecord(
            level="station",
            station_id="st1",
            pump_id=None,
            active=False,
            reason="cleared",
            operator="carol",
            at=_at(5),
            since=None,
        ),
        EmergencyStopRecord(
            level="pump",
            station_id="st1",
            pump_id="p2",
            active=True,
            reason="bearing",
            operator="dave",
            at=_at(6),
            since=_at(6),
        ),
        StationStateRecord(station_id="st1", last_fresh_at=_at(7), failsafe=False),
        StationStateRecord(station_id="st2", last_fresh_at=None, failsafe=True),
        StationRecord(
            station_id="st1",
            definition={"name": "North", "pumps": [{"pump_id": "p1", "max": 50.0}]},
        ),
    ]

    async def main() -> None:
        async with opened() as storage:
            await storage.write(records)
        async with opened() as storage:
            snapshot = await storage.load()

        assert snapshot.users == [r for r in records if isinstance(r, UserRecord)]
        assert snapshot.roles == [r for r in records if isinstance(r, RoleRecord)]
        assert snapshot.tokens == [valid_token]
        assert snapshot.setpoints == [
            r for r in records if isinstance(r, SetpointRecord)
        ]
        assert snapshot.plans == [r for r in records if isinstance(r, PlanRecord)]
        assert sorted(snapshot.emergency_stops, key=lambda r: r.level) == sorted(
            (r for r in records if isinstance(r, EmergencyStopRecord)),
            key=lambda r: r.level,
        )
        assert snapshot.station_states == [
            r for r in records if isinstance(r, StationStateRecord)
        ]
        assert snapshot.stations == [r for r in records if isinstance(r, StationRecord)]

    arun(main())


def test_latest_state_wins(opened: Opened, arun: Run) -> None:
    def setpoint(value: float, minutes: float) -> SetpointRecord:
        return SetpointRecord(
            station_id="st1",
            pump_id="p1",
            requested=value,
            target=value,
            applied=value,
            outcome="accepted",
            source="REST",
            user="alice",
            at=_at(minutes),
        )

    def plan(version: int) -> PlanRecord:
        return PlanRecord(
            plan_id="day",
            version=version,
            received_at=_at(version),
            body={"version": version},
            user=None,
        )

    def stop(active: bool, minutes: float) -> EmergencyStopRecord:
        return EmergencyStopRecord(
            level="station",
            station_id="st1",
            pump_id=None,
            active=active,
            reason="test",
            operator="carol",
            at=_at(minutes),
            since=_at(1) if active else None,
        )

    async def main() -> None:
        async with opened() as storage:
            await storage.write([setpoint(40.0, 1), plan(2), stop(True, 1)])
            await storage.write([setpoint(45.0, 2), setpoint(47.5, 3)])
            await storage.write([plan(1)])
            await storage.write([stop(False, 4), _user("u1", "alice")])
            await storage.write([_user("u1", "alice2", failed_logins=4)])
            snapshot = await storage.load()

        assert [s.target for s in snapshot.setpoints] == [47.5]
        assert [p.version for p in snapshot.plans] == [2]
        assert [s.active for s in snapshot.emergency_stops] == [False]
        assert [(u.username, u.failed_logins) for u in snapshot.users] == [
            ("alice2", 4)
        ]

    arun(main())


def test_one_commit_of_many_states_keeps_the_last_of_each(
    opened: Opened, arun: Run
) -> None:
    def setpoint(pump: str, value: float, minutes: float) -> SetpointRecord:
        return SetpointRecord(
            "st1", pump, value, value, value, "accepted", "REST", None, _at(minutes)
        )

    def state(station: str, minutes: float, failsafe: bool) -> StationStateRecord:
        return StationStateRecord(station, _at(minutes), failsafe)

    writes = [
        [setpoint(f"p{k % 3}", 30.0 + k, k), state(f"st{k % 2}", k, k % 4 == 1)]
        for k in range(12)
    ]
    plans = [
        PlanRecord("day", version, _at(version), {"version": version}, None)
        for version in (3, 1, 2)
    ]

    async def main() -> None:
        async with opened() as storage:
            await asyncio.gather(*(storage.write(records) for records in writes))
            await storage.write(plans)
            snapshot = await storage.load()

        assert [(s.pump_id, s.target, s.at) for s in snapshot.setpoints] == [
            ("p0", 39.0, _at(9)),
            ("p1", 40.0, _at(10)),
            ("p2", 41.0, _at(11)),
        ]
        assert [
            (s.station_id, s.last_fresh_at, s.failsafe) for s in snapshot.station_states
        ] == [
            ("st0", _at(10), False),
            ("st1", _at(11), False),
        ]
        assert [p.version for p in snapshot.plans] == [3]

    arun(main())


def test_odd_text_and_numbers_are_stored_and_chained(opened: Opened, arun: Run) -> None:
    record = AuditRecord(
        event_type=audit.INVALID_AUTHENTICATION,
        severity=audit.HIGH,
        user="mallory\x00'; DROP TABLE users; --",
        source_address="\ud800bad",
        details={
            "nan": math.nan,
            "inf": -math.inf,
            "big": 1e20,
            "negative_zero": -0.0,
            "tiny": 1.5e-7,
            "tuple": (1, 2.5, "x"),
            7: "int key",
            "nested": {"when": _at(0), "text": "ümlaut"},
        },
    )

    async def main() -> None:
        async with opened() as storage:
            await storage.write([record])
            rows = await storage.audit_query(AuditQuery())
            verdict = await storage.audit_verify()

        assert verdict.ok, verdict
        stored = rows[0].record
        assert stored.user == "mallory\ufffd'; DROP TABLE users; --"
        assert stored.source_address == "\ufffdbad"
        assert stored.details == {
            "nan": "NaN",
            "inf": "-Infinity",
            "big": 100000000000000000000,
            "negative_zero": 0.0,
            "tiny": 1.5e-7,
            "tuple": [1, 2.5, "x"],
            "7": "int key",
            "nested": {"when": "2025-03-01T12:00:00.000000+00:00", "text": "ümlaut"},
        }

    arun(main())


def test_naive_and_offset_times_are_stored_as_utc(opened: Opened, arun: Run) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))

    async def main() -> None:
        async with opened() as storage:
            await storage.write(
                [
                    StationStateRecord(
                        station_id="st1",
                        last_fresh_at=dt.datetime(2025, 3, 1, 14, 0, tzinfo=plus_two),
                        failsafe=False,
                    ),
                    StationStateRecord(
                        station_id="st2",
                        last_fresh_at=dt.datetime(2025, 3, 1, 12, 0),
                        failsafe=False,
                    ),
                ]
            )
            snapshot = await storage.load()

        expected = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
        assert [s.last_fresh_at for s in snapshot.station_states] == [expected] * 2
        assert all(s.last_fresh_at.tzinfo is not None for s in snapshot.station_states)  # type: ignore[union-attr]

    arun(main())


def test_write_refuses_what_is_not_a_record(opened: Opened, arun: Run) -> None:
    async def main() -> None:
        async with opened() as storage:
            with pytest.raises(StorageError, match="expected a storage record"):
                await storage.write([{"event_type": "X"}])  # type: ignore[list-item]
            with pytest.raises(StorageError, match="expected severity"):
                await storage.write(
                    [AuditRecord(event_type="X", severity="SEVERE")]  # type: ignore[arg-type]
                )
            await storage.write([])
            assert await storage.audit_query(AuditQuery()) == []

    arun(main())


def test_write_needs_an_open_storage(opened: Opened, arun: Run) -> None:
    async def main() -> None:
        async with opened() as storage:
            pass
        with pytest.raises(StorageError, match="closed"):
            await storage.write([StationStateRecord("st1", None, False)])
        assert storage.health().state == "down"

    arun(main())


def test_concurrent_writes_are_grouped_and_keep_their_order(
    opened: Opened, arun: Run, setpoint_records: Callable[..., list[Record]]
) -> None:
    writers, writes = 32, 25
    commits: list[int] = []

    async def main() -> None:
        async with opened() as storage:
            commit = storage._commit

            async def counting(batches: Any, *, dedupe: bool) -> None:
                commits.append(len(batches))
                await commit(batches, dedupe=dedupe)

            storage._commit = counting

            async def writer(w: int) -> None:
                for k in range(writes):
                    await storage.write(setpoint_records("st1", f"p{w}", 30.0 + k, k))

            await asyncio.gather(*(writer(w) for w in range(writers)))
            rows = [row async for row in storage.audit_iter()]
            snapshot = await storage.load()
            verdict = await storage.audit_verify()

        assert sum(commits) == writers * writes
        assert len(commits) < writers * writes / 4, commits
        assert verdict.ok and verdict.checked == writers * writes
        assert [row.id for row in rows] == list(range(1, writers * writes + 1))
        by_pump: dict[str, list[int]] = {}
        for row in rows:
            by_pump.setdefault(row.record.pump_id or "", []).append(
                row.record.details["k"]
            )
        assert by_pump == {f"p{w}": list(range(writes)) for w in range(writers)}
        assert {s.pump_id: s.target for s in snapshot.setpoints} == {
            f"p{w}": 30.0 + writes - 1 for w in range(writers)
        }

    arun(main())


def test_a_refused_write_fails_alone(
    opened: Opened, arun: Run, setpoint_records: Callable[..., list[Record]]
) -> None:
    bad_stop = EmergencyStopRecord(
        level="everything",  # type: ignore[arg-type]
        station_id=None,
        pump_id=None,
        active=True,
        reason="typo",
        operator="carol",
        at=utcnow(),
        since=None,
    )
    bad_audit = AuditRecord(event_type="BAD_BATCH", severity="LOW")

    async def main() -> None:
        async with opened() as storage:
            good = [
                storage.write(setpoint_records("st1", f"p{i}", 40.0, i))
                for i in range(8)
            ]
            bad = storage.write([bad_audit, bad_stop])
            results = await asyncio.gather(
                *good[:4], bad, *good[4:], return_exceptions=True
            )
            rows = await storage.audit_query(AuditQuery())
            verdict = await storage.audit_verify()

        assert [r for r in results if r is not None] == [results[4]]
        assert isinstance(results[4], StorageError)
        assert "refused" in str(results[4])
        assert len(rows) == 8
        assert all(row.record.event_type != "BAD_BATCH" for row in rows)
        assert verdict.ok

    arun(main())


def test_the_same_audit_record_is_stored_once(opened: Opened, arun: Run) -> None:
    record = AuditRecord(event_type=audit.LOGIN_SUCCESS, severity=audit.LOW, user="a")

    async def main() -> None:
        async with opened() as storage:
            await storage.write([record])
            await storage.write([record, StationStateRecord("st1", None, True)])
            rows = await storage.audit_query(AuditQuery())
            snapshot = await storage.load()
            verdict = await storage.audit_verify()

        assert [row.record.uid for row in rows] == [record.uid]
        assert [s.failsafe for s in snapshot.station_states] == [True]
        assert verdict.ok

    arun(main())


def test_health_is_ok_when_open(opened: Opened, arun: Run, backend: str) -> None:
    async def main() -> None:
        async with opened() as storage:
            health = storage.health()
        assert health.state == "ok"
        assert health.backend == backend
        assert health.spooled == 0

    arun(main())


def test_uids_are_time_ordered_version_7_uuids_in_hex() -> None:
    before = time.time_ns() // 1_000_000
    uids = [new_uid() for _ in range(2000)]
    after = time.time_ns() // 1_000_000

    assert len(set(uids)) == len(uids)
    for uid in uids:
        parsed = uuid.UUID(hex=uid)
        assert parsed.hex == uid
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= int(uid[:12], 16) <= after
    prefixes = [uid[:12] for uid in uids]
    assert prefixes == sorted(prefixes)


def test_stored_times_are_each_moment_in_iso_form() -> None:
    utc = dt.datetime(2030, 1, 1, 12, 0, 0, 250, tzinfo=dt.UTC)
    same_instant = utc.astimezone(dt.timezone(dt.timedelta(hours=2)))
    moments = [utc, utc, same_instant, utc, _at(1), _at(1), same_instant]

    for moment in moments:
        assert _text_time(moment) == moment.isoformat(timespec="microseconds")


def test_a_multi_row_insert_repeats_the_one_row() -> None:
    insert = "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO UPDATE SET b = 1"

    assert _many_rows(insert, 3) == (
        "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?) "
        "ON CONFLICT (a) DO UPDATE SET b = 1"
    )
    with pytest.raises(ValueError, match="one VALUES row"):
        _many_rows("DELETE FROM t", 2)
