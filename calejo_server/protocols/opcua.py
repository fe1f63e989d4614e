"""The OPC UA server of the adapter (asyncua).

SCADA systems browse and subscribe to the live state of every station; the
values come from the control engine, never from storage, and every
variable is read-only. Namespace ``urn:calejo:control-adapter``; node ids
are strings that follow the browse path, so SCADA configurations stay
valid across restarts::

    Objects/
      PumpStations/                       ns=2;s=PumpStations
        <station_id>/                     ns=2;s=PumpStations/<sid>
          EmergencyStop   Boolean         an emergency stop covers a pump
          Failsafe        Boolean         the watchdog holds the failsafe value
          PlanStale       Boolean         no plan interval now or later
          Status          UInt16          station status bits (as Modbus)
          ActivateEmergencyStop(Reason: String) -> Active: Boolean
          ClearEmergencyStop(Reason: String) -> Active: Boolean
          Pumps/
            <pump_id>/                    ns=2;s=PumpStations/<sid>/Pumps/<pid>
              Setpoint    Double          the applied value (units)
              Status      UInt16          pump status bits (as Modbus)
              Target      Double          units
              MinValue, MaxValue Double   units
              MaxRate     Double          units per second (inf: no ramp)
              Ramping     Boolean
              SetpointAge Double          seconds since the last setpoint
      System/
        Heartbeat         UInt32          +1 each second, wraps at 65535

The emergency-stop methods are named ``ActivateEmergencyStop`` and
``ClearEmergencyStop`` because the station's ``EmergencyStop`` variable
holds its name. They need the ``emergency_stop`` and
``clear_emergency_stop`` permissions of the session user's role; a
refused call answers ``BadUserAccessDenied`` and is audited.

Values reach the nodes through an update task, never inside the engine's
callbacks: an engine event only marks its station and wakes the task.
The task runs at once when woken and every ``update_interval_ms``
otherwise; each run compares the gate's arrays and the stations' status
registers with what the nodes hold, in bulk, and writes only what
differs. Stations marked by an event are read whole (setpoint ages), and
all of them about once a second.

The ``opcua:`` section of the configuration (all keys optional)::

    opcua:
      enabled: true
      endpoint: opc.tcp://0.0.0.0:4840     # CALEJO_BIND, CALEJO_OPCUA_PORT win
      application_uri: urn:<host>:calejo:control-adapter   # see below
      server_name: Calejo Control Adapter
      security_policies: [Basic256Sha256, Aes256_Sha256_RsaPss]
      security_modes: [Sign, SignAndEncrypt]
      allow_anonymous: false               # anonymous sessions read as viewer
      allow_none_endpoint: false           # sessions without security
      trust_dir: <data_dir>/opcua/trusted  # client certificates (or their CAs)
      rejected_dir: <data_dir>/opcua/rejected
      crl_dir: <data_dir>/opcua/crl
      hostnames: []                        # extra names in the certificate
      min_publishing_interval_ms: 50
      update_interval_ms: 50
      max_connections: 100
      max_subscriptions: 200

Security policies may also include ``Aes128_Sha256_RsaOaep``; the
deprecated ones (Basic128Rsa15, Basic256) are refused. The server
certificate lives in the certificate folder (see :mod:`calejo_server.certs`)
and is created on first start; without ``application_uri`` the server
keeps the URI of its existing certificate, so clients that trust it keep
doing so when the host name changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import numpy as np
from asyncua import ua
from asyncua.common.node import Node
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from calejo_core import codecs, gate
from calejo_server import certs
from calejo_server.app import AdapterError
from calejo_server.config import Config, ConfigError
from calejo_server.engine.errors import EmergencyStopConflict, EngineError
from calejo_server.engine.events import EngineEvent
from calejo_server.engine.views import PumpView, RequestContext, StationView
from calejo_server.protocols.opcua_access import (
    PROTOCOL,
    Access,
    AdapterUaServer,
    Ruleset,
    bind_socket,
    current_caller,
    numeric_node_id,
    status,
)
from calejo_server.protocols.opcua_nodes import Builder, Values, Variable, write
from calejo_server.protocols.opcua_trust import TrustList
from calejo_server.security.roles import CLEAR_EMERGENCY_STOP, EMERGENCY_STOP

if TYPE_CHECKING:
    from calejo_server.api.health import ComponentHealth
    from calejo_server.engine import Engine
    from calejo_server.security.directory import Security
    from calejo_server.storage.base import Storage

logger = logging.getLogger(__name__)

NAMESPACE_URI: Final = "urn:calejo:control-adapter"
PRODUCT_URI: Final = "urn:calejo:control-adapter:product"

POLICIES: Final[Mapping[str, str]] = {
    "Basic256Sha256": "Basic256Sha256",
    "Aes128_Sha256_RsaOaep": "Aes128Sha256RsaOaep",
    "Aes256_Sha256_RsaPss": "Aes256Sha256RsaPss",
}
"""Security policies by their OPC UA names, to asyncua's spelling."""

