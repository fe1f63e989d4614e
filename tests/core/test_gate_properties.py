"""Properties of the safety gate over random sequences of operations.

The compiled gate and the reference run the same random sequences of
requests, ticks, emergency stops, clears, failsafe changes and restores
over several stations; after every step they must agree, and both must
hold the gate's invariants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.conftest import load

compiled = load("gate", "compiled")
reference = load("gate", "reference")

ESTOP, FAILSAFE = 1, 2
REJECTED = 2
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _limits(
    low: float,
    width: float,
    rate: float,
    stop_kind: int,
    allow_stop: bool,
    fraction: float,
    failsafe_is_stop: bool,
    interval: float,
) -> dict[str, Any]:
    """Keyword arguments of a consistent PumpLimits."""
    high = low + width
    stop = (0.0, low, high, low - 10.0, high + 10.0, low + width / 2)[stop_kind]
    failsafe = stop if allow_stop and failsafe_is_stop else low + fraction * width
    return {
        "min_value": low,
        "max_value": high,
        "max_rate": rate,
        "failsafe_value": failsafe,
        "stop_value": stop,
        "allow_stop": allow_stop,
        "min_switch_interval": interval,
    }


PUMP_LIMITS = st.builds(
    _limits,
    low=st.sampled_from([0.0, 20.0, -5.0]) | st.floats(-100, 100),
    width=st.sampled_from([0.0, 30.0]) | st.floats(0, 100),
    rate=st.sampled_from([0.5, 2.0, math.inf]) | st.floats(0.01, 1000),
    stop_kind=st.integers(0, 5),
    allow_stop=st.booleans(),
    fraction=st.sampled_from([0.0, 1.0]) | st.floats(0, 1),
    failsafe_is_stop=st.booleans(),
    interval=st.sampled_from([0.0, 0.0, 0.5, 3.0]),
)

ODD_VALUES = [math.nan, math.inf, -math.inf, 1e308, -1e308, "40", None, True]
ODD_VALUES += [-0.0]
MAX_PUMPS = 6
N_STATIONS = 3

# A value is drawn as a number, an odd value, or ("point", i): the i-th of
# the pumps' limits and stop values, resolved once the pumps are known.
POINT = st.tuples(st.just("point"), st.integers(0, 3 * MAX_PUMPS - 1))
VALUE = st.floats(-200, 200) | st.integers(-300, 300) | st.sampled_from(ODD_VALUES)
VALUE = VALUE | POINT
FINITE = st.floats(-200, 200) | POINT
RAW = st.integers(0, 1000)
OPERATION = st.one_of(
    st.tuples(st.just("request"), RAW, VALUE),
    st.tuples(st.just("many"), st.lists(st.tuples(RAW, VALUE), max_size=8)),
    st.tuples(st.just("all"), st.lists(VALUE, min_size=MAX_PUMPS, max_size=MAX_PUMPS)),
    st.tuples(st.just("tick"), st.sampled_from([0.0, -1.0]) | st.floats(0, 5)),
    st.tuples(st.just("tick"), st.floats(0.01, 2)),
    st.tuples(st.just("system"), st.booleans()),
    st.tuples(st.just("station"), RAW, st.booleans()),
    st.tuples(st.just("pump"), RAW, st.booleans()),
    st.tuples(st.just("failsafe"), RAW, st.booleans()),
    st.tuples(st.just("restore"), RAW, FINITE, FINITE),
)
SCENARIO = st.tuples(
    st.lists(PUMP_LIMITS, min_size=1, max_size=MAX_PUMPS),
    st.lists(st.integers(0, N_STATIONS - 1), min_size=MAX_PUMPS, max_size=MAX_PUMPS),
    st.lists(OPERATION, min_size=1, max_size=30),
)

Scenario = tuple[list[dict[str, Any]], list[int], list[tuple[Any, ...]]]


def resolve(drawn: tuple[Any, Any, Any]) -> Scenario:
    """Turn raw draws into pumps, their stations and concrete operations."""
    limits, stations, raw_operations = drawn
    n = len(limits)
    points = [
        pump[name]
        for pump in limits
        for name in ("min_value", "max_value", "stop_value")
    ]

    def value(drawn_value: Any) -> Any:
        if isinstance(drawn_value, tuple):
            return points[drawn_value[1] % len(points)]
        return drawn_value

    operations: list[tuple[Any, ...]] = []
    for kind, *args in raw_operations:
        if kind == "request":
            operations.append((kind, args[0] % (n + 2) - 1, value(args[1])))
        elif kind == "many":
            pairs = [(raw % (n + 2) - 1, value(v)) for raw, v in args[0]]
            operations.append((kind, pairs))
        elif kind == "all":
            operations.append((kind, [value(v) for v in args[0][:n]]))
        elif kind in ("station", "failsafe"):
            operations.append((kind, args[0] % N_STATIONS, args[1]))
        elif kind == "pump":
            operations.append((kind, args[0] % n, args[1]))
        elif kind == "restore":
            operations.append((kind, args[0] % n, value(args[1]), value(args[2])))
        else:
            operations.append((kind, *args))
    return limits, stations[:n], operations


def as_float64(values: list[Any]) -> np.ndarray[Any, Any]:
    """The values as a float64 array; a non-number becomes NaN."""
    numbers = [
        v if isinstance(v, float | int) and not isinstance(v, bool) else math.nan
        for v in values
    ]
    return np.array(numbers, dtype=np.float64)


@dataclass
class Model:
    """What the test knows of the latched flags, to check the gate's."""

    stations: list[int]
    system: bool = False
    station_stop: dict[int, bool] = field(default_factory=dict)
    pump_stop: dict[int, bool] = field(default_factory=dict)
    failsafe: dict[int, bool] = field(default_factory=dict)

    def covered(self, pump: int) -> bool:
        station = self.stations[pump]
        return (
            self.system
            or self.station_stop.get(station, False)
            or self.pump_stop.get(pump, False)
        )


