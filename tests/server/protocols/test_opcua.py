"""The OPC UA server against a real asyncua client, over real sockets.

One adapter (SQLite storage, Security, Engine, OPC UA server) serves the
whole module; clients connect with Basic256Sha256 SignAndEncrypt, a client
certificate from the trust folder and the password of an adapter user.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import (
    SecurityPolicyAes128Sha256RsaOaep,
    SecurityPolicyAes256Sha256RsaPss,
)
from asyncua.ua.uaerrors import UaStatusCodeError

from calejo_server import certs
from calejo_server.engine import RequestContext
from calejo_server.storage.base import AuditQuery, AuditRow

CTX = RequestContext(user="tester", source_address="127.0.0.1", protocol="REST")
SETTLE = 5.0
"""Seconds a value may take to reach a node (far above the update interval)."""


@pytest.fixture(scope="module")
def harness(opcua_harness: Any) -> Any:
    return opcua_harness


@pytest.fixture(scope="module")
def adapter(harness: Any) -> Any:
    return harness.start()


def node_id(ns: int, path: str) -> str:
    return f"ns={ns};s={path}"


async def eventually(
    read: Callable[[], Awaitable[Any]], expected: Any, timeout: float = SETTLE
) -> Any:
    """Read until the value equals ``expected`` (bounded); return the last one."""
    deadline = time.monotonic() + timeout
    value = await read()
    while value != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        value = await read()
    return value


async def until_health(
    adapter: Any, ready: Callable[[dict[str, Any]], bool], timeout: float = SETTLE
) -> dict[str, Any]:
    """The OPC UA health once ``ready`` holds (the worker's counters reach
    the adapter a moment after the event); fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    health = dict(adapter.server.health())
    while not ready(health):
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.02)
        health = dict(adapter.server.health())
    return health


async def audit_rows(adapter: Any, event_type: str) -> list[AuditRow]:
    return list(
        await adapter.storage.audit_query(AuditQuery(event_type=event_type, limit=1000))
    )


