"""The live Modbus server under hostile and careless clients.

Random and malformed frames never stop the server, never disturb a second
client polling at the same time, and never change a setpoint. Clients
that vanish, go half-open or never read their answers do not leak: the
connection count returns to zero. The fuzz run is short here; ``make
fuzz`` (CALEJO_FUZZ=1) runs a long one.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calejo_server.engine import RequestContext
from calejo_server.protocols.modbus import HIGH_WATER, SLICE

from .modbus_support import (
    WAIT,
    ModbusStack,
    RawClient,
    raw_client,
    read_request,
    registers_of,
    wait_until,
)

FUZZ = bool(os.environ.get("CALEJO_FUZZ"))
EXAMPLES = 300
FUZZ_EXAMPLES = 4_000
FUNCTIONS = (1, 2, 3, 4, 5, 6, 15, 16, 23)
CTX = RequestContext(user="tester", source_address=None, protocol="CLI")
ANSWER_SLACK = 22 * SLICE
"""The most answers one fed slice of requests can make (125 registers each)."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModbusStack]:
    made = ModbusStack(
        tmp_path_factory.mktemp("modbus-robust"), modbus={"idle_timeout": 0.5}
    )
    made.loop.run(made.engine.set_setpoint("north", "p1", 42.5, CTX))
    made.loop.run(made.engine.set_setpoint("south", "s1", 30.0, CTX))
    # p2 ramps: hold it where it is, so nothing moves during the tests.
    held = made.loop.call(lambda: made.engine.pump("north", "p2").applied)
    made.loop.run(made.engine.set_setpoint("north", "p2", held, CTX))
    try:
        yield made
    finally:
        made.close()


class Poller:
    """A second client reading unit 1's pump block without a pause."""

    def __init__(self, stack: ModbusStack) -> None:
        self.client = RawClient(stack.port)
        self.expected = self.client.read(1, 100, 8)
        self.polls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tid = 0
        while not self._stop.is_set():
            tid = (tid + 1) % 65536
            try:
                answer = self.client.request(read_request(tid, 1, 100, 8))
            except OSError as exc:
                self.errors.append(f"poll {self.polls}: {exc!r}")
                return
            if struct.unpack(">H", answer[:2])[0] != tid:
                self.errors.append(f"poll {self.polls}: answer {answer.hex()}")
            elif registers_of(answer) != self.expected:
                self.errors.append(f"poll {self.polls}: {registers_of(answer)}")
            self.polls += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.client.close()


def setpoints(stack: ModbusStack) -> tuple[list[float], list[float], list[int]]:
    """Targets and applied values of every pump, and each image's pump block."""

    def read() -> tuple[list[float], list[float], list[int]]:
        gate = stack.engine.gate
        blocks: list[int] = []
        for image in stack.engine.images.values():
            for k in range(image.n_pumps):
                start = 100 + 10 * k
                blocks += image.registers[start : start + 8].tolist()
        return gate.target.tolist(), gate.applied.tolist(), blocks

    return stack.loop.call(read)


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    """One request: well-formed, or off in its header, length or body."""
    kind = draw(st.sampled_from(("random", "pdu", "header")))
    if kind == "random":
        return draw(st.binary(max_size=300))

    function = draw(st.one_of(st.sampled_from(FUNCTIONS), st.integers(0, 255)))
    body = draw(st.binary(max_size=260))
    unit = draw(st.sampled_from((0, 1, 5, 9, 247, 255)))
    pdu = bytes([function]) + body
    length = len(pdu) + 1
    if kind == "header":
        length = draw(st.integers(0, 65535))
    protocol = draw(st.sampled_from((0, 0, 0, 1, 65535)))
    tid = draw(st.integers(0, 65535))
    return struct.pack(">HHHB", tid, protocol, length, unit) + pdu


