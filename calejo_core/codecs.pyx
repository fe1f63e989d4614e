# cython: language_level=3, embedsignature=True
"""Register codecs and the station register image.

Encoding: ``raw = value * scale + offset``. Integer types round ``raw`` to
the nearest integer, halves away from zero, and refuse (``EncodeError``) a
result outside the type's range, NaN and infinity: a value never wraps.
float32 refuses a finite ``raw`` beyond the float32 range (it never turns
into infinity by accident); NaN and infinity pass as themselves for the
float types. Decoding: ``value = (raw - offset) / scale``.

Word orders, for the bytes A B C D of a 32-bit value in big-endian order:
ABCD (registers in order, bytes big-endian in each), CDAB (registers in
reverse order), BADC (registers in order, bytes swapped in each), DCBA
(fully little-endian). float64 follows the same idea over four registers.

A :class:`StationImage` holds the registers and coils one Modbus unit id
serves, laid out as :func:`register_map` says; an :class:`ImageSet`
updates many images in one pass. The array paths are C loops.
"""

cimport cython
cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport INFINITY, fabs, floor, isfinite, isnan
from libc.stdint cimport (
    int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t,
)
from libc.string cimport memcpy

import collections
import numbers
import operator
from collections.abc import Sequence
from typing import Literal

import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif

    /* 1 when low < values[i] * scale + offset < high for every i (NaN never
       is), else 0. The products and sums are those of the scalar code, so
       the answer is the same with or without SSE2. */
    static int calejo_all_between(const double *values, Py_ssize_t n,
                                  double scale, double offset,
                                  double low, double high)
    {
        Py_ssize_t i = 0;
    #if defined(__SSE2__)
        const __m128d vscale = _mm_set1_pd(scale);
        const __m128d voffset = _mm_set1_pd(offset);
        const __m128d vlow = _mm_set1_pd(low);
        const __m128d vhigh = _mm_set1_pd(high);
        __m128d ok0 = _mm_cmpeq_pd(vlow, vlow);
        __m128d ok1 = ok0;
        for (; i + 4 <= n; i += 4) {
            __m128d a = _mm_add_pd(_mm_mul_pd(_mm_loadu_pd(values + i), vscale),
                                   voffset);
            __m128d b = _mm_add_pd(
                _mm_mul_pd(_mm_loadu_pd(values + i + 2), vscale), voffset);
            ok0 = _mm_and_pd(ok0, _mm_and_pd(_mm_cmpgt_pd(a, vlow),
                                             _mm_cmplt_pd(a, vhigh)));
            ok1 = _mm_and_pd(ok1, _mm_and_pd(_mm_cmpgt_pd(b, vlow),
                                             _mm_cmplt_pd(b, vhigh)));
        }
        if (_mm_movemask_pd(_mm_and_pd(ok0, ok1)) != 3) {
            return 0;
        }
    #endif
        for (; i < n; i++) {
            double raw = values[i] * scale + offset;
            if (!(raw > low && raw < high)) {
                return 0;
            }
        }
        return 1;
    }

    /* 1 when no values[i] * scale + offset has low < |raw| < high, else 0. */
    static int calejo_none_between_abs(const double *values, Py_ssize_t n,
                                       double scale, double offset,
                                       double low, double high)
    {
        Py_ssize_t i = 0;
    #if defined(__SSE2__)
        const __m128d vscale = _mm_set1_pd(scale);
        const __m128d voffset = _mm_set1_pd(offset);
        const __m128d vlow = _mm_set1_pd(low);
        const __m128d vhigh = _mm_set1_pd(high);
        const __m128d sign = _mm_set1_pd(-0.0);
        __m128d bad = _mm_setzero_pd();
        for (; i + 2 <= n; i += 2) {
            __m128d a = _mm_andnot_pd(
                sign,
                _mm_add_pd(_mm_mul_pd(_mm_loadu_pd(values + i), vscale),
                           voffset));
            bad = _mm_or_pd(bad, _mm_and_pd(_mm_cmpgt_pd(a, vlow),
                                            _mm_cmplt_pd(a, vhigh)));
        }
        if (_mm_movemask_pd(bad) != 0) {
            return 0;
        }
    #endif
        for (; i < n; i++) {
            double size = fabs(values[i] * scale + offset);
            if (size > low && size < high) {
                return 0;
            }
        }
        return 1;
    }
    """
    bint all_between "calejo_all_between" (
        const double* values,
        Py_ssize_t n,
        double scale,
        double offset,
        double low,
        double high,
    ) noexcept nogil
    bint none_between_abs "calejo_none_between_abs" (
        const double* values,
        Py_ssize_t n,
        double scale,
        double offset,
        double low,
        double high,
    ) noexcept nogil

DataType = Literal["uint16", "int16", "uint32", "int32", "float32", "float64"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

DATA_TYPES = ("uint16", "int16", "uint32", "int32", "float32", "float64")
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")

FLOAT32_MAX = float(FLT_MAX)

HEARTBEAT = C_HEARTBEAT
STATION_STATUS = C_STATION_STATUS
PUMP_COUNT = C_PUMP_COUNT
PLC_HEARTBEAT = C_PLC_HEARTBEAT
PLC_HEARTBEAT_AGE = C_PLC_HEARTBEAT_AGE
STATION_LEVEL = C_STATION_LEVEL
LAYOUT_VERSION = C_LAYOUT_VERSION
IMAGE_LAYOUT = C_IMAGE_LAYOUT

PUMP_BASE = C_PUMP_BASE
PUMP_STRIDE = C_PUMP_STRIDE
PUMP_APPLIED_X10 = C_PUMP_APPLIED_X10
PUMP_APPLIED_FLOAT = C_PUMP_APPLIED_FLOAT
PUMP_STATUS = C_PUMP_STATUS
PUMP_TARGET_X10 = C_PUMP_TARGET_X10
PUMP_MIN_X10 = C_PUMP_MIN_X10
PUMP_MAX_X10 = C_PUMP_MAX_X10
PUMP_MAX_RATE_X10 = C_PUMP_MAX_RATE_X10
PUMP_SETPOINT_AGE = C_PUMP_SETPOINT_AGE
PUMP_OUTCOME = C_PUMP_OUTCOME

FEEDBACK_BASE = C_FEEDBACK_BASE
FEEDBACK_STRIDE = C_FEEDBACK_STRIDE
FEEDBACK_SPEED_X10 = C_FEEDBACK_SPEED_X10
FEEDBACK_RUNNING = C_FEEDBACK_RUNNING
FEEDBACK_POWER_X10 = C_FEEDBACK_POWER_X10

MAX_PUMPS = C_MAX_PUMPS
MAX_REGISTERS = 65536
MAX_COILS = 65536
SATURATED = C_SATURATED
UNLIMITED_RATE = C_SATURATED

COIL_SYSTEM_ESTOP = C_COIL_SYSTEM_ESTOP
COIL_STATION_ESTOP = C_COIL_STATION_ESTOP
COIL_PUMP_BASE = C_COIL_PUMP_BASE

STATION_ESTOP = 1
STATION_FAILSAFE = 2
STATION_PLAN_STALE = 4
STATION_STORAGE_DEGRADED = 8

ILLEGAL_DATA_ADDRESS = 2
ILLEGAL_DATA_VALUE = 3

cdef dict DTYPE_CODES = {name: code for code, name in enumerate(DATA_TYPES)}
cdef dict ORDER_CODES = {name: code for code, name in enumerate(WORD_ORDERS)}
cdef tuple RANGES = (
    (0, 65535),
    (-32768, 32767),
    (0, 4294967295),
    (-2147483648, 2147483647),
    (-FLOAT32_MAX, FLOAT32_MAX),
    (-DBL_MAX, DBL_MAX),
)

cdef int[6] WIDTH = [1, 1, 2, 2, 2, 4]
cdef double[6] LOW = [0.0, -32768.0, 0.0, -2147483648.0, 0.0, 0.0]
cdef double[6] HIGH = [65535.0, 32767.0, 4294967295.0, 2147483647.0, 0.0, 0.0]
cdef uint64_t[6] MASK = [0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0, 0]

# The x 10 registers of a pump are uint16: raw values in (-0.5, 65535.5)
# round into [0, 65535].
cdef double TENTHS_LOW = -0.5
cdef double TENTHS_HIGH = 65535.5


RegisterRow = collections.namedtuple(
    "RegisterRow", ("address", "quantity", "name", "type", "access", "description")
)
RegisterRow.__doc__ = "One entry of the register map: holding registers, then coils."


class EncodeError(ValueError):
    """A value that the register type cannot hold."""


# ---------------------------------------------------------------------------
# C kernels

cdef inline int64_t round_half_away(double raw) noexcept nogil:
    """``raw`` rounded to the nearest integer, halves away from zero.

    ``raw`` must be finite and below 2**63 in magnitude; the subtraction is
    exact, so no value near a half rounds the wrong way.
    """
    cdef int64_t whole = <int64_t>raw
    cdef double fraction = raw - <double>whole

    return whole + (fraction >= 0.5) - (fraction <= -0.5)


cdef inline double scaled(double value, double scale, double offset) noexcept nogil:
    """``value * scale + offset``; a zero offset is not added, so -0.0 stays."""
    if offset == 0.0:
        return value * scale
    return value * scale + offset


cdef int encode_bits(double raw, int dtype, uint64_t* bits) noexcept nogil:
    cdef float single
    cdef uint32_t word32

    if dtype == DT_FLOAT64:
        memcpy(bits, &raw, 8)
        return 0

    if dtype == DT_FLOAT32:
        if isfinite(raw) and (raw > FLT_MAX or raw < -FLT_MAX):
            return -1
        single = <float>raw
        memcpy(&word32, &single, 4)
        bits[0] = word32
        return 0

    if not (raw > LOW[dtype] - 0.5 and raw < HIGH[dtype] + 0.5):
        return -1
    bits[0] = (<uint64_t>round_half_away(raw)) & MASK[dtype]
    return 0


cdef inline uint16_t swap_bytes(uint16_t word) noexcept nogil:
    return <uint16_t>((word >> 8) | (word << 8))


cdef void put_words(uint64_t bits, int n, int order, uint16_t* out) noexcept nogil:
    cdef int i
    cdef uint16_t word

    for i in range(n):
        if order == WO_ABCD or order == WO_BADC:
            word = <uint16_t>(bits >> (16 * (n - 1 - i)))
        else:
            word = <uint16_t>(bits >> (16 * i))
        if order == WO_BADC or order == WO_DCBA:
            word = swap_bytes(word)
        out[i] = word


cdef uint64_t get_words(const uint16_t* registers, int n, int order) noexcept nogil:
    cdef int i
    cdef uint64_t word
    cdef uint64_t bits = 0

    for i in range(n):
        word = registers[i]
        if order == WO_BADC or order == WO_DCBA:
            word = swap_bytes(<uint16_t>word)
        if order == WO_ABCD or order == WO_BADC:
            bits |= word << (16 * (n - 1 - i))
        else:
            bits |= word << (16 * i)
    return bits


cdef double decode_bits(uint64_t bits, int dtype) noexcept nogil:
    cdef float single
    cdef double double_value
    cdef uint32_t word32

    if dtype == DT_UINT16:
        return <double>(<uint16_t>bits)
    if dtype == DT_INT16:
        return <double>(<int16_t>(<uint16_t>bits))
    if dtype == DT_UINT32:
        return <double>(<uint32_t>bits)
    if dtype == DT_INT32:
        return <double>(<int32_t>(<uint32_t>bits))
    if dtype == DT_FLOAT32:
        word32 = <uint32_t>bits
        memcpy(&single, &word32, 4)
        return <double>single
    memcpy(&double_value, &bits, 8)
    return double_value


cdef Py_ssize_t first_unencodable(
    const double* values,
    Py_ssize_t n,
    int dtype,
    double scale,
    double offset,
) noexcept nogil:
    """Index of the first value that ``dtype`` cannot hold, or -1.

    A first pass over all values (two at a time where SSE2 is available)
    says whether every value fits; the index is searched for only when
    one does not. Adding a zero offset only turns -0.0 into 0.0, which
    compares the same, so the first pass adds the offset whatever it is.
    """
    cdef Py_ssize_t i
    cdef bint fits = True
    cdef double raw
    cdef uint64_t bits

    if dtype == DT_FLOAT32:
        fits = none_between_abs(values, n, scale, offset, FLT_MAX, INFINITY)
    elif dtype != DT_FLOAT64:
        fits = all_between(
            values, n, scale, offset, LOW[dtype] - 0.5, HIGH[dtype] + 0.5
        )
    if fits and dtype >= DT_FLOAT32 and (scale != 1.0 or offset != 0.0):
        for i in range(n):
            fits &= not overflowed(values[i], scaled(values[i], scale, offset))
    if fits:
        return -1

    for i in range(n):
        raw = scaled(values[i], scale, offset)
        if encode_bits(raw, dtype, &bits) < 0 or overflowed(values[i], raw):
            return i
    return -1


cdef inline bint overflowed(double value, double raw) noexcept nogil:
    """True when a finite value became infinite by scaling (float types)."""
    return isfinite(value) and not isfinite(raw)


cdef inline void put_word(uint16_t word, int order, uint16_t* out) noexcept nogil:
    if order == WO_BADC or order == WO_DCBA:
        word = swap_bytes(word)
    out[0] = word


cdef inline void put_pair(uint32_t bits, int order, uint16_t* out) noexcept nogil:
    cdef uint16_t high = <uint16_t>(bits >> 16)
    cdef uint16_t low = <uint16_t>bits

    if order == WO_ABCD:
        out[0] = high
        out[1] = low
    elif order == WO_CDAB:
        out[0] = low
        out[1] = high
    elif order == WO_BADC:
        out[0] = swap_bytes(high)
        out[1] = swap_bytes(low)
    else:
        out[0] = swap_bytes(low)
        out[1] = swap_bytes(high)


cdef void encode_values(
    const double* values,
    Py_ssize_t n,
    int dtype,
    int order,
    double scale,
    double offset,
    uint16_t* out,
) noexcept nogil:
    """Encode ``n`` values that :func:`first_unencodable` has passed.

    One loop per type and word order, each with both fixed at compile
    time, so nothing is decided per value.
    """
    if order == WO_ABCD:
        encode_ordered(values, n, dtype, WO_ABCD, scale, offset, out)
    elif order == WO_CDAB:
        encode_ordered(values, n, dtype, WO_CDAB, scale, offset, out)
    elif order == WO_BADC:
        encode_ordered(values, n, dtype, WO_BADC, scale, offset, out)
    else:
        encode_ordered(values, n, dtype, WO_DCBA, scale, offset, out)


cdef inline void encode_ordered(
    const double* values,
    Py_ssize_t n,
    int dtype,
    int order,
    double scale,
    double offset,
    uint16_t* out,
) noexcept nogil:
    cdef Py_ssize_t i
    cdef double raw
    cdef float single
    cdef uint32_t bits32
    cdef uint64_t bits64

    if dtype == DT_FLOAT64:
        for i in range(n):
            raw = scaled(values[i], scale, offset)
            memcpy(&bits64, &raw, 8)
            put_pair(<uint32_t>(bits64 >> 32), order, out + 4 * i)
            put_pair(<uint32_t>bits64, order, out + 4 * i + 2)
            if order == WO_CDAB or order == WO_DCBA:
                swap_pairs(out + 4 * i)
    elif dtype == DT_FLOAT32:
        for i in range(n):
            single = <float>scaled(values[i], scale, offset)
            memcpy(&bits32, &single, 4)
            put_pair(bits32, order, out + 2 * i)
    elif dtype == DT_UINT32 or dtype == DT_INT32:
        for i in range(n):
            bits32 = <uint32_t>round_half_away(scaled(values[i], scale, offset))
            put_pair(bits32, order, out + 2 * i)
    else:
        for i in range(n):
            put_word(
                <uint16_t>round_half_away(scaled(values[i], scale, offset)),
                order,
                out + i,
            )


cdef inline void swap_pairs(uint16_t* out) noexcept nogil:
    """Exchange the first and second register pairs of four."""
    cdef uint16_t first = out[0]
    cdef uint16_t second = out[1]

    out[0] = out[2]
    out[1] = out[3]
    out[2] = first
    out[3] = second


@cython.cdivision(True)
cdef void decode_values(
    const uint16_t* registers,
    Py_ssize_t n,
    int dtype,
    int order,
    double scale,
    double offset,
    double* out,
) noexcept nogil:
    cdef Py_ssize_t i
    cdef int count = WIDTH[dtype]

    for i in range(n):
        out[i] = (
            decode_bits(get_words(registers + i * count, count, order), dtype)
            - offset
        ) / scale


cdef Py_ssize_t first_bad_tenths(const double* values, Py_ssize_t n) noexcept nogil:
    """Index of the first value whose x 10 does not fit uint16, or -1."""
    cdef Py_ssize_t i
    cdef double tenths

    if all_between(values, n, 10.0, 0.0, TENTHS_LOW, TENTHS_HIGH):
        return -1

    for i in range(n):
        tenths = values[i] * 10.0
        if not (tenths > TENTHS_LOW and tenths < TENTHS_HIGH):
            return i
    return -1


cdef inline uint16_t checked_tenths(double value) noexcept nogil:
    """``value`` x 10 rounded, for a value that :func:`first_bad_tenths` passed."""
    cdef double tenths = value * 10.0
    cdef int64_t whole = <int64_t>tenths

    if tenths - <double>whole >= 0.5:
        whole += 1
    return <uint16_t>whole


cdef inline uint16_t saturated_seconds(double seconds) noexcept nogil:
    if isnan(seconds) or seconds >= 65535.0:
        return 65535
    if seconds <= 0.0:
        return 0
    return <uint16_t>floor(seconds)


cdef inline void write_pump_blocks(
    const double* applied,
    const uint16_t* status,
    Py_ssize_t n,
    int order,
    uint16_t* block,
) noexcept nogil:
    """Applied x 10, applied as float32 and status of ``n`` pump blocks."""
    cdef Py_ssize_t i
    cdef float single
    cdef uint32_t bits

    for i in range(n):
        block[C_PUMP_APPLIED_X10] = checked_tenths(applied[i])
        single = <float>applied[i]
        memcpy(&bits, &single, 4)
        put_pair(bits, order, block + C_PUMP_APPLIED_FLOAT)
        block[C_PUMP_STATUS] = status[i]
        block += C_PUMP_STRIDE


# ---------------------------------------------------------------------------
# Argument checks (shared wording with the reference implementation)

cdef int dtype_code(object dtype) except -1:
    code = DTYPE_CODES.get(dtype) if isinstance(dtype, str) else None
    if code is None:
        raise ValueError(
            f"dtype must be one of {', '.join(DATA_TYPES)}, got {dtype!r}"
        )
    return code


cdef int order_code(object order) except -1:
    code = ORDER_CODES.get(order) if isinstance(order, str) else None
    if code is None:
        raise ValueError(
            f"order must be one of {', '.join(WORD_ORDERS)}, got {order!r}"
        )
    return code


cdef double real(object value, str name) except? -1.0:
    if type(value) is float:
        return <double>value
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


cdef int check_transform(
    object scale, object offset, double* factor, double* shift
) except -1:
    factor[0] = real(scale, "scale")
    shift[0] = real(offset, "offset")
    if factor[0] == 0.0 or not isfinite(factor[0]):
        raise ValueError(f"scale must be finite and non-zero, got {factor[0]!r}")
    if not isfinite(shift[0]):
        raise ValueError(f"offset must be finite, got {shift[0]!r}")
    return 0


cdef object integer(object value, str name):
    if type(value) is int:
        return value
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__}"
        ) from None


cdef object count_of(object value, str name):
    number = integer(value, name)
    if number < 0:
        raise ValueError(f"{name} must be at least 0, got {number}")
    return number


cdef Py_ssize_t pump_count(object value) except -1:
    number = integer(value, "n_pumps")
    if not 0 <= number <= C_MAX_PUMPS:
        raise ValueError(f"n_pumps must be in [0, {C_MAX_PUMPS}], got {number}")
    return number


cdef int register_word(object value, Py_ssize_t index) except -1:
    if type(value) is int and 0 <= value <= 65535:
        return value
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"registers[{index}] must be an integer, got {type(value).__name__}"
        ) from None
    if not 0 <= number <= 65535:
        raise ValueError(f"registers[{index}] must be in [0, 65535], got {number}")
    return number


cdef cnp.ndarray input_array(object value, int typenum, str expected, str name):
    cdef cnp.ndarray array

    if not cnp.PyArray_Check(value):
        raise TypeError(
            f"{name} must be a numpy.ndarray of {expected}, "
            f"got {type(value).__name__}"
        )
    array = <cnp.ndarray>value
    if cnp.PyArray_TYPE(array) != typenum or not cnp.PyArray_ISNOTSWAPPED(array):
        raise TypeError(
            f"{name} must be a numpy.ndarray of {expected}, got {array.dtype}"
        )
    if cnp.PyArray_NDIM(array) != 1:
        raise ValueError(
            f"{name} must be one-dimensional, got {cnp.PyArray_NDIM(array)} "
            f"dimensions"
        )
    if not (cnp.PyArray_IS_C_CONTIGUOUS(array) and cnp.PyArray_ISALIGNED(array)):
        raise ValueError(f"{name} must be contiguous and aligned")
    return array


cdef cnp.ndarray output_array(object value, int typenum, str expected, str name):
    cdef cnp.ndarray array = input_array(value, typenum, expected, name)

    if not cnp.PyArray_ISWRITEABLE(array):
        raise ValueError(f"{name} must be writeable")
    return array


cdef int same_length(
    cnp.ndarray other, str other_name, cnp.ndarray first, str name
) except -1:
    if cnp.PyArray_DIM(other, 0) != cnp.PyArray_DIM(first, 0):
        raise ValueError(
            f"{other_name} must have as many elements as {name} "
            f"({cnp.PyArray_DIM(first, 0)}), got {cnp.PyArray_DIM(other, 0)}"
        )
    return 0


cdef str encode_message(str what, double value, int dtype, double raw):
    low, high = RANGES[dtype]
    return (
        f"cannot encode {what} = {value!r} as {DATA_TYPES[dtype]}: "
        f"scaled value {raw!r} is outside [{low!r}, {high!r}]"
    )


cdef str address_message(object start, object count, Py_ssize_t size):
    if count <= 1:
        return f"address {start} is outside the image of {size} registers"
    return (
        f"registers {start}..{start + count - 1} are outside the image "
        f"of {size} registers"
    )


cdef inline const double* doubles(cnp.ndarray array) noexcept:
    return <const double*>cnp.PyArray_DATA(array)


cdef inline const uint16_t* words16(cnp.ndarray array) noexcept:
    return <const uint16_t*>cnp.PyArray_DATA(array)


cdef inline const uint8_t* bytes8(cnp.ndarray array) noexcept:
    return <const uint8_t*>cnp.PyArray_DATA(array)


# ---------------------------------------------------------------------------
# Public codec functions

def width(dtype):
    """Registers (16 bits each) that one value of ``dtype`` takes."""
    return WIDTH[dtype_code(dtype)]


def encode(value, dtype, order="ABCD", scale=1.0, offset=0.0):
    """Registers that hold ``value * scale + offset`` as ``dtype`` in ``order``.

    Returns a tuple of ``width(dtype)`` ints in [0, 65535]. Raises
    ``EncodeError`` when the type cannot hold the scaled value.
    """
    cdef int kind = dtype_code(dtype)
    cdef int sequence = order_code(order)
    cdef double factor, shift
    cdef double number
    cdef double raw
    cdef uint64_t bits
    cdef uint16_t words[4]

    check_transform(scale, offset, &factor, &shift)
    number = real(value, "value")

    raw = scaled(number, factor, shift)
    if encode_bits(raw, kind, &bits) < 0 or overflowed(number, raw):
        raise EncodeError(encode_message("value", number, kind, raw))

    put_words(bits, WIDTH[kind], sequence, words)
    if WIDTH[kind] == 1:
        return (words[0],)
    if WIDTH[kind] == 2:
        return (words[0], words[1])
    return (words[0], words[1], words[2], words[3])


@cython.cdivision(True)
def decode(registers, dtype, order="ABCD", scale=1.0, offset=0.0):
    """The value ``(raw - offset) / scale`` held by ``registers``.

    ``registers`` is a sequence (or uint16 array) of exactly
    ``width(dtype)`` ints in [0, 65535].
    """
    cdef int kind = dtype_code(dtype)
    cdef int sequence = order_code(order)
    cdef double factor, shift
    cdef int count = WIDTH[kind]
    cdef uint16_t words[4]
    cdef Py_ssize_t i
    cdef double raw

    check_transform(scale, offset, &factor, &shift)

    if type(registers) is not tuple and not isinstance(
        registers, (Sequence, np.ndarray)
    ):
        raise TypeError(
            f"registers must be a sequence of integers, "
            f"got {type(registers).__name__}"
        )
    if len(registers) != count:
        raise ValueError(
            f"decoding {DATA_TYPES[kind]} needs {count} registers, "
            f"got {len(registers)}"
        )
    for i in range(count):
        words[i] = <uint16_t>register_word(registers[i], i)

    raw = decode_bits(get_words(words, count, sequence), kind)
    return (raw - shift) / factor


def encode_array(values, dtype, order="ABCD", scale=1.0, offset=0.0, out=None):
    """Registers of every value, ``width(dtype)`` per value, in input order.

    ``values`` is a one-dimensional contiguous float64 array; ``out``, when
    given, a writeable uint16 array of ``len(values) * width(dtype)``
    elements. Every value is checked before any register is written: one
    value that does not fit raises ``EncodeError`` naming its index, and
    ``out`` is left as it was.
    """
    cdef int kind = dtype_code(dtype)
    cdef int sequence = order_code(order)
    cdef double factor, shift
    cdef cnp.ndarray source
    cdef cnp.ndarray result
    cdef Py_ssize_t n, bad
    cdef int count = WIDTH[kind]

    check_transform(scale, offset, &factor, &shift)
    source = input_array(values, cnp.NPY_FLOAT64, "float64", "values")
    n = cnp.PyArray_DIM(source, 0)

    if out is None:
        result = np.empty(n * count, dtype=np.uint16)
    else:
        result = output_array(out, cnp.NPY_UINT16, "uint16", "out")
        if cnp.PyArray_DIM(result, 0) != n * count:
            raise ValueError(
                f"out must have {n * count} elements ({n} values of "
                f"{DATA_TYPES[kind]}, {count} registers each), "
                f"got {cnp.PyArray_DIM(result, 0)}"
            )

    bad = first_unencodable(doubles(source), n, kind, factor, shift)
    if bad >= 0:
        number = doubles(source)[bad]
        message = encode_message(
            f"values[{bad}]", number, kind, scaled(number, factor, shift)
        )
        raise EncodeError(message)

    encode_values(
        doubles(source),
        n,
        kind,
        sequence,
        factor,
        shift,
        <uint16_t*>cnp.PyArray_DATA(result),
    )
    return result


def decode_array(registers, dtype, order="ABCD", scale=1.0, offset=0.0):
    """Values held by consecutive groups of ``width(dtype)`` registers.

    ``registers`` is a one-dimensional contiguous uint16 array whose length
    is a multiple of ``width(dtype)``; the answer is a new float64 array.
    """
    cdef int kind = dtype_code(dtype)
    cdef int sequence = order_code(order)
    cdef double factor, shift
    cdef cnp.ndarray source
    cdef cnp.ndarray result
    cdef Py_ssize_t total
    cdef int count = WIDTH[kind]

    check_transform(scale, offset, &factor, &shift)
    source = input_array(registers, cnp.NPY_UINT16, "uint16", "registers")

    total = cnp.PyArray_DIM(source, 0)
    if total % count != 0:
        raise ValueError(
            f"registers must hold a whole number of {DATA_TYPES[kind]} values "
            f"({count} registers each), got {total} registers"
        )

    result = np.empty(total // count, dtype=np.float64)
    decode_values(
        words16(source),
        total // count,
        kind,
        sequence,
        factor,
        shift,
        <double*>cnp.PyArray_DATA(result),
    )
    return result


def register_map(n_pumps, float_order="ABCD"):
    """Every holding register and coil of a station image, in address order.

    Rows are ``RegisterRow(address, quantity, name, type, access,
    description)``: holding registers first, then the coils (type
    ``"coil"``). The image marks exactly the rows with access
    ``"read/write"`` writable.
    """
    pumps = pump_count(n_pumps)
    order_code(float_order)
    applied_type = f"float32 {float_order}"
    rows = [
        RegisterRow(
            HEARTBEAT,
            1,
            "heartbeat",
            "uint16",
            "read",
            "adapter heartbeat, +1 each second, wraps at 65535",
        ),
        RegisterRow(
            STATION_STATUS,
            1,
            "station_status",
            "bits",
            "read",
            "bit 0 any emergency stop, bit 1 failsafe, bit 2 plan stale, "
            "bit 3 storage degraded",
        ),
        RegisterRow(PUMP_COUNT, 1, "pump_count", "uint16", "read", "number of pumps"),
        RegisterRow(
            PLC_HEARTBEAT,
            1,
            "plc_heartbeat",
            "uint16",
            "read/write",
            "PLC heartbeat, incremented by the PLC",
        ),
        RegisterRow(
            PLC_HEARTBEAT_AGE,
            1,
            "plc_heartbeat_age",
            "uint16",
            "read",
            "seconds since the PLC heartbeat last changed, saturates at 65535",
        ),
        RegisterRow(
            STATION_LEVEL,
            1,
            "station_level",
            "int16",
            "read/write",
            "station level feedback, cm, written by the PLC",
        ),
        RegisterRow(
            LAYOUT_VERSION,
            1,
            "layout_version",
            "uint16",
            "read",
            f"register layout version ({IMAGE_LAYOUT})",
        ),
    ]

    for k in range(pumps):
        base = PUMP_BASE + PUMP_STRIDE * k
        name = f"pump{k}"
        rows += [
            RegisterRow(
                base + PUMP_APPLIED_X10,
                1,
                f"{name}.applied_x10",
                "uint16 x10",
                "read",
                "applied setpoint x 10 (engineering units, Hz by default)",
            ),
            RegisterRow(
                base + PUMP_APPLIED_FLOAT,
                2,
                f"{name}.applied",
                applied_type,
                "read",
                "applied setpoint (engineering units, Hz by default)",
            ),
            RegisterRow(
                base + PUMP_STATUS,
                1,
                f"{name}.status",
                "bits",
                "read",
                "bit 0 emergency stop, bit 1 failsafe, bit 2 clamped, "
                "bit 3 ramping, bit 4 last request rejected",
            ),
            RegisterRow(
                base + PUMP_TARGET_X10,
                1,
                f"{name}.target_x10",
                "uint16 x10",
                "read",
                "target x 10 (engineering units)",
            ),
            RegisterRow(
                base + PUMP_MIN_X10,
                1,
                f"{name}.min_x10",
                "uint16 x10",
                "read",
                "minimum value x 10 (engineering units)",
            ),
            RegisterRow(
                base + PUMP_MAX_X10,
                1,
                f"{name}.max_x10",
                "uint16 x10",
                "read",
                "maximum value x 10 (engineering units)",
            ),
            RegisterRow(
                base + PUMP_MAX_RATE_X10,
                1,
                f"{name}.max_rate_x10",
                "uint16 x10",
                "read",
                "maximum rate x 10 (units per second), 65535 when unlimited",
            ),
            RegisterRow(
                base + PUMP_SETPOINT_AGE,
                1,
                f"{name}.setpoint_age",
                "uint16",
                "read",
                "seconds since the last setpoint, saturates at 65535",
            ),
            RegisterRow(
                base + PUMP_OUTCOME,
                1,
                f"{name}.outcome",
                "uint16",
                "read",
                "last outcome: 0 accepted, 1 clamped, 2 rejected, 3 blocked",
            ),
        ]

    for k in range(pumps):
        base = FEEDBACK_BASE + FEEDBACK_STRIDE * k
        name = f"pump{k}"
        rows += [
            RegisterRow(
                base + FEEDBACK_SPEED_X10,
                1,
                f"{name}.speed_x10",
                "uint16 x10",
                "read/write",
                "actual speed x 10 (engineering units), written by the PLC",
            ),
            RegisterRow(
                base + FEEDBACK_RUNNING,
                1,
                f"{name}.running",
                "uint16",
                "read/write",
                "running: 0 or 1, written by the PLC",
            ),
            RegisterRow(
                base + FEEDBACK_POWER_X10,
                1,
                f"{name}.power_x10",
                "uint16 x10",
                "read/write",
                "power x 10 (kW), written by the PLC",
            ),
        ]

    rows += [
        RegisterRow(
            COIL_SYSTEM_ESTOP,
            1,
            "system_emergency_stop",
            "coil",
            "read",
            "system emergency stop active",
        ),
        RegisterRow(
            COIL_STATION_ESTOP,
            1,
            "station_emergency_stop",
            "coil",
            "read",
            "station emergency stop active",
        ),
    ]
    rows += [
        RegisterRow(
            COIL_PUMP_BASE + k,
            1,
            f"pump{k}.emergency_stop",
            "coil",
            "read",
            "pump covered by an emergency stop at any level",
        )
        for k in range(pumps)
    ]
    return rows


# ---------------------------------------------------------------------------
# The station image

cdef cnp.ndarray fixed_array(Py_ssize_t n, object dtype, list owners):
    """A zeroed array that nobody can resize: a view of an array kept hidden.

    A view does not own its memory, so NumPy refuses to resize it, and the
    owner is never handed out: the memory stays where the pointers taken
    from it point, for the life of the image.
    """
    owner = np.zeros(n, dtype=dtype)
    owners.append(owner)
    return owner[:]


cdef class StationImage:
    """The holding registers and coils that one Modbus unit id serves.

    StationImage(n_pumps, *, float_order="ABCD", size=None, n_coils=64)

    ``n_pumps`` is 0 to MAX_PUMPS (90); the registers number
    ``FEEDBACK_BASE + FEEDBACK_STRIDE * n_pumps`` or ``size`` if larger,
    the coils ``COIL_PUMP_BASE + n_pumps`` or ``n_coils`` if larger. The
    four arrays are allocated once and never replaced: a Modbus frame
    handler may keep pointers to them. Addresses are zero-based; the layout
    is :func:`register_map`.
    """

    def __cinit__(self, n_pumps, *, float_order="ABCD", size=None, n_coils=64):
        # All of the set-up happens here, so no image exists without its
        # arrays, whatever the caller does.
        cdef Py_ssize_t pumps = pump_count(n_pumps)
        cdef int order = order_code(float_order)
        cdef list owners = []

        needed = C_FEEDBACK_BASE + C_FEEDBACK_STRIDE * pumps
        registers = needed if size is None else max(count_of(size, "size"), needed)
        if registers > MAX_REGISTERS:
            raise ValueError(
                f"size must be at most {MAX_REGISTERS} registers, got {registers}"
            )
        coils = max(count_of(n_coils, "n_coils"), C_COIL_PUMP_BASE + pumps)
        if coils > MAX_COILS:
            raise ValueError(f"n_coils must be at most {MAX_COILS}, got {coils}")

        self.n_pumps = pumps
        self.order = order
        self.size = registers
        self.coil_count = coils
        self._registers = fixed_array(registers, np.uint16, owners)
        self._writable = fixed_array(registers, np.uint8, owners)
        self._coils = fixed_array(coils, np.uint8, owners)
        self._coil_writable = fixed_array(coils, np.uint8, owners)
        self._owners = tuple(owners)
        self.regs = <uint16_t*>cnp.PyArray_DATA(self._registers)
        self.wmask = <uint8_t*>cnp.PyArray_DATA(self._writable)
        self.coil_bits = <uint8_t*>cnp.PyArray_DATA(self._coils)

        for row in register_map(pumps, float_order):
            if row.type != "coil" and row.access == "read/write":
                self._writable[row.address : row.address + row.quantity] = 1
        self.regs[C_PUMP_COUNT] = <uint16_t>pumps
        self.regs[C_LAYOUT_VERSION] = C_IMAGE_LAYOUT

    @property
    def float_order(self):
        """Word order of the applied setpoint's float32 registers."""
        return WORD_ORDERS[self.order]

    @property
    def registers(self):
        """Holding registers, one uint16 per address (the same array always)."""
        return self._registers

    @property
    def writable(self):
        """1 where a Modbus client may write the register, else 0."""
        return self._writable

    @property
    def coils(self):
        """Coils, 0 or 1 (the same array always)."""
        return self._coils

    @property
    def coil_writable(self):
        """1 where a Modbus client may write the coil, else 0."""
        return self._coil_writable

    def set_heartbeat(self, value):
        """Set the adapter heartbeat register to ``value`` modulo 65536."""
        self.regs[C_HEARTBEAT] = <uint16_t>(integer(value, "heartbeat") % 65536)

    def set_station_status(self, bits):
        """Set the station status bits (STATION_* masks)."""
        number = integer(bits, "station status")
        if not 0 <= number <= 65535:
            raise ValueError(f"station status must be in [0, 65535], got {number}")
        self.regs[C_STATION_STATUS] = <uint16_t>number

    def set_plc_heartbeat_age(self, seconds):
        """Set the seconds since the PLC heartbeat changed (saturating)."""
        self.regs[C_PLC_HEARTBEAT_AGE] = saturated_seconds(real(seconds, "seconds"))

    def update_pumps(self, applied, status, first=0):
        """Write the applied setpoint and status of pumps ``first`` onward.

        ``applied`` (float64, engineering units, Hz by default) and
        ``status`` (uint16 status bits) are contiguous arrays of equal
        length. Each pump gets its value x 10 as uint16, the value as
        float32 in the image's word order, and its status bits. A value
        whose x 10 does not fit uint16 raises ``EncodeError`` naming the
        pump, and nothing is written.
        """
        cdef cnp.ndarray values = input_array(
            applied, cnp.NPY_FLOAT64, "float64", "applied"
        )
        cdef cnp.ndarray bits = input_array(
            status, cnp.NPY_UINT16, "uint16", "status"
        )
        cdef Py_ssize_t n = cnp.PyArray_DIM(values, 0)
        cdef Py_ssize_t start
        cdef Py_ssize_t bad

        same_length(bits, "status", values, "applied")
        start = self.pump_range(first, n)

        bad = first_bad_tenths(doubles(values), n)
        if bad >= 0:
            raise EncodeError(
                self.tenths_message(start + bad, "applied", doubles(values)[bad])
            )

        self.write_pumps(doubles(values), words16(bits), start, n)

    def update_details(self, target, age, outcome, first=0):
        """Write target x 10, setpoint age (seconds) and last outcome codes.

        ``target`` and ``age`` are float64, ``outcome`` uint8, contiguous and
        of equal length. Ages count whole seconds and saturate at 65535; a
        negative age is 0 and NaN is 65535. A target that does not fit
        raises ``EncodeError`` and nothing is written.
        """
        cdef cnp.ndarray targets = input_array(
            target, cnp.NPY_FLOAT64, "float64", "target"
        )
        cdef cnp.ndarray ages = input_array(age, cnp.NPY_FLOAT64, "float64", "age")
        cdef cnp.ndarray outcomes = input_array(
            outcome, cnp.NPY_UINT8, "uint8", "outcome"
        )
        cdef Py_ssize_t n = cnp.PyArray_DIM(targets, 0)
        cdef Py_ssize_t start
        cdef Py_ssize_t bad

        same_length(ages, "age", targets, "target")
        same_length(outcomes, "outcome", targets, "target")
        start = self.pump_range(first, n)

        bad = first_bad_tenths(doubles(targets), n)
        if bad >= 0:
            raise EncodeError(
                self.tenths_message(start + bad, "target", doubles(targets)[bad])
            )

        self.write_details(doubles(targets), doubles(ages), bytes8(outcomes), start, n)

    def set_limits(self, min_values, max_values, max_rates, first=0):
        """Write each pump's min and max value x 10 and max rate x 10.

        Arrays are float64, contiguous, of equal length; values in
        engineering units (Hz by default), rates in units per second. A
        max rate of infinity, or one whose x 10 reaches 65535 (6553.5 units
        per second or more), is written as 65535, "unlimited". Any value
        that does not fit raises ``EncodeError``; nothing is written.
        """
        cdef cnp.ndarray lows = input_array(
            min_values, cnp.NPY_FLOAT64, "float64", "min_values"
        )
        cdef cnp.ndarray highs = input_array(
            max_values, cnp.NPY_FLOAT64, "float64", "max_values"
        )
        cdef cnp.ndarray rates = input_array(
            max_rates, cnp.NPY_FLOAT64, "float64", "max_rates"
        )
        cdef Py_ssize_t n = cnp.PyArray_DIM(lows, 0)
        cdef Py_ssize_t start, i
        cdef double rate
        cdef uint16_t* block

        same_length(highs, "max_values", lows, "min_values")
        same_length(rates, "max_rates", lows, "min_values")
        start = self.pump_range(first, n)

        for i in range(n):
            if first_bad_tenths(doubles(lows) + i, 1) >= 0:
                raise EncodeError(
                    self.tenths_message(start + i, "min_value", doubles(lows)[i])
                )
            if first_bad_tenths(doubles(highs) + i, 1) >= 0:
                raise EncodeError(
                    self.tenths_message(start + i, "max_value", doubles(highs)[i])
                )
            rate = doubles(rates)[i]
            if not rate * 10.0 >= 65534.5 and first_bad_tenths(&rate, 1) >= 0:
                raise EncodeError(self.tenths_message(start + i, "max_rate", rate))

        for i in range(n):
            block = self.regs + C_PUMP_BASE + C_PUMP_STRIDE * (start + i)
            block[C_PUMP_MIN_X10] = checked_tenths(doubles(lows)[i])
            block[C_PUMP_MAX_X10] = checked_tenths(doubles(highs)[i])
            rate = doubles(rates)[i]
            if rate * 10.0 >= 65534.5:
                block[C_PUMP_MAX_RATE_X10] = C_SATURATED
            else:
                block[C_PUMP_MAX_RATE_X10] = checked_tenths(rate)

    def set_emergency_stops(self, system, station, pumps):
        """Set the emergency stop coils.

        ``pumps[k]`` is pump k's own stop; its coil shows 1 when any level
        (system, station or its own) covers it.
        """
        cdef bint system_stop
        cdef bint station_stop
        cdef Py_ssize_t k

        flags = [bool(flag) for flag in pumps]
        if len(flags) != self.n_pumps:
            raise ValueError(
                f"pumps must have {self.n_pumps} flags, one per pump, "
                f"got {len(flags)}"
            )
        system_stop = bool(system)
        station_stop = bool(station)

        self.coil_bits[C_COIL_SYSTEM_ESTOP] = system_stop
        self.coil_bits[C_COIL_STATION_ESTOP] = station_stop
        for k in range(self.n_pumps):
            covered = system_stop or station_stop or flags[k]
            self.coil_bits[C_COIL_PUMP_BASE + k] = 1 if covered else 0

    def write(
        self, address, value, dtype="uint16", order="ABCD", scale=1.0, offset=0.0
    ):
        """Encode one value into the registers from ``address`` on.

        Raises IndexError when the registers lie outside the image and
        ``EncodeError`` when the type cannot hold the value.
        """
        cdef int kind = dtype_code(dtype)
        cdef Py_ssize_t start = self.register_range(address, WIDTH[kind])
        cdef Py_ssize_t i

        words = encode(value, dtype, order, scale, offset)
        for i in range(WIDTH[kind]):
            self.regs[start + i] = <uint16_t>words[i]

    @cython.cdivision(True)
    def read(self, address, dtype="uint16", order="ABCD", scale=1.0, offset=0.0):
        """Decode one value from the registers from ``address`` on."""
        cdef int kind = dtype_code(dtype)
        cdef int sequence = order_code(order)
        cdef double factor, shift
        cdef double raw
        cdef Py_ssize_t start

        check_transform(scale, offset, &factor, &shift)
        start = self.register_range(address, WIDTH[kind])

        raw = decode_bits(get_words(self.regs + start, WIDTH[kind], sequence), kind)
        return (raw - shift) / factor

    def set_writable(self, address, count, writable=True):
        """Allow (or refuse) client writes to ``count`` registers."""
        cdef Py_ssize_t start

        number = count_of(count, "count")
        start = self.register_range(address, number)

        self._writable[start : start + number] = 1 if writable else 0

    def check_write(self, address, values):
        """0 when a client may write ``values`` (uint16) from ``address`` on.

        Otherwise the Modbus exception code: 2 (illegal data address) when a
        register is outside the image or read-only, 3 (illegal data value)
        when a value is outside its register's range (running is 0 or 1).
        """
        cdef cnp.ndarray words = input_array(values, cnp.NPY_UINT16, "uint16", "values")
        cdef Py_ssize_t n = cnp.PyArray_DIM(words, 0)
        cdef Py_ssize_t i, register, pump, field

        start = integer(address, "address")
        if start < 0 or start + n > self.size:
            return ILLEGAL_DATA_ADDRESS
        for i in range(n):
            if not self.wmask[start + i]:
                return ILLEGAL_DATA_ADDRESS

        for i in range(n):
            register = start + i
            if register < C_FEEDBACK_BASE:
                continue
            pump = (register - C_FEEDBACK_BASE) // C_FEEDBACK_STRIDE
            field = (register - C_FEEDBACK_BASE) % C_FEEDBACK_STRIDE
            if (
                pump < self.n_pumps
                and field == C_FEEDBACK_RUNNING
                and words16(words)[i] > 1
            ):
                return ILLEGAL_DATA_VALUE
        return 0

    cdef Py_ssize_t pump_range(self, object first, Py_ssize_t count) except -1:
        start = integer(first, "first")
        if start < 0 or start + count > self.n_pumps:
            raise IndexError(
                f"pumps {start}..{start + count - 1} are outside the image "
                f"of {self.n_pumps} pumps"
            )
        return start

    cdef Py_ssize_t register_range(self, object address, object count) except -1:
        start = integer(address, "address")
        if start < 0 or start + count > self.size:
            raise IndexError(address_message(start, count, self.size))
        return start

    cdef str tenths_message(self, Py_ssize_t pump, str field, double value):
        return encode_message(f"pump {pump} {field}", value, DT_UINT16, value * 10.0)

    cdef void write_pumps(
        self,
        const double* applied,
        const uint16_t* status,
        Py_ssize_t first,
        Py_ssize_t n,
    ) noexcept nogil:
        """Write pumps first..first+n-1; every value has passed first_bad_tenths."""
        cdef uint16_t* block = self.regs + C_PUMP_BASE + C_PUMP_STRIDE * first

        # One loop per word order, each with its order fixed at compile time.
        if self.order == WO_ABCD:
            write_pump_blocks(applied, status, n, WO_ABCD, block)
        elif self.order == WO_CDAB:
            write_pump_blocks(applied, status, n, WO_CDAB, block)
        elif self.order == WO_BADC:
            write_pump_blocks(applied, status, n, WO_BADC, block)
        else:
            write_pump_blocks(applied, status, n, WO_DCBA, block)

    cdef void write_details(
        self,
        const double* target,
        const double* age,
        const uint8_t* outcome,
        Py_ssize_t first,
        Py_ssize_t n,
    ) noexcept nogil:
        """Write pumps first..first+n-1; every target has passed first_bad_tenths."""
        cdef uint16_t* block = self.regs + C_PUMP_BASE + C_PUMP_STRIDE * first
        cdef Py_ssize_t i

        for i in range(n):
            block[C_PUMP_TARGET_X10] = checked_tenths(target[i])
            block[C_PUMP_SETPOINT_AGE] = saturated_seconds(age[i])
            block[C_PUMP_OUTCOME] = outcome[i]
            block += C_PUMP_STRIDE


