"""Gate + ramp + encode: a new setpoint for every pump, one tick, registers.

One round is the engine's hot path for a batch of setpoints:
``gate.request_all(values, now)``, ``gate.tick(now)``, then the applied
values and status bits go into the station images. Each size is measured
for the compiled core beside the pure-Python reference of the same three
steps, in the same run:

    .venv/bin/pytest benchmarks/test_bench_pipeline.py --benchmark-only \
        --benchmark-group-by=group

A station image holds at most ``MAX_PUMPS`` (90) pumps, because the pump
blocks (100 + 10 k) end where the feedback blocks (1000) start, so there is
no "one big image". The pumps are split over full stations of 90 and
written with an ``ImageSet``, which updates every image in one C loop: the
way the engine writes all of its stations in one call. At 1,000,000 pumps
that is 11,112 images (about 70 MB). The reference is skipped at
1,000,000 pumps: at some microseconds per pump in Python one round would
take seconds. ``extra_info["ns_per_pump"]`` is the fastest round divided
by the number of pumps. The encode step is also measured alone, at
10,000 pumps, so the share of each step is visible.

The single-setpoint path is measured too: one ``gate.request(pump, value,
now)`` per call, as the engine makes for each setpoint that arrives, beside
the same call on the reference; ``extra_info["ns_per_call"]`` is its
fastest round. pytest-benchmark's own loop adds a few tens of nanoseconds to
every call it times, so the group also holds the floor: the same loop
calling ``dict.get`` with three arguments, a C call that does next to
nothing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import calejo_core.codecs as codecs
import calejo_core.gate as gate
import calejo_core.reference.codecs as reference_codecs
import calejo_core.reference.gate as reference_gate

IMPLEMENTATIONS = {
    "compiled": (gate, codecs),
    "reference": (reference_gate, reference_codecs),
}
SIZES = (1, 100, 10_000, 1_000_000)
REFERENCE_LIMIT = 10_000

# Speeds in Hz: the limits a wastewater pump on a frequency drive has.
MIN_VALUE = 20.0
MAX_VALUE = 50.0
MAX_RATE = 2.0
FAILSAFE_VALUE = 30.0
TICK = 0.1


def build(
    gate_module: ModuleType, codecs_module: ModuleType, n_pumps: int
) -> tuple[Any, Any]:
    """A gate over ``n_pumps`` and the images of their stations."""
    per_station = codecs_module.MAX_PUMPS
    limits = [
        gate_module.PumpLimits(MIN_VALUE, MAX_VALUE, MAX_RATE, FAILSAFE_VALUE)
    ] * n_pumps
    stations = np.arange(n_pumps, dtype=np.intp) // per_station
    the_gate = gate_module.Gate(limits, stations, 0.0)

    sizes = [per_station] * (n_pumps // per_station)
    if n_pumps % per_station:
        sizes.append(n_pumps % per_station)
    images = codecs_module.ImageSet(
        [codecs_module.StationImage(size) for size in sizes]
    )
    return the_gate, images


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("n_pumps", SIZES)
def test_gate_ramp_encode(
    benchmark: BenchmarkFixture, n_pumps: int, implementation: str
) -> None:
    if implementation == "reference" and n_pumps > REFERENCE_LIMIT:
        pytest.skip("the pure-Python reference takes seconds per round here")
    gate_module, codecs_module = IMPLEMENTATIONS[implementation]
    the_gate, images = build(gate_module, codecs_module, n_pumps)
    rng = np.random.default_rng(11)
    batches = [rng.uniform(MIN_VALUE, MAX_VALUE, n_pumps) for _ in range(2)]
    clock = {"now": 0.0, "round": 0}

    def one_round() -> None:
        clock["now"] += TICK
        clock["round"] += 1
        now = clock["now"]
        the_gate.request_all(batches[clock["round"] % 2], now)
        the_gate.tick(now)
        images.update_pumps(the_gate.applied, the_gate.status)

    benchmark.group = f"gate + ramp + encode, {n_pumps:,} pumps per call"
    benchmark(one_round)

    assert benchmark.stats is not None
    benchmark.extra_info["pumps"] = n_pumps
    benchmark.extra_info["ns_per_pump"] = round(
        benchmark.stats.stats.min * 1e9 / n_pumps, 2
    )
    last = images.images[-1]
    applied = the_gate.applied[-1]
    base = codecs_module.PUMP_BASE + codecs_module.PUMP_STRIDE * (last.n_pumps - 1)
    assert last.registers[base] == int(applied * 10.0 + 0.5)
    assert MIN_VALUE <= applied <= MAX_VALUE


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_encode_step(benchmark: BenchmarkFixture, implementation: str) -> None:
    n_pumps = 10_000
    gate_module, codecs_module = IMPLEMENTATIONS[implementation]
    the_gate, images = build(gate_module, codecs_module, n_pumps)
    the_gate.request_all(np.full(n_pumps, 42.0), 0.0)
    the_gate.tick(1.0)
    the_gate.tick(100.0)
    applied, status = the_gate.applied, the_gate.status

    benchmark.group = f"encode step alone, {n_pumps:,} pumps per call"
    benchmark(images.update_pumps, applied, status)

    assert benchmark.stats is not None
    benchmark.extra_info["ns_per_pump"] = round(
        benchmark.stats.stats.min * 1e9 / n_pumps, 2
    )
    assert images.images[0].registers[codecs_module.PUMP_BASE] == 420


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_gate_one_pump(benchmark: BenchmarkFixture, implementation: str) -> None:
    gate_module, _ = IMPLEMENTATIONS[implementation]
    limits = gate_module.PumpLimits(MIN_VALUE, MAX_VALUE, MAX_RATE, FAILSAFE_VALUE)
    the_gate = gate_module.Gate([limits, limits], None, 0.0)

    benchmark.group = "gate, one pump per call"
    outcome = benchmark(the_gate.request, 1, 42.5, 1.0)

    assert benchmark.stats is not None
    benchmark.extra_info["ns_per_call"] = round(benchmark.stats.stats.min * 1e9, 2)
    assert outcome == gate_module.ACCEPTED
    assert list(the_gate.target) == [0.0, 42.5]
    assert list(the_gate.applied) == [0.0, 0.0]


def test_gate_one_pump_call_floor(benchmark: BenchmarkFixture) -> None:
    empty: dict[int, float] = {}

    benchmark.group = "gate, one pump per call"
    found = benchmark(dict.get, empty, 1, 42.5)

    assert benchmark.stats is not None
    benchmark.extra_info["ns_per_call"] = round(benchmark.stats.stats.min * 1e9, 2)
    assert found == 42.5
