"""Register codecs and the station register image, in plain Python.

The same rules and the same public API as the compiled
:mod:`calejo_core.codecs`, written for clarity rather than speed. The tests
hold the compiled module against this one, value for value and message for
message.

Encoding: ``raw = value * scale + offset``. Integer types round ``raw`` to
the nearest integer, halves away from zero, and refuse (``EncodeError``) a
result outside the type's range, NaN and infinity: a value never wraps.
float32 refuses a finite ``raw`` beyond the float32 range (it never turns
into infinity by accident); NaN and infinity pass as themselves for the
float types. Decoding: ``value = (raw - offset) / scale``.

Word orders, for the bytes A B C D of a 32-bit value in big-endian order:
ABCD (registers in order, bytes big-endian in each), CDAB (registers in
reverse order), BADC (registers in order, bytes swapped in each), DCBA
(fully little-endian). float64 follows the same idea over four registers.
"""

from __future__ import annotations

import math
import numbers
import operator
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

DATA_TYPES: Final[tuple[str, ...]] = (
    "uint16",
    "int16",
    "uint32",
    "int32",
    "float32",
    "float64",
)
WORD_ORDERS: Final[tuple[str, ...]] = ("ABCD", "CDAB", "BADC", "DCBA")

FLOAT32_MAX: Final[float] = 3.4028234663852886e38

# Holding registers of a station image (zero-based addresses).
HEARTBEAT: Final[int] = 0
STATION_STATUS: Final[int] = 1
PUMP_COUNT: Final[int] = 2
PLC_HEARTBEAT: Final[int] = 3
PLC_HEARTBEAT_AGE: Final[int] = 4
STATION_LEVEL: Final[int] = 5
LAYOUT_VERSION: Final[int] = 6
IMAGE_LAYOUT: Final[int] = 1

PUMP_BASE: Final[int] = 100
PUMP_STRIDE: Final[int] = 10
PUMP_APPLIED_X10: Final[int] = 0
PUMP_APPLIED_FLOAT: Final[int] = 1
PUMP_STATUS: Final[int] = 3
PUMP_TARGET_X10: Final[int] = 4
PUMP_MIN_X10: Final[int] = 5
PUMP_MAX_X10: Final[int] = 6
PUMP_MAX_RATE_X10: Final[int] = 7
PUMP_SETPOINT_AGE: Final[int] = 8
PUMP_OUTCOME: Final[int] = 9

FEEDBACK_BASE: Final[int] = 1000
FEEDBACK_STRIDE: Final[int] = 10
FEEDBACK_SPEED_X10: Final[int] = 0
FEEDBACK_RUNNING: Final[int] = 1
FEEDBACK_POWER_X10: Final[int] = 2

MAX_PUMPS: Final[int] = (FEEDBACK_BASE - PUMP_BASE) // PUMP_STRIDE
MAX_REGISTERS: Final[int] = 65536
MAX_COILS: Final[int] = 65536
SATURATED: Final[int] = 65535
UNLIMITED_RATE: Final[int] = 65535

COIL_SYSTEM_ESTOP: Final[int] = 0
COIL_STATION_ESTOP: Final[int] = 1
COIL_PUMP_BASE: Final[int] = 100

STATION_ESTOP: Final[int] = 1
STATION_FAILSAFE: Final[int] = 2
STATION_PLAN_STALE: Final[int] = 4
STATION_STORAGE_DEGRADED: Final[int] = 8

ILLEGAL_DATA_ADDRESS: Final[int] = 2
ILLEGAL_DATA_VALUE: Final[int] = 3

_WIDTH: Final[dict[str, int]] = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
    "float64": 4,
}
_RANGE: Final[dict[str, tuple[int | float, int | float]]] = {
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "uint32": (0, 4294967295),
    "int32": (-2147483648, 2147483647),
    "float32": (-FLOAT32_MAX, FLOAT32_MAX),
    "float64": (-sys.float_info.max, sys.float_info.max),
}
_STRUCT: Final[dict[str, struct.Struct]] = {
    "uint16": struct.Struct(">H"),
    "int16": struct.Struct(">h"),
    "uint32": struct.Struct(">I"),
    "int32": struct.Struct(">i"),
    "float32": struct.Struct(">f"),
    "float64": struct.Struct(">d"),
}


