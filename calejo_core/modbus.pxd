# cython: language_level=3, embedsignature=True
"""Declarations of the Modbus TCP frame handler, for other Cython modules."""

from libc.stdint cimport uint8_t, uint16_t, uint64_t


cdef enum:
    MBAP_SIZE = 7          # transaction, protocol, length, unit
    MAX_ADU_SIZE = 260     # MBAP header + 253-byte PDU
    MIN_MBAP_LENGTH = 2    # unit + function code
    MAX_MBAP_LENGTH = 254  # unit + 253-byte PDU
    UNIT_COUNT = 256


cdef struct UnitView:
    # Raw views of one unit's image; valid while the owning _Unit lives.
    bint present
    uint16_t *registers
    uint8_t *writable
    Py_ssize_t n_registers
    uint8_t *coils
    uint8_t *coil_writable
    Py_ssize_t n_coils


cdef class _Unit:
    """One served image and the exported buffers that pin its arrays."""

    cdef readonly object image
    cdef uint16_t[::1] registers
    cdef uint8_t[::1] writable
    cdef uint8_t[::1] coils
    cdef uint8_t[::1] coil_writable

    cdef UnitView view(self)


cdef class ModbusServerCore:
    cdef UnitView _views[UNIT_COUNT]
    cdef list _units
    cdef object _on_write
    cdef uint64_t _frames
    cdef uint64_t _exceptions


cdef class ModbusConnection:
    cdef ModbusServerCore _core
    cdef unsigned char _pending[MAX_ADU_SIZE]
    cdef Py_ssize_t _n_pending
    cdef unsigned char *_out
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap
    cdef bint _broken
    cdef bint _busy
    cdef object _last_error

    cdef int _consume(self, const unsigned char *data, Py_ssize_t size) except -1
    cdef int _fill_pending(
        self, const unsigned char *data, Py_ssize_t size, Py_ssize_t *pos
    ) except -1
    cdef int _answer(self, const unsigned char *adu, Py_ssize_t size) except -1
    cdef Py_ssize_t _pdu(
        self,
        int unit,
        const unsigned char *pdu,
        Py_ssize_t pdu_len,
        unsigned char *answer,
    ) except -1
    cdef int _write(
        self, int unit, int kind, int address, uint16_t *values, int count
    ) except -1
    cdef int _call_on_write(
        self, int unit, int kind, int address, uint16_t *values, int count
    ) except -1
    cdef int _set_broken(self, const unsigned char *header) except -1
