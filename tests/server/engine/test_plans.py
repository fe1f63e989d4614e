"""Optimizer plans: checks, versions, interval starts, overrides, reload."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from calejo_core import codecs
from calejo_server import audit
from calejo_server.engine import (
    EngineEvent,
    PlanConflict,
    PlanError,
    UnknownPump,
    UnknownStation,
)

from .conftest import BOTH_BACKENDS, CTX, START, Harness, MakeEngine

pytestmark = pytest.mark.anyio


def at(minutes: float) -> str:
    return (START + dt.timedelta(minutes=minutes)).isoformat()


def interval(start: float, end: float, setpoint: float, **extra: Any) -> dict[str, Any]:
    return {"start": at(start), "end": at(end), "setpoint": setpoint, **extra}


def plan(
    plan_id: str = "day",
    version: int = 1,
    pumps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "version": version,
        "description": "test plan",
        "pumps": pumps
        if pumps is not None
        else [
            {
                "station_id": "north",
                "pump_id": "p1",
                "intervals": [interval(-5, 10, 30), interval(10, 20, 40)],
            }
        ],
    }


def entry(
    pump_id: str, *intervals: dict[str, Any], station: str = "north"
) -> dict[str, Any]:
    return {"station_id": station, "pump_id": pump_id, "intervals": list(intervals)}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ([], None, "expected a JSON object"),
        ({**plan(), "extra": 1}, "extra", "unknown field"),
        ({**plan(), "plan_id": ""}, "plan_id", "expected an id"),
        ({**plan(), "version": 0}, "version", "integer of 1 or more"),
        ({**plan(), "version": True}, "version", "integer of 1 or more"),
        ({**plan(), "version": "2"}, "version", "integer of 1 or more"),
        ({**plan(), "pumps": []}, "pumps", "non-empty list"),
        (plan(pumps=[entry("p1")]), "pumps[0].intervals", "non-empty list"),
        (
            plan(pumps=[entry("p1", {"start": at(1), "end": at(2)})]),
            "pumps[0].intervals[0].setpoint",
            "expected a number, got null",
        ),
        (
            plan(pumps=[entry("p1", interval(1, 2, "40"))]),  # type: ignore[arg-type]
            "pumps[0].intervals[0].setpoint",
            "expected a number",
        ),
        (
            plan(pumps=[entry("p1", interval(2, 1, 40))]),
            "pumps[0].intervals[0]",
            "expected start before end",
        ),
        (
            plan(pumps=[entry("p1", interval(1, 5, 40), interval(4, 8, 30))]),
            "pumps[0].intervals[1]",
            "must not overlap",
        ),
        (
            plan(pumps=[entry("p1", interval(5, 8, 40), interval(1, 3, 30))]),
            "pumps[0].intervals[1]",
            "sorted",
        ),
        (
            plan(pumps=[entry("p1", interval(1, 2, 40), interval(-10, -1, 30))]),
            "pumps[0].intervals[1]",
            "sorted",
        ),
        (
            plan(pumps=[entry("p2", interval(-10, -1, 30))]),
            "pumps[0].intervals[0]",
            "ending in the future",
        ),
        (
            plan(pumps=[entry("p1", interval(-10, 0, 30))]),
            "pumps[0].intervals[0]",
            "ending in the future",
        ),
        (
            plan(
                pumps=[
                    entry(
                        "p1",
                        {"start": "2030-01-01T01:00:00", "end": at(90), "setpoint": 1},
                    )
                ]
            ),
            "pumps[0].intervals[0].start",
            "with a timezone",
        ),
        (
            plan(pumps=[entry("p1", {"start": "soon", "end": at(9), "setpoint": 1})]),
            "pumps[0].intervals[0].start",
            "ISO 8601",
        ),
        (
            plan(pumps=[entry("p1", interval(1, 2, 40, power="x"))]),
            "pumps[0].intervals[0].power",
            "expected a number",
        ),
        (
            plan(pumps=[entry("p1", {**interval(1, 2, 40), "speed": 1})]),
            "pumps[0].intervals[0].speed",
            "unknown field",
        ),
        (
            plan(
                pumps=[entry("p1", interval(1, 2, 40)), entry("p1", interval(3, 4, 1))]
            ),
            "pumps[1]",
            "each pump once",
        ),
        (
            plan(pumps=[entry("p1", *[interval(i, i + 1, 30) for i in range(10_001)])]),
            "pumps",
            "at most 10000 intervals",
        ),
    ],
)
async def test_plan_errors_name_the_field(
    make_engine: MakeEngine,
    harness: Harness,
    body: Any,
    field: str | None,
    words: str,
) -> None:
    engine = await make_engine()

    with pytest.raises(PlanError) as caught:
        await engine.submit_plan(body, CTX)

    assert caught.value.field == field
    assert words in str(caught.value)
    if field is not None:
        assert str(caught.value).startswith(f"{field}: ")
    assert engine.plans() == []
    rows = await harness.audit(audit.PLAN_REJECTED)
    assert len(rows) == 1
    assert rows[0].record.details["field"] == field


async def test_unknown_station_or_pump_in_a_plan(make_engine: MakeEngine) -> None:
    engine = await make_engine()

    with pytest.raises(
        UnknownStation, match=r"pumps\[0\]\.station_id: unknown station 'east'"
    ):
        await engine.submit_plan(
            plan(pumps=[entry("p1", interval(1, 2, 3), station="east")]), CTX
        )
    with pytest.raises(UnknownPump, match=r"pumps\[1\]\.pump_id: unknown pump 'p5'"):
        await engine.submit_plan(
            plan(
                pumps=[entry("p1", interval(1, 2, 3)), entry("p5", interval(1, 2, 3))]
            ),
            CTX,
        )


async def test_covering_interval_applies_on_arrival(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()

    view = await engine.submit_plan(plan(), CTX)

    assert view.state == "active"
    assert view.version == 1
    assert engine.pump("north", "p1").target == 30.0
    assert engine.pump("north", "p1").plan_id == "day"
    assert engine.pump("north", "p2").target == 35.0
    rows = await harness.audit(audit.PLAN_SETPOINT_APPLIED)
    assert len(rows) == 1
    record = rows[0].record
    assert (record.station_id, record.pump_id, record.new_value) == (
        "north",
        "p1",
        "30.0",
    )
    assert record.details["plan_id"] == "day"
    assert record.details["interval"] == 0
    assert len(await harness.audit(audit.PLAN_RECEIVED)) == 1
    assert harness.storage is not None
    snapshot = await harness.storage.load()
    assert [(p.plan_id, p.version) for p in snapshot.plans] == [("day", 1)]
    setpoints = {(s.station_id, s.pump_id): s for s in snapshot.setpoints}
    assert setpoints[("north", "p1")].source == "plan:day"


async def test_plan_refreshes_the_watchdog_of_named_stations(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()

    await engine.submit_plan(plan(), CTX)

    assert not engine.station("north").failsafe
    assert engine.station("south").failsafe
    assert engine.station("north").last_fresh_at == START


async def test_interval_start_applies_its_setpoint_once(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(plan(), CTX)

    harness.clock.advance(9 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 30.0
    harness.clock.advance(60)
    engine.tick()
    harness.clock.advance(1)
    engine.tick()
    engine.tick()

    assert engine.pump("north", "p1").target == 40.0
    await engine.flush()
    rows = await harness.audit(audit.PLAN_SETPOINT_APPLIED)
    assert [r.record.new_value for r in rows] == ["30.0", "40.0"]
    assert rows[1].record.details["interval"] == 1
    assert rows[1].record.protocol == "ENGINE"


async def test_direct_setpoint_overrides_until_the_next_interval(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(plan(), CTX)

    await engine.set_setpoint("north", "p1", 45, CTX)
    harness.clock.advance(5 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 45.0

    harness.clock.advance(5 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 40.0


async def test_no_covering_interval_keeps_the_last_target(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(plan(), CTX)
    assert not engine.station("north").plan_stale

    for minutes in (15, 10):
        harness.clock.advance(minutes * 60)
        engine.tick()

    assert engine.pump("north", "p1").target == 40.0
    assert engine.station("north").plan_stale
    assert engine.images[1].registers[1] & codecs.STATION_PLAN_STALE
    assert engine.plans()[0].state == "ended"


async def test_plan_stale_follows_the_newest_plan_of_a_station(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    assert engine.station("north").plan_stale

    await engine.submit_plan(plan(pumps=[entry("p1", interval(30, 40, 30))]), CTX)
    assert not engine.station("north").plan_stale
    assert not engine.images[1].registers[1] & codecs.STATION_PLAN_STALE
    assert engine.plans()[0].state == "pending"
    assert engine.station("south").plan_stale


async def test_same_or_older_version_is_a_conflict(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await engine.submit_plan(plan(version=3), CTX)

    with pytest.raises(PlanConflict, match="expected a version above 3, got 3"):
        await engine.submit_plan(plan(version=3), CTX)
    with pytest.raises(PlanConflict, match="got 2"):
        await engine.submit_plan(plan(version=2), CTX)
    assert [(p.plan_id, p.version) for p in engine.plans()] == [("day", 3)]


async def test_newer_version_supersedes(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    seen: list[EngineEvent] = []
    engine.subscribe(seen.append)
    await engine.submit_plan(plan(), CTX)

    newer = plan(
        version=2,
        pumps=[
            entry("p1", interval(-1, 30, 33)),
            entry("p2", interval(-1, 30, 44)),
        ],
    )
    await engine.submit_plan(newer, CTX)

    assert [(p.plan_id, p.version) for p in engine.plans()] == [("day", 2)]
    assert engine.pump("north", "p1").target == 33.0
    assert engine.pump("north", "p2").target == 44.0
    rows = await harness.audit(audit.PLAN_SUPERSEDED)
    assert [(r.record.old_value, r.record.new_value) for r in rows] == [("1", "2")]
    harness.clock.advance(10 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 33.0
    assert [e.kind for e in seen].count("plan") == 2


async def test_the_most_recent_plan_covering_a_pump_wins(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(
        plan("base", pumps=[entry("p1", interval(-1, 60, 25))]), CTX
    )
    await engine.submit_plan(
        plan("peak", pumps=[entry("p1", interval(5, 10, 45))]), CTX
    )
    assert engine.pump("north", "p1").target == 25.0

    harness.clock.advance(5 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 45.0
    assert engine.pump("north", "p1").plan_id == "peak"

    harness.clock.advance(5 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 25.0
    assert engine.pump("north", "p1").plan_id == "base"


@BOTH_BACKENDS
async def test_plans_reload_after_restart_without_reapplying(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(plan(), CTX)
    await engine.set_setpoint("north", "p1", 45, CTX)

    harness.clock.advance(60)
    engine = await harness.restart(engine)

    assert [(p.plan_id, p.version) for p in engine.plans()] == [("day", 1)]
    assert engine.pump("north", "p1").target == 45.0
    with pytest.raises(PlanConflict):
        await engine.submit_plan(plan(), CTX)

    harness.clock.advance(9 * 60)
    engine.tick()
    assert engine.pump("north", "p1").target == 40.0
    await engine.flush()
    rows = await harness.audit(audit.PLAN_SETPOINT_APPLIED)
    assert [r.record.new_value for r in rows] == ["30.0", "40.0"]


@BOTH_BACKENDS
async def test_interval_that_began_while_stopped_applies_at_start(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(plan(), CTX)
    await engine.stop()

    harness.clock.advance(12 * 60)
    engine = await harness.restart(engine)
    await engine.flush()

    assert engine.pump("north", "p1").target == 40.0
    rows = await harness.audit(audit.PLAN_SETPOINT_APPLIED)
    assert [r.record.new_value for r in rows] == ["30.0", "40.0"]


@BOTH_BACKENDS
async def test_records_reach_storage_in_the_order_of_the_changes(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.submit_plan(plan(), CTX)
    harness.clock.advance(10 * 60)
    engine.tick()

    # The interval's record is still queued when the override arrives.
    await engine.set_setpoint("north", "p1", 45, CTX)
    engine = await harness.restart(engine)

    assert engine.pump("north", "p1").target == 45.0
    rows = await harness.audit()
    kinds = [r.record.event_type for r in rows if r.record.pump_id == "p1"]
    assert kinds[-2:] == [audit.PLAN_SETPOINT_APPLIED, audit.SETPOINT_CHANGED]