def apply(gate: Any, operation: tuple[Any, ...], now: float) -> Any:
    """Run one operation on ``gate``; return what it returns."""
    kind, *args = operation
    if kind == "request":
        return gate.request(args[0], args[1], now)
    if kind == "many":
        pumps = np.array([p for p, _ in args[0]], dtype=np.intp)
        values = as_float64([v for _, v in args[0]])
        return gate.request_many(pumps, values, now).tolist()
    if kind == "all":
        return gate.request_all(as_float64(args[0]), now).tolist()
    if kind == "tick":
        return gate.tick(now)
    if kind == "system":
        return gate.set_system_stop(args[0], now)
    if kind == "station":
        return gate.set_station_stop(args[0], args[1], now)
    if kind == "pump":
        return gate.set_pump_stop(args[0], args[1], now)
    if kind == "failsafe":
        return gate.set_failsafe(args[0], args[1], now)
    return gate.restore(args[0], args[1], args[2])


def update(model: Model, operation: tuple[Any, ...]) -> None:
    kind, *args = operation
    if kind == "system":
        model.system = args[0]
    elif kind == "station":
        model.station_stop[args[0]] = args[1]
    elif kind == "pump":
        model.pump_stop[args[0]] = args[1]
    elif kind == "failsafe":
        model.failsafe[args[0]] = args[1]


def build(module: Any, limits: list[dict[str, Any]], stations: list[int]) -> Any:
    pumps = [module.PumpLimits(**kw, pump_id=f"P{k}") for k, kw in enumerate(limits)]
    return module.Gate(pumps, stations, 0.0, n_stations=N_STATIONS)


def check_invariants(
    gate: Any,
    limits: list[dict[str, Any]],
    model: Model,
) -> None:
    applied = gate.applied.tolist()
    status = gate.status.tolist()
    for pump, (value, bits, kw) in enumerate(zip(applied, status, limits, strict=True)):
        low, high, stop = kw["min_value"], kw["max_value"], kw["stop_value"]
        assert low <= value <= high or value == stop, (pump, value)
        covered = model.covered(pump)
        assert bool(bits & ESTOP) == covered, (pump, bits)
        assert gate.is_stopped(pump) == covered
        if covered:
            assert value == stop, (pump, value)
        in_failsafe = model.failsafe.get(model.stations[pump], False)
        assert bool(bits & FAILSAFE) == in_failsafe, (pump, bits)


def check_ramp(
    before: list[float], after: list[float], limits: list[dict[str, Any]], dt: float
) -> None:
    """Between two ticks no value moves faster than its max_rate, except for
    the step across the band between stop_value and the nearest limit."""
    for pump, (old, new, kw) in enumerate(zip(before, after, limits, strict=True)):
        if dt <= 0.0:
            assert new == old, (pump, old, new)
            continue
        low, high, stop = kw["min_value"], kw["max_value"], kw["stop_value"]
        step = kw["max_rate"] * dt
        slack = step * 1e-12 + 1e-9
        if abs(new - old) <= step + slack:
            continue
        outside = stop < low or stop > high
        edge = low if stop < low else high
        assert outside, (pump, old, new, step)
        if old == stop:
            assert new == edge, (pump, old, new)
        else:
            assert new == stop and abs(old - edge) <= step + slack, (pump, old, new)


