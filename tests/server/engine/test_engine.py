"""The engine as a whole: start, tick task, heartbeat, health, events, stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from calejo_core import codecs
from calejo_server import audit
from calejo_server.config import load_config, station_definition
from calejo_server.engine import Engine, EngineEvent
from calejo_server.storage import open_storage
from calejo_server.storage.base import StationRecord, StorageHealth

from .conftest import BOTH_BACKENDS, CTX, Harness, MakeEngine, pump

pytestmark = pytest.mark.anyio


async def test_images_by_unit_id_hold_the_layout(make_engine: MakeEngine) -> None:
    engine = await make_engine(
        [
            {"station_id": "a", "unit_id": 7, "pumps": [pump("x"), pump("y")]},
            {"station_id": "b", "pumps": [pump("x", max_rate=2.5)]},
        ]
    )

    assert sorted(engine.images) == [2, 7]
    image = engine.images[7]
    assert image.registers[codecs.PUMP_COUNT] == 2
    assert image.registers[6] == 1
    assert list(image.registers[105:108]) == [200, 500, 5]
    assert engine.images[2].registers[107] == 25
    assert [s.unit_id for s in engine.stations()] == [7, 2]
    assert engine.gate.n_pumps == 3


async def test_heartbeat_counts_seconds_and_wraps(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=100_000)
    assert engine.heartbeat == 0

    for expected in (1, 2, 3):
        harness.clock.advance(1.0)
        engine.tick()
        assert engine.heartbeat == expected
        assert engine.images[1].registers[0] == expected
        assert engine.images[2].registers[0] == expected

    harness.clock.advance(65533.0)
    engine.tick()
    assert engine.heartbeat == 0
    assert engine.images[1].registers[0] == 0


async def test_the_tick_task_runs_on_its_own(tmp_path: Path) -> None:
    config = load_config(environ={"CALEJO_DATA_DIR": str(tmp_path)})
    storage = open_storage(None, tmp_path)
    await storage.open()
    engine = Engine(config, storage)
    try:
        await engine.start()
        await engine.set_setpoint("demo_station", "pump_1", 40, CTX)
        deadline = time.monotonic() + 5.0
        while engine.health().ticks < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        health = engine.health()
        assert health.ticks >= 5
        assert health.status == "ok"
        assert health.running
        assert health.last_tick_at is not None
        assert 0.0 <= health.tick_lag < 1.0
        assert health.tick_duration < 0.1
        assert 20.0 <= engine.pump("demo_station", "pump_1").applied < 40.0
        assert health.to_dict()["stations"][0]["station_id"] == "demo_station"
    finally:
        await engine.stop()
        await storage.close()
    assert engine.health().status == "down"


async def test_demo_configuration_serves_the_demo_station(tmp_path: Path) -> None:
    config = load_config(environ={})
    storage = open_storage(None, tmp_path)
    await storage.open()
    engine = Engine(config, storage)
    try:
        await engine.start()
        station = engine.station("demo_station")
        assert station.name == "Demonstration pump station"
        assert station.unit_id == 1
        assert [p.pump_id for p in station.pumps] == ["pump_1", "pump_2", "pump_3"]
        assert station.pumps[0].limits.max_rate == 0.5
        assert station.to_dict()["pumps"][0]["limits"]["min_switch_interval"] == 60.0
    finally:
        await engine.stop()
        await storage.close()


async def test_stations_come_from_the_database_when_the_file_has_none(
    harness: Harness,
) -> None:
    config = harness.write_config(None)
    storage = open_storage(None, config.server.data_dir)
    await storage.open()
    east = load_config(environ={}).stations[0]
    definition = station_definition(east)
    definition["station_id"] = "east"
    await storage.write([StationRecord("east", definition)])
    await storage.close()

    engine = await harness.start(config)

    assert [s.station_id for s in engine.stations()] == ["east"]
    assert len(engine.station("east").pumps) == 3


@BOTH_BACKENDS
async def test_stop_writes_adapter_stopped_and_pending_records(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=5)
    await engine.set_setpoint("north", "p1", 40, CTX)
    harness.clock.advance(6.0)
    engine.tick()

    await engine.stop()

    started = await harness.audit(audit.ADAPTER_STARTED)
    stopped = await harness.audit(audit.ADAPTER_STOPPED)
    assert len(started) == 1 and len(stopped) == 1
    assert started[0].record.details["pumps"] == 3
    entered = await harness.audit(audit.FAILSAFE_ENTERED)
    assert [r.record.details["cause"] for r in entered][-1] == "watchdog timeout"
    assert harness.storage is not None
    assert (await harness.storage.audit_verify()).ok


@BOTH_BACKENDS
async def test_applied_values_of_ramps_survive_a_restart(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(watchdog_timeout=3600)
    await engine.set_setpoint("north", "p1", 50, CTX)
    for _ in range(9):
        harness.clock.advance(1.0)
        engine.tick()
    assert engine.pump("north", "p1").applied == pytest.approx(24.0)

    engine = await harness.restart(engine)

    assert engine.pump("north", "p1").applied == pytest.approx(24.0)
    assert engine.pump("north", "p1").target == 50.0
    assert engine.pump("north", "p1").last_setpoint_at is not None
    assert engine.pump("north", "p1").setpoint_age == pytest.approx(9.0)


async def test_subscribers_get_events_and_can_leave(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    seen: list[EngineEvent] = []

    def broken(event: EngineEvent) -> None:
        raise RuntimeError("subscriber bug")

    engine.subscribe(broken)
    leave = engine.subscribe(seen.append)
    await engine.set_setpoint("north", "p1", 40, CTX)
    leave()
    await engine.set_setpoint("north", "p1", 41, CTX)

    assert [e.kind for e in seen] == ["failsafe_exited", "setpoint"]
    setpoint = seen[1]
    assert (setpoint.station_id, setpoint.pump_id) == ("north", "p1")
    assert setpoint.details["target"] == 40.0
    assert setpoint.details["outcome"] == "accepted"
    assert engine.pump("north", "p1").target == 41.0


async def test_subscribers_of_some_kinds_get_only_those(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()
    stops: list[EngineEvent] = []
    leave = engine.subscribe(stops.append, ["emergency_stop", "failsafe_exited"])
    await engine.set_setpoint("north", "p1", 40, CTX)
    await engine.emergency_stop("pump", "north", "p2", "seal", "eve", CTX)

    assert [e.kind for e in stops] == ["failsafe_exited", "emergency_stop"]

    everything: list[EngineEvent] = []
    engine.subscribe(everything.append)
    await engine.set_setpoint("north", "p1", 41, CTX)
    leave()
    await engine.set_setpoint("north", "p1", 42, CTX)

    assert len(stops) == 2
    assert [e.details["target"] for e in everything] == [41.0, 42.0]
    assert everything[0].message == (
        "setpoint accepted for pump p1 at station north: target 41 Hz"
    )


async def test_storage_health_sets_status_bit_and_events(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    seen: list[EngineEvent] = []
    engine.subscribe(seen.append)
    assert harness.storage is not None
    inner = harness.storage.inner

    inner._notify_health(StorageHealth("degraded", "sqlite", "disk away", spooled=3))
    assert engine.images[1].registers[1] & codecs.STATION_STORAGE_DEGRADED
    assert engine.images[2].registers[1] & codecs.STATION_STORAGE_DEGRADED
    assert engine.health().status == "degraded"
    assert engine.station("north").storage_degraded

    inner._notify_health(StorageHealth("ok", "sqlite", "ok"))
    assert not engine.images[1].registers[1] & codecs.STATION_STORAGE_DEGRADED
    assert [(e.kind, e.severity) for e in seen] == [
        ("storage_degraded", "CRITICAL"),
        ("storage_recovered", "HIGH"),
    ]


async def test_views_are_json_ready(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    await engine.emergency_stop("pump", "north", "p2", "seal", "eve", CTX)
    await engine.set_setpoint("north", "p1", 40, CTX)

    station = engine.station("north").to_dict()
    status = engine.emergency_stop_status("north").to_dict()

    assert station["last_fresh_at"] == "2030-01-01T00:00:00+00:00"
    assert station["emergency_stop"] is True
    assert station["pumps"][1]["emergency_stop"] is True
    assert station["pumps"][0]["last_outcome"] == "accepted"
    assert station["pumps"][1]["last_outcome"] is None
    assert status["level"] == "pump"
    assert status["stops"][0]["pump_id"] == "p2"
    assert engine.station("south").to_dict()["pumps"][0]["limits"]["max_rate"] is None