class EncodeError(ValueError):
    """A value that the register type cannot hold."""


class RegisterRow(NamedTuple):
    """One entry of the register map: holding registers, then coils."""

    address: int
    quantity: int
    name: str
    type: str
    access: str
    description: str


class _OutOfRange(Exception):
    """Raised inside the codec; the caller names the value in EncodeError."""


def width(dtype: str) -> int:
    """Registers (16 bits each) that one value of ``dtype`` takes."""
    return _WIDTH[_check_dtype(dtype)]


def encode(
    value: float,
    dtype: str,
    order: str = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
) -> tuple[int, ...]:
    """Registers that hold ``value * scale + offset`` as ``dtype`` in ``order``."""
    _check_dtype(dtype)
    _check_order(order)
    factor, shift = _check_transform(scale, offset)
    number = _real(value, "value")

    raw = _scaled(number, factor, shift)
    try:
        bits = _to_bits(raw, dtype, number)
    except _OutOfRange:
        raise EncodeError(_encode_message("value", number, dtype, raw)) from None

    return _to_words(bits, _WIDTH[dtype], order)


def decode(
    registers: Sequence[int] | npt.NDArray[np.uint16],
    dtype: str,
    order: str = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
) -> float:
    """The value ``(raw - offset) / scale`` held by ``registers``."""
    _check_dtype(dtype)
    _check_order(order)
    factor, shift = _check_transform(scale, offset)
    count = _WIDTH[dtype]

    if not isinstance(registers, (Sequence, np.ndarray)):
        raise TypeError(
            f"registers must be a sequence of integers, got {type(registers).__name__}"
        )
    if len(registers) != count:
        raise ValueError(
            f"decoding {dtype} needs {count} registers, got {len(registers)}"
        )
    words = [_register(registers[i], i) for i in range(count)]

    raw = _from_bits(_from_words(words, order), dtype)
    return (raw - shift) / factor


def encode_array(
    values: npt.NDArray[np.float64],
    dtype: str,
    order: str = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
    out: npt.NDArray[np.uint16] | None = None,
) -> npt.NDArray[np.uint16]:
    """Registers of every value, ``width(dtype)`` per value, in input order.

    Every value is checked before any register is written: one value that
    does not fit raises ``EncodeError`` naming its index, and ``out`` is
    left as it was.
    """
    _check_dtype(dtype)
    _check_order(order)
    factor, shift = _check_transform(scale, offset)
    source = _input_array(values, np.float64, "values")
    count = _WIDTH[dtype]
    n = source.shape[0]

    if out is None:
        result = np.zeros(n * count, dtype=np.uint16)
    else:
        result = _output_array(out, np.uint16, "out")
        if result.shape[0] != n * count:
            raise ValueError(
                f"out must have {n * count} elements ({n} values of {dtype}, "
                f"{count} registers each), got {result.shape[0]}"
            )

    encoded: list[tuple[int, ...]] = []
    for i in range(n):
        number = float(source[i])
        raw = _scaled(number, factor, shift)
        try:
            bits = _to_bits(raw, dtype, number)
        except _OutOfRange:
            message = _encode_message(f"values[{i}]", number, dtype, raw)
            raise EncodeError(message) from None
        encoded.append(_to_words(bits, count, order))

    for i, words in enumerate(encoded):
        for j, word in enumerate(words):
            result[i * count + j] = word
    return result


