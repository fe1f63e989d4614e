"""The frame handler against pymodbus: the same requests get the same answers.

Requests are built by pymodbus's client-side request classes and socket
framer. The reference answer is what pymodbus's own server path computes
in process: its framer decodes the request, the request runs against its
datastore, and its framer encodes the response. Answers are compared byte
for byte, and the images after every sequence.

Where pymodbus departs from the Modbus application protocol, the reference
follows the protocol instead, and says so where it does.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pymodbus.constants import ExcCodes
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore
from pymodbus.simulator.simutils import SimUtils

from calejo_core.modbus import ModbusConnection, ModbusServerCore

SERVED_UNITS = (1, 2)
UNKNOWN_UNITS = (0, 3, 255)


class StandIn:
    """The four arrays of a station image, and nothing else."""

    def __init__(self, n_registers: int, n_coils: int) -> None:
        self.registers = np.zeros(n_registers, dtype=np.uint16)
        self.writable = np.zeros(n_registers, dtype=np.uint8)
        self.coils = np.zeros(n_coils, dtype=np.uint8)
        self.coil_writable = np.zeros(n_coils, dtype=np.uint8)


def random_image(
    seed: int, n_registers: int, n_coils: int, all_writable: bool
) -> StandIn:
    """Random values, and writable masks in runs, as a station image has."""
    rng = np.random.default_rng(seed)
    image = StandIn(n_registers, n_coils)
    image.registers[:] = rng.integers(0, 65536, n_registers, dtype=np.uint16)
    image.coils[:] = rng.integers(0, 2, n_coils, dtype=np.uint8)
    if all_writable:
        image.writable[:] = 1
        image.coil_writable[:] = 1
        return image

    image.writable[:] = mask_in_runs(rng, n_registers)
    image.coil_writable[:] = mask_in_runs(rng, n_coils)
    return image


def mask_in_runs(rng: np.random.Generator, size: int) -> np.ndarray[Any, Any]:
    """Runs of 1 to 80 writable or read-only entries, in turn."""
    lengths = rng.integers(1, 81, size)
    flags = (np.arange(size) + rng.integers(0, 2)) % 2
    return np.repeat(flags, lengths)[:size].astype(np.uint8)


def runs(mask: np.ndarray[Any, Any]) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, writable) for each run of equal entries in mask."""
    start = 0
    for stop in range(1, len(mask) + 1):
        if stop == len(mask) or bool(mask[stop]) != bool(mask[start]):
            yield start, stop, bool(mask[start])
            start = stop


