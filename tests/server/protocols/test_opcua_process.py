"""OPC UA in ``calejo serve`` as an operator runs it: a real process.

The demonstration adapter starts on free ports; an asyncua client (as a
SCADA) and the ``calejo opcua`` command (as an operator) talk to it over
loopback, and SIGTERM stops it, sessions open, within the shutdown budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from asyncua import Client, ua

from calejo_server import certs
from calejo_server.protocols.opcua import NAMESPACE_URI

PUMP = "PumpStations/demo_station/Pumps/pump_1"
SHUTDOWN_LIMIT = 5.0
USER, PASSWORD = "scada", "watches-the-wet-well-22"
CLIENT_URI = "urn:calejo-tests:process-client"


def _headers(adapter: Any, password: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {adapter.login('admin', password)}"}


def _client_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "client.pem", folder / "client-key.pem"
    certs.self_signed_certificate(
        cert,
        key,
        application_uri=CLIENT_URI,
        common_name="process test client",
        hostnames=[socket.gethostname(), "localhost"],
    )
    return cert, key


async def _client(url: str, cert: Path, key: Path) -> Client:
    client = Client(url, timeout=5)
    client.application_uri = CLIENT_URI
    await client.set_security_string(f"Basic256Sha256,SignAndEncrypt,{cert},{key}")
    client.set_user(USER)
    client.set_password(PASSWORD)
    return client


class Session:
    """A SCADA session held open on a thread of its own until closed."""

    def __init__(self, url: str, cert: Path, key: Path) -> None:
        self.ready = threading.Event()
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self._hold(url, cert, key)), daemon=True
        )
        self.thread.start()

    async def _hold(self, url: str, cert: Path, key: Path) -> None:
        try:
            client = await _client(url, cert, key)
            await client.connect()
            ns = await client.get_namespace_index(NAMESPACE_URI)
            subscription = await client.create_subscription(50, _Ignore())
            await subscription.subscribe_data_change(
                client.get_node(ua.NodeId(f"{PUMP}/Setpoint", ns))
            )
            self.ready.set()
            while not self.done.is_set():
                await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)
        except BaseException as exc:
            self.errors.append(exc)
            self.ready.set()

    def close(self) -> None:
        self.done.set()
        self.thread.join(10.0)


class _Ignore:
    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        pass


class _Changes:
    def __init__(self) -> None:
        self.values: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.values.put_nowait((node.nodeid.Identifier, value))

    async def until(self, node: str, value: Any) -> None:
        deadline = time.monotonic() + 10.0
        while (node, value) != await asyncio.wait_for(
            self.values.get(), max(deadline - time.monotonic(), 0.01)
        ):
            pass


def test_serve_answers_scada_and_the_cli_and_stops_on_sigterm(
    adapter_factory: Callable[..., Any],
    admin_env: dict[str, str],
    calejo: Callable[..., Any],
    tmp_path: Path,
) -> None:
    adapter = adapter_factory(env=admin_env)
    port = int(adapter.env["CALEJO_OPCUA_PORT"])
    url = f"opc.tcp://127.0.0.1:{port}"
    # The OPC UA server starts before the REST API that answered.
    assert f"opcua: listening on {url}" in adapter.output, adapter.output

    headers = _headers(adapter, admin_env["CALEJO_ADMIN_PASSWORD"])
    created = httpx.post(
        f"{adapter.api}/users",
        json={
            "username": USER,
            "email": "scada@example.org",
            "role": "operator",
            "password": PASSWORD,
        },
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    cert, key = _client_certificate(tmp_path / "client")
    trusted = adapter.data_dir / "opcua" / "trusted"
    (trusted / "process-client.pem").write_bytes(cert.read_bytes())

    async def scada() -> None:
        client = await _client(url, cert, key)
        async with client:
            ns = await client.get_namespace_index(NAMESPACE_URI)
            changes = _Changes()
            subscription = await client.create_subscription(50, changes)
            await subscription.subscribe_data_change(
                [
                    client.get_node(ua.NodeId(f"{PUMP}/{name}", ns))
                    for name in ("Target", "Setpoint")
                ]
            )
            answer = await asyncio.to_thread(
                httpx.put,
                f"{adapter.api}/pump-stations/demo_station/pumps/pump_1/setpoint",
                json={"value": 42.5},
                headers=headers,
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            await changes.until(f"{PUMP}/Target", 42.5)
            ramping = client.get_node(ua.NodeId(f"{PUMP}/Ramping", ns))
            assert await ramping.read_value() is True

    asyncio.run(asyncio.wait_for(scada(), 30.0))

    read = calejo(
        [
            "opcua",
            "read",
            url,
            f"{PUMP}/Target",
            "--user",
            USER,
            "--cert",
            str(cert),
            "--key",
            str(key),
        ],
        {**adapter.env, "CALEJO_OPCUA_PASSWORD": PASSWORD},
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout.startswith(f"ns=2;s={PUMP}/Target = 42.5 (Double, Good, ")

    session = Session(url, cert, key)
    try:
        assert session.ready.wait(30.0) and not session.errors, session.errors
        deadline = time.monotonic() + 10.0
        sessions = None
        while sessions != 1 and time.monotonic() < deadline:
            health = httpx.get(f"{adapter.api}/health/detailed", timeout=10).json()
            sessions = health["components"]["opcua"]["sessions"]
            time.sleep(0.05)
        assert sessions == 1

        started = time.monotonic()
        code = adapter.stop(signal.SIGTERM)
        took = time.monotonic() - started
    finally:
        session.close()

    assert code == 0, adapter.output
    assert took < SHUTDOWN_LIMIT
    assert "opc ua server stopped" in adapter.output
    assert "Traceback" not in adapter.output
