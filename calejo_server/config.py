"""The adapter's configuration: one YAML file, the environment, defaults.

:func:`load_config` reads the file named by its argument, else by the
``CALEJO_CONFIG`` environment variable; with neither, the adapter runs the
demonstration configuration (one station, three pumps). The file is parsed
with ``yaml.safe_load`` and checked strictly: an unknown key in a section
this module owns, a value of the wrong type or out of range, or limits the
safety gate would refuse, are :class:`ConfigError`\\s naming the file, the
key path (``stations[0].pumps[1].max_rate``), what was expected and what
arrived.

String values may hold ``${VAR}`` or ``${VAR:-default}``; the variable is
taken from the environment (the default applies when it is unset or
empty), and ``$${`` stands for a literal ``${``. An unset variable without
a default is a :class:`ConfigError`. A value that is wholly one
substitution may stand for a number or a boolean (``http_port:
${PORT}``).

Sections, all optional::

    server:
      bind: 0.0.0.0            # CALEJO_BIND
      http_port: 8080          # CALEJO_HTTP_PORT
      modbus_port: 502         # CALEJO_MODBUS_PORT; 0 picks a free port
      opcua_port: 4840         # CALEJO_OPCUA_PORT; 0 picks a free port
      data_dir: ./calejo-data  # CALEJO_DATA_DIR; relative to the working folder
    database:
      url: sqlite:///path/calejo.db or postgresql://...   # DATABASE_URL
    engine:
      tick_interval: 0.1       # seconds between ticks (ramps, images, watchdog)
      watchdog_timeout: 1200   # seconds without a setpoint or plan -> failsafe
    modbus:
      enabled: true
      max_connections: 64      # more are refused (and audited)
      idle_timeout: 300        # seconds without a request before closing
      allowed_clients: []      # addresses or CIDR networks; empty: anyone
      plc_heartbeat_timeout: 30  # seconds the PLC heartbeat may stand still
    security:
      token_idle_timeout: 900        # seconds
      token_absolute_timeout: 43200  # seconds
      lockout_threshold: 5           # failed logins before the account locks
      lockout_duration: 900          # seconds
      source_failure_limit: 20       # failures per minute from one address
      admin_password: ${ADMIN_PW}    # CALEJO_ADMIN_PASSWORD; first start only
      max_body_bytes: 1048576
    stations:
      - station_id: north          # [A-Za-z0-9_-]{1,64}, unique
        name: North pump station   # default: the station id
        unit_id: 1                 # Modbus unit id 1..247; default 1, 2, ...
        float_order: ABCD          # float32 word order of the register image
        pumps:                     # 1 to MAX_PUMPS_PER_STATION pumps
          - pump_id: pump_1        # unique in the station
            name: Pump 1
            units: Hz
            min_value: 20          # units
            max_value: 50          # units
            max_rate: 0.5          # units per second; .inf for no ramp
            failsafe_value: 35     # units
            stop_value: 0          # units
            allow_stop: true
            min_switch_interval: 60  # seconds from a stop to the next start

The environment overrides the file: ``DATABASE_URL``, ``CALEJO_DATA_DIR``,
``CALEJO_HTTP_PORT``, ``CALEJO_MODBUS_PORT``, ``CALEJO_OPCUA_PORT``,
``CALEJO_BIND`` and ``CALEJO_ADMIN_PASSWORD`` (an empty variable counts as
unset).

Values of the gate (min, max, stop and failsafe values) must fit the
register image's uint16 x 10 encoding, 0 to 6553.5 units; so must a
finite ``max_rate``.

Stations come from the file. When the file names none, the engine takes
the stations kept in the database (:class:`StationRecord` definitions, in
the same shape as a ``stations`` entry: see :func:`parse_station`), and
without a file at all it falls back to the demonstration station.

Sections read by their own modules, accepted here as they are and kept in
:attr:`Config.raw`:

- ``alerts``: e-mail, SMS and webhook channels per severity
  (calejo_server.alerts.settings).
- ``backup``: backup schedules, retention and folder.
- ``opcua``: OPC UA endpoint, security policies, trust list.
- ``logging``: level, log folder and rotation (calejo_server.logs).
- ``certificates``: the certificate folder and the local CA.
- ``tls``: TLS for the REST API.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from calejo_core import codecs as _codecs
from calejo_core import gate as _gate

__all__ = [
    "DEMO_STATION_ID",
    "MAX_PUMPS_PER_STATION",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "EngineConfig",
    "ModbusConfig",
    "PumpConfig",
    "SecurityConfig",
    "ServerConfig",
    "StationConfig",
    "demo_stations",
    "load_config",
    "parse_station",
    "station_definition",
    "value_error",
]

REGISTER_MAX: Final = 6553.5
"""The largest value the uint16 x 10 registers of the image can hold."""

MAX_PUMPS_PER_STATION: Final = _codecs.MAX_PUMPS
"""Pump blocks that fit between the pump base and the feedback block."""

MAX_STATIONS: Final = 247
DEMO_STATION_ID: Final = "demo_station"
FLOAT_ORDERS: Final = ("ABCD", "CDAB", "BADC", "DCBA")

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_REFERENCE = re.compile(
    r"\$(\$?)\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|[^}]*\}?)"
)
_MAX_NODES: Final = 300_000
_DATABASE_SCHEMES = ("sqlite://", "postgresql://", "postgres://")

_FREE_PORTS: Final = frozenset({"modbus_port", "opcua_port"})
"""Ports that may be 0: the server listens on a free port and logs it."""

_LATER_SECTIONS: Final = frozenset(
    {"alerts", "backup", "opcua", "logging", "certificates", "tls"}
)
_SECTIONS: Final = frozenset(
    {"server", "database", "engine", "security", "stations", "modbus"} | _LATER_SECTIONS
)


class ConfigError(Exception):
    """The configuration is not usable; the message says where and why.

    ``source`` is the file (or ``environment VAR``), ``key_path`` the key
    (``stations[0].pumps[1].max_rate``), when they are known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        key_path: str | None = None,
        expected: str | None = None,
        got: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.key_path = key_path
        self.expected = expected
        self.got = got


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the adapter listens and keeps its files."""

    bind: str = "0.0.0.0"
    http_port: int = 8080
    modbus_port: int = 502
    opcua_port: int = 4840
    data_dir: Path = Path("./calejo-data")


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """The database; None means SQLite in the data folder."""

    url: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class EngineConfig:
    """Timing of the control engine, in seconds."""

    tick_interval: float = 0.1
    watchdog_timeout: float = 1200.0


@dataclasses.dataclass(frozen=True, slots=True)
class ModbusConfig:
    """The Modbus TCP server beyond its port (times in seconds).

    ``allowed_clients`` empty means every client address may connect.
    """

    enabled: bool = True
    max_connections: int = 64
    idle_timeout: float = 300.0
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    plc_heartbeat_timeout: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Logins, tokens and request limits (times in seconds)."""

    token_idle_timeout: float = 900.0
    token_absolute_timeout: float = 43200.0
    lockout_threshold: int = 5
    lockout_duration: float = 900.0
    source_failure_limit: int = 20
    admin_password: str | None = None
    max_body_bytes: int = 1048576


