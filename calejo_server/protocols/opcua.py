"""The OPC UA server of the adapter (asyncua, in a worker process).

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
              PlanId      String          the plan the pump follows now
      System/
        Heartbeat         UInt32          +1 each second, wraps at 65535

The emergency-stop methods are named ``ActivateEmergencyStop`` and
``ClearEmergencyStop`` because the station's ``EmergencyStop`` variable
holds its name. They need the ``emergency_stop`` and
``clear_emergency_stop`` permissions of the session user's role; a
refused call answers ``BadUserAccessDenied`` and is audited.

asyncua's publishing costs milliseconds of CPU per subscription and
cycle, so the server runs in a worker process of its own
(:mod:`~calejo_server.protocols.opcua_worker`), at a lower CPU priority,
and subscriptions never hold up the engine, REST or Modbus. This module is
the adapter's side of it: :class:`OpcUaServer` binds the listening socket,
prepares the certificates, starts the worker and restarts it if it ever
exits, and feeds it the engine's values over a
:mod:`~calejo_server.protocols.opcua_link`:

- as soon as a request has changed a station (the engine's
  :meth:`~calejo_server.engine.Engine.watch`), its pumps and status bits,
  in the same turn of the event loop;
- every ``update_interval_ms``, whatever moved since (ramps, heartbeat);
- about once a second, every pump's setpoint age and plan.

Only values that differ from what the worker was last sent are sent; a
worker that falls behind gets everything afresh once it has caught up.
Passwords, refusals, audit records and emergency-stop calls come back to
the adapter, which checks them against its own users and roles; which
users are active with which role reaches the worker before a change of
them is acknowledged.

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
      worker_nice: 10                      # CPU priority of the worker (0-19)

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
import importlib.metadata
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

import calejo_server
from calejo_core import codecs, gate
from calejo_server import audit, certs
from calejo_server.app import AdapterError
from calejo_server.config import Config, ConfigError
from calejo_server.engine.errors import EmergencyStopConflict, EngineError
from calejo_server.engine.views import RequestContext
from calejo_server.protocols.opcua_link import (
    NAMESPACE_URI,
    PRODUCT_URI,
    PROTOCOL,
    VERSION,
    Link,
    LinkClosed,
    LinkError,
    Message,
    bind_socket,
    open_link,
)
from calejo_server.protocols.opcua_trust import TrustList
from calejo_server.security.directory import (
    AuthError,
    Principal,
    SecurityError,
    UnknownUser,
)
from calejo_server.security.roles import CLEAR_EMERGENCY_STOP, EMERGENCY_STOP, VIEWER
from calejo_server.storage.base import AuditRecord, StorageError

if TYPE_CHECKING:
    from calejo_server.api.health import ComponentHealth
    from calejo_server.engine import Engine
    from calejo_server.security.directory import Security
    from calejo_server.storage.base import Storage

__all__ = [
    "NAMESPACE_URI",
    "PRODUCT_URI",
    "OpcUaConfig",
    "OpcUaError",
    "OpcUaServer",
    "parse_opcua_config",
]

logger = logging.getLogger(__name__)

POLICIES: Final[Mapping[str, str]] = {
    "Basic256Sha256": "Basic256Sha256",
    "Aes128_Sha256_RsaOaep": "Aes128Sha256RsaOaep",
    "Aes256_Sha256_RsaPss": "Aes256Sha256RsaPss",
}
"""Security policies by their OPC UA names, to asyncua's spelling."""

