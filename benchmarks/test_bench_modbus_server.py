"""Modbus TCP end to end: the adapter's server beside a bare pymodbus server.

Servers, each a process of its own on uvloop:

- ``adapter``: ``calejo serve`` (engine ticking, REST API, SQLite; OPC UA
  off), one station of 10 pumps served as unit 1.
- ``pymodbus``: pymodbus 3's ``ModbusTcpServer`` with an in-memory
  ``ModbusSequentialDataBlock`` of 1100 registers, nothing else.

"One core": each server process is pinned to the first CPU, the load
client to the others (on a machine with one CPU they share it). The load is
one client process of its own (raw asyncio protocols on uvloop, no Modbus
library): 16 connections, each keeping ``depth`` FC3 requests for 10
registers in flight and sending the next as soon as an answer arrives.
Every answer of such a request is exactly 29 bytes, so the client counts
answers by bytes received and never parses them; its cost is mostly the
system calls, one send and one receive per answer at depth 1. The client
samples the server process's CPU time (/proc/<pid>/stat) at the start and
the end of the measured window, after a warm-up; ``extra_info`` holds
``req_per_s``, ``server_cpu_us_per_req``, ``server_cpu_share`` (at most
1.0 on one core), ``client_cpu_share`` (near 1.0 means the client, not the
server, set the pace: the figure is then a lower bound) and, for the
adapter, the same figures of a pymodbus round run right after each of its
rounds: ``ratio_to_pymodbus`` (median of the paired throughput ratios) and
``cpu_ratio_to_pymodbus``. Targets: at least 40,000 requests/s, at most
20 µs of server CPU per request, at least 4 times pymodbus.

The same load (depth 1: one request in flight per connection) runs against
both servers: pymodbus answers one frame per TCP read, so it cannot take
pipelined requests. The adapter is also measured at depth 8.

``setpoint-to-modbus``: a PUT of a new setpoint over REST, then FC3 reads
of the pump's register until it shows the new value; the figure is the
time from the REST answer to the Modbus answer showing it (p50, p99;
targets 1.5 ms and 5 ms), beside the bare round trip of one FC3 read to
the pymodbus server. Run::

    .venv/bin/pytest benchmarks/test_bench_modbus_server.py --benchmark-only \\
        -p no:randomly --benchmark-group-by=group \\
        --benchmark-columns=min,median,mean,rounds
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.support import (
    REPO,
    adapter_env,
    admin_token,
    cpu_seconds,
    free_port,
    percentile,
    start_adapter,
    stop_process,
)

HERE = Path(__file__).resolve().parent
CONNECTIONS = 16
REGISTERS = 10
ANSWER_SIZE = 9 + 2 * REGISTERS
WARMUP = 1.0
WINDOW = 3.0
ROUNDS = 3
LATENCY_ROUNDS = 400
ADMIN_PASSWORD = "bench-modbus-passphrase-42"
START_TIMEOUT = 60.0

# "One core": each server process runs on CPU 0 alone, the load client on
# the other CPUs (when the machine has more than one).
CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPUS = {CPUS[0]}
CLIENT_CPUS = set(CPUS[1:]) or SERVER_CPUS


def _on_server_cpu() -> None:
    os.sched_setaffinity(0, SERVER_CPUS)


def _on_client_cpus() -> None:
    os.sched_setaffinity(0, CLIENT_CPUS)


def fc3(tid: int = 1, unit: int = 1, address: int = 100) -> bytes:
    return struct.pack(">HHHBBHH", tid, 0, 6, unit, 3, address, REGISTERS)


# -- the bare baseline --------------------------------------------------------


def serve_pymodbus(port: int) -> None:
    """A bare pymodbus TCP server on uvloop: 1100 registers of unit 1."""
    import logging

    import uvloop
    from pymodbus.datastore import (
        ModbusDeviceContext,
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus.server import StartAsyncTcpServer

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    block = ModbusSequentialDataBlock(1, list(range(1100)))
    context = ModbusServerContext(devices={1: ModbusDeviceContext(hr=block)})
    uvloop.run(StartAsyncTcpServer(context=context, address=("127.0.0.1", port)))


# -- the load client (a process of its own) ------------------------------------


class _Load(asyncio.Protocol):
    """Keeps ``depth`` requests in flight; counts answers by their bytes."""

    def __init__(self, depth: int, counts: list[int]) -> None:
        self.depth = depth
        self.counts = counts
        self.checked = False
        self.batches = [fc3() * n for n in range(depth + 1)]
        self.pending = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.batches[self.depth])

    def data_received(self, data: bytes) -> None:
        if not self.checked:
            # The first answer must be an FC3 answer of 10 registers.
            if data[7:9] != bytes((3, 2 * REGISTERS)):
                self.counts[1] += 1
                self.transport.close()
                return
            self.checked = True
        self.pending += len(data)
        done, self.pending = divmod(self.pending, ANSWER_SIZE)
        if done:
            self.counts[0] += done
            while done > self.depth:
                self.transport.write(self.batches[self.depth])
                done -= self.depth
            self.transport.write(self.batches[done])


async def _drive(
    port: int, server_pid: int, depth: int, seconds: float
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    counts = [0, 0]  # answers, connections whose first answer was wrong
    transports = []
    for _ in range(CONNECTIONS):
        transport, _ = await loop.create_connection(
            lambda: _Load(depth, counts), "127.0.0.1", port
        )
        transports.append(transport)

    await asyncio.sleep(WARMUP)
    first, server0, client0 = counts[0], cpu_seconds(server_pid), time.process_time()
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    done = counts[0] - first
    server = cpu_seconds(server_pid) - server0
    client = time.process_time() - client0

    for transport in transports:
        transport.close()
    if counts[1]:
        raise RuntimeError(f"{counts[1]} connections got a wrong first answer")
    return {
        "requests": done,
        "req_per_s": done / elapsed,
        "server_cpu_us_per_req": server / done * 1e6 if done else float("inf"),
        "server_cpu_share": server / elapsed,
        "client_cpu_share": client / elapsed,
    }


def client_main(port: int, server_pid: int, depth: int, seconds: float) -> None:
    """Entry point of the client process: prints its figures as JSON."""
    import uvloop

    figures = uvloop.run(_drive(port, server_pid, depth, seconds))
    print(json.dumps(figures), flush=True)


def run_load(port: int, server_pid: int, depth: int) -> dict[str, float]:
    command = (
        "import test_bench_modbus_server as b; "
        f"b.client_main({port}, {server_pid}, {depth}, {WINDOW})"
    )
    result = subprocess.run(
        [sys.executable, "-c", command],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=WARMUP + WINDOW + 60,
        check=True,
        preexec_fn=_on_client_cpus,
    )
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


# -- the servers ----------------------------------------------------------------


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} while starting")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock,
        ):
            sock.sendall(fc3())
            answer = sock.recv(64)
            if len(answer) >= 9:
                assert len(answer) == ANSWER_SIZE and answer[7] == 3, answer.hex()
                return
        time.sleep(0.05)
    pytest.fail(f"server not answering on port {port} after {START_TIMEOUT} s")


CONFIG = """\
engine:
  watchdog_timeout: 3600
