"""Properties of the frame handler over random and hostile byte streams."""

from __future__ import annotations

import itertools
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calejo_core.modbus import ModbusConnection, ModbusServerCore

FUZZ = bool(os.environ.get("CALEJO_FUZZ"))
EXAMPLES = 200
FUZZ_EXAMPLES = 5_000
FUNCTIONS = (1, 2, 3, 4, 5, 6, 15, 16, 23)


class StandIn:
    """The four arrays of a station image, and nothing else."""

    def __init__(self, seed: int, n_registers: int = 120, n_coils: int = 40) -> None:
        rng = np.random.default_rng(seed)
        self.registers = rng.integers(0, 65536, n_registers, dtype=np.uint16)
        self.writable = (np.arange(n_registers) % 20 < 10).astype(np.uint8)
        self.coils = rng.integers(0, 2, n_coils, dtype=np.uint8)
        self.coil_writable = (np.arange(n_coils) % 8 < 4).astype(np.uint8)

    def copy(self) -> StandIn:
        twin = StandIn(0, len(self.registers), len(self.coils))
        for name in ("registers", "writable", "coils", "coil_writable"):
            getattr(twin, name)[:] = getattr(self, name)
        return twin


def served(seed: int) -> dict[int, StandIn]:
    return {1: StandIn(seed), 7: StandIn(seed + 1, 30, 8)}


