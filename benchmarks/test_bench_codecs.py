"""Register codecs: the compiled module beside its pure-Python reference.

Each group holds one operation measured on both implementations in the
same run, so the ratio holds on a noisy machine:

    .venv/bin/pytest benchmarks/test_bench_codecs.py --benchmark-only \
        --benchmark-group-by=group
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import calejo_core.codecs as compiled
import calejo_core.reference.codecs as reference

IMPLEMENTATIONS = [
    pytest.param(compiled, id="compiled"),
    pytest.param(reference, id="reference"),
]
ARRAY_LENGTH = 10_000


def setpoints(n: int) -> np.ndarray:
    """Pump speeds in Hz, as an optimizer would send them."""
    return np.random.default_rng(7).uniform(0.0, 60.0, n)


@pytest.mark.benchmark(group="encode_array float32 x 10,000")
@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_encode_array_float32(benchmark: BenchmarkFixture, module: ModuleType) -> None:
    values = setpoints(ARRAY_LENGTH)
    out = np.zeros(2 * ARRAY_LENGTH, dtype=np.uint16)

    result = benchmark(module.encode_array, values, "float32", "CDAB", out=out)

    assert result is out
    assert out[1] == module.encode(float(values[0]), "float32", "CDAB")[1]


@pytest.mark.benchmark(group="encode_array uint16 x10 x 10,000")
@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_encode_array_scaled_uint16(
    benchmark: BenchmarkFixture, module: ModuleType
) -> None:
    values = setpoints(ARRAY_LENGTH)
    out = np.zeros(ARRAY_LENGTH, dtype=np.uint16)

    benchmark(module.encode_array, values, "uint16", "ABCD", 10.0, out=out)

    assert out[0] == round(values[0] * 10.0)


@pytest.mark.benchmark(group="encode one float32")
@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_encode_scalar(benchmark: BenchmarkFixture, module: ModuleType) -> None:
    registers = benchmark(module.encode, 42.5, "float32")

    assert registers == (0x422A, 0x0000)


@pytest.mark.benchmark(group="decode one float32")
@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_decode_scalar(benchmark: BenchmarkFixture, module: ModuleType) -> None:
    value = benchmark(module.decode, (0x422A, 0x0000), "float32")

    assert value == 42.5


@pytest.mark.benchmark(group="update_pumps, one station of 8 pumps")
@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_update_pumps_station(benchmark: BenchmarkFixture, module: ModuleType) -> None:
    image = module.StationImage(8)
    applied = setpoints(8)
    status = np.zeros(8, dtype=np.uint16)

    benchmark(image.update_pumps, applied, status)

    assert image.read(101, "float32") == np.float32(applied[0])
