"""The Modbus TCP frame handler, against hand-built frames."""

from __future__ import annotations

import gc
import logging
import re
import struct
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from calejo_core import modbus
from calejo_core.modbus import (
    GATEWAY_TARGET_FAILED,
    ILLEGAL_DATA_ADDRESS,
    ILLEGAL_DATA_VALUE,
    ILLEGAL_FUNCTION,
    KIND_COILS,
    KIND_REGISTERS,
    SERVER_DEVICE_FAILURE,
    ModbusConnection,
    ModbusServerCore,
)

TID = 0x1234


class StandIn:
    """The four arrays of a station image, and nothing else."""

    def __init__(self, n_registers: int = 200, n_coils: int = 64) -> None:
        self.registers = np.zeros(n_registers, dtype=np.uint16)
        self.writable = np.zeros(n_registers, dtype=np.uint8)
        self.coils = np.zeros(n_coils, dtype=np.uint8)
        self.coil_writable = np.zeros(n_coils, dtype=np.uint8)


ImageFactory = Callable[[int, int], Any]


def _stand_in(n_registers: int, n_coils: int) -> Any:
    return StandIn(n_registers, n_coils)


def _station_image(n_registers: int, n_coils: int) -> Any:
    from calejo_core.codecs import StationImage

    return StationImage(1, size=n_registers, n_coils=n_coils)


@pytest.fixture(params=[_stand_in, _station_image], ids=["stand-in", "station"])
def make_image(request: pytest.FixtureRequest) -> ImageFactory:
    """Images with a known pattern: register i holds 3·i + 1, coil i is i % 3 == 0."""
    factory: ImageFactory = request.param

    def make(n_registers: int = 200, n_coils: int = 64) -> Any:
        image = factory(n_registers, n_coils)
        n = len(image.registers)
        image.registers[:] = (np.arange(n) * 3 + 1).astype(np.uint16)
        image.writable[:] = 0
        image.coils[:] = (np.arange(len(image.coils)) % 3 == 0).astype(np.uint8)
        image.coil_writable[:] = 0
        return image

    return make


@pytest.fixture
def image(make_image: ImageFactory) -> Any:
    return make_image()


@pytest.fixture
def core(image: Any) -> ModbusServerCore:
    return ModbusServerCore({1: image})


@pytest.fixture
def conn(core: ModbusServerCore) -> ModbusConnection:
    return ModbusConnection(core)


def adu(pdu: bytes, unit: int = 1, tid: int = TID, protocol: int = 0) -> bytes:
    """An MBAP header and the PDU."""
    return struct.pack(">HHHB", tid, protocol, len(pdu) + 1, unit) + pdu


def refusal(function: int, code: int, unit: int = 1, tid: int = TID) -> bytes:
    """The exception answer to function."""
    return adu(bytes([function | 0x80, code]), unit, tid)


def read(function: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function, address, count)


def write_registers(address: int, values: list[int]) -> bytes:
    head = struct.pack(">BHHB", 16, address, len(values), 2 * len(values))
    return head + struct.pack(f">{len(values)}H", *values)


def write_coils(address: int, bits: list[int]) -> bytes:
    packed = pack_bits(bits)
    return struct.pack(">BHHB", 15, address, len(bits), len(packed)) + packed


def read_write(
    read_address: int, read_count: int, write_address: int, values: list[int]
) -> bytes:
    head = struct.pack(
        ">BHHHHB",
        23,
        read_address,
        read_count,
        write_address,
        len(values),
        2 * len(values),
    )
    return head + struct.pack(f">{len(values)}H", *values)


