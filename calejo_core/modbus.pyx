# cython: language_level=3, embedsignature=True
"""Modbus TCP frames: bytes in, answers out, straight from register images.

A :class:`ModbusServerCore` holds the images that a server answers for,
one per unit id. A :class:`ModbusConnection` holds the framing state of one
TCP connection: the transport feeds it every read and writes back what
:meth:`ModbusConnection.feed` returns.

Served function codes (Modbus application protocol v1.1b3): 1 read coils,
2 read discrete inputs, 3 read holding registers, 4 read input registers,
5 write single coil, 6 write single register, 15 write multiple coils,
16 write multiple registers, 23 read/write multiple registers. Holding and
input registers are both the image's ``registers``; coils and discrete
inputs are both its ``coils``. Addresses are zero-based.

Raw pointers into the images are taken once, when a unit is set; every
address is checked against the image's length before it is used, so the
per-register work is plain C. A core and its connections belong to one
thread (the event loop's).
"""

import logging
import operator

cimport numpy as cnp
from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdint cimport uint8_t, uint16_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset

cnp.import_array()

logger = logging.getLogger(__name__)


cdef enum:
    # Exception codes of the Modbus application protocol.
    EXC_ILLEGAL_FUNCTION = 0x01
    EXC_ILLEGAL_DATA_ADDRESS = 0x02
    EXC_ILLEGAL_DATA_VALUE = 0x03
    EXC_SERVER_DEVICE_FAILURE = 0x04
    EXC_GATEWAY_TARGET_FAILED = 0x0B

    # What an on_write call is about.
    KIND_REGS = 0
    KIND_BITS = 1

    # Quantity limits per function code.
    MAX_READ_BITS = 2000
    MAX_READ_REGISTERS = 125
    MAX_WRITE_BITS = 1968
    MAX_WRITE_REGISTERS = 123
    MAX_RW_READ_REGISTERS = 125
    MAX_RW_WRITE_REGISTERS = 121

    # The MBAP header says the frame is not there yet, or cannot be.
    SIZE_INCOMPLETE = -1
    SIZE_INVALID = -2

    # The output buffer: its first size, and the size above which it is
    # given back after a feed.
    OUT_INITIAL = 4096
    OUT_KEEP = 65536


ILLEGAL_FUNCTION = EXC_ILLEGAL_FUNCTION
ILLEGAL_DATA_ADDRESS = EXC_ILLEGAL_DATA_ADDRESS
ILLEGAL_DATA_VALUE = EXC_ILLEGAL_DATA_VALUE
SERVER_DEVICE_FAILURE = EXC_SERVER_DEVICE_FAILURE
GATEWAY_TARGET_FAILED = EXC_GATEWAY_TARGET_FAILED

KIND_REGISTERS = KIND_REGS
KIND_COILS = KIND_BITS

_KIND_NAMES = ("registers", "coils")