@dataclasses.dataclass(frozen=True, slots=True)
class PumpConfig:
    """One pump and the limits the gate holds it to (engineering units)."""

    pump_id: str
    min_value: float
    max_value: float
    max_rate: float
    failsafe_value: float
    name: str = ""
    units: str = "Hz"
    stop_value: float = 0.0
    allow_stop: bool = True
    min_switch_interval: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class StationConfig:
    """One pump station: one Modbus unit id, its pumps in register order."""

    station_id: str
    name: str
    unit_id: int
    pumps: tuple[PumpConfig, ...]
    float_order: str = "ABCD"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one adapter."""

    server: ServerConfig
    database: DatabaseConfig
    engine: EngineConfig
    security: SecurityConfig
    stations: tuple[StationConfig, ...]
    demo: bool
    source: Path | None
    raw: Mapping[str, Any]
    modbus: ModbusConfig = dataclasses.field(default_factory=ModbusConfig)


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] = os.environ
) -> Config:
    """Read, substitute, override and check the configuration.

    ``path`` None means ``CALEJO_CONFIG`` if set, else no file: the
    demonstration configuration. Raises :class:`ConfigError`.
    """
    if path is None:
        path = environ.get("CALEJO_CONFIG") or None

    if path is None:
        document: dict[str, Any] = {}
        source = None
        where = "<demonstration configuration>"
    else:
        source = Path(path).absolute()
        where = str(source)
        document = _read(source)
        document = _substitute(document, [], where, environ)

    reader = _Reader(where)
    config = reader.config(document, environ)
    if source is None:
        config = dataclasses.replace(config, stations=demo_stations(), demo=True)
    return dataclasses.replace(config, source=source)


def demo_stations() -> tuple[StationConfig, ...]:
    """The demonstration station: three pumps, 20-50 Hz, 0.5 Hz/s."""
    pumps = tuple(
        PumpConfig(
            pump_id=f"pump_{number}",
            name=f"Pump {number}",
            units="Hz",
            min_value=20.0,
            max_value=50.0,
            max_rate=0.5,
            failsafe_value=35.0,
            stop_value=0.0,
            allow_stop=True,
            min_switch_interval=60.0,
        )
        for number in (1, 2, 3)
    )
    station = StationConfig(
        station_id=DEMO_STATION_ID,
        name="Demonstration pump station",
        unit_id=1,
        pumps=pumps,
    )
    return (station,)


def parse_station(
    definition: object, where: str, *, default_unit_id: int = 1
) -> StationConfig:
    """Check one station definition (a ``stations`` entry, or a database one).

    ``where`` names its origin in error messages, e.g. ``database station
    'north'``. Raises :class:`ConfigError`.
    """
    return _Reader(where).station(definition, "", default_unit_id)


def value_error(
    where: str, key_path: str, expected: str, got: object, *, secret: bool = False
) -> ConfigError:
    """The :class:`ConfigError` for a value that does not fit, worded as the
    loader words its own: ``<where>: <key_path>: expected ..., got ...``.

    For the sections that their own modules read from :attr:`Config.raw`;
    with ``secret`` the value is never shown.
    """
    return _Reader(where).fail(key_path, expected, _Secret() if secret else got)


def section_mapping(
    where: str, node: object, key_path: str, keys: frozenset[str]
) -> dict[str, Any]:
    """``node`` as a mapping whose keys are all in ``keys`` (``{}`` when it
    is absent), refused as the loader refuses its own sections.

    For the sections that their own modules read from :attr:`Config.raw`.
    """
    return _Reader(where).section(node, key_path, keys)


def station_definition(station: StationConfig) -> dict[str, Any]:
    """The plain mapping of ``station``, as a ``stations`` entry reads."""
    pumps = [dataclasses.asdict(pump) for pump in station.pumps]
    return {
        "station_id": station.station_id,
        "name": station.name,
        "unit_id": station.unit_id,
        "float_order": station.float_order,
        "pumps": pumps,
    }


class _Substituted(str):
    """A string that was wholly one ``${VAR}``: it may stand for a number."""

    __slots__ = ()


def _read(source: Path) -> dict[str, Any]:
    where = str(source)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the configuration file: {exc.strerror or exc}",
            source=where,
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where}: expected UTF-8 text, got an undecodable byte at "
            f"offset {exc.start}",
            source=where,
        ) from None

    try:
        document = yaml.load(text, Loader=_LOADER)  # a safe loader
    except _DuplicateKey as exc:
        raise ConfigError(f"{where}: {exc}", source=where) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{where}: not valid YAML: {problem}{at}", source=where
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{where}: not valid YAML: nested too deeply", source=where
        ) from None

    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(
            f"{where}: expected a mapping of sections at the top level, "
            f"got {_describe(document)}",
            source=where,
        )
    return document


class _DuplicateKey(Exception):
    """A mapping names the same key twice."""


class _NoDuplicateKeys(yaml.constructor.SafeConstructor):
    """The safe constructor, refusing a key given twice in one mapping."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue
            if duplicate:
                mark = key_node.start_mark
                raise _DuplicateKey(
                    f"key {key!r} given twice in one mapping, at line "
                    f"{mark.line + 1}, column {mark.column + 1}"
                )
        return super().construct_mapping(node, deep=deep)