def pack_bits(bits: list[int]) -> bytes:
    packed = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            packed[i // 8] |= 1 << (i % 8)
    return bytes(packed)


def registers_answer(function: int, values: npt.NDArray[np.uint16]) -> bytes:
    body = values.astype(">u2").tobytes()
    return adu(bytes([function, len(body)]) + body)


# Reads


@pytest.mark.parametrize("function", [3, 4])
@pytest.mark.parametrize("address, count", [(0, 1), (0, 10), (7, 125), (75, 125)])
def test_read_registers_answers_big_endian_values(
    conn: ModbusConnection, image: Any, function: int, address: int, count: int
) -> None:
    image.registers[address] = 0xBEEF

    answer = conn.feed(adu(read(function, address, count)))

    expected = registers_answer(function, image.registers[address : address + count])
    assert answer == expected
    assert answer[7 + 2 : 7 + 4] == b"\xbe\xef"


def test_read_answer_echoes_transaction_and_unit(make_image: ImageFactory) -> None:
    core = ModbusServerCore({0: make_image(), 255: make_image()})
    conn = ModbusConnection(core)

    first = conn.feed(adu(read(3, 0, 1), unit=0, tid=0))
    last = conn.feed(adu(read(3, 0, 1), unit=255, tid=0xFFFF))

    assert first == adu(b"\x03\x02\x00\x01", unit=0, tid=0)
    assert last == adu(b"\x03\x02\x00\x01", unit=255, tid=0xFFFF)


@pytest.mark.parametrize("function", [1, 2])
@pytest.mark.parametrize("address, count", [(0, 1), (0, 8), (1, 9), (3, 17), (0, 64)])
def test_read_bits_packs_lowest_address_into_lowest_bit(
    conn: ModbusConnection, image: Any, function: int, address: int, count: int
) -> None:
    bits = [int(bit) for bit in image.coils[address : address + count]]

    answer = conn.feed(adu(read(function, address, count)))

    packed = pack_bits(bits)
    assert answer == adu(bytes([function, len(packed)]) + packed)


@pytest.mark.parametrize("function", [1, 2])
def test_read_bits_up_to_2000(make_image: ImageFactory, function: int) -> None:
    image = make_image(200, 2100)
    conn = ModbusConnection(ModbusServerCore({1: image}))

    answer = conn.feed(adu(read(function, 100, 2000)))

    packed = pack_bits([int(bit) for bit in image.coils[100:2100]])
    assert answer == adu(bytes([function, 250]) + packed)


def test_read_image_edge_is_served_and_beyond_is_refused(
    conn: ModbusConnection, image: Any
) -> None:
    n = len(image.registers)
    n_coils = len(image.coils)

    assert conn.feed(adu(read(3, n - 5, 5))) == registers_answer(
        3, image.registers[n - 5 :]
    )
    assert conn.feed(adu(read(3, n - 5, 6))) == refusal(3, ILLEGAL_DATA_ADDRESS)
    assert conn.feed(adu(read(4, n, 1))) == refusal(4, ILLEGAL_DATA_ADDRESS)
    assert conn.feed(adu(read(3, 65535, 125))) == refusal(3, ILLEGAL_DATA_ADDRESS)
    assert conn.feed(adu(read(1, n_coils - 1, 1)))[7:9] == b"\x01\x01"
    assert conn.feed(adu(read(1, n_coils - 1, 2))) == refusal(1, ILLEGAL_DATA_ADDRESS)
    assert conn.feed(adu(read(2, 65535, 2000))) == refusal(2, ILLEGAL_DATA_ADDRESS)


@pytest.mark.parametrize(
    "function, count",
    [(3, 0), (3, 126), (4, 0), (4, 0xFFFF), (1, 0), (1, 2001), (2, 0), (2, 2001)],
)
def test_read_quantity_out_of_limits_is_illegal_value(
    conn: ModbusConnection, function: int, count: int
) -> None:
    assert conn.feed(adu(read(function, 0, count))) == refusal(
        function, ILLEGAL_DATA_VALUE
    )


def test_quantity_is_checked_before_address(conn: ModbusConnection) -> None:
    assert conn.feed(adu(read(3, 65535, 126))) == refusal(3, ILLEGAL_DATA_VALUE)


@pytest.mark.parametrize("function", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("extra", [b"", b"\x00", b"\x00\x00", b"\x00" * 5])
def test_fixed_size_pdu_of_wrong_length_is_illegal_value(
    conn: ModbusConnection, function: int, extra: bytes
) -> None:
    # The right length is 4 bytes after the function code.
    assert conn.feed(adu(bytes([function]) + extra)) == refusal(
        function, ILLEGAL_DATA_VALUE
    )


# Writes


def test_write_single_register_stores_and_echoes(
    conn: ModbusConnection, image: Any
) -> None:
    image.writable[10] = 1
    request = adu(struct.pack(">BHH", 6, 10, 0xABCD))

    assert conn.feed(request) == request
    assert image.registers[10] == 0xABCD


def test_write_single_coil_stores_and_echoes(
    conn: ModbusConnection, image: Any
) -> None:
    image.coil_writable[5] = 1
    on = adu(struct.pack(">BHH", 5, 5, 0xFF00))
    off = adu(struct.pack(">BHH", 5, 5, 0x0000))

    assert conn.feed(on) == on
    assert image.coils[5] == 1
    assert conn.feed(off) == off
    assert image.coils[5] == 0


@pytest.mark.parametrize("value", [0x0001, 0x00FF, 0xFF01, 0xFFFF, 0x1234])
def test_write_single_coil_value_other_than_on_or_off_is_illegal_value(
    conn: ModbusConnection, image: Any, value: int
) -> None:
    image.coil_writable[:] = 1

    answer = conn.feed(adu(struct.pack(">BHH", 5, 3, value)))

    assert answer == refusal(5, ILLEGAL_DATA_VALUE)
    assert image.coils[3] == 1


def test_write_multiple_registers_stores_and_answers_range(
    conn: ModbusConnection, image: Any
) -> None:
    image.writable[20:143] = 1
    values = [(7919 * i) & 0xFFFF for i in range(123)]

    answer = conn.feed(adu(write_registers(20, values)))

    assert answer == adu(struct.pack(">BHH", 16, 20, 123))
    assert image.registers[20:143].tolist() == values


def test_write_multiple_coils_stores_and_answers_range(
    make_image: ImageFactory,
) -> None:
    image = make_image(200, 2000)
    image.coil_writable[:] = 1
    conn = ModbusConnection(ModbusServerCore({1: image}))
    bits = [(i * 7) % 5 == 0 for i in range(1968)]

    answer = conn.feed(adu(write_coils(30, [int(b) for b in bits])))

    assert answer == adu(struct.pack(">BHH", 15, 30, 1968))
    assert image.coils[30:1998].tolist() == [int(b) for b in bits]
    assert (image.coils[29], image.coils[1998]) == (0, 1)


def test_write_multiple_coils_odd_count(conn: ModbusConnection, image: Any) -> None:
    image.coil_writable[:] = 1
    before = image.coils.copy()

    answer = conn.feed(adu(write_coils(4, [1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1])))

    assert answer == adu(struct.pack(">BHH", 15, 4, 11))
    assert image.coils[4:15].tolist() == [1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]
    assert image.coils[:4].tolist() == before[:4].tolist()
    assert image.coils[15:].tolist() == before[15:].tolist()


@pytest.mark.parametrize(
    "pdu",
    [
        # quantity 0, too many, byte count off by one either way
        struct.pack(">BHHB", 16, 0, 0, 0),
        struct.pack(">BHHB", 16, 0, 124, 248) + b"\x00" * 246,
        struct.pack(">BHHB", 16, 0, 2, 3) + b"\x00" * 3,
        struct.pack(">BHHB", 16, 0, 2, 5) + b"\x00" * 5,
        # byte count right, data short or long
        struct.pack(">BHHB", 16, 0, 2, 4) + b"\x00" * 3,
        struct.pack(">BHHB", 16, 0, 2, 4) + b"\x00" * 5,
        # header cut short
        struct.pack(">BHH", 16, 0, 1),
        struct.pack(">BH", 16, 0),
        b"\x10",
    ],
)
def test_write_multiple_registers_malformed_is_illegal_value(
    conn: ModbusConnection, image: Any, pdu: bytes
) -> None:
    image.writable[:] = 1
    before = image.registers.copy()

    assert conn.feed(adu(pdu)) == refusal(16, ILLEGAL_DATA_VALUE)
    assert np.array_equal(image.registers, before)


@pytest.mark.parametrize(
    "pdu",
    [
        struct.pack(">BHHB", 15, 0, 0, 0),
        struct.pack(">BHHB", 15, 0, 1969, 247) + b"\xff" * 247,
        struct.pack(">BHHB", 15, 0, 9, 1) + b"\xff",
        struct.pack(">BHHB", 15, 0, 8, 2) + b"\xff\xff",
        struct.pack(">BHHB", 15, 0, 9, 2) + b"\xff",
        struct.pack(">BHHB", 15, 0, 9, 2) + b"\xff" * 3,
        struct.pack(">BHH", 15, 0, 1),
        b"\x0f",
    ],
)
def test_write_multiple_coils_malformed_is_illegal_value(
    conn: ModbusConnection, image: Any, pdu: bytes
) -> None:
    image.coil_writable[:] = 1
    before = image.coils.copy()

    assert conn.feed(adu(pdu)) == refusal(15, ILLEGAL_DATA_VALUE)
    assert np.array_equal(image.coils, before)


def test_read_only_registers_and_coils_are_illegal_address(
    conn: ModbusConnection, image: Any
) -> None:
    image.writable[10:20] = 1
    image.writable[15] = 0
    image.coil_writable[0:8] = 1
    image.coil_writable[6] = 0
    registers = image.registers.copy()
    coils = image.coils.copy()

    assert conn.feed(adu(struct.pack(">BHH", 6, 15, 1))) == refusal(
        6, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(write_registers(10, [1] * 10))) == refusal(
        16, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(read_write(0, 1, 14, [1, 2]))) == refusal(
        23, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(struct.pack(">BHH", 5, 6, 0xFF00))) == refusal(
        5, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(write_coils(0, [1] * 8))) == refusal(15, ILLEGAL_DATA_ADDRESS)

    assert np.array_equal(image.registers, registers)
    assert np.array_equal(image.coils, coils)


def test_write_beyond_image_is_illegal_address(
    conn: ModbusConnection, image: Any
) -> None:
    image.writable[:] = 1
    image.coil_writable[:] = 1
    n = len(image.registers)
    n_coils = len(image.coils)

    assert conn.feed(adu(struct.pack(">BHH", 6, n, 1))) == refusal(
        6, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(write_registers(n - 1, [1, 2]))) == refusal(
        16, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(struct.pack(">BHH", 5, 65535, 0))) == refusal(
        5, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(write_coils(n_coils - 2, [1, 1, 1]))) == refusal(
        15, ILLEGAL_DATA_ADDRESS
    )
    assert conn.feed(adu(write_registers(65535, [1, 2]))) == refusal(
        16, ILLEGAL_DATA_ADDRESS
    )


# Read/write multiple registers (FC23)


def test_read_write_writes_before_it_reads(conn: ModbusConnection, image: Any) -> None:
    image.writable[10:13] = 1

    answer = conn.feed(adu(read_write(8, 6, 10, [0xA, 0xB, 0xC])))

    expected = [8 * 3 + 1, 9 * 3 + 1, 0xA, 0xB, 0xC, 13 * 3 + 1]
    assert answer == registers_answer(23, np.array(expected, dtype=np.uint16))
    assert image.registers[10:13].tolist() == [0xA, 0xB, 0xC]


def test_read_write_limits(make_image: ImageFactory) -> None:
    image = make_image(400, 64)
    image.writable[:] = 1
    conn = ModbusConnection(ModbusServerCore({1: image}))

    full = conn.feed(adu(read_write(0, 125, 200, list(range(121)))))
    too_many_read = conn.feed(adu(read_write(0, 126, 200, [1])))
    too_many_written = conn.feed(
        adu(struct.pack(">BHHHHB", 23, 0, 1, 200, 122, 244) + b"\x00" * 242)
    )

    assert full == registers_answer(23, image.registers[:125])
    assert image.registers[200:321].tolist() == list(range(121))
    assert too_many_read == refusal(23, ILLEGAL_DATA_VALUE)
    assert too_many_written == refusal(23, ILLEGAL_DATA_VALUE)


@pytest.mark.parametrize(
    "pdu",
    [
        struct.pack(">BHHHHB", 23, 0, 0, 10, 1, 2) + b"\x00\x01",
        struct.pack(">BHHHHB", 23, 0, 1, 10, 0, 0),
        struct.pack(">BHHHHB", 23, 0, 1, 10, 1, 1) + b"\x00",
        struct.pack(">BHHHHB", 23, 0, 1, 10, 1, 2) + b"\x00",
        struct.pack(">BHHHHB", 23, 0, 1, 10, 1, 2) + b"\x00\x01\x02",
        struct.pack(">BHHHH", 23, 0, 1, 10, 1),
        b"\x17",
    ],
)
def test_read_write_malformed_is_illegal_value(
    conn: ModbusConnection, image: Any, pdu: bytes
) -> None:
    image.writable[:] = 1
    before = image.registers.copy()

    assert conn.feed(adu(pdu)) == refusal(23, ILLEGAL_DATA_VALUE)
    assert np.array_equal(image.registers, before)


def test_read_write_with_read_beyond_image_writes_nothing(
    conn: ModbusConnection, image: Any
) -> None:
    image.writable[:] = 1
    n = len(image.registers)
    before = image.registers.copy()

    answer = conn.feed(adu(read_write(n - 1, 2, 0, [0x5555])))

    assert answer == refusal(23, ILLEGAL_DATA_ADDRESS)
    assert np.array_equal(image.registers, before)


# Function codes and units


@pytest.mark.parametrize(
    "function", [0, 7, 8, 11, 17, 20, 22, 24, 43, 0x7F, 0x80, 0xFF]
)
def test_unknown_function_is_illegal_function(
    conn: ModbusConnection, function: int
) -> None:
    assert conn.feed(adu(bytes([function, 0, 0, 0, 1]))) == refusal(
        function, ILLEGAL_FUNCTION
    )
    assert conn.feed(adu(bytes([function]))) == refusal(function, ILLEGAL_FUNCTION)


@pytest.mark.parametrize("function", [1, 3, 6, 16, 23, 99])
def test_unknown_unit_is_gateway_target_failed(
    conn: ModbusConnection, function: int
) -> None:
    answer = conn.feed(adu(read(function, 0, 1), unit=2))

    assert answer == refusal(function, GATEWAY_TARGET_FAILED, unit=2)


def test_units_are_served_separately(make_image: ImageFactory) -> None:
    first = make_image()
    second = make_image()
    second.registers[:] = 7
    conn = ModbusConnection(ModbusServerCore({1: first, 2: second}))

    assert conn.feed(adu(read(3, 0, 1), unit=1)) == adu(b"\x03\x02\x00\x01")
    assert conn.feed(adu(read(3, 0, 1), unit=2)) == adu(b"\x03\x02\x00\x07", unit=2)


def test_set_and_remove_unit_while_connected(
    core: ModbusServerCore, conn: ModbusConnection, make_image: ImageFactory
) -> None:
    other = make_image()
    other.registers[:] = 9

    core.set_unit(5, other)
    served = conn.feed(adu(read(3, 0, 1), unit=5))
    core.set_unit(1, other)
    replaced = conn.feed(adu(read(3, 0, 1), unit=1))
    core.remove_unit(5)
    removed = conn.feed(adu(read(3, 0, 1), unit=5))

    assert served == adu(b"\x03\x02\x00\x09", unit=5)
    assert replaced == adu(b"\x03\x02\x00\x09", unit=1)
    assert removed == refusal(3, GATEWAY_TARGET_FAILED, unit=5)
    assert core.units == {1: other}


def test_image_of_more_than_65536_registers_serves_the_first_65536() -> None:
    image = StandIn(70000, 70000)
    image.registers[65535] = 77
    image.coils[65535] = 1
    conn = ModbusConnection(ModbusServerCore({1: image}))

    assert conn.feed(adu(read(3, 65535, 1))) == adu(b"\x03\x02\x00\x4d")
    assert conn.feed(adu(read(1, 65535, 1))) == adu(b"\x01\x01\x01")
    assert conn.feed(adu(read(3, 65535, 2))) == refusal(3, ILLEGAL_DATA_ADDRESS)


def test_empty_image_refuses_every_address() -> None:
    conn = ModbusConnection(ModbusServerCore({1: StandIn(0, 0)}))

    assert conn.feed(adu(read(3, 0, 1))) == refusal(3, ILLEGAL_DATA_ADDRESS)
    assert conn.feed(adu(read(1, 0, 1))) == refusal(1, ILLEGAL_DATA_ADDRESS)
    assert conn.feed(adu(struct.pack(">BHH", 6, 0, 1))) == refusal(
        6, ILLEGAL_DATA_ADDRESS
    )


# Framing


def test_protocol_id_other_than_zero_is_discarded_in_sync(
    conn: ModbusConnection,
) -> None:
    stream = (
        adu(read(3, 0, 1), tid=1)
        + adu(read(3, 0, 2), tid=2, protocol=1)
        + adu(b"\x99" * 200, tid=3, protocol=0xFFFF)
        + adu(read(3, 0, 1), tid=4)
    )

    answer = conn.feed(stream)

    assert answer == adu(b"\x03\x02\x00\x01", tid=1) + adu(b"\x03\x02\x00\x01", tid=4)
    assert not conn.broken
    assert conn.last_error is not None
    assert "protocol id 65535" in conn.last_error


@pytest.mark.parametrize("length", [0, 1, 255, 256, 0x8000, 0xFFFF])
def test_length_outside_2_to_254_breaks_the_connection(
    conn: ModbusConnection, core: ModbusServerCore, length: int
) -> None:
    good = adu(read(3, 0, 1), tid=1)
    bad = struct.pack(">HHHB", 9, 0, length, 1) + read(3, 0, 1)

    answer = conn.feed(good + bad + good)
    later = conn.feed(good)

    assert answer == adu(b"\x03\x02\x00\x01", tid=1)
    assert later == b""
    assert conn.broken
    assert conn.buffered == 0
    assert conn.last_error == (
        f"mbap length {length} outside 2..254 (transaction 9); the framing is lost"
    )
    assert core.frames == 1


def test_broken_length_is_seen_as_soon_as_the_length_field_arrives(
    conn: ModbusConnection,
) -> None:
    assert conn.feed(b"\x00\x01\x00\x00\x01") == b""
    assert not conn.broken

    assert conn.feed(b"\x05") == b""
    assert conn.broken


def test_largest_frame_is_accepted(conn: ModbusConnection, image: Any) -> None:
    image.writable[:] = 1
    request = adu(read_write(0, 125, 0, list(range(121))))
    coils = adu(write_coils(0, [1] * 1968))

    assert len(request) == 259
    assert conn.feed(request)[7:9] == b"\x17\xfa"
    assert len(coils) == 259
    assert conn.feed(coils) == refusal(15, ILLEGAL_DATA_ADDRESS)
    assert not conn.broken


def test_length_254_frame_is_framed_and_refused(conn: ModbusConnection) -> None:
    request = adu(b"\x03" + b"\x00" * 252)

    assert len(request) == 260
    assert conn.feed(request + adu(read(3, 0, 1))) == refusal(
        3, ILLEGAL_DATA_VALUE
    ) + adu(b"\x03\x02\x00\x01")


def test_frames_fed_one_byte_at_a_time(conn: ModbusConnection, image: Any) -> None:
    image.writable[:] = 1
    stream = (
        adu(read(3, 0, 3), tid=1)
        + adu(write_registers(5, [1, 2, 3]), tid=2)
        + adu(read(3, 5, 3), tid=3)
    )
    answers = []
    buffered = []

    for byte in stream:
        answers.append(conn.feed(bytes([byte])))
        buffered.append(conn.buffered)

    assert b"".join(answers) == (
        adu(b"\x03\x06\x00\x01\x00\x04\x00\x07", tid=1)
        + adu(struct.pack(">BHH", 16, 5, 3), tid=2)
        + adu(b"\x03\x06\x00\x01\x00\x02\x00\x03", tid=3)
    )
    assert [i for i, answer in enumerate(answers) if answer] == [
        11,
        11 + 19,
        11 + 19 + 12,
    ]
    assert max(buffered) == 18
    assert buffered[-1] == 0


def test_partial_frame_waits_for_the_rest(conn: ModbusConnection) -> None:
    request = adu(read(3, 0, 1))

    assert conn.feed(request[:3]) == b""
    assert conn.buffered == 3
    assert conn.feed(request[3:9]) == b""
    assert conn.buffered == 9
    assert conn.feed(request[9:] + request[:5]) == adu(b"\x03\x02\x00\x01")
    assert conn.buffered == 5
    assert conn.feed(request[5:]) == adu(b"\x03\x02\x00\x01")
    assert conn.buffered == 0


def test_pipelined_frames_are_answered_in_order(
    conn: ModbusConnection, core: ModbusServerCore, image: Any
) -> None:
    stream = b"".join(adu(read(3, i % 200, 1), tid=i) for i in range(1000))

    answer = conn.feed(stream)

    expected = b"".join(
        adu(struct.pack(">BBH", 3, 2, 3 * (i % 200) + 1), tid=i) for i in range(1000)
    )
    assert answer == expected
    assert core.frames == 1000
    assert core.exceptions == 0


def test_mixed_valid_and_invalid_frames_in_one_buffer(
    conn: ModbusConnection, core: ModbusServerCore, image: Any
) -> None:
    image.writable[3] = 1
    stream = (
        adu(read(3, 0, 1), tid=1)
        + adu(bytes([0x2B, 0x0E, 0x01, 0x00]), tid=2)
        + adu(read(3, 0, 1), tid=3, protocol=7)
        + adu(read(3, 0, 1), tid=4, unit=9)
        + adu(read(3, 0, 200), tid=5)
        + adu(struct.pack(">BHH", 6, 3, 42), tid=6)
        + adu(read(3, 1, 1) + b"\x00", tid=7)
        + adu(read(4, 3, 1), tid=8)
    )

    answer = conn.feed(stream)

    assert answer == (
        adu(b"\x03\x02\x00\x01", tid=1)
        + refusal(0x2B, ILLEGAL_FUNCTION, tid=2)
        + refusal(3, GATEWAY_TARGET_FAILED, unit=9, tid=4)
        + refusal(3, ILLEGAL_DATA_VALUE, tid=5)
        + adu(struct.pack(">BHH", 6, 3, 42), tid=6)
        + refusal(3, ILLEGAL_DATA_VALUE, tid=7)
        + adu(b"\x04\x02\x00\x2a", tid=8)
    )
    assert core.frames == 7
    assert core.exceptions == 4


def test_feed_takes_bytes_bytearray_and_memoryviews(conn: ModbusConnection) -> None:
    request = adu(read(3, 0, 1))
    strided = memoryview(bytes(b for b in request for _ in range(2)))[::2]
    words = memoryview(request + b"\x00\x00").cast("H")

    assert conn.feed(bytearray(request)) == adu(b"\x03\x02\x00\x01")
    assert conn.feed(memoryview(request)) == adu(b"\x03\x02\x00\x01")
    assert conn.feed(strided) == adu(b"\x03\x02\x00\x01")
    assert conn.feed(words) == adu(b"\x03\x02\x00\x01")
    assert conn.buffered == 2
    assert conn.feed(b"") == b""


def test_feed_refuses_what_is_not_bytes(conn: ModbusConnection) -> None:
    with pytest.raises(TypeError):
        conn.feed("\x00\x01")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        conn.feed(None)  # type: ignore[arg-type]

    assert conn.feed(adu(read(3, 0, 1))) == adu(b"\x03\x02\x00\x01")


def test_answer_buffer_grows_and_shrinks(conn: ModbusConnection, image: Any) -> None:
    many = adu(read(3, 0, 125)) * 2000

    answer = conn.feed(many)
    small = conn.feed(adu(read(3, 0, 1)))

    assert len(answer) == 2000 * (9 + 250)
    assert answer[: 9 + 250] * 2000 == answer
    assert small == adu(b"\x03\x02\x00\x01")


# Write callback


class Recorder:
    """An on_write callback that records its calls and answers as told."""

    def __init__(self, answer: object = 0) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int, int, list[int]]] = []
        self.dtypes: list[np.dtype[Any]] = []

    def __call__(
        self, unit: int, kind: int, address: int, values: npt.NDArray[np.uint16]
    ) -> Any:
        self.calls.append((unit, kind, address, values.tolist()))
        self.dtypes.append(values.dtype)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def test_on_write_accepted_values_are_stored(image: Any) -> None:
    image.writable[:] = 1
    image.coil_writable[:] = 1
    recorder = Recorder(0)
    conn = ModbusConnection(ModbusServerCore({3: image}, on_write=recorder))

    conn.feed(adu(struct.pack(">BHH", 6, 4, 0x1234), unit=3))
    conn.feed(adu(write_registers(10, [1, 2, 3]), unit=3))
    conn.feed(adu(struct.pack(">BHH", 5, 7, 0xFF00), unit=3))
    conn.feed(adu(write_coils(20, [1, 0, 1]), unit=3))
    answer = conn.feed(adu(read_write(10, 2, 11, [9]), unit=3))

    assert recorder.calls == [
        (3, KIND_REGISTERS, 4, [0x1234]),
        (3, KIND_REGISTERS, 10, [1, 2, 3]),
        (3, KIND_COILS, 7, [1]),
        (3, KIND_COILS, 20, [1, 0, 1]),
        (3, KIND_REGISTERS, 11, [9]),
    ]
    assert set(recorder.dtypes) == {np.dtype(np.uint16)}
    assert image.registers[4] == 0x1234
    assert image.registers[10:13].tolist() == [1, 9, 3]
    assert image.coils[7] == 1
    assert image.coils[20:23].tolist() == [1, 0, 1]
    assert answer == adu(b"\x17\x04\x00\x01\x00\x09", unit=3)


