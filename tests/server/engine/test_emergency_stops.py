"""Emergency stops: three latching levels, exact cover, persistence, audit."""

from __future__ import annotations

import pytest

from calejo_core import codecs
from calejo_server import audit
from calejo_server.engine import (
    EmergencyStopConflict,
    Engine,
    EngineEvent,
    InvalidRequest,
    UnknownPump,
    UnknownStation,
)

from .conftest import BOTH_BACKENDS, CTX, Harness, MakeEngine

pytestmark = pytest.mark.anyio

PUMPS = [("north", "p1"), ("north", "p2"), ("south", "p1")]


async def running(engine: Engine, harness: Harness) -> None:
    """Every pump at 30 Hz (south has no ramp; north's ramp is waited out)."""
    for station_id, pump_id in PUMPS:
        await engine.set_setpoint(station_id, pump_id, 30, CTX)
    for _ in range(25):
        harness.clock.advance(1.0)
        engine.tick()
    assert all(engine.pump(s, p).applied == 30.0 for s, p in PUMPS)


def stopped(engine: Engine) -> set[tuple[str, str]]:
    return {(s, p) for s, p in PUMPS if engine.pump(s, p).emergency_stop}


@pytest.mark.parametrize(
    ("level", "station_id", "pump_id", "covered"),
    [
        ("system", None, None, set(PUMPS)),
        ("station", "north", None, {("north", "p1"), ("north", "p2")}),
        ("pump", "north", "p2", {("north", "p2")}),
    ],
)
async def test_each_level_covers_exactly_its_pumps_at_once(
    make_engine: MakeEngine,
    harness: Harness,
    level: str,
    station_id: str | None,
    pump_id: str | None,
    covered: set[tuple[str, str]],
) -> None:
    engine = await make_engine()
    await running(engine, harness)

    status = await engine.emergency_stop(
        level, station_id, pump_id, "flooding", "bob", CTX
    )

    assert status.active
    assert status.level == level
    assert status.reason == "flooding"
    assert status.operator == "bob"
    assert stopped(engine) == covered
    for station, pump in PUMPS:
        applied = engine.pump(station, pump).applied
        assert applied == (0.0 if (station, pump) in covered else 30.0)
    for unit, station in ((1, "north"), (2, "south")):
        image = engine.images[unit]
        hit = [p for s, p in covered if s == station]
        assert bool(image.registers[1] & codecs.STATION_ESTOP) == bool(hit)
        for k, pump in enumerate(["p1", "p2"] if station == "north" else ["p1"]):
            assert image.coils[100 + k] == (pump in hit)
            assert image.registers[100 + 10 * k] == (0 if pump in hit else 300)
    assert engine.images[1].coils[0] == (level == "system")
    assert engine.images[1].coils[1] == (level == "station")


