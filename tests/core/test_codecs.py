"""Register codecs: every type and word order, boundaries, errors, arrays.

Every test runs against the compiled module and the pure-Python reference
(the ``codecs_impl`` fixture).
"""

from __future__ import annotations

import math
import re
import struct
from types import ModuleType

import numpy as np
import pytest

DATA_TYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64")
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
FLOAT32_MAX = struct.unpack(">f", bytes.fromhex("7f7fffff"))[0]


def test_names(codecs_impl: ModuleType) -> None:
    assert codecs_impl.DATA_TYPES == DATA_TYPES
    assert codecs_impl.WORD_ORDERS == WORD_ORDERS
    assert codecs_impl.FLOAT32_MAX == FLOAT32_MAX
    assert issubclass(codecs_impl.EncodeError, ValueError)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("uint16", 1),
        ("int16", 1),
        ("uint32", 2),
        ("int32", 2),
        ("float32", 2),
        ("float64", 4),
    ],
)
def test_width(codecs_impl: ModuleType, dtype: str, expected: int) -> None:
    assert codecs_impl.width(dtype) == expected


@pytest.mark.parametrize(
    ("value", "dtype", "order", "registers"),
    [
        (1.0, "float32", "ABCD", (0x3F80, 0x0000)),
        (1.0, "float32", "CDAB", (0x0000, 0x3F80)),
        (1.0, "float32", "BADC", (0x803F, 0x0000)),
        (1.0, "float32", "DCBA", (0x0000, 0x803F)),
        (-2.5, "float32", "ABCD", (0xC020, 0x0000)),
        (0x12345678, "uint32", "ABCD", (0x1234, 0x5678)),
        (0x12345678, "uint32", "CDAB", (0x5678, 0x1234)),
        (0x12345678, "uint32", "BADC", (0x3412, 0x7856)),
        (0x12345678, "uint32", "DCBA", (0x7856, 0x3412)),
        (-2, "int32", "ABCD", (0xFFFF, 0xFFFE)),
        (-2, "int32", "CDAB", (0xFFFE, 0xFFFF)),
        (-2, "int32", "BADC", (0xFFFF, 0xFEFF)),
        (-2, "int32", "DCBA", (0xFEFF, 0xFFFF)),
        (0x1234, "uint16", "ABCD", (0x1234,)),
        (0x1234, "uint16", "CDAB", (0x1234,)),
        (0x1234, "uint16", "BADC", (0x3412,)),
        (0x1234, "uint16", "DCBA", (0x3412,)),
        (-2, "int16", "ABCD", (0xFFFE,)),
        (-2, "int16", "DCBA", (0xFEFF,)),
        (1.0, "float64", "ABCD", (0x3FF0, 0, 0, 0)),
        (1.0, "float64", "CDAB", (0, 0, 0, 0x3FF0)),
        (1.0, "float64", "BADC", (0xF03F, 0, 0, 0)),
        (1.0, "float64", "DCBA", (0, 0, 0, 0xF03F)),
        (
            struct.unpack(">d", bytes.fromhex("0123456789abcdef"))[0],
            "float64",
            "CDAB",
            (0xCDEF, 0x89AB, 0x4567, 0x0123),
        ),
        (
            struct.unpack(">d", bytes.fromhex("0123456789abcdef"))[0],
            "float64",
            "DCBA",
            (0xEFCD, 0xAB89, 0x6745, 0x2301),
        ),
        (
            struct.unpack(">d", bytes.fromhex("0123456789abcdef"))[0],
            "float64",
            "BADC",
            (0x2301, 0x6745, 0xAB89, 0xEFCD),
        ),
    ],
)
def test_known_patterns(
    codecs_impl: ModuleType,
    value: float,
    dtype: str,
    order: str,
    registers: tuple[int, ...],
) -> None:
    assert codecs_impl.encode(value, dtype, order) == registers
    assert codecs_impl.decode(registers, dtype, order) == value


