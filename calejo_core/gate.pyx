# cython: language_level=3, embedsignature=True
"""The safety gate: limits, ramps, emergency stops, failsafe, anti-cycling.

Every value that reaches a SCADA passes this gate. Values are in
engineering units (Hz unless configured), rates in units per second, times
in seconds on any monotonic origin chosen by the caller (the core reads no
clock).

Per pump the gate keeps a *target* (what was asked, after validation) and
an *applied* value (what SCADA sees). Rules:

* A request is REJECTED when the pump index is unknown or the value is not
  a finite real number; the target is left as it was.
* A request of exactly ``stop_value`` with ``allow_stop`` is a stop and is
  ACCEPTED; any other value outside ``[min_value, max_value]`` is CLAMPED
  to the nearest limit; otherwise it is ACCEPTED.
* While an emergency stop (system, the pump's station or the pump) covers
  the pump, a valid request is BLOCKED: its target is recorded, the applied
  value stays at ``stop_value``.
* The goal of a pump is ``stop_value`` under an emergency stop, else
  ``failsafe_value`` while its station is in failsafe, else its target.
* :meth:`Gate.tick` moves each applied value toward its goal at no more
  than ``max_rate``. When ``stop_value`` lies outside the limits, the band
  between them is no operating point: a start steps from ``stop_value`` to
  the nearest limit and ramps from there on later ticks; a stop ramps to
  that limit and then steps to ``stop_value``. So the applied value is
  always within the limits or exactly ``stop_value``. With an unlimited
  ``max_rate`` (inf) the applied value reaches its goal at the next tick,
  a start included.
* A pump whose applied value became ``stop_value`` at time t does not start
  again before t + ``min_switch_interval``.

The gate is not reentrant across threads beyond the GIL: each method holds
the GIL until it returns, so an emergency stop from one thread never
interleaves with a tick in another.
"""

import enum
import numbers
import operator

import numpy as np

cimport cython
cimport numpy as cnp
from cpython.exc cimport PyErr_Clear
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_CheckExact
from libc.math cimport INFINITY, isfinite
from libc.stdint cimport uint8_t, uint16_t

cnp.import_array()


cdef extern from "Python.h":
    # Declared without an exception value: on overflow it returns -1 with an
    # error set, which the caller clears (-1 is never a valid index).
    Py_ssize_t _as_ssize "PyLong_AsSsize_t" (object value)


cdef extern from "<assert.h>" nogil:
    # Checks internal invariants in the debug build (NDEBUG undefined);
    # compiles to nothing in the release build.
    void _debug_assert "assert" (bint condition)


cdef extern from *:
    """
    #if defined(CYTHON_TRACE) && CYTHON_TRACE
    #define CALEJO_GATE_DEBUG_BUILD 1
    #else
    #define CALEJO_GATE_DEBUG_BUILD 0
    #endif
    """
    const int CALEJO_GATE_DEBUG_BUILD


cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif

    /* The usual cases of a request and of a tick, eight pumps at a time with
       SSE2 (two doubles per register; status bits and outcomes eight to a
       register). Each function starts at pump ``start``, stops before the
       first block of eight that needs the general rules (an override bit, a
       value that is not finite, a start from stop_value, a stop across the
       band outside the limits) and returns where it stopped; the caller
       applies the general rules to that block and calls again. The
       arithmetic is that of the scalar code, operation for operation, so
       the results are the same bits. Without SSE2 they return ``start``. */

    #define CALEJO_BLOCK 8

    #if defined(__SSE2__)
    /* Eight 64-bit lane masks (all ones or zero) as eight 16-bit ones. */
    static inline __m128i calejo_pack_masks(__m128d m0, __m128d m1,
                                            __m128d m2, __m128d m3)
    {
        __m128 low = _mm_shuffle_ps(_mm_castpd_ps(m0), _mm_castpd_ps(m1),
                                    _MM_SHUFFLE(2, 0, 2, 0));
        __m128 high = _mm_shuffle_ps(_mm_castpd_ps(m2), _mm_castpd_ps(m3),
                                     _MM_SHUFFLE(2, 0, 2, 0));
        return _mm_packs_epi32(_mm_castps_si128(low), _mm_castps_si128(high));
    }

    static inline __m128d calejo_select(__m128d mask, __m128d yes, __m128d no)
    {
        return _mm_or_pd(_mm_and_pd(mask, yes), _mm_andnot_pd(mask, no));
    }

    /* 1 when no pump of the block has an emergency stop or failsafe bit. */
    static inline int calejo_plain(__m128i bits)
    {
        __m128i override = _mm_and_si128(bits, _mm_set1_epi16(3));
        return _mm_movemask_epi8(_mm_cmpeq_epi16(override,
                                                 _mm_setzero_si128())) == 0xFFFF;
    }
    #endif

    static Py_ssize_t calejo_request_blocks(
        Py_ssize_t start, Py_ssize_t n, const double *values,
        const double *min_value, const double *max_value,
        const double *stop_value, const unsigned char *allow_stop,
        const double *applied, double *target, unsigned short *status,
        unsigned char *last, unsigned char *outcomes)
    {
        Py_ssize_t i = start;
    #if defined(__SSE2__)
        const __m128d zero = _mm_setzero_pd();
        for (; i + CALEJO_BLOCK <= n; i += CALEJO_BLOCK) {
            __m128i bits = _mm_loadu_si128((const __m128i *)(status + i));
            __m128i refused, refused16, refused32[2];
            __m128d clamped[4], ramping[4], finite = _mm_cmpeq_pd(zero, zero);
            __m128i clamped16, outcome;
            int k;

            if (!calejo_plain(bits)) {
                break;
            }
            for (k = 0; k < 4; k++) {
                /* v - v is 0 for a finite v, NaN for NaN and infinity. */
                __m128d v = _mm_loadu_pd(values + i + 2 * k);
                finite = _mm_and_pd(finite, _mm_cmpeq_pd(_mm_sub_pd(v, v), zero));
            }
            if (_mm_movemask_pd(finite) != 3) {
                break;
            }

            /* Lane masks of the pumps whose stop request is not a stop. */
            refused = _mm_cmpeq_epi8(
                _mm_loadl_epi64((const __m128i *)(allow_stop + i)),
                _mm_setzero_si128());
            refused16 = _mm_unpacklo_epi8(refused, refused);
            refused32[0] = _mm_unpacklo_epi16(refused16, refused16);
            refused32[1] = _mm_unpackhi_epi16(refused16, refused16);

            for (k = 0; k < 4; k++) {
                Py_ssize_t j = i + 2 * k;
                __m128i half = refused32[k >> 1];
                __m128d no_stop = _mm_castsi128_pd((k & 1)
                    ? _mm_unpackhi_epi32(half, half)
                    : _mm_unpacklo_epi32(half, half));
                __m128d v = _mm_loadu_pd(values + j);
                __m128d low = _mm_loadu_pd(min_value + j);
                __m128d high = _mm_loadu_pd(max_value + j);
                __m128d stop = _mm_loadu_pd(stop_value + j);
                __m128d is_stop = _mm_andnot_pd(no_stop, _mm_cmpeq_pd(v, stop));
                __m128d below = _mm_cmplt_pd(v, low);
                __m128d above = _mm_cmpgt_pd(v, high);
                __m128d wanted = calejo_select(below, low, v);
                wanted = calejo_select(above, high, wanted);
                wanted = calejo_select(is_stop, stop, wanted);
                clamped[k] = _mm_andnot_pd(is_stop, _mm_or_pd(below, above));
                ramping[k] = _mm_cmpneq_pd(_mm_loadu_pd(applied + j), wanted);
                _mm_storeu_pd(target + j, wanted);
            }

            clamped16 = calejo_pack_masks(clamped[0], clamped[1], clamped[2],
                                          clamped[3]);
            bits = _mm_andnot_si128(_mm_set1_epi16(4 | 8 | 16), bits);
            bits = _mm_or_si128(bits, _mm_and_si128(clamped16, _mm_set1_epi16(4)));
            bits = _mm_or_si128(bits, _mm_and_si128(
                calejo_pack_masks(ramping[0], ramping[1], ramping[2], ramping[3]),
                _mm_set1_epi16(8)));
            _mm_storeu_si128((__m128i *)(status + i), bits);
            /* The outcome is 1 (clamped) or 0 (accepted). */
            outcome = _mm_and_si128(clamped16, _mm_set1_epi16(1));
            outcome = _mm_packus_epi16(outcome, outcome);
            _mm_storel_epi64((__m128i *)(last + i), outcome);
            _mm_storel_epi64((__m128i *)(outcomes + i), outcome);
        }
    #else
        (void)n; (void)values; (void)min_value; (void)max_value;
        (void)stop_value; (void)allow_stop; (void)applied; (void)target;
        (void)status; (void)last; (void)outcomes;
    #endif
        return i;
    }

    static Py_ssize_t calejo_advance_blocks(
        Py_ssize_t start, Py_ssize_t n, double now, double elapsed,
        double *applied, const double *target, const double *stop_value,
        const double *min_value, const double *max_value,
        const double *max_rate, double *stopped_at, unsigned short *status,
        Py_ssize_t *ramping)
    {
        Py_ssize_t i = start;
    #if defined(__SSE2__)
        const __m128d sign = _mm_set1_pd(-0.0);
        const __m128d span = _mm_set1_pd(elapsed);
        for (; i + CALEJO_BLOCK <= n; i += CALEJO_BLOCK) {
            __m128i bits = _mm_loadu_si128((const __m128i *)(status + i));
            __m128d general = _mm_setzero_pd(), after[4], moving[4];
            __m128i moving16;
            int k, landed = 0;

            if (!calejo_plain(bits)) {
                break;
            }
            for (k = 0; k < 4; k++) {
                Py_ssize_t j = i + 2 * k;
                __m128d before = _mm_loadu_pd(applied + j);
                __m128d goal = _mm_loadu_pd(target + j);
                __m128d stop = _mm_loadu_pd(stop_value + j);
                __m128d outside = _mm_or_pd(
                    _mm_cmplt_pd(stop, _mm_loadu_pd(min_value + j)),
                    _mm_cmpgt_pd(stop, _mm_loadu_pd(max_value + j)));
                __m128d step = _mm_mul_pd(_mm_loadu_pd(max_rate + j), span);
                __m128d gap = _mm_sub_pd(goal, before);
                /* before + copysign(step, gap); the goal once within a step. */
                __m128d moved = _mm_add_pd(
                    before, _mm_or_pd(_mm_and_pd(sign, gap),
                                      _mm_andnot_pd(sign, step)));
                __m128d next = calejo_select(
                    _mm_cmple_pd(_mm_andnot_pd(sign, gap), step), goal, moved);

                /* A move from stop_value (a start, anti-cycling), or to a
                   stop_value outside the limits: the general rules. */
                general = _mm_or_pd(general, _mm_and_pd(
                    _mm_cmpneq_pd(before, goal),
                    _mm_or_pd(_mm_cmpeq_pd(before, stop),
                              _mm_and_pd(_mm_cmpeq_pd(goal, stop), outside))));
                /* A pump at its goal keeps its value, bit for bit. */
                after[k] = calejo_select(_mm_cmpeq_pd(before, goal), before, next);
                moving[k] = _mm_cmpneq_pd(after[k], goal);
                landed |= _mm_movemask_pd(_mm_and_pd(
                    _mm_cmpeq_pd(after[k], stop),
                    _mm_cmpneq_pd(before, after[k]))) << (2 * k);
            }
            if (_mm_movemask_pd(general)) {
                break;
            }

            for (k = 0; k < 4; k++) {
                _mm_storeu_pd(applied + i + 2 * k, after[k]);
            }
            /* A ramp that ended on a stop_value within the limits. */
            for (k = 0; landed; k++, landed >>= 1) {
                if (landed & 1) {
                    stopped_at[i + k] = now;
                }
            }

            moving16 = calejo_pack_masks(moving[0], moving[1], moving[2],
                                         moving[3]);
            bits = _mm_andnot_si128(_mm_set1_epi16(8), bits);
            bits = _mm_or_si128(bits, _mm_and_si128(moving16, _mm_set1_epi16(8)));
            _mm_storeu_si128((__m128i *)(status + i), bits);
            /* Two mask bytes per ramping pump. */
            *ramping += __builtin_popcount(
                (unsigned)_mm_movemask_epi8(moving16)) / 2;
        }
    #else
        (void)n; (void)now; (void)elapsed; (void)applied; (void)target;
        (void)stop_value; (void)min_value; (void)max_value; (void)max_rate;
        (void)stopped_at; (void)status; (void)ramping;
    #endif
        return i;
    }
    """
    Py_ssize_t _request_blocks "calejo_request_blocks" (
        Py_ssize_t start,
        Py_ssize_t n,
        const double *values,
        const double *min_value,
        const double *max_value,
        const double *stop_value,
        const uint8_t *allow_stop,
        const double *applied,
        double *target,
        uint16_t *status,
        uint8_t *last,
        uint8_t *outcomes,
    ) noexcept nogil
    Py_ssize_t _advance_blocks "calejo_advance_blocks" (
        Py_ssize_t start,
        Py_ssize_t n,
        double now,
        double elapsed,
        double *applied,
        const double *target,
        const double *stop_value,
        const double *min_value,
        const double *max_value,
        const double *max_rate,
        double *stopped_at,
        uint16_t *status,
        Py_ssize_t *ramping,
    ) noexcept nogil


DEBUG_BUILD = bool(CALEJO_GATE_DEBUG_BUILD)

ACCEPTED = GATE_ACCEPTED
CLAMPED = GATE_CLAMPED
REJECTED = GATE_REJECTED
BLOCKED = GATE_BLOCKED

STATUS_EMERGENCY_STOP = GATE_STATUS_EMERGENCY_STOP
STATUS_FAILSAFE = GATE_STATUS_FAILSAFE
STATUS_CLAMPED = GATE_STATUS_CLAMPED
STATUS_RAMPING = GATE_STATUS_RAMPING
STATUS_REJECTED = GATE_STATUS_REJECTED

cdef uint16_t _REQUEST_BITS = GATE_STATUS_CLAMPED | GATE_STATUS_REJECTED
cdef uint16_t _OVERRIDE_BITS = GATE_STATUS_EMERGENCY_STOP | GATE_STATUS_FAILSAFE



class Outcome(enum.IntEnum):
    """The outcome of one setpoint request."""

    ACCEPTED = GATE_ACCEPTED
    CLAMPED = GATE_CLAMPED
    REJECTED = GATE_REJECTED
    BLOCKED = GATE_BLOCKED


cdef str _type_name(object value):
    return type(value).__name__


cdef bint _is_bool(object value) except -1:
    return isinstance(value, (bool, np.bool_))


cdef bint _is_real(object value) except -1:
    return isinstance(value, numbers.Real) and not _is_bool(value)


cdef bint _real_value(object value, double *result):
    """Store ``value`` in ``result``; False when it is not a real number.

    Never raises: whatever a hostile object does while being inspected or
    converted makes it "not a real number".
    """
    try:
        if not _is_real(value):
            return False
        result[0] = float(value)
    except Exception:
        return False
    return True


cdef inline bint _number(object value, double *result):
    if PyFloat_CheckExact(value):
        result[0] = PyFloat_AS_DOUBLE(value)
        return True
    return _real_value(value, result)


cdef Py_ssize_t _pump_index(object pump, Py_ssize_t n_pumps):
    """Return ``pump`` as an index below ``n_pumps``, or -1 if it is none."""
    cdef Py_ssize_t index

    if PyLong_CheckExact(pump):
        index = _as_ssize(pump)
        if index == -1:
            PyErr_Clear()
    else:
        try:
            if _is_bool(pump):
                return -1
            index = operator.index(pump)
        except Exception:
            return -1

    if index < 0 or index >= n_pumps:
        return -1
    return index


cdef Py_ssize_t _checked_index(object value, Py_ssize_t count, str what) except -1:
    """Return ``value`` as an index of one of ``count`` pumps or stations."""
    if _is_bool(value):
        raise TypeError(f"expected an integer {what} index, got bool")

    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(
            f"expected an integer {what} index, got {_type_name(value)}"
        ) from None

    if not 0 <= index < count:
        raise IndexError(
            f"{what} {index} out of range: the gate has {count} {what}s"
        )
    return index


cdef bint _checked_flag(object value, str name) except -1:
    if not _is_bool(value):
        raise TypeError(f"expected a bool for {name}, got {_type_name(value)}")
    return bool(value)


cdef inline double _toward(double value, double goal, double step) noexcept nogil:
    """Move ``value`` toward ``goal`` by at most ``step``."""
    if goal > value:
        return goal if goal - value <= step else value + step
    return goal if value - goal <= step else value - step


cdef object _readonly_view(object array):
    """A view of ``array`` that can never be made writeable."""
    return np.frombuffer(memoryview(array).toreadonly(), dtype=array.dtype)


cdef cnp.ndarray _checked_vector(
    object array, str name, int type_num, Py_ssize_t length
):
    """Return ``array`` checked as a 1-d array of ``type_num`` in native byte
    order, C-contiguous (a strided array is copied). ``length`` -1 accepts
    any length."""
    if not isinstance(array, cnp.ndarray):
        raise TypeError(f"expected a numpy array for {name}, got {_type_name(array)}")

    cdef cnp.ndarray checked = <cnp.ndarray>array
    if cnp.PyArray_TYPE(checked) != type_num or not cnp.PyArray_ISNOTSWAPPED(checked):
        raise TypeError(
            f"expected {name} of dtype {np.dtype(cnp.PyArray_TypeObjectFromType(type_num))}"
            f" in native byte order, got {array.dtype}"
        )
    if cnp.PyArray_NDIM(checked) != 1:
        raise ValueError(f"expected a 1-d array for {name}, got shape {array.shape}")
    if length >= 0 and cnp.PyArray_DIM(checked, 0) != length:
        raise ValueError(
            f"expected {length} entries in {name}, got {cnp.PyArray_DIM(checked, 0)}"
        )

    if not cnp.PyArray_IS_C_CONTIGUOUS(checked):
        return np.ascontiguousarray(checked)
    return checked


cdef cnp.ndarray _outcome_buffer(object out, Py_ssize_t length):
    if out is None:
        return cnp.PyArray_ZEROS(1, [length], cnp.NPY_UINT8, 0)

    if not isinstance(out, cnp.ndarray):
        raise TypeError(f"expected a numpy array for out, got {_type_name(out)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>out):
        raise ValueError("expected a contiguous array for out, got a strided one")
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        raise ValueError("expected a writeable array for out, got a read-only one")
    return _checked_vector(out, "out", cnp.NPY_UINT8, length)


cdef double _restored_value(object value, str name, Py_ssize_t pump) except? -1.0:
    if not _is_real(value):
        raise TypeError(
            f"pump {pump}: expected a real number for {name}, got {_type_name(value)}"
        )
    number = float(value)
    if not isfinite(number):
        raise ValueError(f"pump {pump}: expected a finite {name}, got {number!r}")
    return number


def _rebuild_limits(
    min_value, max_value, max_rate, failsafe_value, stop_value, allow_stop,
    min_switch_interval, pump_id,
):
    """Unpickle a :class:`PumpLimits`."""
    return PumpLimits(
        min_value, max_value, max_rate, failsafe_value, stop_value, allow_stop,
        min_switch_interval, pump_id=pump_id,
    )


@cython.final
cdef class PumpLimits:
    """PumpLimits(min_value, max_value, max_rate, failsafe_value, \
stop_value=0.0, allow_stop=True, min_switch_interval=0.0, *, pump_id='')

    Limits of one pump, in engineering units (Hz unless configured).

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
    Immutable.
    """

    def __cinit__(
        self,
        min_value,
        max_value,
        max_rate,
        failsafe_value,
        stop_value=0.0,
        allow_stop=True,
        min_switch_interval=0.0,
        *,
        pump_id="",
    ):
        if not isinstance(pump_id, str):
            raise TypeError(f"expected a str for pump_id, got {_type_name(pump_id)}")
        subject = f"pump {pump_id!r}" if pump_id else "pump limits"
        self.pump_id = pump_id

        self.min_value = _limit(min_value, "min_value", subject)
        self.max_value = _limit(max_value, "max_value", subject)
        self.max_rate = _limit(max_rate, "max_rate", subject)
        self.failsafe_value = _limit(failsafe_value, "failsafe_value", subject)
        self.stop_value = _limit(stop_value, "stop_value", subject)
        if not _is_bool(allow_stop):
            raise TypeError(
                f"{subject}: expected a bool for allow_stop, "
                f"got {_type_name(allow_stop)}"
            )
        self.allow_stop = allow_stop
        self.min_switch_interval = _limit(
            min_switch_interval, "min_switch_interval", subject
        )

        for name, value in (
            ("min_value", self.min_value),
            ("max_value", self.max_value),
            ("failsafe_value", self.failsafe_value),
            ("stop_value", self.stop_value),
        ):
            if not isfinite(value):
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
        if not (isfinite(self.min_switch_interval) and self.min_switch_interval >= 0.0):
            raise ValueError(
                f"{subject}: expected a finite min_switch_interval >= 0 "
                f"(seconds), got {self.min_switch_interval!r}"
            )

    cdef tuple _fields(self):
        return (
            self.min_value,
            self.max_value,
            self.max_rate,
            self.failsafe_value,
            self.stop_value,
            self.allow_stop,
            self.min_switch_interval,
            self.pump_id,
        )

    def __eq__(self, other):
        if not isinstance(other, PumpLimits):
            return NotImplemented
        return self._fields() == (<PumpLimits>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return (
            f"PumpLimits(min_value={self.min_value!r}, "
            f"max_value={self.max_value!r}, max_rate={self.max_rate!r}, "
            f"failsafe_value={self.failsafe_value!r}, "
            f"stop_value={self.stop_value!r}, allow_stop={self.allow_stop!r}, "
            f"min_switch_interval={self.min_switch_interval!r}, "
            f"pump_id={self.pump_id!r})"
        )

    def __reduce__(self):
        return _rebuild_limits, self._fields()


cdef double _limit(object value, str name, str subject) except? -1.0:
    if not _is_real(value):
        raise TypeError(
            f"{subject}: expected a real number for {name}, got {_type_name(value)}"
        )
    return float(value)


cdef object _station_indices(object stations, Py_ssize_t n_pumps, object n_stations):
    """Return the station of each pump as an intp array, and the station count.

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
        return np.zeros(n_pumps, dtype=np.intp), _station_count(0, n_stations)

    array = np.asarray(stations)
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.ndim == 1):
        raise TypeError(f"expected integer station indices, got {array.dtype}")
    if array.ndim != 1 or len(array) != n_pumps:
        raise ValueError(
            f"expected {n_pumps} station indices (one per pump), "
            f"got shape {array.shape}"
        )

    indices = array.tolist()
    bound = max(n_pumps, 1) if n_stations is None else n_stations
    for pump, station in enumerate(indices):
        if not 0 <= station < bound:
            raise ValueError(
                f"expected station indices in 0..{bound - 1} (below n_stations, "
                f"or the number of pumps when n_stations is not given), "
                f"got {station} for pump {pump}"
            )
    used = max(indices) + 1 if indices else 1
    return np.array(indices, dtype=np.intp), _station_count(used, n_stations)


