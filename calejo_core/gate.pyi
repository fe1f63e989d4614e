"""The safety gate: limits, ramps, emergency stops, failsafe, anti-cycling."""

from collections.abc import Sequence
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

DEBUG_BUILD: Final[bool]

ACCEPTED: Final[int]  # 0
CLAMPED: Final[int]  # 1
REJECTED: Final[int]  # 2
BLOCKED: Final[int]  # 3

STATUS_EMERGENCY_STOP: Final[int]  # bit 0
STATUS_FAILSAFE: Final[int]  # bit 1
STATUS_CLAMPED: Final[int]  # bit 2
STATUS_RAMPING: Final[int]  # bit 3
STATUS_REJECTED: Final[int]  # bit 4

class Outcome(IntEnum):
    ACCEPTED = 0
    CLAMPED = 1
    REJECTED = 2
    BLOCKED = 3

class PumpLimits:
    """Limits of one pump, in engineering units (Hz unless configured).

    Immutable: the fields are read-only.
    """

    @property
    def pump_id(self) -> str: ...
    @property
    def min_value(self) -> float: ...
    @property
    def max_value(self) -> float: ...
    @property
    def max_rate(self) -> float: ...
    @property
    def failsafe_value(self) -> float: ...
    @property
    def stop_value(self) -> float: ...
    @property
    def allow_stop(self) -> bool: ...
    @property
    def min_switch_interval(self) -> float: ...
    def __init__(
        self,
        min_value: float,
        max_value: float,
        max_rate: float,
        failsafe_value: float,
        stop_value: float = 0.0,
        allow_stop: bool = True,
        min_switch_interval: float = 0.0,
        *,
        pump_id: str = "",
    ) -> None: ...

class Gate:
    """The gate over a fixed set of pumps grouped in stations."""

    def __init__(
        self,
        limits: Sequence[PumpLimits],
        stations: Sequence[int] | npt.NDArray[np.intp] | None = None,
        now: float = 0.0,
        *,
        n_stations: int | None = None,
    ) -> None: ...
    @property
    def n_pumps(self) -> int: ...
    @property
    def n_stations(self) -> int: ...
    @property
    def target(self) -> npt.NDArray[np.float64]: ...
    @property
    def applied(self) -> npt.NDArray[np.float64]: ...
    @property
    def status(self) -> npt.NDArray[np.uint16]: ...
    @property
    def last_outcome(self) -> npt.NDArray[np.uint8]: ...
    @property
    def stations(self) -> npt.NDArray[np.intp]: ...
    @property
    def last_tick(self) -> float: ...
    def limits(self, pump: int) -> PumpLimits: ...
    def request(self, pump: int, value: object, now: float) -> int: ...
    def request_many(
        self,
        pumps: npt.NDArray[np.intp],
        values: npt.NDArray[np.float64],
        now: float,
        out: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint8]: ...
    def request_all(
        self,
        values: npt.NDArray[np.float64],
        now: float,
        out: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint8]: ...
    def tick(self, now: float) -> int: ...
    def set_system_stop(self, active: bool, now: float) -> None: ...
    def set_station_stop(self, station: int, active: bool, now: float) -> None: ...
    def set_pump_stop(self, pump: int, active: bool, now: float) -> None: ...
    def set_failsafe(self, station: int, active: bool, now: float) -> None: ...
    def is_stopped(self, pump: int) -> bool: ...
    def in_failsafe(self, station: int) -> bool: ...
    def restore(self, pump: int, target: float, applied: float) -> None: ...