@pytest.mark.parametrize("code", [ILLEGAL_DATA_VALUE, ILLEGAL_DATA_ADDRESS, 0x06, 0xFF])
def test_on_write_refusal_is_answered_and_stores_nothing(image: Any, code: int) -> None:
    image.writable[:] = 1
    image.coil_writable[:] = 1
    core = ModbusServerCore({1: image}, on_write=Recorder(code))
    conn = ModbusConnection(core)
    registers = image.registers.copy()
    coils = image.coils.copy()

    answers = [
        conn.feed(adu(struct.pack(">BHH", 6, 4, 0x1234))),
        conn.feed(adu(write_registers(10, [1, 2, 3]))),
        conn.feed(adu(struct.pack(">BHH", 5, 3, 0x0000))),
        conn.feed(adu(write_coils(20, [1, 0, 1]))),
        conn.feed(adu(read_write(10, 2, 11, [9]))),
    ]

    assert answers == [refusal(f, code) for f in (6, 16, 5, 15, 23)]
    assert np.array_equal(image.registers, registers)
    assert np.array_equal(image.coils, coils)
    assert core.exceptions == 5
    assert conn.last_error is None


def test_on_write_raising_is_server_device_failure(
    image: Any, caplog: pytest.LogCaptureFixture
) -> None:
    image.writable[:] = 1
    conn = ModbusConnection(
        ModbusServerCore({1: image}, on_write=Recorder(RuntimeError("disk on fire")))
    )
    before = image.registers.copy()

    with caplog.at_level(logging.ERROR, logger="calejo_core.modbus"):
        answer = conn.feed(adu(write_registers(10, [1, 2])) + adu(read(3, 10, 1)))

    assert answer == refusal(16, SERVER_DEVICE_FAILURE) + adu(b"\x03\x02\x00\x1f")
    assert np.array_equal(image.registers, before)
    assert conn.last_error == (
        "on_write raised RuntimeError: disk on fire for unit 1 registers 10..11"
        "; answered exception 04"
    )
    assert "on_write failed for unit 1 registers 10..11" in caplog.text