cdef Py_ssize_t _station_count(Py_ssize_t used, object n_stations) except -1:
    if n_stations is None:
        return max(used, 1)
    if n_stations < 1:
        raise ValueError(f"expected n_stations >= 1, got {n_stations}")
    return n_stations


cdef inline uint8_t _reject(PumpTable *table, Py_ssize_t pump) noexcept nogil:
    _debug_assert(0 <= pump < table.n_pumps)
    table.status[pump] = (
        (table.status[pump] | GATE_STATUS_REJECTED) & ~GATE_STATUS_CLAMPED
    )
    table.outcome[pump] = GATE_REJECTED
    return GATE_REJECTED


cdef inline double _goal(const PumpTable *table, Py_ssize_t pump) noexcept nogil:
    """The value ``pump`` ramps toward: stop, failsafe or target."""
    _debug_assert(0 <= pump < table.n_pumps)
    cdef uint16_t status = table.status[pump]
    if status & GATE_STATUS_EMERGENCY_STOP:
        return table.stop_value[pump]
    if status & GATE_STATUS_FAILSAFE:
        return table.failsafe_value[pump]
    return table.target[pump]


cdef inline void _refresh_ramping(PumpTable *table, Py_ssize_t pump) noexcept nogil:
    if table.applied[pump] != _goal(table, pump):
        table.status[pump] |= GATE_STATUS_RAMPING
    else:
        table.status[pump] &= ~GATE_STATUS_RAMPING


