"""Fixtures of the REST API tests: a real adapter stack under uvicorn.

``make_server`` writes a configuration, opens the real SQLite storage in
a temporary folder, builds the real Engine and Security, and serves
``create_app`` with uvicorn and the adapter's HTTP protocol on a free
loopback port in a thread of its own (its own uvloop event loop, like the
adapter's). Tests talk to it with httpx over real sockets. Password
hashing uses argon2id with small costs here so that dozens of logins stay
fast; the directory tests check the production parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
import yaml

from calejo_server.alerts import AlertService, AlertSettings
from calejo_server.api import HealthRegistry, create_app
from calejo_server.api.app import SECURITY_HEADERS, lifespan_of
from calejo_server.api.endpoint import Endpoint
from calejo_server.api.transport import HttpProtocol
from calejo_server.config import Config, load_config
from calejo_server.engine import Engine, ManualClock
from calejo_server.security import Passwords, Security
from calejo_server.storage import open_storage
from tests.server.alerts.stand_ins import http_stand_in  # for the alert tests

__all__ = ["http_stand_in"]

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
API = "/api/v1"
ROLES = ("admin", "operator", "optimizer", "viewer", "auditor")


def fast_passwords() -> Passwords:
    return Passwords(time_cost=1, memory_cost=8192, parallelism=1)


def pump(pump_id: str, **limits: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "pump_id": pump_id,
        "min_value": 20,
        "max_value": 50,
        "max_rate": 0.5,
        "failsafe_value": 35,
    }
    entry.update(limits)
    return entry


def two_stations() -> list[dict[str, Any]]:
    """north (unit 1: p1 ramping, p2 without ramp), south (unit 2: p1)."""
    return [
        {"station_id": "north", "pumps": [pump("p1"), pump("p2", max_rate=math.inf)]},
        {"station_id": "south", "pumps": [pump("p1", max_rate=math.inf)]},
    ]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclasses.dataclass
class ApiServer:
    """A running API; ``client`` is an httpx client bound to its URL."""

    url: str
    client: httpx.Client
    config: Config
    data_dir: Path
    security: Security
    engine: Engine
    clock: ManualClock | None
    secrets: dict[str, str]
    alerts: AlertService
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    users: dict[str, tuple[str, str, str]] = dataclasses.field(default_factory=dict)

    @property
    def admin_password(self) -> str:
        return self.secrets["admin"]

    def login(self, username: str, password: str) -> str:
        response = self.client.post(
            f"{API}/auth/login", json={"username": username, "password": password}
        )
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        assert isinstance(token, str)
        return token

    def admin(self) -> dict[str, str]:
        if "admin" not in self.tokens:
            self.tokens["admin"] = self.login("admin", self.admin_password)
        return bearer(self.tokens["admin"])

    def add_user(
        self, role: str, username: str | None = None, password: str | None = None
    ) -> tuple[str, str, str]:
        """A user of ``role`` with a known password: (user_id, name, password)."""
        username = username or f"{role}-{len(self.users) + 1}"
        password = password or f"pw-{role}-long-enough-0123"
        response = self.client.post(
            f"{API}/users",
            json={
                "username": username,
                "email": f"{username}@example.org",
                "role": role,
                "password": password,
            },
            headers=self.admin(),
        )
        assert response.status_code == 201, response.text
        user = (response.json()["user_id"], username, password)
        self.users[username] = user
        return user

    def token(self, role: str) -> str:
        """A token of a user of ``role`` (created on first use)."""
        if role == "admin":
            self.admin()
            return self.tokens["admin"]
        if role not in self.tokens:
            _, username, password = self.add_user(role)
            self.tokens[role] = self.login(username, password)
        return self.tokens[role]

    def headers(self, role: str) -> dict[str, str]:
        return bearer(self.token(role))

    def audit(self, **query: Any) -> list[dict[str, Any]]:
        params = {"limit": 1000, **query}
        response = self.client.get(
            f"{API}/audit-log", params=params, headers=self.admin()
        )
        assert response.status_code == 200, response.text
        entries = response.json()["entries"]
        assert isinstance(entries, list)
        return entries


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """Check an error answer: status, exact shape, headers; its detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and isinstance(body["detail"], str)
    assert "Traceback" not in body["detail"]
    if code is not None:
        assert body["error"] == code, body
    assert_security_headers(response)
    detail = body["detail"]
    assert isinstance(detail, str)
    return detail


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS:
        assert response.headers.get(name.decode()) == value.decode(), name


def write_config(
    folder: Path,
    *,
    stations: list[dict[str, Any]] | None = None,
    security: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
) -> Path:
    document: dict[str, Any] = {
        "server": {"data_dir": str(folder / "data")},
        "stations": stations if stations is not None else two_stations(),
    }
    if security:
        document["security"] = security
    if engine:
        document["engine"] = engine
    path = folder / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@contextlib.contextmanager
def serve(
    folder: Path,
    *,
    stations: list[dict[str, Any]] | None = None,
    security: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    clock: ManualClock | None = None,
    passwords: Passwords | None = None,
    endpoints: list[Endpoint] | None = None,
    health: HealthRegistry | None = None,
    alerts: AlertSettings | None = None,
) -> Iterator[ApiServer]:
    """Run the API stack on a free port until the block ends.

    ``alerts``: the alert settings (default: no channel enabled).
    """
    path = write_config(folder, stations=stations, security=security, engine=engine)
    config = load_config(path, environ={})
    data_dir = config.server.data_dir
    storage = open_storage(None, data_dir)
    engine_ = Engine(config, storage)
    security_ = Security(
        config.security,
        storage,
        clock=clock,
        passwords=passwords if passwords is not None else fast_passwords(),
    )
    registry = health if health is not None else HealthRegistry()
    alerts_ = AlertService(
        alerts if alerts is not None else AlertSettings(), storage, health=registry
    )
    secrets: dict[str, str] = {}

    async def start() -> None:
        await storage.open()
        await security_.start()
        password = await security_.ensure_admin(None)
        assert password is not None
        secrets["admin"] = password
        await alerts_.start()
        alerts_.watch_security(security_)
        alerts_.watch_engine(engine_)
        await engine_.start()

    async def stop() -> None:
        await engine_.stop()
        await alerts_.stop()
        await security_.stop()
        await storage.close()

    app = create_app(
        engine=engine_,
        security=security_,
        storage=storage,
        config=config,
        lifespan=lifespan_of(start, stop),
        endpoints=endpoints,
        health=registry,
        alerts=alerts_,
    )

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(
        uvicorn.Config(
            app,
            loop="none",
            http=HttpProtocol,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    )
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(server.serve(sockets=[sock]))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name="api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the API server did not start: {failures!r}")
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not start within 20 s")
        time.sleep(0.01)

    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=10.0)
    try:
        yield ApiServer(
            url=url,
            client=client,
            config=config,
            data_dir=data_dir,
            security=security_,
            engine=engine_,
            clock=clock,
            secrets=secrets,
            alerts=alerts_,
        )
    finally:
        client.close()
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the API server did not stop"
        assert not failures, failures


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """Start API servers (each in a folder of its own); all stop at the end."""
    stack = contextlib.ExitStack()
    count = 0

    def make(**options: Any) -> ApiServer:
        nonlocal count
        count += 1
        folder = tmp_path / f"server-{count}"
        folder.mkdir()
        return stack.enter_context(serve(folder, **options))

    with stack:
        yield make


@pytest.fixture
def api(make_server: Callable[..., ApiServer]) -> ApiServer:
    """One API server with the two-station configuration."""
    return make_server()