@pytest.mark.parametrize("result", [None, "0", 1.0, -1, 256, True, object()])
def test_on_write_returning_no_exception_code_is_server_device_failure(
    image: Any, result: object
) -> None:
    image.writable[:] = 1
    conn = ModbusConnection(ModbusServerCore({1: image}, on_write=Recorder(result)))

    answer = conn.feed(adu(struct.pack(">BHH", 6, 4, 1)))

    assert answer == refusal(6, SERVER_DEVICE_FAILURE)
    assert image.registers[4] == 13
    assert conn.last_error is not None
    assert "expected 0 or an exception code 1..255" in conn.last_error


def test_on_write_numpy_integer_result_is_accepted(image: Any) -> None:
    image.writable[:] = 1
    conn = ModbusConnection(
        ModbusServerCore({1: image}, on_write=Recorder(np.int64(0)))
    )

    assert conn.feed(adu(struct.pack(">BHH", 6, 4, 1))) == adu(
        struct.pack(">BHH", 6, 4, 1)
    )
    assert image.registers[4] == 1


def test_on_write_is_not_asked_about_read_only_registers(image: Any) -> None:
    recorder = Recorder(0)
    conn = ModbusConnection(ModbusServerCore({1: image}, on_write=recorder))

    answer = conn.feed(adu(struct.pack(">BHH", 6, 4, 1)))

    assert answer == refusal(6, ILLEGAL_DATA_ADDRESS)
    assert recorder.calls == []


