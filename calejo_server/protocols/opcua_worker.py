"""The OPC UA worker: the process that serves OPC UA clients.

asyncua spends milliseconds of CPU per publishing cycle on every
subscription (copying, encoding, signing and encrypting notifications).
Run on the adapter's event loop, that work would hold up REST answers and
Modbus reads; so the adapter (:class:`~calejo_server.protocols.opcua.
OpcUaServer`) starts this process, at a lower CPU priority, and keeps it
fed over a :mod:`~calejo_server.protocols.opcua_link`:

- the adapter binds the listening socket and passes it in, so a port in
  use is reported by the adapter and a restarted worker listens on the
  same socket;
- ``init`` brings the settings, the stations and pumps and their first
  values; the worker builds the address space, writes them and listens;
- ``values`` messages bring what changed (applied, target and status bits
  of pumps, setpoint ages, plans, station status bits, the heartbeat);
- ``directory`` brings which users are active with which role, and the
  permissions of each role, whenever they change;
- the worker asks the adapter to check passwords, record refusals and
  audit records, and to run emergency-stop method calls, which the
  adapter checks against its own users and roles once more;
- it sends its counters (``stats``) and its log records to the adapter.

The worker stops when told, and when the link closes (the adapter is
gone); it ignores SIGINT and SIGTERM, which the adapter handles for both.

Run as ``python -m calejo_server.protocols.opcua_worker --link-fd N
--listen-fd M``; the adapter does that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from asyncua import ua
from asyncua.common.node import Node
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from calejo_server.protocols.opcua_access import (
    Access,
    AdapterUaServer,
    Ruleset,
    SessionUser,
    current_caller,
    numeric_node_id,
    status,
)
from calejo_server.protocols.opcua_link import (
    NAMESPACE_URI,
    PRODUCT_URI,
    VERSION,
    Link,
    LinkClosed,
    LinkError,
    Message,
    open_link,
)
from calejo_server.protocols.opcua_nodes import Builder, Values, Variable, write
from calejo_server.protocols.opcua_trust import TrustList
from calejo_server.security.directory import (
    AuthError,
    Principal,
    SecurityError,
    UnknownUser,
)
from calejo_server.storage.base import AuditRecord, StorageError

logger = logging.getLogger(__name__)

MAX_REASON: Final = 500
UPDATE_CHUNK: Final = 256
"""Pumps written between two yields to the event loop."""
STATS_INTERVAL: Final = 0.2
"""Seconds between checks of the counters (sent when they changed)."""
STATS_ALIVE: Final = 1.0
"""Seconds after which the counters are sent even when unchanged."""
REQUEST_TIMEOUT: Final = 30.0
"""Seconds the worker waits for the adapter to answer (a password check
waits its turn behind others)."""
STOP_TIMEOUT: Final = 2.0

_DOUBLE = ua.VariantType.Double
_BOOLEAN = ua.VariantType.Boolean
_UINT16 = ua.VariantType.UInt16
_UINT32 = ua.VariantType.UInt32
_STRING = ua.VariantType.String

STATION_VARIABLES: Final = (
    ("EmergencyStop", _BOOLEAN, "an emergency stop covers a pump of the station"),
    ("Failsafe", _BOOLEAN, "the watchdog holds the station at its failsafe values"),
    ("PlanStale", _BOOLEAN, "the newest plan has no interval now or later"),
    (
        "Status",
        _UINT16,
        "station status bits: 0 emergency stop, 1 failsafe, 2 plan stale, "
        "3 storage degraded",
    ),
)
PUMP_VARIABLES: Final = (
    ("Setpoint", _DOUBLE, "the applied setpoint, in the pump's units"),
    (
        "Status",
        _UINT16,
        "pump status bits: 0 emergency stop, 1 failsafe, 2 clamped, 3 ramping, "
        "4 last request rejected",
    ),
    ("Target", _DOUBLE, "the target the applied setpoint ramps to, in units"),
    ("MinValue", _DOUBLE, "the lowest setpoint the gate accepts, in units"),
    ("MaxValue", _DOUBLE, "the highest setpoint the gate accepts, in units"),
    ("MaxRate", _DOUBLE, "the fastest ramp, units per second (inf: no ramp)"),
    ("Ramping", _BOOLEAN, "the applied setpoint is moving toward the target"),
    ("SetpointAge", _DOUBLE, "seconds since the last setpoint (0.1 s steps)"),
    ("PlanId", _STRING, "the plan whose interval the pump follows now (empty: none)"),
)
STATION_FLAGS: Final = ("EmergencyStop", "Failsafe", "PlanStale")
"""The station's Boolean variables, each one bit of its status register; the
adapter sends which bit (``settings["bits"]``), as its core defines them."""


_REFUSALS: Final = {
    "denied": StatusCodes.BadUserAccessDenied,
    "conflict": StatusCodes.BadInvalidState,
    "invalid": StatusCodes.BadInvalidArgument,
}
"""The adapter's verdicts on an emergency-stop call, to OPC UA status codes."""