MODES: Final = ("Sign", "SignAndEncrypt")
FULL_REFRESH: Final = 1.0
"""Seconds between sends of every pump's setpoint age and plan."""
START_TIMEOUT: Final = 120.0
"""Seconds a worker may take to build its address space and listen."""
STOP_TIMEOUT: Final = 2.0
RESTART_DELAYS: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before each attempt to restart a worker that exited; the last
one repeats."""
MAX_BACKLOG: Final = 32 * 1024 * 1024
"""Bytes of values the worker may leave unread before the adapter stops
sending and, once it has caught up, sends everything afresh."""
PUSH_SPACING: Final = 0.001
"""Least seconds between two sends of what requests changed."""
DIRECTORY_TIMEOUT: Final = 1.5
SILENCE_LIMIT: Final = 5.0
"""Seconds without a word from the worker (it reports every second) after
which the health check calls it unresponsive."""
HANG_LIMIT: Final = 30.0
"""Seconds without a word after which the worker is taken for hung and
ended; the supervisor starts another."""
CERTIFICATE_WARNING: Final = dt.timedelta(days=30)
WORKER_MODULE: Final = "calejo_server.protocols.opcua_worker"
MAX_USERNAME: Final = 256
MAX_PASSWORD: Final = 1024

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
        "worker_nice",
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
    worker_nice: int = 10


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
        worker_nice=int(read.number("worker_nice", 10, 0, 19)),
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


# The server.


@dataclasses.dataclass(frozen=True, slots=True)
class _StationFeed:
    """Where one station's values are found: its unit id and pumps."""

    unit_id: int
    pumps: slice


