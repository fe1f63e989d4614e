"""REST setpoint writes: the adapter beside a bare Starlette endpoint.

Both servers run as subprocesses on uvicorn + uvloop (one worker each) and
are driven by the same load client: a lean asyncio HTTP/1.1 keep-alive
client over raw sockets, 16 connections, one request in flight per
connection. The adapter's write is authenticated (bearer token), durable
(SQLite, fsynced commit before the answer) and audited; the bare endpoint
only parses the same JSON and answers.

Figures land in pytest-benchmark's ``extra_info``: ``writes_per_s``,
``p50_ms``, ``p99_ms`` (and the ratio to the bare endpoint), and for the
adapter the CPU time of the service process (``server_cpu_us_per_write``)
and of its OPC UA worker (``worker_cpu_us_per_write``) per write in the
round whose rate is reported. Run::

    .venv/bin/pytest benchmarks/test_bench_rest.py --benchmark-only \
        -p no:randomly --benchmark-columns=min,median,mean,ops,rounds
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.support import (
    adapter_env,
    admin_token,
    children,
    cpu_seconds,
    free_port,
    percentile,
    start_adapter,
    stop_process,
    wait_http,
)

CONNECTIONS = 16
REQUESTS_PER_ROUND = 20_000
ROUNDS = 3
STATIONS = 20
PUMPS_PER_STATION = 50
BATCH_PUMPS = STATIONS * PUMPS_PER_STATION
BATCH_ROUNDS = 20
ADMIN_PASSWORD = "bench-secret-passphrase-42"
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0

_results: dict[str, dict[str, float]] = {}


# -- the bare baseline ------------------------------------------------------


def bare_app() -> Any:
    """A Starlette app with one endpoint that parses a setpoint and answers."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def setpoint(request: Request) -> Response:
        body = orjson.loads(await request.body())
        value = body["value"]
        if not isinstance(value, int | float) or isinstance(value, bool):
            return Response(b'{"error":"unprocessable"}', 422)
        answer = {
            "station_id": request.path_params["station_id"],
            "pump_id": request.path_params["pump_id"],
            "outcome": "accepted",
            "requested": value,
            "target": value,
            "applied": value,
            "detail": None,
        }
        return Response(orjson.dumps(answer), media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route(
                "/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint",
                setpoint,
                methods=["PUT"],
            ),
            Route("/api/v1/health", health),
        ]
    )