def test_on_write_values_array_is_a_copy(image: Any) -> None:
    image.writable[:] = 1

    def tamper(
        unit: int, kind: int, address: int, values: npt.NDArray[np.uint16]
    ) -> int:
        stored = values.copy()
        values[:] = 0xDEAD
        return 0 if stored.tolist() == [5, 6] else 3

    conn = ModbusConnection(ModbusServerCore({1: image}, on_write=tamper))

    assert conn.feed(adu(write_registers(0, [5, 6])))[7] == 16
    assert image.registers[:2].tolist() == [5, 6]


def test_on_write_removing_the_unit_is_answered_safely(
    make_image: ImageFactory,
) -> None:
    image = make_image()
    image.writable[:] = 1
    core: ModbusServerCore

    def remove(unit: int, kind: int, address: int, values: Any) -> int:
        core.remove_unit(unit)
        gc.collect()
        return 0

    core = ModbusServerCore({1: image}, on_write=remove)
    conn = ModbusConnection(core)
    del image

    answer = conn.feed(adu(write_registers(0, [5, 6])))

    assert answer == refusal(16, GATEWAY_TARGET_FAILED)


def test_on_write_replacing_the_unit_writes_into_the_new_image(
    make_image: ImageFactory,
) -> None:
    old = make_image()
    old.writable[:] = 1
    new = StandIn(50, 8)
    new.writable[:] = 1
    core: ModbusServerCore

    def replace(unit: int, kind: int, address: int, values: Any) -> int:
        core.set_unit(unit, new)
        return 0

    core = ModbusServerCore({1: old}, on_write=replace)
    conn = ModbusConnection(core)

    # Accepted for the old image, which is gone once on_write returns.
    outside = conn.feed(adu(read_write(0, 1, 100, [7])))
    inside = conn.feed(adu(read_write(0, 2, 0, [5])))

    assert outside == refusal(23, ILLEGAL_DATA_ADDRESS)
    assert old.registers[100] == 301
    assert inside == adu(b"\x17\x04\x00\x05\x00\x00")
    assert new.registers[0] == 5
    assert old.registers[0] == 1


