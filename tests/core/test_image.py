"""The station register image, its map and image sets.

Every test runs against the compiled module and the pure-Python reference
(the ``codecs_impl`` fixture).
"""

from __future__ import annotations

import importlib
import re
import struct
from types import ModuleType

import numpy as np
import pytest

LAYOUT = {
    "HEARTBEAT": 0,
    "STATION_STATUS": 1,
    "PUMP_COUNT": 2,
    "PLC_HEARTBEAT": 3,
    "PLC_HEARTBEAT_AGE": 4,
    "STATION_LEVEL": 5,
    "LAYOUT_VERSION": 6,
    "IMAGE_LAYOUT": 1,
    "PUMP_BASE": 100,
    "PUMP_STRIDE": 10,
    "PUMP_APPLIED_X10": 0,
    "PUMP_APPLIED_FLOAT": 1,
    "PUMP_STATUS": 3,
    "PUMP_TARGET_X10": 4,
    "PUMP_MIN_X10": 5,
    "PUMP_MAX_X10": 6,
    "PUMP_MAX_RATE_X10": 7,
    "PUMP_SETPOINT_AGE": 8,
    "PUMP_OUTCOME": 9,
    "FEEDBACK_BASE": 1000,
    "FEEDBACK_STRIDE": 10,
    "FEEDBACK_SPEED_X10": 0,
    "FEEDBACK_RUNNING": 1,
    "FEEDBACK_POWER_X10": 2,
    "MAX_PUMPS": 90,
    "MAX_REGISTERS": 65536,
    "MAX_COILS": 65536,
    "SATURATED": 65535,
    "UNLIMITED_RATE": 65535,
    "COIL_SYSTEM_ESTOP": 0,
    "COIL_STATION_ESTOP": 1,
    "COIL_PUMP_BASE": 100,
    "STATION_ESTOP": 1,
    "STATION_FAILSAFE": 2,
    "STATION_PLAN_STALE": 4,
    "STATION_STORAGE_DEGRADED": 8,
    "ILLEGAL_DATA_ADDRESS": 2,
    "ILLEGAL_DATA_VALUE": 3,
}


def pump(n: int, offset: int) -> int:
    return 100 + 10 * n + offset


def float32_words(value: float, order: str = "ABCD") -> list[int]:
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    swap = lambda w: ((w >> 8) | (w << 8)) & 0xFFFF  # noqa: E731
    return {
        "ABCD": [high, low],
        "CDAB": [low, high],
        "BADC": [swap(high), swap(low)],
        "DCBA": [swap(low), swap(high)],
    }[order]


def message(text: str) -> str:
    return f"^{re.escape(text)}$"


def test_layout_constants(codecs_impl: ModuleType) -> None:
    for name, value in LAYOUT.items():
        assert getattr(codecs_impl, name) == value, name