class _StrictLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """The pure-Python safe loader, without duplicate keys."""


_LOADER: type[yaml.SafeLoader] = _StrictLoader
if getattr(yaml, "__with_libyaml__", False):

    class _FastStrictLoader(_NoDuplicateKeys, yaml.CSafeLoader):
        """The libyaml safe loader, without duplicate keys."""

    _LOADER = _FastStrictLoader  # type: ignore[assignment]


def _substitute(
    document: dict[str, Any],
    path: list[str | int],
    where: str,
    environ: Mapping[str, str],
) -> dict[str, Any]:
    budget = [_MAX_NODES]
    try:
        result: dict[str, Any] = _walk(document, path, where, environ, budget)
    except RecursionError:
        raise ConfigError(
            f"{where}: expected a document nested less deeply, got one nested "
            "too deeply to read",
            source=where,
        ) from None
    return result


def _walk(
    node: Any,
    path: list[str | int],
    where: str,
    environ: Mapping[str, str],
    budget: list[int],
) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(
            f"{where}: expected at most {_MAX_NODES} values in the document, "
            "got more (are aliases repeating a large part?)",
            source=where,
        )

    if isinstance(node, dict):
        return {
            key: _walk(value, [*path, str(key)], where, environ, budget)
            for key, value in node.items()
        }

    if isinstance(node, list):
        return [
            _walk(value, [*path, index], where, environ, budget)
            for index, value in enumerate(node)
        ]

    if not isinstance(node, str) or "$" not in node:
        return node

    return _substitute_string(node, path, where, environ)


