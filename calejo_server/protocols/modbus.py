"""The Modbus TCP server of the adapter.

Each station is one unit id (``unit_id`` in its configuration) and serves
the register image the control engine keeps (:attr:`Engine.images`). The
frame handling is :mod:`calejo_core.modbus`: every TCP read of a
connection is fed to its :class:`~calejo_core.modbus.ModbusConnection`,
which answers every complete request in it, in order, straight from the
images; this module only moves bytes and looks after connections. A
stream whose framing is lost (an MBAP length outside 2..254) is answered
up to that point and closed.

Writes from PLCs (heartbeat, station level, pump feedback) go through
:meth:`Engine.write_feedback` before the core stores them: a bad value is
answered with exception 03 and nothing changes. Every other register and
every coil is read-only (exception 02).

Connections: at most ``modbus.max_connections`` at once, only from
``modbus.allowed_clients`` when that list is not empty; a refused one is
closed at once, logged and audited (MODBUS_CONNECTION_REFUSED, rate-limited
per address). A connection that sends no request for
``modbus.idle_timeout`` seconds is closed. Output is bounded: when a
client does not read its answers and the transport's buffer passes
:data:`HIGH_WATER` bytes, the server stops reading its requests until the
buffer drains, and the idle timeout closes it if it never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np
import numpy.typing as npt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from calejo_core.modbus import ModbusConnection, ModbusServerCore
from calejo_server import audit
from calejo_server.app import AdapterError, listen_socket
from calejo_server.config import Config, ModbusConfig
from calejo_server.engine.views import RequestContext

if TYPE_CHECKING:
    from calejo_server.api.health import ComponentHealth
    from calejo_server.engine import Engine

__all__ = ["HIGH_WATER", "LOW_WATER", "PROTOCOL", "SLICE", "ModbusServer"]

logger = logging.getLogger(__name__)

PROTOCOL: Final = "MODBUS"
HIGH_WATER: Final = 64 * 1024
"""Bytes of unsent answers at which a connection stops being read."""
LOW_WATER: Final = 16 * 1024
"""Bytes of unsent answers below which it is read again."""
SLICE: Final = 4096
"""Bytes fed at a time: one slice of requests makes at most ~90 KiB of
answers (125 registers for each 12-byte request)."""
STOP_GRACE: Final = 1.0
"""Seconds connections get to flush their answers at shutdown."""
WRITE_FUNCTIONS: Final = frozenset({5, 6, 15, 16, 23})
REFUSED_WRITE_CODES: Final = {
    0x02: "illegal data address (read-only or outside the map)",
    0x0B: "no station has this unit id",
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ModbusServer:
    """The adapter's Modbus TCP server: start it after the engine.

    ``host`` and ``port`` default to ``server.bind`` and
    ``server.modbus_port`` (port 0: a free one; :attr:`port` is the real
    one once started).
    """

    name = "modbus"

    def __init__(
        self,
        engine: Engine,
        config: Config,
        *,
        host: str | None = None,
        port: int | None = None,
        options: ModbusConfig | None = None,
    ) -> None:
        self.engine = engine
        self.options = options if options is not None else config.modbus
        self.host = host if host is not None else config.server.bind
        self.port = port if port is not None else config.server.modbus_port
        self.core: ModbusServerCore | None = None
        self.connections: set[_Connection] = set()
        self.debug = False
        self.feeding: RequestContext = RequestContext(None, None, PROTOCOL)
        """Who sent the bytes being fed now (for the write callback)."""

        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._running = False
        self._networks: tuple[Network, ...] = self.options.allowed_clients

        self.accepted = 0
        self.refused: dict[str, int] = {"limit": 0, "address": 0}
        self.closed: dict[str, int] = {"idle": 0, "broken": 0}
        self.paused = 0
        self.writes: dict[str, int] = {"stored": 0, "refused": 0}

    # Life cycle.

    async def start(self) -> None:
        """Listen; raises AdapterError naming the address when it cannot."""
        if not self.options.enabled:
            logger.info("modbus tcp server disabled by the configuration")
            return
        if self._running:
            return

        self.core = ModbusServerCore(dict(self.engine.images), self._on_write)
        sock = self._listen()
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=128
            )
        except BaseException:
            sock.close()
            raise

        self.debug = logger.isEnabledFor(logging.DEBUG)
        self._sweeper = asyncio.create_task(self._sweep(), name="modbus-sweeper")
        self._running = True
        for station in self.engine.stations():
            logger.info(
                "modbus tcp: unit %d is station %s (%d pumps)",
                station.unit_id,
                station.station_id,
                len(station.pumps),
            )

    def _listen(self) -> socket.socket:
        try:
            return listen_socket(self.host, self.port, "Modbus TCP")
        except AdapterError as exc:
            cause = exc.__cause__
            code = cause.errno if isinstance(cause, OSError) else None
            if code in (errno.EACCES, errno.EPERM):
                raise AdapterError(
                    f"{exc}: ports below 1024 need root or CAP_NET_BIND_SERVICE; "
                    "set CALEJO_MODBUS_PORT (e.g. 5020) or server.modbus_port"
                ) from cause
            if code == errno.EADDRINUSE:
                raise AdapterError(
                    f"{exc}: set CALEJO_MODBUS_PORT or server.modbus_port to a "
                    "free port"
                ) from cause
            raise

    async def stop(self) -> None:
        """Stop listening, flush and close every connection (bounded)."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

        server, self._server = self._server, None
        if server is None:
            return
        self._running = False
        server.close()

        for connection in list(self.connections):
            connection.close()
        deadline = time.monotonic() + STOP_GRACE
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), STOP_GRACE)
        logger.info("modbus tcp server stopped")

    def addresses(self) -> list[str]:
        """Where clients reach the server (for the start-up log)."""
        if not self._running:
            return []
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"tcp://{host}:{self.port} (Modbus TCP)"]

    # Connections.

    def admit(self, host: str | None) -> str | None:
        """None to accept a connection from ``host``, else why not."""
        if self._networks:
            address = _address(host)
            if address is None or not any(address in net for net in self._networks):
                self.refused["address"] += 1
                return (
                    f"client address {host or 'unknown'} is not in "
                    "modbus.allowed_clients"
                )
        if len(self.connections) >= self.options.max_connections:
            self.refused["limit"] += 1
            return (
                f"{len(self.connections)} connections open, the limit "
                f"(modbus.max_connections) is {self.options.max_connections}"
            )
        return None

    def refuse(self, host: str | None, port: int | None, reason: str) -> None:
        """Log and audit a refused connection (both rate-limited)."""
        ctx = RequestContext(None, host, PROTOCOL)
        recorded = self.engine.audit_refusal(
            audit.MODBUS_CONNECTION_REFUSED, ctx, reason, port=port
        )
        if recorded:
            logger.warning(
                "modbus tcp: refused a connection from %s: %s",
                host or "unknown",
                reason,
            )
        else:
            logger.debug("modbus tcp: refused %s again: %s", host, reason)

    def _on_write(
        self, unit: int, kind: int, address: int, values: npt.NDArray[np.uint16]
    ) -> int:
        code = self.engine.write_feedback(unit, kind, address, values, self.feeding)
        self.writes["stored" if code == 0 else "refused"] += 1
        return code

    def inspect(self, answers: bytes, ctx: RequestContext) -> None:
        """Audit writes the core refused (read-only address, unknown unit)."""
        pos = 0
        size = len(answers)
        while pos + 9 <= size:
            length = (answers[pos + 4] << 8) | answers[pos + 5]
            function = answers[pos + 7]
            code = answers[pos + 8]
            if (
                function & 0x80
                and function & 0x7F in WRITE_FUNCTIONS
                and code in REFUSED_WRITE_CODES
            ):
                self.writes["refused"] += 1
                unit = answers[pos + 6]
                self.engine.audit_refusal(
                    audit.MODBUS_WRITE_REFUSED,
                    ctx,
                    f"function {function & 0x7F} to unit {unit} refused with "
                    f"exception {code:02X}: {REFUSED_WRITE_CODES[code]}",
                    unit=unit,
                    function=function & 0x7F,
                    exception=code,
                    transaction=(answers[pos] << 8) | answers[pos + 1],
                )
            pos += 6 + length

    async def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``; keep the debug flag."""
        loop = asyncio.get_running_loop()
        timeout = self.options.idle_timeout
        period = min(1.0, timeout / 4)
        while True:
            await asyncio.sleep(period)
            self.debug = logger.isEnabledFor(logging.DEBUG)
            now = loop.time()
            for connection in list(self.connections):
                if connection.reads != connection.seen:
                    connection.seen = connection.reads
                    connection.quiet_since = now
                elif now - connection.quiet_since >= timeout:
                    self.closed["idle"] += 1
                    logger.info(
                        "modbus tcp: closing the connection from %s: no request "
                        "for %.1f s (modbus.idle_timeout)",
                        connection.peer,
                        now - connection.quiet_since,
                    )
                    connection.close_idle()

    # Health and metrics.

    def health(self) -> dict[str, Any]:
        """State, endpoint, connections and counts, JSON-ready."""
        if not self.options.enabled:
            return {
                "state": "not_configured",
                "detail": "modbus tcp is disabled by the configuration",
            }

        lost = self.engine.plc_heartbeat_lost()
        if not self._running:
            state, detail = "down", "not listening"
        else:
            state, detail = "ok", f"listening on {self.host}:{self.port}"
            if lost:
                detail += f"; PLC heartbeat lost at {', '.join(lost)}"

        core = self.core
        return {
            "state": state,
            "detail": detail,
            "bind": self.host,
            "port": self.port,
            "units": sorted(core.units) if core is not None else [],
            "connections": len(self.connections),
            "max_connections": self.options.max_connections,
            "accepted": self.accepted,
            "refused_limit": self.refused["limit"],
            "refused_address": self.refused["address"],
            "closed_idle": self.closed["idle"],
            "closed_broken": self.closed["broken"],
            "paused": self.paused,
            "frames": core.frames if core is not None else 0,
            "exceptions": core.exceptions if core is not None else 0,
            "writes_stored": self.writes["stored"],
            "writes_refused": self.writes["refused"],
            "plc_heartbeat_lost": lost,
        }

    def health_check(self) -> ComponentHealth:
        """:meth:`health` for the REST API's health registry."""
        from calejo_server.api.health import ComponentHealth

        data = self.health()
        state, detail = data.pop("state"), data.pop("detail")
        return ComponentHealth(state, detail, data, critical=self.options.enabled)

    def collect(self) -> Iterator[Metric]:
        """Prometheus metric families (a live source of Metrics)."""
        if not self.options.enabled:
            return
        core = self.core

        connections = GaugeMetricFamily(
            "calejo_modbus_connections", "Modbus TCP connections open now."
        )
        connections.add_metric([], float(len(self.connections)))
        yield connections

        yield _counter(
            "calejo_modbus_connections_accepted",
            "Modbus TCP connections accepted since start.",
            self.accepted,
        )
        refused = CounterMetricFamily(
            "calejo_modbus_connections_refused",
            "Modbus TCP connections refused: over the limit or not allowed.",
            labels=("reason",),
        )
        for reason, count in self.refused.items():
            refused.add_metric([reason], float(count))
        yield refused

        closed = CounterMetricFamily(
            "calejo_modbus_connections_closed",
            "Modbus TCP connections the server closed: idle or broken framing.",
            labels=("reason",),
        )
        for reason, count in self.closed.items():
            closed.add_metric([reason], float(count))
        yield closed

        yield _counter(
            "calejo_modbus_frames",
            "Modbus requests answered, exception answers included.",
            core.frames if core is not None else 0,
        )
        yield _counter(
            "calejo_modbus_exceptions",
            "Modbus requests answered with an exception.",
            core.exceptions if core is not None else 0,
        )
        writes = CounterMetricFamily(
            "calejo_modbus_writes",
            "Modbus writes by PLCs: stored or refused.",
            labels=("result",),
        )
        for result, count in self.writes.items():
            writes.add_metric([result], float(count))
        yield writes

        lost = GaugeMetricFamily(
            "calejo_plc_heartbeat_lost_stations",
            "Stations whose PLC heartbeat stands still past its timeout.",
        )
        lost.add_metric([], float(len(self.engine.plc_heartbeat_lost())))
        yield lost


