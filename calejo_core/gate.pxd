# cython: language_level=3
"""C-level view of the safety gate, for other Cython modules."""

cimport cython
from libc.stdint cimport uint8_t, uint16_t


cdef enum:
    GATE_ACCEPTED = 0
    GATE_CLAMPED = 1
    GATE_REJECTED = 2
    GATE_BLOCKED = 3


cdef enum:
    GATE_STATUS_EMERGENCY_STOP = 1
    GATE_STATUS_FAILSAFE = 2
    GATE_STATUS_CLAMPED = 4
    GATE_STATUS_RAMPING = 8
    GATE_STATUS_REJECTED = 16


cdef struct PumpTable:
    # The gate's arrays: limits and live state per pump, overrides per
    # station. The arrays are owned by the Gate and never reallocated.
    Py_ssize_t n_pumps
    Py_ssize_t n_stations
    const double *min_value
    const double *max_value
    const double *max_rate
    const double *failsafe_value
    const double *stop_value
    const double *min_switch_interval
    const uint8_t *allow_stop
    const Py_ssize_t *station
    double *target
    double *applied
    double *stopped_at
    uint16_t *status
    uint8_t *outcome
    uint8_t *pump_stop
    uint8_t *station_stop
    uint8_t *station_failsafe


@cython.final
cdef class PumpLimits:
    cdef readonly str pump_id
    cdef readonly double min_value
    cdef readonly double max_value
    cdef readonly double max_rate
    cdef readonly double failsafe_value
    cdef readonly double stop_value
    cdef readonly bint allow_stop
    cdef readonly double min_switch_interval

    cdef tuple _fields(self)


@cython.final
cdef class Gate:
    cdef PumpTable _table
    cdef double _last_tick
    cdef bint _system_stop
    cdef tuple _limits
    cdef list _owned

    # Read-only NumPy views handed out by the properties.
    cdef object _target_view
    cdef object _applied_view
    cdef object _status_view
    cdef object _outcome_view
    cdef object _stations_view

    cdef int _allocate(self, object stations) except -1
    cdef uint8_t request_c(self, Py_ssize_t pump, double value) noexcept nogil
    cdef Py_ssize_t tick_c(self, double now) noexcept nogil
    cdef void _refresh_overrides(self, Py_ssize_t pump, double now) noexcept nogil
    cdef double _stop_time(self, double now) noexcept nogil