def _substitute_string(
    text: str, path: list[str | int], where: str, environ: Mapping[str, str]
) -> str:
    key_path = _format_path(path)

    def replace(match: re.Match[str]) -> str:
        escaped, name, default = match.group(1), match.group(2), match.group(3)
        if escaped:
            return match.group(0)[1:]

        if name is None:
            raise ConfigError(
                f"{where}: {key_path}: expected ${{NAME}} or ${{NAME:-default}}, "
                f"got {match.group(0)[:40]!r}",
                source=where,
                key_path=key_path,
            )

        value = environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is not None:
            return value

        raise ConfigError(
            f"{where}: {key_path}: environment variable {name} is not set "
            f"(write ${{{name}:-default}} to give a default)",
            source=where,
            key_path=key_path,
        )

    result = _REFERENCE.sub(replace, text)
    whole = _REFERENCE.fullmatch(text)
    if whole is not None and not whole.group(1) and whole.group(2) is not None:
        return _Substituted(result)
    return result


class _Reader:
    """Checks a parsed document, naming ``where`` in every error."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, expected: str, got: object) -> ConfigError:
        shown = _describe(got)
        return ConfigError(
            f"{self.where}: {path}: expected {expected}, got {shown}",
            source=self.where,
            key_path=path,
            expected=expected,
            got=shown,
        )

    def config(self, document: dict[str, Any], environ: Mapping[str, str]) -> Config:
        for key in document:
            if key not in _SECTIONS:
                raise ConfigError(
                    f"{self.where}: {key}: unknown section; expected one of "
                    f"{', '.join(sorted(_SECTIONS))}",
                    source=self.where,
                    key_path=str(key),
                )

        server = self.server(document.get("server"), environ)
        database = self.database(document.get("database"), environ)
        engine = self.engine(document.get("engine"))
        security = self.security(document.get("security"), environ)
        stations = self.stations(document.get("stations"))
        modbus = self.modbus(document.get("modbus"))

        return Config(
            server=server,
            database=database,
            engine=engine,
            security=security,
            stations=stations,
            demo=False,
            source=None,
            raw=types.MappingProxyType(_plain(document)),
            modbus=modbus,
        )

    def section(self, node: object, path: str, keys: frozenset[str]) -> dict[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, dict):
            raise self.fail(path, "a mapping", node)

        for key in node:
            if key not in keys:
                raise ConfigError(
                    f"{self.where}: {_join(path, key)}: unknown key; expected "
                    f"one of {', '.join(sorted(keys))}",
                    source=self.where,
                    key_path=_join(path, key),
                )
        return node

    def server(self, node: object, environ: Mapping[str, str]) -> ServerConfig:
        keys = frozenset(f.name for f in dataclasses.fields(ServerConfig))
        section = self.section(node, "server", keys)
        defaults = ServerConfig()

        bind = self.bind(section.get("bind", defaults.bind), "server.bind")
        ports = {
            name: self.port(
                section.get(name, getattr(defaults, name)),
                f"server.{name}",
                free=name in _FREE_PORTS,
            )
            for name in ("http_port", "modbus_port", "opcua_port")
        }
        data_dir = self.text(
            section.get("data_dir", str(defaults.data_dir)), "server.data_dir", 4096
        )

        env_reader = _EnvReader(environ)
        bind = env_reader.override("CALEJO_BIND", bind, self.bind)
        data_dir = env_reader.override(
            "CALEJO_DATA_DIR", data_dir, lambda v, p: self.text(v, p, 4096)
        )
        for name, variable in (
            ("http_port", "CALEJO_HTTP_PORT"),
            ("modbus_port", "CALEJO_MODBUS_PORT"),
            ("opcua_port", "CALEJO_OPCUA_PORT"),
        ):
            ports[name] = env_reader.override(
                variable,
                ports[name],
                lambda v, p, free=name in _FREE_PORTS: self.port(
                    _Substituted(v), p, free=free
                ),
            )

        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen and port != 0:
                raise ConfigError(
                    f"{self.where}: server.{name}: expected a port different from "
                    f"server.{seen[port]}, got {port}",
                    source=self.where,
                    key_path=f"server.{name}",
                )
            seen[port] = name

        return ServerConfig(bind=bind, data_dir=Path(data_dir), **ports)

    def database(self, node: object, environ: Mapping[str, str]) -> DatabaseConfig:
        section = self.section(node, "database", frozenset({"url"}))
        url = section.get("url")
        if url is not None:
            url = self.database_url(url, "database.url")

        url = _EnvReader(environ).override("DATABASE_URL", url, self.database_url)
        return DatabaseConfig(url=url)

    def database_url(self, value: object, path: str) -> str:
        text = self.text(value, path, 4096)
        if not text.startswith(_DATABASE_SCHEMES):
            raise self.fail(
                path,
                "a URL starting sqlite://, postgresql:// or postgres://",
                _Url(text),
            )
        return text

    def engine(self, node: object) -> EngineConfig:
        keys = frozenset(f.name for f in dataclasses.fields(EngineConfig))
        section = self.section(node, "engine", keys)
        defaults = EngineConfig()

        tick = self.number(
            section.get("tick_interval", defaults.tick_interval),
            "engine.tick_interval",
            low=0.01,
            high=5.0,
        )
        timeout = self.number(
            section.get("watchdog_timeout", defaults.watchdog_timeout),
            "engine.watchdog_timeout",
            low=1.0,
            high=7 * 86400.0,
        )
        if timeout <= tick:
            raise self.fail(
                "engine.watchdog_timeout",
                f"more than engine.tick_interval ({tick:g} s)",
                timeout,
            )
        return EngineConfig(tick_interval=tick, watchdog_timeout=timeout)

    def modbus(self, node: object) -> ModbusConfig:
        keys = frozenset(f.name for f in dataclasses.fields(ModbusConfig))
        section = self.section(node, "modbus", keys)
        d = ModbusConfig()

        enabled = self.boolean(section.get("enabled", d.enabled), "modbus.enabled")
        connections = self.integer(
            section.get("max_connections", d.max_connections),
            "modbus.max_connections",
            1,
            10_000,
        )
        idle = self.number(
            section.get("idle_timeout", d.idle_timeout),
            "modbus.idle_timeout",
            0.1,
            86400.0,
        )
        heartbeat = self.number(
            section.get("plc_heartbeat_timeout", d.plc_heartbeat_timeout),
            "modbus.plc_heartbeat_timeout",
            1.0,
            86400.0,
        )

        clients = section.get("allowed_clients", [])
        if not isinstance(clients, list):
            raise self.fail(
                "modbus.allowed_clients",
                "a list of IP addresses or CIDR networks",
                clients,
            )
        networks = tuple(
            self.network(entry, f"modbus.allowed_clients[{index}]")
            for index, entry in enumerate(clients)
        )

        return ModbusConfig(
            enabled=enabled,
            max_connections=connections,
            idle_timeout=idle,
            allowed_clients=networks,
            plc_heartbeat_timeout=heartbeat,
        )

    def network(
        self, value: object, path: str
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        expected = "an IP address or a CIDR network such as 10.0.0.0/8"
        if not isinstance(value, str):
            raise self.fail(path, expected, value)
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise self.fail(path, expected, value) from None

    def security(self, node: object, environ: Mapping[str, str]) -> SecurityConfig:
        keys = frozenset(f.name for f in dataclasses.fields(SecurityConfig))
        section = self.section(node, "security", keys)
        d = SecurityConfig()

        def seconds(name: str, low: float, high: float) -> float:
            return self.number(
                section.get(name, getattr(d, name)), f"security.{name}", low, high
            )

        def count(name: str, low: int, high: int) -> int:
            return self.integer(
                section.get(name, getattr(d, name)), f"security.{name}", low, high
            )

        idle = seconds("token_idle_timeout", 1.0, 86400.0 * 30)
        absolute = seconds("token_absolute_timeout", 1.0, 86400.0 * 365)
        if absolute < idle:
            raise self.fail(
                "security.token_absolute_timeout",
                f"at least security.token_idle_timeout ({idle:g} s)",
                absolute,
            )

        password = section.get("admin_password")
        if password is not None:
            password = self.text(password, "security.admin_password", 1024, secret=True)
        password = _EnvReader(environ).override(
            "CALEJO_ADMIN_PASSWORD",
            password,
            lambda v, p: self.text(v, p, 1024, secret=True),
        )

        return SecurityConfig(
            token_idle_timeout=idle,
            token_absolute_timeout=absolute,
            lockout_threshold=count("lockout_threshold", 1, 1000),
            lockout_duration=seconds("lockout_duration", 1.0, 86400.0 * 30),
            source_failure_limit=count("source_failure_limit", 1, 1_000_000),
            admin_password=password,
            max_body_bytes=count("max_body_bytes", 1024, 1 << 30),
        )

    def stations(self, node: object) -> tuple[StationConfig, ...]:
        if node is None:
            return ()
        if not isinstance(node, list):
            raise self.fail("stations", "a list of stations", node)
        if len(node) > MAX_STATIONS:
            raise self.fail(
                "stations", f"at most {MAX_STATIONS} stations", _Count(len(node))
            )

        stations = tuple(
            self.station(entry, f"stations[{index}]", index + 1)
            for index, entry in enumerate(node)
        )

        ids: dict[str, int] = {}
        units: dict[int, int] = {}
        for index, station in enumerate(stations):
            if station.station_id in ids:
                raise self.fail(
                    f"stations[{index}].station_id",
                    f"an id not already used by stations[{ids[station.station_id]}]",
                    station.station_id,
                )
            ids[station.station_id] = index

            if station.unit_id in units:
                raise self.fail(
                    f"stations[{index}].unit_id",
                    f"a unit id not already used by stations[{units[station.unit_id]}]",
                    station.unit_id,
                )
            units[station.unit_id] = index
        return stations

    def station(self, node: object, path: str, default_unit_id: int) -> StationConfig:
        keys = frozenset({"station_id", "name", "unit_id", "float_order", "pumps"})
        section = self.section(node, path or "station", keys)

        station_id = self.identifier(
            section.get("station_id"), _join(path, "station_id")
        )
        name = self.text(section.get("name", station_id), _join(path, "name"), 200)
        unit_id = self.integer(
            section.get("unit_id", default_unit_id), _join(path, "unit_id"), 1, 247
        )
        float_order = section.get("float_order", "ABCD")
        if float_order not in FLOAT_ORDERS:
            raise self.fail(
                _join(path, "float_order"),
                f"one of {', '.join(FLOAT_ORDERS)}",
                float_order,
            )

        pumps_node = section.get("pumps")
        pumps_path = _join(path, "pumps")
        if not isinstance(pumps_node, list) or not pumps_node:
            raise self.fail(pumps_path, "a non-empty list of pumps", pumps_node)
        if len(pumps_node) > MAX_PUMPS_PER_STATION:
            raise self.fail(
                pumps_path,
                f"at most {MAX_PUMPS_PER_STATION} pumps (the register map of one "
                "unit id)",
                _Count(len(pumps_node)),
            )

        pumps = tuple(
            self.pump(entry, f"{pumps_path}[{index}]")
            for index, entry in enumerate(pumps_node)
        )
        seen: dict[str, int] = {}
        for index, pump in enumerate(pumps):
            if pump.pump_id in seen:
                raise self.fail(
                    f"{pumps_path}[{index}].pump_id",
                    f"an id not already used by {pumps_path}[{seen[pump.pump_id]}]",
                    pump.pump_id,
                )
            seen[pump.pump_id] = index

        return StationConfig(
            station_id=station_id,
            name=name,
            unit_id=unit_id,
            pumps=pumps,
            float_order=str(float_order),
        )

    def pump(self, node: object, path: str) -> PumpConfig:
        keys = frozenset(f.name for f in dataclasses.fields(PumpConfig))
        section = self.section(node, path, keys)

        pump_id = self.identifier(section.get("pump_id"), f"{path}.pump_id")
        name = self.text(section.get("name", pump_id), f"{path}.name", 200)
        units = self.text(section.get("units", "Hz"), f"{path}.units", 16)

        def value(key: str, default: float | None = None) -> float:
            given = section.get(key, default)
            return self.number(given, f"{path}.{key}", 0.0, REGISTER_MAX)

        min_value = value("min_value")
        max_value = value("max_value")
        failsafe_value = value("failsafe_value")
        stop_value = value("stop_value", 0.0)
        max_rate = self.rate(section.get("max_rate"), f"{path}.max_rate")
        allow_stop = self.boolean(section.get("allow_stop", True), f"{path}.allow_stop")
        min_switch_interval = self.number(
            section.get("min_switch_interval", 0.0),
            f"{path}.min_switch_interval",
            0.0,
            86400.0,
        )

        if min_value > max_value:
            raise self.fail(
                f"{path}.max_value", f"at least min_value ({min_value:g})", max_value
            )

        failsafe_is_stop = allow_stop and failsafe_value == stop_value
        if not failsafe_is_stop and not min_value <= failsafe_value <= max_value:
            stop = f" or the stop_value ({stop_value:g})" if allow_stop else ""
            raise self.fail(
                f"{path}.failsafe_value",
                f"a value from min_value to max_value ({min_value:g} to "
                f"{max_value:g}){stop}",
                failsafe_value,
            )

        try:
            _gate.PumpLimits(
                min_value,
                max_value,
                max_rate,
                failsafe_value,
                stop_value,
                allow_stop,
                min_switch_interval,
                pump_id=pump_id,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{self.where}: {path}: the safety gate refuses these limits: {exc}",
                source=self.where,
                key_path=path,
            ) from None

        return PumpConfig(
            pump_id=pump_id,
            name=name,
            units=units,
            min_value=min_value,
            max_value=max_value,
            max_rate=max_rate,
            failsafe_value=failsafe_value,
            stop_value=stop_value,
            allow_stop=allow_stop,
            min_switch_interval=min_switch_interval,
        )

    def identifier(self, value: object, path: str) -> str:
        if not isinstance(value, str) or _ID.fullmatch(value) is None:
            raise self.fail(path, "an id of 1 to 64 letters, digits, _ or -", value)
        return str(value)

    def text(
        self, value: object, path: str, limit: int, *, secret: bool = False
    ) -> str:
        if not isinstance(value, str) or not value or len(value) > limit:
            shown = _Secret() if secret and isinstance(value, str) else value
            raise self.fail(path, f"a text of 1 to {limit} characters", shown)
        return str(value)

    def bind(self, value: object, path: str) -> str:
        if isinstance(value, str):
            try:
                ipaddress.ip_address(value)
                return str(value)
            except ValueError:
                if _HOSTNAME.fullmatch(value):
                    return str(value)
        raise self.fail(path, "an IP address or host name to listen on", value)

    def port(self, value: object, path: str, *, free: bool = False) -> int:
        """A TCP port; with ``free``, 0 too (the system picks a free one)."""
        return self.integer(value, path, 0 if free else 1, 65535)

    def integer(self, value: object, path: str, low: int, high: int) -> int:
        value = _coerce(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"an integer from {low} to {high}", value)
        if not low <= value <= high:
            raise self.fail(path, f"an integer from {low} to {high}", value)
        return value

    def number(self, value: object, path: str, low: float, high: float) -> float:
        value = _coerce(value)
        expected = f"a number from {low:g} to {high:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, expected, value)
        number = float(value)
        if not math.isfinite(number) or not low <= number <= high:
            raise self.fail(path, expected, value)
        return number

    def rate(self, value: object, path: str) -> float:
        value = _coerce(value)
        expected = f"a number above 0 and up to {REGISTER_MAX:g}, or .inf for no ramp"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, expected, value)
        rate = float(value)
        if rate == math.inf:
            return rate
        if math.isnan(rate) or not 0.0 < rate <= REGISTER_MAX:
            raise self.fail(path, expected, value)
        return rate

    def boolean(self, value: object, path: str) -> bool:
        value = _coerce(value)
        if not isinstance(value, bool):
            raise self.fail(path, "true or false", value)
        return value


class _EnvReader:
    """Applies one environment variable over a value from the file."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def override(self, variable: str, current: Any, check: Any) -> Any:
        value = self.environ.get(variable)
        if not value:
            return current

        try:
            return check(value, variable)
        except ConfigError as exc:
            raise ConfigError(
                f"environment {variable}: expected {exc.expected}, got {exc.got}",
                source=f"environment {variable}",
                key_path=variable,
                expected=exc.expected,
                got=exc.got,
            ) from None


class _Count(int):
    """A count shown as such in an error message."""

    __slots__ = ()


class _Url(str):
    """A URL shown with its password hidden."""

    __slots__ = ()


class _Secret:
    """A secret, never shown."""

    __slots__ = ()


def _coerce(value: object) -> object:
    if not isinstance(value, _Substituted):
        return value

    text = value.strip()
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return value


def _describe(value: object) -> str:
    if isinstance(value, _Secret):
        return "a value that is not shown (a secret)"
    if isinstance(value, _Count):
        return f"{int(value)}"
    if isinstance(value, _Url):
        return repr(re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", str(value))[:120])
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"{shown!r} (a text)"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    if isinstance(node, _Substituted):
        return str(node)
    return node


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _format_path(path: list[str | int]) -> str:
    text = ""
    for part in path:
        text = f"{text}[{part}]" if isinstance(part, int) else _join(text, part)
    return text or "<top level>"