cdef inline uint8_t _request(
    PumpTable *table, Py_ssize_t pump, double value
) noexcept nogil:
    """Apply one request of ``value`` (units) to ``pump``; return the outcome.

    An index out of range is REJECTED and touches nothing. Each array is
    read and written once, with locals between: a store through a uint8_t
    pointer may alias anything, and would make the compiler reload.
    """
    cdef uint8_t outcome = GATE_ACCEPTED
    cdef double target = value
    cdef double goal
    cdef uint16_t status
    if pump < 0 or pump >= table.n_pumps:
        return GATE_REJECTED
    if not isfinite(value):
        return _reject(table, pump)

    if table.allow_stop[pump] and value == table.stop_value[pump]:
        target = table.stop_value[pump]
    elif value < table.min_value[pump]:
        target = table.min_value[pump]
        outcome = GATE_CLAMPED
    elif value > table.max_value[pump]:
        target = table.max_value[pump]
        outcome = GATE_CLAMPED

    status = table.status[pump] & ~(_REQUEST_BITS | GATE_STATUS_RAMPING)
    goal = target
    if outcome == GATE_CLAMPED:
        status |= GATE_STATUS_CLAMPED
    if status & GATE_STATUS_EMERGENCY_STOP:
        outcome = GATE_BLOCKED
        goal = table.stop_value[pump]
    elif status & GATE_STATUS_FAILSAFE:
        goal = table.failsafe_value[pump]
    if table.applied[pump] != goal:
        status |= GATE_STATUS_RAMPING

    table.target[pump] = target
    table.status[pump] = status
    table.outcome[pump] = outcome
    return outcome