opcua:
  enabled: false
stations:
  - station_id: bench
    unit_id: 1
    pumps:
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real ``calejo serve``: its pid, Modbus and HTTP ports, a token."""
    folder = tmp_path_factory.mktemp("bench-modbus")
    config = folder / "calejo.yaml"
    pumps = "".join(
        f"      - pump_id: p{k:02d}\n        min_value: 20\n        max_value: 50\n"
        "        max_rate: .inf\n        failsafe_value: 35\n"
        for k in range(10)
    )
    config.write_text(CONFIG + pumps, encoding="utf-8")
    http, modbus = free_port(), free_port()
    env = adapter_env(
        folder / "data", http=http, modbus=modbus, admin_password=ADMIN_PASSWORD
    )
    process = start_adapter(config, env, preexec=_on_server_cpu)
    try:
        _wait_port(modbus, process)
        yield {
            "pid": process.pid,
            "port": modbus,
            "http": http,
            "token": admin_token(http, ADMIN_PASSWORD, 10.0),
        }
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def bare() -> Iterator[dict[str, Any]]:
    """The bare pymodbus server: its pid and port."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import test_bench_modbus_server as b; b.serve_pymodbus({port})",
        ],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=_on_server_cpu,
    )
    try:
        _wait_port(port, process)
        yield {"pid": process.pid, "port": port}
    finally:
        stop_process(process)