# What the worker asks of the adapter.


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    """What the worker knows of a user: active or not, and the role."""

    active: bool
    role: str


class RemoteDirectory:
    """The adapter's users and roles, as :class:`Access` uses them.

    Password checks and refusals go to the adapter; which users are active
    with which role, and what each role may do, are kept here as the
    adapter last sent them, so that each request is checked without a
    round trip.
    """

    def __init__(self) -> None:
        self.link: Link | None = None
        self._accounts: dict[str, Account] = {}
        self._grants: dict[str, frozenset[str]] = {}

    def load(self, message: Mapping[str, Any]) -> None:
        """Take a ``directory`` message: every user and role, as of now."""
        users = message.get("users") or {}
        roles = message.get("roles") or {}
        self._accounts = {
            str(user_id): Account(bool(active), str(role))
            for user_id, (active, role) in users.items()
        }
        self._grants = {
            str(role): frozenset(str(p) for p in perms) for role, perms in roles.items()
        }

    def user(self, user_id: str) -> Account:
        account = self._accounts.get(user_id)
        if account is None:
            raise UnknownUser(user_id)
        return account

    def permissions_of(self, role: str) -> frozenset[str]:
        return self._grants.get(role, frozenset())

    async def check_password(
        self, username: str, password: str, source: str | None, protocol: str
    ) -> Principal:
        reply = await self._ask(
            "check_password",
            username=username,
            password=password,
            source=source,
            protocol=protocol,
        )
        refused = reply.get("refused")
        if refused == "auth":
            raise AuthError(str(reply.get("message") or "login failed"))
        if refused is not None:
            raise SecurityError(str(reply.get("message") or "login refused"))

        self.load(reply.get("directory") or {})
        return _principal(reply["principal"])

    async def deny(
        self,
        *,
        status: int,
        reason: str,
        principal: Principal | None,
        source: str | None,
        protocol: str,
        method: str,
        path: str,
        permission: str | None = None,
    ) -> None:
        await self._ask(
            "deny",
            status=status,
            reason=reason,
            user_id=principal.user_id if principal is not None else None,
            source=source,
            protocol=protocol,
            method=method,
            path=path,
            permission=permission,
        )

    async def _ask(self, op: str, **fields: Any) -> Message:
        if self.link is None:
            raise SecurityError("the adapter is not reachable")
        try:
            return await self.link.request(op, REQUEST_TIMEOUT, **fields)
        except (LinkClosed, LinkError, TimeoutError) as exc:
            raise SecurityError(f"the adapter did not answer {op}: {exc}") from None


class RemoteAudit:
    """Audit records of OPC UA sessions, written by the adapter."""

    def __init__(self) -> None:
        self.link: Link | None = None

    async def write(self, records: Sequence[Any]) -> None:
        if self.link is None:
            raise StorageError("the adapter is not reachable")

        rows = [_audit_fields(record) for record in records]
        try:
            await self.link.request("audit", REQUEST_TIMEOUT, records=rows)
        except (LinkClosed, LinkError, TimeoutError) as exc:
            raise StorageError(f"the adapter did not record: {exc}") from None


def _audit_fields(record: AuditRecord) -> dict[str, Any]:
    return {
        "event_type": record.event_type,
        "timestamp": record.timestamp.isoformat(),
        "user": record.user,
        "source_address": record.source_address,
        "outcome": record.outcome,
        "details": record.details,
        "uid": record.uid,
    }