cdef void _request_every(
    PumpTable *table, const double *values, uint8_t *outcomes
) noexcept nogil:
    """Apply ``values[k]`` to pump k for every pump; outcomes to ``outcomes``.

    Blocks of eight pumps in the usual case (no override, finite values)
    go through ``_request_blocks``; the others through ``_request``.
    """
    cdef Py_ssize_t n = table.n_pumps
    cdef Py_ssize_t pump = 0
    cdef Py_ssize_t until

    while pump < n:
        pump = _request_blocks(
            pump,
            n,
            values,
            table.min_value,
            table.max_value,
            table.stop_value,
            table.allow_stop,
            table.applied,
            table.target,
            table.status,
            table.outcome,
            outcomes,
        )
        until = min(pump + 8, n)
        while pump < until:
            outcomes[pump] = _request(table, pump, values[pump])
            pump += 1


cdef inline double _next_applied(
    const PumpTable *table, Py_ssize_t pump, double goal, double now, double elapsed
) noexcept nogil:
    """The applied value of ``pump`` after ``elapsed`` seconds toward ``goal``."""
    cdef double applied = table.applied[pump]
    cdef double low = table.min_value[pump]
    cdef double high = table.max_value[pump]
    cdef double stop = table.stop_value[pump]
    cdef double step = table.max_rate[pump] * elapsed
    cdef double edge, moved

    if applied == stop:
        if now < table.stopped_at[pump] + table.min_switch_interval[pump]:
            return applied
        if stop < low and table.max_rate[pump] != INFINITY:
            return low
        if stop > high and table.max_rate[pump] != INFINITY:
            return high
        return _toward(applied, goal, step)

    if goal == stop and (stop < low or stop > high):
        edge = low if stop < low else high
        moved = _toward(applied, edge, step)
        return stop if moved == edge else moved

    return _toward(applied, goal, step)