@pytest.mark.parametrize("dtype", ["uint16", "int16"])
def test_16_bit_orders_pair_up(codecs_impl: ModuleType, dtype: str) -> None:
    encode = codecs_impl.encode

    for value in (0, 1, 258, 32767):
        assert encode(value, dtype, "ABCD") == encode(value, dtype, "CDAB")
        assert encode(value, dtype, "BADC") == encode(value, dtype, "DCBA")


def test_encode_returns_plain_ints(codecs_impl: ModuleType) -> None:
    registers = codecs_impl.encode(3.25, "float64", "DCBA")

    assert isinstance(registers, tuple)
    assert all(type(word) is int for word in registers)


@pytest.mark.parametrize(
    ("value", "dtype", "scale", "offset", "registers"),
    [
        (65535, "uint16", 1.0, 0.0, (65535,)),
        (65535.49, "uint16", 1.0, 0.0, (65535,)),
        (-0.49, "uint16", 1.0, 0.0, (0,)),
        (-0.0, "uint16", 1.0, 0.0, (0,)),
        (-32768, "int16", 1.0, 0.0, (0x8000,)),
        (32767, "int16", 1.0, 0.0, (0x7FFF,)),
        (-32768.49, "int16", 1.0, 0.0, (0x8000,)),
        (4294967295, "uint32", 1.0, 0.0, (0xFFFF, 0xFFFF)),
        (-2147483648, "int32", 1.0, 0.0, (0x8000, 0x0000)),
        (2147483647, "int32", 1.0, 0.0, (0x7FFF, 0xFFFF)),
        (6553.5, "uint16", 10.0, 0.0, (65535,)),
        (-100.0, "uint16", 1.0, 100.0, (0,)),
        (42.5, "uint16", 10.0, 0.0, (425,)),
        (2.5, "int16", 1.0, 0.0, (3,)),
        (-2.5, "int16", 1.0, 0.0, (0xFFFD,)),
        (1.5, "uint16", 1.0, 0.0, (2,)),
        (0.49999999999999994, "uint16", 1.0, 0.0, (0,)),
        (4503599627370495.5, "float64", 1.0, 0.0, (0x432F, 0xFFFF, 0xFFFF, 0xFFFF)),
    ],
)
def test_boundaries_that_fit(
    codecs_impl: ModuleType,
    value: float,
    dtype: str,
    scale: float,
    offset: float,
    registers: tuple[int, ...],
) -> None:
    assert codecs_impl.encode(value, dtype, "ABCD", scale, offset) == registers


