"""The safety gate in plain Python: the reference the compiled gate is held to.

Same public API and the same rules as :mod:`calejo_core.gate`, written for
clarity rather than speed. Values are in engineering units (Hz unless
configured), rates in units per second, times in seconds on any monotonic
origin chosen by the caller.

Rules, per pump:

* A request is *rejected* when the pump index is unknown or the value is not
  a finite real number; the target is left as it was.
* A request of exactly ``stop_value`` with ``allow_stop`` is a stop and is
  *accepted*; any other value outside ``[min_value, max_value]`` is
  *clamped* to the nearest limit; otherwise it is *accepted*.
* While an emergency stop (system, the pump's station or the pump) covers
  the pump, a valid request is *blocked*: its target is recorded, the
  applied value stays at ``stop_value``.
* The goal of a pump is ``stop_value`` under an emergency stop, else
  ``failsafe_value`` while its station is in failsafe, else its target.
* :meth:`Gate.tick` moves the applied value toward the goal at no more than
  ``max_rate``; a start from a ``stop_value`` outside the limits steps to the
  nearest limit (and ramps from there on later ticks), a stop ramps to that
  limit and then steps to ``stop_value``; with an unlimited ``max_rate``
  the goal is reached at the next tick, a start included. A pump that
  stopped does not start again before ``min_switch_interval`` seconds have
  passed.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final, TypeVar, cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "ACCEPTED",
    "BLOCKED",
    "CLAMPED",
    "DEBUG_BUILD",
    "REJECTED",
    "STATUS_CLAMPED",
    "STATUS_EMERGENCY_STOP",
    "STATUS_FAILSAFE",
    "STATUS_RAMPING",
    "STATUS_REJECTED",
    "Gate",
    "Outcome",
    "PumpLimits",
]

DEBUG_BUILD: Final[bool] = False

ACCEPTED: Final[int] = 0
CLAMPED: Final[int] = 1
REJECTED: Final[int] = 2
BLOCKED: Final[int] = 3

STATUS_EMERGENCY_STOP: Final[int] = 1
STATUS_FAILSAFE: Final[int] = 2
STATUS_CLAMPED: Final[int] = 4
STATUS_RAMPING: Final[int] = 8
STATUS_REJECTED: Final[int] = 16


class Outcome(IntEnum):
    """The outcome of one setpoint request."""

    ACCEPTED = 0
    CLAMPED = 1
    REJECTED = 2
    BLOCKED = 3


def _type_name(value: object) -> str:
    return type(value).__name__


def _is_bool(value: object) -> bool:
    return isinstance(value, bool | np.bool_)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _real_or_none(value: object) -> float | None:
    """Return ``value`` as a float, or None when it is not a real number."""
    if type(value) is float:
        return value

    try:
        if not _is_real(value):
            return None
        return float(value)  # type: ignore[arg-type]
    except Exception:
        return None


def _pump_index_or_none(pump: object, n_pumps: int) -> int | None:
    """Return ``pump`` as an index in range, or None."""
    try:
        if _is_bool(pump):
            return None
        index = operator.index(pump)  # type: ignore[arg-type]
    except Exception:
        return None

    if not 0 <= index < n_pumps:
        return None
    return int(index)


def _checked_index(value: object, count: int, what: str) -> int:
    """Return ``value`` as an index of one of ``count`` pumps or stations."""
    if _is_bool(value):
        raise TypeError(f"expected an integer {what} index, got bool")

    try:
        index = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"expected an integer {what} index, got {_type_name(value)}"
        ) from None

    if not 0 <= index < count:
        raise IndexError(f"{what} {index} out of range: the gate has {count} {what}s")
    return int(index)


def _checked_flag(value: object, name: str) -> bool:
    if not _is_bool(value):
        raise TypeError(f"expected a bool for {name}, got {_type_name(value)}")
    return bool(value)


def _checked_time(value: object, name: str = "now") -> float:
    if not _is_real(value):
        raise TypeError(f"expected a real number for {name}, got {_type_name(value)}")
    return float(value)  # type: ignore[arg-type]


_Array = TypeVar("_Array", bound=npt.NDArray[Any])


def _readonly(array: _Array) -> _Array:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class PumpLimits:
    """Limits of one pump, in engineering units (Hz unless configured).

    ``min_value`` and ``max_value`` bound every operating setpoint;
    ``max_rate`` is the fastest change of the applied value in units per
    second (``math.inf`` for no ramp); ``failsafe_value`` is the setpoint
    while the station is in failsafe and must lie within the limits or be
    the stop value; ``stop_value`` is what a stopped pump is sent (default
    0); ``allow_stop`` lets a request of exactly ``stop_value`` stop the
    pump; ``min_switch_interval`` is the least time in seconds between a
    stop and the next start (anti-cycling). ``pump_id`` names the pump in
    error messages.

    Raises TypeError for a limit that is not a real number and ValueError
    for inconsistent or non-finite limits, naming the pump and the field.
    """

    min_value: float
    max_value: float
    max_rate: float
    failsafe_value: float
    stop_value: float = 0.0
    allow_stop: bool = True
    min_switch_interval: float = 0.0
    pump_id: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.pump_id, str):
            raise TypeError(
                f"expected a str for pump_id, got {_type_name(self.pump_id)}"
            )
        subject = f"pump {self.pump_id!r}" if self.pump_id else "pump limits"

        for name in (
            "min_value",
            "max_value",
            "max_rate",
            "failsafe_value",
            "stop_value",
            "min_switch_interval",
        ):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(
                    f"{subject}: expected a real number for {name}, "
                    f"got {_type_name(value)}"
                )
            object.__setattr__(self, name, float(value))
        if not _is_bool(self.allow_stop):
            raise TypeError(
                f"{subject}: expected a bool for allow_stop, "
                f"got {_type_name(self.allow_stop)}"
            )
        object.__setattr__(self, "allow_stop", bool(self.allow_stop))

        for name in ("min_value", "max_value", "failsafe_value", "stop_value"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{subject}: expected a finite {name}, got {value!r}")
        if self.min_value > self.max_value:
            raise ValueError(
                f"{subject}: expected min_value <= max_value, "
                f"got {self.min_value!r} > {self.max_value!r}"
            )
        if not self.max_rate > 0.0:
            raise ValueError(
                f"{subject}: expected max_rate > 0 (units per second, inf for "
                f"no ramp), got {self.max_rate!r}"
            )
        if not (
            self.min_value <= self.failsafe_value <= self.max_value
            or (self.allow_stop and self.failsafe_value == self.stop_value)
        ):
            raise ValueError(
                f"{subject}: expected failsafe_value within "
                f"[{self.min_value!r}, {self.max_value!r}] or equal to "
                f"stop_value {self.stop_value!r} with allow_stop, "
                f"got {self.failsafe_value!r}"
            )
        interval = self.min_switch_interval
        if not (math.isfinite(interval) and interval >= 0.0):
            raise ValueError(
                f"{subject}: expected a finite min_switch_interval >= 0 "
                f"(seconds), got {interval!r}"
            )

    def validated_target(self, value: float) -> tuple[float, bool]:
        """Return the target for a finite ``value`` and whether it was clamped."""
        if self.allow_stop and value == self.stop_value:
            return self.stop_value, False
        if value < self.min_value:
            return self.min_value, True
        if value > self.max_value:
            return self.max_value, True
        return value, False

    def is_operating_point(self, value: float) -> bool:
        """Whether ``value`` lies within ``[min_value, max_value]``."""
        return self.min_value <= value <= self.max_value


@dataclass
class _Pump:
    """The live state of one pump."""

    limits: PumpLimits
    station: int
    target: float
    applied: float
    status: int = 0
    outcome: int = ACCEPTED
    stop_latched: bool = False
    stopped_at: float = -math.inf


def _toward(value: float, goal: float, step: float) -> float:
    """Move ``value`` toward ``goal`` by at most ``step``."""
    if goal > value:
        return goal if goal - value <= step else value + step
    return goal if value - goal <= step else value - step


class Gate:
    """The gate over a fixed set of pumps grouped in stations.

    ``limits`` holds one :class:`PumpLimits` per pump, ``stations[k]`` the
    station index (0 .. n_stations - 1) of pump k (None: every pump in
    station 0), ``now`` the time in seconds of the initial state: target and
    applied values at ``stop_value``, no flags. ``n_stations`` may name more
    stations than the pumps use.
    """

    def __init__(
        self,
        limits: Sequence[PumpLimits],
        stations: Sequence[int] | npt.NDArray[np.intp] | None = None,
        now: float = 0.0,
        *,
        n_stations: int | None = None,
    ) -> None:
        if isinstance(limits, str | bytes) or not isinstance(limits, Iterable):
            raise TypeError(
                f"expected a sequence of PumpLimits, got {_type_name(limits)}"
            )
        pump_limits = list(limits)
        for index, entry in enumerate(pump_limits):
            if not isinstance(entry, PumpLimits):
                raise TypeError(
                    f"expected PumpLimits for pump {index}, got {_type_name(entry)}"
                )

        station_of, count = _station_indices(stations, len(pump_limits), n_stations)

        start = _checked_time(now)
        if not math.isfinite(start):
            raise ValueError(f"expected a finite time for now, got {start!r}")

        self._pumps = [
            _Pump(entry, station, entry.stop_value, entry.stop_value)
            for entry, station in zip(pump_limits, station_of, strict=True)
        ]
        self._n_stations = count
        self._system_stop = False
        self._station_stop = [False] * count
        self._station_failsafe = [False] * count
        self._last_tick = start

    def __repr__(self) -> str:
        return f"Gate(n_pumps={self.n_pumps}, n_stations={self.n_stations})"

    @property
    def n_pumps(self) -> int:
        """Number of pumps."""
        return len(self._pumps)

    @property
    def n_stations(self) -> int:
        """Number of stations."""
        return self._n_stations

    @property
    def target(self) -> npt.NDArray[np.float64]:
        """Target of each pump after validation, read-only (units)."""
        return _readonly(np.array([p.target for p in self._pumps], dtype=np.float64))

    @property
    def applied(self) -> npt.NDArray[np.float64]:
        """Applied value of each pump, what SCADA sees, read-only (units)."""
        return _readonly(np.array([p.applied for p in self._pumps], dtype=np.float64))

    @property
    def status(self) -> npt.NDArray[np.uint16]:
        """Status bits of each pump (STATUS_*), read-only."""
        return _readonly(np.array([p.status for p in self._pumps], dtype=np.uint16))

    @property
    def last_outcome(self) -> npt.NDArray[np.uint8]:
        """Outcome of the last request of each pump, read-only."""
        return _readonly(np.array([p.outcome for p in self._pumps], dtype=np.uint8))

    @property
    def stations(self) -> npt.NDArray[np.intp]:
        """Station index of each pump, read-only."""
        return _readonly(np.array([p.station for p in self._pumps], dtype=np.intp))

    @property
    def last_tick(self) -> float:
        """Time in seconds of the latest tick (or of construction)."""
        return self._last_tick

    def limits(self, pump: int) -> PumpLimits:
        """The limits of pump ``pump``."""
        return self._pumps[_checked_index(pump, self.n_pumps, "pump")].limits

    def request(self, pump: int, value: object, now: float) -> int:
        """Ask for setpoint ``value`` (units) on pump ``pump``; return the outcome.

        Never raises for a bad pump or value: those are REJECTED. ``now``
        (seconds) is the time of the request; the request moves no applied
        value, :meth:`tick` does.
        """
        _checked_time(now)
        index = _pump_index_or_none(pump, self.n_pumps)
        if index is None:
            return REJECTED

        number = _real_or_none(value)
        if number is None:
            return self._reject(index)
        return self._request(index, number)

    def request_many(
        self,
        pumps: npt.NDArray[np.intp],
        values: npt.NDArray[np.float64],
        now: float,
        out: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """Apply :meth:`request` to each ``(pumps[k], values[k])`` in order.

        ``pumps`` is an intp array, ``values`` a float64 array of the same
        length; a pump named twice keeps the last value. Returns the uint8
        outcomes, in ``out`` when given.
        """
        _checked_time(now)
        indices = _checked_vector(pumps, "pumps", np.dtype(np.intp), None)
        numbers_ = _checked_vector(values, "values", np.dtype(np.float64), len(indices))
        outcomes = _outcome_buffer(out, len(indices))

        for k, (pump, number) in enumerate(
            zip(indices.tolist(), numbers_.tolist(), strict=True)
        ):
            if not 0 <= pump < self.n_pumps:
                outcomes[k] = REJECTED
                continue
            outcomes[k] = self._request(pump, number)
        return outcomes

    def request_all(
        self,
        values: npt.NDArray[np.float64],
        now: float,
        out: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """Apply :meth:`request` to every pump: ``values[k]`` for pump k.

        ``values`` is a float64 array of length n_pumps. Returns the uint8
        outcomes, in ``out`` when given.
        """
        _checked_time(now)
        numbers_ = _checked_vector(values, "values", np.dtype(np.float64), self.n_pumps)
        outcomes = _outcome_buffer(out, self.n_pumps)

        for pump, number in enumerate(numbers_.tolist()):
            outcomes[pump] = self._request(pump, number)
        return outcomes

    def tick(self, now: float) -> int:
        """Advance every applied value toward its goal; return how many still ramp.

        Each value moves by at most ``max_rate * (now - last_tick)`` units,
        apart from the step between ``stop_value`` and the nearest limit
        when ``stop_value`` lies outside the limits. A tick not later than
        the last one moves nothing and keeps ``last_tick``. ``now`` must be
        finite (seconds).
        """
        moment = _checked_time(now)
        if not math.isfinite(moment):
            raise ValueError(f"expected a finite time for now, got {moment!r}")

        elapsed = moment - self._last_tick
        if elapsed > 0.0:
            self._last_tick = moment

        ramping = 0
        for pump in self._pumps:
            if elapsed > 0.0:
                self._advance(pump, moment, elapsed)
            self._refresh_ramping(pump)
            if pump.status & STATUS_RAMPING:
                ramping += 1
        return ramping

    def set_system_stop(self, active: bool, now: float) -> None:
        """Latch (``active``) or clear the emergency stop of every pump.

        Activating forces each covered pump's applied value to
        ``stop_value`` at once. A non-finite ``now`` (seconds) records the
        stop at ``last_tick``; the stop itself always takes effect.
        """
        flag = _checked_flag(active, "active")
        moment = self._stop_time(now)

        self._system_stop = flag
        for pump in self._pumps:
            self._refresh_overrides(pump, moment)

    def set_station_stop(self, station: int, active: bool, now: float) -> None:
        """Latch or clear the emergency stop of every pump of ``station``."""
        index = _checked_index(station, self.n_stations, "station")
        flag = _checked_flag(active, "active")
        moment = self._stop_time(now)

        self._station_stop[index] = flag
        for pump in self._pumps:
            if pump.station == index:
                self._refresh_overrides(pump, moment)

    def set_pump_stop(self, pump: int, active: bool, now: float) -> None:
        """Latch or clear the emergency stop of pump ``pump``."""
        index = _checked_index(pump, self.n_pumps, "pump")
        flag = _checked_flag(active, "active")
        moment = self._stop_time(now)

        state = self._pumps[index]
        state.stop_latched = flag
        self._refresh_overrides(state, moment)

    def set_failsafe(self, station: int, active: bool, now: float) -> None:
        """Enter or leave failsafe for ``station``.

        Entering sets the target of the station's pumps to their
        ``failsafe_value``; leaving keeps the target until a fresh request.
        Setting the state it already has changes nothing.
        """
        index = _checked_index(station, self.n_stations, "station")
        flag = _checked_flag(active, "active")
        moment = self._stop_time(now)
        if self._station_failsafe[index] == flag:
            return

        self._station_failsafe[index] = flag
        for pump in self._pumps:
            if pump.station != index:
                continue
            if flag:
                pump.target = pump.limits.failsafe_value
            self._refresh_overrides(pump, moment)

    def is_stopped(self, pump: int) -> bool:
        """Whether an emergency stop (any level) covers pump ``pump``."""
        return self._covered(self._pumps[_checked_index(pump, self.n_pumps, "pump")])

    def in_failsafe(self, station: int) -> bool:
        """Whether ``station`` is in failsafe."""
        return self._station_failsafe[
            _checked_index(station, self.n_stations, "station")
        ]

    def restore(self, pump: int, target: float, applied: float) -> None:
        """Resume pump ``pump`` from persisted values, without a ramp.

        ``target`` is clamped into the limits (or kept at ``stop_value``
        with ``allow_stop``); ``applied`` is clamped into the limits unless
        it equals ``stop_value``, and stays ``stop_value`` while an
        emergency stop covers the pump. NaN or infinity raise ValueError.
        """
        index = _checked_index(pump, self.n_pumps, "pump")
        state = self._pumps[index]
        limits = state.limits
        wanted = _restored_value(target, "target", index)
        shown = _restored_value(applied, "applied", index)

        state.target, _ = limits.validated_target(wanted)
        if self._covered(state) or shown == limits.stop_value:
            state.applied = limits.stop_value
        else:
            state.applied = min(max(shown, limits.min_value), limits.max_value)
        self._refresh_ramping(state)

    def _request(self, index: int, number: float) -> int:
        if not math.isfinite(number):
            return self._reject(index)

        pump = self._pumps[index]
        target, clamped = pump.limits.validated_target(number)
        pump.target = target
        pump.status &= ~(STATUS_CLAMPED | STATUS_REJECTED)
        if clamped:
            pump.status |= STATUS_CLAMPED

        outcome = CLAMPED if clamped else ACCEPTED
        if self._covered(pump):
            outcome = BLOCKED
        pump.outcome = outcome
        self._refresh_ramping(pump)
        return outcome

    def _reject(self, index: int) -> int:
        pump = self._pumps[index]
        pump.status = (pump.status | STATUS_REJECTED) & ~STATUS_CLAMPED
        pump.outcome = REJECTED
        return REJECTED

    def _covered(self, pump: _Pump) -> bool:
        return (
            self._system_stop or self._station_stop[pump.station] or pump.stop_latched
        )

    def _goal(self, pump: _Pump) -> float:
        if pump.status & STATUS_EMERGENCY_STOP:
            return pump.limits.stop_value
        if pump.status & STATUS_FAILSAFE:
            return pump.limits.failsafe_value
        return pump.target

    def _stop_time(self, now: object) -> float:
        moment = _checked_time(now)
        return moment if math.isfinite(moment) else self._last_tick

    def _refresh_overrides(self, pump: _Pump, now: float) -> None:
        """Bring the pump's flags, and under an emergency stop its applied
        value, in line with the latched stops and failsafe."""
        pump.status &= ~(STATUS_EMERGENCY_STOP | STATUS_FAILSAFE)
        if self._station_failsafe[pump.station]:
            pump.status |= STATUS_FAILSAFE
        if self._covered(pump):
            pump.status |= STATUS_EMERGENCY_STOP
            if pump.applied != pump.limits.stop_value:
                pump.applied = pump.limits.stop_value
                pump.stopped_at = now
        self._refresh_ramping(pump)

    def _refresh_ramping(self, pump: _Pump) -> None:
        if pump.applied != self._goal(pump):
            pump.status |= STATUS_RAMPING
        else:
            pump.status &= ~STATUS_RAMPING

    def _advance(self, pump: _Pump, now: float, elapsed: float) -> None:
        goal = self._goal(pump)
        before = pump.applied
        if before == goal:
            return

        after = _next_applied(pump, goal, now, elapsed)
        if after == pump.limits.stop_value and before != after:
            pump.stopped_at = now
        pump.applied = after


def _next_applied(pump: _Pump, goal: float, now: float, elapsed: float) -> float:
    """The applied value of ``pump`` after ``elapsed`` seconds toward ``goal``."""
    limits = pump.limits
    applied = pump.applied
    stop = limits.stop_value
    step = limits.max_rate * elapsed

    if applied == stop:
        if now < pump.stopped_at + limits.min_switch_interval:
            return applied
        unlimited = limits.max_rate == math.inf
        if stop < limits.min_value and not unlimited:
            return limits.min_value
        if stop > limits.max_value and not unlimited:
            return limits.max_value
        return _toward(applied, goal, step)

    if goal == stop and not limits.is_operating_point(stop):
        edge = limits.min_value if stop < limits.min_value else limits.max_value
        moved = _toward(applied, edge, step)
        return stop if moved == edge else moved

    return _toward(applied, goal, step)


def _restored_value(value: object, name: str, pump: int) -> float:
    if not _is_real(value):
        raise TypeError(
            f"pump {pump}: expected a real number for {name}, got {_type_name(value)}"
        )
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"pump {pump}: expected a finite {name}, got {number!r}")
    return number


def _station_indices(
    stations: Sequence[int] | npt.NDArray[np.intp] | None,
    n_pumps: int,
    n_stations: int | None,
) -> tuple[list[int], int]:
    """Return the station of each pump and the station count.

    Without ``n_stations`` the count is the highest index + 1, which may not
    exceed the number of pumps (at least 1).
    """
    if n_stations is not None and (
        _is_bool(n_stations) or not isinstance(n_stations, numbers.Integral)
    ):
        raise TypeError(
            f"expected an integer for n_stations, got {_type_name(n_stations)}"
        )
    if stations is None:
        return [0] * n_pumps, _station_count(0, n_stations)

    array: npt.NDArray[Any] = np.asarray(stations)
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.ndim == 1):
        raise TypeError(f"expected integer station indices, got {array.dtype}")
    if array.ndim != 1 or len(array) != n_pumps:
        raise ValueError(
            f"expected {n_pumps} station indices (one per pump), "
            f"got shape {array.shape}"
        )

    indices = [int(station) for station in array.tolist()]
    bound = max(n_pumps, 1) if n_stations is None else int(n_stations)
    for pump, station in enumerate(indices):
        if not 0 <= station < bound:
            raise ValueError(
                f"expected station indices in 0..{bound - 1} (below n_stations, "
                f"or the number of pumps when n_stations is not given), "
                f"got {station} for pump {pump}"
            )
    used = max(indices) + 1 if indices else 1
    return indices, _station_count(used, n_stations)


def _station_count(used: int, n_stations: int | None) -> int:
    if n_stations is None:
        return max(used, 1)
    if n_stations < 1:
        raise ValueError(f"expected n_stations >= 1, got {n_stations}")
    return int(n_stations)


def _checked_vector(
    array: object, name: str, dtype: np.dtype[np.generic], length: int | None
) -> npt.NDArray[np.generic]:
    """Return ``array`` checked as a 1-d array of ``dtype`` in native byte order.

    ``length`` None accepts any length.
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array for {name}, got {_type_name(array)}")
    if array.dtype != dtype:
        raise TypeError(
            f"expected {name} of dtype {dtype} in native byte order, got {array.dtype}"
        )
    if array.ndim != 1:
        raise ValueError(f"expected a 1-d array for {name}, got shape {array.shape}")
    if length is not None and len(array) != length:
        raise ValueError(f"expected {length} entries in {name}, got {len(array)}")
    return array


def _outcome_buffer(out: object, length: int) -> npt.NDArray[np.uint8]:
    if out is None:
        return np.zeros(length, dtype=np.uint8)

    if not isinstance(out, np.ndarray):
        raise TypeError(f"expected a numpy array for out, got {_type_name(out)}")
    if not out.flags.c_contiguous:
        raise ValueError("expected a contiguous array for out, got a strided one")
    if not out.flags.writeable:
        raise ValueError("expected a writeable array for out, got a read-only one")
    buffer = _checked_vector(out, "out", np.dtype(np.uint8), length)
    return cast(npt.NDArray[np.uint8], buffer)
