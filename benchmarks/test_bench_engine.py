"""The engine's tick at 10,000 pumps, and the memory of that engine.

One round is one :meth:`Engine.tick` of an engine with 125 stations of 80
pumps (10,000 pumps; a station image holds at most 90): the gate's ramps,
every image's applied values and status bits, the heartbeat and, once a
second, every pump's target, setpoint age and outcome, plus the watchdog,
plan and checkpoint checks. Two cases:

- ``steady``: every pump at its target (the usual state);
- ``ramping``: every pump ramping (the worst case: every image changes
  and ramp progress is checkpointed).

Beside each, in the same run, the baseline: a naive per-pump Python loop
doing the same tick through the pure-Python reference gate
(:mod:`calejo_core.reference.gate`) and writing each pump's registers with
the reference codecs. ``extra_info`` records the resident memory of the
benchmark process after the engine was built (``rss_mb``) and what
building it added (``engine_rss_mb``).

``adapter resident memory``: a whole adapter, ``calejo serve`` in a
process of its own (engine, REST API, Modbus TCP, OPC UA with a node set
for every pump, SQLite), with the same 10,000 pumps, beside the same
adapter with one station of 10 pumps. The timed round is the start, until
the REST API answers; then an operator logs in, a setpoint for every pump
goes in through ``POST /setpoints`` (batches of 1,000), the station list
is read once and the adapter runs a few seconds. The adapter is two
processes, the service and its OPC UA worker; ``extra_info`` holds, at the
end, the resident memory of each (``rss_mb``, ``worker_rss_mb``), their
sum (``total_rss_mb``, which counts the libraries both map twice) and
their proportional sum (``total_pss_mb``, which counts shared pages once:
the adapter's footprint), the latter right after the start too
(``started_total_pss_mb``), and the peaks (VmHWM; the service's includes
the 64 MiB that each Argon2 password check of a login holds for a
moment).
Run::

    .venv/bin/pytest benchmarks/test_bench_engine.py --benchmark-only \
        --benchmark-group-by=group -p no:randomly

Targets: tick <= 1 ms, resident memory <= 300 MB.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from pytest_benchmark.fixture import BenchmarkFixture

import calejo_core.reference.codecs as reference_codecs
import calejo_core.reference.gate as reference_gate
from benchmarks.support import (
    adapter_env,
    children,
    free_port,
    start_adapter,
    wait_http,
)
from calejo_server.config import load_config
from calejo_server.engine import Engine, ManualClock, RequestContext, SetpointItem
from calejo_server.storage import open_storage

STATIONS = 125
PUMPS_PER_STATION = 80
TICK = 0.1
ROUNDS = 1000
NAIVE_ROUNDS = 20
CTX = RequestContext(user="bench", source_address=None, protocol="CLI")
RATES = {"steady": math.inf, "ramping": 0.001}


ADMIN_PASSWORD = "bench-engine-passphrase-42"
START_TIMEOUT = 300.0
SETTLE = 3.0
BATCH = 1000


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident memory (or its peak, VmHWM) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return math.nan


def pss_mb(pid: int) -> float:
    """Proportional resident memory of a process, in MB: pages it shares
    with other processes (libraries, copy-on-write) count by their share."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return math.nan


def adapter_memory(pid: int) -> dict[str, float]:
    """Resident memory of the adapter and its worker, each and together."""
    workers = children(pid)
    main = rss_mb(pid)
    worker = sum(rss_mb(child) for child in workers)
    return {
        "rss_mb": round(main, 1),
        "worker_rss_mb": round(worker, 1),
        "total_rss_mb": round(main + worker, 1),
        "total_pss_mb": round(pss_mb(pid) + sum(pss_mb(c) for c in workers), 1),
    }


def stations(rate: float) -> list[dict[str, Any]]:
    pump = {
        "min_value": 20,
        "max_value": 50,
        "max_rate": rate,
        "failsafe_value": 35,
    }
    return [
        {
            "station_id": f"s{s}",
            "pumps": [{"pump_id": f"p{k}", **pump} for k in range(PUMPS_PER_STATION)],
        }
        for s in range(STATIONS)
    ]


