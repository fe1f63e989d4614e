"""Modbus TCP frames: bytes in, answers out, straight from register images."""

from collections.abc import Callable, Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

from calejo_core.codecs import StationImage

ILLEGAL_FUNCTION: Final[int]  # 0x01
ILLEGAL_DATA_ADDRESS: Final[int]  # 0x02
ILLEGAL_DATA_VALUE: Final[int]  # 0x03
SERVER_DEVICE_FAILURE: Final[int]  # 0x04
GATEWAY_TARGET_FAILED: Final[int]  # 0x0B

KIND_REGISTERS: Final[int]  # 0
KIND_COILS: Final[int]  # 1

# on_write(unit, kind, address, values) -> 0 to store the values, or an
# exception code to refuse them (nothing is stored).
WriteCallback = Callable[[int, int, int, npt.NDArray[np.uint16]], int]

class ModbusServerCore:
    """The unit ids a server answers for, shared by all its connections."""

    def __init__(
        self,
        units: Mapping[int, StationImage],
        on_write: WriteCallback | None = None,
    ) -> None: ...
    def set_unit(self, unit: int, image: StationImage) -> None: ...
    def remove_unit(self, unit: int) -> None: ...
    @property
    def units(self) -> dict[int, StationImage]: ...
    @property
    def frames(self) -> int: ...
    @property
    def exceptions(self) -> int: ...

class ModbusConnection:
    """The framing state of one TCP connection."""

    def __init__(self, core: ModbusServerCore) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> bytes: ...
    @property
    def broken(self) -> bool: ...
    @property
    def buffered(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...
