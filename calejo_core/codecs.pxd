# cython: language_level=3
"""C-level declarations of the register codecs and the station image."""

from libc.stdint cimport uint8_t, uint16_t, uint64_t

cimport numpy as cnp


cdef enum:
    DT_UINT16 = 0
    DT_INT16 = 1
    DT_UINT32 = 2
    DT_INT32 = 3
    DT_FLOAT32 = 4
    DT_FLOAT64 = 5

cdef enum:
    WO_ABCD = 0
    WO_CDAB = 1
    WO_BADC = 2
    WO_DCBA = 3

# The image layout; the Python-level constants of the same names without
# the C_ prefix are these values.
cdef enum:
    C_HEARTBEAT = 0
    C_STATION_STATUS = 1
    C_PUMP_COUNT = 2
    C_PLC_HEARTBEAT = 3
    C_PLC_HEARTBEAT_AGE = 4
    C_STATION_LEVEL = 5
    C_LAYOUT_VERSION = 6
    C_IMAGE_LAYOUT = 1
    C_PUMP_BASE = 100
    C_PUMP_STRIDE = 10
    C_PUMP_APPLIED_X10 = 0
    C_PUMP_APPLIED_FLOAT = 1
    C_PUMP_STATUS = 3
    C_PUMP_TARGET_X10 = 4
    C_PUMP_MIN_X10 = 5
    C_PUMP_MAX_X10 = 6
    C_PUMP_MAX_RATE_X10 = 7
    C_PUMP_SETPOINT_AGE = 8
    C_PUMP_OUTCOME = 9
    C_FEEDBACK_BASE = 1000
    C_FEEDBACK_STRIDE = 10
    C_FEEDBACK_SPEED_X10 = 0
    C_FEEDBACK_RUNNING = 1
    C_FEEDBACK_POWER_X10 = 2
    C_MAX_PUMPS = 90
    C_SATURATED = 65535
    C_COIL_SYSTEM_ESTOP = 0
    C_COIL_STATION_ESTOP = 1
    C_COIL_PUMP_BASE = 100


# 0 when ``raw`` fits ``dtype`` (its bits, right-aligned, go to ``bits``),
# -1 when it does not.
cdef int encode_bits(double raw, int dtype, uint64_t* bits) noexcept nogil

# Write ``n`` registers of ``bits`` in word ``order`` to ``out``.
cdef void put_words(uint64_t bits, int n, int order, uint16_t* out) noexcept nogil

# The bits held by ``n`` registers in word ``order``.
cdef uint64_t get_words(const uint16_t* registers, int n, int order) noexcept nogil

# The raw (unscaled) value held by ``bits`` of ``dtype``.
cdef double decode_bits(uint64_t bits, int dtype) noexcept nogil


cdef class StationImage:
    cdef readonly Py_ssize_t n_pumps
    cdef int order
    cdef Py_ssize_t size
    cdef Py_ssize_t coil_count
    cdef cnp.ndarray _registers
    cdef cnp.ndarray _writable
    cdef cnp.ndarray _coils
    cdef cnp.ndarray _coil_writable
    cdef tuple _owners
    cdef uint16_t* regs
    cdef uint8_t* wmask
    cdef uint8_t* coil_bits

    cdef Py_ssize_t pump_range(self, object first, Py_ssize_t count) except -1
    cdef Py_ssize_t register_range(self, object address, object count) except -1
    cdef str tenths_message(self, Py_ssize_t pump, str field, double value)
    cdef void write_pumps(
        self,
        const double* applied,
        const uint16_t* status,
        Py_ssize_t first,
        Py_ssize_t n,
    ) noexcept nogil
    cdef void write_details(
        self,
        const double* target,
        const double* age,
        const uint8_t* outcome,
        Py_ssize_t first,
        Py_ssize_t n,
    ) noexcept nogil


cdef class ImageSet:
    cdef tuple _images
    cdef readonly Py_ssize_t n_pumps
    cdef Py_ssize_t count
    cdef Py_ssize_t* starts
    cdef Py_ssize_t* counts

    cdef int check_length(self, cnp.ndarray values) except -1
    cdef str pump_name(self, Py_ssize_t pump)
