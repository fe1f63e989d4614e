"""Properties of the codecs, held on random inputs (bounded hypothesis runs).

Round trips within range, out-of-range values that always raise and never
wrap, agreement with ``struct`` packing, and the compiled module agreeing
with the pure-Python reference value for value and message for message.
"""

from __future__ import annotations

import math
import struct
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calejo_core.codecs as compiled
import calejo_core.reference.codecs as reference

IMPLEMENTATIONS = [
    pytest.param(compiled, id="compiled"),
    pytest.param(reference, id="reference"),
]
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

DATA_TYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64")
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
INTEGER_RANGES = {
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
    "uint32": (0, 4294967295),
    "int32": (-2147483648, 2147483647),
}
STRUCT_FORMATS = {
    "uint16": "H",
    "int16": "h",
    "uint32": "I",
    "int32": "i",
    "float32": "f",
    "float64": "d",
}

dtypes = st.sampled_from(DATA_TYPES)
orders = st.sampled_from(WORD_ORDERS)
any_floats = st.floats(allow_nan=True, allow_infinity=True)
scales = st.one_of(
    st.sampled_from([1.0, 10.0, 0.1, -1.0, 100.0]),
    st.floats(min_value=-1e6, max_value=1e6).filter(lambda x: abs(x) > 1e-6),
)
offsets = st.one_of(
    st.sampled_from([0.0, 100.0, -273.15]),
    st.floats(min_value=-1e6, max_value=1e6),
)


def reorder(data: bytes, order: str) -> tuple[int, ...]:
    """Registers of big-endian ``data`` in ``order``, computed from bytes."""
    pairs = [data[i : i + 2] for i in range(0, len(data), 2)]
    if order in ("CDAB", "DCBA"):
        pairs.reverse()
    if order in ("BADC", "DCBA"):
        pairs = [pair[::-1] for pair in pairs]
    return tuple(int.from_bytes(pair, "big") for pair in pairs)


def outcome(module: ModuleType, *args: object) -> tuple[int, ...] | str:
    """What ``module.encode(*args)`` gives: the registers, or the error."""
    try:
        registers: tuple[int, ...] = module.encode(*args)
    except ValueError as error:
        return f"{type(error).__name__}: {error}"
    return registers


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(list(INTEGER_RANGES)), order=orders)
def test_integer_round_trip(
    module: ModuleType, data: st.DataObject, dtype: str, order: str
) -> None:
    low, high = INTEGER_RANGES[dtype]
    value = data.draw(st.integers(low, high))

    registers = module.encode(value, dtype, order)

    assert all(0 <= word <= 65535 for word in registers)
    assert module.decode(registers, dtype, order) == value
    expected = struct.pack(">" + STRUCT_FORMATS[dtype], value)
    assert registers == reorder(expected, order)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@SETTINGS
@given(value=st.floats(width=32), order=orders)
def test_float32_round_trip(module: ModuleType, value: float, order: str) -> None:
    registers = module.encode(value, "float32", order)

    assert registers == reorder(struct.pack(">f", value), order)
    decoded = module.decode(registers, "float32", order)
    assert decoded == value or (math.isnan(decoded) and math.isnan(value))


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@SETTINGS
@given(value=any_floats, order=orders)
def test_float64_round_trip(module: ModuleType, value: float, order: str) -> None:
    registers = module.encode(value, "float64", order)

    assert registers == reorder(struct.pack(">d", value), order)
    decoded = module.decode(registers, "float64", order)
    assert struct.pack(">d", decoded) == struct.pack(">d", value)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@SETTINGS
@given(value=st.floats(-1e40, 1e40), order=orders)
def test_float32_matches_struct_or_refuses(
    module: ModuleType, value: float, order: str
) -> None:
    if abs(value) > module.FLOAT32_MAX:
        with pytest.raises(module.EncodeError):
            module.encode(value, "float32", order)
        return

    rounded = struct.unpack(">f", struct.pack(">f", value))[0]
    assert module.encode(value, "float32", order) == reorder(
        struct.pack(">f", rounded), order
    )


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@SETTINGS
@given(
    data=st.data(),
    dtype=st.sampled_from(list(INTEGER_RANGES)),
    order=orders,
    scale=st.sampled_from([1.0, 10.0, 100.0, 0.5]),
    offset=st.sampled_from([0.0, 100.0, -50.0]),
)
def test_scaled_round_trip(
    module: ModuleType,
    data: st.DataObject,
    dtype: str,
    order: str,
    scale: float,
    offset: float,
) -> None:
    low, high = INTEGER_RANGES[dtype]
    value = data.draw(
        st.floats((low - offset) / scale, (high - offset) / scale, allow_nan=False)
    )

    registers = module.encode(value, dtype, order, scale, offset)

    decoded = module.decode(registers, dtype, order, scale, offset)
    assert abs(decoded - value) <= 0.5 / scale + 1e-9 * abs(value)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@SETTINGS