def test_construction(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(4)

    assert image.n_pumps == 4
    assert image.float_order == "ABCD"
    assert image.registers.dtype == np.uint16
    assert image.registers.shape == (1040,)
    assert image.writable.dtype == np.uint8
    assert image.writable.shape == (1040,)
    assert image.coils.dtype == np.uint8
    assert image.coils.shape == (104,)
    assert image.coil_writable.shape == (104,)
    assert not image.coil_writable.any()
    assert not image.coils.any()
    assert image.registers[2] == 4
    assert image.registers[6] == 1
    assert image.registers.sum() == 5


def test_sizes(codecs_impl: ModuleType) -> None:
    StationImage = codecs_impl.StationImage

    assert StationImage(0).registers.shape == (1000,)
    assert StationImage(0).coils.shape == (100,)
    assert StationImage(2, size=500).registers.shape == (1020,)
    assert StationImage(2, size=5000).registers.shape == (5000,)
    assert StationImage(2, n_coils=2000).coils.shape == (2000,)
    assert StationImage(90, size=65536).registers.shape == (65536,)
    assert StationImage(90).registers.shape == (1900,)


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"n_pumps": 91}, ValueError, "n_pumps must be in [0, 90], got 91"),
        ({"n_pumps": -1}, ValueError, "n_pumps must be in [0, 90], got -1"),
        ({"n_pumps": 2.0}, TypeError, "n_pumps must be an integer, got float"),
        (
            {"n_pumps": 1, "size": 65537},
            ValueError,
            "size must be at most 65536 registers, got 65537",
        ),
        ({"n_pumps": 1, "size": -1}, ValueError, "size must be at least 0, got -1"),
        (
            {"n_pumps": 1, "n_coils": 70000},
            ValueError,
            "n_coils must be at most 65536, got 70000",
        ),
        (
            {"n_pumps": 1, "float_order": "ABDC"},
            ValueError,
            "order must be one of ABCD, CDAB, BADC, DCBA, got 'ABDC'",
        ),
    ],
)
def test_construction_errors(
    codecs_impl: ModuleType, kwargs: dict[str, object], error: type, text: str
) -> None:
    with pytest.raises(error, match=message(text)):
        codecs_impl.StationImage(**kwargs)


