"""The watchdog: failsafe without fresh setpoints or plans, and at restart."""

from __future__ import annotations

import datetime as dt

import pytest

from calejo_core import codecs
from calejo_server import audit
from calejo_server.engine import Engine, EngineEvent
from calejo_server.storage.base import StationStateRecord

from .conftest import BOTH_BACKENDS, CTX, START, Harness, MakeEngine

pytestmark = pytest.mark.anyio


def failsafe(engine: Engine) -> dict[str, bool]:
    return {s.station_id: s.failsafe for s in engine.stations()}


async def test_stations_start_in_failsafe_without_history(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()

    assert failsafe(engine) == {"north": True, "south": True}
    assert engine.pump("north", "p1").target == 35.0
    assert engine.pump("north", "p1").failsafe
    assert engine.images[1].registers[1] & codecs.STATION_FAILSAFE
    assert engine.images[1].registers[103] & 2
    rows = await harness.audit(audit.FAILSAFE_ENTERED)
    assert sorted(r.record.station_id or "" for r in rows) == ["north", "south"]
    assert all(r.record.details["cause"] == "start" for r in rows)


async def test_fresh_setpoint_leaves_failsafe_for_that_station_only(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()

    await engine.set_setpoint("north", "p1", 40, CTX)

    assert failsafe(engine) == {"north": False, "south": True}
    assert engine.pump("north", "p1").target == 40.0
    assert engine.pump("north", "p2").target == 35.0
    assert not engine.images[1].registers[1] & codecs.STATION_FAILSAFE
    rows = await harness.audit(audit.FAILSAFE_EXITED)
    assert [(r.record.station_id, r.record.user) for r in rows] == [("north", "alice")]
    assert rows[0].record.severity == "HIGH"


async def test_rejected_setpoint_does_not_refresh_the_watchdog(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()

    await engine.set_setpoint("north", "p1", "high", CTX)

    assert failsafe(engine)["north"]
    assert engine.station("north").last_fresh_at is None


async def test_timeout_enters_failsafe_once_and_audits_it(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=10)
    seen: list[EngineEvent] = []
    engine.subscribe(seen.append)
    await engine.set_setpoint("north", "p1", 40, CTX)
    await engine.set_setpoint("south", "p1", 40, CTX)

    harness.clock.advance(9.0)
    engine.tick()
    await engine.set_setpoint("south", "p1", 41, CTX)
    assert failsafe(engine) == {"north": False, "south": False}

    harness.clock.advance(1.0)
    engine.tick()
    engine.tick()
    assert failsafe(engine) == {"north": True, "south": False}
    assert engine.pump("north", "p1").target == 35.0
    assert engine.images[1].registers[104] == 350
    harness.clock.advance(9.0)
    engine.tick()
    assert failsafe(engine) == {"north": True, "south": True}

    await engine.flush()
    rows = await harness.audit(audit.FAILSAFE_ENTERED)
    watchdog = [
        r.record for r in rows if r.record.details["cause"] == "watchdog timeout"
    ]
    assert [r.station_id for r in watchdog] == ["north", "south"]
    assert watchdog[0].severity == "CRITICAL"
    assert watchdog[0].protocol == "ENGINE"
    kinds = [(e.kind, e.station_id) for e in seen if e.kind.startswith("failsafe")]
    assert kinds == [
        ("failsafe_exited", "north"),
        ("failsafe_exited", "south"),
        ("failsafe_entered", "north"),
        ("failsafe_entered", "south"),
    ]
    assert harness.storage is not None
    states = {s.station_id: s for s in (await harness.storage.load()).station_states}
    assert states["north"].failsafe


async def test_failsafe_ramps_to_the_failsafe_value_and_back(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=10)
    await engine.set_setpoint("south", "p1", 45, CTX)
    for _ in range(2):
        harness.clock.advance(1.0)
        engine.tick()
    assert engine.pump("south", "p1").applied == 45.0

    harness.clock.advance(10.0)
    engine.tick()
    harness.clock.advance(0.1)
    engine.tick()
    assert engine.pump("south", "p1").applied == 35.0

    await engine.set_setpoint("south", "p1", 45, CTX)
    harness.clock.advance(0.1)
    engine.tick()
    assert engine.pump("south", "p1").applied == 45.0


@BOTH_BACKENDS
async def test_restart_within_the_timeout_is_not_failsafe(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=30)
    await engine.set_setpoint("north", "p1", 40, CTX)
    harness.clock.advance(20.0)

    engine = await harness.restart(engine)

    assert failsafe(engine) == {"north": False, "south": True}
    assert engine.station("north").last_fresh_at == START
    harness.clock.advance(9.0)
    engine.tick()
    assert not failsafe(engine)["north"]
    harness.clock.advance(1.0)
    engine.tick()
    assert failsafe(engine)["north"]


@BOTH_BACKENDS
async def test_restart_after_the_timeout_starts_in_failsafe(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=30)
    await engine.set_setpoint("north", "p1", 40, CTX)
    await engine.stop()
    harness.clock.advance(31.0)

    engine = await harness.restart(engine)

    assert failsafe(engine) == {"north": True, "south": True}
    rows = await harness.audit(audit.FAILSAFE_ENTERED)
    starts = [r.record.station_id for r in rows if r.record.details["cause"] == "start"]
    # south was already in failsafe when the adapter stopped: not again.
    assert starts == ["north", "south", "north"]
    assert engine.station("north").last_fresh_at == START
    assert engine.health().stations[0].age == pytest.approx(31.0)
    assert START + dt.timedelta(seconds=31) == harness.clock.utcnow()


def _stored_states(harness: Harness, station_id: str) -> list[StationStateRecord]:
    assert harness.storage is not None
    return [
        record
        for batch in harness.storage.writes
        for record in batch
        if isinstance(record, StationStateRecord) and record.station_id == station_id
    ]


async def test_a_stream_of_setpoints_stores_the_station_state_once_a_second(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=600)
    await engine.set_setpoint("north", "p1", 40, CTX)  # leaves failsafe: stored
    states = _stored_states(harness, "north")
    assert [s.failsafe for s in states] == [True, False]

    for _ in range(9):
        harness.clock.advance(0.1)
        await engine.set_setpoint("north", "p1", 41, CTX)
    assert len(_stored_states(harness, "north")) == 2

    harness.clock.advance(0.1)
    await engine.set_setpoint("north", "p2", 42, CTX)
    states = _stored_states(harness, "north")
    assert len(states) == 3
    assert states[-1].last_fresh_at == START + dt.timedelta(seconds=1)
    assert not states[-1].failsafe

    # Entering failsafe and leaving it are stored at once.
    harness.clock.advance(600.0)
    engine.tick()
    assert failsafe(engine)["north"]
    harness.clock.advance(0.1)
    await engine.set_setpoint("north", "p1", 40, CTX)
    states = _stored_states(harness, "north")
    assert [s.failsafe for s in states[-2:]] == [True, False]
    assert states[-1].last_fresh_at == harness.clock.utcnow()


@BOTH_BACKENDS
async def test_restart_after_a_stream_judges_freshness_within_a_second(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=30)
    for _ in range(15):
        await engine.set_setpoint("north", "p1", 40, CTX)
        harness.clock.advance(0.1)
    last = harness.clock.utcnow() - dt.timedelta(seconds=0.1)

    engine = await harness.restart(engine)

    stored = engine.station("north").last_fresh_at
    assert stored is not None
    assert dt.timedelta(0) <= last - stored < dt.timedelta(seconds=1)
    assert not failsafe(engine)["north"]
    # The watchdog counts from the stored time: it can only act sooner.
    harness.clock.advance(30.0 - (harness.clock.utcnow() - stored).total_seconds())
    engine.tick()
    assert failsafe(engine)["north"]
