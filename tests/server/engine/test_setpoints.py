"""Setpoints through the engine: outcomes, images, ramps, audit, durability."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from calejo_core import codecs
from calejo_server import audit
from calejo_server.engine import (
    SetpointItem,
    UnknownPump,
    UnknownStation,
)

from .conftest import BOTH_BACKENDS, CTX, Harness, MakeEngine, pump

pytestmark = pytest.mark.anyio


async def test_accepted_setpoint_sets_target_and_answers(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()

    result = await engine.set_setpoint("north", "p1", 42.5, CTX)

    assert result.outcome == "accepted"
    assert result.requested == 42.5
    assert result.target == 42.5
    assert result.detail is None
    view = engine.pump("north", "p1")
    assert view.target == 42.5
    assert view.last_outcome == "accepted"
    assert view.last_setpoint_at is not None
    assert result.to_dict()["outcome"] == "accepted"


@pytest.mark.parametrize(
    ("value", "target", "words"),
    [(70, 50.0, "above the maximum 50 Hz"), (5.5, 20.0, "below the minimum 20 Hz")],
)
async def test_out_of_limits_is_clamped_to_the_nearest_limit(
    make_engine: MakeEngine, value: float, target: float, words: str
) -> None:
    engine = await make_engine()

    result = await engine.set_setpoint("north", "p2", value, CTX)

    assert result.outcome == "clamped"
    assert result.target == target
    assert result.detail is not None
    assert words in result.detail
    assert "pump p2 at station north" in result.detail
    assert engine.pump("north", "p2").clamped


async def test_stop_value_is_a_stop_not_a_clamp(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    await engine.set_setpoint("north", "p1", 30, CTX)

    result = await engine.set_setpoint("north", "p1", 0, CTX)

    assert result.outcome == "accepted"
    assert result.target == 0.0


@pytest.mark.parametrize(
    ("value", "requested", "words"),
    [
        ("42", None, "value '42' is not a number"),
        (None, None, "value None is not a number"),
        (True, None, "value True is not a number"),
        ([1], None, "value [1] is not a number"),
        (math.nan, math.nan, "value nan is not a finite number"),
        (math.inf, math.inf, "value inf is not a finite number"),
        (10**400, None, "value 1000000000"),
        (object(), None, "value <object object at"),
    ],
)
async def test_bad_values_are_rejected_and_leave_the_target(
    make_engine: MakeEngine, value: object, requested: float | None, words: str
) -> None:
    engine = await make_engine()
    await engine.set_setpoint("north", "p1", 30, CTX)

    result = await engine.set_setpoint("north", "p1", value, CTX)

    assert result.outcome == "rejected"
    assert result.target == 30.0
    if requested is None:
        assert result.requested is None
    else:
        assert result.requested is not None
        assert math.isnan(requested) == math.isnan(result.requested)
    assert result.detail is not None and words in result.detail
    assert result.to_dict()["requested"] is None
    assert engine.pump("north", "p1").rejected


async def test_unknown_station_and_pump_raise(make_engine: MakeEngine) -> None:
    engine = await make_engine()

    with pytest.raises(UnknownStation, match="unknown station 'east'"):
        await engine.set_setpoint("east", "p1", 30, CTX)
    with pytest.raises(UnknownPump, match="unknown pump 'p9' at station 'north'"):
        await engine.set_setpoint("north", "p9", 30, CTX)
    with pytest.raises(UnknownStation):
        engine.station("east")
    with pytest.raises(UnknownPump):
        engine.pump("south", "p2")


async def test_image_shows_the_setpoint_at_once(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    image = engine.images[2]
    await engine.set_setpoint("south", "p1", 30, CTX)
    for _ in range(2):
        harness.clock.advance(0.01)
        engine.tick()
    assert image.registers[100] == 300

    harness.clock.advance(0.01)
    await engine.set_setpoint("south", "p1", 42.5, CTX)

    # south's pump has no ramp: applied reaches the target at the engine's
    # immediate tick, without waiting for the tick task.
    registers = image.registers
    assert registers[codecs.PUMP_COUNT] == 1
    assert registers[100] == 425
    assert codecs.decode(registers[101:103], "float32") == 42.5
    assert registers[103] == 0
    assert registers[104] == 425
    assert registers[105] == 200
    assert registers[106] == 500
    assert registers[107] == 65535
    assert registers[108] == 0
    assert registers[codecs.STATION_STATUS] & codecs.STATION_FAILSAFE == 0
    assert registers[109] == 0


async def test_image_after_clamp_and_reject_shows_status_bits(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()
    image = engine.images[1]

    await engine.set_setpoint("north", "p2", 99, CTX)
    assert image.registers[110 + 3] & 4
    assert image.registers[110 + 9] == 1
    assert image.registers[110 + 4] == 500

    await engine.set_setpoint("north", "p2", "fast", CTX)
    assert image.registers[110 + 3] & 16
    assert image.registers[110 + 9] == 2
    assert image.registers[110 + 4] == 500


async def test_ramp_moves_at_max_rate_over_ticks(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    image = engine.images[1]

    await engine.set_setpoint("north", "p1", 25, CTX)
    assert engine.pump("north", "p1").ramping
    # A start from stop steps to the minimum, then ramps at 0.5 Hz/s.
    harness.clock.advance(1.0)
    engine.tick()
    assert engine.pump("north", "p1").applied == 20.0
    assert image.registers[100] == 200
    for second in range(1, 11):
        harness.clock.advance(1.0)
        engine.tick()
        expected = min(20.0 + 0.5 * second, 25.0)
        assert engine.pump("north", "p1").applied == pytest.approx(expected)
        assert image.read(100) == pytest.approx(expected * 10)
        assert image.read(101, "float32") == pytest.approx(expected)
    assert not engine.pump("north", "p1").ramping
    assert image.registers[103] & 8 == 0


async def test_setpoint_age_counts_seconds(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    image = engine.images[1]
    assert image.registers[108] == 65535

    await engine.set_setpoint("north", "p1", 30, CTX)
    harness.clock.advance(3.0)
    engine.tick()

    assert image.registers[108] == 3
    assert engine.pump("north", "p1").setpoint_age == pytest.approx(3.0)


async def test_one_durable_write_per_request(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    assert harness.storage is not None
    before = len(harness.storage.writes)

    await engine.set_setpoint("north", "p1", 30, CTX)

    assert len(harness.storage.writes) == before + 1
    kinds = [type(r).__name__ for r in harness.storage.writes[-1]]
    assert "SetpointRecord" in kinds
    assert "StationStateRecord" in kinds
    assert "AuditRecord" in kinds
    snapshot = await harness.storage.load()
    saved = {(s.station_id, s.pump_id): s for s in snapshot.setpoints}
    assert saved[("north", "p1")].target == 30.0
    assert saved[("north", "p1")].user == "alice"


@BOTH_BACKENDS
async def test_setpoints_are_audited_with_who_and_old_and_new(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await engine.set_setpoint("north", "p1", 30, CTX)
    await engine.set_setpoint("north", "p1", 70, CTX)
    await engine.set_setpoint("north", "p1", "x", CTX)

    changed = await harness.audit(audit.SETPOINT_CHANGED)
    rejected = await harness.audit(audit.SETPOINT_REJECTED)

    assert [row.record.outcome for row in changed] == ["accepted", "clamped"]
    first, second = (row.record for row in changed)
    # The station started in failsafe: the target was the failsafe value.
    assert (first.old_value, first.new_value) == ("35.0", "30.0")
    assert (second.old_value, second.new_value) == ("30.0", "50.0")
    assert first.user == "alice"
    assert first.source_address == "192.0.2.10"
    assert first.protocol == "REST"
    assert (first.station_id, first.pump_id) == ("north", "p1")
    assert first.severity == "LOW"
    assert len(rejected) == 1
    assert rejected[0].record.severity == "MEDIUM"
    assert rejected[0].record.details["requested"] == "'x'"


async def test_rejected_setpoint_writes_no_setpoint_record(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()

    await engine.set_setpoint("north", "p1", math.nan, CTX)

    assert harness.storage is not None
    snapshot = await harness.storage.load()
    assert snapshot.setpoints == []


@BOTH_BACKENDS
async def test_batch_one_write_one_outcome_each(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    assert harness.storage is not None
    before = len(harness.storage.writes)

    results = await engine.set_setpoints(
        [
            SetpointItem("north", "p1", 30),
            SetpointItem("north", "p2", 99),
            SetpointItem("north", "p9", 30),
            SetpointItem("east", "p1", 30),
            SetpointItem("south", "p1", "x"),
        ],
        CTX,
    )

    assert [r.outcome for r in results] == [
        "accepted",
        "clamped",
        "rejected",
        "rejected",
        "rejected",
    ]
    assert results[2].detail == "unknown pump 'p9' at station 'north'"
    assert results[3].detail == "unknown station 'east'"
    assert results[2].target is None
    assert len(harness.storage.writes) == before + 1
    assert len(await harness.audit(audit.SETPOINT_REJECTED)) == 3
    states = [
        r
        for r in harness.storage.writes[-1]
        if type(r).__name__ == "StationStateRecord"
    ]
    assert [s.station_id for s in states] == ["north"]


async def test_blocked_under_emergency_stop_records_target(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await engine.emergency_stop("pump", "north", "p1", "inspection", "bob", CTX)

    result = await engine.set_setpoint("north", "p1", 40, CTX)

    assert result.outcome == "blocked"
    assert result.target == 40.0
    assert result.applied == 0.0
    assert result.detail is not None and "pump level" in result.detail
    assert len(await harness.audit(audit.SETPOINT_BLOCKED)) == 1


@BOTH_BACKENDS
async def test_restart_resumes_target_and_applied_without_a_jump(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    await engine.set_setpoint("south", "p1", 44, CTX)
    await engine.set_setpoint("north", "p1", 30, CTX)
    for seconds in (1.0, 4.0):
        harness.clock.advance(seconds)
        engine.tick()
    await engine.set_setpoint("north", "p1", 30, CTX)
    applied = engine.pump("north", "p1").applied
    assert applied == pytest.approx(22.0)

    engine = await harness.restart(engine)

    assert engine.pump("south", "p1").applied == 44.0
    assert engine.pump("north", "p1").applied == pytest.approx(22.0)
    assert engine.pump("north", "p1").target == 30.0
    assert engine.images[2].registers[100] == 440


async def test_values_never_reach_the_image_outside_the_limits(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(
        [{"station_id": "s", "pumps": [pump("a", max_rate=math.inf)]}]
    )
    await engine.set_setpoint("s", "a", 30, CTX)
    image = engine.images[1]
    values = [45.0, 1e9, -5.0, math.nan, 0.0, 6553.6, 25.0, -math.inf]

    for value in values:
        await engine.set_setpoint("s", "a", value, CTX)
        harness.clock.advance(0.5)
        engine.tick()
        applied = image.registers[100] / 10
        assert applied == 0.0 or 20.0 <= applied <= 50.0
    assert np.all(engine.gate.applied <= 50.0)


@BOTH_BACKENDS
async def test_concurrent_requests_are_all_durable_and_chained(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine()
    values = [20.0 + k for k in range(30)]

    results = await asyncio.gather(
        *(engine.set_setpoint("north", "p2", value, CTX) for value in values)
    )

    assert [r.target for r in results] == values
    assert engine.pump("north", "p2").target == values[-1]
    rows = await harness.audit(audit.SETPOINT_CHANGED)
    assert [float(r.record.new_value or "nan") for r in rows] == values
    assert harness.storage is not None
    assert (await harness.storage.audit_verify()).ok
    engine = await harness.restart(engine)
    assert engine.pump("north", "p2").target == values[-1]


async def test_watchers_hear_of_a_change_before_it_is_durable(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine()
    heard: list[tuple[int, float]] = []

    def watcher(station: int) -> None:
        heard.append(
            (station, float(engine.gate.target[engine.pump_index("south", "p1")]))
        )

    remove = engine.watch(watcher)
    pending = asyncio.ensure_future(engine.set_setpoint("south", "p1", 41.0, CTX))
    await asyncio.sleep(0)
    assert heard == [(1, 41.0)]
    assert not pending.done()
    await pending

    await engine.emergency_stop("station", "north", None, "test", "tester", CTX)
    assert heard[-1][0] == 0

    remove()
    await engine.set_setpoint("south", "p1", 42.0, CTX)
    assert len(heard) == 2


async def test_setpoint_ages_and_plans_in_gate_order(make_engine: MakeEngine) -> None:
    engine = await make_engine()
    assert np.isnan(engine.setpoint_ages()).all()
    assert engine.plan_ids() == [None, None, None]

    await engine.set_setpoint("north", "p2", 30.0, CTX)
    ages = engine.setpoint_ages()
    index = engine.pump_index("north", "p2")
    assert 0.0 <= ages[index] < 5.0
    assert np.isnan(np.delete(ages, index)).all()
    assert list(engine.setpoint_ages(slice(index, index + 1))) == [ages[index]]
    assert engine.plan_ids(slice(0, 2)) == [None, None]