def test_arrays_are_fixed(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(3)
    arrays = (image.registers, image.writable, image.coils, image.coil_writable)
    addresses = [array.__array_interface__["data"][0] for array in arrays]

    image.update_pumps(np.array([1.0, 2.0, 3.0]), np.zeros(3, dtype=np.uint16))
    image.set_emergency_stops(True, False, [False] * 3)
    image.set_writable(10, 5)

    assert image.registers is arrays[0]
    assert image.writable is arrays[1]
    assert image.coils is arrays[2]
    assert image.coil_writable is arrays[3]
    now = [array.__array_interface__["data"][0] for array in arrays]
    assert now == addresses


def test_arrays_cannot_be_resized(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(2)

    for array in (image.registers, image.writable, image.coils, image.coil_writable):
        with pytest.raises(ValueError):
            array.resize(10, refcheck=False)
    assert image.registers.shape == (1020,)
    image.update_pumps(np.ones(2), np.ones(2, dtype=np.uint16))
    assert image.registers[100] == 10


def test_no_image_without_arrays() -> None:
    compiled = importlib.import_module("calejo_core.codecs")

    with pytest.raises(TypeError):
        compiled.StationImage.__new__(compiled.StationImage)
    with pytest.raises(TypeError):
        compiled.ImageSet.__new__(compiled.ImageSet)


def test_writable_mask_follows_the_map(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(3)

    expected = np.zeros(1030, dtype=np.uint8)
    for row in codecs_impl.register_map(3):
        if row.type != "coil" and row.access == "read/write":
            expected[row.address : row.address + row.quantity] = 1
    assert image.writable.tolist() == expected.tolist()
    assert np.flatnonzero(image.writable).tolist() == [
        3,
        5,
        1000,
        1001,
        1002,
        1010,
        1011,
        1012,
        1020,
        1021,
        1022,
    ]


def test_register_map(codecs_impl: ModuleType) -> None:
    rows = codecs_impl.register_map(2, "CDAB")

    registers = [row for row in rows if row.type != "coil"]
    coils = [row for row in rows if row.type == "coil"]
    assert [row.address for row in registers][:7] == list(range(7))
    assert rows[0] == (
        0,
        1,
        "heartbeat",
        "uint16",
        "read",
        "adapter heartbeat, +1 each second, wraps at 65535",
    )
    by_name = {row.name: row for row in rows}
    assert by_name["pump1.applied"].address == 111
    assert by_name["pump1.applied"].quantity == 2
    assert by_name["pump1.applied"].type == "float32 CDAB"
    assert by_name["pump0.status"].address == 103
    assert by_name["pump1.max_rate_x10"].address == 117
    assert by_name["pump1.outcome"].address == 119
    assert by_name["pump1.running"].address == 1011
    assert by_name["pump1.running"].access == "read/write"
    assert by_name["station_level"].type == "int16"
    assert [row.address for row in coils] == [0, 1, 100, 101]
    assert all(row.access == "read" for row in coils)

    covered: set[int] = set()
    for row in registers:
        span = set(range(row.address, row.address + row.quantity))
        assert not covered & span, row
        covered |= span
    assert len(registers) == 7 + 9 * 2 + 3 * 2


def test_register_map_is_one_for_both_implementations() -> None:
    compiled = importlib.import_module("calejo_core.codecs")
    reference = importlib.import_module("calejo_core.reference.codecs")

    for n_pumps in (0, 1, 7, 90):
        for order in ("ABCD", "DCBA"):
            assert compiled.register_map(n_pumps, order) == (
                reference.register_map(n_pumps, order)
            )


def test_register_map_errors(codecs_impl: ModuleType) -> None:
    with pytest.raises(ValueError, match=message("n_pumps must be in [0, 90], got 91")):
        codecs_impl.register_map(91)
    with pytest.raises(ValueError, match=r"^order must be one of"):
        codecs_impl.register_map(1, "XYZW")


def test_heartbeat_wraps(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(1)

    image.set_heartbeat(65535)
    assert image.registers[0] == 65535
    image.set_heartbeat(65536)
    assert image.registers[0] == 0
    image.set_heartbeat(70000)
    assert image.registers[0] == 4464
    image.set_heartbeat(-1)
    assert image.registers[0] == 65535
    with pytest.raises(
        TypeError, match=message("heartbeat must be an integer, got float")
    ):
        image.set_heartbeat(1.5)


def test_station_status(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(1)

    image.set_station_status(codecs_impl.STATION_ESTOP | codecs_impl.STATION_PLAN_STALE)
    assert image.registers[1] == 5
    with pytest.raises(
        ValueError, match=message("station status must be in [0, 65535], got 65536")
    ):
        image.set_station_status(65536)
    assert image.registers[1] == 5


@pytest.mark.parametrize(
    ("seconds", "register"),
    [(0.0, 0), (12.9, 12), (-3.0, 0), (65534.99, 65534), (1e9, 65535), (np.nan, 65535)],
)
def test_plc_heartbeat_age(
    codecs_impl: ModuleType, seconds: float, register: int
) -> None:
    image = codecs_impl.StationImage(1)

    image.set_plc_heartbeat_age(seconds)

    assert image.registers[4] == register


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
def test_update_pumps(codecs_impl: ModuleType, order: str) -> None:
    image = codecs_impl.StationImage(3, float_order=order)
    applied = np.array([42.34, 0.0, 6553.5])
    status = np.array([1, 8, 0xFFFF], dtype=np.uint16)

    image.update_pumps(applied, status)

    registers = image.registers
    assert registers[pump(0, 0)] == 423
    assert registers[pump(1, 0)] == 0
    assert registers[pump(2, 0)] == 65535
    for k in range(3):
        words = registers[pump(k, 1) : pump(k, 3)].tolist()
        assert words == float32_words(applied[k], order)
        assert image.read(pump(k, 1), "float32", order) == np.float32(applied[k])
        assert registers[pump(k, 3)] == status[k]
    assert registers[pump(0, 4) : pump(0, 10)].tolist() == [0] * 6


def test_update_pumps_from_first(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(4)

    image.update_pumps(np.array([10.0, 20.0]), np.array([2, 3], dtype=np.uint16), 2)

    assert image.registers[pump(0, 0)] == 0
    assert image.registers[pump(1, 0)] == 0
    assert image.registers[pump(2, 0)] == 100
    assert image.registers[pump(3, 0)] == 200
    assert image.registers[pump(3, 3)] == 3


def test_update_pumps_rounding(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(4)

    image.update_pumps(
        np.array([0.05, 0.04999, 12.25, -0.04]), np.zeros(4, dtype=np.uint16)
    )

    assert image.registers[[pump(k, 0) for k in range(4)]].tolist() == [1, 0, 123, 0]


@pytest.mark.parametrize(
    ("values", "text"),
    [
        (
            [1.0, 6553.55, 2.0],
            "cannot encode pump 2 applied = 6553.55 as uint16: "
            "scaled value 65535.5 is outside [0, 65535]",
        ),
        (
            [1.0, -0.05, 2.0],
            "cannot encode pump 2 applied = -0.05 as uint16: "
            "scaled value -0.5 is outside [0, 65535]",
        ),
        (
            [np.nan, 1.0, 2.0],
            "cannot encode pump 1 applied = nan as uint16: "
            "scaled value nan is outside [0, 65535]",
        ),
        (
            [1.0, 2.0, np.inf],
            "cannot encode pump 3 applied = inf as uint16: "
            "scaled value inf is outside [0, 65535]",
        ),
    ],
)
def test_update_pumps_refuses_and_writes_nothing(
    codecs_impl: ModuleType, values: list[float], text: str
) -> None:
    image = codecs_impl.StationImage(4)
    image.update_pumps(np.full(4, 5.0), np.full(4, 1, dtype=np.uint16))
    before = image.registers.copy()

    with pytest.raises(codecs_impl.EncodeError, match=message(text)):
        image.update_pumps(np.array(values), np.full(3, 9, dtype=np.uint16), 1)

    assert image.registers.tolist() == before.tolist()


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (
            lambda image: image.update_pumps(np.zeros(3), np.zeros(2, np.uint16)),
            ValueError,
            "status must have as many elements as applied (3), got 2",
        ),
        (
            lambda image: image.update_pumps(np.zeros(3), np.zeros(3, np.uint16), 2),
            IndexError,
            "pumps 2..4 are outside the image of 4 pumps",
        ),
        (
            lambda image: image.update_pumps(np.zeros(1), np.zeros(1, np.uint16), -1),
            IndexError,
            "pumps -1..-1 are outside the image of 4 pumps",
        ),
        (
            lambda image: image.update_pumps(np.zeros(5), np.zeros(5, np.uint16)),
            IndexError,
            "pumps 0..4 are outside the image of 4 pumps",
        ),
        (
            lambda image: image.update_pumps(np.zeros(2), np.zeros(2, np.int64)),
            TypeError,
            "status must be a numpy.ndarray of uint16, got int64",
        ),
        (
            lambda image: image.update_pumps([1.0], np.zeros(1, np.uint16)),
            TypeError,
            "applied must be a numpy.ndarray of float64, got list",
        ),
        (
            lambda image: image.update_pumps(np.zeros(1), np.zeros(1, np.uint16), 0.0),
            TypeError,
            "first must be an integer, got float",
        ),
        (
            lambda image: image.update_details(
                np.zeros(2), np.zeros(2), np.zeros(1, np.uint8)
            ),
            ValueError,
            "outcome must have as many elements as target (2), got 1",
        ),
        (
            lambda image: image.update_details(
                np.zeros(2), np.zeros(2), np.zeros(2, np.uint16)
            ),
            TypeError,
            "outcome must be a numpy.ndarray of uint8, got uint16",
        ),
        (
            lambda image: image.set_limits(np.zeros(2), np.zeros(2), np.zeros(3)),
            ValueError,
            "max_rates must have as many elements as min_values (2), got 3",
        ),
        (
            lambda image: image.set_emergency_stops(False, False, [True]),
            ValueError,
            "pumps must have 4 flags, one per pump, got 1",
        ),
    ],
)
def test_update_argument_errors(
    codecs_impl: ModuleType, call: object, error: type, text: str
) -> None:
    image = codecs_impl.StationImage(4)

    assert callable(call)
    with pytest.raises(error, match=message(text)):
        call(image)


def test_gate_arrays_are_accepted_read_only(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(2)
    applied = np.array([1.5, 2.5])
    status = np.array([1, 2], dtype=np.uint16)
    applied.flags.writeable = False
    status.flags.writeable = False

    image.update_pumps(applied, status)

    assert image.registers[pump(1, 0)] == 25


def test_update_details(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(3)

    image.update_details(
        np.array([42.5, 0.0, 50.0]),
        np.array([1.9, -1.0, 1e12]),
        np.array([0, 1, 3], dtype=np.uint8),
    )
    image.update_details(
        np.array([12.0]), np.array([np.nan]), np.array([2], dtype=np.uint8), 1
    )

    registers = image.registers
    assert [registers[pump(k, 4)] for k in range(3)] == [425, 120, 500]
    assert [registers[pump(k, 8)] for k in range(3)] == [1, 65535, 65535]
    assert [registers[pump(k, 9)] for k in range(3)] == [0, 2, 3]


def test_update_details_refuses_target(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(2)

    text = (
        "cannot encode pump 1 target = -1.0 as uint16: "
        "scaled value -10.0 is outside [0, 65535]"
    )
    with pytest.raises(codecs_impl.EncodeError, match=message(text)):
        image.update_details(
            np.array([1.0, -1.0]), np.zeros(2), np.ones(2, dtype=np.uint8)
        )
    assert not image.registers[100:120].any()


def test_set_limits(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(4)

    image.set_limits(
        np.array([20.0, 0.0, 10.0, 5.0]),
        np.array([50.0, 60.5, 6553.5, 5.0]),
        np.array([2.5, np.inf, 6553.45, 1e9]),
    )

    registers = image.registers
    assert [registers[pump(k, 5)] for k in range(4)] == [200, 0, 100, 50]
    assert [registers[pump(k, 6)] for k in range(4)] == [500, 605, 65535, 50]
    assert [registers[pump(k, 7)] for k in range(4)] == [25, 65535, 65535, 65535]


@pytest.mark.parametrize(
    ("lows", "highs", "rates", "text"),
    [
        (
            [0.0, -1.0],
            [1.0, 1.0],
            [1.0, 1.0],
            "cannot encode pump 1 min_value = -1.0 as uint16: "
            "scaled value -10.0 is outside [0, 65535]",
        ),
        (
            [0.0, 0.0],
            [7000.0, 1.0],
            [1.0, 1.0],
            "cannot encode pump 0 max_value = 7000.0 as uint16: "
            "scaled value 70000.0 is outside [0, 65535]",
        ),
        (
            [0.0, 0.0],
            [1.0, 1.0],
            [1.0, np.nan],
            "cannot encode pump 1 max_rate = nan as uint16: "
            "scaled value nan is outside [0, 65535]",
        ),
    ],
)
def test_set_limits_refuses(
    codecs_impl: ModuleType,
    lows: list[float],
    highs: list[float],
    rates: list[float],
    text: str,
) -> None:
    image = codecs_impl.StationImage(2)

    with pytest.raises(codecs_impl.EncodeError, match=message(text)):
        image.set_limits(np.array(lows), np.array(highs), np.array(rates))
    assert not image.registers[100:120].any()


def test_emergency_stop_coils(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(3)

    image.set_emergency_stops(False, False, [False, True, False])
    assert image.coils[[0, 1, 100, 101, 102]].tolist() == [0, 0, 0, 1, 0]

    image.set_emergency_stops(False, True, np.array([False, False, False]))
    assert image.coils[[0, 1, 100, 101, 102]].tolist() == [0, 1, 1, 1, 1]

    image.set_emergency_stops(True, False, [0, 0, 0])
    assert image.coils[[0, 1, 100, 101, 102]].tolist() == [1, 0, 1, 1, 1]

    image.set_emergency_stops(False, False, [0, 0, 0])
    assert not image.coils.any()


@pytest.mark.parametrize(
    ("address", "value", "dtype", "order", "scale", "offset"),
    [
        (3, 17, "uint16", "ABCD", 1.0, 0.0),
        (5, -125, "int16", "ABCD", 1.0, 0.0),
        (20, 123456, "uint32", "CDAB", 1.0, 0.0),
        (30, -1.5, "float32", "DCBA", 1.0, 0.0),
        (40, 1e300, "float64", "BADC", 1.0, 0.0),
        (1036, 42.5, "uint16", "ABCD", 10.0, 0.0),
        (1038, -7.0, "int32", "BADC", 2.0, 1.0),
    ],
)
def test_write_and_read(
    codecs_impl: ModuleType,
    address: int,
    value: float,
    dtype: str,
    order: str,
    scale: float,
    offset: float,
) -> None:
    image = codecs_impl.StationImage(4)

    image.write(address, value, dtype, order, scale, offset)

    assert image.read(address, dtype, order, scale, offset) == value
    width = codecs_impl.width(dtype)
    words = image.registers[address : address + width].tolist()
    assert tuple(words) == codecs_impl.encode(value, dtype, order, scale, offset)


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (
            lambda image: image.read(1040),
            IndexError,
            "address 1040 is outside the image of 1040 registers",
        ),
        (
            lambda image: image.read(-1),
            IndexError,
            "address -1 is outside the image of 1040 registers",
        ),
        (
            lambda image: image.read(1038, "float64"),
            IndexError,
            "registers 1038..1041 are outside the image of 1040 registers",
        ),
        (
            lambda image: image.write(1039, 1.0, "float32"),
            IndexError,
            "registers 1039..1040 are outside the image of 1040 registers",
        ),
        (
            lambda image: image.write(2**70, 1.0),
            IndexError,
            f"address {2**70} is outside the image of 1040 registers",
        ),
        (
            lambda image: image.write("7", 1.0),
            TypeError,
            "address must be an integer, got str",
        ),
        (
            lambda image: image.write(7, 70000),
            None,
            "cannot encode value = 70000.0 as uint16: "
            "scaled value 70000.0 is outside [0, 65535]",
        ),
        (
            lambda image: image.read(7, "uint64"),
            ValueError,
            "dtype must be one of uint16, int16, uint32, int32, float32, float64, "
            "got 'uint64'",
        ),
        (
            lambda image: image.set_writable(1030, 11),
            IndexError,
            "registers 1030..1040 are outside the image of 1040 registers",
        ),
        (
            lambda image: image.set_writable(10, -1),
            ValueError,
            "count must be at least 0, got -1",
        ),
    ],
)
def test_read_write_errors(
    codecs_impl: ModuleType, call: object, error: type | None, text: str
) -> None:
    image = codecs_impl.StationImage(4)
    before = image.registers.copy()

    assert callable(call)
    with pytest.raises(error or codecs_impl.EncodeError, match=message(text)):
        call(image)
    assert image.registers.tolist() == before.tolist()


def test_set_writable(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(1)

    image.set_writable(10, 3)
    assert image.writable[9:14].tolist() == [0, 1, 1, 1, 0]
    image.set_writable(11, 1, False)
    assert image.writable[9:14].tolist() == [0, 1, 0, 1, 0]
    image.set_writable(1009, 1)
    image.set_writable(0, 0)
    assert image.writable[1009] == 1


def test_check_write(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(2)

    def check(address: int, *values: int) -> int:
        return int(image.check_write(address, np.array(values, dtype=np.uint16)))

    assert check(3, 65535) == 0
    assert check(5, 0xFF38) == 0
    assert check(1000, 500, 1, 30) == 0
    assert check(1010, 500, 0) == 0
    assert check(1011, 2) == 3
    assert check(1000, 500, 2, 30) == 3
    assert check(1002, 1, 1) == 2
    assert check(4, 1) == 2
    assert check(100, 1) == 2
    assert check(1019, 1, 1) == 2
    assert check(-1, 1) == 2
    assert check(1020, 1) == 2


def test_image_set(codecs_impl: ModuleType) -> None:
    images = [
        codecs_impl.StationImage(2),
        codecs_impl.StationImage(0),
        codecs_impl.StationImage(3, float_order="DCBA"),
    ]
    group = codecs_impl.ImageSet(images)
    applied = np.array([1.0, 2.0, 3.5, 4.25, 5.0])
    status = np.arange(5, dtype=np.uint16)

    group.update_pumps(applied, status)
    group.update_details(
        applied * 2, np.array([1.0, 2, 3, 4, 5]), np.arange(5, dtype=np.uint8)
    )

    assert group.n_pumps == 5
    assert group.images == tuple(images)
    expected = [
        codecs_impl.StationImage(2),
        codecs_impl.StationImage(3, float_order="DCBA"),
    ]
    expected[0].update_pumps(applied[:2], status[:2])
    expected[1].update_pumps(applied[2:], status[2:])
    expected[0].update_details(
        applied[:2] * 2, np.array([1.0, 2]), np.arange(2, dtype=np.uint8)
    )
    expected[1].update_details(
        applied[2:] * 2, np.array([3.0, 4, 5]), np.arange(2, 5, dtype=np.uint8)
    )
    assert images[0].registers.tolist() == expected[0].registers.tolist()
    assert images[2].registers.tolist() == expected[1].registers.tolist()
    assert images[1].registers.sum() == 1


def test_image_set_refuses_and_writes_nothing(codecs_impl: ModuleType) -> None:
    images = [codecs_impl.StationImage(2), codecs_impl.StationImage(3)]
    group = codecs_impl.ImageSet(images)

    text = (
        "cannot encode pump 3 (image 1 pump 1) applied = -1.0 as uint16: "
        "scaled value -10.0 is outside [0, 65535]"
    )
    with pytest.raises(codecs_impl.EncodeError, match=message(text)):
        group.update_pumps(
            np.array([1.0, 2.0, 3.0, -1.0, 5.0]), np.ones(5, dtype=np.uint16)
        )
    text = (
        "cannot encode pump 0 (image 0 pump 0) target = 7000.0 as uint16: "
        "scaled value 70000.0 is outside [0, 65535]"
    )
    with pytest.raises(codecs_impl.EncodeError, match=message(text)):
        group.update_details(
            np.array([7000.0, 2.0, 3.0, 1.0, 5.0]),
            np.ones(5),
            np.ones(5, dtype=np.uint8),
        )
    assert images[0].registers.sum() == 3
    assert images[1].registers.sum() == 4


def test_image_set_errors(codecs_impl: ModuleType) -> None:
    image = codecs_impl.StationImage(2)
    group = codecs_impl.ImageSet([image])

    with pytest.raises(ValueError, match=message("images[1] appears more than once")):
        codecs_impl.ImageSet([image, image])
    with pytest.raises(
        TypeError, match=message("images[0] must be a StationImage, got int")
    ):
        codecs_impl.ImageSet([3])
    with pytest.raises(
        ValueError, match=message("expected 2 values, one per pump, got 3")
    ):
        group.update_pumps(np.zeros(3), np.zeros(3, dtype=np.uint16))
    with pytest.raises(
        TypeError, match=r"^applied must be a numpy\.ndarray of float64"
    ):
        group.update_pumps(np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.uint16))
    assert codecs_impl.ImageSet([]).n_pumps == 0


def test_implementations_do_not_mix() -> None:
    compiled = importlib.import_module("calejo_core.codecs")
    reference = importlib.import_module("calejo_core.reference.codecs")

    with pytest.raises(TypeError, match="must be a StationImage"):
        compiled.ImageSet([reference.StationImage(1)])
    with pytest.raises(TypeError, match="must be a StationImage"):
        reference.ImageSet([compiled.StationImage(1)])
