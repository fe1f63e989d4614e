"""Fixtures of the protocol tests: a real adapter core and an OPC UA client.

``opcua_harness`` (one per test module) runs a uvloop event loop and
starts, on request, the real pieces on a temporary data folder: SQLite
storage, Security (with cheap argon2 parameters), the Engine and the OPC UA
server on a free loopback port. Client certificates are made once per
module (RSA 2048). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
import yaml
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from calejo_server import certs
from calejo_server.config import Config, load_config
from calejo_server.engine import Engine, RequestContext
from calejo_server.protocols.opcua import NAMESPACE_URI, OpcUaServer
from calejo_server.security.directory import Security
from calejo_server.security.passwords import Passwords
from calejo_server.storage import open_storage
from calejo_server.storage.base import Storage

T = TypeVar("T")

WAIT = 10.0
"""Seconds any single step of a test may take."""

ADMIN_CTX = RequestContext(user="admin", source_address=None, protocol="CLI")

USERS = {
    "oper": ("operator", "pumps-run-all-night-7"),
    "watcher": ("viewer", "only-looking-at-dials-3"),
    "victim": ("operator", "this-one-gets-locked-9"),
    "leaver": ("operator", "about-to-be-deactivated-2"),
}
"""User name: (role, password) of the users every harness creates."""

STATIONS: list[dict[str, Any]] = [
    {
        "station_id": "north",
        "name": "North pump station",
        "pumps": [
            {
                "pump_id": "p1",
                "name": "Pump 1",
                "min_value": 20,
                "max_value": 50,
                "max_rate": float("inf"),
                "failsafe_value": 35,
            },
            {
                "pump_id": "p2",
                "name": "Pump 2",
                "min_value": 20,
                "max_value": 50,
                "max_rate": 2.0,
                "failsafe_value": 30,
            },
        ],
    },
    {
        "station_id": "south",
        "name": "South pump station",
        "pumps": [
            {
                "pump_id": "s1",
                "min_value": 10,
                "max_value": 40,
                "max_rate": 1.0,
                "failsafe_value": 25,
            }
        ],
    },
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class ClientCert:
    cert: Path
    key: Path
    uri: str


@dataclasses.dataclass
class Adapter:
    """The real core of one adapter, with its OPC UA server."""

    config: Config
    storage: Storage
    security: Security
    engine: Engine
    server: OpcUaServer
    url: str
    data_dir: Path

    async def namespace(self, client: Client) -> int:
        return int(await client.get_namespace_index(NAMESPACE_URI))

    async def close(self) -> None:
        await self.server.stop()
        await self.engine.stop()
        await self.security.stop()
        await self.storage.close()


class Harness:
    """One event loop per test module; adapters and clients on it."""

    users = USERS
    namespace_uri = NAMESPACE_URI

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loop = uvloop.new_event_loop()
        self.adapters: list[Adapter] = []
        self.trusted = self._client_cert("trusted")
        self.untrusted = self._client_cert("untrusted")

    def _client_cert(self, name: str) -> ClientCert:
        folder = self.folder / "clients" / name
        uri = f"urn:calejo-tests:{name}-client"
        cert, key = folder / "cert.pem", folder / "key.pem"
        certs.self_signed_certificate(
            cert,
            key,
            application_uri=uri,
            common_name=f"{name} test client",
            hostnames=[socket.gethostname(), "localhost"],
        )
        return ClientCert(cert, key, uri)

    def run(self, awaitable: Awaitable[T], timeout: float = WAIT) -> T:
        """Run ``awaitable`` on the harness loop, at most ``timeout`` seconds."""

        async def bounded() -> T:
            return await asyncio.wait_for(awaitable, timeout)

        return self.loop.run_until_complete(bounded())

    def start(
        self, opcua: dict[str, Any] | None = None, name: str = "adapter"
    ) -> Adapter:
        return self.run(self._start(opcua or {}, name), timeout=60.0)

    async def _start(self, opcua: dict[str, Any], name: str) -> Adapter:
        folder = self.folder / name
        data_dir = folder / "data"
        port = free_port()
        document = {
            "server": {
                "data_dir": str(data_dir),
                "bind": "127.0.0.1",
                "opcua_port": port,
            },
            "security": {"source_failure_limit": 1000},
            "opcua": {"endpoint": f"opc.tcp://127.0.0.1:{port}", **opcua},
            "stations": STATIONS,
        }
        folder.mkdir(parents=True)
        path = folder / "calejo.yaml"
        path.write_text(yaml.safe_dump(document))
        config = load_config(path, environ={})

        storage = open_storage(None, data_dir)
        await storage.open()
        passwords = Passwords(time_cost=1, memory_cost=1024, parallelism=1)
        security = Security(config.security, storage, passwords=passwords)
        await security.start()
        for username, (role, password) in USERS.items():
            await security.create_user(
                username, f"{username}@example.org", role, password, ADMIN_CTX
            )

        engine = Engine(config, storage)
        await engine.start()
        server = OpcUaServer(engine, security, config)
        await server.start()

        shutil.copy(self.trusted.cert, server.options.trust_dir / "trusted-client.pem")
        adapter = Adapter(
            config, storage, security, engine, server, server.endpoint, data_dir
        )
        self.adapters.append(adapter)
        return adapter

    @contextlib.asynccontextmanager
    async def client(
        self,
        adapter: Adapter,
        user: str | None = "oper",
        *,
        password: str | None = None,
        cert: ClientCert | None = None,
        policy: type = SecurityPolicyBasic256Sha256,
        mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
        secure: bool = True,
    ) -> AsyncIterator[Client]:
        """A connected asyncua client (closed on exit)."""
        client = await self.make_client(
            adapter,
            user,
            password=password,
            cert=cert,
            policy=policy,
            mode=mode,
            secure=secure,
        )
        await client.connect()
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def make_client(
        self,
        adapter: Adapter,
        user: str | None = "oper",
        *,
        password: str | None = None,
        cert: ClientCert | None = None,
        policy: type = SecurityPolicyBasic256Sha256,
        mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
        secure: bool = True,
        pin_server: bool = False,
    ) -> Client:
        """A client; ``pin_server`` skips the endpoint lookup (the server's
        certificate is read from its folder), to offer what it does not list."""
        client = Client(adapter.url, timeout=WAIT / 2)
        client.session_timeout = 60_000
        if secure:
            chosen = cert or self.trusted
            client.application_uri = chosen.uri
            server_cert = None
            if pin_server:
                folder = adapter.server.options.certificate_dir
                server_cert = str(folder / certs.SERVER_CERT)
            await client.set_security(
                policy,
                str(chosen.cert),
                str(chosen.key),
                server_certificate=server_cert,
                mode=mode,
            )
        if user is not None:
            client.set_user(user)
            client.set_password(password if password is not None else USERS[user][1])
        return client

    def close(self) -> None:
        for adapter in reversed(self.adapters):
            with contextlib.suppress(Exception):
                self.run(adapter.close(), timeout=20.0)
        self._drain()
        self.loop.close()

    def _drain(self) -> None:
        pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            gathered = asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.wait_for(gathered, 5.0))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())


@pytest.fixture(scope="module")
def opcua_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = Harness(tmp_path_factory.mktemp("opcua"))
    try:
        yield harness
    finally:
        harness.close()