def _measure(
    benchmark: Any,
    server: dict[str, Any],
    depth: int,
    baseline: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Rounds of load on ``server``; each followed by one on ``baseline``.

    Pairing every round with a baseline round taken right after it keeps
    the comparison fair when other work on the machine comes and goes.
    """
    rounds: list[dict[str, float]] = []
    paired: list[dict[str, float]] = []

    def one_round() -> None:
        rounds.append(run_load(server["port"], server["pid"], depth))
        if baseline is not None:
            paired.append(run_load(baseline["port"], baseline["pid"], 1))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    best = max(rounds, key=lambda figures: figures["req_per_s"])
    figures = {
        "req_per_s": round(best["req_per_s"]),
        "server_cpu_us_per_req": round(
            statistics.median(r["server_cpu_us_per_req"] for r in rounds), 2
        ),
        "server_cpu_share": round(best["server_cpu_share"], 2),
        "client_cpu_share": round(best["client_cpu_share"], 2),
    }
    if paired:
        figures.update(
            pymodbus_req_per_s=round(max(r["req_per_s"] for r in paired)),
            pymodbus_cpu_us_per_req=round(
                statistics.median(r["server_cpu_us_per_req"] for r in paired), 2
            ),
            ratio_to_pymodbus=round(
                statistics.median(
                    ours["req_per_s"] / theirs["req_per_s"]
                    for ours, theirs in zip(rounds, paired, strict=True)
                ),
                2,
            ),
        )
        figures["cpu_ratio_to_pymodbus"] = round(
            figures["pymodbus_cpu_us_per_req"] / figures["server_cpu_us_per_req"], 2
        )
    benchmark.extra_info.update(figures)
    benchmark.extra_info.update(
        connections=CONNECTIONS, depth=depth, registers=REGISTERS, window_s=WINDOW
    )
    return figures


@pytest.mark.benchmark(group="modbus-fc3-16-connections")
def test_pymodbus_fc3(benchmark: Any, bare: dict[str, Any]) -> None:
    _measure(benchmark, bare, depth=1)


@pytest.mark.benchmark(group="modbus-fc3-16-connections")
def test_adapter_fc3(
    benchmark: Any, adapter: dict[str, Any], bare: dict[str, Any]
) -> None:
    _measure(benchmark, adapter, depth=1, baseline=bare)


@pytest.mark.benchmark(group="modbus-fc3-16-connections")
def test_adapter_fc3_pipelined(
    benchmark: Any, adapter: dict[str, Any], bare: dict[str, Any]
) -> None:
    _measure(benchmark, adapter, depth=8, baseline=bare)


# -- REST setpoint acknowledged -> readable over Modbus -------------------------


class _Stream(asyncio.Protocol):
    """Bytes in, awaited by length or by a terminator."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


async def _http_put(stream: _Stream, payload: bytes) -> None:
    stream.transport.write(payload)
    while True:
        end = stream.buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(stream.buffer[:end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            if len(stream.buffer) >= end + 4 + length:
                assert head.startswith(b"http/1.1 200"), bytes(stream.buffer[:200])
                del stream.buffer[: end + 4 + length]
                return
        await stream.more()


async def _modbus_read(stream: _Stream, request: bytes) -> list[int]:
    stream.transport.write(request)
    while len(stream.buffer) < ANSWER_SIZE:
        await stream.more()
    answer = bytes(stream.buffer[:ANSWER_SIZE])
    del stream.buffer[:ANSWER_SIZE]
    return list(struct.unpack(f">{REGISTERS}H", answer[9:]))


async def _latencies(adapter: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    _, http = await loop.create_connection(_Stream, "127.0.0.1", adapter["http"])
    _, modbus = await loop.create_connection(_Stream, "127.0.0.1", adapter["port"])
    _, plain = await loop.create_connection(_Stream, "127.0.0.1", bare["port"])
    path = "/api/v1/pump-stations/bench/pumps/p00/setpoint"
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {adapter['token']}\r\n"
        "Content-Type: application/json\r\n"
    )
    request = fc3()
    visible: list[float] = []
    acks: list[float] = []
    baseline: list[float] = []
    reads = 0

    for index in range(LATENCY_ROUNDS):
        value = 30.0 + (index % 2) * 10.0
        body = b'{"value": %.1f}' % value
        payload = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        sent = time.perf_counter()
        await _http_put(http, payload)
        acked = time.perf_counter()
        while True:
            reads += 1
            if (await _modbus_read(modbus, request))[0] == round(value * 10):
                break
        visible.append(time.perf_counter() - acked)
        acks.append(acked - sent)

        started = time.perf_counter()
        await _modbus_read(plain, request)
        baseline.append(time.perf_counter() - started)

    for stream in (http, modbus, plain):
        stream.transport.close()
    return {
        "visible": visible,
        "acks": acks,
        "baseline": baseline,
        "extra_reads": reads - LATENCY_ROUNDS,
    }


@pytest.mark.benchmark(group="setpoint-to-modbus")
def test_rest_setpoint_readable_over_modbus(
    benchmark: Any, adapter: dict[str, Any], bare: dict[str, Any]
) -> None:
    import uvloop

    samples: dict[str, Any] = {}

    def one_round() -> None:
        samples.update(uvloop.run(_latencies(adapter, bare)))

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    ms = 1000.0
    benchmark.extra_info.update(
        rounds=LATENCY_ROUNDS,
        p50_ms=round(percentile(samples["visible"], 0.50) * ms, 3),
        p99_ms=round(percentile(samples["visible"], 0.99) * ms, 3),
        max_ms=round(max(samples["visible"]) * ms, 3),
        reads_that_saw_the_old_value=samples["extra_reads"],
        rest_ack_p50_ms=round(percentile(samples["acks"], 0.50) * ms, 3),
        pymodbus_round_trip_p50_ms=round(percentile(samples["baseline"], 0.50) * ms, 3),
        pymodbus_round_trip_p99_ms=round(percentile(samples["baseline"], 0.99) * ms, 3),
    )