MODES: Final = ("Sign", "SignAndEncrypt")
MAX_REASON: Final = 500
FULL_REFRESH: Final = 1.0
"""Seconds between reads of every station whole (setpoint ages, limits)."""
FULL_REFRESH_SHARE: Final = 20.0
"""A whole read that takes t seconds waits at least 20 t for the next one,
so that with many pumps it stays under 5 % of the event loop."""
UPDATE_PACE: Final = 4.0
"""An update round that works t seconds starts the next after at least 4 t,
so that the updates take at most a quarter of the event loop."""
UPDATE_CHUNK: Final = 256
"""Pumps written between two yields to the event loop."""
STATUS_RAMPING: Final = int(gate.STATUS_RAMPING)
STOP_TIMEOUT: Final = 2.0
CERTIFICATE_WARNING: Final = dt.timedelta(days=30)

_KEYS: Final = frozenset(
    {
        "enabled",
        "endpoint",
        "application_uri",
        "server_name",
        "security_policies",
        "security_modes",
        "allow_anonymous",
        "allow_none_endpoint",
        "trust_dir",
        "rejected_dir",
        "crl_dir",
        "hostnames",
        "min_publishing_interval_ms",
        "update_interval_ms",
        "max_connections",
        "max_subscriptions",
    }
)


class OpcUaError(AdapterError):
    """The OPC UA server cannot start; the message says what to change."""


# Configuration.


@dataclasses.dataclass(frozen=True, slots=True)
class OpcUaConfig:
    """The ``opcua:`` section, checked, with defaults filled in."""

    enabled: bool
    endpoint: str
    host: str
    port: int
    application_uri: str | None
    server_name: str
    security_policies: tuple[str, ...]
    security_modes: tuple[str, ...]
    allow_anonymous: bool
    allow_none_endpoint: bool
    certificate_dir: Path
    trust_dir: Path
    rejected_dir: Path
    crl_dir: Path
    hostnames: tuple[str, ...]
    min_publishing_interval_ms: float
    update_interval_ms: float
    max_connections: int
    max_subscriptions: int