@pytest.mark.parametrize(
    ("value", "dtype", "scale", "offset", "message"),
    [
        (
            65536,
            "uint16",
            1.0,
            0.0,
            "cannot encode value = 65536.0 as uint16: "
            "scaled value 65536.0 is outside [0, 65535]",
        ),
        (
            65535.5,
            "uint16",
            1.0,
            0.0,
            "cannot encode value = 65535.5 as uint16: "
            "scaled value 65535.5 is outside [0, 65535]",
        ),
        (
            -0.5,
            "uint16",
            1.0,
            0.0,
            "cannot encode value = -0.5 as uint16: "
            "scaled value -0.5 is outside [0, 65535]",
        ),
        (
            -32769,
            "int16",
            1.0,
            0.0,
            "cannot encode value = -32769.0 as int16: "
            "scaled value -32769.0 is outside [-32768, 32767]",
        ),
        (
            -32768.5,
            "int16",
            1.0,
            0.0,
            "cannot encode value = -32768.5 as int16: "
            "scaled value -32768.5 is outside [-32768, 32767]",
        ),
        (
            32768,
            "int16",
            1.0,
            0.0,
            "cannot encode value = 32768.0 as int16: "
            "scaled value 32768.0 is outside [-32768, 32767]",
        ),
        (
            4294967296,
            "uint32",
            1.0,
            0.0,
            "cannot encode value = 4294967296.0 as uint32: "
            "scaled value 4294967296.0 is outside [0, 4294967295]",
        ),
        (
            -2147483649,
            "int32",
            1.0,
            0.0,
            "cannot encode value = -2147483649.0 as int32: "
            "scaled value -2147483649.0 is outside [-2147483648, 2147483647]",
        ),
        (
            6553.6,
            "uint16",
            10.0,
            0.0,
            "cannot encode value = 6553.6 as uint16: "
            "scaled value 65536.0 is outside [0, 65535]",
        ),
        (
            65535,
            "uint16",
            1.0,
            1.0,
            "cannot encode value = 65535.0 as uint16: "
            "scaled value 65536.0 is outside [0, 65535]",
        ),
        (
            math.nan,
            "uint16",
            1.0,
            0.0,
            "cannot encode value = nan as uint16: "
            "scaled value nan is outside [0, 65535]",
        ),
        (
            math.inf,
            "int32",
            1.0,
            0.0,
            "cannot encode value = inf as int32: "
            "scaled value inf is outside [-2147483648, 2147483647]",
        ),
        (
            -math.inf,
            "uint32",
            2.0,
            0.0,
            "cannot encode value = -inf as uint32: "
            "scaled value -inf is outside [0, 4294967295]",
        ),
        (
            3.5e38,
            "float32",
            1.0,
            0.0,
            "cannot encode value = 3.5e+38 as float32: scaled value 3.5e+38 is "
            "outside [-3.4028234663852886e+38, 3.4028234663852886e+38]",
        ),
        (
            -1e38,
            "float32",
            10.0,
            0.0,
            "cannot encode value = -1e+38 as float32: scaled value -1e+39 is "
            "outside [-3.4028234663852886e+38, 3.4028234663852886e+38]",
        ),
        (
            1e308,
            "float64",
            10.0,
            0.0,
            "cannot encode value = 1e+308 as float64: scaled value inf is outside "
            "[-1.7976931348623157e+308, 1.7976931348623157e+308]",
        ),
        (
            -1.7e308,
            "float64",
            1.0,
            -1e308,
            "cannot encode value = -1.7e+308 as float64: scaled value -inf is "
            "outside [-1.7976931348623157e+308, 1.7976931348623157e+308]",
        ),
        (
            1e300,
            "float32",
            1e10,
            0.0,
            "cannot encode value = 1e+300 as float32: scaled value inf is "
            "outside [-3.4028234663852886e+38, 3.4028234663852886e+38]",
        ),
        (
            1e308,
            "int16",
            10.0,
            0.0,
            "cannot encode value = 1e+308 as int16: "
            "scaled value inf is outside [-32768, 32767]",
        ),
    ],
)
def test_values_that_do_not_fit(
    codecs_impl: ModuleType,
    value: float,
    dtype: str,
    scale: float,
    offset: float,
    message: str,
) -> None:
    with pytest.raises(codecs_impl.EncodeError, match=f"^{re.escape(message)}$"):
        codecs_impl.encode(value, dtype, "ABCD", scale, offset)


def test_float32_edges(codecs_impl: ModuleType) -> None:
    encode, decode = codecs_impl.encode, codecs_impl.decode

    assert encode(FLOAT32_MAX, "float32") == (0x7F7F, 0xFFFF)
    assert encode(-FLOAT32_MAX, "float32") == (0xFF7F, 0xFFFF)
    assert encode(math.inf, "float32") == (0x7F80, 0x0000)
    assert encode(-math.inf, "float32", "CDAB") == (0x0000, 0xFF80)
    assert encode(1e-50, "float32") == (0x0000, 0x0000)
    assert math.isnan(decode(encode(math.nan, "float32"), "float32"))
    assert math.isnan(decode(encode(math.nan, "float64", "DCBA"), "float64", "DCBA"))
    assert decode(encode(-math.inf, "float64"), "float64") == -math.inf


def test_float32_rounds_to_nearest(codecs_impl: ModuleType) -> None:
    value = 0.1
    expected = struct.unpack(">HH", struct.pack(">f", value))

    assert codecs_impl.encode(value, "float32") == expected
    assert (
        codecs_impl.decode(expected, "float32")
        == struct.unpack(">f", struct.pack(">f", value))[0]
    )


