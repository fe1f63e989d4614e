"""The compiled gate over many pumps agrees with the reference, bit for bit.

The compiled gate handles the usual cases of ``request_all`` and ``tick``
eight pumps at a time and every other case pump by pump. These tests run
gates of 8 to 40 pumps, so that blocks of eight are mixed with pumps under
emergency stops and failsafe, starts and stops, anti-cycling, rejected and
clamped values, and check after every step that the compiled gate and the
pure-Python reference hold exactly the same targets, applied values,
status bits and outcomes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.conftest import load

compiled = load("gate", "compiled")
reference = load("gate", "reference")

N_STATIONS = 3
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Limits of a drive in Hz, a valve in % and odd ones: stop_value below,
# inside and above the limits, with and without allow_stop, ramps slow,
# fast and unlimited, with and without anti-cycling.
KINDS = [
    {"min_value": 20.0, "max_value": 50.0, "max_rate": 2.0, "failsafe_value": 35.0},
    {
        "min_value": 20.0,
        "max_value": 50.0,
        "max_rate": 7.5,
        "failsafe_value": 0.0,
        "min_switch_interval": 0.3,
    },
    {
        "min_value": 0.0,
        "max_value": 100.0,
        "max_rate": 40.0,
        "failsafe_value": 50.0,
        "min_switch_interval": 0.4,
    },
    {
        "min_value": 20.0,
        "max_value": 50.0,
        "max_rate": math.inf,
        "failsafe_value": 30.0,
        "allow_stop": False,
    },
    {
        "min_value": -5.0,
        "max_value": 5.0,
        "max_rate": 0.25,
        "failsafe_value": 1.0,
        "stop_value": 8.0,
    },
    {
        "min_value": 10.0,
        "max_value": 10.0,
        "max_rate": 1.0,
        "failsafe_value": 10.0,
        "stop_value": 10.0,
    },
]

VALUE = (
    st.floats(-20.0, 120.0)
    | st.sampled_from([0.0, -0.0, 8.0, 10.0, 20.0, 50.0, 100.0])
    | st.sampled_from([math.nan, math.inf, -math.inf])
)
OPERATION = st.one_of(
    st.tuples(st.just("all"), st.integers(0, 2**32 - 1), st.floats(0.0, 0.3)),
    st.tuples(st.just("tick"), st.sampled_from([0.0, -0.5]) | st.floats(0.01, 3.0)),
    st.tuples(st.just("tick"), st.floats(0.05, 0.5)),
    st.tuples(st.just("system"), st.booleans()),
    st.tuples(st.just("station"), st.integers(0, N_STATIONS - 1), st.booleans()),
    st.tuples(st.just("pump"), st.integers(0, 39), st.booleans()),
    st.tuples(st.just("failsafe"), st.integers(0, N_STATIONS - 1), st.booleans()),
    st.tuples(st.just("request"), st.integers(0, 39), VALUE),
)
SCENARIO = st.tuples(
    st.lists(st.integers(0, len(KINDS) - 1), min_size=8, max_size=40),
    st.lists(st.integers(0, N_STATIONS - 1), min_size=40, max_size=40),
    st.lists(OPERATION, min_size=1, max_size=40),
)


def values_for(kinds: list[int], seed: int, odd: float) -> np.ndarray[Any, Any]:
    """One value per pump around its limits; a share ``odd`` of them a stop
    value or a limit, and a quarter of that share NaN or infinity."""
    rng = np.random.default_rng(seed)
    values = np.empty(len(kinds))
    for pump, kind in enumerate(kinds):
        limits = KINDS[kind]
        low, high = limits["min_value"], limits["max_value"]
        values[pump] = rng.uniform(low - 10.0, high + 10.0)
        draw = rng.random()
        if draw < odd:
            choices = [limits.get("stop_value", 0.0), low, high]
            values[pump] = choices[rng.integers(len(choices))]
        elif draw < 1.25 * odd:
            values[pump] = (math.nan, math.inf, -math.inf)[rng.integers(3)]
    return values


def build(module: Any, kinds: list[int], stations: list[int]) -> Any:
    limits = [
        module.PumpLimits(**KINDS[kind], pump_id=f"P{pump}")
        for pump, kind in enumerate(kinds)
    ]
    return module.Gate(limits, stations, 0.0, n_stations=N_STATIONS)


def apply(gate: Any, operation: tuple[Any, ...], kinds: list[int], now: float) -> Any:
    kind, *args = operation
    n = len(kinds)
    if kind == "all":
        return gate.request_all(values_for(kinds, args[0], args[1]), now).tolist()
    if kind == "tick":
        return gate.tick(now)
    if kind == "system":
        return gate.set_system_stop(args[0], now)
    if kind == "station":
        return gate.set_station_stop(args[0], args[1], now)
    if kind == "pump":
        return gate.set_pump_stop(args[0] % n, args[1], now)
    if kind == "failsafe":
        return gate.set_failsafe(args[0], args[1], now)
    return gate.request(args[0] % n, args[1], now)


def assert_identical(first: Any, second: Any) -> None:
    for name in ("target", "applied"):
        ours = np.asarray(getattr(first, name))
        theirs = np.asarray(getattr(second, name))
        assert ours.tobytes() == theirs.tobytes(), (name, ours, theirs)
    assert first.status.tolist() == second.status.tolist()
    assert first.last_outcome.tolist() == second.last_outcome.tolist()
    assert first.last_tick == second.last_tick


@SETTINGS
@given(SCENARIO)
def test_many_pumps_agree_bit_for_bit(drawn: tuple[Any, Any, Any]) -> None:
    kinds, stations, operations = drawn
    stations = stations[: len(kinds)]
    ours = build(compiled, kinds, stations)
    theirs = build(reference, kinds, stations)
    now = 0.0

    for operation in operations:
        if operation[0] == "tick":
            now += operation[1]
        answer = apply(ours, operation, kinds, now)
        expected = apply(theirs, operation, kinds, now)
        assert answer == expected, operation
        assert_identical(ours, theirs)


def test_a_long_ramp_over_many_pumps_agrees() -> None:
    """Thousands of pumps through starts, ramps, stops, an emergency stop and
    failsafe, request_all and tick every step."""
    kinds = [pump % len(KINDS) for pump in range(2003)]
    stations = [pump % N_STATIONS for pump in range(len(kinds))]
    ours = build(compiled, kinds, stations)
    theirs = build(reference, kinds, stations)
    now = 0.0

    for step in range(60):
        now += 0.1 + 0.05 * (step % 3)
        if step == 20:
            for gate in (ours, theirs):
                gate.set_station_stop(1, True, now)
        if step == 30:
            for gate in (ours, theirs):
                gate.set_station_stop(1, False, now)
                gate.set_failsafe(2, True, now)
        if step == 45:
            for gate in (ours, theirs):
                gate.set_failsafe(2, False, now)
        if step % 4 == 0:
            values = values_for(kinds, step, 0.1 if step % 8 else 0.0)
            assert (
                ours.request_all(values, now).tolist()
                == theirs.request_all(values, now).tolist()
            )
        assert ours.tick(now) == theirs.tick(now)
        assert_identical(ours, theirs)