def _principal(fields: Mapping[str, Any]) -> Principal:
    return Principal(
        user_id=str(fields["user_id"]),
        username=str(fields["username"]),
        role=str(fields["role"]),
        permissions=frozenset(str(p) for p in fields.get("permissions") or ()),
        must_change_password=bool(fields.get("must_change_password")),
    )


# The server.


@dataclasses.dataclass(slots=True)
class _StationNodes:
    station_id: str
    variables: dict[str, Variable]
    bits: int = -1


class Worker:
    """The asyncua server of the worker and the values of its nodes."""

    def __init__(self, listen: socket.socket | None) -> None:
        self.listen = listen
        self.link: Link | None = None
        self.directory = RemoteDirectory()
        self.audit = RemoteAudit()
        self.server: AdapterUaServer | None = None
        self.access: Access | None = None
        self.namespace_index = 0
        self.stations: list[_StationNodes] = []
        self.pumps: list[dict[str, Variable] | None] = []
        self.shown: list[tuple[Any, Any, Any] | None] = []
        """Per pump, the (applied, target, status) its nodes hold."""
        self.heartbeat: Variable | None = None

        self.station_bits: tuple[tuple[str, int], ...] = ()
        self.ramping_bit = 0
        self.updates = 0
        self.writes = 0
        self.update_errors = 0
        self.last_update_error: str | None = None
        self.last_update_at: dt.datetime | None = None
        self.build_seconds = 0.0
        self.standard_nodes = "loaded"
        self.stopped = asyncio.Event()
        self._stats_task: asyncio.Task[None] | None = None

    def attach(self, link: Link) -> None:
        self.link = link
        self.directory.link = link
        self.audit.link = link

    # The link.

    async def on_request(self, message: Message) -> Message | None:
        op = message["op"]
        if op == "init":
            return await self.start(message)
        if op == "directory":
            self.directory.load(message)
            return None
        if op == "stop":
            await self.stop()
            return None
        raise ValueError(f"unknown request {op!r}")

    async def on_message(self, message: Message) -> None:
        op = message["op"]
        if op == "values":
            await self.apply(message)
        elif op == "directory":
            self.directory.load(message)
        else:
            logger.warning("opc ua worker: unknown message %r ignored", op)

    # Life cycle.

    async def start(self, init: Mapping[str, Any]) -> Message:
        """Build the server and its address space from ``init``, then listen."""
        if self.server is not None:
            raise RuntimeError("the opc ua worker is started already")
        if init.get("version") != VERSION:
            raise RuntimeError(
                f"expected messages of version {VERSION}, got {init.get('version')!r}: "
                "the adapter and its worker are of different releases; restart "
                "the adapter"
            )

        settings = init["settings"]
        bits = settings["bits"]
        self.station_bits = tuple((name, int(bits[name])) for name in STATION_FLAGS)
        self.ramping_bit = int(bits["Ramping"])
        nice = int(settings.get("nice", 0))
        if nice > 0:
            try:
                os.nice(nice)
            except OSError as exc:
                logger.warning(
                    "opc ua worker: could not lower its CPU priority by %d (%s); "
                    "it runs at the adapter's priority",
                    nice,
                    exc.strerror or exc,
                )
        self.directory.load(init.get("directory") or {})

        server = await self._build_server(settings)
        self.server = server
        started = time.monotonic()
        await self._build_address_space(server, init["stations"])
        await self.apply(init.get("values") or {})
        self.build_seconds = time.monotonic() - started

        sock, self.listen = self.listen, None
        try:
            await server.start(sock=sock)
        except BaseException:
            self.server = None
            raise
        self._stats_task = asyncio.create_task(self._send_stats_forever())
        return {
            "build_seconds": self.build_seconds,
            "pumps": sum(1 for pump in self.pumps if pump is not None),
            "stats": self.stats(),
        }

    async def stop(self) -> None:
        """Close every session and the listening socket."""
        task, self._stats_task = self._stats_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        server, self.server = self.server, None
        if server is not None:
            try:
                await asyncio.wait_for(server.stop(), STOP_TIMEOUT)
            except Exception as exc:
                logger.warning("opc ua server did not stop cleanly: %s", exc)
        self.stopped.set()

    async def _build_server(self, settings: Mapping[str, Any]) -> AdapterUaServer:
        policy_types = [
            getattr(ua.SecurityPolicyType, f"{policy}_{mode}")
            for policy in settings["policies"]
            for mode in settings["modes"]
        ]
        if settings["allow_none_endpoint"]:
            policy_types.insert(0, ua.SecurityPolicyType.NoSecurity)

        trust = TrustList(
            Path(settings["trust_dir"]),
            rejected_dir=Path(settings["rejected_dir"]),
            crl_dir=Path(settings["crl_dir"]),
        )
        access = Access(
            self.directory,
            trust,
            policy_uris=settings["policy_uris"],
            allow_none=settings["allow_none_endpoint"],
            allow_anonymous=settings["allow_anonymous"],
            storage=self.audit,
        )
        server = AdapterUaServer(access, settings["min_publishing_interval_ms"])
        self.access = access

        from calejo_server import certs

        server.iserver.certificate = certs.load_certificate(
            Path(settings["certificate"])
        )
        server.iserver.private_key = certs.load_private_key(Path(settings["key"]))
        server.iserver.max_connections = settings["max_connections"]
        server.iserver.max_subscriptions = settings["max_subscriptions"]
        server.allow_remote_admin(False)

        cached = settings.get("standard_nodes")
        shelf = Path(cached) if cached and Path(cached).is_file() else None
        await server.init(shelf)
        self.standard_nodes = "cached" if shelf is not None else "loaded"
        await server.set_application_uri(settings["application_uri"])
        server.product_uri = PRODUCT_URI
        server.manufacturer_name = "Calejo"
        server.set_server_name(settings["server_name"])
        server.set_endpoint(settings["endpoint"])
        server.socket_address = (settings["host"], settings["port"])
        server.set_security_policy(policy_types, permission_ruleset=Ruleset(access))
        tokens: list[type] = [ua.UserNameIdentityToken]
        if settings["allow_anonymous"]:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)

        self.namespace_index = await server.register_namespace(NAMESPACE_URI)
        return server

    async def _build_address_space(
        self, server: AdapterUaServer, stations: Sequence[Mapping[str, Any]]
    ) -> None:
        aspace = server.iserver.aspace
        build = Builder(aspace, self.namespace_index)
        objects = numeric_node_id(ObjectIds.ObjectsFolder)
        folder = build.folder(
            objects, "PumpStations", "PumpStations", "the pump stations"
        )
        system = build.object(objects, "System", "System", "the adapter")
        heartbeat = build.variables(
            system,
            "System",
            (("Heartbeat", _UINT32, "+1 each second, wraps at 65535"),),
        )
        self.heartbeat = heartbeat["Heartbeat"]

        size = 1 + max(
            (pump["index"] for station in stations for pump in station["pumps"]),
            default=-1,
        )
        self.pumps = [None] * size
        self.shown = [None] * size
        self.stations = []
        values = Values()
        for station in stations:
            self.stations.append(self._build_station(build, folder, station, values))
            node = server.get_node(
                build.node_id(f"PumpStations/{station['station_id']}")
            )
            await self._method(node, station["station_id"], activate=True)
            await self._method(node, station["station_id"], activate=False)
            await asyncio.sleep(0)

        for station in stations:
            for pump in station["pumps"]:
                nodes = self.pumps[pump["index"]]
                assert nodes is not None
                max_rate = pump["max_rate"]
                for name, value in (
                    ("MinValue", float(pump["min_value"])),
                    ("MaxValue", float(pump["max_value"])),
                    ("MaxRate", float("inf") if max_rate is None else float(max_rate)),
                ):
                    await write(aspace, nodes[name], value, values)

    def _build_station(
        self,
        build: Builder,
        parent: ua.NodeId,
        station: Mapping[str, Any],
        values: Values,
    ) -> _StationNodes:
        station_id = station["station_id"]
        base = f"PumpStations/{station_id}"
        node = build.object(parent, base, station_id, station["name"])
        nodes = _StationNodes(
            station_id, build.variables(node, base, STATION_VARIABLES)
        )

        pumps = build.folder(node, f"{base}/Pumps", "Pumps", "the pumps")
        for pump in station["pumps"]:
            path = f"{base}/Pumps/{pump['pump_id']}"
            pump_node = build.object(
                pumps, path, pump["pump_id"], f"{pump['name']} ({pump['units']})"
            )
            self.pumps[pump["index"]] = build.variables(pump_node, path, PUMP_VARIABLES)
        return nodes

    async def _method(self, station: Node, station_id: str, *, activate: bool) -> None:
        name = "ActivateEmergencyStop" if activate else "ClearEmergencyStop"
        reason = ua.Argument(
            Name="Reason",
            DataType=numeric_node_id(ObjectIds.String),
            ValueRank=-1,
            Description=ua.LocalizedText(
                f"why the emergency stop is {'activated' if activate else 'cleared'} "
                f"(1 to {MAX_REASON} characters)"
            ),
        )
        active = ua.Argument(
            Name="Active",
            DataType=numeric_node_id(ObjectIds.Boolean),
            ValueRank=-1,
            Description=ua.LocalizedText("an emergency stop still covers the station"),
        )

        async def handler(parent: ua.NodeId, *args: ua.Variant) -> Any:
            return await self._call_emergency_stop(station_id, activate, args)

        await station.add_method(
            ua.NodeId(f"PumpStations/{station_id}/{name}", self.namespace_index),  # type: ignore[arg-type]
            ua.QualifiedName(name, self.namespace_index),
            handler,
            [reason],
            [active],
        )

    async def _call_emergency_stop(
        self, station_id: str, activate: bool, args: Sequence[object]
    ) -> list[ua.Variant] | ua.StatusCode:
        """The adapter checks the caller's permission, audits, and acts."""
        caller = current_caller()
        user = caller.user if caller is not None else None
        if not isinstance(user, SessionUser) or self.link is None:
            return status(StatusCodes.BadUserAccessDenied)

        principal = user.principal
        reason = check_reason(args)
        try:
            reply = await self.link.request(
                "emergency_stop",
                REQUEST_TIMEOUT,
                station_id=station_id,
                activate=activate,
                reason=reason if isinstance(reason, str) else None,
                bad_argument=None if isinstance(reason, str) else int(reason.value),
                user_id=principal.user_id if principal is not None else None,
                address=caller.address if caller is not None else None,
            )
        except (LinkClosed, TimeoutError) as exc:
            logger.warning(
                "opc ua emergency stop at %r: no answer (%s)", station_id, exc
            )
            return status(StatusCodes.BadTimeout)

        result = reply.get("result")
        if result == "ok":
            return [ua.Variant(bool(reply.get("active")), _BOOLEAN)]
        if result == "bad_argument" and isinstance(reply.get("code"), int):
            return status(reply["code"])
        return status(_REFUSALS.get(str(result), StatusCodes.BadUserAccessDenied))

    # Values.

    async def apply(self, message: Mapping[str, Any]) -> None:
        """Write the values of one ``values`` message (or of ``init``)."""
        if not self.pumps and not self.stations:
            return
        try:
            await self._apply(message)
        except Exception as exc:
            self.update_errors += 1
            if self.last_update_error != str(exc):
                logger.exception("opc ua update failed")
            self.last_update_error = str(exc)
            return

        self.updates += 1
        self.last_update_at = dt.datetime.now(dt.UTC)
        self.last_update_error = None

    async def _apply(self, message: Mapping[str, Any]) -> None:
        """Station bits first, then pumps: a subscription that watches both
        hears of an emergency stop before the pumps' values that follow it."""
        aspace = self._aspace()
        at = message.get("at")
        stamp = dt.datetime.fromtimestamp(at, dt.UTC) if at else None
        values = Values(stamp)
        written = 0
        count = 0

        stations = message.get("stations")
        if stations:
            for index, bits in zip(stations["index"], stations["bits"], strict=True):
                if 0 <= index < len(self.stations):
                    written += await self._station_bits(
                        self.stations[index], int(bits), values
                    )

        pumps = message.get("pumps")
        if pumps:
            rows = zip(
                pumps["index"],
                pumps["applied"],
                pumps["target"],
                pumps["status"],
                strict=True,
            )
            for index, applied, target, bits in rows:
                written += await self._pump_values(index, applied, target, bits, values)
                count += 1
                if count % UPDATE_CHUNK == 0:
                    await asyncio.sleep(0)

        for span in message.get("spans", ()):
            written += await self._span(span, values)

        ages = message.get("ages")
        if ages:
            for index, age in zip(ages["index"], ages["age"], strict=True):
                nodes = self.pumps[index] if 0 <= index < len(self.pumps) else None
                if nodes is None:
                    continue
                value = None if age is None else float(age)
                written += await write(aspace, nodes["SetpointAge"], value, values)
                count += 1
                if count % UPDATE_CHUNK == 0:
                    await asyncio.sleep(0)

        plans = message.get("plans")
        if plans:
            for index, plan in zip(plans["index"], plans["plan"], strict=True):
                nodes = self.pumps[index] if 0 <= index < len(self.pumps) else None
                if nodes is not None:
                    written += await write(
                        aspace, nodes["PlanId"], str(plan or ""), values
                    )

        heartbeat = message.get("heartbeat")
        if heartbeat is not None and self.heartbeat is not None:
            written += await write(
                aspace, self.heartbeat, int(heartbeat) & 0xFFFFFFFF, values
            )
        self.writes += written

    async def _pump_values(
        self, index: int, applied: Any, target: Any, bits: Any, values: Values
    ) -> int:
        """Write one pump's setpoint, target, status and ramping; the count."""
        nodes = self.pumps[index] if 0 <= index < len(self.pumps) else None
        if nodes is None:
            return 0
        aspace = self._aspace()
        status = int(bits)
        written = await write(aspace, nodes["Setpoint"], _real(applied), values)
        written += await write(aspace, nodes["Target"], _real(target), values)
        written += await write(aspace, nodes["Status"], status & 0xFFFF, values)
        written += await write(
            aspace, nodes["Ramping"], bool(status & self.ramping_bit), values
        )
        self.shown[index] = (applied, target, bits)
        return written

    async def _span(self, span: Mapping[str, Any], values: Values) -> int:
        """The pumps of one station as a request left them: the values of
        those that differ from what their nodes show, with their setpoint
        ages (the pumps a request set, whose age starts again)."""
        first = span["first"]
        if not isinstance(first, int) or first < 0:
            raise ValueError(f"a span's first pump: expected an index, got {first!r}")
        shown = self.shown
        written = 0
        rows = zip(
            span["applied"], span["target"], span["status"], span["age"], strict=True
        )
        for index, (applied, target, bits, age) in enumerate(rows, first):
            if index >= len(shown):
                break
            if shown[index] == (applied, target, bits):
                continue
            written += await self._pump_values(index, applied, target, bits, values)
            nodes = self.pumps[index]
            if nodes is not None:
                value = None if age is None else float(age)
                written += await write(
                    self._aspace(), nodes["SetpointAge"], value, values
                )
        return written

    async def _station_bits(
        self, nodes: _StationNodes, bits: int, values: Values
    ) -> int:
        aspace = self._aspace()
        written = 0
        variables = nodes.variables
        for name, mask in self.station_bits:
            written += await write(aspace, variables[name], bool(bits & mask), values)
        written += await write(aspace, variables["Status"], bits & 0xFFFF, values)
        nodes.bits = bits
        return written

    def _aspace(self) -> Any:
        server = self.server
        if server is None:
            raise RuntimeError("the opc ua server is not built")
        return server.iserver.aspace

    # Counters.

    def stats(self) -> Message:
        server = self.server
        access = self.access
        connections, sessions = server.sessions() if server is not None else (0, 0)
        subscriptions = (
            len(server.iserver.subscription_service.subscriptions) if server else 0
        )
        return {
            "connections": connections,
            "sessions": sessions,
            "subscriptions": subscriptions,
            "refused_channels": access.refused_channels if access else 0,
            "refused_logins": access.refused_logins if access else 0,
            "refused_requests": access.refused_requests if access else 0,
            "updates": self.updates,
            "writes": self.writes,
            "update_errors": self.update_errors,
            "last_update_error": self.last_update_error,
            "last_update_at": (
                self.last_update_at.isoformat() if self.last_update_at else None
            ),
            "build_seconds": self.build_seconds,
            "standard_nodes": self.standard_nodes,
        }

    async def _send_stats_forever(self) -> None:
        """Counters when they change, and at least every STATS_ALIVE seconds:
        the adapter takes a silent worker for a hung one."""
        sent: Message | None = None
        sent_at = 0.0
        while self.link is not None and not self.link.closed:
            stats = self.stats()
            now = time.monotonic()
            if stats != sent or now - sent_at >= STATS_ALIVE:
                with contextlib.suppress(LinkClosed, ConnectionError):
                    self.link.send({"op": "stats", **stats})
                sent, sent_at = stats, now
            await asyncio.sleep(STATS_INTERVAL)