def test_decode_applies_scale_and_offset(codecs_impl: ModuleType) -> None:
    decode = codecs_impl.decode

    assert decode((425,), "uint16", scale=10.0) == 42.5
    assert decode((0,), "uint16", offset=100.0) == -100.0
    assert decode((0xFFFE,), "int16", "ABCD", 2.0, 1.0) == -1.5
    assert decode((0xFFFF, 0xFFFF), "uint32") == 4294967295.0
    assert decode(np.array([0x3F80, 0], dtype=np.uint16), "float32") == 1.0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda c: c.encode(1.0, "uint8"),
            ValueError,
            "dtype must be one of uint16, int16, uint32, int32, float32, float64, "
            "got 'uint8'",
        ),
        (
            lambda c: c.encode(1.0, None),
            ValueError,
            "dtype must be one of uint16, int16, uint32, int32, float32, float64, "
            "got None",
        ),
        (
            lambda c: c.encode(1.0, "float32", "ABDC"),
            ValueError,
            "order must be one of ABCD, CDAB, BADC, DCBA, got 'ABDC'",
        ),
        (
            lambda c: c.decode((1,), "uint16", ["ABCD"]),
            ValueError,
            "order must be one of ABCD, CDAB, BADC, DCBA, got ['ABCD']",
        ),
        (
            lambda c: c.width("int64"),
            ValueError,
            "dtype must be one of uint16, int16, uint32, int32, float32, float64, "
            "got 'int64'",
        ),
        (
            lambda c: c.encode(1.0, "uint16", "ABCD", 0.0),
            ValueError,
            "scale must be finite and non-zero, got 0.0",
        ),
        (
            lambda c: c.encode(1.0, "uint16", "ABCD", math.nan),
            ValueError,
            "scale must be finite and non-zero, got nan",
        ),
        (
            lambda c: c.decode((1,), "uint16", "ABCD", math.inf),
            ValueError,
            "scale must be finite and non-zero, got inf",
        ),
        (
            lambda c: c.encode(1.0, "uint16", "ABCD", 1.0, -math.inf),
            ValueError,
            "offset must be finite, got -inf",
        ),
        (
            lambda c: c.encode("1.0", "uint16"),
            TypeError,
            "value must be a real number, got str",
        ),
        (
            lambda c: c.encode(None, "uint16"),
            TypeError,
            "value must be a real number, got NoneType",
        ),
        (
            lambda c: c.encode(1j, "float64"),
            TypeError,
            "value must be a real number, got complex",
        ),
        (
            lambda c: c.encode(1.0, "uint16", "ABCD", "10"),
            TypeError,
            "scale must be a real number, got str",
        ),
        (
            lambda c: c.encode(1.0, "uint16", "ABCD", 1.0, b"0"),
            TypeError,
            "offset must be a real number, got bytes",
        ),
        (
            lambda c: c.decode((1, 2), "uint16"),
            ValueError,
            "decoding uint16 needs 1 registers, got 2",
        ),
        (
            lambda c: c.decode([1], "float64"),
            ValueError,
            "decoding float64 needs 4 registers, got 1",
        ),
        (
            lambda c: c.decode((1, 65536), "float32"),
            ValueError,
            "registers[1] must be in [0, 65535], got 65536",
        ),
        (
            lambda c: c.decode((-1,), "int16"),
            ValueError,
            "registers[0] must be in [0, 65535], got -1",
        ),
        (
            lambda c: c.decode((2**70,), "uint16"),
            ValueError,
            f"registers[0] must be in [0, 65535], got {2**70}",
        ),
        (
            lambda c: c.decode((1.0,), "uint16"),
            TypeError,
            "registers[0] must be an integer, got float",
        ),
        (
            lambda c: c.decode(7, "uint16"),
            TypeError,
            "registers must be a sequence of integers, got int",
        ),
    ],
)
def test_argument_errors(
    codecs_impl: ModuleType, call: object, error: type[Exception], message: str
) -> None:
    assert callable(call)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call(codecs_impl)


def test_numpy_scalars_and_ints_are_values(codecs_impl: ModuleType) -> None:
    encode = codecs_impl.encode

    assert encode(np.float32(1.0), "float32") == (0x3F80, 0)
    assert encode(np.int64(7), "uint16") == (7,)
    assert encode(3, "int16", "ABCD", np.float64(2.0), np.int32(1)) == (7,)
    with pytest.raises(OverflowError):
        encode(10**400, "float64")