def device(unit: int, image: StandIn) -> SimDevice:
    """A pymodbus device with image's registers, coils and writability."""
    registers = [
        SimData(
            start,
            values=image.registers[start:stop].tolist(),
            datatype=DataType.REGISTERS,
            readonly=not writable,
        )
        for start, stop, writable in runs(image.writable)
    ]
    coils = [SimData(0, values=[bool(c) for c in image.coils], datatype=DataType.BITS)]

    # pymodbus marks whole blocks read-only; coils are refused one by one.
    async def refuse_read_only_coils(
        function: int,
        start: int,
        address: int,
        count: int,
        current: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function not in (5, 15) or values is None:
            return None
        if not image.coil_writable[address : address + len(values)].all():
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    return SimDevice(
        unit,
        simdata=(coils, list(coils), registers, list(registers)),
        action=refuse_read_only_coils,
    )


def legacy_devices(images: dict[int, StandIn]) -> SimCore:
    """The same images through pymodbus's ModbusSequentialDataBlock contexts.

    These have no read-only addresses. The server turns the context into
    a SimCore; so does this.
    """
    contexts = {}
    for unit, image in images.items():
        coils = ModbusSequentialDataBlock(1, [bool(c) for c in image.coils])
        registers = ModbusSequentialDataBlock(1, image.registers.tolist())
        contexts[unit] = ModbusDeviceContext(
            co=coils, di=coils, hr=registers, ir=registers
        )
    return SimCore(ModbusServerContext(devices=contexts).simdevices)


def run(coroutine: Coroutine[Any, Any, ModbusPDU]) -> ModbusPDU:
    """Run a datastore coroutine that never waits (an in-memory datastore)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        result: ModbusPDU = stop.value
        return result
    coroutine.close()
    raise AssertionError("the pymodbus datastore waited on something")


class Reference:
    """pymodbus's server path, in process, for a set of unit ids."""

    def __init__(self, images: dict[int, StandIn], legacy: bool) -> None:
        if legacy:
            self.store = legacy_devices(images)
        else:
            self.store = SimCore([device(unit, im) for unit, im in images.items()])

        # Input registers are the holding registers, and discrete inputs
        # the coils, as in a station image.
        for runtime in self.store.devices.values():
            runtime.block["i"] = runtime.block["h"]
            runtime.block["d"] = runtime.block["c"]

        self.framer = FramerSocket(DecodePDU(is_server=True))

    def answer(self, frame: bytes) -> bytes:
        used, request = self.framer.handleFrame(frame, 0, 0)
        assert used == len(frame)
        assert request is not None
        unit = request.dev_id
        runtime = self.store.devices.get(unit)
        before = self._snapshot(unit)

        # pymodbus's SimCore raises KeyError for a unit it does not serve
        # (its server then answers 04); the protocol says 0x0B for a
        # gateway target that does not respond.
        if runtime is None:
            response: ModbusPDU = ExceptionResponse(
                request.function_code, ExcCodes.GATEWAY_NO_RESPONSE
            )
        else:
            response = run(request.datastore_update(self.store, unit))

        # pymodbus stores FC23's write even when its read is then refused;
        # an exception answer here changes nothing.
        if response.isError() and before is not None:
            self._restore(unit, before)

        response.transaction_id = request.transaction_id
        response.dev_id = unit
        return self.framer.buildFrame(response)

    def registers(self, unit: int, count: int) -> list[int]:
        return list(self.store.devices[unit].block["h"][2][:count])

    def coils(self, unit: int, count: int) -> list[int]:
        words = self.store.devices[unit].block["c"][2]
        return [int(bit) for bit in SimUtils.registersToBits(words)[:count]]

    def _snapshot(self, unit: int) -> tuple[list[int], list[int]] | None:
        runtime = self.store.devices.get(unit)
        if runtime is None:
            return None
        return list(runtime.block["h"][2]), list(runtime.block["c"][2])

    def _restore(self, unit: int, before: tuple[list[int], list[int]]) -> None:
        runtime = self.store.devices[unit]
        runtime.block["h"][2][:] = before[0]
        runtime.block["c"][2][:] = before[1]


def split(stream: bytes) -> list[bytes]:
    """The ADUs in a stream of answers, by their MBAP length fields."""
    frames = []
    while stream:
        size = 6 + int.from_bytes(stream[4:6], "big")
        frames.append(stream[:size])
        stream = stream[size:]
    return frames


@st.composite
def address(draw: st.DrawFn, size: int, count: int) -> int:
    """Mostly inside the image, often at its edge, sometimes anywhere."""
    inside = st.integers(0, max(size - count, 0))
    edge = st.integers(max(size - count - 2, 0), min(max(size - count + 2, 0), 65535))
    anywhere = st.integers(0, 65535)
    result: int = draw(st.one_of(inside, inside, edge, anywhere))
    return result


def quantity(most: int) -> st.SearchStrategy[int]:
    """1..most, small ones often."""
    return st.one_of(st.integers(1, 10), st.integers(1, most))


@st.composite
def words(draw: st.DrawFn, most: int) -> list[int]:
    """1..most register values."""
    count = draw(quantity(most))
    raw = draw(st.binary(min_size=2 * count, max_size=2 * count))
    return np.frombuffer(raw, dtype=">u2").tolist()


@st.composite
def bits(draw: st.DrawFn, most: int) -> list[bool]:
    """1..most coil values."""
    count = draw(quantity(most))
    raw = draw(st.binary(min_size=(count + 7) // 8, max_size=(count + 7) // 8))
    unpacked = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return [bool(bit) for bit in unpacked[:count]]


@st.composite
def request(draw: st.DrawFn, n_registers: int, n_coils: int) -> ModbusPDU:
    """A request as a pymodbus client would send it."""
    unit = draw(st.sampled_from(SERVED_UNITS * 8 + UNKNOWN_UNITS))
    tid = draw(st.integers(0, 65535))
    function = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 15, 16, 23]))
    ids = {"dev_id": unit, "transaction_id": tid}

    if function in (1, 2):
        count = draw(quantity(2000))
        start = draw(address(n_coils, count))
        kind = ReadCoilsRequest if function == 1 else ReadDiscreteInputsRequest
        return kind(address=start, count=count, **ids)

    if function in (3, 4):
        count = draw(quantity(125))
        start = draw(address(n_registers, count))
        kind = (
            ReadHoldingRegistersRequest if function == 3 else ReadInputRegistersRequest
        )
        return kind(address=start, count=count, **ids)

    if function == 5:
        start = draw(address(n_coils, 1))
        return WriteSingleCoilRequest(address=start, bits=[draw(st.booleans())], **ids)

    if function == 6:
        start = draw(address(n_registers, 1))
        value = draw(st.integers(0, 65535))
        return WriteSingleRegisterRequest(address=start, registers=[value], **ids)

    if function == 15:
        states = draw(bits(1968))
        start = draw(address(n_coils, len(states)))
        return WriteMultipleCoilsRequest(address=start, bits=states, **ids)

    if function == 16:
        values = draw(words(123))
        start = draw(address(n_registers, len(values)))
        return WriteMultipleRegistersRequest(address=start, registers=values, **ids)

    read_count = draw(quantity(125))
    read_start = draw(address(n_registers, read_count))
    values = draw(words(121))
    write_start = draw(address(n_registers, len(values)))
    return ReadWriteMultipleRegistersRequest(
        read_address=read_start,
        read_count=read_count,
        write_address=write_start,
        write_registers=values,
        **ids,
    )