def test_on_write_feeding_the_same_connection_is_refused(image: Any) -> None:
    image.writable[:] = 1
    conn: ModbusConnection

    def reenter(unit: int, kind: int, address: int, values: Any) -> int:
        conn.feed(adu(read(3, 0, 1)))
        return 0

    conn = ModbusConnection(ModbusServerCore({1: image}, on_write=reenter))

    answer = conn.feed(adu(struct.pack(">BHH", 6, 0, 1)) + adu(read(3, 0, 1)))

    assert answer == refusal(6, SERVER_DEVICE_FAILURE) + adu(b"\x03\x02\x00\x01")
    assert conn.last_error is not None
    assert "feed() called again from inside on_write" in conn.last_error


# Construction and lifetime


def test_constants() -> None:
    assert (ILLEGAL_FUNCTION, ILLEGAL_DATA_ADDRESS, ILLEGAL_DATA_VALUE) == (1, 2, 3)
    assert (SERVER_DEVICE_FAILURE, GATEWAY_TARGET_FAILED) == (4, 0x0B)
    assert (KIND_REGISTERS, KIND_COILS) == (0, 1)


def test_counters(core: ModbusServerCore, conn: ModbusConnection) -> None:
    conn.feed(adu(read(3, 0, 1)) * 3 + adu(read(3, 0, 0)) + adu(read(3, 0, 1), unit=7))

    assert core.frames == 5
    assert core.exceptions == 2