def throw(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def assert_well_formed(answers: bytes) -> None:
    pos = 0
    while pos < len(answers):
        _, protocol, length = struct.unpack(">HHH", answers[pos : pos + 6])
        assert protocol == 0
        assert 2 <= length <= 254
        pos += 6 + length
    assert pos == len(answers), "an answer was cut short"


def fuzz(stack: ModbusStack, data: st.DataObject, poller: Poller) -> None:
    frames = data.draw(st.lists(frame(), min_size=1, max_size=8))
    answers = throw(stack.port, b"".join(frames))
    assert_well_formed(answers)
    assert not poller.errors, poller.errors[:3]


def run_fuzz(stack: ModbusStack, examples: int) -> None:
    before = setpoints(stack)
    poller = Poller(stack)

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        fuzz(stack, data, poller)

    try:
        check()
    finally:
        poller.stop()

    assert not poller.errors, poller.errors[:3]
    assert poller.polls > 10
    assert setpoints(stack) == before
    with raw_client(stack.port) as client:
        assert client.read(5, 2, 1) == [1]
    assert wait_until(lambda: stack.connections() == 0)


def test_random_and_malformed_frames(stack: ModbusStack) -> None:
    run_fuzz(stack, EXAMPLES)


@pytest.mark.slow
@pytest.mark.skipif(not FUZZ, reason="set CALEJO_FUZZ=1 (make fuzz)")
def test_random_and_malformed_frames_long(stack: ModbusStack) -> None:
    run_fuzz(stack, FUZZ_EXAMPLES)


def test_pipelined_requests_are_answered_in_order(stack: ModbusStack) -> None:
    requests = [read_request(tid, 1, 100 + tid % 10, 1 + tid % 5) for tid in range(40)]
    stream = b"".join(requests)

    with raw_client(stack.port) as client:
        client.send(stream)
        together = [client.answer() for _ in requests]
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in range(len(stream)):
            client.send(stream[byte : byte + 1])
        one_by_one = [client.answer() for _ in requests]

    for answers in (together, one_by_one):
        assert [struct.unpack(">H", a[:2])[0] for a in answers] == list(range(40))
        assert [len(registers_of(a)) for a in answers] == [
            1 + tid % 5 for tid in range(40)
        ]


def test_lost_framing_answers_what_came_before_then_closes(
    stack: ModbusStack,
) -> None:
    broken_before = stack.loop.call(lambda: stack.server.closed["broken"])
    good = read_request(1, 1, 2, 1)
    bad = struct.pack(">HHHB", 2, 0, 0, 1) + b"\x03\x00\x00\x00\x01"

    with raw_client(stack.port) as client:
        client.send(good + bad + good)
        assert registers_of(client.answer()) == [2]
        assert client.closed_by_server(5.0)

    assert stack.loop.call(lambda: stack.server.closed["broken"]) == broken_before + 1


def test_clients_that_vanish_do_not_leak(stack: ModbusStack) -> None:
    request = read_request(1, 1, 100, 10)
    for round_ in range(60):
        sock = socket.create_connection(("127.0.0.1", stack.port), timeout=WAIT)
        if round_ % 3 == 1:
            sock.sendall(request[:5])
        elif round_ % 3 == 2:
            sock.sendall(request * 50)
        if round_ % 2:
            # Reset instead of a clean close: SO_LINGER with a zero timeout.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        sock.close()

    assert wait_until(lambda: stack.connections() == 0)
    with raw_client(stack.port) as client:
        assert client.read(1, 2, 1) == [2]


def test_half_open_and_silent_connections_close_at_the_idle_timeout(
    stack: ModbusStack,
) -> None:
    idle_before = stack.loop.call(lambda: stack.server.closed["idle"])

    with (
        raw_client(stack.port) as half,
        raw_client(stack.port) as silent,
        raw_client(stack.port) as busy,
    ):
        half.send(read_request(1, 1, 0, 1)[:5])
        started = time.monotonic()
        deadline = started + 1.5
        while time.monotonic() < deadline:
            assert busy.read(1, 2, 1) == [2]
            time.sleep(0.1)
        assert half.closed_by_server(2.0)
        assert silent.closed_by_server(2.0)
        assert busy.read(1, 2, 1) == [2], "a client that keeps asking stays"

    assert wait_until(lambda: stack.connections() == 0)
    assert stack.loop.call(lambda: stack.server.closed["idle"]) >= idle_before + 2


def test_slow_reader_is_bounded_then_closed(tmp_path: Path) -> None:
    stack = ModbusStack(tmp_path, modbus={"idle_timeout": 2.0})
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", stack.port))
        sock.setblocking(False)
        request = read_request(1, 1, 100, 125) * 1000
        sent = 0
        largest = 0
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and sent < 20_000_000:
            try:
                sent += sock.send(request)
            except BlockingIOError:
                largest = max(largest, output_buffered(stack))
                if stack.loop.call(lambda: stack.server.paused) and sent > 100_000:
                    break
                time.sleep(0.01)

        with raw_client(stack.port) as other:
            assert other.read(1, 2, 1) == [2], "other clients are served meanwhile"
        largest = max(largest, output_buffered(stack))
        paused = stack.loop.call(lambda: stack.server.paused)
        closed = wait_until(lambda: stack.connections() == 0, 8.0)
        sock.close()
    finally:
        stack.close()

    assert paused >= 1
    assert 0 < largest <= HIGH_WATER + ANSWER_SLACK
    assert closed, "the connection that never reads is closed at the idle timeout"


def output_buffered(stack: ModbusStack) -> int:
    def largest() -> int:
        sizes = [
            connection.transport.get_write_buffer_size()
            for connection in stack.server.connections
            if connection.transport is not None
        ]
        return max(sizes, default=0)

    return stack.loop.call(largest)
