"""Register codecs and the station register image."""

from collections.abc import Sequence
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

DataType = Literal["uint16", "int16", "uint32", "int32", "float32", "float64"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

DATA_TYPES: Final[tuple[str, ...]]
WORD_ORDERS: Final[tuple[str, ...]]
FLOAT32_MAX: Final[float]

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

def width(dtype: DataType) -> int: ...
def encode(
    value: float,
    dtype: DataType,
    order: WordOrder = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
) -> tuple[int, ...]: ...
def decode(
    registers: Sequence[int] | npt.NDArray[np.uint16],
    dtype: DataType,
    order: WordOrder = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
) -> float: ...
def encode_array(
    values: npt.NDArray[np.float64],
    dtype: DataType,
    order: WordOrder = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
    out: npt.NDArray[np.uint16] | None = None,
) -> npt.NDArray[np.uint16]: ...
def decode_array(
    registers: npt.NDArray[np.uint16],
    dtype: DataType,
    order: WordOrder = "ABCD",
    scale: float = 1.0,
    offset: float = 0.0,
) -> npt.NDArray[np.float64]: ...
def register_map(
    n_pumps: int, float_order: WordOrder = "ABCD"
) -> list[RegisterRow]: ...

HEARTBEAT: Final[int]  # 0
STATION_STATUS: Final[int]  # 1
PUMP_COUNT: Final[int]  # 2
PLC_HEARTBEAT: Final[int]  # 3
PLC_HEARTBEAT_AGE: Final[int]  # 4
STATION_LEVEL: Final[int]  # 5
LAYOUT_VERSION: Final[int]  # 6, the address
IMAGE_LAYOUT: Final[int]  # 1, the value at LAYOUT_VERSION

PUMP_BASE: Final[int]  # 100
PUMP_STRIDE: Final[int]  # 10
PUMP_APPLIED_X10: Final[int]  # +0
PUMP_APPLIED_FLOAT: Final[int]  # +1 and +2
PUMP_STATUS: Final[int]  # +3
PUMP_TARGET_X10: Final[int]  # +4
PUMP_MIN_X10: Final[int]  # +5
PUMP_MAX_X10: Final[int]  # +6
PUMP_MAX_RATE_X10: Final[int]  # +7
PUMP_SETPOINT_AGE: Final[int]  # +8
PUMP_OUTCOME: Final[int]  # +9

FEEDBACK_BASE: Final[int]  # 1000
FEEDBACK_STRIDE: Final[int]  # 10
FEEDBACK_SPEED_X10: Final[int]  # +0
FEEDBACK_RUNNING: Final[int]  # +1
FEEDBACK_POWER_X10: Final[int]  # +2

MAX_PUMPS: Final[int]  # 90: pump blocks end where the feedback blocks start
MAX_REGISTERS: Final[int]  # 65536
MAX_COILS: Final[int]  # 65536
SATURATED: Final[int]  # 65535
UNLIMITED_RATE: Final[int]  # 65535

COIL_SYSTEM_ESTOP: Final[int]  # 0
COIL_STATION_ESTOP: Final[int]  # 1
COIL_PUMP_BASE: Final[int]  # 100

STATION_ESTOP: Final[int]  # bit 0
STATION_FAILSAFE: Final[int]  # bit 1
STATION_PLAN_STALE: Final[int]  # bit 2
STATION_STORAGE_DEGRADED: Final[int]  # bit 3

ILLEGAL_DATA_ADDRESS: Final[int]  # 2
ILLEGAL_DATA_VALUE: Final[int]  # 3

class StationImage:
    """The holding registers and coils that one Modbus unit id serves."""

    def __init__(
        self,
        n_pumps: int,
        *,
        float_order: WordOrder = "ABCD",
        size: int | None = None,
        n_coils: int = 64,
    ) -> None: ...
    @property
    def n_pumps(self) -> int: ...
    @property
    def float_order(self) -> WordOrder: ...
    @property
    def registers(self) -> npt.NDArray[np.uint16]: ...
    @property
    def writable(self) -> npt.NDArray[np.uint8]: ...
    @property
    def coils(self) -> npt.NDArray[np.uint8]: ...
    @property
    def coil_writable(self) -> npt.NDArray[np.uint8]: ...
    def set_heartbeat(self, value: int) -> None: ...
    def set_station_status(self, bits: int) -> None: ...
    def set_plc_heartbeat_age(self, seconds: float) -> None: ...
    def update_pumps(
        self,
        applied: npt.NDArray[np.float64],
        status: npt.NDArray[np.uint16],
        first: int = 0,
    ) -> None: ...
    def update_details(
        self,
        target: npt.NDArray[np.float64],
        age: npt.NDArray[np.float64],
        outcome: npt.NDArray[np.uint8],
        first: int = 0,
    ) -> None: ...
    def set_limits(
        self,
        min_values: npt.NDArray[np.float64],
        max_values: npt.NDArray[np.float64],
        max_rates: npt.NDArray[np.float64],
        first: int = 0,
    ) -> None: ...
    def set_emergency_stops(
        self,
        system: bool,
        station: bool,
        pumps: Sequence[bool] | npt.NDArray[Any],
    ) -> None: ...
    def write(
        self,
        address: int,
        value: float,
        dtype: DataType = "uint16",
        order: WordOrder = "ABCD",
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None: ...
    def read(
        self,
        address: int,
        dtype: DataType = "uint16",
        order: WordOrder = "ABCD",
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> float: ...
    def set_writable(self, address: int, count: int, writable: bool = True) -> None: ...
    def check_write(self, address: int, values: npt.NDArray[np.uint16]) -> int: ...

class ImageSet:
    """Several station images updated together, pumps in image order."""

    def __init__(self, images: Sequence[StationImage]) -> None: ...
    @property
    def images(self) -> tuple[StationImage, ...]: ...
    @property
    def n_pumps(self) -> int: ...
    def update_pumps(
        self,
        applied: npt.NDArray[np.float64],
        status: npt.NDArray[np.uint16],
    ) -> None: ...
    def update_details(
        self,
        target: npt.NDArray[np.float64],
        age: npt.NDArray[np.float64],
        outcome: npt.NDArray[np.uint8],
    ) -> None: ...