@pytest.mark.parametrize("unit", [-1, 256, 1 << 70])
def test_unit_id_out_of_range_is_refused(unit: int) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"unit id must be 0..255, got {unit}")
    ):
        ModbusServerCore({unit: StandIn()})


def test_unit_id_of_wrong_type_is_refused() -> None:
    core = ModbusServerCore({})

    with pytest.raises(TypeError, match=r"unit id must be an int 0\.\.255, got str"):
        core.set_unit("1", StandIn())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got bool"):
        core.set_unit(True, StandIn())  # type: ignore[arg-type]


def test_remove_unknown_unit_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="unit 4 is not served"):
        ModbusServerCore({}).remove_unit(4)


@pytest.mark.parametrize(
    "name, array, message",
    [
        ("registers", np.zeros(10, np.int64), "registers must be a writable"),
        ("registers", np.zeros(20, np.uint16)[::2], "registers must be a writable"),
        ("registers", np.zeros(10, ">u2"), "registers must be a writable"),
        ("registers", [0] * 10, "registers must be a writable"),
        ("writable", np.zeros(10, np.int8), "writable must be a writable"),
        ("writable", np.zeros(11, np.uint8), "writable has 11 entries, expected 10"),
        ("coil_writable", np.zeros(3, np.uint8), "coil_writable has 3 entries"),
        ("coils", np.zeros(8, np.uint16), "coils must be a writable"),
    ],
)
def test_image_arrays_are_checked(name: str, array: object, message: str) -> None:
    image = StandIn(10, 8)
    setattr(image, name, array)

    with pytest.raises(ValueError, match=f"unit 2: {message}"):
        ModbusServerCore({2: image})