class Changes:
    """A subscription handler that queues every data change."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.queue.put_nowait(value)

    async def until(self, expected: Any, timeout: float = SETTLE) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            value = await asyncio.wait_for(self.queue.get(), max(remaining, 0.01))
            if value == expected:
                return value


# Address space.


def test_browse_paths_and_node_ids(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            assert ns == 2

            objects = client.nodes.objects
            setpoint = await objects.get_child(
                [
                    f"{ns}:PumpStations",
                    f"{ns}:north",
                    f"{ns}:Pumps",
                    f"{ns}:p1",
                    f"{ns}:Setpoint",
                ]
            )
            assert setpoint.nodeid.to_string() == node_id(
                ns, "PumpStations/north/Pumps/p1/Setpoint"
            )

            stations = client.get_node(node_id(ns, "PumpStations"))
            names = {
                (await c.read_browse_name()).Name for c in await stations.get_children()
            }
            assert names == {"north", "south"}

            north = client.get_node(node_id(ns, "PumpStations/north"))
            children = {
                (await c.read_browse_name()).to_string()
                for c in await north.get_children()
            }
            assert {
                f"{ns}:EmergencyStop",
                f"{ns}:Failsafe",
                f"{ns}:PlanStale",
                f"{ns}:Status",
                f"{ns}:Pumps",
                f"{ns}:ActivateEmergencyStop",
                f"{ns}:ClearEmergencyStop",
            } <= children

            pump = client.get_node(node_id(ns, "PumpStations/north/Pumps/p2"))
            variables = {
                (await c.read_browse_name()).Name for c in await pump.get_children()
            }
            assert variables == {
                "Setpoint",
                "Status",
                "Target",
                "MinValue",
                "MaxValue",
                "MaxRate",
                "Ramping",
                "SetpointAge",
                "PlanId",
            }

            heartbeat = await objects.get_child([f"{ns}:System", f"{ns}:Heartbeat"])
            assert heartbeat.nodeid.to_string() == node_id(ns, "System/Heartbeat")

    harness.run(scenario())


def test_values_and_data_types(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        view = adapter.engine.pump("north", "p1")
        assert not view.ramping
        async with harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            expected = {
                "p1/Setpoint": (view.applied, ua.VariantType.Double),
                "p1/Target": (view.target, ua.VariantType.Double),
                "p1/Status": (view.status, ua.VariantType.UInt16),
                "p1/Ramping": (False, ua.VariantType.Boolean),
                "p2/MinValue": (20.0, ua.VariantType.Double),
                "p2/MaxValue": (50.0, ua.VariantType.Double),
                "p2/MaxRate": (2.0, ua.VariantType.Double),
            }
            for name, (value, kind) in expected.items():
                node = client.get_node(node_id(ns, f"PumpStations/north/Pumps/{name}"))
                data = await node.read_data_value()
                assert data.Value.VariantType == kind, name
                assert data.Value.Value == value, name
                assert await node.read_data_type_as_variant_type() == kind, name

            no_ramp = client.get_node(
                node_id(ns, "PumpStations/north/Pumps/p1/MaxRate")
            )
            assert math.isinf(await no_ramp.read_value())

            station = adapter.engine.station("north")
            for name, value in (
                ("EmergencyStop", station.emergency_stop),
                ("Failsafe", station.failsafe),
                ("PlanStale", station.plan_stale),
            ):
                node = client.get_node(node_id(ns, f"PumpStations/north/{name}"))
                assert await node.read_value() is value, name
            status = client.get_node(node_id(ns, "PumpStations/north/Status"))
            assert (
                await status.read_data_value()
            ).Value.VariantType == ua.VariantType.UInt16

            heartbeat = client.get_node(node_id(ns, "System/Heartbeat"))
            data = await heartbeat.read_data_value()
            assert data.Value.VariantType == ua.VariantType.UInt32
            first = data.Value.Value
            later = await eventually(heartbeat.read_value, first + 2, timeout=4.0)
            assert later > first

    harness.run(scenario())


def test_setpoint_age_waits_for_a_first_setpoint(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            age = client.get_node(
                node_id(ns, "PumpStations/south/Pumps/s1/SetpointAge")
            )
            data = await age.read_data_value(raise_on_bad_status=False)
            assert data.StatusCode.name == "BadWaitingForInitialData"

    harness.run(scenario())


def test_subscription_sees_a_setpoint_set_through_the_engine(
    harness: Any, adapter: Any
) -> None:
    async def scenario() -> None:
        async with harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            setpoint = client.get_node(
                node_id(ns, "PumpStations/north/Pumps/p1/Setpoint")
            )
            target = client.get_node(node_id(ns, "PumpStations/north/Pumps/p2/Target"))
            changes = Changes()
            subscription = await client.create_subscription(50, changes)
            await subscription.subscribe_data_change([setpoint, target])
            await asyncio.wait_for(changes.queue.get(), SETTLE)

            result = await adapter.engine.set_setpoint("north", "p1", 41.5, CTX)
            assert result.outcome == "accepted"
            assert await changes.until(41.5) == 41.5

            result = await adapter.engine.set_setpoint("north", "p2", 44.0, CTX)
            assert await changes.until(44.0) == 44.0

            ramping = client.get_node(
                node_id(ns, "PumpStations/north/Pumps/p2/Ramping")
            )
            assert await eventually(ramping.read_value, True) is True

            ramp = Changes()
            watching = await client.create_subscription(50, ramp)
            applied = client.get_node(
                node_id(ns, "PumpStations/north/Pumps/p2/Setpoint")
            )
            await watching.subscribe_data_change(applied)
            seen = [await asyncio.wait_for(ramp.queue.get(), SETTLE)]
            deadline = time.monotonic() + 1.5
            while len(seen) < 4 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    seen.append(await asyncio.wait_for(ramp.queue.get(), 0.5))
            assert len(seen) >= 4, seen
            assert seen in (sorted(seen), sorted(seen, reverse=True)), seen
            await watching.delete()

            age = client.get_node(
                node_id(ns, "PumpStations/north/Pumps/p1/SetpointAge")
            )
            assert 0.0 <= await age.read_value() < 60.0
            await subscription.delete()

    harness.run(scenario())


def test_publishing_interval_has_a_floor(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter) as client:
            subscription = await client.create_subscription(1, Changes())
            floor = adapter.server.options.min_publishing_interval_ms
            # The client adopts the interval the server revised its request to.
            assert subscription.parameters.RequestedPublishingInterval == floor
            await subscription.delete()

    harness.run(scenario())


def test_variables_are_read_only(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter) as client:
            ns = await adapter.namespace(client)
            node = client.get_node(node_id(ns, "PumpStations/north/Pumps/p1/Setpoint"))
            before = await node.read_value()
            with pytest.raises(UaStatusCodeError) as caught:
                await node.write_value(ua.Variant(30.0, ua.VariantType.Double))
            assert caught.value.code == ua.StatusCodes.BadUserAccessDenied
            assert await node.read_value() == before
            assert adapter.engine.pump("north", "p1").applied == before

    harness.run(scenario())


# Security.


def test_endpoints_offer_only_the_configured_security(
    harness: Any, adapter: Any
) -> None:
    async def scenario() -> list[Any]:
        client = Client(adapter.url, timeout=5)
        return list(await client.connect_and_get_server_endpoints())

    endpoints = harness.run(scenario())
    offered = {
        (e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode) for e in endpoints
    }
    modes = (ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt)
    assert offered == {
        (policy, mode)
        for policy in ("Basic256Sha256", "Aes256_Sha256_RsaPss")
        for mode in modes
    }
    for endpoint in endpoints:
        tokens = {token.TokenType for token in endpoint.UserIdentityTokens}
        assert tokens == {ua.UserTokenType.UserName}
        assert endpoint.ServerCertificate == certs.load_certificate(
            adapter.server.options.certificate_dir / certs.SERVER_CERT
        ).public_bytes(certs.serialization.Encoding.DER)
        assert endpoint.Server.ApplicationUri == adapter.server.application_uri


def test_session_without_security_is_refused(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        client = await harness.make_client(adapter, "oper", secure=False)
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with _quiet():
            await client.disconnect()
        assert caught.value.code == ua.StatusCodes.BadSecurityPolicyRejected

    harness.run(scenario())


def test_a_policy_not_offered_is_refused(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        client = await harness.make_client(
            adapter, "oper", policy=SecurityPolicyAes128Sha256RsaOaep, pin_server=True
        )
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with _quiet():
            await client.disconnect()
        assert caught.value.code == ua.StatusCodes.BadSecurityPolicyRejected

    harness.run(scenario())


def test_garbage_on_the_socket_does_not_hurt_others(harness: Any, adapter: Any) -> None:
    host, port = "127.0.0.1", adapter.server.options.port
    hello = (
        b"HELF"
        + struct.pack("<I", 8 + 20 + 4 + len(adapter.url))
        + struct.pack("<5I", 0, 65535, 65535, 0, 0)
        + struct.pack("<I", len(adapter.url))
        + adapter.url.encode()
    )
    junk = [
        b"\x00" * 64,
        b"OPNF" + struct.pack("<I", 40) + b"\xff" * 32,
        hello + b"OPNF" + struct.pack("<I", 24) + b"\x01" * 16,
        hello + b"MSGF" + struct.pack("<I", 24) + b"\x02" * 16,
        b"HELF" + struct.pack("<I", 7),
    ]

    async def send(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(data)
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                return b""
        finally:
            writer.close()
            with _quiet():
                await writer.wait_closed()

    async def scenario() -> None:
        for data in junk:
            await send(data)
        async with harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            node = client.get_node(node_id(ns, "PumpStations/north/Pumps/p1/MaxValue"))
            assert await node.read_value() == 50.0

    harness.run(scenario(), timeout=30.0)


def test_aes256_sign_only_works(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(
            adapter,
            "watcher",
            policy=SecurityPolicyAes256Sha256RsaPss,
            mode=ua.MessageSecurityMode.Sign,
        ) as client:
            ns = await adapter.namespace(client)
            node = client.get_node(node_id(ns, "PumpStations/south/Pumps/s1/MaxValue"))
            assert await node.read_value() == 40.0

    harness.run(scenario())


def test_anonymous_is_refused_and_audited(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        before = len(await audit_rows(adapter, "INVALID_AUTHENTICATION"))
        client = await harness.make_client(adapter, None)
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with _quiet():
            await client.disconnect()
        assert caught.value.code == ua.StatusCodes.BadIdentityTokenRejected

        rows = await audit_rows(adapter, "INVALID_AUTHENTICATION")
        assert len(rows) == before + 1
        assert rows[-1].record.protocol == "OPCUA"
        assert rows[-1].record.source_address == "127.0.0.1"

    harness.run(scenario())


def test_wrong_password_is_refused_and_counts_toward_lockout(
    harness: Any, adapter: Any
) -> None:
    threshold = adapter.config.security.lockout_threshold

    async def attempt(password: str) -> None:
        client = await harness.make_client(adapter, "victim", password=password)
        try:
            await client.connect()
        finally:
            with _quiet():
                await client.disconnect()

    async def scenario() -> None:
        for number in range(threshold):
            with pytest.raises(UaStatusCodeError) as caught:
                await attempt(f"not-the-password-{number}")
            assert caught.value.code == ua.StatusCodes.BadUserAccessDenied

        view = adapter.security.user_by_name("victim")
        assert view.locked_until is not None

        with pytest.raises(UaStatusCodeError):
            await attempt(harness.users["victim"][1])

        rows = await audit_rows(adapter, "INVALID_AUTHENTICATION")
        mine = [r for r in rows if r.record.user == "victim"]
        assert len(mine) == threshold + 1
        assert {r.record.protocol for r in mine} == {"OPCUA"}
        assert [r.record.user for r in await audit_rows(adapter, "ACCOUNT_LOCKED")] == [
            "victim"
        ]

    harness.run(scenario(), timeout=30.0)


def test_untrusted_client_certificate_is_refused(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        client = await harness.make_client(adapter, "oper", cert=harness.untrusted)
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with _quiet():
            await client.disconnect()
        assert caught.value.code == ua.StatusCodes.BadCertificateUntrusted
        await until_health(adapter, lambda h: h["refused_channels"] >= 1)

    harness.run(scenario())
    rejected = list(adapter.server.options.rejected_dir.iterdir())
    assert [path.suffix for path in rejected] == [".der"]


def test_a_user_who_must_change_the_password_is_refused(
    harness: Any, adapter: Any
) -> None:
    async def scenario() -> None:
        _, initial = await adapter.security.create_user(
            "newcomer", "newcomer@example.org", "operator", None, CTX
        )
        client = await harness.make_client(adapter, "newcomer", password=initial)
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with _quiet():
            await client.disconnect()
        assert caught.value.code == ua.StatusCodes.BadUserAccessDenied

        rows = await audit_rows(adapter, "ACCESS_DENIED")
        assert rows[-1].record.user == "newcomer"
        assert rows[-1].record.protocol == "OPCUA"

    harness.run(scenario())


def test_a_deactivated_user_loses_its_session(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter, "leaver") as client:
            ns = await adapter.namespace(client)
            node = client.get_node(node_id(ns, "PumpStations/north/Failsafe"))
            await node.read_value()

            user = adapter.security.user_by_name("leaver")
            await adapter.security.deactivate_user(user.user_id, CTX)
            with pytest.raises(UaStatusCodeError) as caught:
                await node.read_value()
            assert caught.value.code == ua.StatusCodes.BadUserAccessDenied

    harness.run(scenario())


# Emergency stops.


def test_operator_stops_and_clears_a_station(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter, "oper") as client:
            ns = await adapter.namespace(client)
            station = client.get_node(node_id(ns, "PumpStations/north"))
            stop = client.get_node(
                node_id(ns, "PumpStations/north/ActivateEmergencyStop")
            )
            clear = client.get_node(
                node_id(ns, "PumpStations/north/ClearEmergencyStop")
            )
            flag = client.get_node(node_id(ns, "PumpStations/north/EmergencyStop"))

            active = await station.call_method(
                stop, ua.Variant("flooding", ua.VariantType.String)
            )
            assert active is True
            status = adapter.engine.emergency_stop_status("north")
            assert status.active and status.level == "station"
            assert status.operator == "oper" and status.reason == "flooding"
            assert await eventually(flag.read_value, True) is True
            setpoint = client.get_node(
                node_id(ns, "PumpStations/north/Pumps/p2/Setpoint")
            )
            assert await eventually(setpoint.read_value, 0.0) == 0.0

            active = await station.call_method(
                clear, ua.Variant("drained", ua.VariantType.String)
            )
            assert active is False
            assert not adapter.engine.emergency_stop_status("north").active
            assert await eventually(flag.read_value, False) is False

            with pytest.raises(UaStatusCodeError) as caught:
                await station.call_method(
                    clear, ua.Variant("again", ua.VariantType.String)
                )
            assert caught.value.code == ua.StatusCodes.BadInvalidState

        for event_type in ("EMERGENCY_STOP_ACTIVATED", "EMERGENCY_STOP_CLEARED"):
            rows = await audit_rows(adapter, event_type)
            assert rows and rows[-1].record.protocol == "OPCUA", event_type
            assert rows[-1].record.user == "oper"
            assert rows[-1].record.station_id == "north"
            assert rows[-1].record.source_address == "127.0.0.1"

    harness.run(scenario())


@pytest.mark.parametrize(
    ("argument", "code"),
    [
        (ua.Variant("", ua.VariantType.String), "BadInvalidArgument"),
        (ua.Variant("x" * 501, ua.VariantType.String), "BadInvalidArgument"),
        (ua.Variant(7, ua.VariantType.Int32), "BadTypeMismatch"),
        (None, "BadArgumentsMissing"),
    ],
)
def test_method_arguments_are_checked(
    harness: Any, adapter: Any, argument: Any, code: str
) -> None:
    async def scenario() -> None:
        async with harness.client(adapter, "oper") as client:
            ns = await adapter.namespace(client)
            station = client.get_node(node_id(ns, "PumpStations/south"))
            stop = client.get_node(
                node_id(ns, "PumpStations/south/ActivateEmergencyStop")
            )
            args = [] if argument is None else [argument]
            with pytest.raises(UaStatusCodeError) as caught:
                await station.call_method(stop, *args)
            assert caught.value.code == getattr(ua.StatusCodes, code)
        assert not adapter.engine.emergency_stop_status("south").active

    harness.run(scenario())


def test_viewer_is_denied_and_audited(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        before = len(await audit_rows(adapter, "ACCESS_DENIED"))
        async with harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            station = client.get_node(node_id(ns, "PumpStations/north"))
            stop = client.get_node(
                node_id(ns, "PumpStations/north/ActivateEmergencyStop")
            )
            with pytest.raises(UaStatusCodeError) as caught:
                await station.call_method(
                    stop, ua.Variant("curious", ua.VariantType.String)
                )
            assert caught.value.code == ua.StatusCodes.BadUserAccessDenied

        assert not adapter.engine.emergency_stop_status("north").active
        rows = await audit_rows(adapter, "ACCESS_DENIED")
        assert len(rows) == before + 1
        record = rows[-1].record
        assert (record.user, record.protocol, record.outcome) == (
            "watcher",
            "OPCUA",
            "denied",
        )
        assert record.details["permission"] == "emergency_stop"
        assert record.details["path"] == "PumpStations/north/ActivateEmergencyStop"

    harness.run(scenario())


def test_engine_emergency_stop_shows_on_the_station(harness: Any, adapter: Any) -> None:
    async def scenario() -> None:
        async with harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            flag = client.get_node(node_id(ns, "PumpStations/south/EmergencyStop"))
            status = client.get_node(node_id(ns, "PumpStations/south/Status"))
            changes = Changes()
            subscription = await client.create_subscription(50, changes)
            await subscription.subscribe_data_change(flag)
            assert await changes.until(False) is False

            await adapter.engine.emergency_stop(
                "station", "south", None, "test", "tester", CTX
            )
            assert await changes.until(True) is True
            assert await eventually(
                status.read_value, adapter.engine.station("south").status
            )
            assert (await status.read_value()) & 1 == 1

            await adapter.engine.clear_emergency_stop(
                "station", "south", None, "done", "tester", CTX
            )
            assert await changes.until(False) is False
            await subscription.delete()

    harness.run(scenario())


def test_system_emergency_stop_reaches_every_station(
    harness: Any, adapter: Any
) -> None:
    async def scenario() -> None:
        async with harness.client(adapter, "watcher") as client:
            ns = await adapter.namespace(client)
            flags = [
                client.get_node(node_id(ns, f"PumpStations/{sid}/EmergencyStop"))
                for sid in ("north", "south")
            ]
            await adapter.engine.emergency_stop(
                "system", None, None, "test", "tester", CTX
            )
            for flag in flags:
                assert await eventually(flag.read_value, True) is True
            await adapter.engine.clear_emergency_stop(
                "system", None, None, "done", "tester", CTX
            )
            for flag in flags:
                assert await eventually(flag.read_value, False) is False

    harness.run(scenario())


# Health.


def test_health_reports_sessions_and_certificate(harness: Any, adapter: Any) -> None:
    async def scenario() -> dict[str, Any]:
        async with harness.client(adapter, "watcher"):
            return await until_health(
                adapter, lambda h: h["sessions"] >= 1 and h["connections"] >= 1
            )

    health = harness.run(scenario())
    assert health["state"] == "ok"
    assert health["endpoint"] == adapter.url
    assert health["worker_pid"] == adapter.server.pid
    assert health["trusted_certificates"] == 1

    expiry = adapter.server.certificate_expiry()
    files = certs.CertificateFiles(adapter.server.options.certificate_dir)
    assert expiry == certs.certificate_expiry(files.server_cert)
    assert health["certificate_expires"] == expiry.isoformat()
    assert expiry - dt.datetime.now(dt.UTC) > dt.timedelta(days=700)
    certs.verify_server_certificate(files)

    component = adapter.server.health_check()
    assert component.state == "ok" and component.critical


class _quiet:
    """Swallow whatever a half-open client raises while disconnecting."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True
