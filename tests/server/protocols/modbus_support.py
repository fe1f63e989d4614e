"""Live Modbus servers for the tests, and a small raw Modbus TCP client.

``ModbusStack`` runs the real pieces on a uvloop event loop in a thread of
its own: SQLite storage, the Engine (optionally on a manual clock) and the
ModbusServer on a free loopback port. ``AdapterStack`` runs a whole
:class:`~calejo_server.app.Adapter` the same way (REST API and Modbus), and
logs in over HTTP. ``RawClient`` speaks Modbus TCP over a blocking socket,
so a test controls every byte. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvloop
import yaml

from calejo_server.app import Adapter
from calejo_server.config import Config, load_config
from calejo_server.engine import Engine, ManualClock
from calejo_server.protocols.modbus import ModbusServer
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditQuery, AuditRow, Storage

T = TypeVar("T")

WAIT = 10.0
"""Seconds any one step may take."""
ADMIN_PASSWORD = "pumps-turn-at-night-for-tests-7"
API = "/api/v1"

STATIONS: list[dict[str, Any]] = [
    {
        "station_id": "north",
        "unit_id": 1,
        "pumps": [
            {
                "pump_id": "p1",
                "min_value": 20,
                "max_value": 50,
                "max_rate": float("inf"),
                "failsafe_value": 35,
            },
            {
                "pump_id": "p2",
                "units": "rpm",
                "min_value": 300,
                "max_value": 1500,
                "max_rate": 2.0,
                "failsafe_value": 900,
            },
        ],
    },
    {
        "station_id": "south",
        "unit_id": 5,
        "float_order": "CDAB",
        "pumps": [
            {
                "pump_id": "s1",
                "min_value": 10,
                "max_value": 40,
                "max_rate": float("inf"),
                "failsafe_value": 25,
                "stop_value": 0,
            }
        ],
    },
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``predicate`` every 10 ms until true or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class LoopThread:
    """A uvloop event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="modbus-tests-loop", daemon=True
        )
        self.thread.start()

    def run(self, awaitable: Awaitable[T], timeout: float = WAIT) -> T:
        """Run ``awaitable`` on the loop; its result (bounded)."""

        async def bounded() -> T:
            return await asyncio.wait_for(awaitable, timeout)

        future: Future[T] = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        return future.result(timeout + 5.0)

    def call(self, function: Callable[[], T]) -> T:
        """Call ``function`` on the loop's thread (to read live state safely)."""

        async def on_loop() -> T:
            return function()

        return self.run(on_loop())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        if not self.thread.is_alive():
            self.loop.close()


def write_config(
    folder: Path,
    *,
    modbus: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "server": {
            "bind": "127.0.0.1",
            "data_dir": str(folder / "data"),
            "http_port": free_port(),
            "modbus_port": 0,
            "opcua_port": free_port(),
        },
        "engine": {"tick_interval": 0.05},
        "modbus": modbus or {},
        "opcua": {"enabled": False},
        "stations": STATIONS,
        **(extra or {}),
    }
    path = folder / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


class ModbusStack:
    """Storage, engine and Modbus server on a loop thread."""

    def __init__(
        self,
        folder: Path,
        modbus: dict[str, Any] | None = None,
        clock: ManualClock | None = None,
    ) -> None:
        self.config: Config = load_config(write_config(folder, modbus=modbus), {})
        self.clock = clock
        self.loop = LoopThread()
        self.storage: Storage = open_storage(None, self.config.server.data_dir)
        self.engine = Engine(self.config, self.storage, clock=clock)
        self.server = ModbusServer(self.engine, self.config)
        try:
            self.loop.run(self._start(), timeout=30.0)
        except BaseException:
            self.loop.close()
            raise
        self.port = self.server.port

    async def _start(self) -> None:
        await self.storage.open()
        await self.engine.start()
        await self.server.start()

    def close(self) -> None:
        async def stop() -> None:
            await self.server.stop()
            await self.engine.stop()
            await self.storage.close()

        try:
            self.loop.run(stop(), timeout=20.0)
        finally:
            self.loop.close()

    def connections(self) -> int:
        return self.loop.call(lambda: len(self.server.connections))

    def audit(self, event_type: str) -> list[AuditRow]:
        async def query() -> list[AuditRow]:
            await self.engine.flush()
            return await self.storage.audit_query(
                AuditQuery(event_type=event_type, limit=1000)
            )

        return self.loop.run(query())

    def tick(self, seconds: float) -> None:
        """Advance the manual clock and run one engine tick."""
        assert self.clock is not None
        clock = self.clock

        def advance() -> None:
            clock.advance(seconds)
            self.engine.tick()

        self.loop.call(advance)