@given(
    data=st.data(),
    dtype=st.sampled_from(list(INTEGER_RANGES)),
    order=orders,
    beyond=st.floats(0.5, 1e30),
    above=st.booleans(),
)
def test_out_of_range_always_raises(
    module: ModuleType,
    data: st.DataObject,
    dtype: str,
    order: str,
    beyond: float,
    above: bool,
) -> None:
    low, high = INTEGER_RANGES[dtype]
    value = high + beyond if above else low - beyond
    out = np.full(3 * module.width(dtype), 7, dtype=np.uint16)
    values = np.array([0.0, value, 1.0])
    if not low - 0.5 < value < high + 0.5:
        with pytest.raises(module.EncodeError, match=f"as {dtype}"):
            module.encode(value, dtype, order)
        with pytest.raises(module.EncodeError, match=r"values\[1\]"):
            module.encode_array(values, dtype, order, out=out)
        assert out.tolist() == [7] * out.shape[0]
        return

    # Within half a unit of the range: it rounds to the boundary, never past.
    registers = module.encode(value, dtype, order)
    assert module.decode(registers, dtype, order) == (high if above else low)


@SETTINGS
@given(value=any_floats, dtype=dtypes, order=orders, scale=scales, offset=offsets)
def test_compiled_matches_reference(
    value: float, dtype: str, order: str, scale: float, offset: float
) -> None:
    args = (value, dtype, order, scale, offset)

    assert outcome(compiled, *args) == outcome(reference, *args)


@SETTINGS
@given(
    words=st.lists(st.integers(0, 65535), min_size=4, max_size=4),
    dtype=dtypes,
    order=orders,
    scale=scales,
    offset=offsets,
)
def test_compiled_decodes_as_reference(
    words: list[int], dtype: str, order: str, scale: float, offset: float
) -> None:
    registers = words[: compiled.width(dtype)]

    ours = compiled.decode(registers, dtype, order, scale, offset)
    theirs = reference.decode(registers, dtype, order, scale, offset)

    assert ours == theirs or (math.isnan(ours) and math.isnan(theirs))


@SETTINGS
@given(
    values=st.lists(any_floats, max_size=40),
    dtype=dtypes,
    order=orders,
    scale=scales,
    offset=offsets,
)
def test_arrays_match_scalars_and_reference(
    values: list[float], dtype: str, order: str, scale: float, offset: float
) -> None:
    array = np.array(values, dtype=np.float64)
    scalar = [outcome(compiled, value, dtype, order, scale, offset) for value in values]
    failed = [i for i, result in enumerate(scalar) if isinstance(result, str)]

    results = []
    for module in (compiled, reference):
        try:
            results.append(module.encode_array(array, dtype, order, scale, offset))
        except module.EncodeError as error:
            results.append(str(error))

    assert isinstance(results[0], str) == bool(failed)
    if failed:
        assert results[0] == results[1]
        assert results[0].startswith(f"cannot encode values[{failed[0]}] = ")
        return
    expected = [word for words in scalar for word in words]
    assert results[0].tolist() == expected
    assert results[1].tolist() == expected
    decoded = compiled.decode_array(results[0], dtype, order, scale, offset)
    decoded_reference = reference.decode_array(results[0], dtype, order, scale, offset)
    np.testing.assert_array_equal(decoded, decoded_reference)


@SETTINGS
@given(
    values=st.lists(
        st.one_of(st.floats(-10.0, 7000.0), st.sampled_from([math.nan, math.inf])),
        min_size=1,
        max_size=12,
    ),
    status=st.integers(0, 31),
    order=orders,
    first=st.integers(0, 3),
)
def test_images_agree(values: list[float], status: int, order: str, first: int) -> None:
    applied = np.array(values)
    bits = np.full(len(values), status, dtype=np.uint16)

    assert image_updates(compiled, applied, bits, order, first) == image_updates(
        reference, applied, bits, order, first
    )


def image_updates(
    module: ModuleType,
    applied: np.ndarray,
    bits: np.ndarray,
    order: str,
    first: int,
) -> list[object]:
    """Errors and resulting registers of each image update, in turn."""
    image = module.StationImage(16, float_order=order)
    group = module.ImageSet([module.StationImage(5), module.StationImage(7)])
    ages = np.abs(applied) * 3
    outcomes = (bits % 4).astype(np.uint8)
    calls = (
        lambda: image.update_pumps(applied, bits, first),
        lambda: image.update_details(applied, ages, outcomes, first),
        lambda: image.set_limits(applied, applied, applied, first),
        lambda: group.update_pumps(np.resize(applied, 12), np.resize(bits, 12)),
    )

    answer: list[object] = []
    for call in calls:
        try:
            call()
            answer.append(None)
        except ValueError as error:
            answer.append(str(error))
    answer.append(image.registers.tolist())
    answer.append([item.registers.tolist() for item in group.images])
    return answer
