"""The safety gate: every rule, outcome, status bit and validation error.

Each test runs against the compiled gate and the pure-Python reference
(the ``gate_impl`` fixture).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
from decimal import Decimal
from fractions import Fraction
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.core.conftest import load

ACCEPTED, CLAMPED, REJECTED, BLOCKED = 0, 1, 2, 3
ESTOP, FAILSAFE, CLAMP, RAMP, REJECT = 1, 2, 4, 8, 16


def exact(message: str) -> str:
    """A pattern matching exactly ``message``."""
    return f"^{re.escape(message)}$"


def starts(message: str) -> str:
    """A pattern matching a text that starts with ``message``."""
    return f"^{re.escape(message)}"


LIMITS = {"min_value": 20.0, "max_value": 50.0, "max_rate": 2.0, "failsafe_value": 30.0}


def limits(gate_impl: ModuleType, pump_id: str = "", **changes: Any) -> Any:
    return gate_impl.PumpLimits(**{**LIMITS, **changes}, pump_id=pump_id)


def make(
    gate_impl: ModuleType,
    n: int = 1,
    stations: Any = None,
    now: float = 0.0,
    **changes: Any,
) -> Any:
    pumps = [limits(gate_impl, f"P{k}", **changes) for k in range(n)]
    return gate_impl.Gate(pumps, stations, now)


def running(gate_impl: ModuleType, n: int = 1, value: float = 40.0, **kw: Any) -> Any:
    """A gate whose pumps have reached ``value`` at time 100."""
    gate = make(gate_impl, n, max_rate=math.inf, **kw)
    gate.request_all(np.full(n, value), 0.0)
    gate.tick(100.0)
    assert list(gate.applied) == [value] * n
    return gate


# Module


def test_constants(gate_impl: ModuleType) -> None:
    assert (gate_impl.ACCEPTED, gate_impl.CLAMPED) == (0, 1)
    assert (gate_impl.REJECTED, gate_impl.BLOCKED) == (2, 3)
    assert gate_impl.STATUS_EMERGENCY_STOP == 1
    assert gate_impl.STATUS_FAILSAFE == 2
    assert gate_impl.STATUS_CLAMPED == 4
    assert gate_impl.STATUS_RAMPING == 8
    assert gate_impl.STATUS_REJECTED == 16
    outcome = gate_impl.Outcome
    assert [int(o) for o in outcome] == [0, 1, 2, 3]
    assert [o.name for o in outcome] == ["ACCEPTED", "CLAMPED", "REJECTED", "BLOCKED"]
    assert outcome(gate_impl.BLOCKED) is outcome.BLOCKED


def test_debug_build_flag() -> None:
    compiled = load("gate", "compiled")
    assert load("gate", "reference").DEBUG_BUILD is False
    assert isinstance(compiled.DEBUG_BUILD, bool)
    if os.environ.get("CALEJO_DEBUG_BUILD", "") not in ("", "0"):
        assert compiled.DEBUG_BUILD is True


def test_package_exports_the_compiled_gate() -> None:
    import calejo_core

    compiled = load("gate", "compiled")
    assert calejo_core.Gate is compiled.Gate
    assert calejo_core.PumpLimits is compiled.PumpLimits
    assert calejo_core.Outcome is compiled.Outcome
    assert calejo_core.BLOCKED == compiled.BLOCKED


# PumpLimits


def test_limits_fields(gate_impl: ModuleType) -> None:
    pump = gate_impl.PumpLimits(20, 50, 2, 30, pump_id="P1")

    assert pump.pump_id == "P1"
    assert (pump.min_value, pump.max_value, pump.max_rate) == (20.0, 50.0, 2.0)
    assert (pump.failsafe_value, pump.stop_value) == (30.0, 0.0)
    assert pump.allow_stop is True
    assert pump.min_switch_interval == 0.0
    for name in ("min_value", "max_value", "max_rate", "failsafe_value", "stop_value"):
        assert type(getattr(pump, name)) is float


def test_limits_positional_and_numbers(gate_impl: ModuleType) -> None:
    pump = gate_impl.PumpLimits(
        np.float32(20.5), np.int64(50), Fraction(1, 2), 20.5, -1, False, 7
    )

    assert pump.min_value == 20.5
    assert pump.max_value == 50.0
    assert pump.max_rate == 0.5
    assert pump.stop_value == -1.0
    assert pump.allow_stop is False
    assert pump.min_switch_interval == 7.0
    assert pump.pump_id == ""


def test_limits_infinite_rate_and_failsafe_stop(gate_impl: ModuleType) -> None:
    assert gate_impl.PumpLimits(20, 50, math.inf, 0).max_rate == math.inf
    assert gate_impl.PumpLimits(20, 50, 1, 0).failsafe_value == 0.0
    assert gate_impl.PumpLimits(20, 20, 1, 20).max_value == 20.0


def test_limits_equality_hash_repr(gate_impl: ModuleType) -> None:
    first = limits(gate_impl, "P1")
    second = gate_impl.PumpLimits(20, 50, 2, 30, pump_id="P1")

    assert first == second
    assert hash(first) == hash(second)
    assert first != limits(gate_impl, "P2")
    assert first != limits(gate_impl, "P1", max_rate=3.0)
    assert first != "P1"
    assert repr(first) == (
        "PumpLimits(min_value=20.0, max_value=50.0, max_rate=2.0, "
        "failsafe_value=30.0, stop_value=0.0, allow_stop=True, "
        "min_switch_interval=0.0, pump_id='P1')"
    )


def test_limits_are_immutable(gate_impl: ModuleType) -> None:
    pump = limits(gate_impl)
    with pytest.raises(AttributeError):
        pump.min_value = 0.0
    assert pump.min_value == 20.0


def test_limits_pickle_and_copy(gate_impl: ModuleType) -> None:
    pump = limits(gate_impl, "P7", min_switch_interval=5.0, allow_stop=False)

    assert pickle.loads(pickle.dumps(pump)) == pump
    assert copy.deepcopy(pump) == pump


@pytest.mark.parametrize(
    "field",
    [
        "min_value",
        "max_value",
        "max_rate",
        "failsafe_value",
        "stop_value",
        "min_switch_interval",
    ],
)
@pytest.mark.parametrize("bad", ["20", None, True, 1j, Decimal(20), [20]])
def test_limits_reject_non_numbers(gate_impl: ModuleType, field: str, bad: Any) -> None:
    message = f"pump 'P1': expected a real number for {field}, got {type(bad).__name__}"
    with pytest.raises(TypeError, match=exact(message)):
        limits(gate_impl, "P1", **{field: bad})


def test_limits_type_errors(gate_impl: ModuleType) -> None:
    with pytest.raises(
        TypeError, match=starts("pump 'P1': expected a bool for allow_stop")
    ):
        limits(gate_impl, "P1", allow_stop=1)
    with pytest.raises(TypeError, match=exact("expected a str for pump_id, got int")):
        gate_impl.PumpLimits(20, 50, 2, 30, pump_id=3)
    with pytest.raises(TypeError):
        gate_impl.PumpLimits(20, 50, 2, 30, 0, True, 0, "P1")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_value": math.nan}, "expected a finite min_value, got nan"),
        ({"min_value": -math.inf}, "expected a finite min_value, got -inf"),
        ({"max_value": math.inf}, "expected a finite max_value, got inf"),
        ({"failsafe_value": math.nan}, "expected a finite failsafe_value, got nan"),
        ({"stop_value": math.inf}, "expected a finite stop_value, got inf"),
        ({"min_value": 60.0}, "expected min_value <= max_value, got 60.0 > 50.0"),
        ({"max_rate": 0.0}, "expected max_rate > 0 (units per second, inf for no"),
        ({"max_rate": -1.0}, "expected max_rate > 0"),
        ({"max_rate": math.nan}, "expected max_rate > 0"),
        ({"max_rate": -math.inf}, "expected max_rate > 0"),
        (
            {"failsafe_value": 51.0},
            "expected failsafe_value within [20.0, 50.0] or equal to stop_value "
            "0.0 with allow_stop, got 51.0",
        ),
        ({"failsafe_value": 0.0, "allow_stop": False}, "expected failsafe_value"),
        ({"failsafe_value": 19.0, "stop_value": 19.5}, "expected failsafe_value"),
        (
            {"min_switch_interval": -1.0},
            "expected a finite min_switch_interval >= 0 (seconds), got -1.0",
        ),
        ({"min_switch_interval": math.nan}, "expected a finite min_switch_interval"),
        ({"min_switch_interval": math.inf}, "expected a finite min_switch_interval"),
    ],
)
def test_limits_value_errors(
    gate_impl: ModuleType, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=starts(f"pump 'P3': {message}")):
        limits(gate_impl, "P3", **changes)


def test_limits_unnamed_pump_error(gate_impl: ModuleType) -> None:
    with pytest.raises(
        ValueError, match=starts("pump limits: expected min_value <= max")
    ):
        gate_impl.PumpLimits(5, 1, 1, 1)


# Construction


def test_initial_state(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 3, stop_value=-1.0, now=12.5)

    assert (gate.n_pumps, gate.n_stations, gate.last_tick) == (3, 1, 12.5)
    assert list(gate.target) == [-1.0] * 3
    assert list(gate.applied) == [-1.0] * 3
    assert list(gate.status) == [0, 0, 0]
    assert list(gate.last_outcome) == [0, 0, 0]
    assert list(gate.stations) == [0, 0, 0]
    assert gate.limits(2) == limits(gate_impl, "P2", stop_value=-1.0)
    assert not gate.is_stopped(0)
    assert not gate.in_failsafe(0)
    assert repr(gate) == "Gate(n_pumps=3, n_stations=1)"


def test_view_dtypes_and_read_only(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2, stations=[0, 1])
    views = {
        "target": np.float64,
        "applied": np.float64,
        "status": np.uint16,
        "last_outcome": np.uint8,
        "stations": np.intp,
    }

    for name, dtype in views.items():
        view = getattr(gate, name)
        assert view.dtype == dtype
        assert view.shape == (2,)
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1
        with pytest.raises(AttributeError):
            setattr(gate, name, view)


def test_compiled_views_are_live_and_locked() -> None:
    gate_impl = load("gate", "compiled")
    gate = make(gate_impl, 2)
    target = gate.target

    gate.request(1, 42.0, 0.0)
    assert target[1] == 42.0
    assert gate.target is target
    with pytest.raises(ValueError):
        target.flags.writeable = True


def test_stations(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 4, stations=np.array([1, 0, 1, 2], dtype=np.int32))
    assert gate.n_stations == 3
    assert list(gate.stations) == [1, 0, 1, 2]

    pumps = [limits(gate_impl)] * 2
    wide = gate_impl.Gate(pumps, [0, 4], n_stations=6)
    assert wide.n_stations == 6
    assert gate_impl.Gate(pumps, None, n_stations=3).n_stations == 3
    assert gate_impl.Gate(pumps, (0, 1)).n_stations == 2


@pytest.mark.parametrize(
    ("stations", "error", "message"),
    [
        ([0, 1], ValueError, "expected 3 station indices (one per pump), got shape"),
        ([[0, 1, 2]], ValueError, "expected 3 station indices (one per pump)"),
        ([0.0, 1.0, 2.0], TypeError, "expected integer station indices, got float64"),
        ([True, False, True], TypeError, "expected integer station indices, got bool"),
        (["0", "1", "2"], TypeError, "expected integer station indices"),
        ([0, -1, 0], ValueError, "expected station indices in 0..2 (below n_stations"),
        (
            [0, 1, 3],
            ValueError,
            "expected station indices in 0..2 (below n_stations, or the number "
            "of pumps when n_stations is not given), got 3 for pump 2",
        ),
        ([0, 1, 2**70], TypeError, "expected integer station indices, got object"),
    ],
)
def test_station_errors(
    gate_impl: ModuleType, stations: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=starts(message)):
        make(gate_impl, 3, stations=stations)


def test_n_stations_errors(gate_impl: ModuleType) -> None:
    pumps = [limits(gate_impl)] * 2
    with pytest.raises(ValueError, match=starts("expected station indices in 0..1 ")):
        gate_impl.Gate(pumps, [0, 2], n_stations=2)
    with pytest.raises(ValueError, match=exact("expected n_stations >= 1, got 0")):
        gate_impl.Gate([], None, n_stations=0)
    with pytest.raises(
        TypeError, match=starts("expected an integer for n_stations, got bool")
    ):
        gate_impl.Gate(pumps, None, n_stations=True)
    with pytest.raises(
        TypeError, match=starts("expected an integer for n_stations, got flo")
    ):
        gate_impl.Gate(pumps, None, n_stations=2.0)


def test_construction_errors(gate_impl: ModuleType) -> None:
    compiled = gate_impl.__name__ == "calejo_core.gate"
    other = load("gate", "reference" if compiled else "compiled")
    with pytest.raises(
        TypeError, match=exact("expected a sequence of PumpLimits, got int")
    ):
        gate_impl.Gate(3)
    with pytest.raises(
        TypeError, match=exact("expected a sequence of PumpLimits, got str")
    ):
        gate_impl.Gate("P1")
    with pytest.raises(
        TypeError, match=exact("expected PumpLimits for pump 1, got dict")
    ):
        gate_impl.Gate([limits(gate_impl), dict(LIMITS)])
    with pytest.raises(
        TypeError, match=starts("expected PumpLimits for pump 0, got PumpLi")
    ):
        gate_impl.Gate([limits(other)])
    with pytest.raises(
        ValueError, match=exact("expected a finite time for now, got nan")
    ):
        gate_impl.Gate([limits(gate_impl)], None, math.nan)
    with pytest.raises(TypeError):
        gate_impl.Gate([limits(gate_impl)], None, "0")


def test_gate_without_pumps(gate_impl: ModuleType) -> None:
    gate = gate_impl.Gate([])
    empty = np.zeros(0)

    assert (gate.n_pumps, gate.n_stations) == (0, 1)
    assert gate.request(0, 30.0, 0.0) == REJECTED
    assert list(gate.request_all(empty, 0.0)) == []
    assert list(gate.request_many(np.zeros(0, np.intp), empty, 0.0)) == []
    assert gate.tick(1.0) == 0
    gate.set_system_stop(True, 1.0)
    gate.set_station_stop(0, True, 1.0)
    gate.set_failsafe(0, True, 1.0)
    assert gate.target.shape == (0,)


def test_limits_lookup_errors(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2)
    assert gate.limits(np.int64(1)).pump_id == "P1"
    with pytest.raises(
        IndexError, match=exact("pump 2 out of range: the gate has 2 pumps")
    ):
        gate.limits(2)
    with pytest.raises(IndexError, match=starts("pump -1 out of range")):
        gate.limits(-1)
    with pytest.raises(
        TypeError, match=exact("expected an integer pump index, got str")
    ):
        gate.limits("1")


# One request


@pytest.mark.parametrize(
    ("value", "outcome", "target", "status"),
    [
        (30.0, ACCEPTED, 30.0, RAMP),
        (20.0, ACCEPTED, 20.0, RAMP),
        (50.0, ACCEPTED, 50.0, RAMP),
        (19.999, CLAMPED, 20.0, CLAMP | RAMP),
        (1e300, CLAMPED, 50.0, CLAMP | RAMP),
        (-5.0, CLAMPED, 20.0, CLAMP | RAMP),
        (0.0, ACCEPTED, 0.0, 0),
        (-0.0, ACCEPTED, 0.0, 0),
        (35, ACCEPTED, 35.0, RAMP),
        (10**10, CLAMPED, 50.0, CLAMP | RAMP),
        (np.float32(30.5), ACCEPTED, 30.5, RAMP),
        (np.float64(31.5), ACCEPTED, 31.5, RAMP),
        (np.int16(40), ACCEPTED, 40.0, RAMP),
        (Fraction(61, 2), ACCEPTED, 30.5, RAMP),
    ],
)
def test_request_outcomes(
    gate_impl: ModuleType, value: Any, outcome: int, target: float, status: int
) -> None:
    gate = make(gate_impl, 2)

    assert gate.request(1, value, 0.0) == outcome
    assert gate.target[1] == target
    assert math.copysign(1.0, gate.target[1]) == math.copysign(1.0, target)
    assert gate.status[1] == status
    assert gate.last_outcome[1] == outcome
    assert list(gate.applied) == [0.0, 0.0]
    assert gate.target[0] == 0.0


class _BadFloat(float):
    def __float__(self) -> float:
        raise RuntimeError("no float")


class _BadClass:
    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError(f"no {name}")


BAD_VALUES: dict[str, Any] = {
    "nan": lambda: math.nan,
    "inf": lambda: math.inf,
    "-inf": lambda: -math.inf,
    "str": lambda: "30",
    "bytes": lambda: b"30",
    "None": lambda: None,
    "True": lambda: True,
    "False": lambda: False,
    "numpy-bool": lambda: np.True_,
    "complex": lambda: 1j,
    "Decimal": lambda: Decimal("30"),
    "list": lambda: [30.0],
    "object": object,
    "huge-int": lambda: 10**400,
    "float32-nan": lambda: np.float32("nan"),
    "float-raising": lambda: _BadFloat(30),
    "hostile": _BadClass,
}


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_request_rejects_bad_values(gate_impl: ModuleType, bad: str) -> None:
    value = BAD_VALUES[bad]()
    gate = make(gate_impl, 1)
    gate.request(0, 55.0, 0.0)
    assert gate.status[0] == CLAMP | RAMP

    assert gate.request(0, value, 0.0) == REJECTED
    assert gate.target[0] == 50.0
    assert gate.status[0] == REJECT | RAMP
    assert gate.last_outcome[0] == REJECTED

    assert gate.request(0, 40.0, 0.0) == ACCEPTED
    assert gate.status[0] == RAMP


BAD_PUMPS: dict[str, Any] = {
    "-1": lambda: -1,
    "n": lambda: 2,
    "huge": lambda: 2**70,
    "-huge": lambda: -(2**70),
    "str": lambda: "0",
    "None": lambda: None,
    "float": lambda: 1.0,
    "True": lambda: True,
    "numpy-bool": lambda: np.True_,
    "hostile": _BadClass,
}


@pytest.mark.parametrize("bad", BAD_PUMPS)
def test_request_rejects_bad_pumps(gate_impl: ModuleType, bad: str) -> None:
    pump = BAD_PUMPS[bad]()
    gate = make(gate_impl, 2)

    assert gate.request(pump, 30.0, 0.0) == REJECTED
    assert list(gate.target) == [0.0, 0.0]
    assert list(gate.status) == [0, 0]
    assert list(gate.last_outcome) == [0, 0]


def test_request_accepts_integer_like_pumps(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 3)
    assert gate.request(np.int64(2), 30.0, 0.0) == ACCEPTED
    assert gate.request(np.uint8(1), 31.0, 0.0) == ACCEPTED
    assert list(gate.target) == [0.0, 31.0, 30.0]


def test_request_needs_a_time(gate_impl: ModuleType) -> None:
    gate = make(gate_impl)
    with pytest.raises(TypeError):
        gate.request(0, 30.0, "now")


def test_request_moves_nothing(gate_impl: ModuleType) -> None:
    gate = make(gate_impl)
    gate.request(0, 30.0, 50.0)
    assert gate.applied[0] == 0.0
    assert gate.last_tick == 0.0


def test_stop_request(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1, stop_value=5.0)
    assert gate.request(0, 5.0, 0.0) == ACCEPTED
    assert gate.target[0] == 5.0
    assert gate.status[0] == RAMP


def test_stop_request_without_allow_stop(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, allow_stop=False)
    assert gate.request(0, 0.0, 0.0) == CLAMPED
    assert gate.target[0] == 20.0

    inside = make(gate_impl, min_value=0.0, allow_stop=False)
    assert inside.request(0, 0.0, 0.0) == ACCEPTED
    assert inside.target[0] == 0.0


def test_stop_above_the_limits(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, stop_value=100.0)
    assert gate.request(0, 100.0, 0.0) == ACCEPTED
    assert gate.request(0, 99.0, 0.0) == CLAMPED
    assert gate.target[0] == 50.0


# Many requests


def test_request_all_matches_request(gate_impl: ModuleType) -> None:
    values = np.array([30.0, -4.0, math.nan, 0.0, 60.0, math.inf, 20.0])
    one = make(gate_impl, len(values), stations=[0, 0, 1, 1, 2, 2, 2])
    many = make(gate_impl, len(values), stations=[0, 0, 1, 1, 2, 2, 2])
    for gate in (one, many):
        gate.set_station_stop(2, True, 0.0)

    expected = [one.request(k, float(v), 0.0) for k, v in enumerate(values)]
    outcomes = many.request_all(values, 0.0)

    assert outcomes.dtype == np.uint8
    assert list(outcomes) == expected == [0, 1, 2, 0, 3, 2, 3]
    for name in ("target", "applied", "status", "last_outcome"):
        assert list(getattr(many, name)) == list(getattr(one, name))


def test_request_many(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 3)
    pumps = np.array([2, 0, 7, -1, 2, 1], dtype=np.intp)
    values = np.array([30.0, 45.0, 30.0, 30.0, 35.0, math.nan])
    out = np.full(6, 99, dtype=np.uint8)

    result = gate.request_many(pumps, values, 0.0, out)

    assert result is out
    assert list(out) == [ACCEPTED, ACCEPTED, REJECTED, REJECTED, ACCEPTED, REJECTED]
    assert list(gate.target) == [45.0, 0.0, 35.0]
    assert list(gate.last_outcome) == [ACCEPTED, REJECTED, ACCEPTED]


def test_request_all_into_out(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2)
    out = np.zeros(2, dtype=np.uint8)
    assert gate.request_all(np.array([10.0, 40.0]), 0.0, out=out) is out
    assert list(out) == [CLAMPED, ACCEPTED]


def test_array_inputs_may_be_strided_or_read_only(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 3)
    wide = np.array([30.0, -1.0, 31.0, -1.0, 32.0, -1.0])
    assert list(gate.request_all(wide[::2], 0.0)) == [0, 0, 0]
    assert list(gate.target) == [30.0, 31.0, 32.0]

    frozen = np.array([40.0, 41.0, 42.0])
    frozen.flags.writeable = False
    gate.request_all(frozen, 0.0)
    gate.request_all(gate.target, 0.0)
    pumps = np.arange(3, dtype=np.intp)
    pumps.flags.writeable = False
    gate.request_many(pumps, frozen, 0.0)
    assert list(gate.target) == [40.0, 41.0, 42.0]


def test_request_many_last_duplicate_wins(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 1)
    gate.request_many(np.zeros(3, np.intp), np.array([30.0, 60.0, 25.0]), 0.0)
    assert gate.target[0] == 25.0
    assert gate.status[0] == RAMP


def test_array_argument_errors(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 3)
    values = np.zeros(3)
    pumps = np.arange(3, dtype=np.intp)
    cases: list[tuple[Any, type[Exception], str]] = [
        (
            lambda: gate.request_all([0.0] * 3, 0.0),
            TypeError,
            "expected a numpy array for values, got list",
        ),
        (
            lambda: gate.request_all(values.astype(np.float32), 0.0),
            TypeError,
            "expected values of dtype float64 in native byte order, got float32",
        ),
        (
            lambda: gate.request_all(values.astype(">f8"), 0.0),
            TypeError,
            "expected values of dtype float64 in native byte order, got >f8",
        ),
        (
            lambda: gate.request_all(np.zeros(4), 0.0),
            ValueError,
            "expected 3 entries in values, got 4",
        ),
        (
            lambda: gate.request_all(np.zeros((3, 1)), 0.0),
            ValueError,
            "expected a 1-d array for values, got shape (3, 1)",
        ),
        (
            lambda: gate.request_many(pumps.astype(np.int32), values, 0.0),
            TypeError,
            "expected pumps of dtype int64 in native byte order, got int32",
        ),
        (
            lambda: gate.request_many([0, 1], values, 0.0),
            TypeError,
            "expected a numpy array for pumps, got list",
        ),
        (
            lambda: gate.request_many(pumps, np.zeros(2), 0.0),
            ValueError,
            "expected 3 entries in values, got 2",
        ),
        (
            lambda: gate.request_all(values, 0.0, np.zeros(3, np.int8)),
            TypeError,
            "expected out of dtype uint8 in native byte order, got int8",
        ),
        (
            lambda: gate.request_all(values, 0.0, np.zeros(2, np.uint8)),
            ValueError,
            "expected 3 entries in out, got 2",
        ),
        (
            lambda: gate.request_all(values, 0.0, np.zeros(6, np.uint8)[::2]),
            ValueError,
            "expected a contiguous array for out, got a strided one",
        ),
        (
            lambda: gate.request_all(values, 0.0, gate.last_outcome),
            ValueError,
            "expected a writeable array for out, got a read-only one",
        ),
        (
            lambda: gate.request_many(pumps, values, 0.0, [0, 0, 0]),
            TypeError,
            "expected a numpy array for out, got list",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=starts(message) + "$"):
            call()
    assert list(gate.target) == [0.0, 0.0, 0.0]
    assert list(gate.last_outcome) == [0, 0, 0]


# Ramps


def test_start_steps_to_min_then_ramps(gate_impl: ModuleType) -> None:
    gate = make(gate_impl)
    gate.request(0, 30.0, 0.0)

    assert gate.tick(0.5) == 1
    assert gate.applied[0] == 20.0
    assert gate.tick(1.5) == 1
    assert gate.applied[0] == 22.0
    assert gate.tick(5.5) == 0
    assert gate.applied[0] == 30.0
    assert gate.status[0] == 0
    assert gate.last_tick == 5.5


def test_start_above_the_limits_steps_to_max(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, stop_value=100.0)
    gate.request(0, 40.0, 0.0)
    gate.tick(1.0)
    assert gate.applied[0] == 50.0
    gate.tick(2.0)
    assert gate.applied[0] == 48.0

    gate.request(0, 100.0, 2.0)
    gate.tick(2.5)
    assert gate.applied[0] == 49.0
    gate.tick(3.0)
    assert gate.applied[0] == 100.0


def test_stop_ramps_to_min_then_steps(gate_impl: ModuleType) -> None:
    gate = _with_rate(gate_impl, running(gate_impl, 1, 24.0), 2.0)

    gate.request(0, 0.0, 100.0)
    assert gate.tick(101.0) == 1
    assert gate.applied[0] == 22.0
    assert gate.tick(101.5) == 1
    assert gate.applied[0] == 21.0
    assert gate.tick(102.0) == 0
    assert gate.applied[0] == 0.0
    assert gate.status[0] == 0


def test_stop_steps_when_the_limit_is_reached_within_the_tick(
    gate_impl: ModuleType,
) -> None:
    gate = make(gate_impl)
    gate.restore(0, 21.0, 21.0)
    gate.request(0, 0.0, 0.0)
    gate.tick(10.0)
    assert gate.applied[0] == 0.0


def test_stop_above_the_limits_ramps_to_max(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, stop_value=100.0)
    gate.restore(0, 46.0, 46.0)
    gate.request(0, 100.0, 0.0)
    gate.tick(1.0)
    assert gate.applied[0] == 48.0
    gate.tick(3.0)
    assert gate.applied[0] == 100.0


def test_stop_inside_the_limits_is_a_plain_ramp(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, min_value=0.0, stop_value=0.0)
    gate.request(0, 10.0, 0.0)
    gate.tick(1.0)
    assert gate.applied[0] == 2.0
    gate.request(0, 0.0, 1.0)
    gate.tick(1.5)
    assert gate.applied[0] == 1.0
    gate.tick(3.0)
    assert gate.applied[0] == 0.0


def test_ramp_down_and_clamped_target(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1, 50.0)
    gate = _with_rate(gate_impl, gate, 2.0)
    assert gate.request(0, 10.0, 100.0) == CLAMPED
    gate.tick(110.0)
    assert gate.applied[0] == 30.0
    assert gate.status[0] == CLAMP | RAMP
    gate.tick(200.0)
    assert gate.applied[0] == 20.0
    assert gate.status[0] == CLAMP


def test_unlimited_rate_reaches_the_goal_at_the_next_tick(
    gate_impl: ModuleType,
) -> None:
    gate = make(gate_impl, max_rate=math.inf)
    gate.request(0, 45.0, 0.0)
    assert gate.tick(1e-9) == 0
    assert gate.applied[0] == 45.0
    gate.request(0, 0.0, 0.0)
    gate.tick(1.0)
    assert gate.applied[0] == 0.0


def test_tick_not_later_moves_nothing(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, now=10.0)
    gate.request(0, 30.0, 10.0)

    assert gate.tick(10.0) == 1
    assert gate.tick(5.0) == 1
    assert gate.applied[0] == 0.0
    assert gate.last_tick == 10.0
    assert gate.status[0] == RAMP
    gate.tick(11.0)
    assert gate.applied[0] == 20.0
    gate.tick(11.5)
    assert gate.applied[0] == 21.0


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_tick_needs_a_finite_time(gate_impl: ModuleType, now: float) -> None:
    gate = make(gate_impl)
    gate.request(0, 30.0, 0.0)
    with pytest.raises(ValueError, match=starts("expected a finite time for now, got")):
        gate.tick(now)
    assert gate.applied[0] == 0.0
    assert gate.last_tick == 0.0
    with pytest.raises(TypeError):
        gate.tick("1")


def test_tick_counts_ramping_pumps(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 3)
    gate.request_all(np.array([20.0, 30.0, 0.0]), 0.0)
    assert gate.tick(1.0) == 1
    assert list(gate.status) == [0, RAMP, 0]


# Anti-cycling


def test_anti_cycling_holds_a_stopped_pump(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, min_switch_interval=60.0)
    gate.restore(0, 21.0, 21.0)
    gate.request(0, 0.0, 0.0)
    gate.tick(10.0)
    assert gate.applied[0] == 0.0

    gate.request(0, 30.0, 11.0)
    assert gate.tick(20.0) == 1
    assert gate.applied[0] == 0.0
    assert gate.status[0] == RAMP
    gate.tick(69.999)
    assert gate.applied[0] == 0.0
    gate.tick(70.0)
    assert gate.applied[0] == 20.0


def test_a_fresh_gate_may_start_at_once(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, min_switch_interval=60.0, now=5.0)
    gate.request(0, 30.0, 5.0)
    gate.tick(6.0)
    assert gate.applied[0] == 20.0


def test_anti_cycling_counts_from_an_emergency_stop(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1, min_switch_interval=30.0)
    gate.set_system_stop(True, 105.0)
    gate.set_system_stop(False, 106.0)

    gate.tick(134.0)
    assert gate.applied[0] == 0.0
    gate.tick(135.0)
    assert gate.applied[0] == 40.0


def test_anti_cycling_counts_from_the_first_stop(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, min_switch_interval=30.0)
    gate.restore(0, 21.0, 21.0)
    gate.request(0, 0.0, 0.0)
    gate.tick(2.0)
    gate.set_pump_stop(0, True, 20.0)
    gate.set_pump_stop(0, False, 21.0)
    gate.request(0, 30.0, 21.0)

    gate.tick(31.0)
    assert gate.applied[0] == 0.0
    gate.tick(32.0)
    assert gate.applied[0] == 20.0


def test_anti_cycling_when_the_ramp_lands_on_stop(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, min_value=0.0, min_switch_interval=10.0)
    gate.restore(0, 2.0, 2.0)
    gate.request(0, 0.0, 0.0)
    gate.tick(1.0)
    assert gate.applied[0] == 0.0
    gate.request(0, 10.0, 1.0)
    gate.tick(10.5)
    assert gate.applied[0] == 0.0
    gate.tick(11.5)
    assert gate.applied[0] == 2.0


# Emergency stops


def test_system_stop(gate_impl: ModuleType) -> None:
    stations = [0, 1, 1]
    gate = _with_rate(
        gate_impl, running(gate_impl, 3, stations=stations), 2.0, stations
    )
    gate.set_system_stop(True, 101.0)

    assert list(gate.applied) == [0.0] * 3
    assert list(gate.status) == [ESTOP] * 3
    assert all(gate.is_stopped(k) for k in range(3))
    assert gate.request(1, 45.0, 101.0) == BLOCKED
    assert gate.request(2, 99.0, 101.0) == BLOCKED
    assert list(gate.target) == [40.0, 45.0, 50.0]
    assert list(gate.status) == [ESTOP, ESTOP, ESTOP | CLAMP]
    assert gate.tick(102.0) == 0
    assert list(gate.applied) == [0.0] * 3

    gate.set_system_stop(False, 103.0)
    assert list(gate.status) == [RAMP, RAMP, CLAMP | RAMP]
    assert list(gate.applied) == [0.0] * 3
    gate.tick(103.5)
    assert list(gate.applied) == [20.0] * 3
    gate.tick(105.0)
    assert list(gate.applied) == [23.0] * 3


def test_blocked_request_with_a_bad_value_is_rejected(gate_impl: ModuleType) -> None:
    gate = make(gate_impl)
    gate.set_pump_stop(0, True, 0.0)
    assert gate.request(0, math.nan, 0.0) == REJECTED
    assert gate.status[0] == ESTOP | REJECT
    assert gate.request(0, 30.0, 0.0) == BLOCKED
    assert gate.status[0] == ESTOP
    assert gate.last_outcome[0] == BLOCKED


def test_station_stop_covers_its_station_only(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 4, stations=[0, 1, 1, 2])
    gate.set_station_stop(1, True, 100.0)

    assert list(gate.applied) == [40.0, 0.0, 0.0, 40.0]
    assert [gate.is_stopped(k) for k in range(4)] == [False, True, True, False]
    assert list(gate.status) == [0, ESTOP, ESTOP, 0]
    assert gate.request(0, 30.0, 100.0) == ACCEPTED
    assert gate.request(1, 30.0, 100.0) == BLOCKED


def test_pump_stop_covers_its_pump_only(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 3)
    gate.set_pump_stop(1, True, 100.0)
    assert list(gate.applied) == [40.0, 0.0, 40.0]
    assert list(gate.status) == [0, ESTOP, 0]


def test_stop_levels_are_independent(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 4, stations=[0, 0, 1, 1])
    gate.set_system_stop(True, 100.0)
    gate.set_station_stop(0, True, 100.0)
    gate.set_pump_stop(3, True, 100.0)

    gate.set_system_stop(False, 101.0)
    assert [gate.is_stopped(k) for k in range(4)] == [True, True, False, True]
    gate.set_station_stop(0, False, 101.0)
    assert [gate.is_stopped(k) for k in range(4)] == [False, False, False, True]
    gate.set_pump_stop(3, False, 101.0)
    assert not any(gate.is_stopped(k) for k in range(4))
    gate.set_pump_stop(3, False, 101.0)
    assert list(gate.applied) == [0.0] * 4


def test_stop_with_a_bad_time_still_stops(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1, min_switch_interval=10.0)
    gate.set_system_stop(True, math.nan)
    assert gate.applied[0] == 0.0
    gate.set_system_stop(False, math.inf)

    gate.tick(109.0)
    assert gate.applied[0] == 0.0
    gate.tick(110.0)
    assert gate.applied[0] == 40.0


def test_stop_argument_errors(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2, stations=[0, 1])
    cases: list[tuple[Any, type[Exception], str]] = [
        (
            lambda: gate.set_station_stop(2, True, 0.0),
            IndexError,
            "station 2 out of range: the gate has 2 stations",
        ),
        (
            lambda: gate.set_station_stop(-1, True, 0.0),
            IndexError,
            "station -1 out of range: the gate has 2 stations",
        ),
        (
            lambda: gate.set_pump_stop(5, True, 0.0),
            IndexError,
            "pump 5 out of range: the gate has 2 pumps",
        ),
        (
            lambda: gate.set_pump_stop(2**70, True, 0.0),
            IndexError,
            f"pump {2**70} out of range: the gate has 2 pumps",
        ),
        (
            lambda: gate.set_pump_stop(True, 1, 0.0),
            TypeError,
            "expected an integer pump index, got bool",
        ),
        (
            lambda: gate.set_station_stop("0", True, 0.0),
            TypeError,
            "expected an integer station index, got str",
        ),
        (
            lambda: gate.set_system_stop(1, 0.0),
            TypeError,
            "expected a bool for active, got int",
        ),
        (
            lambda: gate.set_system_stop("false", 0.0),
            TypeError,
            "expected a bool for active, got str",
        ),
        (
            lambda: gate.set_pump_stop(0, None, 0.0),
            TypeError,
            "expected a bool for active, got NoneType",
        ),
        (
            lambda: gate.set_failsafe(3, True, 0.0),
            IndexError,
            "station 3 out of range: the gate has 2 stations",
        ),
        (
            lambda: gate.set_failsafe(0, 1.0, 0.0),
            TypeError,
            "expected a bool for active, got float",
        ),
        (
            lambda: gate.is_stopped(2),
            IndexError,
            "pump 2 out of range: the gate has 2 pumps",
        ),
        (
            lambda: gate.in_failsafe(2),
            IndexError,
            "station 2 out of range: the gate has 2 stations",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=starts(message) + "$"):
            call()
    assert not gate.is_stopped(0)
    assert list(gate.status) == [0, 0]


def test_numpy_bools_and_indices_are_accepted(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2, stations=[0, 1])
    gate.set_station_stop(np.int64(1), np.True_, 0.0)
    assert [gate.is_stopped(k) for k in range(2)] == [False, True]


# Failsafe


def test_failsafe(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 3, stations=[0, 0, 1])
    gate = _with_rate(gate_impl, gate, 2.0, stations=[0, 0, 1])
    gate.set_failsafe(0, True, 100.0)

    assert gate.in_failsafe(0) and not gate.in_failsafe(1)
    assert list(gate.target) == [30.0, 30.0, 40.0]
    assert list(gate.status) == [FAILSAFE | RAMP, FAILSAFE | RAMP, 0]
    gate.tick(101.0)
    assert list(gate.applied) == [38.0, 38.0, 40.0]

    assert gate.request(0, 45.0, 101.0) == ACCEPTED
    assert gate.request(1, 60.0, 101.0) == CLAMPED
    assert list(gate.target) == [45.0, 50.0, 40.0]
    gate.tick(110.0)
    assert list(gate.applied) == [30.0, 30.0, 40.0]
    assert list(gate.status) == [FAILSAFE, FAILSAFE | CLAMP, 0]

    gate.set_failsafe(0, True, 110.0)
    assert list(gate.target) == [45.0, 50.0, 40.0]

    gate.set_failsafe(0, False, 111.0)
    assert not gate.in_failsafe(0)
    assert list(gate.status) == [RAMP, CLAMP | RAMP, 0]
    gate.tick(112.0)
    assert list(gate.applied) == [34.0, 34.0, 40.0]


def test_leaving_failsafe_keeps_the_failsafe_target(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1)
    gate.set_failsafe(0, True, 100.0)
    gate.set_failsafe(0, False, 100.0)
    assert gate.target[0] == 30.0
    gate.set_failsafe(0, False, 100.0)
    assert gate.status[0] == RAMP


def test_failsafe_may_stop_the_pump(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1, failsafe_value=0.0)
    gate.set_failsafe(0, True, 100.0)
    gate.tick(200.0)
    assert gate.applied[0] == 0.0


def test_emergency_stop_overrides_failsafe(gate_impl: ModuleType) -> None:
    gate = running(gate_impl, 1)
    gate.set_failsafe(0, True, 100.0)
    gate.set_station_stop(0, True, 100.0)
    assert gate.status[0] == ESTOP | FAILSAFE
    assert gate.applied[0] == 0.0
    gate.tick(200.0)
    assert gate.applied[0] == 0.0

    gate.set_station_stop(0, False, 200.0)
    assert gate.status[0] == FAILSAFE | RAMP
    gate.tick(201.0)
    gate.tick(202.0)
    assert gate.applied[0] == 30.0


# Restore


def test_restore(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2)
    gate.restore(0, 42.0, 35.0)
    gate.restore(1, 45.0, 45.0)

    assert list(gate.target) == [42.0, 45.0]
    assert list(gate.applied) == [35.0, 45.0]
    assert list(gate.status) == [RAMP, 0]
    gate.tick(1.0)
    assert list(gate.applied) == [37.0, 45.0]


@pytest.mark.parametrize(
    ("target", "applied", "expected"),
    [
        (70.0, 70.0, (50.0, 50.0)),
        (-3.0, 10.0, (20.0, 20.0)),
        (0.0, 0.0, (0.0, 0.0)),
        (np.float32(25), 21, (25.0, 21.0)),
    ],
)
def test_restore_clamps(
    gate_impl: ModuleType, target: Any, applied: Any, expected: tuple[float, float]
) -> None:
    gate = make(gate_impl)
    gate.restore(0, target, applied)
    assert (gate.target[0], gate.applied[0]) == expected


def test_restore_stop_without_allow_stop(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, allow_stop=False)
    gate.restore(0, 0.0, 0.0)
    assert (gate.target[0], gate.applied[0]) == (20.0, 0.0)


def test_restore_under_an_emergency_stop(gate_impl: ModuleType) -> None:
    gate = make(gate_impl)
    gate.set_system_stop(True, 0.0)
    gate.restore(0, 40.0, 40.0)
    assert (gate.target[0], gate.applied[0]) == (40.0, 0.0)
    assert gate.status[0] == ESTOP


def test_restore_errors(gate_impl: ModuleType) -> None:
    gate = make(gate_impl, 2)
    with pytest.raises(
        ValueError, match=exact("pump 1: expected a finite target, got nan")
    ):
        gate.restore(1, math.nan, 30.0)
    with pytest.raises(
        ValueError, match=exact("pump 1: expected a finite applied, got inf")
    ):
        gate.restore(1, 30.0, math.inf)
    with pytest.raises(
        TypeError, match=starts("pump 0: expected a real number for target")
    ):
        gate.restore(0, "30", 30.0)
    with pytest.raises(
        TypeError, match=starts("pump 0: expected a real number for applied")
    ):
        gate.restore(0, 30.0, None)
    with pytest.raises(IndexError, match=starts("pump 2 out of range")):
        gate.restore(2, 30.0, 30.0)
    assert list(gate.target) == [0.0, 0.0]
    assert list(gate.applied) == [0.0, 0.0]


def _with_rate(
    gate_impl: ModuleType, gate: Any, rate: float, stations: Any = None
) -> Any:
    """A gate like ``gate`` (all pumps at the same point) with ``max_rate``."""
    n = gate.n_pumps
    slower = gate_impl.Gate(
        [limits(gate_impl, f"P{k}", max_rate=rate) for k in range(n)],
        stations,
        gate.last_tick,
    )
    for k in range(n):
        slower.restore(k, gate.target[k], gate.applied[k])
    return slower
