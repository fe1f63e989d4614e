"""PLC writes through the engine: feedback rules, the heartbeat, refusal audits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from calejo_core import codecs
from calejo_core import modbus as frames
from calejo_server import audit
from calejo_server.config import ModbusConfig
from calejo_server.engine import Engine, EngineEvent, RequestContext
from calejo_server.engine.feedback import AuditLimiter

from .conftest import Harness, MakeEngine, pump

pytestmark = pytest.mark.anyio

PLC = RequestContext(user=None, source_address="192.0.2.50", protocol="MODBUS")
REGS = frames.KIND_REGISTERS


def stations() -> list[dict[str, object]]:
    """north (unit 1: p1 50 Hz max, p2 in rpm up to 1500), south (unit 2)."""
    return [
        {
            "station_id": "north",
            "pumps": [
                pump("p1"),
                pump(
                    "p2",
                    units="rpm",
                    min_value=300,
                    max_value=1500,
                    failsafe_value=900,
                    max_rate=50,
                ),
            ],
        },
        {"station_id": "south", "unit_id": 7, "pumps": [pump("s1")]},
    ]


def write(engine: Engine, unit: int, address: int, *values: int) -> int:
    return engine.write_feedback(
        unit, REGS, address, np.array(values, dtype=np.uint16), PLC
    )


def speed(pump_index: int) -> int:
    return codecs.FEEDBACK_BASE + codecs.FEEDBACK_STRIDE * pump_index


async def test_speed_up_to_1_2_times_max_is_stored(make_engine: MakeEngine) -> None:
    engine = await make_engine(stations())

    assert write(engine, 1, speed(0), 600) == 0
    assert write(engine, 1, speed(1), 18000) == 0

    pumps = engine.station("north").pumps
    assert pumps[0].feedback is not None and pumps[0].feedback.speed == 60.0
    assert pumps[1].feedback is not None and pumps[1].feedback.speed == 1800.0
    assert pumps[0].feedback.running is None and pumps[0].feedback.power is None


async def test_bad_values_answer_03_store_nothing_and_are_audited(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(stations())
    assert write(engine, 1, speed(0), 450, 1, 120) == 0

    assert write(engine, 1, speed(0), 601) == frames.ILLEGAL_DATA_VALUE
    assert write(engine, 1, speed(0) + 1, 2) == frames.ILLEGAL_DATA_VALUE
    # One bad value refuses the whole write: the good speed is not kept.
    assert write(engine, 1, speed(0), 300, 7, 50) == frames.ILLEGAL_DATA_VALUE

    feedback = engine.pump("north", "p1").feedback
    assert feedback is not None
    assert (feedback.speed, feedback.running, feedback.power) == (45.0, True, 12.0)
    await engine.flush()
    rows = await harness.audit(audit.MODBUS_WRITE_REFUSED)
    assert len(rows) == 3
    first = rows[0].record
    assert (first.station_id, first.pump_id, first.protocol) == (
        "north",
        "p1",
        "MODBUS",
    )
    assert first.source_address == "192.0.2.50"
    assert first.severity == "MEDIUM"
    assert (
        "expected 0 to 60 Hz (1.2 x max_value), got 60.1 Hz"
        in (first.details["detail"])
    )
    assert "expected 0 or 1, got 2" in rows[1].record.details["detail"]


async def test_level_is_int16_and_power_never_negative(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(stations())

    assert write(engine, 1, codecs.STATION_LEVEL, 65536 - 250) == 0
    assert write(engine, 1, speed(1) + 2, 65535) == 0

    plc = engine.station("north").plc
    assert plc is not None and plc.level == -250
    feedback = engine.pump("north", "p2").feedback
    assert feedback is not None and feedback.power == 6553.5


async def test_registers_no_plc_writes_are_refused_with_02(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(stations())

    assert write(engine, 1, 100, 1) == frames.ILLEGAL_DATA_ADDRESS
    assert write(engine, 1, speed(0) + 3, 1) == frames.ILLEGAL_DATA_ADDRESS
    assert write(engine, 1, speed(2), 1) == frames.ILLEGAL_DATA_ADDRESS
    coils = engine.write_feedback(
        1, frames.KIND_COILS, 0, np.array([1], dtype=np.uint16), PLC
    )
    assert coils == frames.ILLEGAL_DATA_ADDRESS
    assert write(engine, 3, codecs.PLC_HEARTBEAT, 1) == frames.GATEWAY_TARGET_FAILED


async def test_heartbeat_lost_and_restored(
    make_engine: MakeEngine, harness: Harness
) -> None:
    config = harness.write_config(stations())
    engine = await harness.start(
        dataclasses.replace(config, modbus=ModbusConfig(plc_heartbeat_timeout=3.0))
    )
    seen: list[EngineEvent] = []
    engine.subscribe(seen.append)
    image = engine.images[1]

    assert image.registers[codecs.PLC_HEARTBEAT_AGE] == 65535
    for _ in range(5):
        harness.clock.advance(1.0)
        engine.tick()
    assert not [e for e in seen if e.kind == "plc_heartbeat_lost"]

    assert write(engine, 1, codecs.PLC_HEARTBEAT, 10) == 0
    assert image.registers[codecs.PLC_HEARTBEAT_AGE] == 0
    harness.clock.advance(2.0)
    engine.tick()
    assert image.registers[codecs.PLC_HEARTBEAT_AGE] == 2
    assert write(engine, 1, codecs.PLC_HEARTBEAT, 10) == 0  # unchanged
    harness.clock.advance(1.0)
    engine.tick()

    lost = [e for e in seen if e.kind == "plc_heartbeat_lost"]
    assert [(e.station_id, e.severity) for e in lost] == [("north", "HIGH")]
    assert image.registers[codecs.PLC_HEARTBEAT_AGE] == 3
    assert engine.plc_heartbeat_lost() == ["north"]
    plc = engine.station("north").plc
    assert plc is not None and plc.heartbeat_lost and plc.heartbeat == 10
    south = engine.station("south").plc
    assert south is not None and not south.heartbeat_lost
    assert south.heartbeat is None and south.heartbeat_age is None

    assert write(engine, 1, codecs.PLC_HEARTBEAT, 11) == 0
    assert engine.plc_heartbeat_lost() == []
    assert [e.kind for e in seen if e.kind.startswith("plc_")] == [
        "plc_heartbeat_lost",
        "plc_heartbeat_restored",
    ]
    await engine.flush()
    lost_rows = await harness.audit(audit.PLC_HEARTBEAT_LOST)
    restored_rows = await harness.audit(audit.PLC_HEARTBEAT_RESTORED)
    assert [r.record.station_id for r in lost_rows] == ["north"]
    assert lost_rows[0].record.details["heartbeat"] == 10
    assert [r.record.source_address for r in restored_rows] == ["192.0.2.50"]


async def test_refusals_past_the_burst_are_counted_not_recorded(
    make_engine: MakeEngine, harness: Harness
) -> None:
    engine = await make_engine(stations())

    for _ in range(40):
        write(engine, 1, speed(0), 9999)
    await engine.flush()
    assert len(await harness.audit(audit.MODBUS_WRITE_REFUSED)) == 5

    harness.clock.advance(61.0)
    engine.tick()
    await engine.flush()
    rows = await harness.audit(audit.MODBUS_WRITE_REFUSED)
    assert len(rows) == 6
    summary = rows[-1].record
    assert summary.outcome == "suppressed"
    assert summary.details["suppressed"] == 35
    assert summary.source_address == "192.0.2.50"


def test_limiter_hands_the_count_to_the_next_record() -> None:
    limiter = AuditLimiter(burst=2, window=10.0, total=100)
    key = ("X", "10.0.0.1")

    decisions = [limiter.allow(key, 0.0) for _ in range(5)]
    assert decisions == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert limiter.allow(key, 10.0) == (True, 3)
    assert limiter.overdue(10.0) == []
    assert limiter.allow(("X", "10.0.0.2"), 10.0) == (True, 0)


def test_limiter_caps_all_sources_together_and_reports_overdue_counts() -> None:
    limiter = AuditLimiter(burst=5, window=10.0, total=3, max_keys=2)

    allowed = [limiter.allow(("X", f"10.0.0.{n}"), 1.0)[0] for n in range(6)]
    assert allowed == [True, True, True, False, False, False]
    assert limiter.allow(("Y", "10.0.0.9"), 1.0) == (True, 0)

    # Past two sources, new ones share the key ("X", None).
    assert limiter.overdue(11.0) == [(("X", None), 3)]
    assert limiter.overdue(11.0) == []
