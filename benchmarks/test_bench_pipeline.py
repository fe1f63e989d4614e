"""Gate + ramp + encode: a new setpoint for every pump, one tick, registers.

One round is the engine's hot path for a batch of setpoints:
``gate.request_all(values, now)``, ``gate.tick(now)``, then the applied
values and status bits go into the station images. Each size (1, 100,
10,000 and 1,000,000 pumps) is measured for the compiled core beside two
baselines, in the same run and the same group:

- ``reference``: the pure-Python reference of the same three steps
  (:mod:`calejo_core.reference`), up to 10,000 pumps; at some microseconds
  per pump one round at 1,000,000 would take seconds;
- ``numpy``: the same rules written as whole-array NumPy expressions
  (:class:`NumpyPipeline`), the naive way to do it without a compiled
  core, at every size.

Run::

    .venv/bin/pytest benchmarks/test_bench_pipeline.py --benchmark-only \\
        --benchmark-group-by=group -p no:randomly

A station image holds at most ``MAX_PUMPS`` (90) pumps, because the pump
blocks (100 + 10 k) end where the feedback blocks (1000) start, so there is
no "one big image". The pumps are split over full stations of 90 and
written with an ``ImageSet``, which updates every image in one C loop: the
way the engine writes all of its stations in one call. At 1,000,000 pumps
that is 11,112 images (about 70 MB).

``extra_info["ns_per_pump"]`` is the fastest round divided by the number of
pumps; the compiled rows also carry ``x_reference`` and ``x_numpy``, how
many times faster their fastest round is than each baseline's (the
baselines run first). The target is at most 5 ns per pump at 10,000
pumps. The encode step is also measured alone, at 10,000 pumps, so the
share of each step is visible.

The single-setpoint path is measured too: one ``gate.request(pump, value,
now)`` per call, as the engine makes for each setpoint that arrives, beside
the same call on the reference (target: at most 60 ns and at least 10
times the reference; ``x_reference`` on the compiled row).
pytest-benchmark's own loop adds a few tens of nanoseconds to every call it
times, so the group also holds the floor: the same loop calling
``dict.get`` with three arguments, a C call that does next to nothing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import calejo_core.codecs as codecs
import calejo_core.gate as gate
import calejo_core.reference.codecs as reference_codecs
import calejo_core.reference.gate as reference_gate

IMPLEMENTATIONS = {
    "reference": (reference_gate, reference_codecs),
    "compiled": (gate, codecs),
}
# Baselines first: each compiled row divides by what they measured.
KINDS = ("reference", "numpy", "compiled")
SIZES = (1, 100, 10_000, 1_000_000)
REFERENCE_LIMIT = 10_000

# Speeds in Hz: the limits a wastewater pump on a frequency drive has.
MIN_VALUE = 20.0
MAX_VALUE = 50.0
MAX_RATE = 2.0
FAILSAFE_VALUE = 30.0
STOP_VALUE = 0.0
TICK = 0.1

# Fastest round of each baseline, by group.
_baselines: dict[tuple[str, str], float] = {}


class NumpyPipeline:
    """The gate, the ramp and the pump registers as whole-array NumPy code.

    The same rules as the gate for every pump (stop requests, clamping,
    emergency stop and failsafe goals, the start step from ``stop_value``
    to ``min_value``, the stop step below ``min_value``, anti-cycling) and
    the same four registers per pump, written into one array of station
    images; no compiled code of the project.
    """

    def __init__(self, n_pumps: int) -> None:
        per_station = codecs.MAX_PUMPS
        size = codecs.FEEDBACK_BASE + codecs.FEEDBACK_STRIDE * per_station
        n_stations = -(-n_pumps // per_station)
        pumps = np.arange(n_pumps)
        self.min_value = np.full(n_pumps, MIN_VALUE)
        self.max_value = np.full(n_pumps, MAX_VALUE)
        self.max_rate = np.full(n_pumps, MAX_RATE)
        self.failsafe_value = np.full(n_pumps, FAILSAFE_VALUE)
        self.stop_value = np.full(n_pumps, STOP_VALUE)
        self.allow_stop = np.ones(n_pumps, dtype=bool)
        self.min_switch_interval = np.zeros(n_pumps)
        self.target = self.stop_value.copy()
        self.applied = self.stop_value.copy()
        self.stopped_at = np.full(n_pumps, -np.inf)
        self.status = np.zeros(n_pumps, dtype=np.uint16)
        self.outcome = np.zeros(n_pumps, dtype=np.uint8)
        self.last_tick = 0.0
        self.registers = np.zeros((n_stations, size), dtype=np.uint16)
        self.flat = self.registers.reshape(-1)
        self.block = (
            (pumps // per_station) * size
            + codecs.PUMP_BASE
            + codecs.PUMP_STRIDE * (pumps % per_station)
        )

    def goal(self) -> npt.NDArray[np.float64]:
        stopped = (self.status & gate.STATUS_EMERGENCY_STOP) != 0
        failsafe = (self.status & gate.STATUS_FAILSAFE) != 0
        return np.where(
            stopped,
            self.stop_value,
            np.where(failsafe, self.failsafe_value, self.target),
        )

    def request_all(self, values: npt.NDArray[np.float64], now: float) -> None:
        finite = np.isfinite(values)
        stop = self.allow_stop & (values == self.stop_value)
        clamped = (
            finite & ~stop & ((values < self.min_value) | (values > self.max_value))
        )
        wanted = np.where(
            stop, self.stop_value, np.clip(values, self.min_value, self.max_value)
        )
        self.target = np.where(finite, wanted, self.target)
        covered = (self.status & gate.STATUS_EMERGENCY_STOP) != 0
        self.outcome = np.select(
            [~finite, covered, clamped],
            [gate.REJECTED, gate.BLOCKED, gate.CLAMPED],
            gate.ACCEPTED,
        ).astype(np.uint8)
        status = self.status & ~np.uint16(gate.STATUS_CLAMPED | gate.STATUS_REJECTED)
        status |= np.where(clamped, gate.STATUS_CLAMPED, 0).astype(np.uint16)
        status |= np.where(~finite, gate.STATUS_REJECTED, 0).astype(np.uint16)
        self.status = self.ramping_bits(status)

    def ramping_bits(self, status: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint16]:
        ramping = self.applied != self.goal()
        status = status & ~np.uint16(gate.STATUS_RAMPING)
        return status | np.where(ramping, gate.STATUS_RAMPING, 0).astype(np.uint16)

    def tick(self, now: float) -> None:
        elapsed = now - self.last_tick
        self.last_tick = now
        step = self.max_rate * elapsed
        goal = self.goal()
        applied = self.applied
        stop = self.stop_value
        low, high = self.min_value, self.max_value
        outside = (stop < low) | (stop > high)
        edge = np.where(stop < low, low, high)

        gap = goal - applied
        ramped = np.where(np.abs(gap) <= step, goal, applied + np.copysign(step, gap))
        to_edge = edge - applied
        toward_edge = np.where(
            np.abs(to_edge) <= step, edge, applied + np.copysign(step, to_edge)
        )
        stopping = np.where(toward_edge == edge, stop, toward_edge)
        at_stop = applied == stop
        held = now < self.stopped_at + self.min_switch_interval
        starting = np.where(
            held,
            applied,
            np.where(outside & (self.max_rate != np.inf), edge, ramped),
        )
        after = np.where(
            applied == goal,
            applied,
            np.where(
                at_stop,
                starting,
                np.where((goal == stop) & outside, stopping, ramped),
            ),
        )
        self.stopped_at = np.where(
            (after == stop) & (applied != after), now, self.stopped_at
        )
        self.applied = after
        self.status = self.ramping_bits(self.status)

    def update_pumps(self) -> None:
        tenths = self.applied * 10.0
        if not np.all((tenths > -0.5) & (tenths < 65535.5)):
            raise ValueError("an applied value x 10 does not fit uint16")
        whole = np.trunc(tenths)
        whole += tenths - whole >= 0.5
        words = self.applied.astype(np.float32).view(np.uint32)
        flat, block = self.flat, self.block
        flat[block + codecs.PUMP_APPLIED_X10] = whole.astype(np.uint16)
        flat[block + codecs.PUMP_APPLIED_FLOAT] = (words >> 16).astype(np.uint16)
        flat[block + codecs.PUMP_APPLIED_FLOAT + 1] = (words & 0xFFFF).astype(np.uint16)
        flat[block + codecs.PUMP_STATUS] = self.status


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


def record_ratios(
    benchmark: BenchmarkFixture, kind: str, per_unit: str, units: int
) -> None:
    """ns per unit; a baseline's fastest round, or the compiled row's ratios."""
    assert benchmark.stats is not None
    fastest = benchmark.stats.stats.min
    benchmark.extra_info[per_unit] = round(fastest * 1e9 / units, 2)
    if kind != "compiled":
        _baselines[(benchmark.group, kind)] = fastest
        return
    for baseline in ("reference", "numpy"):
        theirs = _baselines.get((benchmark.group, baseline))
        if theirs is not None:
            benchmark.extra_info[f"x_{baseline}"] = round(theirs / fastest, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_pumps", SIZES)
def test_gate_ramp_encode(benchmark: BenchmarkFixture, n_pumps: int, kind: str) -> None:
    if kind == "reference" and n_pumps > REFERENCE_LIMIT:
        pytest.skip("the pure-Python reference takes seconds per round here")
    rng = np.random.default_rng(11)
    batches = [rng.uniform(MIN_VALUE, MAX_VALUE, n_pumps) for _ in range(2)]
    clock = {"now": 0.0, "round": 0}
    benchmark.group = f"gate + ramp + encode, {n_pumps:,} pumps per call"

    if kind == "numpy":
        check_numpy_baseline()
        naive = NumpyPipeline(n_pumps)

        def naive_round() -> None:
            clock["now"] += TICK
            clock["round"] += 1
            now = clock["now"]
            naive.request_all(batches[clock["round"] % 2], now)
            naive.tick(now)
            naive.update_pumps()

        benchmark(naive_round)
        record_ratios(benchmark, kind, "ns_per_pump", n_pumps)
        assert naive.flat[naive.block[-1]] == int(naive.applied[-1] * 10.0 + 0.5)
        assert MIN_VALUE <= naive.applied[-1] <= MAX_VALUE
        return

    gate_module, codecs_module = IMPLEMENTATIONS[kind]
    the_gate, images = build(gate_module, codecs_module, n_pumps)

    def one_round() -> None:
        clock["now"] += TICK
        clock["round"] += 1
        now = clock["now"]
        the_gate.request_all(batches[clock["round"] % 2], now)
        the_gate.tick(now)
        images.update_pumps(the_gate.applied, the_gate.status)

    benchmark(one_round)
    record_ratios(benchmark, kind, "ns_per_pump", n_pumps)
    benchmark.extra_info["pumps"] = n_pumps

    last = images.images[-1]
    applied = the_gate.applied[-1]
    base = codecs_module.PUMP_BASE + codecs_module.PUMP_STRIDE * (last.n_pumps - 1)
    assert last.registers[base] == int(applied * 10.0 + 0.5)
    assert MIN_VALUE <= applied <= MAX_VALUE


def check_numpy_baseline() -> None:
    """The naive NumPy rounds compute what the compiled gate computes, on
    values that clamp and stop too."""
    n_pumps = 500
    the_gate, images = build(gate, codecs, n_pumps)
    naive = NumpyPipeline(n_pumps)
    rng = np.random.default_rng(5)
    now = 0.0
    for _ in range(60):
        now += TICK
        values = rng.uniform(MIN_VALUE - 5.0, MAX_VALUE + 5.0, n_pumps)
        values[rng.integers(0, n_pumps, 50)] = STOP_VALUE
        the_gate.request_all(values, now)
        naive.request_all(values, now)
        the_gate.tick(now)
        naive.tick(now)
        images.update_pumps(the_gate.applied, the_gate.status)
        naive.update_pumps()

    assert np.array_equal(naive.target, the_gate.target)
    assert np.array_equal(naive.applied, the_gate.applied)
    assert np.array_equal(naive.status, the_gate.status)
    for index, image in enumerate(images.images):
        for offset in range(4):
            field = slice(codecs.PUMP_BASE + offset, 1000, codecs.PUMP_STRIDE)
            ours = image.registers[field][: image.n_pumps]
            theirs = naive.registers[index, field][: image.n_pumps]
            assert np.array_equal(ours, theirs), (index, offset)


@pytest.mark.parametrize("kind", ["reference", "compiled"])
def test_encode_step(benchmark: BenchmarkFixture, kind: str) -> None:
    n_pumps = 10_000
    gate_module, codecs_module = IMPLEMENTATIONS[kind]
    the_gate, images = build(gate_module, codecs_module, n_pumps)
    the_gate.request_all(np.full(n_pumps, 42.0), 0.0)
    the_gate.tick(1.0)
    the_gate.tick(100.0)
    applied, status = the_gate.applied, the_gate.status

    benchmark.group = f"encode step alone, {n_pumps:,} pumps per call"
    benchmark(images.update_pumps, applied, status)

    record_ratios(benchmark, kind, "ns_per_pump", n_pumps)
    assert images.images[0].registers[codecs_module.PUMP_BASE] == 420


def test_gate_one_pump_call_floor(benchmark: BenchmarkFixture) -> None:
    empty: dict[int, float] = {}

    benchmark.group = "gate, one pump per call"
    found = benchmark(dict.get, empty, 1, 42.5)

    assert benchmark.stats is not None
    benchmark.extra_info["ns_per_call"] = round(benchmark.stats.stats.min * 1e9, 2)
    assert found == 42.5


@pytest.mark.parametrize("kind", ["reference", "compiled"])
def test_gate_one_pump(benchmark: BenchmarkFixture, kind: str) -> None:
    gate_module, _ = IMPLEMENTATIONS[kind]
    limits = gate_module.PumpLimits(MIN_VALUE, MAX_VALUE, MAX_RATE, FAILSAFE_VALUE)
    the_gate = gate_module.Gate([limits, limits], None, 0.0)

    benchmark.group = "gate, one pump per call"
    outcome = benchmark(the_gate.request, 1, 42.5, 1.0)

    record_ratios(benchmark, kind, "ns_per_call", 1)
    assert outcome == gate_module.ACCEPTED
    assert list(the_gate.target) == [0.0, 42.5]
    assert list(the_gate.applied) == [0.0, 0.0]