class EngineRig:
    """An engine on SQLite in its own event loop, driven by a manual clock."""

    def __init__(self, tmp: Path, rate: float) -> None:
        document = {
            "server": {"data_dir": str(tmp)},
            "engine": {"tick_interval": TICK, "watchdog_timeout": 7 * 86400},
            "stations": stations(rate),
        }
        path = tmp / "calejo.yaml"
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        self.config = load_config(path, environ={})
        self.clock = ManualClock(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        self.loop = asyncio.new_event_loop()
        self.storage = open_storage(None, tmp)
        self.engine = Engine(self.config, self.storage, clock=self.clock)

    def start(self) -> None:
        async def start() -> None:
            await self.storage.open()
            await self.engine.start()
            items = [
                SetpointItem(station.station_id, pump.pump_id, 40.0)
                for station in self.config.stations
                for pump in station.pumps
            ]
            await self.engine.set_setpoints(items, CTX)
            for _ in range(3):
                self.step()
            await self.engine.flush()

        self.loop.run_until_complete(start())

    def step(self) -> None:
        self.clock.advance(TICK)
        self.engine.tick()

    def close(self) -> None:
        async def close() -> None:
            await self.engine.stop()
            await self.storage.close()

        self.loop.run_until_complete(close())
        self.loop.close()


class NaiveTick:
    """The same tick as a plain per-pump loop over the reference gate."""

    def __init__(self, rate: float) -> None:
        count = STATIONS * PUMPS_PER_STATION
        limits = [
            reference_gate.PumpLimits(20.0, 50.0, rate, 35.0, pump_id=f"p{k}")
            for k in range(count)
        ]
        station_of = [k // PUMPS_PER_STATION for k in range(count)]
        self.gate = reference_gate.Gate(limits, station_of, 0.0)
        self.images = [
            reference_codecs.StationImage(PUMPS_PER_STATION) for _ in range(STATIONS)
        ]
        self.now = 0.0
        for pump in range(count):
            self.gate.request(pump, 40.0, self.now)
        for _ in range(3):
            self.step()

    def step(self) -> None:
        self.now += TICK
        self.gate.tick(self.now)
        applied = self.gate.applied
        status = self.gate.status
        heartbeat = int(self.now) % 65536
        for station, image in enumerate(self.images):
            registers = image.registers
            registers[0] = heartbeat
            first = station * PUMPS_PER_STATION
            for k in range(PUMPS_PER_STATION):
                value = float(applied[first + k])
                base = 100 + 10 * k
                registers[base] = round(value * 10)
                high, low = struct.unpack(">HH", struct.pack(">f", value))
                registers[base + 1] = high
                registers[base + 2] = low
                registers[base + 3] = int(status[first + k])


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[[str], EngineRig]]:
    made: list[EngineRig] = []

    def make(case: str) -> EngineRig:
        rig = EngineRig(tmp_path, RATES[case])
        made.append(rig)
        rig.start()
        return rig

    yield make
    for rig in made:
        rig.close()


# Mean tick of the naive loop, by case; it runs first.
_naive_mean: dict[str, float] = {}


def record(
    benchmark: BenchmarkFixture, run: Callable[[], None], rounds: int, **info: Any
) -> None:
    """Time ``rounds`` ticks; mean, p50, p99 and max in ms into extra_info."""
    benchmark.extra_info.update(info)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
    stats = benchmark.stats
    if stats is None:
        return
    ticks = sorted(stats.stats.data)
    benchmark.extra_info.update(
        tick_ms_mean=round(stats.stats.mean * 1e3, 4),
        tick_ms_p50=round(ticks[len(ticks) // 2] * 1e3, 4),
        tick_ms_p99=round(ticks[min(len(ticks) - 1, int(0.99 * len(ticks)))] * 1e3, 4),
        tick_ms_max=round(stats.stats.max * 1e3, 4),
    )


@pytest.mark.parametrize("case", list(RATES))
def test_naive_reference_tick_10000_pumps(
    benchmark: BenchmarkFixture, case: str
) -> None:
    """Fewer rounds: each takes tens of milliseconds."""
    benchmark.group = f"engine tick, 10,000 pumps, {case}"
    naive = NaiveTick(RATES[case])

    record(benchmark, naive.step, NAIVE_ROUNDS, pumps=STATIONS * PUMPS_PER_STATION)

    assert benchmark.stats is not None
    _naive_mean[case] = benchmark.stats.stats.mean
    assert naive.images[0].registers[100] == round(float(naive.gate.applied[0]) * 10)


@pytest.mark.parametrize("case", list(RATES))
def test_engine_tick_10000_pumps(
    benchmark: BenchmarkFixture, make_rig: Callable[[str], EngineRig], case: str
) -> None:
    benchmark.group = f"engine tick, 10,000 pumps, {case}"
    before = rss_mb()
    rig = make_rig(case)
    after = rss_mb()

    record(
        benchmark,
        rig.step,
        ROUNDS,
        pumps=rig.engine.gate.n_pumps,
        rss_mb=round(after, 1),
        engine_rss_mb=round(after - before, 1),
    )

    assert benchmark.stats is not None
    if case in _naive_mean:
        benchmark.extra_info["x_naive_mean"] = round(
            _naive_mean[case] / benchmark.stats.stats.mean, 1
        )
    applied = rig.engine.gate.applied
    assert rig.engine.gate.n_pumps == STATIONS * PUMPS_PER_STATION
    if case == "steady":
        assert np.all(applied == 40.0)
    else:
        assert np.all((applied > 20.0) & (applied < 21.0))
    assert rig.engine.images[1].registers[100] == round(applied[0] * 10)


# -- a whole adapter ------------------------------------------------------------


def _adapter_config(n_stations: int, per_station: int) -> str:
    lines = ["engine:", "  watchdog_timeout: 3600", "stations:"]
    for station in range(n_stations):
        lines += [f"  - station_id: s{station:03d}", "    pumps:"]
        for pump in range(per_station):
            lines += [
                f"      - pump_id: p{pump:02d}",
                "        min_value: 20",
                "        max_value: 50",
                "        max_rate: 2",
                "        failsafe_value: 35",
            ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("n_stations", "per_station"),
    [(1, 10), (STATIONS, PUMPS_PER_STATION)],
    ids=["10-pumps", "10000-pumps"],
)
def test_adapter_resident_memory(
    benchmark: BenchmarkFixture, tmp_path: Path, n_stations: int, per_station: int
) -> None:
    benchmark.group = "adapter resident memory"
    pumps = n_stations * per_station
    config = tmp_path / "calejo.yaml"
    config.write_text(_adapter_config(n_stations, per_station), encoding="utf-8")
    http = free_port()
    env = adapter_env(tmp_path / "data", http=http, admin_password=ADMIN_PASSWORD)
    base = f"http://127.0.0.1:{http}/api/v1"
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        process = start_adapter(config, env)
        started.append(process)
        wait_http(f"{base}/health", process)

    try:
        benchmark.pedantic(start, rounds=1, iterations=1)
        process = started[0]
        after_start = adapter_memory(process.pid)

        with httpx.Client(base_url=base, timeout=120.0) as client:
            login = client.post(
                "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            assert login.status_code == 200, login.text
            client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
            items = [
                {"station_id": f"s{s:03d}", "pump_id": f"p{k:02d}", "value": 40.0}
                for s in range(n_stations)
                for k in range(per_station)
            ]
            for first in range(0, len(items), BATCH):
                answer = client.post(
                    "/setpoints", json={"setpoints": items[first : first + BATCH]}
                )
                assert answer.status_code == 200, answer.text[:500]
            listing = client.get("/pump-stations")
            assert listing.status_code == 200, listing.text[:500]
        time.sleep(SETTLE)

        assert process.poll() is None
        at_rest = adapter_memory(process.pid)
        assert len(children(process.pid)) == 1, "expected one OPC UA worker"
        benchmark.extra_info.update(
            pumps=pumps,
            started_total_pss_mb=after_start["total_pss_mb"],
            **at_rest,
            peak_rss_mb=round(rss_mb(process.pid, "VmHWM"), 1),
            worker_peak_rss_mb=round(
                sum(rss_mb(c, "VmHWM") for c in children(process.pid)), 1
            ),
        )
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