cdef inline int _u16(const unsigned char *p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline Py_ssize_t _frame_size(
    const unsigned char *p, Py_ssize_t n
) noexcept nogil:
    """The size of the ADU at p (bytes), once its length field has arrived."""
    cdef int length

    if n < 6:
        return SIZE_INCOMPLETE

    length = _u16(p + 4)
    if length < MIN_MBAP_LENGTH or length > MAX_MBAP_LENGTH:
        return SIZE_INVALID
    return 6 + length


cdef inline Py_ssize_t _refuse(
    ModbusServerCore core, unsigned char *answer, int function, int code
) noexcept:
    core._exceptions += 1
    answer[0] = (function | 0x80) & 0xFF
    answer[1] = code
    return 2


cdef inline void _put_registers(
    unsigned char *dst, const uint16_t *src, Py_ssize_t count
) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint16_t value

    for i in range(count):
        value = src[i]
        dst[2 * i] = value >> 8
        dst[2 * i + 1] = value & 0xFF


cdef inline Py_ssize_t _put_bits(
    unsigned char *dst, const uint8_t *src, Py_ssize_t count
) noexcept nogil:
    cdef Py_ssize_t i
    cdef Py_ssize_t n_bytes = (count + 7) >> 3

    memset(dst, 0, n_bytes)
    for i in range(count):
        if src[i]:
            dst[i >> 3] |= 1 << (i & 7)
    return n_bytes


cdef inline int _check_write(
    const UnitView *view, int kind, int address, int count
) noexcept nogil:
    """0 when every addressed register or coil exists and is writable."""
    cdef const uint8_t *mask
    cdef Py_ssize_t limit
    cdef int i

    if kind == KIND_REGS:
        mask = view.writable
        limit = view.n_registers
    else:
        mask = view.coil_writable
        limit = view.n_coils

    if address + count > limit:
        return EXC_ILLEGAL_DATA_ADDRESS
    for i in range(count):
        if mask[address + i] == 0:
            return EXC_ILLEGAL_DATA_ADDRESS
    return 0


cdef class _Unit:
    """One served image and the exported buffers that pin its arrays."""

    def __cinit__(self, int unit, object image):
        self.image = image
        self.registers = _array(image, "registers", unit)
        self.writable = _array(image, "writable", unit)
        self.coils = _array(image, "coils", unit)
        self.coil_writable = _array(image, "coil_writable", unit)

        if self.writable.shape[0] != self.registers.shape[0]:
            raise ValueError(
                f"unit {unit}: writable has {self.writable.shape[0]} entries, "
                f"expected {self.registers.shape[0]} (one per register)"
            )
        if self.coil_writable.shape[0] != self.coils.shape[0]:
            raise ValueError(
                f"unit {unit}: coil_writable has "
                f"{self.coil_writable.shape[0]} entries, expected "
                f"{self.coils.shape[0]} (one per coil)"
            )

    cdef UnitView view(self):
        cdef UnitView view

        # Addresses are 16 bits: anything past 65536 entries is unreachable.
        view.present = True
        view.n_registers = min(self.registers.shape[0], 65536)
        view.n_coils = min(self.coils.shape[0], 65536)
        view.registers = &self.registers[0] if view.n_registers else NULL
        view.writable = &self.writable[0] if view.n_registers else NULL
        view.coils = &self.coils[0] if view.n_coils else NULL
        view.coil_writable = &self.coil_writable[0] if view.n_coils else NULL
        return view


def _array(object image, str name, int unit):
    """The image's array called name, as a writable contiguous buffer."""
    cdef uint16_t[::1] words
    cdef uint8_t[::1] octets

    try:
        array = getattr(image, name)
    except AttributeError:
        raise TypeError(
            f"unit {unit}: the image has no {name!r} array, expected a "
            f"StationImage, got {type(image).__name__}"
        ) from None

    expected = "uint16" if name == "registers" else "uint8"
    try:
        if name == "registers":
            words = array
            return words
        octets = array
        return octets
    except (TypeError, ValueError, BufferError) as exc:
        raise ValueError(
            f"unit {unit}: {name} must be a writable, contiguous {expected} "
            f"array, got {_describe(array)} ({exc})"
        ) from None


def _describe(object array):
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        return type(array).__name__
    return f"{type(array).__name__} of {dtype}"


cdef class ModbusServerCore:
    """The unit ids a server answers for, shared by all its connections.

    units maps a unit id (0..255) to a StationImage, or any object with
    the same four arrays: ``registers`` (uint16), ``writable`` (uint8, non
    zero where a client may write the register), ``coils`` (uint8, 0 or 1)
    and ``coil_writable`` (uint8). The arrays must never be reallocated;
    the core keeps them pinned while their unit is set.

    on_write(unit, kind, address, values) is called before a write is
    stored, with kind KIND_REGISTERS or KIND_COILS, the first address and
    the values as a uint16 array (coils as 0 or 1). It returns 0 to store
    them, or a Modbus exception code (1..255) to refuse them; nothing is
    stored then. When it raises, the client gets exception 04.
    """

    def __cinit__(self):
        self._units = [None] * UNIT_COUNT
        memset(self._views, 0, sizeof(self._views))

    def __init__(self, units, on_write=None):
        if on_write is not None and not callable(on_write):
            raise TypeError(
                "on_write must be callable or None, "
                f"got {type(on_write).__name__}"
            )
        self._on_write = on_write

        for unit, image in units.items():
            self.set_unit(unit, image)

    def set_unit(self, unit, image):
        """Serve image under the unit id (0..255), replacing any before."""
        cdef _Unit entry
        cdef int number = _unit_id(unit)

        entry = _Unit(number, image)
        self._units[number] = entry
        self._views[number] = entry.view()

    def remove_unit(self, unit):
        """Stop serving the unit id; its clients get exception 0x0B.

        Raises KeyError when the unit id is not served.
        """
        cdef int number = _unit_id(unit)

        if self._units[number] is None:
            raise KeyError(f"unit {number} is not served")

        memset(&self._views[number], 0, sizeof(UnitView))
        self._units[number] = None

    @property
    def units(self):
        """The served images by unit id (a new dict)."""
        return {
            number: (<_Unit>entry).image
            for number, entry in enumerate(self._units)
            if entry is not None
        }

    @property
    def frames(self):
        """Requests answered, exception answers included."""
        return self._frames

    @property
    def exceptions(self):
        """Requests answered with a Modbus exception."""
        return self._exceptions


cdef int _unit_id(object unit) except -1:
    cdef object number

    if isinstance(unit, bool):
        raise TypeError("unit id must be an int 0..255, got bool")
    try:
        number = operator.index(unit)
    except TypeError:
        raise TypeError(
            f"unit id must be an int 0..255, got {type(unit).__name__}"
        ) from None
    if not 0 <= number <= 255:
        raise ValueError(f"unit id must be 0..255, got {number}")
    return number


cdef class ModbusConnection:
    """The framing state of one TCP connection.

    feed() answers every complete request in the bytes received so far,
    in order, and keeps an incomplete one (at most 259 bytes) for the next
    call. A length field outside 2..254 loses the framing: the connection
    is then broken, answers nothing more, and should be closed.
    """

    def __cinit__(self, ModbusServerCore core not None):
        self._core = core
        self._n_pending = 0
        self._out = NULL
        self._out_len = 0
        self._out_cap = 0
        self._broken = False
        self._busy = False
        self._last_error = None

    def __dealloc__(self):
        free(self._out)
        self._out = NULL

    def feed(self, data):
        """Take the bytes of one TCP read; return the answers (bytes).

        The answers are those of every request completed by data, in
        order, concatenated; b"" when none is complete. No input bytes
        make it raise.
        """
        cdef Py_buffer buffer
        cdef bint release = False

        if self._busy:
            raise RuntimeError(
                "feed() called again from inside on_write of the same "
                "connection"
            )
        if self._broken:
            return b""

        self._busy = True
        try:
            if PyBytes_CheckExact(data):
                self._consume(
                    <const unsigned char *>PyBytes_AS_STRING(data),
                    PyBytes_GET_SIZE(data),
                )
            else:
                try:
                    PyObject_GetBuffer(data, &buffer, PyBUF_SIMPLE)
                except BufferError:
                    # A strided view: take a contiguous copy.
                    data = bytes(data)
                    PyObject_GetBuffer(data, &buffer, PyBUF_SIMPLE)
                release = True
                self._consume(<const unsigned char *>buffer.buf, buffer.len)

            if self._out_len == 0:
                return b""
            return PyBytes_FromStringAndSize(<char *>self._out, self._out_len)
        finally:
            if release:
                PyBuffer_Release(&buffer)
            self._out_len = 0
            if self._out_cap > OUT_KEEP:
                free(self._out)
                self._out = NULL
                self._out_cap = 0
            self._busy = False

    @property
    def broken(self):
        """True once the framing is lost; the connection should be closed."""
        return self._broken

    @property
    def buffered(self):
        """Bytes of an incomplete request kept for the next feed()."""
        return self._n_pending

    @property
    def last_error(self):
        """What last went wrong on this connection, or None."""
        return self._last_error

    cdef int _consume(
        self, const unsigned char *data, Py_ssize_t size
    ) except -1:
        """Answer every complete frame; keep the incomplete rest."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t frame

        if self._n_pending:
            self._fill_pending(data, size, &pos)
            if self._broken or self._n_pending:
                return 0

        while not self._broken:
            frame = _frame_size(data + pos, size - pos)
            if frame == SIZE_INVALID:
                self._set_broken(data + pos)
                return 0
            if frame == SIZE_INCOMPLETE or frame > size - pos:
                break
            self._answer(data + pos, frame)
            pos += frame

        if not self._broken and pos < size:
            # Shorter than its frame, so it fits in MAX_ADU_SIZE - 1 bytes.
            memcpy(self._pending, data + pos, size - pos)
            self._n_pending = size - pos
        return 0

    cdef int _fill_pending(
        self, const unsigned char *data, Py_ssize_t size, Py_ssize_t *pos
    ) except -1:
        """Complete the kept frame from data; answer it when complete."""
        cdef Py_ssize_t frame
        cdef Py_ssize_t take

        if self._n_pending < 6:
            take = min(6 - self._n_pending, size)
            memcpy(self._pending + self._n_pending, data, take)
            self._n_pending += take
            pos[0] = take

        frame = _frame_size(self._pending, self._n_pending)
        if frame == SIZE_INCOMPLETE:
            return 0
        if frame == SIZE_INVALID:
            self._set_broken(self._pending)
            return 0

        take = min(frame - self._n_pending, size - pos[0])
        memcpy(self._pending + self._n_pending, data + pos[0], take)
        self._n_pending += take
        pos[0] += take
        if self._n_pending < frame:
            return 0

        self._n_pending = 0
        self._answer(self._pending, frame)
        return 0

    cdef int _answer(self, const unsigned char *adu, Py_ssize_t size) except -1:
        """Append the answer to one complete ADU of size bytes."""
        cdef int protocol = _u16(adu + 2)
        cdef Py_ssize_t needed = self._out_len + MAX_ADU_SIZE
        cdef Py_ssize_t capacity
        cdef Py_ssize_t length
        cdef unsigned char *grown
        cdef unsigned char *answer

        if protocol != 0:
            self._last_error = (
                f"discarded a frame with protocol id {protocol}, expected 0 "
                f"(transaction {_u16(adu)}, unit {adu[6]})"
            )
            return 0

        if needed > self._out_cap:
            capacity = max(needed, 2 * self._out_cap, OUT_INITIAL)
            grown = <unsigned char *>realloc(self._out, capacity)
            if grown == NULL:
                raise MemoryError()
            self._out = grown
            self._out_cap = capacity

        # The answer is written in place; on_write cannot reach this buffer
        # (feed() is not re-entrant), so the pointer stays valid.
        answer = self._out + self._out_len
        length = self._pdu(adu[6], adu + MBAP_SIZE, size - MBAP_SIZE,
                           answer + MBAP_SIZE)
        answer[0] = adu[0]
        answer[1] = adu[1]
        answer[2] = 0
        answer[3] = 0
        answer[4] = (length + 1) >> 8
        answer[5] = (length + 1) & 0xFF
        answer[6] = adu[6]
        self._out_len += MBAP_SIZE + length
        self._core._frames += 1
        return 0

    cdef Py_ssize_t _pdu(
        self,
        int unit,
        const unsigned char *pdu,
        Py_ssize_t pdu_len,
        unsigned char *answer,
    ) except -1:
        """Answer one request PDU into answer; return the answer's length."""
        cdef ModbusServerCore core = self._core
        cdef const UnitView *view = &core._views[unit]
        cdef int function = pdu[0]
        cdef int address
        cdef int count
        cdef int byte_count
        cdef int read_address
        cdef int read_count
        cdef int code
        cdef int i
        cdef uint16_t values[MAX_WRITE_BITS]

        if not view.present:
            return _refuse(core, answer, function, EXC_GATEWAY_TARGET_FAILED)

        if function == 3 or function == 4:
            if pdu_len != 5:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            address = _u16(pdu + 1)
            count = _u16(pdu + 3)
            if count < 1 or count > MAX_READ_REGISTERS:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            if address + count > view.n_registers:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_ADDRESS)
            answer[0] = function
            answer[1] = 2 * count
            _put_registers(answer + 2, view.registers + address, count)
            return 2 + 2 * count

        if function == 1 or function == 2:
            if pdu_len != 5:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            address = _u16(pdu + 1)
            count = _u16(pdu + 3)
            if count < 1 or count > MAX_READ_BITS:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            if address + count > view.n_coils:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_ADDRESS)
            answer[0] = function
            answer[1] = _put_bits(answer + 2, view.coils + address, count)
            return 2 + answer[1]

        if function == 5:
            if pdu_len != 5:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            code = _u16(pdu + 3)
            if code != 0x0000 and code != 0xFF00:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            values[0] = 1 if code else 0
            code = self._write(unit, KIND_BITS, _u16(pdu + 1), values, 1)
            if code:
                return _refuse(core, answer, function, code)
            memcpy(answer, pdu, 5)
            return 5

        if function == 6:
            if pdu_len != 5:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            values[0] = _u16(pdu + 3)
            code = self._write(unit, KIND_REGS, _u16(pdu + 1), values, 1)
            if code:
                return _refuse(core, answer, function, code)
            memcpy(answer, pdu, 5)
            return 5

        if function == 15:
            if pdu_len < 6:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            count = _u16(pdu + 3)
            byte_count = pdu[5]
            if (
                count < 1
                or count > MAX_WRITE_BITS
                or byte_count != (count + 7) >> 3
                or pdu_len != 6 + byte_count
            ):
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            for i in range(count):
                values[i] = (pdu[6 + (i >> 3)] >> (i & 7)) & 1
            code = self._write(unit, KIND_BITS, _u16(pdu + 1), values, count)
            if code:
                return _refuse(core, answer, function, code)
            memcpy(answer, pdu, 5)
            return 5

        if function == 16:
            if pdu_len < 6:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            count = _u16(pdu + 3)
            byte_count = pdu[5]
            if (
                count < 1
                or count > MAX_WRITE_REGISTERS
                or byte_count != 2 * count
                or pdu_len != 6 + byte_count
            ):
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            for i in range(count):
                values[i] = _u16(pdu + 6 + 2 * i)
            code = self._write(unit, KIND_REGS, _u16(pdu + 1), values, count)
            if code:
                return _refuse(core, answer, function, code)
            memcpy(answer, pdu, 5)
            return 5

        if function == 23:
            if pdu_len < 10:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)
            read_address = _u16(pdu + 1)
            read_count = _u16(pdu + 3)
            count = _u16(pdu + 7)
            byte_count = pdu[9]
            if (
                read_count < 1
                or read_count > MAX_RW_READ_REGISTERS
                or count < 1
                or count > MAX_RW_WRITE_REGISTERS
                or byte_count != 2 * count
                or pdu_len != 10 + byte_count
            ):
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_VALUE)

            # Both ranges are checked before the write, so a refused
            # request changes nothing.
            if read_address + read_count > view.n_registers:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_ADDRESS)
            for i in range(count):
                values[i] = _u16(pdu + 10 + 2 * i)
            code = self._write(unit, KIND_REGS, _u16(pdu + 5), values, count)
            if code:
                return _refuse(core, answer, function, code)

            # on_write may have replaced the unit's image: look again.
            view = &core._views[unit]
            if not view.present:
                return _refuse(core, answer, function, EXC_GATEWAY_TARGET_FAILED)
            if read_address + read_count > view.n_registers:
                return _refuse(core, answer, function, EXC_ILLEGAL_DATA_ADDRESS)
            answer[0] = function
            answer[1] = 2 * read_count
            _put_registers(answer + 2, view.registers + read_address, read_count)
            return 2 + 2 * read_count

        return _refuse(core, answer, function, EXC_ILLEGAL_FUNCTION)

    cdef int _write(
        self, int unit, int kind, int address, uint16_t *values, int count
    ) except -1:
        """Store values if writable and accepted; else the exception code."""
        cdef ModbusServerCore core = self._core
        cdef const UnitView *view = &core._views[unit]
        cdef int code
        cdef int i

        code = _check_write(view, kind, address, count)
        if code:
            return code

        if core._on_write is not None:
            code = self._call_on_write(unit, kind, address, values, count)
            if code:
                return code

            # The callback may have replaced or removed the unit.
            view = &core._views[unit]
            if not view.present:
                return EXC_GATEWAY_TARGET_FAILED
            code = _check_write(view, kind, address, count)
            if code:
                return code

        if kind == KIND_REGS:
            memcpy(view.registers + address, values, count * sizeof(uint16_t))
            return 0
        for i in range(count):
            view.coils[address + i] = <uint8_t>values[i]
        return 0

    cdef int _call_on_write(
        self, int unit, int kind, int address, uint16_t *values, int count
    ) except -1:
        """Ask on_write; its answer as an exception code, 0 to store."""
        cdef cnp.npy_intp dims[1]
        cdef object array
        cdef object result
        cdef object code

        dims[0] = count
        array = cnp.PyArray_SimpleNew(1, dims, cnp.NPY_UINT16)
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>array), values, count * sizeof(uint16_t))

        try:
            result = self._core._on_write(unit, kind, address, array)
        except Exception as exc:
            self._last_error = (
                f"on_write raised {type(exc).__name__}: {exc} for unit "
                f"{unit} {_KIND_NAMES[kind]} {address}..{address + count - 1}"
                "; answered exception 04"
            )
            logger.error(
                "on_write failed for unit %d %s %d..%d; answered exception 04",
                unit,
                _KIND_NAMES[kind],
                address,
                address + count - 1,
                exc_info=True,
            )
            return EXC_SERVER_DEVICE_FAILURE

        try:
            if isinstance(result, bool):
                raise TypeError
            code = operator.index(result)
        except Exception:
            code = None
        if code is None or not 0 <= code <= 255:
            self._last_error = (
                f"on_write returned {result!r} for unit {unit} "
                f"{_KIND_NAMES[kind]} {address}..{address + count - 1}, "
                "expected 0 or an exception code 1..255; answered exception 04"
            )
            return EXC_SERVER_DEVICE_FAILURE
        return code

    cdef int _set_broken(self, const unsigned char *header) except -1:
        """Give up the framing: header's length field is out of range."""
        self._broken = True
        self._n_pending = 0
        self._last_error = (
            f"mbap length {_u16(header + 4)} outside 2..254 (transaction "
            f"{_u16(header)}); the framing is lost"
        )
        return 0