def request_pdu(function: int, size: int, rng: np.random.Generator) -> bytes:
    """A well-formed request PDU, usually inside an image of size entries."""
    limits = {1: 2000, 2: 2000, 3: 125, 4: 125, 5: 1, 6: 1, 15: 1968, 16: 123}
    most = limits.get(function, 121)
    count = int(rng.integers(1, min(most, max(size, 1)) + 1))
    address = int(rng.integers(0, max(size - count, 0) + 1))
    if rng.integers(0, 8) == 0:
        address = int(rng.integers(0, 65536))
    words = rng.integers(0, 65536, count, dtype=np.uint16).astype(">u2").tobytes()

    if function in (1, 2, 3, 4):
        return struct.pack(">BHH", function, address, count)
    if function == 5:
        return struct.pack(">BHH", 5, address, int(rng.choice([0, 0xFF00])))
    if function == 6:
        return struct.pack(">BH", 6, address) + words
    if function == 15:
        bits = rng.integers(0, 256, (count + 7) // 8, dtype=np.uint8).tobytes()
        return struct.pack(">BHHB", 15, address, count, len(bits)) + bits
    if function == 16:
        return struct.pack(">BHHB", 16, address, count, len(words)) + words
    read_count = int(rng.integers(1, min(125, max(size, 1)) + 1))
    read_address = int(rng.integers(0, max(size - read_count, 0) + 1))
    head = struct.pack(
        ">BHHHHB", 23, read_address, read_count, address, count, len(words)
    )
    return head + words


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    """An ADU: a well-formed request, or one with a flaw.

    The flaws: a byte changed, the PDU cut short or lengthened, a length
    field that disagrees, another protocol id, a unit that is not served.
    """
    function = draw(st.sampled_from(FUNCTIONS))
    unit = draw(st.sampled_from([1, 1, 7, 7, 0, 2]))
    flaw = draw(st.integers(0, 11))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tid = int(rng.integers(0, 65536))
    size = 120 if function in (3, 4, 6, 16, 23) else 40
    if unit == 7:
        size = 30 if function in (3, 4, 6, 16, 23) else 8
    pdu = request_pdu(function, size, rng)
    protocol = 0
    length = len(pdu) + 1

    if flaw == 1:
        position = int(rng.integers(0, len(pdu)))
        pdu = pdu[:position] + bytes([int(rng.integers(0, 256))]) + pdu[position + 1 :]
    elif flaw == 2:
        pdu = pdu[: int(rng.integers(1, len(pdu) + 1))]
        length = len(pdu) + 1
    elif flaw == 3:
        pdu = pdu + rng.integers(0, 256, int(rng.integers(1, 8)), np.uint8).tobytes()
        length = len(pdu) + 1
    elif flaw == 4:
        length = int(rng.integers(0, 301))
    elif flaw == 5:
        protocol = int(rng.integers(1, 65536))
    return struct.pack(">HHHB", tid, protocol, length, unit) + pdu


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Runs of frames, now and then with garbage somewhere among them."""
    frames = draw(st.lists(frame(), min_size=3, max_size=25))
    if draw(st.integers(0, 3)) == 0:
        garbage = draw(st.binary(max_size=40))
        frames.insert(draw(st.integers(0, len(frames))), garbage)
    return b"".join(frames)


@st.composite
def cuts(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """stream split at random points: from none to between every byte."""
    n_points = draw(st.integers(0, len(stream)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    points = np.sort(rng.integers(0, len(stream) + 1, n_points)).tolist()
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def answers_are_well_formed(answer: bytes) -> int:
    """Check each answer's MBAP header; return how many there are."""
    count = 0
    while answer:
        _, protocol, length, _ = struct.unpack(">HHHB", answer[:7])
        assert protocol == 0
        assert 3 <= length <= 253
        assert len(answer) >= 6 + length
        function = answer[7]
        if function & 0x80:
            assert length == 3
        answer = answer[6 + length :]
        count += 1
    return count


def read_only_unchanged(before: dict[int, StandIn], after: dict[int, StandIn]) -> None:
    for unit, image in after.items():
        old = before[unit]
        locked = image.writable == 0
        assert np.array_equal(image.registers[locked], old.registers[locked])
        coils_locked = image.coil_writable == 0
        assert np.array_equal(image.coils[coils_locked], old.coils[coils_locked])
        assert set(np.unique(image.coils).tolist()) <= {0, 1}


def check_any_stream(data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    images = served(seed)
    before = {unit: image.copy() for unit, image in images.items()}
    core = ModbusServerCore(images)
    conn = ModbusConnection(core)
    stream = data.draw(st.one_of(streams(), st.binary(max_size=600)), label="stream")
    chunks = data.draw(cuts(stream), label="chunks")

    answers = []
    for chunk in chunks:
        answers.append(conn.feed(chunk))
        assert 0 <= conn.buffered < 260

    assert answers_are_well_formed(b"".join(answers)) == core.frames
    assert core.exceptions <= core.frames
    read_only_unchanged(before, images)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_stream_is_answered_without_raising_or_touching_read_only(
    data: st.DataObject,
) -> None:
    check_any_stream(data)


@pytest.mark.slow
@pytest.mark.skipif(not FUZZ, reason="set CALEJO_FUZZ=1 (make fuzz)")
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_stream_fuzz(data: st.DataObject) -> None:
    check_any_stream(data)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_splitting_a_stream_anywhere_changes_nothing(data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    whole_images = served(seed)
    split_images = served(seed)
    whole = ModbusConnection(ModbusServerCore(whole_images))
    split = ModbusConnection(ModbusServerCore(split_images))
    stream = data.draw(streams(), label="stream")
    chunks = data.draw(cuts(stream), label="chunks")

    expected = whole.feed(stream)
    answers = b"".join(split.feed(chunk) for chunk in chunks)

    assert answers == expected
    assert (split.broken, split.buffered) == (whole.broken, whole.buffered)
    assert split.last_error == whole.last_error
    for unit in whole_images:
        assert np.array_equal(
            split_images[unit].registers, whole_images[unit].registers
        )
        assert np.array_equal(split_images[unit].coils, whole_images[unit].coils)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.sampled_from([1, 7]), st.integers(0, 125), st.integers(1, 5)),
        min_size=1,
        max_size=40,
    ),
    data=st.data(),
)
def test_split_valid_reads_get_the_same_answers_as_whole(
    requests: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    images = served(3)
    stream = b"".join(
        struct.pack(">HHHBBHH", tid, 0, 6, unit, 3, address, count)
        for tid, (unit, address, count) in enumerate(requests)
    )
    chunks = data.draw(cuts(stream), label="chunks")

    expected = ModbusConnection(ModbusServerCore(images)).feed(stream)
    conn = ModbusConnection(ModbusServerCore(images))
    answers = b"".join(conn.feed(chunk) for chunk in chunks)

    assert answers == expected
    assert answers_are_well_formed(answers) == len(requests)
    assert conn.buffered == 0


def test_garbage_flood_breaks_early_and_keeps_memory_bounded() -> None:
    conn = ModbusConnection(ModbusServerCore(served(1)))
    garbage = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)

    answers = [
        conn.feed(garbage[i : i + 4096].tobytes()) for i in range(0, 1 << 20, 4096)
    ]

    assert conn.broken
    assert conn.buffered == 0
    assert b"".join(answers[1:]) == b""


def test_slow_drip_of_a_long_frame_keeps_one_frame() -> None:
    conn = ModbusConnection(ModbusServerCore(served(1)))
    frame = struct.pack(">HHHB", 1, 0, 254, 1) + b"\x10" + b"\x00" * 252

    sizes = []
    for byte in frame[:-1]:
        assert conn.feed(bytes([byte])) == b""
        sizes.append(conn.buffered)

    assert max(sizes) == 259
    assert conn.feed(frame[-1:]) == struct.pack(">HHHBBB", 1, 0, 3, 1, 0x90, 3)
    assert conn.buffered == 0