def assert_same(first: Any, second: Any) -> None:
    assert first.target.tolist() == second.target.tolist()
    np.testing.assert_allclose(first.applied, second.applied, rtol=0, atol=1e-9)
    assert first.status.tolist() == second.status.tolist()
    assert first.last_outcome.tolist() == second.last_outcome.tolist()
    assert first.last_tick == second.last_tick


@SETTINGS
@given(SCENARIO)
def test_compiled_agrees_with_reference(drawn: tuple[Any, Any, Any]) -> None:
    limits, stations, operations = resolve(drawn)
    fast = build(compiled, limits, stations)
    plain = build(reference, limits, stations)
    now = 0.0

    for operation in operations:
        if operation[0] == "tick":
            now += operation[1]
        assert apply(fast, operation, now) == apply(plain, operation, now), operation
        assert_same(fast, plain)


@SETTINGS
@given(SCENARIO, st.sampled_from(["compiled", "reference"]))
def test_invariants(drawn: tuple[Any, Any, Any], kind: str) -> None:
    limits, stations, operations = resolve(drawn)
    gate = build(compiled if kind == "compiled" else reference, limits, stations)
    model = Model(stations)
    now = 0.0

    for operation in operations:
        target = gate.target.tolist()
        applied = gate.applied.tolist()
        last_tick = gate.last_tick
        if operation[0] == "tick":
            now += operation[1]

        result = apply(gate, operation, now)
        update(model, operation)

        check_invariants(gate, limits, model)
        if operation[0] == "tick":
            check_ramp(applied, gate.applied.tolist(), limits, now - last_tick)
        if operation[0] == "request" and result == REJECTED:
            assert gate.target.tolist() == target
        if operation[0] in ("many", "all"):
            pumps = (
                [p for p, _ in operation[1]]
                if operation[0] == "many"
                else list(range(len(limits)))
            )
            touched = {p for p, o in zip(pumps, result, strict=True) if o != REJECTED}
            for pump, (old, new) in enumerate(
                zip(target, gate.target.tolist(), strict=True)
            ):
                if pump not in touched:
                    assert new == old, (pump, old, new)


@SETTINGS
@given(
    st.lists(PUMP_LIMITS, min_size=1, max_size=4),
    st.lists(
        st.sampled_from(ODD_VALUES[:3] + ODD_VALUES[5:8])
        | st.just("x")
        | st.just(b"1")
        | st.just(object()),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["compiled", "reference"]),
)
def test_bad_values_never_change_the_target(
    limits: list[dict[str, Any]], values: list[Any], kind: str
) -> None:
    module = compiled if kind == "compiled" else reference
    gate = build(module, limits, [0] * len(limits))
    gate.request_all(np.linspace(-50.0, 50.0, len(limits)), 0.0)
    target = gate.target.tolist()

    for index, value in enumerate(values):
        pump = index % len(limits)
        assert gate.request(pump, value, 0.0) == REJECTED
        assert gate.status[pump] & 16

    assert gate.target.tolist() == target
    nans = np.full(len(limits), math.nan)
    assert gate.request_all(nans, 0.0).tolist() == [REJECTED] * len(limits)
    assert gate.target.tolist() == target


@SETTINGS
@given(
    st.integers(1, 8).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 2), min_size=n, max_size=n),
            st.sampled_from(["system", "station", "pump"]),
            st.integers(0, n - 1),
        )
    ),
    st.sampled_from(["compiled", "reference"]),
)
def test_an_emergency_stop_covers_exactly_its_pumps(
    case: tuple[list[int], str, int], kind: str
) -> None:
    stations, level, which = case
    n = len(stations)
    module = compiled if kind == "compiled" else reference
    gate = module.Gate(
        [module.PumpLimits(20, 50, math.inf, 30) for _ in range(n)],
        stations,
        n_stations=3,
    )
    gate.request_all(np.full(n, 40.0), 0.0)
    gate.tick(1.0)

    if level == "system":
        gate.set_system_stop(True, 2.0)
        expected = [True] * n
    elif level == "station":
        gate.set_station_stop(stations[which], True, 2.0)
        expected = [s == stations[which] for s in stations]
    else:
        gate.set_pump_stop(which, True, 2.0)
        expected = [k == which for k in range(n)]

    assert [gate.is_stopped(k) for k in range(n)] == expected
    assert [bool(s & ESTOP) for s in gate.status.tolist()] == expected
    assert gate.applied.tolist() == [0.0 if e else 40.0 for e in expected]
    outcomes = gate.request_all(np.full(n, 45.0), 2.0).tolist()
    assert outcomes == [3 if e else 0 for e in expected]