class _Connection(asyncio.Protocol):
    """One client connection: bytes in, answers out, in order."""

    __slots__ = (
        "backlog",
        "ctx",
        "framing",
        "peer",
        "quiet_since",
        "reads",
        "seen",
        "server",
        "transport",
        "writing_paused",
    )

    def __init__(self, server: ModbusServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.framing: ModbusConnection | None = None
        self.ctx = RequestContext(None, None, PROTOCOL)
        self.peer = "unknown"
        self.reads = 0
        self.seen = 0
        self.quiet_since = 0.0
        self.writing_paused = False
        self.backlog = b""

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        server = self.server
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else None
        port = int(peer[1]) if peer and len(peer) > 1 else None

        reason = server.admit(host)
        if reason is not None:
            transport.abort()
            server.refuse(host, port, reason)
            return

        assert server.core is not None
        self.transport = transport
        self.framing = ModbusConnection(server.core)
        self.ctx = RequestContext(None, host, PROTOCOL)
        self.peer = f"{host}:{port}" if ":" not in (host or "") else f"[{host}]:{port}"
        self.quiet_since = asyncio.get_running_loop().time()
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        server.connections.add(self)
        server.accepted += 1
        logger.debug("modbus tcp: connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        if self.framing is None:
            return
        if self.backlog or self.writing_paused or len(data) > SLICE:
            self._feed_slices(data)
            return
        self._answer(data)

    def _answer(self, data: bytes | memoryview) -> None:
        framing = self.framing
        transport = self.transport
        if framing is None or transport is None:
            return

        server = self.server
        server.feeding = self.ctx
        core = server.core
        assert core is not None
        before = core.exceptions
        answers = framing.feed(data)
        if server.debug:
            logger.debug("modbus tcp %s -> %s", self.peer, bytes(data).hex())
            logger.debug("modbus tcp %s <- %s", self.peer, answers.hex())
        if answers:
            transport.write(answers)
            if core.exceptions != before:
                server.inspect(answers, self.ctx)
        if framing.broken:
            self._broken(framing.last_error)

    def _feed_slices(self, data: bytes) -> None:
        pending = self.backlog + data if self.backlog else data
        self.backlog = b""
        view = memoryview(pending)
        for start in range(0, len(view), SLICE):
            if self.writing_paused:
                self.backlog = bytes(view[start:])
                return
            self._answer(view[start : start + SLICE])
            if self.framing is None or self.framing.broken:
                return

    def _broken(self, error: str | None) -> None:
        self.server.closed["broken"] += 1
        logger.info("modbus tcp: closing the connection from %s: %s", self.peer, error)
        self.framing = None
        self.backlog = b""
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.server.paused += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.backlog:
            self._feed_slices(b"")
        transport = self.transport
        if self.writing_paused or transport is None or transport.is_closing():
            return
        transport.resume_reading()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.server.connections.discard(self)
        self.transport = None
        self.framing = None
        self.backlog = b""
        logger.debug(
            "modbus tcp: connection from %s closed%s",
            self.peer,
            f" ({exc})" if exc else "",
        )

    def close(self) -> None:
        """Close after the answers written so far are sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent answers."""
        if self.transport is not None:
            self.transport.abort()

    def close_idle(self) -> None:
        """Close an idle connection: politely unless answers are stuck."""
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing() or transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


def _address(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], float(value))
    return family