def _real(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def check_reason(args: Sequence[object]) -> str | ua.StatusCode:
    """The Reason argument of an emergency-stop call, or why it is refused."""
    if not args:
        return status(StatusCodes.BadArgumentsMissing)
    if len(args) > 1:
        return status(StatusCodes.BadTooManyArguments)

    value = args[0].Value if isinstance(args[0], ua.Variant) else args[0]
    if not isinstance(value, str):
        return status(StatusCodes.BadTypeMismatch)

    reason = value.strip()
    if not 0 < len(reason) <= MAX_REASON or not reason.isprintable():
        return status(StatusCodes.BadInvalidArgument)
    return reason


# Logging through the adapter.


class LinkLogHandler(logging.Handler):
    """Sends each log record to the adapter, which logs it as its own."""

    def __init__(self, link: Link) -> None:
        super().__init__()
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        if self.link.closed:
            return
        try:
            text = record.getMessage()
            exc = (
                "".join(traceback.format_exception(*record.exc_info))
                if record.exc_info
                else None
            )
            self.link.send(
                {
                    "op": "log",
                    "name": record.name,
                    "level": record.levelno,
                    "message": text,
                    "exc": exc,
                }
            )
        except Exception:
            self.handleError(record)


def _configure_logging(link: Link, level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(LinkLogHandler(link))
    root.setLevel(level)
    logging.getLogger("asyncua").setLevel(
        logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    )


async def serve(link_fd: int, listen_fd: int | None) -> int:
    """Serve until told to stop or until the link closes; the exit code."""
    listen = socket.socket(fileno=listen_fd) if listen_fd is not None else None
    if listen is not None:
        listen.setblocking(False)
    worker = Worker(listen)
    link = await open_link(
        socket.socket(fileno=link_fd),
        on_message=worker.on_message,
        on_request=worker.on_request,
        name="opc ua link (worker)",
    )
    worker.attach(link)
    _configure_logging(link, int(os.environ.get("CALEJO_OPCUA_LOG_LEVEL", "20")))

    reader = asyncio.create_task(link.run())
    stopped = asyncio.create_task(worker.stopped.wait())
    await asyncio.wait({reader, stopped}, return_when=asyncio.FIRST_COMPLETED)

    if not worker.stopped.is_set():
        await worker.stop()
    await link.drain()
    link.close()
    for task in (reader, stopped):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return 0


async def make_standard_nodes(path: Path) -> None:
    """Cache asyncua's standard address space in a shelf at ``path``.

    Loaded from the shelf, the worker reads the standard nodes from disk as
    clients ask for them instead of holding all of them (about 50 MB) in
    memory. The files are written under a temporary name and ``path``
    itself comes last, so that a cache cut short is never used.
    """
    import shelve

    from asyncua.server.server import Server

    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    server = Server()
    await server.iserver.load_standard_address_space(None)
    await asyncio.to_thread(server.iserver.aspace.make_aspace_shelf, temporary)

    made = sorted(temporary.parent.glob(f"{temporary.name}*"))
    for file in made:
        file.replace(path.with_name(path.name + file.name[len(temporary.name) :]))
    if not path.is_file() and not path.with_suffix(".db").is_file():
        path.write_text("asyncua standard address space; see the files beside\n")

    with shelve.open(str(path), "r") as shelf:
        if "i=84" not in shelf:
            raise RuntimeError(f"{path}: the shelf lacks the root node i=84")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m calejo_server.protocols.opcua_worker",
        description="The OPC UA worker of the Calejo Control Adapter "
        "(started by 'calejo serve', not by hand).",
    )
    parser.add_argument("--link-fd", type=int)
    parser.add_argument("--listen-fd", type=int, default=None)
    parser.add_argument(
        "--make-standard-nodes",
        type=Path,
        metavar="PATH",
        help="cache the standard address space at PATH and exit",
    )
    args = parser.parse_args(argv)

    if args.make_standard_nodes is not None:
        asyncio.run(make_standard_nodes(args.make_standard_nodes))
        return 0
    if args.link_fd is None:
        parser.error("--link-fd is required")

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args.link_fd, args.listen_fd))


if __name__ == "__main__":
    sys.exit(main())
