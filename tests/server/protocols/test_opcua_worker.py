"""The OPC UA worker process: supervised, fed, and never left behind.

The adapter's OPC UA server runs in a worker process. These tests kill it
and watch the adapter start another on the same endpoint, hold its feed
back and watch it catch up with everything, change a role and see the
worker apply it before the change is acknowledged, and check that a
worker whose adapter is gone, or that is sent garbage, exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import pytest
from asyncua import ua
from asyncua.ua.uaerrors import UaStatusCodeError

from calejo_server.engine import RequestContext
from calejo_server.protocols import opcua
from calejo_server.security.roles import READ_PUMP_STATUS

CTX = RequestContext(user="tester", source_address="127.0.0.1", protocol="REST")
WAIT = 15.0


@pytest.fixture(scope="module")
def adapter(opcua_harness: Any) -> Any:
    return opcua_harness.start(name="worker")


def node(ns: int, path: str) -> ua.NodeId:
    return ua.NodeId(path, ns)  # type: ignore[arg-type]


async def wait_for(ready: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_worker_is_a_process_of_its_own_at_lower_priority(adapter: Any) -> None:
    server = adapter.server
    assert server.pid is not None and server.pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, server.pid) == (
        os.getpriority(os.PRIO_PROCESS, 0) + server.options.worker_nice
    )
    assert server.options.worker_nice == 10


def test_the_standard_nodes_are_read_from_their_cache(
    opcua_harness: Any, adapter: Any
) -> None:
    """The cache is made before the first worker starts; the worker reads
    the standard nodes from it as clients ask (the server's own objects)."""
    assert adapter.server.standard_nodes.is_file()
    assert adapter.server.health()["standard_nodes"] == "cached"

    async def scenario() -> None:
        async with opcua_harness.client(adapter) as client:
            state = client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_State))
            assert await state.read_value() == ua.ServerState.Running
            names = await client.get_namespace_array()
            assert "urn:calejo:control-adapter" in names

    opcua_harness.run(scenario())


def test_a_killed_worker_is_restarted_on_the_same_endpoint(
    opcua_harness: Any, adapter: Any
) -> None:
    server = adapter.server

    async def scenario() -> None:
        first = server.pid
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: server.health()["state"] == "down")
        health = server.health()
        assert "exited with code -9" in health["detail"]
        assert health["worker_pid"] is None

        await wait_for(lambda: server.health()["state"] == "ok")
        assert server.pid != first
        assert server.health()["worker_restarts"] == 1

        await adapter.engine.set_setpoint("north", "p1", 33.5, CTX)
        async with opcua_harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            target = client.get_node(node(ns, "PumpStations/north/Pumps/p1/Target"))
            assert await target.read_value() == 33.5

    opcua_harness.run(scenario(), timeout=60.0)


def test_a_hung_worker_is_reported_then_ended_and_replaced(
    opcua_harness: Any, adapter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = adapter.server
    monkeypatch.setattr(server, "silence_limit", 1.5)
    monkeypatch.setattr(server, "hang_limit", 3.0)

    async def scenario() -> None:
        await wait_for(lambda: server.health()["state"] == "ok")
        hung = server.pid
        restarts = server.restarts
        os.kill(hung, signal.SIGSTOP)
        try:
            await wait_for(lambda: server.health()["state"] == "degraded")
            assert "has not answered for" in server.health()["detail"]
            await wait_for(lambda: server.restarts == restarts + 1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert server.pid != hung
        await wait_for(lambda: server.health()["state"] == "ok")

    opcua_harness.run(scenario(), timeout=60.0)


def test_a_worker_that_falls_behind_gets_everything_afresh(
    opcua_harness: Any, adapter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = adapter.server

    async def scenario() -> None:
        async with opcua_harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            target = client.get_node(node(ns, "PumpStations/north/Pumps/p2/Target"))
            link = server._link
            monkeypatch.setattr(link, "backlog", lambda: opcua.MAX_BACKLOG + 1)

            await adapter.engine.set_setpoint("north", "p2", 47.0, CTX)
            await asyncio.sleep(0.3)
            assert await target.read_value() != 47.0

            monkeypatch.undo()
            deadline = time.monotonic() + WAIT
            while await target.read_value() != 47.0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)

    opcua_harness.run(scenario(), timeout=60.0)


def test_a_role_change_reaches_the_worker_before_it_is_acknowledged(
    opcua_harness: Any, adapter: Any
) -> None:
    security = adapter.security
    before = security.roles()["viewer"]

    async def scenario() -> None:
        async with opcua_harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            flag = client.get_node(node(ns, "PumpStations/north/Failsafe"))
            await flag.read_value()

            kept = [p for p in before if p != READ_PUMP_STATUS]
            await security.set_role_permissions("viewer", kept, CTX)
            with pytest.raises(UaStatusCodeError) as caught:
                await flag.read_value()
            assert caught.value.code == ua.StatusCodes.BadUserAccessDenied

            await security.set_role_permissions("viewer", before, CTX)
            await flag.read_value()

    try:
        opcua_harness.run(scenario(), timeout=60.0)
    finally:
        opcua_harness.run(security.set_role_permissions("viewer", before, CTX))


def test_worker_log_records_reach_the_adapter_log(
    opcua_harness: Any, adapter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wanted = "anonymous login refused"

    def seen() -> list[logging.LogRecord]:
        return [r for r in caplog.records if wanted in r.getMessage()]

    async def scenario() -> None:
        client = await opcua_harness.make_client(adapter, None)
        with pytest.raises(UaStatusCodeError):
            await client.connect()
        with contextlib.suppress(Exception):
            await client.disconnect()
        await wait_for(lambda: bool(seen()))

    with caplog.at_level(logging.WARNING):
        opcua_harness.run(scenario(), timeout=30.0)
    record = seen()[0]
    assert record.name == "calejo_server.protocols.opcua_access"
    assert record.levelno == logging.WARNING


def _worker() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "calejo_server.protocols.opcua_worker",
            "--link-fd",
            str(theirs.fileno()),
        ],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    theirs.close()

    request = b'{"op":"directory","id":1,"users":{},"roles":{}}'
    ours.sendall(struct.pack(">I", len(request)) + request)
    ours.settimeout(WAIT)
    header = ours.recv(4, socket.MSG_WAITALL)
    (size,) = struct.unpack(">I", header)
    reply = ours.recv(size, socket.MSG_WAITALL)
    assert b'"op":"reply"' in reply and b'"id":1' in reply, reply
    return process, ours


def test_the_worker_exits_when_its_adapter_is_gone() -> None:
    process, ours = _worker()
    try:
        assert process.poll() is None
        ours.close()
        _, errors = process.communicate(timeout=WAIT)
        assert process.returncode == 0, errors
    finally:
        _end(process)


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate()


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", 5) + b"[1,2]",
        struct.pack(">I", 7) + b"{nope!}",
        struct.pack(">I", 0xFFFFFFF0),
    ],
    ids=["not-an-object", "not-json", "over-the-limit"],
)
def test_the_worker_exits_on_a_frame_it_cannot_trust(frame: bytes) -> None:
    process, ours = _worker()
    try:
        ours.sendall(frame)
        _, errors = process.communicate(timeout=WAIT)
        assert process.returncode == 0, errors
        assert b"Traceback" not in errors
    finally:
        ours.close()
        _end(process)


def test_the_worker_ignores_sigint_and_sigterm() -> None:
    process, ours = _worker()
    try:
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert process.poll() is None
        ours.close()
        _, errors = process.communicate(timeout=WAIT)
        assert process.returncode == 0, errors
    finally:
        ours.close()
        _end(process)
