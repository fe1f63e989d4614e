"""The OPC UA server inside a whole adapter, beside its REST API.

One :class:`~calejo_server.app.Adapter` (what ``calejo serve`` runs) serves
the module on a uvloop event loop in a thread of its own, with the OPC UA
port 0 (a free port) and real argon2 passwords. Clients talk to it over
loopback as a SCADA and an optimizer would: asyncua with Basic256Sha256
SignAndEncrypt and a user name, httpx with a bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import logging
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvloop
import yaml
from asyncua import Client, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from calejo_server import certs
from calejo_server.app import Adapter
from calejo_server.config import load_config
from calejo_server.protocols.opcua import NAMESPACE_URI

T = TypeVar("T")

WAIT = 10.0
ADMIN_PASSWORD = "sewers-never-sleep-31"
SCADA, SCADA_PASSWORD = "scada", "reads-all-the-dials-4ever"
API = "/api/v1"
TICK = 0.1
UPDATE_MS = 50
STATIONS = [
    {
        "station_id": "north",
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
                "min_value": 20,
                "max_value": 50,
                "max_rate": 1.0,
                "failsafe_value": 30,
            },
        ],
    }
]


class Lines(logging.Handler):
    """Keeps the messages of the records it sees."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Running:
    """An adapter on a loop thread, an httpx client and an admin token."""

    def __init__(self, folder: Path, client_cert: Any, untrusted: Any) -> None:
        self.folder = folder
        self.client_cert = client_cert
        self.untrusted = untrusted
        document = {
            "server": {
                "bind": "127.0.0.1",
                "data_dir": str(folder / "data"),
                "http_port": _free_port(),
                "modbus_port": 0,
                "opcua_port": 0,
            },
            "engine": {"tick_interval": TICK},
            "security": {
                "admin_password": ADMIN_PASSWORD,
                "source_failure_limit": 1000,
            },
            "opcua": {"update_interval_ms": UPDATE_MS},
            "stations": STATIONS,
        }
        path = folder / "calejo.yaml"
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        self.config = load_config(path, environ={})

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.adapter = Adapter(self.config, out=io.StringIO())

        self.log = Lines()
        package = logging.getLogger("calejo_server")
        level = package.level
        package.setLevel(logging.INFO)
        package.addHandler(self.log)
        try:
            self.on_adapter(self.adapter.start(), timeout=90.0)
        except BaseException:
            self._stop_loop()
            raise
        finally:
            package.removeHandler(self.log)
            package.setLevel(level)

        self.opcua = next(s for s in self.adapter.services if s.name == "opcua")
        self.url = self.opcua.endpoint
        http = next(s for s in self.adapter.services if s.name == "http")
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{http.port}{API}", timeout=WAIT
        )
        shutil.copy(client_cert.cert, self.opcua.options.trust_dir / "scada.pem")
        token = self.login("admin", ADMIN_PASSWORD)
        self.admin = {"Authorization": f"Bearer {token}"}
        created = self.http.post(
            "/users",
            json={
                "username": SCADA,
                "email": "scada@example.org",
                "role": "operator",
                "password": SCADA_PASSWORD,
            },
            headers=self.admin,
        )
        assert created.status_code == 201, created.text

    def on_adapter(self, awaitable: Awaitable[T], timeout: float = WAIT) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(awaitable, timeout)

        future: Future[T] = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        return future.result(timeout + 5.0)

    def login(self, username: str, password: str) -> str:
        answer = self.http.post(
            "/auth/login", json={"username": username, "password": password}
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    def audit(self, event_type: str) -> list[dict[str, Any]]:
        answer = self.http.get(
            "/audit-log",
            params={"event_type": event_type, "limit": 1000},
            headers=self.admin,
        )
        assert answer.status_code == 200, answer.text
        return list(answer.json()["entries"])

    async def client(
        self,
        user: str | None = SCADA,
        password: str = SCADA_PASSWORD,
        cert: Any = None,
    ) -> Client:
        chosen = cert or self.client_cert
        client = Client(self.url, timeout=WAIT / 2)
        client.application_uri = chosen.uri
        await client.set_security_string(
            f"Basic256Sha256,SignAndEncrypt,{chosen.cert},{chosen.key}"
        )
        if user is not None:
            client.set_user(user)
            client.set_password(password)
        return client

    def close(self) -> None:
        self.http.close()
        with contextlib.suppress(Exception):
            self.on_adapter(self.adapter.stop(), timeout=20.0)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        if not self.thread.is_alive():
            self.loop.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until_health(running: Running, ready: Any, timeout: float = WAIT) -> bool:
    """Whether the OPC UA health satisfies ``ready`` within ``timeout``: the
    worker's counters reach the adapter a moment after what they count."""
    deadline = time.monotonic() + timeout
    while not ready(running.opcua.health()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def running(opcua_harness: Any) -> Iterator[Running]:
    folder = opcua_harness.folder / "whole-adapter"
    folder.mkdir()
    running = Running(folder, opcua_harness.trusted, opcua_harness.untrusted)
    try:
        yield running
    finally:
        running.close()


class Changes:
    """Data changes of one subscription, as (node id, value, data value)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.queue.put_nowait((node.nodeid.Identifier, value, data))

    async def until(self, node: str, value: Any, timeout: float = 5.0) -> Any:
        """The data value of the first change of ``node`` to ``value``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(deadline - time.monotonic(), 0.01)
            seen, new, data = await asyncio.wait_for(self.queue.get(), remaining)
            if seen == node and new == value:
                return data.monitored_item.Value


def test_serve_listens_on_a_free_port_and_reports_health(
    running: Running, opcua_harness: Any
) -> None:
    port = running.opcua.options.port
    assert port != 0
    assert running.url == f"opc.tcp://127.0.0.1:{port}"
    assert f"opcua: listening on {running.url}" in running.log.messages

    folder = running.opcua.options.certificate_dir
    assert folder == running.config.server.data_dir / "certs"
    files = certs.CertificateFiles(folder)
    certs.verify_server_certificate(files)

    async def with_session() -> dict[str, Any]:
        client = await running.client()
        async with client:
            await client.create_subscription(100, Changes())
            deadline = time.monotonic() + WAIT
            while True:
                answer = await asyncio.to_thread(running.http.get, "/health/detailed")
                assert answer.status_code == 200, answer.text
                health = dict(answer.json()["components"]["opcua"])
                if health["subscriptions"] or time.monotonic() > deadline:
                    return health
                await asyncio.sleep(0.05)

    health = opcua_harness.run(with_session(), timeout=30.0)
    assert health["state"] == "ok"
    assert health["endpoint"] == running.url
    assert health["security_policies"] == ["Basic256Sha256", "Aes256_Sha256_RsaPss"]
    assert health["security_modes"] == ["Sign", "SignAndEncrypt"]
    assert (health["connections"], health["sessions"], health["subscriptions"]) == (
        1,
        1,
        1,
    )
    expiry = certs.certificate_expiry(files.server_cert)
    assert dt.datetime.fromisoformat(health["certificate_expires"]) == expiry
    assert health["certificate_days_left"] > 700


def test_a_rest_setpoint_reaches_a_subscribed_scada(
    running: Running, opcua_harness: Any
) -> None:
    base = "PumpStations/north/Pumps/p1"

    async def scenario() -> None:
        client = await running.client()
        async with client:
            ns = await client.get_namespace_index(NAMESPACE_URI)
            changes = Changes()
            subscription = await client.create_subscription(50, changes)
            nodes = [
                client.get_node(ua.NodeId(f"{base}/{name}", ns))
                for name in ("Setpoint", "Target", "Status")
            ]
            await subscription.subscribe_data_change(nodes)

            answer = await asyncio.to_thread(
                running.http.put,
                "/pump-stations/north/pumps/p1/setpoint",
                json={"value": 42.5},
                headers=running.admin,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["outcome"] == "accepted"

            await changes.until(f"{base}/Setpoint", 42.5)
            await changes.until(f"{base}/Target", 42.5)
            age = client.get_node(ua.NodeId(f"{base}/SetpointAge", ns))
            assert 0.0 <= await age.read_value() < 5.0
            limits = [
                await client.get_node(ua.NodeId(f"{base}/{name}", ns)).read_value()
                for name in ("MinValue", "MaxValue")
            ]
            assert limits == [20.0, 50.0]
            await subscription.delete()

    opcua_harness.run(scenario(), timeout=30.0)
    logins = [row for row in running.audit("LOGIN_SUCCESS") if row["user"] == SCADA]
    assert logins and {row["protocol"] for row in logins} == {"OPCUA"}
    assert logins[-1]["source_address"] == "127.0.0.1"


def test_a_rest_emergency_stop_shows_within_one_tick(
    running: Running, opcua_harness: Any
) -> None:
    """The node's source timestamp (server time) is compared with the time
    the engine latched the stop: at most one tick plus one update apart."""
    station = "PumpStations/north"

    async def scenario() -> tuple[Any, Any, dict[str, Any]]:
        client = await running.client()
        async with client:
            ns = await client.get_namespace_index(NAMESPACE_URI)
            changes = Changes()
            subscription = await client.create_subscription(50, changes)
            await subscription.subscribe_data_change(
                [
                    client.get_node(ua.NodeId(f"{station}/EmergencyStop", ns)),
                    client.get_node(ua.NodeId(f"{station}/Pumps/p2/Setpoint", ns)),
                ]
            )
            await changes.until(f"{station}/EmergencyStop", False)

            answer = await asyncio.to_thread(
                running.http.post,
                "/pump-stations/north/emergency-stop",
                json={"reason": "interop test", "operator": "tester"},
                headers=running.admin,
            )
            assert answer.status_code in (200, 201), answer.text
            flag = await changes.until(f"{station}/EmergencyStop", True)
            applied = await changes.until(f"{station}/Pumps/p2/Setpoint", 0.0)

            status = await asyncio.to_thread(
                running.http.get,
                "/pump-stations/north/emergency-stop-status",
                headers=running.admin,
            )
            cleared = await asyncio.to_thread(
                running.http.request,
                "DELETE",
                "/pump-stations/north/emergency-stop",
                json={"reason": "done", "operator": "tester"},
                headers=running.admin,
            )
            assert cleared.status_code == 200, cleared.text
            await changes.until(f"{station}/EmergencyStop", False)
            await subscription.delete()
            return flag, applied, status.json()

    flag, applied, status = opcua_harness.run(scenario(), timeout=30.0)
    since = dt.datetime.fromisoformat(status["since"])
    budget = dt.timedelta(seconds=TICK + UPDATE_MS / 1000)
    assert since <= flag.SourceTimestamp <= since + budget
    assert since <= applied.SourceTimestamp <= since + budget


def test_anonymous_wrong_password_and_untrusted_certificate_are_refused(
    running: Running, opcua_harness: Any
) -> None:
    before = max(
        (row["id"] for row in running.audit("INVALID_AUTHENTICATION")), default=0
    )

    async def refused(client: Client) -> int:
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with contextlib.suppress(Exception):
            await client.disconnect()
        return int(caught.value.code)

    async def scenario() -> list[int]:
        return [
            await refused(await running.client(None)),
            await refused(await running.client(SCADA, "not-the-password-at-all")),
            await refused(await running.client(cert=running.untrusted)),
        ]

    codes = opcua_harness.run(scenario(), timeout=30.0)
    assert codes == [
        ua.StatusCodes.BadIdentityTokenRejected,
        ua.StatusCodes.BadUserAccessDenied,
        ua.StatusCodes.BadCertificateUntrusted,
    ]
    new = [row for row in running.audit("INVALID_AUTHENTICATION") if row["id"] > before]
    assert len(new) == 2
    assert {row["protocol"] for row in new} == {"OPCUA"}
    assert any(row["user"] == SCADA for row in new)
    assert until_health(running, lambda h: h["refused_channels"] >= 1)


def test_writes_are_refused_and_audited_once_per_session(
    running: Running, opcua_harness: Any
) -> None:
    node_path = "PumpStations/north/Pumps/p1/Setpoint"

    async def scenario() -> None:
        client = await running.client()
        async with client:
            ns = await client.get_namespace_index(NAMESPACE_URI)
            node = client.get_node(ua.NodeId(node_path, ns))
            before = await node.read_value()
            for _ in range(3):
                with pytest.raises(UaStatusCodeError) as caught:
                    await node.write_value(ua.Variant(21.0, ua.VariantType.Double))
                assert caught.value.code == ua.StatusCodes.BadUserAccessDenied
            assert await node.read_value() == before

    refused = running.opcua.health()["refused_requests"]
    opcua_harness.run(scenario(), timeout=30.0)
    assert until_health(running, lambda h: h["refused_requests"] == refused + 3)
    writes = [
        row
        for row in running.audit("ACCESS_DENIED")
        if row["details"].get("method") == "Write"
    ]
    assert len(writes) == 1
    assert (writes[0]["user"], writes[0]["protocol"]) == (SCADA, "OPCUA")


def test_rest_changes_reach_modbus_and_opcua_alike(
    running: Running, opcua_harness: Any
) -> None:
    """One adapter, three interfaces: a setpoint and an emergency stop sent
    over REST are what a Modbus poller and an OPC UA subscriber both see."""
    from pymodbus.client import AsyncModbusTcpClient

    modbus_port = next(s for s in running.adapter.services if s.name == "modbus").port
    pump = "PumpStations/north/Pumps/p1"
    stop = {"reason": "both protocols", "operator": "tester"}

    async def poll_modbus(modbus: AsyncModbusTcpClient) -> tuple[int, int, bool]:
        registers = await modbus.read_holding_registers(100, count=4, device_id=1)
        coils = await modbus.read_coils(0, count=2, device_id=1)
        assert not registers.isError() and not coils.isError()
        applied_x10, _, _, status = registers.registers
        return applied_x10, status, bool(coils.bits[1])

    async def scenario() -> None:
        modbus = AsyncModbusTcpClient("127.0.0.1", port=modbus_port, timeout=5)
        assert await modbus.connect()
        client = await running.client()
        try:
            async with client:
                ns = await client.get_namespace_index(NAMESPACE_URI)
                changes = Changes()
                subscription = await client.create_subscription(50, changes)
                await subscription.subscribe_data_change(
                    [client.get_node(ua.NodeId(f"{pump}/Setpoint", ns))]
                )
                answer = await asyncio.to_thread(
                    running.http.put,
                    "/pump-stations/north/pumps/p1/setpoint",
                    json={"value": 43.5},
                    headers=running.admin,
                )
                assert answer.status_code == 200, answer.text
                await changes.until(f"{pump}/Setpoint", 43.5)
                applied_x10, status, stopped = await poll_modbus(modbus)
                assert (applied_x10, stopped) == (435, False)
                assert not status & 1

                answer = await asyncio.to_thread(
                    running.http.post,
                    "/pump-stations/north/emergency-stop",
                    json=stop,
                    headers=running.admin,
                )
                assert answer.status_code in (200, 201), answer.text
                # The REST answer means the register image is already written.
                applied_x10, status, stopped = await poll_modbus(modbus)
                assert (applied_x10, stopped) == (0, True)
                assert status & 1
                await changes.until(f"{pump}/Setpoint", 0.0)

                cleared = await asyncio.to_thread(
                    running.http.request,
                    "DELETE",
                    "/pump-stations/north/emergency-stop",
                    json=stop,
                    headers=running.admin,
                )
                assert cleared.status_code == 200, cleared.text
                assert (await poll_modbus(modbus))[2] is False
                await subscription.delete()
        finally:
            modbus.close()

    opcua_harness.run(scenario(), timeout=30.0)
