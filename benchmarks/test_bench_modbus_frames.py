"""Modbus FC3 frames in process: the core's frame handler beside pymodbus's.

Each group times one call that answers 1 or 16 read-holding-registers
requests (10 or 125 registers each), for both implementations:

- calejo: ``ModbusConnection.feed`` over a station-sized image.
- pymodbus: its own server path without the network, as its
  ServerRequestHandler runs it: the socket framer decodes the request, the
  request runs against the datastore, the framer encodes the response. The
  datastore is a ModbusSequentialDataBlock in a ModbusDeviceContext inside
  a ModbusServerContext; pymodbus 3.16's server turns that context into a
  SimCore, and so does this. Its coroutine is driven directly, without an
  event loop, and pipelined frames are taken from the buffer one after the
  other: both in pymodbus's favour.

Frames per second: frames per call times operations per second;
``extra_info["frames_per_s"]`` is that figure for the fastest round (the
target is at least 200,000 for 10 and for 125 registers), and
``x_pymodbus`` on the calejo rows is pymodbus's fastest round divided by
calejo's (pymodbus runs first in each group). Run::

    .venv/bin/pytest benchmarks/test_bench_modbus_frames.py --benchmark-only \\
        --benchmark-group-by=group -p no:randomly
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.simulator.simcore import SimCore

from calejo_core.modbus import ModbusConnection, ModbusServerCore

N_REGISTERS = 1100
# Fastest round of pymodbus, by group.
_pymodbus: dict[str, float] = {}
CASES = [(10, 1), (125, 1), (10, 16), (125, 16)]


class Image:
    """The four arrays of a station image."""

    def __init__(self, n_registers: int) -> None:
        self.registers = np.arange(n_registers, dtype=np.uint16)
        self.writable = np.zeros(n_registers, dtype=np.uint8)
        self.coils = np.zeros(128, dtype=np.uint8)
        self.coil_writable = np.zeros(128, dtype=np.uint8)


def requests(count: int, frames: int) -> bytes:
    """frames FC3 requests for count registers each, to unit 1."""
    return b"".join(
        struct.pack(">HHHBBHH", tid, 0, 6, 1, 3, 100 + tid, count)
        for tid in range(frames)
    )


def run(coroutine: Coroutine[Any, Any, ModbusPDU]) -> ModbusPDU:
    """Run a datastore coroutine that never waits."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        result: ModbusPDU = stop.value
        return result
    coroutine.close()
    raise AssertionError("the pymodbus datastore waited on something")


def pymodbus_handler(n_registers: int) -> Callable[[bytes], bytes]:
    """pymodbus's server path for one unit, in process."""
    block = ModbusSequentialDataBlock(1, list(range(n_registers)))
    context = ModbusServerContext(devices={1: ModbusDeviceContext(hr=block)})
    store = SimCore(context.simdevices)
    framer = FramerSocket(DecodePDU(is_server=True))

    def handle(data: bytes) -> bytes:
        answers = []
        position = 0
        while position < len(data):
            used, request = framer.handleFrame(data[position:], 0, 0)
            if request is None:
                break
            position += used
            response = run(request.datastore_update(store, request.dev_id))
            response.transaction_id = request.transaction_id
            response.dev_id = request.dev_id
            answers.append(framer.buildFrame(response))
        return b"".join(answers)

    return handle


def calejo_handler(n_registers: int) -> Callable[[bytes], bytes]:
    connection = ModbusConnection(ModbusServerCore({1: Image(n_registers)}))
    feed: Callable[[bytes], bytes] = connection.feed
    return feed


@pytest.fixture(autouse=True)
def quiet_pymodbus() -> Iterator[None]:
    """pymodbus logs the deprecation of its contexts at WARNING."""
    log = logging.getLogger("pymodbus")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


@pytest.mark.parametrize("implementation", ["pymodbus", "calejo"])
@pytest.mark.parametrize(("count", "frames"), CASES, ids=lambda v: str(v))
def test_fc3(benchmark: Any, implementation: str, count: int, frames: int) -> None:
    data = requests(count, frames)
    ours = calejo_handler(N_REGISTERS)
    theirs = pymodbus_handler(N_REGISTERS)
    expected = theirs(data)
    assert ours(data) == expected
    assert len(expected) == frames * (9 + 2 * count)
    handle = ours if implementation == "calejo" else theirs

    benchmark.group = f"modbus FC3 {count} registers, {frames} frame(s) per feed"
    benchmark.extra_info["frames_per_call"] = frames
    answer = benchmark(handle, data)

    assert benchmark.stats is not None
    fastest = benchmark.stats.stats.min
    benchmark.extra_info["frames_per_s"] = round(frames / fastest)
    if implementation == "pymodbus":
        _pymodbus[benchmark.group] = fastest
    elif benchmark.group in _pymodbus:
        benchmark.extra_info["x_pymodbus"] = round(
            _pymodbus[benchmark.group] / fastest, 1
        )
    assert answer == expected