def test_read_only_array_is_refused() -> None:
    image = StandIn(10, 8)
    image.registers.flags.writeable = False

    with pytest.raises(ValueError, match="unit 1: registers must be a writable"):
        ModbusServerCore({1: image})


def test_image_without_arrays_is_refused() -> None:
    with pytest.raises(TypeError, match="the image has no 'registers' array"):
        ModbusServerCore({1: object()})


def test_on_write_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_write must be callable or None, got int"):
        ModbusServerCore({}, on_write=3)  # type: ignore[arg-type]


def test_connection_needs_a_core() -> None:
    with pytest.raises(TypeError):
        ModbusConnection(None)  # type: ignore[arg-type]


def test_served_arrays_are_pinned() -> None:
    image = StandIn(10, 8)
    core = ModbusServerCore({1: image})

    with pytest.raises(ValueError, match="cannot resize"):
        image.registers.resize(20)
    assert core.units == {1: image}


def test_removed_unit_releases_its_arrays() -> None:
    image = StandIn(10, 8)
    core = ModbusServerCore({1: image})
    registers = weakref.ref(image.registers)

    core.remove_unit(1)
    del image
    gc.collect()

    assert registers() is None


def test_connection_keeps_its_core_alive(image: Any) -> None:
    conn = ModbusConnection(ModbusServerCore({1: image}))
    gc.collect()

    assert conn.feed(adu(read(3, 0, 1))) == adu(b"\x03\x02\x00\x01")


def test_module_has_signatures_in_docstrings() -> None:
    assert modbus.ModbusConnection.feed.__doc__ is not None
    assert modbus.ModbusConnection.feed.__doc__.startswith(
        "ModbusConnection.feed(self, data)"
    )