class OpcUaServer:
    """The adapter's OPC UA server: start it after the engine, stop it before.

    ``config`` is the adapter's configuration (its ``opcua:`` section is
    read here); ``data_dir`` defaults to ``config.server.data_dir``.
    ``storage``, when given, receives the audit records of OPC UA sessions
    (logins; refused requests); refused logins and method calls are
    audited through ``security`` and state changes through the engine.
    The server itself runs in a worker process (see the module doc).
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
        self.trust = TrustList(
            self.options.trust_dir,
            rejected_dir=self.options.rejected_dir,
            crl_dir=self.options.crl_dir,
        )
        self.full_refresh = FULL_REFRESH
        self.silence_limit = SILENCE_LIMIT
        self.hang_limit = HANG_LIMIT
        self.build_seconds = 0.0
        self.restarts = 0
        self.pid: int | None = None

        self._certificate: certs.CertificateInfo | None = None
        self._sock: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._link: Link | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._feed_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._removers: list[Callable[[], None]] = []
        self._running = False
        self._worker_up = False
        self._last_exit: str | None = None
        self._stats: dict[str, Any] = {}
        self._heard = 0.0
        self._silent = False

        self._stations: list[_StationFeed] = []
        self._marked: set[int] = set()
        self._push_due = False
        self._pushed_at = 0.0
        self._behind = False
        self._seen: tuple[Any, Any, Any] | None = None
        self._bits: list[int] = []
        self._heartbeat = -1
        self._ages: npt.NDArray[np.float64] | None = None
        self._plans: list[str | None] | None = None

    # Life cycle.

    async def start(self) -> None:
        """Bind the endpoint, load or create the certificates, start the worker.

        Port 0 listens on a free port; :attr:`endpoint` then names it.
        """
        if not self.options.enabled:
            logger.info("opc ua server disabled by the configuration")
            return
        if self._running:
            return

        started = time.monotonic()
        self._sock = self._bind()
        try:
            await asyncio.to_thread(self._prepare_certificates)
            await self._cache_standard_nodes()
            await self._launch()
        except BaseException:
            await self._end_worker()
            self._close_socket()
            raise

        self._running = True
        self._removers = [
            self.engine.watch(self._changed),
            self.security.on_access_change(self._send_directory),
        ]
        self._feed_task = asyncio.create_task(self._feed_forever(), name="opcua-feed")
        logger.info(
            "opc ua server listening on %s (%s; %s%s%s; %d stations, %d pumps; "
            "worker pid %s) in %.1f s",
            self.options.endpoint,
            ", ".join(self.options.security_policies),
            ", ".join(self.options.security_modes),
            "; anonymous allowed" if self.options.allow_anonymous else "",
            "; none endpoint" if self.options.allow_none_endpoint else "",
            len(self._stations),
            self.engine.gate.n_pumps,
            self.pid,
            time.monotonic() - started,
        )

    async def stop(self) -> None:
        """Stop feeding, close every session and the listening socket."""
        was_running, self._running = self._running, False
        for remove in self._removers:
            remove()
        self._removers = []

        for task in (self._feed_task, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._feed_task = self._supervisor = None

        await self._end_worker()
        self._close_socket()
        if was_running:
            logger.info("opc ua server stopped")

    def _bind(self) -> socket.socket:
        options = self.options
        try:
            sock = bind_socket(options.host, options.port)
        except OSError as exc:
            raise OpcUaError(_listen_error(options, exc)) from exc

        if options.port == 0:
            port = int(sock.getsockname()[1])
            parts = urlsplit(options.endpoint)
            path = parts.path if parts.path not in ("", "/") else ""
            self.options = dataclasses.replace(
                options,
                port=port,
                endpoint=f"opc.tcp://{_url_host(options.host)}:{port}{path}",
            )
        return sock

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

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

    # The worker.

    @property
    def standard_nodes(self) -> Path:
        """The cache of asyncua's standard address space (one per release)."""
        try:
            release = importlib.metadata.version("asyncua")
        except importlib.metadata.PackageNotFoundError:
            release = "unknown"
        return self.data_dir / "opcua" / f"standard-nodes-asyncua-{release}"

    async def _cache_standard_nodes(self) -> None:
        """Make the cache of the standard nodes once, in a process of its own
        (it holds them all for a moment); without it the worker loads them
        whole, which works but takes about 50 MB more."""
        path = self.standard_nodes
        if path.is_file():
            return

        started = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER_MODULE,
                "--make-standard-nodes",
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self._worker_env(),
            )
            _, errors = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            logger.warning("opc ua: standard nodes not cached (%s)", exc)
            return

        if process.returncode != 0 or not path.is_file():
            last = errors.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            logger.warning(
                "opc ua: standard nodes not cached (exit %s: %s); the worker "
                "loads them whole",
                process.returncode,
                last[0][:300],
            )
            return
        logger.info(
            "opc ua: standard nodes cached in %s in %.1f s",
            path,
            time.monotonic() - started,
        )

    async def _launch(self) -> None:
        """Start a worker, hand it everything, wait until it listens."""
        assert self._sock is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER_MODULE,
                "--link-fd",
                str(child.fileno()),
                "--listen-fd",
                str(self._sock.fileno()),
                pass_fds=(child.fileno(), self._sock.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._worker_env(),
            )
        except OSError as exc:
            parent.close()
            raise OpcUaError(
                f"opc ua worker could not be started with {sys.executable}: "
                f"{exc.strerror or exc}"
            ) from exc
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()

        self._process = process
        self.pid = process.pid
        link = await open_link(
            parent,
            on_message=self._on_message,
            on_request=self._on_request,
            name="opc ua link",
        )
        self._link = link
        self._spawn(link.run(), "opcua-link")

        stations = self._topology()
        self._reset_feed()
        init = {
            "version": VERSION,
            "settings": self._settings(),
            "stations": stations,
            "directory": self._directory(),
            "values": self._collect(everything=True) or {},
        }
        try:
            reply = await link.request("init", START_TIMEOUT, **init)
        except LinkError as exc:
            raise OpcUaError(f"opc ua server: {exc}") from None
        except (LinkClosed, TimeoutError):
            code = process.returncode
            raise OpcUaError(
                "opc ua worker "
                + (f"exited with code {code}" if code is not None else "did not answer")
                + f" while starting (within {START_TIMEOUT:.0f} s); see the log above"
            ) from None

        self.build_seconds = float(reply.get("build_seconds") or 0.0)
        stats = reply.get("stats")
        self._stats = stats if isinstance(stats, dict) else {}
        self._heard = time.monotonic()
        self._silent = False
        self._worker_up = True
        self._supervisor = asyncio.create_task(
            self._supervise(process), name="opcua-supervisor"
        )

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        package_root = str(Path(calejo_server.__file__).resolve().parents[1])
        paths = [package_root, *filter(None, env.get("PYTHONPATH", "").split(":"))]
        env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        env["CALEJO_OPCUA_LOG_LEVEL"] = str(logging.getLogger().getEffectiveLevel())
        return env

    async def _end_worker(self) -> None:
        """Ask the worker to stop; end it if it does not within the limit."""
        self._worker_up = False
        link, self._link = self._link, None
        process, self._process = self._process, None
        if link is not None:
            if process is not None and process.returncode is None:
                with contextlib.suppress(LinkClosed, LinkError, TimeoutError):
                    await link.request("stop", STOP_TIMEOUT + 1.0)
            link.close()

        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                logger.warning(
                    "opc ua worker (pid %d) did not stop; ending it", process.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

        for task in list(self._tasks):
            task.cancel()

    async def _supervise(self, process: asyncio.subprocess.Process) -> None:
        """Restart the worker whenever it exits while the server runs."""
        code = await process.wait()
        if process is not self._process:
            return

        self._worker_up = False
        self._last_exit = f"worker (pid {process.pid}) exited with code {code}"
        if self._link is not None:
            self._link.close()
            self._link = None
        self._process = None

        for attempt in range(1_000_000):
            delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
            logger.error(
                "opc ua %s; clients are cut off; restarting it in %.0f s",
                self._last_exit,
                delay,
            )
            await asyncio.sleep(delay)
            if not self._running:
                return
            try:
                await self._launch()
            except (OpcUaError, OSError) as exc:
                await self._end_worker()
                self._last_exit = str(exc)
                continue
            self.restarts += 1
            logger.warning(
                "opc ua worker restarted (pid %s; restart %d)", self.pid, self.restarts
            )
            return

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _settings(self) -> dict[str, Any]:
        options = self.options
        files = certs.CertificateFiles(options.certificate_dir)
        return {
            "endpoint": options.endpoint,
            "host": options.host,
            "port": options.port,
            "server_name": options.server_name,
            "application_uri": self.application_uri,
            "policies": [POLICIES[policy] for policy in options.security_policies],
            "policy_uris": [
                f"http://opcfoundation.org/UA/SecurityPolicy#{policy}"
                for policy in options.security_policies
            ],
            "modes": list(options.security_modes),
            "allow_anonymous": options.allow_anonymous,
            "allow_none_endpoint": options.allow_none_endpoint,
            "certificate": str(files.server_cert),
            "key": str(files.server_key),
            "trust_dir": str(options.trust_dir),
            "rejected_dir": str(options.rejected_dir),
            "crl_dir": str(options.crl_dir),
            "min_publishing_interval_ms": options.min_publishing_interval_ms,
            "max_connections": options.max_connections,
            "max_subscriptions": options.max_subscriptions,
            "nice": options.worker_nice,
            "standard_nodes": str(self.standard_nodes),
            "bits": {
                "EmergencyStop": codecs.STATION_ESTOP,
                "Failsafe": codecs.STATION_FAILSAFE,
                "PlanStale": codecs.STATION_PLAN_STALE,
                "Ramping": int(gate.STATUS_RAMPING),
            },
        }

    def _topology(self) -> list[dict[str, Any]]:
        stations: list[dict[str, Any]] = []
        self._stations = []
        for view in self.engine.stations():
            pumps: list[dict[str, Any]] = []
            for pump in view.pumps:
                limits = pump.limits
                rate = float(limits.max_rate)
                pumps.append(
                    {
                        "pump_id": pump.pump_id,
                        "name": pump.name,
                        "units": pump.units,
                        "index": self.engine.pump_index(view.station_id, pump.pump_id),
                        "min_value": float(limits.min_value),
                        "max_value": float(limits.max_value),
                        "max_rate": rate if np.isfinite(rate) else None,
                    }
                )
            first = int(pumps[0]["index"]) if pumps else 0
            self._stations.append(
                _StationFeed(view.unit_id, slice(first, first + len(pumps)))
            )
            stations.append(
                {
                    "station_id": view.station_id,
                    "name": view.name,
                    "unit_id": view.unit_id,
                    "pumps": pumps,
                }
            )
        return stations

    # Values.

    def _changed(self, station: int) -> None:
        """Engine watcher: a request changed ``station``; send it this turn,
        or, when the last send was less than PUSH_SPACING ago, then (under a
        stream of requests, one message carries many)."""
        self._marked.add(station)
        if self._push_due or not self._worker_up:
            return
        self._push_due = True
        loop = asyncio.get_running_loop()
        wait = self._pushed_at + PUSH_SPACING - loop.time()
        if wait > 0:
            loop.call_later(wait, self._push_marked)
        else:
            loop.call_soon(self._push_marked)

    def _push_marked(self) -> None:
        self._push_due = False
        self._pushed_at = asyncio.get_running_loop().time()
        marked, self._marked = self._marked, set()
        self._push(stations=marked)

    async def _feed_forever(self) -> None:
        interval = self.options.update_interval_ms / 1000.0
        next_full = time.monotonic() + self.full_refresh
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            full = now >= next_full
            if full:
                next_full = now + self.full_refresh
            self._marked.clear()
            self._push(full=full)
            self._check_alive(now)

    def _check_alive(self, now: float) -> None:
        """A worker that sends nothing for ``hang_limit`` seconds is hung:
        end it, and the supervisor starts another."""
        if not self._worker_up or self._process is None:
            return
        silent = now - self._heard
        if silent < self.silence_limit:
            self._silent = False
            return
        if not self._silent:
            self._silent = True
            logger.error(
                "opc ua worker (pid %s) has sent nothing for %.0f s; ending it "
                "after %.0f s",
                self.pid,
                silent,
                self.hang_limit,
            )
        if silent >= self.hang_limit:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def _push(self, *, stations: set[int] | None = None, full: bool = False) -> None:
        """Send what changed: of ``stations`` only, or of all (``full``: ages too)."""
        link = self._link
        if link is None or link.closed or not self._worker_up:
            return
        if link.backlog() > MAX_BACKLOG:
            if not self._behind:
                logger.warning(
                    "opc ua worker is %d bytes behind; holding values until it "
                    "catches up",
                    link.backlog(),
                )
            self._behind = True
            return

        everything, self._behind = self._behind, False
        try:
            message = self._collect(stations=stations, full=full, everything=everything)
            if message is not None:
                link.send(message)
        except (LinkClosed, ConnectionError):
            return
        except Exception:
            logger.exception("opc ua values could not be sent; sending all next time")
            self._behind = True

    def _reset_feed(self) -> None:
        self._seen = None
        self._bits = [-1] * len(self._stations)
        self._heartbeat = -1
        self._ages = None
        self._plans = None
        self._marked.clear()

    def _collect(
        self,
        *,
        stations: set[int] | None = None,
        full: bool = False,
        everything: bool = False,
    ) -> Message | None:
        """The ``values`` message of what differs from what was last sent."""
        engine = self.engine
        pumps = engine.gate
        applied, target, status = pumps.applied, pumps.target, pumps.status
        message: Message = {}

        seen = self._seen
        index: npt.NDArray[np.intp] | None = None
        if everything or seen is None or len(seen[0]) != len(applied):
            index = np.arange(len(applied))
            self._seen = (applied.copy(), target.copy(), status.copy())
        elif stations is not None:
            message["spans"] = [
                self._span(self._stations[k].pumps, seen) for k in sorted(stations)
            ]
        else:
            differs = _differ(applied, seen[0]) | _differ(target, seen[1])
            differs |= status != seen[2]
            index = np.flatnonzero(differs)
            seen[0][index] = applied[index]
            seen[1][index] = target[index]
            seen[2][index] = status[index]
        if index is not None and index.size:
            message["pumps"] = {
                "index": index,
                "applied": applied[index],
                "target": target[index],
                "status": status[index],
            }

        images = engine.images
        picked = (
            sorted(stations)
            if stations is not None and not everything
            else range(len(self._stations))
        )
        changed_stations, changed_bits = [], []
        for k in picked:
            image = images.get(self._stations[k].unit_id)
            if image is None:
                continue
            bits = int(image.registers[codecs.STATION_STATUS])
            if bits != self._bits[k] or everything:
                self._bits[k] = bits
                changed_stations.append(k)
                changed_bits.append(bits)
        if changed_stations:
            message["stations"] = {"index": changed_stations, "bits": changed_bits}

        heartbeat = engine.heartbeat
        if heartbeat != self._heartbeat or everything:
            self._heartbeat = heartbeat
            message["heartbeat"] = heartbeat

        if full or everything or self._ages is None:
            self._collect_slow(message, everything=everything)
        elif stations:
            for k in sorted(stations):
                self._collect_plans(message, self._stations[k].pumps)

        if not message:
            return None
        message["op"] = "values"
        message["at"] = time.time()
        return message

    def _collect_slow(self, message: Message, *, everything: bool = False) -> None:
        """Every pump's setpoint age and plan that changed."""
        engine = self.engine
        ages = np.round(engine.setpoint_ages(), 1)
        last = self._ages
        if everything or last is None or len(last) != len(ages):
            index = np.arange(len(ages))
        else:
            index = np.flatnonzero(_differ(ages, last))
        self._ages = ages
        if index.size:
            _extend(message, "ages", index=index, age=ages[index])

        plans = engine.plan_ids()
        before = self._plans
        if everything or before is None or len(before) != len(plans):
            moved = list(range(len(plans)))
        else:
            pairs = enumerate(zip(plans, before, strict=True))
            moved = [k for k, (now, was) in pairs if now != was]
        self._plans = plans
        if moved:
            _extend(message, "plans", index=moved, plan=[plans[k] for k in moved])

    def _span(self, span: slice, seen: tuple[Any, Any, Any]) -> dict[str, Any]:
        """The pumps of ``span`` as they are now, noted as sent, with their
        setpoint ages: the worker writes those that differ from its nodes.
        Sending a station whole costs less here than finding what changed."""
        gate = self.engine.gate
        applied, target = gate.applied[span], gate.target[span]
        status = gate.status[span]
        seen[0][span], seen[1][span], seen[2][span] = applied, target, status
        return {
            "first": span.start or 0,
            "applied": applied,
            "target": target,
            "status": status,
            "age": self.engine.setpoint_ages(span).round(1),
        }

    def _collect_plans(self, message: Message, span: slice) -> None:
        """The plans of the pumps of ``span`` that changed."""
        if self._plans is None:
            return
        first = span.start or 0
        plans = self.engine.plan_ids(span)
        known = self._plans
        if plans == known[span]:
            return
        moved = [k for k, plan in enumerate(plans) if plan != known[first + k]]
        for k in moved:
            known[first + k] = plans[k]
        if moved:
            _extend(
                message,
                "plans",
                index=[first + k for k in moved],
                plan=[plans[k] for k in moved],
            )

    # What the worker asks.

    def _on_message(self, message: Message) -> None:
        op = message["op"]
        if op == "stats":
            self._stats = message
            self._heard = time.monotonic()
        elif op == "log":
            _relay_log(message)
        else:
            logger.warning("opc ua worker sent an unknown message %r", op[:40])

    async def _on_request(self, message: Message) -> Message | None:
        op = message["op"]
        if op == "check_password":
            return await self._check_password(message)
        if op == "deny":
            await self._deny(message)
            return None
        if op == "audit":
            await self._audit(message)
            return None
        if op == "emergency_stop":
            return await self._emergency_stop(message)
        raise ValueError(f"unknown request {op[:40]!r}")

    def _directory(self) -> Message:
        return {
            "users": {
                view.user_id: [view.active, view.role] for view in self.security.users()
            },
            "roles": {
                role: list(perms) for role, perms in self.security.roles().items()
            },
        }

    async def _send_directory(self) -> None:
        """Security watcher: hand the worker the users and roles as they are now."""
        link = self._link
        if link is None or link.closed or not self._worker_up:
            return
        with contextlib.suppress(LinkClosed, LinkError):
            await link.request("directory", DIRECTORY_TIMEOUT, **self._directory())

    async def _check_password(self, message: Message) -> Message:
        username, password = message.get("username"), message.get("password")
        source = _text(message.get("source"))
        if (
            not isinstance(username, str)
            or not isinstance(password, str)
            or len(username) > MAX_USERNAME
            or len(password) > MAX_PASSWORD
        ):
            return {"refused": "auth", "message": "invalid username or password"}

        try:
            principal = await self.security.check_password(
                username, password, source, PROTOCOL
            )
        except AuthError as exc:
            return {"refused": "auth", "message": str(exc)}
        except SecurityError as exc:
            return {"refused": "security", "message": str(exc)}

        return {
            "principal": {
                "user_id": principal.user_id,
                "username": principal.username,
                "role": principal.role,
                "permissions": sorted(principal.permissions),
                "must_change_password": principal.must_change_password,
            },
            "directory": self._directory(),
        }

    def _principal(self, user_id: object) -> Principal | None:
        if not isinstance(user_id, str):
            return None
        try:
            view = self.security.user(user_id)
        except UnknownUser:
            return None
        return Principal(
            user_id=view.user_id,
            username=view.username,
            role=view.role,
            permissions=self.security.permissions_of(view.role),
            must_change_password=view.must_change_password,
        )

    async def _deny(self, message: Message) -> None:
        code = message.get("status")
        await self.security.deny(
            status=403 if code == 403 else 401,
            reason=_text(message.get("reason")) or "refused",
            principal=self._principal(message.get("user_id")),
            source=_text(message.get("source")),
            protocol=PROTOCOL,
            method=_text(message.get("method")) or "?",
            path=_text(message.get("path")) or "session",
            permission=_text(message.get("permission")),
        )

    async def _audit(self, message: Message) -> None:
        if self.storage is None:
            return
        rows = message.get("records")
        if not isinstance(rows, list):
            raise ValueError("expected a list of records")

        records = []
        for row in rows[:100]:
            event_type = _text(row.get("event_type")) or audit.ACCESS_DENIED
            details = row.get("details")
            records.append(
                AuditRecord(
                    event_type=event_type,
                    severity=audit.severity_of(event_type),
                    timestamp=_timestamp(row.get("timestamp")),
                    user=_text(row.get("user")),
                    source_address=_text(row.get("source_address")),
                    protocol=PROTOCOL,
                    outcome=_text(row.get("outcome")),
                    details=details if isinstance(details, dict) else {},
                )
            )
        try:
            await self.storage.write(records)
        except StorageError as exc:
            raise ValueError(f"storage refused the records: {exc}") from None

    async def _emergency_stop(self, message: Message) -> Message:
        station_id = _text(message.get("station_id")) or ""
        activate = message.get("activate") is True
        address = _text(message.get("address"))
        name = "ActivateEmergencyStop" if activate else "ClearEmergencyStop"
        permission = EMERGENCY_STOP if activate else CLEAR_EMERGENCY_STOP

        user_id = message.get("user_id")
        principal = self._principal(user_id)
        if user_id is None and self.options.allow_anonymous:
            permissions = self.security.permissions_of(VIEWER)
        elif principal is not None and self.security.user(principal.user_id).active:
            permissions = principal.permissions
        else:
            permissions = frozenset()

        if permission not in permissions:
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
            return {"result": "denied"}

        bad = message.get("bad_argument")
        reason = _text(message.get("reason"))
        if isinstance(bad, int):
            return {"result": "bad_argument", "code": bad}
        if reason is None:
            return {"result": "invalid"}

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
            return {"result": "conflict"}
        except EngineError as exc:
            logger.warning("opc ua %s at station %r failed: %s", name, station_id, exc)
            return {"result": "invalid"}
        return {"result": "ok", "active": bool(stops.active)}

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

        stats = self._stats if self._worker_up else {}
        expiry = self.certificate_expiry()
        now = dt.datetime.now(dt.UTC)
        error = stats.get("last_update_error")

        expiring = expiry is not None and expiry - now < CERTIFICATE_WARNING
        if not self._running:
            state, detail = "down", "not listening"
        elif not self._worker_up:
            state, detail = (
                "down",
                f"{self._last_exit or 'worker not running'}; restarting",
            )
        elif self._silent:
            silent = time.monotonic() - self._heard
            state, detail = (
                "degraded",
                f"worker (pid {self.pid}) has not answered for {silent:.0f} s",
            )
        elif error is not None:
            state, detail = "degraded", f"updates failing: {error}"
        elif expiring:
            state, detail = "degraded", f"server certificate expires {expiry:%Y-%m-%d}"
        else:
            state, detail = "ok", f"listening on {options.endpoint}"

        return {
            "state": state,
            "detail": detail,
            "endpoint": options.endpoint,
            "application_uri": self.application_uri,
            "security_policies": list(options.security_policies),
            "security_modes": list(options.security_modes),
            "allow_anonymous": options.allow_anonymous,
            "allow_none_endpoint": options.allow_none_endpoint,
            "worker_pid": self.pid if self._worker_up else None,
            "worker_restarts": self.restarts,
            "standard_nodes": stats.get("standard_nodes"),
            "last_worker_exit": self._last_exit,
            "connections": int(stats.get("connections", 0)),
            "sessions": int(stats.get("sessions", 0)),
            "subscriptions": int(stats.get("subscriptions", 0)),
            "refused_channels": int(stats.get("refused_channels", 0)),
            "refused_logins": int(stats.get("refused_logins", 0)),
            "refused_requests": int(stats.get("refused_requests", 0)),
            "trusted_certificates": self.trust.size,
            "certificate_expires": expiry.isoformat() if expiry else None,
            "certificate_days_left": (
                round((expiry - now).total_seconds() / 86400, 1) if expiry else None
            ),
            "updates": int(stats.get("updates", 0)),
            "update_errors": int(stats.get("update_errors", 0)),
            "last_update_error": error,
            "last_update_at": stats.get("last_update_at"),
        }

    def health_check(self) -> ComponentHealth:
        """:meth:`health` for the REST API's health registry::

        registry.register("opcua", opcua_server.health_check)
        """
        from calejo_server.api.health import ComponentHealth

        data = self.health()
        state, detail = data.pop("state"), data.pop("detail")
        return ComponentHealth(state, detail, data, critical=self.options.enabled)


def _extend(message: Message, key: str, **columns: Any) -> None:
    """Add rows to a column group of a ``values`` message."""
    rows = {
        name: values.tolist() if isinstance(values, np.ndarray) else list(values)
        for name, values in columns.items()
    }
    group = message.setdefault(key, {name: [] for name in rows})
    for name, values in rows.items():
        group[name].extend(values)


def _differ(now: npt.NDArray[Any], was: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Element-wise: the values differ (two NaNs are alike)."""
    same: npt.NDArray[np.bool_] = (now == was) | (np.isnan(now) & np.isnan(was))
    return ~same


def _text(value: object, limit: int = 1024) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _timestamp(value: object) -> dt.datetime:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            stamp = dt.datetime.fromisoformat(value)
            if stamp.tzinfo is not None:
                return stamp
    return dt.datetime.now(dt.UTC)


def _relay_log(message: Mapping[str, Any]) -> None:
    """Log a record of the worker as if it were the adapter's own."""
    name = _text(message.get("name"), 200) or "calejo_server.protocols.opcua_worker"
    level = message.get("level")
    level = level if isinstance(level, int) else logging.INFO
    target = logging.getLogger(name)
    if not target.isEnabledFor(level):
        return
    text = _text(message.get("message"), 20_000) or ""
    exc = _text(message.get("exc"), 20_000)
    target.log(level, "%s%s", text, f"\n{exc.rstrip()}" if exc else "")


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
