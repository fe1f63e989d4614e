"""The Modbus TCP server, live: what REST sets is what Modbus clients read.

A whole adapter runs in-process (REST API and Modbus on free loopback
ports); pymodbus's async client reads the register map and writes as a PLC
would. Each test that is audited talks from a loopback address of its own
(127.0.0.x), so the per-source audit budget of one test never hides
another's records. Connection limits and the allow-list run on an engine
and Modbus server of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from calejo_core import codecs
from calejo_server import audit
from calejo_server.protocols.modbus import ModbusServer

from .modbus_support import (
    AdapterStack,
    ModbusStack,
    RawClient,
    raw_client,
    wait_until,
)

T = TypeVar("T")
STOP = {"reason": "test of the stop coils", "operator": "tester"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdapterStack]:
    made = AdapterStack(
        tmp_path_factory.mktemp("modbus-adapter"),
        modbus={"plc_heartbeat_timeout": 1},
    )
    try:
        yield made
    finally:
        made.close()


def with_client(
    port: int,
    work: Callable[[AsyncModbusTcpClient], Awaitable[T]],
    source: str = "127.0.0.1",
) -> T:
    """Run ``work`` with a connected pymodbus client (from ``source``)."""

    async def main() -> T:
        client = AsyncModbusTcpClient(
            "127.0.0.1",
            port=port,
            timeout=5,
            retries=0,
            source_address=(source, 0),
        )
        assert await client.connect()
        try:
            return await work(client)
        finally:
            client.close()

    return asyncio.run(asyncio.wait_for(main(), 30))


def audited(
    stack: AdapterStack, event_type: str, source: str | None, count: int
) -> list[dict[str, Any]]:
    """The audit rows of ``event_type`` from ``source``, read over REST once
    there are ``count`` (the engine writes them in the background) or after
    a bounded wait."""
    rows: list[dict[str, Any]] = []

    def enough() -> bool:
        entries = stack.get("/audit-log", event_type=event_type, limit=1000)
        rows[:] = [r for r in entries["entries"] if r["source_address"] == source]
        return len(rows) >= count

    wait_until(enough, 5.0)
    return rows


def registers(answer: ModbusPDU) -> list[int]:
    assert not answer.isError(), answer
    return list(answer.registers)


def exception_code(answer: ModbusPDU) -> int:
    assert answer.isError(), answer
    return int(answer.exception_code)


def test_pymodbus_reads_the_map_and_what_rest_set(stack: AdapterStack) -> None:
    put = stack.send("PUT", "/pump-stations/north/pumps/p1/setpoint", {"value": 42.5})
    assert put["outcome"] == "accepted"
    stack.send("PUT", "/pump-stations/north/pumps/p2/setpoint", {"value": 1000})
    stack.send("PUT", "/pump-stations/south/pumps/s1/setpoint", {"value": 30.5})

    async def read(client: AsyncModbusTcpClient) -> dict[str, list[int]]:
        return {
            "header": registers(await client.read_holding_registers(0, count=7)),
            "p1": registers(await client.read_holding_registers(100, count=10)),
            "p2": registers(await client.read_holding_registers(110, count=10)),
            "input": registers(await client.read_input_registers(100, count=1)),
            "south": registers(
                await client.read_holding_registers(100, count=10, device_id=5)
            ),
        }

    seen = with_client(stack.port, read)

    header = seen["header"]
    assert header[codecs.PUMP_COUNT] == 2
    assert header[codecs.PLC_HEARTBEAT_AGE] == 65535
    assert header[codecs.LAYOUT_VERSION] == codecs.IMAGE_LAYOUT
    assert not header[codecs.STATION_STATUS] & codecs.STATION_FAILSAFE

    p1 = seen["p1"]
    assert p1[0] == 425
    assert codecs.decode(p1[1:3], "float32", "ABCD") == 42.5
    assert p1[3] == 0
    assert p1[4:8] == [425, 200, 500, codecs.UNLIMITED_RATE]
    assert p1[8] <= 2
    assert p1[9] == 0
    assert seen["input"] == [425]

    p2 = seen["p2"]
    assert p2[4] == 10000
    assert p2[3] & 0b1000, "p2 ramps at 2 rpm/s toward its target"
    assert p2[7] == 20

    south = seen["south"]
    assert south[0] == 305
    assert codecs.decode(south[1:3], "float32", "CDAB") == 30.5

    pumps = {p["pump_id"]: p for p in stack.get("/pump-stations/north")["pumps"]}
    assert round(pumps["p2"]["applied"] * 10) in (p2[0], p2[0] + 1, p2[0] - 1)


def test_emergency_stop_over_rest_shows_on_modbus_at_once(
    stack: AdapterStack,
) -> None:
    stack.send("PUT", "/pump-stations/south/pumps/s1/setpoint", {"value": 30})
    assert with_client(
        stack.port,
        lambda c: c.read_holding_registers(100, count=1, device_id=5),
    ).registers == [300]

    stack.send("POST", "/pump-stations/south/emergency-stop", STOP)

    async def stopped(client: AsyncModbusTcpClient) -> dict[str, Any]:
        # No wait: the answer of the REST call means the image is written.
        return {
            "coils": (await client.read_coils(0, count=101, device_id=5)).bits,
            "regs": registers(
                await client.read_holding_registers(0, count=104, device_id=5)
            ),
            "north": (await client.read_coils(0, count=102, device_id=1)).bits,
            "write": exception_code(await client.write_coil(1, False, device_id=5)),
        }

    seen = with_client(stack.port, stopped)
    assert seen["coils"][:2] == [False, True]
    assert seen["coils"][100] is True
    assert seen["regs"][codecs.STATION_STATUS] & codecs.STATION_ESTOP
    assert seen["regs"][100] == 0, "applied is the stop value (0)"
    assert seen["regs"][103] & 1
    assert not any(seen["north"][:2]) and not any(seen["north"][100:102])
    assert seen["write"] == 2, "emergency stop coils are read-only"

    stack.send("DELETE", "/pump-stations/south/emergency-stop", STOP)
    stack.send("POST", "/emergency-stop", STOP)
    system = with_client(
        stack.port,
        lambda c: asyncio.gather(
            c.read_coils(0, count=2, device_id=1), c.read_coils(0, count=2, device_id=5)
        ),
    )
    stack.send("DELETE", "/emergency-stop", STOP)
    cleared = with_client(
        stack.port, lambda c: c.read_coils(0, count=101, device_id=5)
    ).bits

    assert [answer.bits[:2] for answer in system] == [[True, False], [True, False]]
    assert not any(cleared[:101])


def test_unknown_unit_answers_0b_and_read_only_writes_answer_02(
    stack: AdapterStack,
) -> None:
    source = "127.0.0.3"

    async def attempt(client: AsyncModbusTcpClient) -> dict[str, Any]:
        # A pump of an earlier test may still be ramping back from a
        # cleared stop: start from registers that hold still.
        before = registers(await client.read_holding_registers(99, count=3))
        for _ in range(40):
            await asyncio.sleep(0.25)
            again = registers(await client.read_holding_registers(99, count=3))
            if again == before:
                break
            before = again
        codes = [
            exception_code(
                await client.read_holding_registers(0, count=1, device_id=9)
            ),
            exception_code(await client.write_register(100, 1)),
            exception_code(await client.write_register(4, 1)),
            exception_code(await client.write_registers(99, [1, 2, 3])),
            exception_code(await client.write_coil(100, True)),
            exception_code(await client.write_coils(0, [True, True])),
            exception_code(await client.write_register(3, 1, device_id=9)),
        ]
        after = registers(await client.read_holding_registers(99, count=3))
        return {"codes": codes, "before": before, "after": after}

    seen = with_client(stack.port, attempt, source=source)

    assert seen["codes"] == [0x0B, 2, 2, 2, 2, 2, 0x0B]
    assert seen["after"] == seen["before"]
    mine = audited(stack, audit.MODBUS_WRITE_REFUSED, source, 5)
    time.sleep(0.3)  # a sixth row would be written by now
    assert len(audited(stack, audit.MODBUS_WRITE_REFUSED, source, 0)) == 5, (
        "five one by one; the sixth counts toward the next"
    )
    assert {row["protocol"] for row in mine} == {"MODBUS"}
    assert {row["details"]["exception"] for row in mine} == {2}
    assert mine[0]["details"]["function"] == 6


def test_bad_feedback_answers_03_and_nothing_changes(stack: AdapterStack) -> None:
    source = "127.0.0.4"

    async def plc(client: AsyncModbusTcpClient) -> dict[str, Any]:
        good = await client.write_register(1000, 450)
        assert not good.isError(), good
        return {
            "codes": [
                exception_code(await client.write_register(1000, 601)),
                exception_code(await client.write_registers(1000, [300, 2, 10])),
                exception_code(await client.write_register(1011, 7)),
            ],
            "p1": registers(await client.read_holding_registers(1000, count=3)),
            "p2_write": (await client.write_registers(1010, [18000, 1, 555])).isError(),
            "level": (await client.write_register(5, 65536 - 120)).isError(),
        }

    seen = with_client(stack.port, plc, source=source)

    assert seen["codes"] == [3, 3, 3]
    assert seen["p1"] == [450, 0, 0]
    assert seen["p2_write"] is False and seen["level"] is False
    north = stack.get("/pump-stations/north")
    feedback = {p["pump_id"]: p["feedback"] for p in north["pumps"]}
    assert feedback["p1"]["speed"] == 45.0
    assert feedback["p1"]["running"] is None and feedback["p1"]["power"] is None
    assert (
        feedback["p2"]["speed"],
        feedback["p2"]["running"],
        feedback["p2"]["power"],
    ) == (1800.0, True, 55.5)
    assert north["plc"]["level"] == -120

    mine = audited(stack, audit.MODBUS_WRITE_REFUSED, source, 3)
    assert [(row["station_id"], row["pump_id"]) for row in mine] == [
        ("north", "p1"),
        ("north", "p1"),
        ("north", "p2"),
    ]
    assert all(row["outcome"] == "refused" for row in mine)
    assert "got 60.1 Hz" in mine[0]["details"]["detail"]


def test_plc_heartbeat_lost_raises_the_event(stack: AdapterStack) -> None:
    events: list[str] = []
    unsubscribe = stack.loop.call(
        lambda: stack.engine.subscribe(lambda event: events.append(event.kind))
    )
    try:
        with_client(stack.port, lambda c: c.write_register(3, 1, device_id=5))

        assert wait_until(
            lambda: stack.get("/pump-stations/south")["plc"]["heartbeat_lost"], 5.0
        )
        age = with_client(
            stack.port, lambda c: c.read_holding_registers(4, count=1, device_id=5)
        ).registers[0]
        health = stack.get("/health/detailed")["components"]["modbus"]
        with_client(stack.port, lambda c: c.write_register(3, 2, device_id=5))
        restored = stack.get("/pump-stations/south")["plc"]
    finally:
        stack.loop.call(unsubscribe)

    assert 1 <= age <= 5
    assert health["plc_heartbeat_lost"] == ["south"]
    assert "PLC heartbeat lost at south" in health["detail"]
    assert not restored["heartbeat_lost"] and restored["heartbeat"] == 2
    assert events.count("plc_heartbeat_lost") == 1
    assert events.count("plc_heartbeat_restored") == 1
    lost = audited(stack, audit.PLC_HEARTBEAT_LOST, None, 1)
    assert [(row["station_id"], row["severity"]) for row in lost] == [("south", "HIGH")]


def test_health_and_metrics_report_modbus(stack: AdapterStack) -> None:
    with raw_client(stack.port) as client:
        client.read(1, 0, 3)
        detailed = stack.get("/health/detailed")
        metrics = stack.http.get("/metrics").text

    modbus = detailed["components"]["modbus"]
    assert modbus["state"] == "ok"
    assert modbus["port"] == stack.port
    assert modbus["units"] == [1, 5]
    assert modbus["connections"] >= 1
    assert modbus["frames"] >= 1
    assert "calejo_modbus_connections " in metrics
    assert "calejo_modbus_frames_total " in metrics
    assert 'calejo_modbus_connections_refused_total{reason="limit"}' in metrics


# -- connection limits ----------------------------------------------------------


def test_allow_list_refuses_and_audits_other_addresses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="calejo_server.protocols.modbus")
    stack = ModbusStack(tmp_path, modbus={"allowed_clients": ["127.0.0.2/32"]})
    try:
        with raw_client(stack.port) as refused:
            assert refused.closed_by_server(5.0)
        with raw_client(stack.port, source="127.0.0.2") as allowed:
            assert allowed.read(1, 2, 1) == [2]
        rows = stack.audit(audit.MODBUS_CONNECTION_REFUSED)
        health = stack.loop.call(stack.server.health)
    finally:
        stack.close()

    assert len(rows) == 1
    record = rows[0].record
    assert (record.source_address, record.protocol) == ("127.0.0.1", "MODBUS")
    assert "not in modbus.allowed_clients" in record.details["detail"]
    assert health["refused_address"] == 1 and health["accepted"] == 1
    assert "refused a connection from 127.0.0.1" in caplog.text


def test_connection_limit_refuses_audits_and_frees_up(tmp_path: Path) -> None:
    stack = ModbusStack(tmp_path, modbus={"max_connections": 2})
    try:
        first, second = RawClient(stack.port), RawClient(stack.port)
        assert first.read(1, 2, 1) == [2] and second.read(1, 2, 1) == [2]

        for _ in range(30):
            with raw_client(stack.port) as extra:
                assert extra.closed_by_server(5.0)
        assert second.read(1, 2, 1) == [2], "the open ones keep working"

        first.close()
        assert wait_until(lambda: stack.connections() == 1)
        with raw_client(stack.port) as again:
            assert again.read(1, 2, 1) == [2]
        second.close()
        rows = stack.audit(audit.MODBUS_CONNECTION_REFUSED)
        health = stack.loop.call(stack.server.health)
    finally:
        stack.close()

    assert health["refused_limit"] == 30
    assert len(rows) == 5, "a flood is counted, not recorded one by one"
    assert "the limit (modbus.max_connections) is 2" in rows[0].record.details["detail"]


def test_disabled_server_does_not_listen(tmp_path: Path) -> None:
    stack = ModbusStack(tmp_path, modbus={"enabled": False})
    try:
        server: ModbusServer = stack.server
        health = stack.loop.call(server.health_check)
        addresses = server.addresses()
    finally:
        stack.close()

    assert addresses == []
    assert health.state == "not_configured" and not health.critical