# ---------------------------------------------------------------------------
# Arrays


@pytest.mark.parametrize("dtype", DATA_TYPES)
@pytest.mark.parametrize("order", WORD_ORDERS)
def test_encode_array_matches_scalar(
    codecs_impl: ModuleType, dtype: str, order: str
) -> None:
    values = np.array([0.0, 1.0, 2.5, 100.4, 255.0, 1000.6, 32767.0])
    if dtype in ("int16", "int32", "float32", "float64"):
        values = np.concatenate([values, -values])

    encoded = codecs_impl.encode_array(values, dtype, order, 0.5, 3.0)

    expected = [
        word
        for value in values
        for word in codecs_impl.encode(float(value), dtype, order, 0.5, 3.0)
    ]
    assert encoded.dtype == np.uint16
    assert encoded.tolist() == expected
    decoded = codecs_impl.decode_array(encoded, dtype, order, 0.5, 3.0)
    width = codecs_impl.width(dtype)
    assert decoded.dtype == np.float64
    assert decoded.tolist() == [
        codecs_impl.decode(expected[i * width : (i + 1) * width], dtype, order, 0.5, 3)
        for i in range(len(values))
    ]


def test_encode_array_into_out(codecs_impl: ModuleType) -> None:
    out = np.zeros(4, dtype=np.uint16)

    result = codecs_impl.encode_array(np.array([1.0, -2.5]), "float32", "CDAB", out=out)

    assert result is out
    assert out.tolist() == [0, 0x3F80, 0, 0xC020]


def test_encode_array_empty(codecs_impl: ModuleType) -> None:
    result = codecs_impl.encode_array(np.array([], dtype=np.float64), "float64")

    assert result.shape == (0,)
    assert codecs_impl.decode_array(result, "float64").shape == (0,)


def test_encode_array_bad_value_writes_nothing(codecs_impl: ModuleType) -> None:
    out = np.full(6, 7, dtype=np.uint16)
    values = np.array([1.0, 2.0, 65536.0, -5.0, 4.0, 5.0])

    message = (
        "cannot encode values[2] = 65536.0 as uint16: "
        "scaled value 65536.0 is outside [0, 65535]"
    )
    with pytest.raises(codecs_impl.EncodeError, match=f"^{re.escape(message)}$"):
        codecs_impl.encode_array(values, "uint16", out=out)
    assert out.tolist() == [7] * 6


def test_encode_array_nan_for_integers(codecs_impl: ModuleType) -> None:
    values = np.array([1.0, math.nan])

    with pytest.raises(codecs_impl.EncodeError, match=r"values\[1\] = nan as int32"):
        codecs_impl.encode_array(values, "int32", "DCBA")


def test_encode_array_float32_overflow(codecs_impl: ModuleType) -> None:
    values = np.array([math.inf, math.nan, 1e39])

    with pytest.raises(codecs_impl.EncodeError, match=r"values\[2\] = 1e\+39"):
        codecs_impl.encode_array(values, "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_encode_array_scaling_never_makes_infinity(
    codecs_impl: ModuleType, dtype: str
) -> None:
    values = np.array([math.inf, -math.inf, math.nan, 1.0, 1e308])

    with pytest.raises(codecs_impl.EncodeError, match=r"values\[4\] = 1e\+308"):
        codecs_impl.encode_array(values, dtype, "ABCD", 10.0)
    encoded = codecs_impl.encode_array(values[:4], dtype, "ABCD", 10.0, 1.0)
    decoded = codecs_impl.decode_array(encoded, dtype, "ABCD", 10.0, 1.0)
    assert decoded[:2].tolist() == [math.inf, -math.inf]
    assert math.isnan(decoded[2])
    assert decoded[3] == 1.0