cdef inline bint _advance_one(
    PumpTable *table, Py_ssize_t pump, double now, double elapsed
) noexcept nogil:
    """Move ``pump`` ``elapsed`` seconds toward its goal (0: only refresh its
    ramping bit); whether it still ramps."""
    cdef double goal = _goal(table, pump)
    cdef double before = table.applied[pump]
    cdef double after = before

    if elapsed > 0.0 and before != goal:
        after = _next_applied(table, pump, goal, now, elapsed)
        if after == table.stop_value[pump] and before != after:
            table.stopped_at[pump] = now
        table.applied[pump] = after

    if after != goal:
        table.status[pump] |= GATE_STATUS_RAMPING
        return True
    table.status[pump] &= ~GATE_STATUS_RAMPING
    return False


cdef Py_ssize_t _advance(PumpTable *table, double now, double elapsed) noexcept nogil:
    """Move every pump ``elapsed`` seconds toward its goal (0: only refresh the
    ramping bits); return how many still ramp.

    Blocks of eight pumps in the usual case (no override, ramping between
    the limits) go through ``_advance_blocks``; the others through
    ``_advance_one``.
    """
    cdef Py_ssize_t n = table.n_pumps
    cdef Py_ssize_t pump = 0
    cdef Py_ssize_t ramping = 0
    cdef Py_ssize_t until

    while pump < n:
        if elapsed > 0.0:
            pump = _advance_blocks(
                pump,
                n,
                now,
                elapsed,
                table.applied,
                table.target,
                table.stop_value,
                table.min_value,
                table.max_value,
                table.max_rate,
                table.stopped_at,
                table.status,
                &ramping,
            )
            until = min(pump + 8, n)
        else:
            until = n
        while pump < until:
            ramping += _advance_one(table, pump, now, elapsed)
            pump += 1
    return ramping