async def test_clearing_one_level_leaves_the_others(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await running(engine, harness)
    await engine.emergency_stop("system", None, None, "storm", "bob", CTX)
    await engine.emergency_stop("station", "north", None, "pit", "bob", CTX)
    await engine.emergency_stop("pump", "south", "p1", "seal", "eve", CTX)

    status = engine.system_emergency_stop()
    assert status.level == "system"
    assert [s.level for s in status.stops] == ["system", "station", "pump"]

    await engine.clear_emergency_stop("system", None, None, "storm over", "bob", CTX)
    assert stopped(engine) == set(PUMPS)
    assert engine.emergency_stop_status("north").level == "station"
    assert engine.emergency_stop_status("south").level == "pump"

    await engine.clear_emergency_stop("station", "north", None, "pit dry", "bob", CTX)
    assert stopped(engine) == {("south", "p1")}

    status = await engine.clear_emergency_stop("pump", "south", "p1", "ok", "eve", CTX)
    assert not status.active
    assert status.level is None
    assert stopped(engine) == set()


async def test_after_a_clear_the_pump_ramps_up_and_never_jumps(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await running(engine, harness)
    await engine.emergency_stop("pump", "north", "p1", "check", "bob", CTX)
    await engine.clear_emergency_stop("pump", "north", "p1", "done", "bob", CTX)

    assert engine.pump("north", "p1").applied == 0.0
    harness.clock.advance(1.0)
    engine.tick()
    assert engine.pump("north", "p1").applied == 20.0
    harness.clock.advance(2.0)
    engine.tick()
    assert engine.pump("north", "p1").applied == pytest.approx(21.0)


@BOTH_BACKENDS
async def test_reactivating_returns_status_and_is_audited(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    first = await engine.emergency_stop("station", "south", None, "a", "bob", CTX)

    again = await engine.emergency_stop("station", "south", None, "b", "eve", CTX)

    assert again.active
    assert again.since == first.since
    assert again.reason == "a"
    rows = await harness.audit(audit.EMERGENCY_STOP_ACTIVATED)
    assert [row.record.outcome for row in rows] == ["activated", "already_active"]
    assert rows[0].record.severity == "CRITICAL"
    assert rows[0].record.user == "alice"
    assert rows[0].record.station_id == "south"
    assert rows[0].record.details["reason"] == "a"


async def test_clearing_a_stop_that_is_not_active_is_a_conflict(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()
    await engine.emergency_stop("system", None, None, "x", "bob", CTX)

    with pytest.raises(EmergencyStopConflict, match="station north"):
        await engine.clear_emergency_stop("station", "north", None, "x", "bob", CTX)
    with pytest.raises(EmergencyStopConflict, match="pump p1 at station south"):
        await engine.clear_emergency_stop("pump", "south", "p1", "x", "bob", CTX)


async def test_bad_scope_and_text_are_refused(make_engine: MakeEngine) -> None:
    engine = await make_engine()

    with pytest.raises(InvalidRequest, match="level: expected one of system"):
        await engine.emergency_stop("plant", None, None, "x", "bob", CTX)
    with pytest.raises(InvalidRequest, match="station_id"):
        await engine.emergency_stop("station", None, None, "x", "bob", CTX)
    with pytest.raises(InvalidRequest, match="reason"):
        await engine.emergency_stop("system", None, None, "", "bob", CTX)
    with pytest.raises(InvalidRequest, match="reason"):
        await engine.emergency_stop("system", None, None, "r" * 501, "bob", CTX)
    with pytest.raises(InvalidRequest, match="operator"):
        await engine.emergency_stop("system", None, None, "x", " ", CTX)
    with pytest.raises(UnknownStation):
        await engine.emergency_stop("station", "east", None, "x", "bob", CTX)
    with pytest.raises(UnknownPump):
        await engine.emergency_stop("pump", "north", "p7", "x", "bob", CTX)
    assert not engine.system_emergency_stop().active


@BOTH_BACKENDS
async def test_stops_are_latched_across_a_restart(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await running(engine, harness)
    await engine.emergency_stop("station", "north", None, "pit", "bob", CTX)
    await engine.emergency_stop("pump", "south", "p1", "seal", "eve", CTX)
    await engine.emergency_stop("system", None, None, "drill", "bob", CTX)
    await engine.clear_emergency_stop("system", None, None, "drill over", "bob", CTX)

    engine = await harness.restart(engine)

    assert stopped(engine) == set(PUMPS)
    assert not any(s.level == "system" for s in engine.system_emergency_stop().stops)
    north = engine.emergency_stop_status("north")
    assert (north.level, north.reason, north.operator) == ("station", "pit", "bob")
    assert engine.images[1].coils[1] == 1
    assert engine.images[2].coils[100] == 1
    assert engine.images[1].registers[100] == 0
    harness.clock.advance(5.0)
    engine.tick()
    assert engine.pump("south", "p1").applied == 0.0

    await engine.clear_emergency_stop("station", "north", None, "ok", "bob", CTX)
    engine = await harness.restart(engine)
    assert stopped(engine) == {("south", "p1")}


async def test_stop_and_clear_are_durable_records_and_audited(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await engine.emergency_stop("pump", "north", "p1", "seal", "eve", CTX)
    assert harness.storage is not None
    snapshot = await harness.storage.load()
    assert [(s.level, s.pump_id, s.active) for s in snapshot.emergency_stops] == [
        ("pump", "p1", True)
    ]

    await engine.clear_emergency_stop("pump", "north", "p1", "fixed", "eve", CTX)

    cleared = await harness.audit(audit.EMERGENCY_STOP_CLEARED)
    assert len(cleared) == 1
    assert cleared[0].record.severity == "HIGH"
    assert cleared[0].record.details["reason"] == "fixed"
    snapshot = await harness.storage.load()
    assert not any(s.active for s in snapshot.emergency_stops)


async def test_stops_emit_events(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    seen: list[EngineEvent] = []
    engine.subscribe(seen.append)

    await engine.emergency_stop("station", "north", None, "pit", "bob", CTX)
    await engine.clear_emergency_stop("station", "north", None, "ok", "bob", CTX)

    assert [e.kind for e in seen] == ["emergency_stop", "emergency_stop_cleared"]
    assert seen[0].severity == "CRITICAL"
    assert seen[0].station_id == "north"
    assert seen[0].to_dict()["at"].endswith("+00:00")