def parse_opcua_config(
    config: Config,
    data_dir: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> OpcUaConfig:
    """Read and check the ``opcua:`` section; raises ConfigError.

    The endpoint defaults to ``server.bind`` and ``server.opcua_port``;
    ``CALEJO_BIND`` and ``CALEJO_OPCUA_PORT``, when set, replace the host
    and port of a configured endpoint too.
    """
    where = str(config.source) if config.source else "<demonstration configuration>"
    section = config.raw.get("opcua")
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise _error(where, "opcua", "a mapping", section)

    unknown = sorted(str(key) for key in section if key not in _KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: opcua.{unknown[0]}: unknown key; expected one of "
            f"{', '.join(sorted(_KEYS))}",
            source=where,
            key_path=f"opcua.{unknown[0]}",
        )

    read = _Section(where, section)
    base = data_dir if data_dir is not None else config.server.data_dir
    host, port, endpoint = _endpoint(read, config, environ)

    return OpcUaConfig(
        enabled=read.boolean("enabled", True),
        endpoint=endpoint,
        host=host,
        port=port,
        application_uri=read.text("application_uri", None, pattern="urn:"),
        server_name=read.text("server_name", "Calejo Control Adapter") or "",
        security_policies=read.choices(
            "security_policies",
            ("Basic256Sha256", "Aes256_Sha256_RsaPss"),
            tuple(POLICIES),
        ),
        security_modes=read.choices("security_modes", MODES, MODES),
        allow_anonymous=read.boolean("allow_anonymous", False),
        allow_none_endpoint=read.boolean("allow_none_endpoint", False),
        certificate_dir=certs.certificate_folder(config, base),
        trust_dir=read.path("trust_dir", base / "opcua" / "trusted"),
        rejected_dir=read.path("rejected_dir", base / "opcua" / "rejected"),
        crl_dir=read.path("crl_dir", base / "opcua" / "crl"),
        hostnames=read.names("hostnames"),
        min_publishing_interval_ms=read.number(
            "min_publishing_interval_ms", 50, 1, 60_000
        ),
        update_interval_ms=read.number("update_interval_ms", 50, 5, 1_000),
        max_connections=int(read.number("max_connections", 100, 1, 10_000)),
        max_subscriptions=int(read.number("max_subscriptions", 200, 1, 100_000)),
    )


def _endpoint(
    read: _Section, config: Config, environ: Mapping[str, str]
) -> tuple[str, int, str]:
    default = f"opc.tcp://{_url_host(config.server.bind)}:{config.server.opcua_port}"
    url = read.text("endpoint", default) or default

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "opc.tcp" or not parts.hostname or port is None:
        raise _error(read.where, "opcua.endpoint", "opc.tcp://HOST:PORT[/path]", url)

    host = parts.hostname
    if environ.get("CALEJO_BIND"):
        host = config.server.bind
    if environ.get("CALEJO_OPCUA_PORT"):
        port = config.server.opcua_port

    path = parts.path if parts.path not in ("", "/") else ""
    return host, port, f"opc.tcp://{_url_host(host)}:{port}{path}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Section:
    """Typed reads of one mapping, with errors naming the key path."""

    def __init__(self, where: str, values: Mapping[str, Any]) -> None:
        self.where = where
        self.values = values

    def boolean(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            raise _error(self.where, f"opcua.{key}", "true or false", value)
        return value

    def text(self, key: str, default: str | None, pattern: str = "") -> str | None:
        value = self.values.get(key, default)
        if value is None:
            return None
        if (
            not isinstance(value, str)
            or not value.startswith(pattern)
            or len(value) > 512
        ):
            expected = f"a string starting {pattern!r}" if pattern else "a string"
            raise _error(self.where, f"opcua.{key}", expected, value)
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.values.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise _error(
                self.where, f"opcua.{key}", f"a number from {low} to {high}", value
            )
        return float(value)

    def path(self, key: str, default: Path) -> Path:
        value = self.values.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise _error(self.where, f"opcua.{key}", "a folder path", value)
        return Path(value)

    def names(self, key: str) -> tuple[str, ...]:
        value = self.values.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(item, str) and 0 < len(item) <= 253 for item in value
        ):
            raise _error(self.where, f"opcua.{key}", "a list of host names", value)
        return tuple(value)

    def choices(
        self, key: str, default: Sequence[str], allowed: Sequence[str]
    ) -> tuple[str, ...]:
        value = self.values.get(key, list(default))
        expected = f"a non-empty list of {', '.join(allowed)}"
        if not isinstance(value, list) or not value:
            raise _error(self.where, f"opcua.{key}", expected, value)
        for index, item in enumerate(value):
            if item not in allowed:
                raise _error(self.where, f"opcua.{key}[{index}]", expected, item)
        return tuple(dict.fromkeys(value))


def _error(where: str, key_path: str, expected: str, got: object) -> ConfigError:
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(
        f"{where}: {key_path}: expected {expected}, got {shown}",
        source=where,
        key_path=key_path,
    )


# The address space.


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
_STATION_FLAGS: Final = (
    ("EmergencyStop", codecs.STATION_ESTOP),
    ("Failsafe", codecs.STATION_FAILSAFE),
    ("PlanStale", codecs.STATION_PLAN_STALE),
)


@dataclasses.dataclass(slots=True)
class _StationNodes:
    station_id: str
    unit_id: int
    node_id: ua.NodeId
    variables: dict[str, Variable]
    pumps: list[dict[str, Variable]]
    bits: int = -1


def _station_values(
    nodes: _StationNodes, view: StationView
) -> list[tuple[Variable, object]]:
    station = nodes.variables
    values: list[tuple[Variable, object]] = [
        (station["EmergencyStop"], view.emergency_stop),
        (station["Failsafe"], view.failsafe),
        (station["PlanStale"], view.plan_stale),
        (station["Status"], view.status & 0xFFFF),
    ]
    for pump_nodes, pump in zip(nodes.pumps, view.pumps, strict=False):
        values += _pump_values(pump_nodes, pump)
    return values


def _pump_values(
    nodes: Mapping[str, Variable], pump: PumpView
) -> list[tuple[Variable, object]]:
    age = pump.setpoint_age
    limits = pump.limits
    return [
        (nodes["Setpoint"], float(pump.applied)),
        (nodes["Status"], pump.status & 0xFFFF),
        (nodes["Target"], float(pump.target)),
        (nodes["MinValue"], float(limits.min_value)),
        (nodes["MaxValue"], float(limits.max_value)),
        (nodes["MaxRate"], float(limits.max_rate)),
        (nodes["Ramping"], pump.ramping),
        (nodes["SetpointAge"], None if age is None else round(age, 1)),
        (nodes["PlanId"], pump.plan_id or ""),
    ]


class _Run:
    """One round of writes: shared data values, yields, the time spent."""

    def __init__(self, aspace: Any) -> None:
        self.aspace = aspace
        self.values = Values()
        self.written = 0
        self.busy = 0.0
        self._since = time.monotonic()
        self._pumps = 0

    async def write(self, variable: Variable, value: object) -> None:
        self.written += await write(self.aspace, variable, value, self.values)

    async def tick(self, pumps: int) -> None:
        """Count ``pumps`` written; yield once :data:`UPDATE_CHUNK` are."""
        self._pumps += pumps
        if self._pumps >= UPDATE_CHUNK:
            await self.pause()

    async def pause(self) -> None:
        """Let the event loop run other tasks; fresh timestamps after."""
        self._pumps = 0
        self.stop_clock()
        await asyncio.sleep(0)
        self._since = time.monotonic()
        self.values = Values()

    def stop_clock(self) -> None:
        now = time.monotonic()
        self.busy += now - self._since
        self._since = now


# The server.


class OpcUaServer:
    """The adapter's OPC UA server: start it after the engine, stop it before.

    ``config`` is the adapter's configuration (its ``opcua:`` section is
    read here); ``data_dir`` defaults to ``config.server.data_dir``.
    ``storage``, when given, receives the audit records of OPC UA sessions
    (logins; refused requests); refused logins and method calls are
    audited through ``security`` and state changes through the engine.
    """

    name = "opcua"

    def __init__(
        self,
        engine: Engine,
        security: Security,
        config: Config,
        data_dir: Path | None = None,
        *,
        options: OpcUaConfig | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.engine = engine
        self.security = security
        self.config = config
        self.storage = storage
        self.data_dir = data_dir if data_dir is not None else config.server.data_dir
        self.options = options or parse_opcua_config(config, self.data_dir)

        self.application_uri: str | None = None
        self.namespace_index = 0
        self.trust = TrustList(
            self.options.trust_dir,
            rejected_dir=self.options.rejected_dir,
            crl_dir=self.options.crl_dir,
        )
        self._server: AdapterUaServer | None = None
        self._access: Access | None = None
        self._stations: dict[str, _StationNodes] = {}
        self._pumps: list[dict[str, Variable] | None] = []
        self._heartbeat: Variable | None = None

        self._pump_nodes: dict[tuple[str, str], dict[str, Variable]] = {}
        self._dirty_pumps: set[tuple[str, str]] = set()
        self._dirty_stations: set[str] = set()
        self._dirty_all = False
        self._seen: tuple[Any, Any, Any] | None = None
        self.full_refresh = FULL_REFRESH
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._running = False
        self._certificate: certs.CertificateInfo | None = None

        self.updates = 0
        self.writes = 0
        self.update_errors = 0
        self.last_update_error: str | None = None
        self.last_update_at: dt.datetime | None = None
        self.build_seconds = 0.0

    # Life cycle.

    async def start(self) -> None:
        """Load or create the certificates, build the address space, listen.

        Port 0 listens on a free port; :attr:`endpoint` then names it.
        """
        if not self.options.enabled:
            logger.info("opc ua server disabled by the configuration")
            return
        if self._running:
            return

        started = time.monotonic()
        sock = self._bind_free_port() if self.options.port == 0 else None
        try:
            await asyncio.to_thread(self._prepare_certificates)
            server = await self._build_server()
        except BaseException:
            if sock is not None:
                sock.close()
            raise

        try:
            await server.start(sock=sock)
        except OSError as exc:
            await self._discard(server)
            raise OpcUaError(_listen_error(self.options, exc)) from exc
        except BaseException:
            await self._discard(server)
            raise

        self._server = server
        self._unsubscribe = self.engine.subscribe(self._on_event)
        self._task = asyncio.create_task(self._update_forever(), name="opcua-updates")
        self._running = True
        logger.info(
            "opc ua server listening on %s (%s; %s%s%s; %d stations, %d pumps) "
            "in %.1f s",
            self.options.endpoint,
            ", ".join(self.options.security_policies),
            ", ".join(self.options.security_modes),
            "; anonymous allowed" if self.options.allow_anonymous else "",
            "; none endpoint" if self.options.allow_none_endpoint else "",
            len(self._stations),
            sum(1 for pump in self._pumps if pump is not None),
            time.monotonic() - started,
        )

    def _bind_free_port(self) -> socket.socket:
        options = self.options
        try:
            sock = bind_socket(options.host, 0)
        except OSError as exc:
            raise OpcUaError(_listen_error(options, exc)) from exc

        port = int(sock.getsockname()[1])
        parts = urlsplit(options.endpoint)
        path = parts.path if parts.path not in ("", "/") else ""
        self.options = dataclasses.replace(
            options,
            port=port,
            endpoint=f"opc.tcp://{_url_host(options.host)}:{port}{path}",
        )
        return sock

    async def stop(self) -> None:
        """Stop the updates, close every session and the listening socket."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        server, self._server = self._server, None
        self._running = False
        if server is not None:
            await self._discard(server)
            logger.info("opc ua server stopped")

    async def _discard(self, server: AdapterUaServer) -> None:
        try:
            await asyncio.wait_for(server.stop(), STOP_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            logger.warning("opc ua server did not stop cleanly: %s", exc)
        except Exception:
            logger.exception("opc ua server did not stop cleanly")

    def addresses(self) -> list[str]:
        """Where clients reach the server (for the start-up log)."""
        return [self.options.endpoint] if self.options.enabled else []

    @property
    def endpoint(self) -> str:
        return self.options.endpoint

    # Certificates.

    def _prepare_certificates(self) -> None:
        folder = self.options.certificate_dir
        uri = self.options.application_uri
        if uri is None:
            existing = certs.CertificateFiles(folder).server_cert
            try:
                uri = certs.certificate_application_uri(existing)
            except certs.CertificateError:
                uri = None
            uri = uri or certs.default_application_uri()

        extra = [self.options.host, *self.options.hostnames]
        try:
            files = certs.ensure_certificates(
                folder, uri, certs.default_hostnames(extra)
            )
            self._certificate = certs.certificate_info(files.server_cert)
            self.trust.ensure_folders()
        except (certs.CertificateError, OSError) as exc:
            raise OpcUaError(f"opc ua server certificate: {exc}") from exc

        self.application_uri = uri

    def certificate_expiry(self) -> dt.datetime | None:
        """When the server certificate expires (None before start)."""
        return self._certificate.not_after if self._certificate else None

    # Building.

    async def _build_server(self) -> AdapterUaServer:
        options = self.options
        policy_types = [
            getattr(ua.SecurityPolicyType, f"{POLICIES[policy]}_{mode}")
            for policy in options.security_policies
            for mode in options.security_modes
        ]
        if options.allow_none_endpoint:
            policy_types.insert(0, ua.SecurityPolicyType.NoSecurity)

        policy_uris = {
            f"http://opcfoundation.org/UA/SecurityPolicy#{policy}"
            for policy in options.security_policies
        }
        access = Access(
            self.security,
            self.trust,
            policy_uris=policy_uris,
            allow_none=options.allow_none_endpoint,
            allow_anonymous=options.allow_anonymous,
            storage=self.storage,
        )
        server = AdapterUaServer(access, options.min_publishing_interval_ms)
        self._access = access

        files = certs.CertificateFiles(options.certificate_dir)
        server.iserver.certificate = certs.load_certificate(files.server_cert)
        server.iserver.private_key = certs.load_private_key(files.server_key)
        server.iserver.max_connections = options.max_connections
        server.iserver.max_subscriptions = options.max_subscriptions
        server.allow_remote_admin(False)

        await server.init()
        assert self.application_uri is not None
        await server.set_application_uri(self.application_uri)
        server.product_uri = PRODUCT_URI
        server.manufacturer_name = "Calejo"
        server.set_server_name(options.server_name)
        server.set_endpoint(options.endpoint)
        server.socket_address = (options.host, options.port)
        server.set_security_policy(policy_types, permission_ruleset=Ruleset(access))
        tokens: list[type] = [ua.UserNameIdentityToken]
        if options.allow_anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)

        self.namespace_index = await server.register_namespace(NAMESPACE_URI)
        started = time.monotonic()
        await self._build_address_space(server)
        self.build_seconds = time.monotonic() - started
        return server

    async def _build_address_space(self, server: AdapterUaServer) -> None:
        aspace = server.iserver.aspace
        build = Builder(aspace, self.namespace_index)
        objects = numeric_node_id(ObjectIds.ObjectsFolder)
        stations = build.folder(
            objects, "PumpStations", "PumpStations", "the pump stations"
        )
        system = build.object(objects, "System", "System", "the adapter")
        heartbeat = build.variables(
            system,
            "System",
            (("Heartbeat", _UINT32, "+1 each second, wraps at 65535"),),
        )
        self._heartbeat = heartbeat["Heartbeat"]
        values = Values()
        await write(aspace, self._heartbeat, self.engine.heartbeat & 0xFFFFFFFF, values)

        self._stations = {}
        self._pumps = [None] * self.engine.gate.n_pumps
        self._pump_nodes = {}
        self._seen = None
        for view in self.engine.stations():
            nodes = self._build_station(build, stations, view)
            for variable, value in _station_values(nodes, view):
                await write(aspace, variable, value, values)
            self._stations[view.station_id] = nodes

            node = server.get_node(nodes.node_id)
            await self._method(node, view.station_id, activate=True)
            await self._method(node, view.station_id, activate=False)
            await asyncio.sleep(0)

    def _build_station(
        self, build: Builder, parent: ua.NodeId, view: StationView
    ) -> _StationNodes:
        base = f"PumpStations/{view.station_id}"
        station = build.object(parent, base, view.station_id, view.name)
        nodes = _StationNodes(
            view.station_id,
            view.unit_id,
            station,
            build.variables(station, base, STATION_VARIABLES),
            [],
        )

        pumps = build.folder(station, f"{base}/Pumps", "Pumps", "the pumps")
        for pump in view.pumps:
            path = f"{base}/Pumps/{pump.pump_id}"
            node = build.object(
                pumps, path, pump.pump_id, f"{pump.name} ({pump.units})"
            )
            variables = build.variables(node, path, PUMP_VARIABLES)
            nodes.pumps.append(variables)
            index = self.engine.pump_index(view.station_id, pump.pump_id)
            self._pumps[index] = variables
            self._pump_nodes[(view.station_id, pump.pump_id)] = variables
        return nodes

    def _node_id(self, path: str) -> ua.NodeId:
        return ua.NodeId(path, self.namespace_index)  # type: ignore[arg-type]

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
            self._node_id(f"PumpStations/{station_id}/{name}"),
            ua.QualifiedName(name, self.namespace_index),
            handler,
            [reason],
            [active],
        )

    # Methods.

    async def _call_emergency_stop(
        self, station_id: str, activate: bool, args: Sequence[object]
    ) -> list[ua.Variant] | ua.StatusCode:
        name = "ActivateEmergencyStop" if activate else "ClearEmergencyStop"
        permission = EMERGENCY_STOP if activate else CLEAR_EMERGENCY_STOP
        caller = current_caller()
        access = self._access
        user = caller.user if caller is not None else None
        principal = user.principal if user is not None else None
        address = caller.address if caller is not None else None

        permissions = access.permissions(user) if access is not None else None
        if permissions is None or permission not in permissions:
            logger.warning(
                "opc ua %s at station %r refused for %s from %s: no %s permission",
                name,
                station_id,
                principal.username if principal else "an anonymous session",
                address,
                permission,
            )
            await self.security.deny(
                status=403,
                reason=f"role lacks {permission}",
                principal=principal,
                source=address,
                protocol=PROTOCOL,
                method="Call",
                path=f"PumpStations/{station_id}/{name}",
                permission=permission,
            )
            return status(StatusCodes.BadUserAccessDenied)

        reason = _reason(args)
        if isinstance(reason, ua.StatusCode):
            return reason

        username = principal.username if principal else None
        ctx = RequestContext(user=username, source_address=address, protocol=PROTOCOL)
        operator = username or "anonymous"
        try:
            if activate:
                stops = await self.engine.emergency_stop(
                    "station", station_id, None, reason, operator, ctx
                )
            else:
                stops = await self.engine.clear_emergency_stop(
                    "station", station_id, None, reason, operator, ctx
                )
        except EmergencyStopConflict as exc:
            logger.info("opc ua %s at station %r: %s", name, station_id, exc)
            return status(StatusCodes.BadInvalidState)
        except EngineError as exc:
            logger.warning("opc ua %s at station %r failed: %s", name, station_id, exc)
            return status(StatusCodes.BadInvalidArgument)

        self._dirty_stations.add(station_id)
        self._wake.set()
        return [ua.Variant(bool(stops.active), _BOOLEAN)]

    # Updates.

    def _on_event(self, event: EngineEvent) -> None:
        """Engine callback: mark what changed and wake the update task."""
        if event.station_id is None:
            self._dirty_all = True
        elif event.pump_id is None:
            self._dirty_stations.add(event.station_id)
        else:
            self._dirty_pumps.add((event.station_id, event.pump_id))
        self._wake.set()

    async def _update_forever(self) -> None:
        interval = self.options.update_interval_ms / 1000.0
        now = time.monotonic()
        next_pass = now
        next_regular = now + interval
        next_full = now + self.full_refresh
        while True:
            wait = next_regular - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            pause = next_pass - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            self._wake.clear()

            started = time.monotonic()
            full = started >= next_full
            try:
                busy = await self.refresh(full=full)
            except Exception as exc:
                busy = time.monotonic() - started
                self.update_errors += 1
                if self.last_update_error != str(exc):
                    logger.exception("opc ua update failed; retrying")
                self.last_update_error = str(exc)

            next_pass = started + UPDATE_PACE * busy
            next_regular = started + max(interval, UPDATE_PACE * busy)
            if full:
                next_full = started + max(self.full_refresh, FULL_REFRESH_SHARE * busy)

    async def refresh(self, *, full: bool = False) -> float:
        """Write the values that changed; returns the seconds spent working.

        Every call writes what engine events marked (a pump, a station,
        everything), then compares the gate's arrays (applied, target,
        status) and the stations' status registers with what the nodes
        hold, in bulk, and writes the pumps and stations that differ. With
        ``full``, every station is read whole (setpoint ages, limits,
        plans). Long runs yield to the event loop every
        :data:`UPDATE_CHUNK` pumps; the time spent away is not counted.
        """
        server = self._server
        if server is None:
            return 0.0

        run = _Run(server.iserver.aspace)
        await self._write_marked(run)
        await self._refresh_station_bits(run)
        await self._refresh_pumps(run)

        if full:
            for station_id in list(self._stations):
                await self._write_station(run, station_id)
                await run.pause()
                await self._write_marked(run)

        if self._heartbeat is not None:
            await run.write(self._heartbeat, self.engine.heartbeat & 0xFFFFFFFF)

        run.stop_clock()
        self.updates += 1
        self.writes += run.written
        self.last_update_at = dt.datetime.now(dt.UTC)
        self.last_update_error = None
        return run.busy

    async def _write_marked(self, run: _Run) -> None:
        if self._dirty_all:
            self._dirty_all = False
            self._dirty_pumps.clear()
            self._dirty_stations.update(self._stations)

        while self._dirty_pumps:
            station_id, pump_id = self._dirty_pumps.pop()
            nodes = self._pump_nodes.get((station_id, pump_id))
            if nodes is None:
                continue
            pump = self.engine.pump(station_id, pump_id)
            for variable, value in _pump_values(nodes, pump):
                await run.write(variable, value)
            await run.tick(1)

        while self._dirty_stations:
            station_id = self._dirty_stations.pop()
            await self._write_station(run, station_id)
            await run.pause()

    async def _write_station(self, run: _Run, station_id: str) -> None:
        nodes = self._stations.get(station_id)
        if nodes is None:
            return
        view = self.engine.station(station_id)
        for variable, value in _station_values(nodes, view):
            await run.write(variable, value)

    async def _refresh_pumps(self, run: _Run) -> None:
        gate = self.engine.gate
        applied, target, status = (
            gate.applied.copy(),
            gate.target.copy(),
            gate.status.copy(),
        )
        seen = self._seen
        changed: Iterable[int]
        if seen is None or len(seen[0]) != len(applied):
            changed = range(len(applied))
        else:
            differs = (applied != seen[0]) | (target != seen[1]) | (status != seen[2])
            changed = np.flatnonzero(differs).tolist()
        self._seen = (applied, target, status)

        pumps = self._pumps
        for index in changed:
            nodes = pumps[index] if index < len(pumps) else None
            if nodes is None:
                continue
            bits = int(status[index])
            await run.write(nodes["Setpoint"], float(applied[index]))
            await run.write(nodes["Target"], float(target[index]))
            await run.write(nodes["Status"], bits & 0xFFFF)
            await run.write(nodes["Ramping"], bool(bits & STATUS_RAMPING))
            await run.tick(1)

    async def _refresh_station_bits(self, run: _Run) -> None:
        images = self.engine.images
        for nodes in self._stations.values():
            image = images.get(nodes.unit_id)
            if image is None:
                continue
            bits = int(image.registers[codecs.STATION_STATUS])
            if bits == nodes.bits:
                continue
            nodes.bits = bits
            variables = nodes.variables
            for name, mask in _STATION_FLAGS:
                await run.write(variables[name], bool(bits & mask))
            await run.write(variables["Status"], bits & 0xFFFF)

    # Health.

    def health(self) -> dict[str, Any]:
        """State, endpoint, sessions and certificate expiry, JSON-ready."""
        options = self.options
        if not options.enabled:
            return {
                "state": "not_configured",
                "detail": "opc ua is disabled by the configuration",
                "endpoint": options.endpoint,
            }

        server = self._server
        connections, sessions = server.sessions() if server is not None else (0, 0)
        subscriptions = (
            len(server.iserver.subscription_service.subscriptions) if server else 0
        )
        expiry = self.certificate_expiry()
        now = dt.datetime.now(dt.UTC)

        expiring = expiry is not None and expiry - now < CERTIFICATE_WARNING
        if not self._running:
            state, detail = "down", "not listening"
        elif self.last_update_error is not None:
            state, detail = "degraded", f"updates failing: {self.last_update_error}"
        elif expiring:
            state, detail = "degraded", f"server certificate expires {expiry:%Y-%m-%d}"
        else:
            state, detail = "ok", f"listening on {options.endpoint}"

        access = self._access
        return {
            "state": state,
            "detail": detail,
            "endpoint": options.endpoint,
            "application_uri": self.application_uri,
            "security_policies": list(options.security_policies),
            "security_modes": list(options.security_modes),
            "allow_anonymous": options.allow_anonymous,
            "allow_none_endpoint": options.allow_none_endpoint,
            "connections": connections,
            "sessions": sessions,
            "subscriptions": subscriptions,
            "refused_channels": access.refused_channels if access else 0,
            "refused_logins": access.refused_logins if access else 0,
            "refused_requests": access.refused_requests if access else 0,
            "trusted_certificates": self.trust.size,
            "certificate_expires": expiry.isoformat() if expiry else None,
            "certificate_days_left": (
                round((expiry - now).total_seconds() / 86400, 1) if expiry else None
            ),
            "updates": self.updates,
            "update_errors": self.update_errors,
            "last_update_error": self.last_update_error,
            "last_update_at": self.last_update_at.isoformat()
            if self.last_update_at
            else None,
        }

    def health_check(self) -> ComponentHealth:
        """:meth:`health` for the REST API's health registry::

        registry.register("opcua", opcua_server.health_check)
        """
        from calejo_server.api.health import ComponentHealth

        data = self.health()
        state, detail = data.pop("state"), data.pop("detail")
        return ComponentHealth(state, detail, data, critical=self.options.enabled)


def _reason(args: Sequence[object]) -> str | ua.StatusCode:
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


def _listen_error(options: OpcUaConfig, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"opc ua endpoint {options.endpoint}: port {options.port} is in use; "
            "set CALEJO_OPCUA_PORT or opcua.endpoint"
        )
    if exc.errno == errno.EACCES:
        return (
            f"opc ua endpoint {options.endpoint}: no permission to listen on port "
            f"{options.port}"
        )
    if isinstance(exc, socket.gaierror):
        return f"opc ua endpoint {options.endpoint}: unknown host {options.host!r}"
    return f"opc ua endpoint {options.endpoint}: cannot listen ({exc.strerror or exc})"