def decode_array(
    registers: npt.NDArray[np.uint16],
    dtype: str,
    order: str = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
) -> npt.NDArray[np.float64]:
    """Values held by consecutive groups of ``width(dtype)`` registers."""
    _check_dtype(dtype)
    _check_order(order)
    factor, shift = _check_transform(scale, offset)
    source = _input_array(registers, np.uint16, "registers")
    count = _WIDTH[dtype]

    total = source.shape[0]
    if total % count != 0:
        raise ValueError(
            f"registers must hold a whole number of {dtype} values "
            f"({count} registers each), got {total} registers"
        )

    result = np.zeros(total // count, dtype=np.float64)
    for i in range(total // count):
        words = [int(source[i * count + j]) for j in range(count)]
        raw = _from_bits(_from_words(words, order), dtype)
        result[i] = (raw - shift) / factor
    return result


def register_map(n_pumps: int, float_order: str = "ABCD") -> list[RegisterRow]:
    """Every holding register and coil of a station image, in address order.

    Holding registers come first, then the coils (type ``"coil"``). The
    image marks exactly the rows with access ``"read/write"`` writable.
    """
    pumps = _pump_count(n_pumps)
    _check_order(float_order)
    applied_type = f"float32 {float_order}"
    rows = [
        RegisterRow(
            HEARTBEAT,
            1,
            "heartbeat",
            "uint16",
            "read",
            "adapter heartbeat, +1 each second, wraps at 65535",
        ),
        RegisterRow(
            STATION_STATUS,
            1,
            "station_status",
            "bits",
            "read",
            "bit 0 any emergency stop, bit 1 failsafe, bit 2 plan stale, "
            "bit 3 storage degraded",
        ),
        RegisterRow(PUMP_COUNT, 1, "pump_count", "uint16", "read", "number of pumps"),
        RegisterRow(
            PLC_HEARTBEAT,
            1,
            "plc_heartbeat",
            "uint16",
            "read/write",
            "PLC heartbeat, incremented by the PLC",
        ),
        RegisterRow(
            PLC_HEARTBEAT_AGE,
            1,
            "plc_heartbeat_age",
            "uint16",
            "read",
            "seconds since the PLC heartbeat last changed, saturates at 65535",
        ),
        RegisterRow(
            STATION_LEVEL,
            1,
            "station_level",
            "int16",
            "read/write",
            "station level feedback, cm, written by the PLC",
        ),
        RegisterRow(
            LAYOUT_VERSION,
            1,
            "layout_version",
            "uint16",
            "read",
            f"register layout version ({IMAGE_LAYOUT})",
        ),
    ]

    for k in range(pumps):
        base = PUMP_BASE + PUMP_STRIDE * k
        name = f"pump{k}"
        rows += [
            RegisterRow(
                base + PUMP_APPLIED_X10,
                1,
                f"{name}.applied_x10",
                "uint16 x10",
                "read",
                "applied setpoint x 10 (engineering units, Hz by default)",
            ),
            RegisterRow(
                base + PUMP_APPLIED_FLOAT,
                2,
                f"{name}.applied",
                applied_type,
                "read",
                "applied setpoint (engineering units, Hz by default)",
            ),
            RegisterRow(
                base + PUMP_STATUS,
                1,
                f"{name}.status",
                "bits",
                "read",
                "bit 0 emergency stop, bit 1 failsafe, bit 2 clamped, "
                "bit 3 ramping, bit 4 last request rejected",
            ),
            RegisterRow(
                base + PUMP_TARGET_X10,
                1,
                f"{name}.target_x10",
                "uint16 x10",
                "read",
                "target x 10 (engineering units)",
            ),
            RegisterRow(
                base + PUMP_MIN_X10,
                1,
                f"{name}.min_x10",
                "uint16 x10",
                "read",
                "minimum value x 10 (engineering units)",
            ),
            RegisterRow(
                base + PUMP_MAX_X10,
                1,
                f"{name}.max_x10",
                "uint16 x10",
                "read",
                "maximum value x 10 (engineering units)",
            ),
            RegisterRow(
                base + PUMP_MAX_RATE_X10,
                1,
                f"{name}.max_rate_x10",
                "uint16 x10",
                "read",
                "maximum rate x 10 (units per second), 65535 when unlimited",
            ),
            RegisterRow(
                base + PUMP_SETPOINT_AGE,
                1,
                f"{name}.setpoint_age",
                "uint16",
                "read",
                "seconds since the last setpoint, saturates at 65535",
            ),
            RegisterRow(
                base + PUMP_OUTCOME,
                1,
                f"{name}.outcome",
                "uint16",
                "read",
                "last outcome: 0 accepted, 1 clamped, 2 rejected, 3 blocked",
            ),
        ]

    for k in range(pumps):
        base = FEEDBACK_BASE + FEEDBACK_STRIDE * k
        name = f"pump{k}"
        rows += [
            RegisterRow(
                base + FEEDBACK_SPEED_X10,
                1,
                f"{name}.speed_x10",
                "uint16 x10",
                "read/write",
                "actual speed x 10 (engineering units), written by the PLC",
            ),
            RegisterRow(
                base + FEEDBACK_RUNNING,
                1,
                f"{name}.running",
                "uint16",
                "read/write",
                "running: 0 or 1, written by the PLC",
            ),
            RegisterRow(
                base + FEEDBACK_POWER_X10,
                1,
                f"{name}.power_x10",
                "uint16 x10",
                "read/write",
                "power x 10 (kW), written by the PLC",
            ),
        ]

    rows += [
        RegisterRow(
            COIL_SYSTEM_ESTOP,
            1,
            "system_emergency_stop",
            "coil",
            "read",
            "system emergency stop active",
        ),
        RegisterRow(
            COIL_STATION_ESTOP,
            1,
            "station_emergency_stop",
            "coil",
            "read",
            "station emergency stop active",
        ),
    ]
    rows += [
        RegisterRow(
            COIL_PUMP_BASE + k,
            1,
            f"pump{k}.emergency_stop",
            "coil",
            "read",
            "pump covered by an emergency stop at any level",
        )
        for k in range(pumps)
    ]
    return rows


class StationImage:
    """The holding registers and coils that one Modbus unit id serves.

    The four arrays are allocated once, at construction, and never
    replaced: a Modbus frame handler may keep pointers to them. Register
    addresses are zero-based; the layout is :func:`register_map`.
    """

    def __init__(
        self,
        n_pumps: int,
        *,
        float_order: str = "ABCD",
        size: int | None = None,
        n_coils: int = 64,
    ) -> None:
        pumps = _pump_count(n_pumps)
        _check_order(float_order)
        needed = FEEDBACK_BASE + FEEDBACK_STRIDE * pumps
        registers = needed if size is None else max(_count(size, "size"), needed)
        if registers > MAX_REGISTERS:
            raise ValueError(
                f"size must be at most {MAX_REGISTERS} registers, got {registers}"
            )
        coils = max(_count(n_coils, "n_coils"), COIL_PUMP_BASE + pumps)
        if coils > MAX_COILS:
            raise ValueError(f"n_coils must be at most {MAX_COILS}, got {coils}")

        self._n_pumps = pumps
        self._float_order = float_order
        self._registers: npt.NDArray[np.uint16] = _fixed_array(registers, np.uint16)
        self._writable: npt.NDArray[np.uint8] = _fixed_array(registers, np.uint8)
        self._coils: npt.NDArray[np.uint8] = _fixed_array(coils, np.uint8)
        self._coil_writable: npt.NDArray[np.uint8] = _fixed_array(coils, np.uint8)

        for row in register_map(pumps, float_order):
            if row.type != "coil" and row.access == "read/write":
                self._writable[row.address : row.address + row.quantity] = 1
        self._registers[PUMP_COUNT] = pumps
        self._registers[LAYOUT_VERSION] = IMAGE_LAYOUT

    @property
    def n_pumps(self) -> int:
        """Pumps of the station, 0 to MAX_PUMPS."""
        return self._n_pumps

    @property
    def float_order(self) -> str:
        """Word order of the applied setpoint's float32 registers."""
        return self._float_order

    @property
    def registers(self) -> npt.NDArray[np.uint16]:
        """Holding registers, one uint16 per address (the same array always)."""
        return self._registers

    @property
    def writable(self) -> npt.NDArray[np.uint8]:
        """1 where a Modbus client may write the register, else 0."""
        return self._writable

    @property
    def coils(self) -> npt.NDArray[np.uint8]:
        """Coils, 0 or 1 (the same array always)."""
        return self._coils

    @property
    def coil_writable(self) -> npt.NDArray[np.uint8]:
        """1 where a Modbus client may write the coil, else 0."""
        return self._coil_writable

    def set_heartbeat(self, value: int) -> None:
        """Set the adapter heartbeat register to ``value`` modulo 65536."""
        self._registers[HEARTBEAT] = _integer(value, "heartbeat") % 65536

    def set_station_status(self, bits: int) -> None:
        """Set the station status bits (STATION_* masks)."""
        number = _integer(bits, "station status")
        if not 0 <= number <= 65535:
            raise ValueError(f"station status must be in [0, 65535], got {number}")
        self._registers[STATION_STATUS] = number

    def set_plc_heartbeat_age(self, seconds: float) -> None:
        """Set the seconds since the PLC heartbeat changed (saturating)."""
        age = _real(seconds, "seconds")
        self._registers[PLC_HEARTBEAT_AGE] = _saturated_seconds(age)

    def update_pumps(
        self,
        applied: npt.NDArray[np.float64],
        status: npt.NDArray[np.uint16],
        first: int = 0,
    ) -> None:
        """Write the applied setpoint and status of pumps ``first`` onward.

        ``applied`` is in engineering units (Hz by default); each pump gets
        its value x 10 as uint16, the value as float32 and its status bits.
        A value whose x 10 does not fit uint16 raises ``EncodeError`` naming
        the pump, and nothing is written.
        """
        values = _input_array(applied, np.float64, "applied")
        bits = _input_array(status, np.uint16, "status")
        _same_length(bits, "status", values, "applied")
        start = self._pump_range(first, values.shape[0])

        tenths = [
            self._tenths(float(values[i]), start + i, "applied")
            for i in range(values.shape[0])
        ]
        for i, tenth in enumerate(tenths):
            pump = start + i
            base = PUMP_BASE + PUMP_STRIDE * pump
            words = encode(float(values[i]), "float32", self._float_order)
            self._registers[base + PUMP_APPLIED_X10] = tenth
            self._registers[base + PUMP_APPLIED_FLOAT] = words[0]
            self._registers[base + PUMP_APPLIED_FLOAT + 1] = words[1]
            self._registers[base + PUMP_STATUS] = int(bits[i])

    def update_details(
        self,
        target: npt.NDArray[np.float64],
        age: npt.NDArray[np.float64],
        outcome: npt.NDArray[np.uint8],
        first: int = 0,
    ) -> None:
        """Write target x 10, setpoint age (seconds) and last outcome codes.

        Ages saturate at 65535 and count whole seconds; a negative age is 0
        and NaN is 65535. A target that does not fit raises ``EncodeError``
        and nothing is written.
        """
        targets = _input_array(target, np.float64, "target")
        ages = _input_array(age, np.float64, "age")
        outcomes = _input_array(outcome, np.uint8, "outcome")
        _same_length(ages, "age", targets, "target")
        _same_length(outcomes, "outcome", targets, "target")
        start = self._pump_range(first, targets.shape[0])

        tenths = [
            self._tenths(float(targets[i]), start + i, "target")
            for i in range(targets.shape[0])
        ]
        for i, tenth in enumerate(tenths):
            base = PUMP_BASE + PUMP_STRIDE * (start + i)
            self._registers[base + PUMP_TARGET_X10] = tenth
            self._registers[base + PUMP_SETPOINT_AGE] = _saturated_seconds(
                float(ages[i])
            )
            self._registers[base + PUMP_OUTCOME] = int(outcomes[i])

    def set_limits(
        self,
        min_values: npt.NDArray[np.float64],
        max_values: npt.NDArray[np.float64],
        max_rates: npt.NDArray[np.float64],
        first: int = 0,
    ) -> None:
        """Write each pump's min and max value x 10 and max rate x 10.

        A max rate of infinity, or one whose x 10 reaches 65535 (6553.5
        units per second or more), is written as 65535, "unlimited". Any
        value that does not fit raises ``EncodeError``; nothing is written.
        """
        lows = _input_array(min_values, np.float64, "min_values")
        highs = _input_array(max_values, np.float64, "max_values")
        rates = _input_array(max_rates, np.float64, "max_rates")
        _same_length(highs, "max_values", lows, "min_values")
        _same_length(rates, "max_rates", lows, "min_values")
        start = self._pump_range(first, lows.shape[0])

        rows = []
        for i in range(lows.shape[0]):
            pump = start + i
            low = self._tenths(float(lows[i]), pump, "min_value")
            high = self._tenths(float(highs[i]), pump, "max_value")
            rate = float(rates[i])
            if rate * 10.0 >= SATURATED - 0.5:
                rows.append((low, high, UNLIMITED_RATE))
            else:
                rows.append((low, high, self._tenths(rate, pump, "max_rate")))

        for i, (low, high, rate_tenths) in enumerate(rows):
            base = PUMP_BASE + PUMP_STRIDE * (start + i)
            self._registers[base + PUMP_MIN_X10] = low
            self._registers[base + PUMP_MAX_X10] = high
            self._registers[base + PUMP_MAX_RATE_X10] = rate_tenths

    def set_emergency_stops(
        self,
        system: bool,
        station: bool,
        pumps: Sequence[bool] | npt.NDArray[Any],
    ) -> None:
        """Set the emergency stop coils.

        ``pumps[k]`` is pump k's own stop; its coil shows 1 when any level
        (system, station or its own) covers it.
        """
        flags = [bool(flag) for flag in pumps]
        if len(flags) != self._n_pumps:
            raise ValueError(
                f"pumps must have {self._n_pumps} flags, one per pump, got {len(flags)}"
            )
        system_stop = bool(system)
        station_stop = bool(station)

        self._coils[COIL_SYSTEM_ESTOP] = system_stop
        self._coils[COIL_STATION_ESTOP] = station_stop
        for k, flag in enumerate(flags):
            covered = system_stop or station_stop or flag
            self._coils[COIL_PUMP_BASE + k] = 1 if covered else 0

    def write(
        self,
        address: int,
        value: float,
        dtype: str = "uint16",
        order: str = "ABCD",
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        """Encode one value into the registers from ``address`` on."""
        _check_dtype(dtype)
        start = self._register_range(address, _WIDTH[dtype])
        words = encode(value, dtype, order, scale, offset)
        self._registers[start : start + len(words)] = words

    def read(
        self,
        address: int,
        dtype: str = "uint16",
        order: str = "ABCD",
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> float:
        """Decode one value from the registers from ``address`` on."""
        _check_dtype(dtype)
        count = _WIDTH[dtype]
        start = self._register_range(address, count)
        words = [int(word) for word in self._registers[start : start + count]]
        return decode(words, dtype, order, scale, offset)

    def set_writable(self, address: int, count: int, writable: bool = True) -> None:
        """Allow (or refuse) client writes to ``count`` registers."""
        number = _count(count, "count")
        start = self._register_range(address, number)
        self._writable[start : start + number] = 1 if writable else 0

    def check_write(self, address: int, values: npt.NDArray[np.uint16]) -> int:
        """0 when a client may write ``values`` from ``address`` on.

        Otherwise the Modbus exception code: 2 (illegal data address) when a
        register is outside the image or read-only, 3 (illegal data value)
        when a value is outside its register's range (running is 0 or 1).
        """
        words = _input_array(values, np.uint16, "values")
        start = _integer(address, "address")
        end = start + words.shape[0]
        if start < 0 or end > self._registers.shape[0]:
            return ILLEGAL_DATA_ADDRESS
        if not all(self._writable[start:end]):
            return ILLEGAL_DATA_ADDRESS

        for i in range(words.shape[0]):
            register = start + i
            if register < FEEDBACK_BASE:
                continue
            pump, field = divmod(register - FEEDBACK_BASE, FEEDBACK_STRIDE)
            if pump < self._n_pumps and field == FEEDBACK_RUNNING and words[i] > 1:
                return ILLEGAL_DATA_VALUE
        return 0

    def _pump_range(self, first: int, count: int) -> int:
        start = _integer(first, "first")
        if start < 0 or start + count > self._n_pumps:
            raise IndexError(
                f"pumps {start}..{start + count - 1} are outside the image "
                f"of {self._n_pumps} pumps"
            )
        return start

    def _register_range(self, address: int, count: int) -> int:
        start = _integer(address, "address")
        size = self._registers.shape[0]
        if start < 0 or start + count > size:
            raise IndexError(_address_message(start, count, size))
        return start

    def _tenths(self, value: float, pump: int, field: str) -> int:
        raw = value * 10.0
        try:
            return _to_bits(raw, "uint16")
        except _OutOfRange:
            message = _encode_message(f"pump {pump} {field}", value, "uint16", raw)
            raise EncodeError(message) from None


class ImageSet:
    """Several station images updated together, pumps in image order.

    Pump ``i`` of the set is pump ``i - s`` of the image whose pumps start at
    ``s``: the images' pumps concatenated, as a gate over all stations
    numbers them when stations are given in the same order.
    """

    def __init__(self, images: Sequence[StationImage]) -> None:
        chosen = tuple(images)
        seen: set[int] = set()
        for index, image in enumerate(chosen):
            if not isinstance(image, StationImage):
                raise TypeError(
                    f"images[{index}] must be a StationImage, "
                    f"got {type(image).__name__}"
                )
            if id(image) in seen:
                raise ValueError(f"images[{index}] appears more than once")
            seen.add(id(image))

        self._images = chosen
        self._starts = []
        total = 0
        for image in chosen:
            self._starts.append(total)
            total += image.n_pumps
        self._n_pumps = total

    @property
    def images(self) -> tuple[StationImage, ...]:
        """The images, in pump order."""
        return self._images

    @property
    def n_pumps(self) -> int:
        """Pumps over all images."""
        return self._n_pumps

    def update_pumps(
        self,
        applied: npt.NDArray[np.float64],
        status: npt.NDArray[np.uint16],
    ) -> None:
        """Like StationImage.update_pumps for every pump of every image.

        One value that does not fit raises ``EncodeError`` naming the pump
        (its index in the set, its image and its index there) and no image
        is changed.
        """
        values = _input_array(applied, np.float64, "applied")
        bits = _input_array(status, np.uint16, "status")
        _same_length(bits, "status", values, "applied")
        self._check_length(values)

        for pump in range(self._n_pumps):
            value = float(values[pump])
            raw = value * 10.0
            try:
                _to_bits(raw, "uint16")
            except _OutOfRange:
                what = self._pump_name(pump) + " applied"
                message = _encode_message(what, value, "uint16", raw)
                raise EncodeError(message) from None

        for image, start in zip(self._images, self._starts, strict=True):
            end = start + image.n_pumps
            image.update_pumps(values[start:end], bits[start:end])

    def update_details(
        self,
        target: npt.NDArray[np.float64],
        age: npt.NDArray[np.float64],
        outcome: npt.NDArray[np.uint8],
    ) -> None:
        """Like StationImage.update_details for every pump of every image."""
        targets = _input_array(target, np.float64, "target")
        ages = _input_array(age, np.float64, "age")
        outcomes = _input_array(outcome, np.uint8, "outcome")
        _same_length(ages, "age", targets, "target")
        _same_length(outcomes, "outcome", targets, "target")
        self._check_length(targets)

        for pump in range(self._n_pumps):
            value = float(targets[pump])
            raw = value * 10.0
            try:
                _to_bits(raw, "uint16")
            except _OutOfRange:
                what = self._pump_name(pump) + " target"
                message = _encode_message(what, value, "uint16", raw)
                raise EncodeError(message) from None

        for image, start in zip(self._images, self._starts, strict=True):
            end = start + image.n_pumps
            image.update_details(
                targets[start:end], ages[start:end], outcomes[start:end]
            )

    def _check_length(self, values: npt.NDArray[Any]) -> None:
        if values.shape[0] != self._n_pumps:
            raise ValueError(
                f"expected {self._n_pumps} values, one per pump, got {values.shape[0]}"
            )

    def _pump_name(self, pump: int) -> str:
        index = 0
        while index + 1 < len(self._starts) and self._starts[index + 1] <= pump:
            index += 1
        return f"pump {pump} (image {index} pump {pump - self._starts[index]})"


def _fixed_array(n: int, dtype: type[np.generic]) -> Any:
    # A view does not own its memory, so NumPy refuses to resize it; its
    # owner is reachable only through the view's base.
    return np.zeros(n, dtype=dtype)[:]


def _check_dtype(dtype: object) -> str:
    if not isinstance(dtype, str) or dtype not in _WIDTH:
        raise ValueError(f"dtype must be one of {', '.join(DATA_TYPES)}, got {dtype!r}")
    return dtype


def _check_order(order: object) -> str:
    if not isinstance(order, str) or order not in WORD_ORDERS:
        raise ValueError(
            f"order must be one of {', '.join(WORD_ORDERS)}, got {order!r}"
        )
    return order


def _check_transform(scale: object, offset: object) -> tuple[float, float]:
    factor = _real(scale, "scale")
    shift = _real(offset, "offset")
    if factor == 0.0 or not math.isfinite(factor):
        raise ValueError(f"scale must be finite and non-zero, got {factor!r}")
    if not math.isfinite(shift):
        raise ValueError(f"offset must be finite, got {shift!r}")
    return factor, shift


def _real(value: object, name: str) -> float:
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _integer(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__}"
        ) from None


def _count(value: object, name: str) -> int:
    number = _integer(value, name)
    if number < 0:
        raise ValueError(f"{name} must be at least 0, got {number}")
    return number


def _pump_count(value: object) -> int:
    number = _integer(value, "n_pumps")
    if not 0 <= number <= MAX_PUMPS:
        raise ValueError(f"n_pumps must be in [0, {MAX_PUMPS}], got {number}")
    return number


def _register(value: object, index: int) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"registers[{index}] must be an integer, got {type(value).__name__}"
        ) from None
    if not 0 <= number <= 65535:
        raise ValueError(f"registers[{index}] must be in [0, 65535], got {number}")
    return number


def _input_array(value: object, dtype: type[np.generic], name: str) -> Any:
    expected = np.dtype(dtype)
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of {expected}, got {type(value).__name__}"
        )
    if value.dtype != expected:
        raise TypeError(
            f"{name} must be a numpy.ndarray of {expected}, got {value.dtype}"
        )
    if value.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got {value.ndim} dimensions")
    if not (value.flags.c_contiguous and value.flags.aligned):
        raise ValueError(f"{name} must be contiguous and aligned")
    return value


def _output_array(value: object, dtype: type[np.generic], name: str) -> Any:
    array = _input_array(value, dtype, name)
    if not array.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return array


def _same_length(
    other: npt.NDArray[Any], other_name: str, first: npt.NDArray[Any], name: str
) -> None:
    if other.shape[0] != first.shape[0]:
        raise ValueError(
            f"{other_name} must have as many elements as {name} "
            f"({first.shape[0]}), got {other.shape[0]}"
        )


def _scaled(value: float, scale: float, offset: float) -> float:
    # A zero offset is not added, so -0.0 stays -0.0.
    if offset == 0.0:
        return value * scale
    return value * scale + offset


def _round_half_away(raw: float) -> int:
    whole = math.trunc(raw)
    fraction = raw - whole
    if fraction >= 0.5:
        return whole + 1
    if fraction <= -0.5:
        return whole - 1
    return whole


def _to_bits(raw: float, dtype: str, value: float = 0.0) -> int:
    """The bits of ``raw`` as ``dtype``, for ``value`` scaled to ``raw``.

    Float types pass NaN and infinity through, but not a finite value that
    scaling made infinite.
    """
    low, high = _RANGE[dtype]
    if dtype in ("float32", "float64"):
        if math.isfinite(value) and not math.isfinite(raw):
            raise _OutOfRange
        if math.isfinite(raw) and not low <= raw <= high:
            raise _OutOfRange
        return int.from_bytes(_STRUCT[dtype].pack(raw), "big")

    if not low - 0.5 < raw < high + 0.5:
        raise _OutOfRange
    number = _round_half_away(raw)
    return number & ((1 << (16 * _WIDTH[dtype])) - 1)


def _from_bits(bits: int, dtype: str) -> float:
    size = 2 * _WIDTH[dtype]
    (value,) = _STRUCT[dtype].unpack(bits.to_bytes(size, "big"))
    return float(value)


def _to_words(bits: int, count: int, order: str) -> tuple[int, ...]:
    words = [(bits >> (16 * (count - 1 - i))) & 0xFFFF for i in range(count)]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    if order in ("BADC", "DCBA"):
        words = [((word >> 8) | (word << 8)) & 0xFFFF for word in words]
    return tuple(words)


def _from_words(words: Sequence[int], order: str) -> int:
    if order in ("BADC", "DCBA"):
        words = [((word >> 8) | (word << 8)) & 0xFFFF for word in words]
    if order in ("CDAB", "DCBA"):
        words = list(reversed(words))
    bits = 0
    for word in words:
        bits = (bits << 16) | word
    return bits


def _saturated_seconds(seconds: float) -> int:
    if math.isnan(seconds) or seconds >= SATURATED:
        return SATURATED
    if seconds <= 0.0:
        return 0
    return math.floor(seconds)


def _encode_message(what: str, value: float, dtype: str, raw: float) -> str:
    low, high = _RANGE[dtype]
    return (
        f"cannot encode {what} = {value!r} as {dtype}: "
        f"scaled value {raw!r} is outside [{low!r}, {high!r}]"
    )


def _address_message(start: int, count: int, size: int) -> str:
    if count <= 1:
        return f"address {start} is outside the image of {size} registers"
    return (
        f"registers {start}..{start + count - 1} are outside the image "
        f"of {size} registers"
    )