@pytest.fixture(autouse=True)
def quiet_pymodbus() -> Iterator[None]:
    """pymodbus logs its deprecations and decoding at WARNING."""
    log = logging.getLogger("pymodbus")
    level = log.level
    log.setLevel(logging.CRITICAL)
    yield
    log.setLevel(level)


@pytest.mark.parametrize("legacy", [False, True], ids=["simdevice", "datablock"])
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_same_answers_and_images_as_pymodbus(legacy: bool, data: st.DataObject) -> None:
    n_registers = data.draw(st.integers(1, 300), label="registers")
    n_coils = 16 * data.draw(st.integers(1, 8), label="coil words")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    images = {
        unit: random_image(seed + unit, n_registers, n_coils, all_writable=legacy)
        for unit in SERVED_UNITS
    }
    reference = Reference(images, legacy)
    ours = ModbusConnection(ModbusServerCore(images))
    client = FramerSocket(DecodePDU(is_server=False))
    requests = data.draw(
        st.lists(request(n_registers, n_coils), min_size=1, max_size=12),
        label="requests",
    )

    frames = [client.buildFrame(pdu) for pdu in requests]
    expected = [reference.answer(frame) for frame in frames]
    answers = split(ours.feed(b"".join(frames)))

    assert answers == expected
    for answer in answers:
        used, response = client.handleFrame(answer, 0, 0)
        assert used == len(answer)
        assert response is not None
        code = answer[8] if answer[7] & 0x80 else 0
        event(f"function {answer[7] & 0x7F}, exception {code}")
    for unit, image in images.items():
        assert image.registers.tolist() == reference.registers(unit, n_registers)
        assert image.coils.tolist() == reference.coils(unit, n_coils)


def test_reference_refuses_read_only_like_ours() -> None:
    image = random_image(7, 40, 32, all_writable=False)
    image.writable[:] = 0
    image.writable[10:20] = 1
    image.coil_writable[:] = 0
    image.coil_writable[4:8] = 1
    reference = Reference({1: image}, legacy=False)
    ours = ModbusConnection(ModbusServerCore({1: image}))
    client = FramerSocket(DecodePDU(is_server=False))
    requests = [
        WriteMultipleRegistersRequest(address=10, registers=[1] * 10, dev_id=1),
        WriteMultipleRegistersRequest(address=9, registers=[1] * 2, dev_id=1),
        WriteSingleRegisterRequest(address=20, registers=[5], dev_id=1),
        WriteMultipleCoilsRequest(address=4, bits=[True] * 4, dev_id=1),
        WriteMultipleCoilsRequest(address=5, bits=[True] * 4, dev_id=1),
        WriteSingleCoilRequest(address=3, bits=[True], dev_id=1),
        ReadWriteMultipleRegistersRequest(
            read_address=39, read_count=2, write_address=10, write_registers=[7]
        ),
    ]

    for pdu in requests:
        frame = client.buildFrame(pdu)
        assert ours.feed(frame) == reference.answer(frame)

    assert image.registers.tolist() == reference.registers(1, 40)
    assert image.coils.tolist() == reference.coils(1, 32)
    assert image.registers[10:20].tolist() == [1] * 10
    assert image.coils[4:8].tolist() == [1] * 4