cdef class ImageSet:
    """Several station images updated together, pumps in image order.

    ImageSet(images)

    Pump ``i`` of the set is pump ``i - s`` of the image whose pumps start
    at ``s``: the images' pumps concatenated, as a gate over all stations
    numbers them when stations are given in the same order. One call
    updates every image in one C loop.
    """

    def __cinit__(self, images):
        cdef Py_ssize_t index
        cdef Py_ssize_t total = 0
        cdef StationImage image

        self.starts = NULL
        self.counts = NULL

        chosen = tuple(images)
        seen = set()
        for index, candidate in enumerate(chosen):
            if not isinstance(candidate, StationImage):
                raise TypeError(
                    f"images[{index}] must be a StationImage, "
                    f"got {type(candidate).__name__}"
                )
            if id(candidate) in seen:
                raise ValueError(f"images[{index}] appears more than once")
            seen.add(id(candidate))

        self.starts = <Py_ssize_t*>PyMem_Malloc((len(chosen) + 1) * sizeof(Py_ssize_t))
        self.counts = <Py_ssize_t*>PyMem_Malloc((len(chosen) + 1) * sizeof(Py_ssize_t))
        if self.starts == NULL or self.counts == NULL:
            raise MemoryError()

        for index in range(len(chosen)):
            image = <StationImage>chosen[index]
            self.starts[index] = total
            self.counts[index] = image.n_pumps
            total += image.n_pumps
        self._images = chosen
        self.count = len(chosen)
        self.n_pumps = total

    def __dealloc__(self):
        PyMem_Free(self.starts)
        PyMem_Free(self.counts)

    @property
    def images(self):
        """The images, in pump order."""
        return self._images

    def update_pumps(self, applied, status):
        """Like StationImage.update_pumps for every pump of every image.

        ``applied`` (float64) and ``status`` (uint16) have one element per
        pump of the set. One value that does not fit raises ``EncodeError``
        naming the pump (its index in the set, its image and its index
        there) and no image is changed.
        """
        cdef cnp.ndarray values = input_array(
            applied, cnp.NPY_FLOAT64, "float64", "applied"
        )
        cdef cnp.ndarray bits = input_array(
            status, cnp.NPY_UINT16, "uint16", "status"
        )
        cdef Py_ssize_t bad, index

        same_length(bits, "status", values, "applied")
        self.check_length(values)

        bad = first_bad_tenths(doubles(values), self.n_pumps)
        if bad >= 0:
            raise EncodeError(
                encode_message(
                    f"{self.pump_name(bad)} applied",
                    doubles(values)[bad],
                    DT_UINT16,
                    doubles(values)[bad] * 10.0,
                )
            )

        for index in range(self.count):
            (<StationImage>self._images[index]).write_pumps(
                doubles(values) + self.starts[index],
                words16(bits) + self.starts[index],
                0,
                self.counts[index],
            )

    def update_details(self, target, age, outcome):
        """Like StationImage.update_details for every pump of every image."""
        cdef cnp.ndarray targets = input_array(
            target, cnp.NPY_FLOAT64, "float64", "target"
        )
        cdef cnp.ndarray ages = input_array(age, cnp.NPY_FLOAT64, "float64", "age")
        cdef cnp.ndarray outcomes = input_array(
            outcome, cnp.NPY_UINT8, "uint8", "outcome"
        )
        cdef Py_ssize_t bad, index

        same_length(ages, "age", targets, "target")
        same_length(outcomes, "outcome", targets, "target")
        self.check_length(targets)

        bad = first_bad_tenths(doubles(targets), self.n_pumps)
        if bad >= 0:
            raise EncodeError(
                encode_message(
                    f"{self.pump_name(bad)} target",
                    doubles(targets)[bad],
                    DT_UINT16,
                    doubles(targets)[bad] * 10.0,
                )
            )

        for index in range(self.count):
            (<StationImage>self._images[index]).write_details(
                doubles(targets) + self.starts[index],
                doubles(ages) + self.starts[index],
                bytes8(outcomes) + self.starts[index],
                0,
                self.counts[index],
            )

    cdef int check_length(self, cnp.ndarray values) except -1:
        if cnp.PyArray_DIM(values, 0) != self.n_pumps:
            raise ValueError(
                f"expected {self.n_pumps} values, one per pump, "
                f"got {cnp.PyArray_DIM(values, 0)}"
            )
        return 0

    cdef str pump_name(self, Py_ssize_t pump):
        cdef Py_ssize_t index = 0

        while index + 1 < self.count and self.starts[index + 1] <= pump:
            index += 1
        return f"pump {pump} (image {index} pump {pump - self.starts[index]})"