class AdapterStack:
    """A whole adapter (REST API and Modbus) on a loop thread, logged in."""

    def __init__(self, folder: Path, modbus: dict[str, Any] | None = None) -> None:
        path = write_config(folder, modbus=modbus)
        self.config = load_config(path, {"CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD})
        self.loop = LoopThread()
        self.adapter = Adapter(self.config, out=io.StringIO())
        try:
            self.loop.run(self.adapter.start(), timeout=60.0)
        except BaseException:
            self.loop.run(self.adapter.stop(), timeout=20.0)
            self.loop.close()
            raise

        modbus_server = next(s for s in self.adapter.services if s.name == "modbus")
        assert isinstance(modbus_server, ModbusServer)
        self.modbus = modbus_server
        self.port = modbus_server.port
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.config.server.http_port}{API}",
            timeout=WAIT,
        )
        self.headers = {"Authorization": f"Bearer {self._login()}"}

    def _login(self) -> str:
        answer = self.http.post(
            "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert answer.status_code == 200, answer.text
        token = str(answer.json()["access_token"])
        probe = self.http.get(
            "/pump-stations", headers={"Authorization": f"Bearer {token}"}
        )
        if probe.status_code == 403:
            renewed = ADMIN_PASSWORD + "-renewed"
            changed = self.http.post(
                "/auth/change-password",
                json={"old_password": ADMIN_PASSWORD, "new_password": renewed},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert changed.status_code in (200, 204), changed.text
            answer = self.http.post(
                "/auth/login", json={"username": "admin", "password": renewed}
            )
            token = str(answer.json()["access_token"])
        return token

    @property
    def engine(self) -> Engine:
        engine = self.adapter.engine
        assert isinstance(engine, Engine)
        return engine

    def get(self, path: str, **params: Any) -> Any:
        answer = self.http.get(path, headers=self.headers, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        answer = self.http.request(method, path, json=body, headers=self.headers)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def close(self) -> None:
        self.http.close()
        try:
            self.loop.run(self.adapter.stop(), timeout=20.0)
        finally:
            self.loop.close()


# -- raw Modbus TCP -----------------------------------------------------------


def adu(tid: int, unit: int, pdu: bytes) -> bytes:
    """An MBAP header for ``pdu`` (protocol 0) and the PDU."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def read_request(tid: int, unit: int, address: int, count: int, fc: int = 3) -> bytes:
    return adu(tid, unit, struct.pack(">BHH", fc, address, count))


def write_request(tid: int, unit: int, address: int, value: int) -> bytes:
    return adu(tid, unit, struct.pack(">BHH", 6, address, value))


def write_many_request(tid: int, unit: int, address: int, values: list[int]) -> bytes:
    body = struct.pack(f">{len(values)}H", *values)
    return adu(
        tid, unit, struct.pack(">BHHB", 16, address, len(values), len(body)) + body
    )


def registers_of(answer: bytes) -> list[int]:
    """The register values of an FC3/FC4 answer ADU."""
    count = answer[8] // 2
    return list(struct.unpack(f">{count}H", answer[9 : 9 + 2 * count]))


class RawClient:
    """A blocking Modbus TCP client that sends exactly the bytes it is given."""

    def __init__(
        self, port: int, host: str = "127.0.0.1", source: str | None = None
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> bytes:
        """The next whole answer ADU."""
        while True:
            if len(self.buffer) >= 6:
                size = 6 + struct.unpack(">H", self.buffer[4:6])[0]
                if len(self.buffer) >= size:
                    frame, self.buffer = self.buffer[:size], self.buffer[size:]
                    return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buffer += chunk

    def request(self, data: bytes) -> bytes:
        self.send(data)
        return self.answer()

    def read(self, unit: int, address: int, count: int) -> list[int]:
        answer = self.request(read_request(7, unit, address, count))
        assert answer[7] == 3, f"exception answer {answer.hex()}"
        return registers_of(answer)

    def closed_by_server(self, timeout: float = WAIT) -> bool:
        """True once the server closes (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def raw_client(port: int, source: str | None = None) -> Iterator[RawClient]:
    client = RawClient(port, source=source)
    try:
        yield client
    finally:
        client.close()