@cython.final
cdef class Gate:
    """Gate(limits, stations=None, now=0.0, *, n_stations=None)

    The gate over a fixed set of pumps grouped in stations.

    ``limits`` holds one :class:`PumpLimits` per pump, ``stations[k]`` the
    station index (0 .. n_stations - 1) of pump k (None: every pump in
    station 0), ``now`` the time in seconds of the initial state: target and
    applied values at ``stop_value``, no flags. ``n_stations`` may name more
    stations than the pumps use.

    The arrays behind the read-only views (``target``, ``applied``,
    ``status``, ``last_outcome``, ``stations``) live as long as the gate
    and are never reallocated.
    """

    def __cinit__(self, limits, stations=None, double now=0.0, *, n_stations=None):
        if isinstance(limits, (str, bytes)):
            raise TypeError(f"expected a sequence of PumpLimits, got {_type_name(limits)}")
        try:
            pump_limits = tuple(limits)
        except TypeError:
            raise TypeError(
                f"expected a sequence of PumpLimits, got {_type_name(limits)}"
            ) from None
        for index, entry in enumerate(pump_limits):
            if not isinstance(entry, PumpLimits):
                raise TypeError(
                    f"expected PumpLimits for pump {index}, got {_type_name(entry)}"
                )

        station_of, count = _station_indices(stations, len(pump_limits), n_stations)
        if not isfinite(now):
            raise ValueError(f"expected a finite time for now, got {now!r}")

        self._table.n_pumps = len(pump_limits)
        self._table.n_stations = count
        self._last_tick = now
        self._system_stop = False
        self._limits = pump_limits
        self._allocate(station_of)

    cdef int _allocate(self, object stations) except -1:
        """Allocate the arrays, fill in the limits and the initial state."""
        cdef PumpTable *table = &self._table

        limits = {
            name: np.array([getattr(e, name) for e in self._limits], dtype=np.float64)
            for name in (
                "min_value",
                "max_value",
                "max_rate",
                "failsafe_value",
                "stop_value",
                "min_switch_interval",
            )
        }
        allow_stop = np.array([e.allow_stop for e in self._limits], dtype=np.uint8)
        target = limits["stop_value"].copy()
        applied = limits["stop_value"].copy()
        stopped_at = np.full(table.n_pumps, -INFINITY, dtype=np.float64)
        status = np.zeros(table.n_pumps, dtype=np.uint16)
        outcome = np.zeros(table.n_pumps, dtype=np.uint8)
        pump_stop = np.zeros(table.n_pumps, dtype=np.uint8)
        station_stop = np.zeros(table.n_stations, dtype=np.uint8)
        station_failsafe = np.zeros(table.n_stations, dtype=np.uint8)
        self._owned = [
            *limits.values(), allow_stop, stations, target, applied, stopped_at,
            status, outcome, pump_stop, station_stop, station_failsafe,
        ]

        table.min_value = <double *>cnp.PyArray_DATA(limits["min_value"])
        table.max_value = <double *>cnp.PyArray_DATA(limits["max_value"])
        table.max_rate = <double *>cnp.PyArray_DATA(limits["max_rate"])
        table.failsafe_value = <double *>cnp.PyArray_DATA(limits["failsafe_value"])
        table.stop_value = <double *>cnp.PyArray_DATA(limits["stop_value"])
        table.min_switch_interval = <double *>cnp.PyArray_DATA(
            limits["min_switch_interval"]
        )
        table.allow_stop = <uint8_t *>cnp.PyArray_DATA(allow_stop)
        table.station = <Py_ssize_t *>cnp.PyArray_DATA(stations)
        table.target = <double *>cnp.PyArray_DATA(target)
        table.applied = <double *>cnp.PyArray_DATA(applied)
        table.stopped_at = <double *>cnp.PyArray_DATA(stopped_at)
        table.status = <uint16_t *>cnp.PyArray_DATA(status)
        table.outcome = <uint8_t *>cnp.PyArray_DATA(outcome)
        table.pump_stop = <uint8_t *>cnp.PyArray_DATA(pump_stop)
        table.station_stop = <uint8_t *>cnp.PyArray_DATA(station_stop)
        table.station_failsafe = <uint8_t *>cnp.PyArray_DATA(station_failsafe)

        self._target_view = _readonly_view(target)
        self._applied_view = _readonly_view(applied)
        self._status_view = _readonly_view(status)
        self._outcome_view = _readonly_view(outcome)
        self._stations_view = _readonly_view(stations)
        return 0

    def __repr__(self):
        return f"Gate(n_pumps={self._table.n_pumps}, n_stations={self._table.n_stations})"

    @property
    def n_pumps(self):
        """Number of pumps."""
        return self._table.n_pumps

    @property
    def n_stations(self):
        """Number of stations."""
        return self._table.n_stations

    @property
    def target(self):
        """Target of each pump after validation, read-only (units)."""
        return self._target_view

    @property
    def applied(self):
        """Applied value of each pump, what SCADA sees, read-only (units)."""
        return self._applied_view

    @property
    def status(self):
        """Status bits of each pump (STATUS_*), read-only."""
        return self._status_view

    @property
    def last_outcome(self):
        """Outcome of the last request of each pump, read-only."""
        return self._outcome_view

    @property
    def stations(self):
        """Station index of each pump, read-only."""
        return self._stations_view

    @property
    def last_tick(self):
        """Time in seconds of the latest tick (or of construction)."""
        return self._last_tick

    def limits(self, pump):
        """The limits of pump ``pump``."""
        return self._limits[_checked_index(pump, self._table.n_pumps, "pump")]

    def request(self, object pump, object value, double now):
        """Ask for setpoint ``value`` (units) on pump ``pump``; return the outcome.

        Never raises for a bad pump or value: those are REJECTED. ``now``
        (seconds) is the time of the request; the request moves no applied
        value, :meth:`tick` does.
        """
        cdef double number = 0.0
        cdef Py_ssize_t index = _pump_index(pump, self._table.n_pumps)
        if index < 0:
            return GATE_REJECTED

        if not _number(value, &number):
            return _reject(&self._table, index)
        return _request(&self._table, index, number)

    def request_many(self, pumps, values, double now, out=None):
        """Apply :meth:`request` to each ``(pumps[k], values[k])`` in order.

        ``pumps`` is an intp array, ``values`` a float64 array of the same
        length; a pump named twice keeps the last value. Returns the uint8
        outcomes, in ``out`` when given.
        """
        pump_array = _checked_vector(pumps, "pumps", cnp.NPY_INTP, -1)
        cdef Py_ssize_t n = len(pump_array)
        value_array = _checked_vector(values, "values", cnp.NPY_DOUBLE, n)
        outcomes = _outcome_buffer(out, n)

        cdef PumpTable table = self._table
        cdef const Py_ssize_t *pump_data = <const Py_ssize_t *>cnp.PyArray_DATA(
            pump_array
        )
        cdef const double *value_data = <const double *>cnp.PyArray_DATA(value_array)
        cdef uint8_t *outcome_data = <uint8_t *>cnp.PyArray_DATA(outcomes)
        cdef Py_ssize_t k
        for k in range(n):
            outcome_data[k] = _request(&table, pump_data[k], value_data[k])
        return outcomes

    def request_all(self, values, double now, out=None):
        """Apply :meth:`request` to every pump: ``values[k]`` for pump k.

        ``values`` is a float64 array of length n_pumps. Returns the uint8
        outcomes, in ``out`` when given.
        """
        value_array = _checked_vector(
            values, "values", cnp.NPY_DOUBLE, self._table.n_pumps
        )
        outcomes = _outcome_buffer(out, self._table.n_pumps)

        _request_every(
            &self._table,
            <const double *>cnp.PyArray_DATA(value_array),
            <uint8_t *>cnp.PyArray_DATA(outcomes),
        )
        return outcomes

    def tick(self, double now):
        """Advance every applied value toward its goal; return how many still ramp.

        Each value moves by at most ``max_rate * (now - last_tick)`` units,
        apart from the step between ``stop_value`` and the nearest limit
        when ``stop_value`` lies outside the limits. A tick not later than
        the last one moves nothing and keeps ``last_tick``. ``now`` must be
        finite (seconds).
        """
        if not isfinite(now):
            raise ValueError(f"expected a finite time for now, got {now!r}")
        return self.tick_c(now)

    def set_system_stop(self, active, double now):
        """Latch (``active``) or clear the emergency stop of every pump.

        Activating forces each covered pump's applied value to
        ``stop_value`` at once. A non-finite ``now`` (seconds) records the
        stop at ``last_tick``; the stop itself always takes effect.
        """
        cdef bint flag = _checked_flag(active, "active")
        cdef double moment = self._stop_time(now)
        cdef Py_ssize_t pump

        self._system_stop = flag
        for pump in range(self._table.n_pumps):
            self._refresh_overrides(pump, moment)

    def set_station_stop(self, station, active, double now):
        """Latch or clear the emergency stop of every pump of ``station``."""
        cdef Py_ssize_t index = _checked_index(station, self._table.n_stations, "station")
        cdef bint flag = _checked_flag(active, "active")
        cdef double moment = self._stop_time(now)
        cdef Py_ssize_t pump

        self._table.station_stop[index] = flag
        for pump in range(self._table.n_pumps):
            if self._table.station[pump] == index:
                self._refresh_overrides(pump, moment)

    def set_pump_stop(self, pump, active, double now):
        """Latch or clear the emergency stop of pump ``pump``."""
        cdef Py_ssize_t index = _checked_index(pump, self._table.n_pumps, "pump")
        cdef bint flag = _checked_flag(active, "active")
        cdef double moment = self._stop_time(now)

        self._table.pump_stop[index] = flag
        self._refresh_overrides(index, moment)

    def set_failsafe(self, station, active, double now):
        """Enter or leave failsafe for ``station``.

        Entering sets the target of the station's pumps to their
        ``failsafe_value``; leaving keeps the target until a fresh request.
        Setting the state it already has changes nothing.
        """
        cdef Py_ssize_t index = _checked_index(station, self._table.n_stations, "station")
        cdef bint flag = _checked_flag(active, "active")
        cdef double moment = self._stop_time(now)
        cdef PumpTable *table = &self._table
        cdef Py_ssize_t pump
        if table.station_failsafe[index] == flag:
            return

        table.station_failsafe[index] = flag
        for pump in range(table.n_pumps):
            if table.station[pump] != index:
                continue
            if flag:
                table.target[pump] = table.failsafe_value[pump]
            self._refresh_overrides(pump, moment)

    def is_stopped(self, pump):
        """Whether an emergency stop (any level) covers pump ``pump``."""
        cdef Py_ssize_t index = _checked_index(pump, self._table.n_pumps, "pump")
        return bool(self._table.status[index] & GATE_STATUS_EMERGENCY_STOP)

    def in_failsafe(self, station):
        """Whether ``station`` is in failsafe."""
        cdef Py_ssize_t index = _checked_index(station, self._table.n_stations, "station")
        return bool(self._table.station_failsafe[index])

    def restore(self, pump, target, applied):
        """Resume pump ``pump`` from persisted values, without a ramp.

        ``target`` is clamped into the limits (or kept at ``stop_value``
        with ``allow_stop``); ``applied`` is clamped into the limits unless
        it equals ``stop_value``, and stays ``stop_value`` while an
        emergency stop covers the pump. NaN or infinity raise ValueError.
        """
        cdef Py_ssize_t index = _checked_index(pump, self._table.n_pumps, "pump")
        cdef double wanted = _restored_value(target, "target", index)
        cdef double shown = _restored_value(applied, "applied", index)
        cdef PumpTable *table = &self._table
        cdef double low = table.min_value[index]
        cdef double high = table.max_value[index]
        cdef double stop = table.stop_value[index]

        if table.allow_stop[index] and wanted == stop:
            table.target[index] = stop
        else:
            table.target[index] = min(max(wanted, low), high)

        if table.status[index] & GATE_STATUS_EMERGENCY_STOP or shown == stop:
            table.applied[index] = stop
        else:
            table.applied[index] = min(max(shown, low), high)
        _refresh_ramping(table, index)

    cdef uint8_t request_c(self, Py_ssize_t pump, double value) noexcept nogil:
        """Apply one request of ``value`` (units) to ``pump``; return the outcome.

        The C-level :meth:`request`: an index out of range or a non-finite
        value is REJECTED.
        """
        return _request(&self._table, pump, value)

    cdef Py_ssize_t tick_c(self, double now) noexcept nogil:
        """The C-level :meth:`tick`; a non-finite ``now`` moves nothing."""
        cdef double elapsed = now - self._last_tick
        cdef PumpTable table = self._table
        if not (isfinite(now) and elapsed > 0.0):
            return _advance(&table, now, 0.0)

        self._last_tick = now
        return _advance(&table, now, elapsed)

    cdef void _refresh_overrides(self, Py_ssize_t pump, double now) noexcept nogil:
        """Bring the pump's flags, and under an emergency stop its applied
        value, in line with the latched stops and failsafe."""
        cdef PumpTable *table = &self._table
        _debug_assert(0 <= pump < table.n_pumps)
        cdef Py_ssize_t station = table.station[pump]
        cdef uint16_t status = table.status[pump] & ~_OVERRIDE_BITS
        _debug_assert(0 <= station < table.n_stations)

        if table.station_failsafe[station]:
            status |= GATE_STATUS_FAILSAFE
        if self._system_stop or table.station_stop[station] or table.pump_stop[pump]:
            status |= GATE_STATUS_EMERGENCY_STOP
            if table.applied[pump] != table.stop_value[pump]:
                table.applied[pump] = table.stop_value[pump]
                table.stopped_at[pump] = now
        table.status[pump] = status
        _refresh_ramping(table, pump)

    cdef double _stop_time(self, double now) noexcept nogil:
        return now if isfinite(now) else self._last_tick