@pytest.mark.parametrize(
    ("values", "out", "error", "message"),
    [
        (
            [1.0, 2.0],
            None,
            TypeError,
            "values must be a numpy.ndarray of float64, got list",
        ),
        (
            np.array([1, 2]),
            None,
            TypeError,
            "values must be a numpy.ndarray of float64, got int64",
        ),
        (
            np.array([1, 2], dtype=np.float32),
            None,
            TypeError,
            "values must be a numpy.ndarray of float64, got float32",
        ),
        (
            np.array([1, 2], dtype=">f8"),
            None,
            TypeError,
            "values must be a numpy.ndarray of float64, got >f8",
        ),
        (
            np.zeros((2, 2)),
            None,
            ValueError,
            "values must be one-dimensional, got 2 dimensions",
        ),
        (
            np.zeros(8)[::2],
            None,
            ValueError,
            "values must be contiguous and aligned",
        ),
        (
            np.zeros(2),
            np.zeros(3, dtype=np.uint16),
            ValueError,
            "out must have 4 elements (2 values of float32, 2 registers each), got 3",
        ),
        (
            np.zeros(2),
            np.zeros(4, dtype=np.int16),
            TypeError,
            "out must be a numpy.ndarray of uint16, got int16",
        ),
        (
            np.zeros(2),
            np.zeros(8, dtype=np.uint16)[::2],
            ValueError,
            "out must be contiguous and aligned",
        ),
        (
            np.zeros(2),
            bytearray(8),
            TypeError,
            "out must be a numpy.ndarray of uint16, got bytearray",
        ),
    ],
)
def test_encode_array_argument_errors(
    codecs_impl: ModuleType,
    values: object,
    out: object,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        codecs_impl.encode_array(values, "float32", out=out)


def test_encode_array_read_only_out(codecs_impl: ModuleType) -> None:
    out = np.zeros(2, dtype=np.uint16)
    out.flags.writeable = False

    with pytest.raises(ValueError, match=r"^out must be writeable$"):
        codecs_impl.encode_array(np.zeros(2), "uint16", out=out)


def test_encode_array_accepts_read_only_values(codecs_impl: ModuleType) -> None:
    values = np.array([1.0, 2.0])
    values.flags.writeable = False

    assert codecs_impl.encode_array(values, "uint16").tolist() == [1, 2]


def test_decode_array_errors(codecs_impl: ModuleType) -> None:
    decode_array = codecs_impl.decode_array

    message = (
        "registers must hold a whole number of float64 values "
        "(4 registers each), got 6 registers"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        decode_array(np.zeros(6, dtype=np.uint16), "float64")
    with pytest.raises(
        TypeError, match=r"^registers must be a numpy\.ndarray of uint16"
    ):
        decode_array(np.zeros(4, dtype=np.int32), "float32")
    with pytest.raises(ValueError, match=r"^scale must be finite and non-zero"):
        decode_array(np.zeros(4, dtype=np.uint16), "float32", scale=0)


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [
        ("uint16", 65536.0),
        ("int16", -40000.0),
        ("uint32", -1.0),
        ("int32", math.nan),
        ("float32", -1e39),
        ("uint16", math.inf),
    ],
)
def test_encode_array_finds_every_position(
    codecs_impl: ModuleType, dtype: str, bad: float
) -> None:
    for length in range(1, 10):
        for position in range(length):
            values = np.full(length, 12.5)
            values[position] = bad
            out = np.full(length * codecs_impl.width(dtype), 3, dtype=np.uint16)

            with pytest.raises(
                codecs_impl.EncodeError, match=rf"^cannot encode values\[{position}\] "
            ):
                codecs_impl.encode_array(values, dtype, "BADC", out=out)
            assert not (out != 3).any()


def test_encode_array_keeps_negative_zero(codecs_impl: ModuleType) -> None:
    values = np.array([-0.0, 0.0, -0.0])

    assert codecs_impl.encode_array(values, "float32").tolist() == [
        0x8000,
        0,
        0,
        0,
        0x8000,
        0,
    ]
    assert codecs_impl.encode_array(values, "uint16").tolist() == [0, 0, 0]
    assert codecs_impl.encode_array(values, "float64", offset=1.0)[0] == 0x3FF0