def _serve_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(
        bare_app(),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


# -- the load client --------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return

        head = bytes(self.buffer[:end]).lower()
        length = 0
        at = head.find(b"content-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop > 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return

        status = int(head[9:12])
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("connection closed"))

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter


def _request(method: str, path: str, body: bytes, token: str | None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _load(
    port: int,
    requests: list[list[bytes]],
) -> tuple[float, list[float], dict[int, int]]:
    """Send each connection's requests in order; wall time and latencies."""
    loop = asyncio.get_running_loop()
    connections = []
    for _ in requests:
        _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        connections.append(protocol)

    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def drive(connection: _Connection, payloads: list[bytes]) -> None:
        clock = time.perf_counter
        for payload in payloads:
            started = clock()
            status, _ = await connection.request(payload)
            latencies.append(clock() - started)
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(
        *(drive(c, p) for c, p in zip(connections, requests, strict=True))
    )
    elapsed = time.perf_counter() - started

    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    return elapsed, latencies, statuses


def _run_load(
    port: int, requests: list[list[bytes]]
) -> tuple[float, list[float], dict[int, int]]:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_load(port, requests))


def _station(k: int) -> str:
    return f"bench_{k:02d}"


def _pump(k: int) -> str:
    return f"p{k:02d}"


def _setpoint_requests(
    token: str | None, total: int = REQUESTS_PER_ROUND
) -> list[list[bytes]]:
    """Each connection writes its own pump of the first station, in turn."""
    per_connection = total // CONNECTIONS
    requests = []
    for k in range(CONNECTIONS):
        path = f"/api/v1/pump-stations/{_station(0)}/pumps/{_pump(k)}/setpoint"
        payloads = [
            _request("PUT", path, b'{"value": %.1f}' % (30.0 + (i % 20)), token)
            for i in range(per_connection)
        ]
        requests.append(payloads)
    return requests


# -- the servers ------------------------------------------------------------


def _bench_config() -> str:
    lines = ["engine:", "  watchdog_timeout: 3600", "stations:"]
    for station in range(STATIONS):
        lines += [
            f"  - station_id: {_station(station)}",
            f"    name: Benchmark station {station}",
            "    pumps:",
        ]
        for pump in range(PUMPS_PER_STATION):
            lines += [
                f"      - pump_id: {_pump(pump)}",
                "        min_value: 20",
                "        max_value: 50",
                "        max_rate: 10",
                "        failsafe_value: 35",
            ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def adapter(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, str, int]]:
    """A real ``calejo serve`` (SQLite, one worker): port, token and pid."""
    folder = tmp_path_factory.mktemp("bench-rest")
    config = folder / "calejo.yaml"
    config.write_text(_bench_config(), encoding="utf-8")
    port = free_port()
    env = adapter_env(folder / "data", http=port, admin_password=ADMIN_PASSWORD)
    process = start_adapter(config, env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v1/health", process)
        yield port, admin_token(port, ADMIN_PASSWORD, 10.0), process.pid
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def bare() -> Iterator[int]:
    """The bare Starlette endpoint under uvicorn + uvloop; its port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", f"import test_bench_rest as b; b._serve_bare({port})"],
        cwd=Path(__file__).parent,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/v1/health", process)
        yield port
    finally:
        stop_process(process)


def _cpu(pids: list[int]) -> list[float]:
    return [cpu_seconds(pid) for pid in pids]


def _measure(
    benchmark: Any,
    name: str,
    port: int,
    requests: list[list[bytes]],
    server_pid: int | None = None,
) -> dict[str, float]:
    """The best of ``ROUNDS`` rounds; with ``server_pid``, the CPU time of
    that process and of its children (the OPC UA worker) per write."""
    figures: dict[str, float] = {}
    pids = [server_pid, *children(server_pid)] if server_pid is not None else []

    def one_round() -> None:
        before = _cpu(pids)
        elapsed, latencies, statuses = _run_load(port, requests)
        spent = [after - start for after, start in zip(_cpu(pids), before, strict=True)]
        assert set(statuses) == {200}, statuses
        rate = len(latencies) / elapsed
        if rate > figures.get("writes_per_s", 0.0):
            figures.update(
                writes_per_s=round(rate),
                p50_ms=round(percentile(latencies, 0.50) * 1000, 3),
                p99_ms=round(percentile(latencies, 0.99) * 1000, 3),
            )
            if spent:
                per_write = 1e6 / len(latencies)
                figures["server_cpu_us_per_write"] = round(spent[0] * per_write, 1)
                figures["worker_cpu_us_per_write"] = round(
                    sum(spent[1:]) * per_write, 1
                )

    _run_load(port, [r[:50] for r in requests])  # warm up
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    _results[name] = figures
    benchmark.extra_info.update(figures)
    benchmark.extra_info["requests_per_round"] = sum(len(r) for r in requests)
    benchmark.extra_info["connections"] = len(requests)
    return figures


@pytest.mark.benchmark(group="rest-setpoint-16-connections")
def test_bare_starlette_setpoint(benchmark: Any, bare: int) -> None:
    _measure(benchmark, "bare", bare, _setpoint_requests(None))


@pytest.mark.benchmark(group="rest-setpoint-16-connections")
def test_adapter_setpoint(
    benchmark: Any, adapter: tuple[int, str, int], bare: int
) -> None:
    port, token, pid = adapter
    figures = _measure(benchmark, "adapter", port, _setpoint_requests(token), pid)

    baseline = _results.get("bare")
    if baseline:
        benchmark.extra_info["fraction_of_bare"] = round(
            figures["writes_per_s"] / baseline["writes_per_s"], 3
        )


@pytest.mark.benchmark(group="rest-batch-1000-pumps")
def test_adapter_batch_setpoints(benchmark: Any, adapter: tuple[int, str, int]) -> None:
    port, token, _ = adapter
    items = [
        {"station_id": _station(s), "pump_id": _pump(p), "value": 30.0 + (p % 20)}
        for s in range(STATIONS)
        for p in range(PUMPS_PER_STATION)
    ]
    body = orjson.dumps({"setpoints": items})
    payload = _request("POST", "/api/v1/setpoints", body, token)
    requests = [[payload] * BATCH_ROUNDS]

    latencies: list[float] = []

    def one_round() -> None:
        _, lat, statuses = _run_load(port, requests)
        assert set(statuses) == {200}, statuses
        latencies.extend(lat)

    benchmark.pedantic(one_round, rounds=3, iterations=1)
    benchmark.extra_info.update(
        pumps_per_request=BATCH_PUMPS,
        p50_ms=round(percentile(latencies, 0.50) * 1000, 3),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 3),
        pump_writes_per_s=round(BATCH_PUMPS / percentile(latencies, 0.50)),
    )
