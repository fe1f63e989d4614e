"""The configuration: file, substitution, environment, checks, demonstration."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from calejo_server.config import (
    MAX_PUMPS_PER_STATION,
    Config,
    ConfigError,
    PumpConfig,
    demo_stations,
    load_config,
    parse_station,
    station_definition,
)


def pump(pump_id: str = "p1", **limits: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "pump_id": pump_id,
        "min_value": 20,
        "max_value": 50,
        "max_rate": 0.5,
        "failsafe_value": 35,
    }
    entry.update(limits)
    return entry


def station(station_id: str = "north", **fields: Any) -> dict[str, Any]:
    return {"station_id": station_id, "pumps": [pump()], **fields}


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "calejo.yaml"
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, document: Any, **environ: str) -> Config:
    return load_config(write(tmp_path, document), environ=environ)


def test_no_file_is_the_demonstration_configuration() -> None:
    config = load_config(environ={})

    assert config.demo
    assert config.source is None
    assert config.stations == demo_stations()
    station = config.stations[0]
    assert (station.station_id, station.name, station.unit_id) == (
        "demo_station",
        "Demonstration pump station",
        1,
    )
    assert [p.pump_id for p in station.pumps] == ["pump_1", "pump_2", "pump_3"]
    first = station.pumps[0]
    assert (first.min_value, first.max_value, first.max_rate) == (20.0, 50.0, 0.5)
    assert (first.failsafe_value, first.stop_value) == (35.0, 0.0)
    assert first.min_switch_interval == 60.0
    assert config.server.http_port == 8080
    assert config.server.data_dir == Path("./calejo-data")
    assert config.engine.watchdog_timeout == 1200.0
    assert config.database.url is None
    assert dict(config.raw) == {}


def test_calejo_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"stations": [station()]})

    config = load_config(environ={"CALEJO_CONFIG": str(path)})

    assert not config.demo
    assert config.source == path
    assert [s.station_id for s in config.stations] == ["north"]


def test_a_full_file(tmp_path: Path) -> None:
    document = {
        "server": {
            "bind": "127.0.0.1",
            "http_port": 9000,
            "modbus_port": 1502,
            "opcua_port": 14840,
            "data_dir": "/var/lib/calejo",
        },
        "database": {"url": "postgresql://calejo@db/calejo"},
        "engine": {"tick_interval": 0.05, "watchdog_timeout": 600},
        "security": {"lockout_threshold": 3, "max_body_bytes": 4096},
        "stations": [
            {
                "station_id": "north",
                "name": "North",
                "unit_id": 5,
                "float_order": "CDAB",
                "pumps": [
                    pump(
                        "p1",
                        name="Pump 1",
                        units="rpm",
                        stop_value=0,
                        allow_stop=False,
                        failsafe_value=20,
                        min_switch_interval=30,
                        max_rate=math.inf,
                    ),
                    pump("p2"),
                ],
            },
            station("south"),
        ],
        "alerts": {"email": {"enabled": True}},
        "logging": {"level": "DEBUG"},
        "opcua": {"security": ["Basic256Sha256"]},
    }

    config = load(tmp_path, document)

    assert config.server.bind == "127.0.0.1"
    assert (config.server.http_port, config.server.modbus_port) == (9000, 1502)
    assert config.server.data_dir == Path("/var/lib/calejo")
    assert config.database.url == "postgresql://calejo@db/calejo"
    assert config.engine.tick_interval == 0.05
    assert config.security.lockout_threshold == 3
    assert config.security.token_idle_timeout == 900.0
    north, south = config.stations
    assert (north.unit_id, south.unit_id) == (5, 2)
    assert north.float_order == "CDAB"
    first = north.pumps[0]
    assert first == PumpConfig(
        pump_id="p1",
        min_value=20.0,
        max_value=50.0,
        max_rate=math.inf,
        failsafe_value=20.0,
        name="Pump 1",
        units="rpm",
        stop_value=0.0,
        allow_stop=False,
        min_switch_interval=30.0,
    )
    assert north.pumps[1].name == "p2"
    assert config.raw["alerts"] == {"email": {"enabled": True}}
    assert config.raw["logging"]["level"] == "DEBUG"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.http_port = 1  # type: ignore[misc]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    document = {
        "server": {"http_port": 9000, "bind": "127.0.0.1"},
        "database": {"url": "sqlite:///a.db"},
        "security": {"admin_password": "from the file"},
    }

    config = load(
        tmp_path,
        document,
        DATABASE_URL="postgresql://x@y/z",
        CALEJO_DATA_DIR="/data",
        CALEJO_HTTP_PORT="8181",
        CALEJO_MODBUS_PORT="1502",
        CALEJO_OPCUA_PORT="4841",
        CALEJO_BIND="::1",
        CALEJO_ADMIN_PASSWORD="correct horse battery",
    )

    assert config.database.url == "postgresql://x@y/z"
    assert config.server.data_dir == Path("/data")
    assert (config.server.http_port, config.server.modbus_port) == (8181, 1502)
    assert config.server.opcua_port == 4841
    assert config.server.bind == "::1"
    assert config.security.admin_password == "correct horse battery"


def test_empty_environment_variables_count_as_unset(tmp_path: Path) -> None:
    config = load(tmp_path, {"server": {"http_port": 9000}}, CALEJO_HTTP_PORT="")

    assert config.server.http_port == 9000


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CALEJO_HTTP_PORT", "http", "an integer from 1 to 65535"),
        ("CALEJO_MODBUS_PORT", "70000", "an integer from 0 to 65535"),
        ("CALEJO_BIND", "not a host!", "an IP address or host name"),
        ("DATABASE_URL", "mysql://x", "a URL starting sqlite://"),
    ],
)
def test_bad_environment_values_name_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {}, **{variable: value})

    message = str(caught.value)
    assert message.startswith(f"environment {variable}: expected {expected}")
    assert "got " in message
    assert caught.value.key_path == variable


def test_substitution_of_environment_variables(tmp_path: Path) -> None:
    document = (
        "server:\n"
        "  http_port: ${PORT}\n"
        "  data_dir: ${BASE:-/srv}/calejo\n"
        "database:\n"
        "  url: postgresql://calejo:${DB_PASSWORD}@db/calejo\n"
        "security:\n"
        '  admin_password: "$${literal}"\n'
        "stations:\n"
        "  - station_id: ${STATION}\n"
        "    pumps:\n"
        "      - pump_id: p1\n"
        "        min_value: 20\n"
        "        max_value: 50\n"
        "        max_rate: ${RATE}\n"
        "        failsafe_value: 35\n"
        "        allow_stop: ${STOP:-false}\n"
        "alerts:\n"
        "  webhook: {secret: '${HOOK}'}\n"
    )

    config = load(
        tmp_path,
        document,
        PORT="9090",
        DB_PASSWORD="s3cret",
        STATION="west",
        RATE="1.5",
        HOOK="abc",
    )

    assert config.server.http_port == 9090
    assert config.server.data_dir == Path("/srv/calejo")
    assert config.database.url == "postgresql://calejo:s3cret@db/calejo"
    assert config.security.admin_password == "${literal}"
    assert config.stations[0].station_id == "west"
    assert config.stations[0].pumps[0].max_rate == 1.5
    assert config.stations[0].pumps[0].allow_stop is False
    assert config.raw["alerts"]["webhook"]["secret"] == "abc"
    assert type(config.raw["alerts"]["webhook"]["secret"]) is str


def test_unset_variable_names_it_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "database:\n  url: postgresql://u:${PGPASS}@h/d\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    assert str(caught.value) == (
        f"{path}: database.url: environment variable PGPASS is not set "
        "(write ${PGPASS:-default} to give a default)"
    )


def test_malformed_reference_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "stations:\n  - station_id: ${1bad}\n")

    with pytest.raises(ConfigError, match=r"stations\[0\]\.station_id: expected"):
        load_config(path, environ={})


def test_substituted_number_still_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.http_port: expected an integer"):
        load(tmp_path, "server:\n  http_port: ${PORT}\n", PORT="eighty")


BAD: list[tuple[Any, str, str, str]] = [
    ({"sever": {}}, "sever", "unknown section; expected one of", ""),
    (
        {"server": {"htp_port": 1}},
        "server.htp_port",
        "unknown key; expected one of",
        "",
    ),
    ({"server": []}, "server", "expected a mapping", "got a list of 0 items"),
    ({"server": {"http_port": 0}}, "server.http_port", "1 to 65535", "got 0"),
    ({"server": {"http_port": 65536}}, "server.http_port", "1 to 65535", "got 65536"),
    (
        {"server": {"http_port": "80"}},
        "server.http_port",
        "an integer",
        "got '80' (a text)",
    ),
    (
        {"server": {"http_port": True}},
        "server.http_port",
        "an integer",
        "got true (a boolean)",
    ),
    ({"server": {"http_port": 80.5}}, "server.http_port", "an integer", "got 80.5"),
    (
        {"server": {"http_port": 502}},
        "server.modbus_port",
        "expected a port different from server.http_port",
        "got 502",
    ),
    ({"server": {"bind": "a b"}}, "server.bind", "an IP address or host name", "'a b'"),
    ({"server": {"data_dir": ""}}, "server.data_dir", "a text of 1 to 4096", "got ''"),
    (
        {"database": {"url": "mysql://x"}},
        "database.url",
        "a URL starting sqlite://",
        "",
    ),
    ({"database": {"url": 5}}, "database.url", "a text", "got 5"),
    ({"engine": {"tick_interval": 0}}, "engine.tick_interval", "0.01 to 5", "got 0"),
    ({"engine": {"watchdog_timeout": -1}}, "engine.watchdog_timeout", "1 to", "got -1"),
    (
        {"engine": {"watchdog_timeout": ".nan"}},
        "engine.watchdog_timeout",
        "a number",
        "",
    ),
    (
        {"security": {"token_idle_timeout": 100, "token_absolute_timeout": 50}},
        "security.token_absolute_timeout",
        "at least security.token_idle_timeout",
        "got 50",
    ),
    (
        {"security": {"lockout_threshold": 0}},
        "security.lockout_threshold",
        "1 to 1000",
        "0",
    ),
    (
        {"security": {"admin_password": ""}},
        "security.admin_password",
        "a text",
        "not shown",
    ),
    ({"stations": {"a": 1}}, "stations", "a list of stations", "a mapping"),
    ({"stations": [5]}, "stations[0]", "a mapping", "got 5"),
    (
        {"stations": [{"pumps": [pump()]}]},
        "stations[0].station_id",
        "an id of 1 to 64",
        "null",
    ),
    ({"stations": [station("bad id")]}, "stations[0].station_id", "an id", "'bad id'"),
    ({"stations": [station("x" * 65)]}, "stations[0].station_id", "an id", ""),
    (
        {"stations": [station("a"), station("a")]},
        "stations[1].station_id",
        "an id not already used by stations[0]",
        "'a'",
    ),
    (
        {"stations": [station("a", unit_id=2), station("b")]},
        "stations[1].unit_id",
        "a unit id not already used by stations[0]",
        "got 2",
    ),
    ({"stations": [station(unit_id=0)]}, "stations[0].unit_id", "1 to 247", "got 0"),
    (
        {"stations": [station(unit_id=248)]},
        "stations[0].unit_id",
        "1 to 247",
        "got 248",
    ),
    (
        {"stations": [station(float_order="ABDC")]},
        "stations[0].float_order",
        "ABCD",
        "",
    ),
    ({"stations": [station(colour=1)]}, "stations[0].colour", "unknown key", ""),
    ({"stations": [station(pumps=[])]}, "stations[0].pumps", "a non-empty list", ""),
    (
        {"stations": [station(pumps=[pump(f"p{i}") for i in range(91)])]},
        "stations[0].pumps",
        f"at most {MAX_PUMPS_PER_STATION} pumps",
        "got 91",
    ),
    (
        {"stations": [station(pumps=[pump("a"), pump("a")])]},
        "stations[0].pumps[1].pump_id",
        "not already used by stations[0].pumps[0]",
        "",
    ),
    (
        {"stations": [station(pumps=[pump(speed=1)])]},
        "stations[0].pumps[0].speed",
        "unknown key",
        "",
    ),
    (
        {"stations": [station(pumps=[pump(min_value=60)])]},
        "stations[0].pumps[0].max_value",
        "at least min_value (60)",
        "got 50",
    ),
    (
        {"stations": [station(pumps=[pump(failsafe_value=55)])]},
        "stations[0].pumps[0].failsafe_value",
        "from min_value to max_value (20 to 50) or the stop_value (0)",
        "got 55",
    ),
    (
        {"stations": [station(pumps=[pump(failsafe_value=0, allow_stop=False)])]},
        "stations[0].pumps[0].failsafe_value",
        "from min_value to max_value (20 to 50), got 0",
        "",
    ),
    (
        {"stations": [station(pumps=[pump(max_rate=0)])]},
        "stations[0].pumps[0].max_rate",
        "above 0",
        "got 0",
    ),
    (
        {"stations": [station(pumps=[pump(max_rate=-1)])]},
        "stations[0].pumps[0].max_rate",
        "above 0",
        "",
    ),
    (
        {"stations": [station(pumps=[pump(max_rate=math.nan)])]},
        "stations[0].pumps[0].max_rate",
        "above 0",
        "nan",
    ),
    (
        {"stations": [station(pumps=[pump(max_rate=7000)])]},
        "stations[0].pumps[0].max_rate",
        "up to 6553.5",
        "",
    ),
    (
        {"stations": [station(pumps=[pump(max_value=6553.6)])]},
        "stations[0].pumps[0].max_value",
        "0 to 6553.5",
        "6553.6",
    ),
    (
        {"stations": [station(pumps=[pump(stop_value=-1)])]},
        "stations[0].pumps[0].stop_value",
        "0 to 6553.5",
        "got -1",
    ),
    (
        {"stations": [station(pumps=[pump(min_value=math.inf)])]},
        "stations[0].pumps[0].min_value",
        "a number",
        "inf",
    ),
    (
        {"stations": [station(pumps=[pump(min_value="20")])]},
        "stations[0].pumps[0].min_value",
        "a number",
        "'20'",
    ),
    (
        {"stations": [station(pumps=[pump(allow_stop="yes")])]},
        "stations[0].pumps[0].allow_stop",
        "true or false",
        "",
    ),
    (
        {"stations": [station(pumps=[pump(min_switch_interval=-1)])]},
        "stations[0].pumps[0].min_switch_interval",
        "0 to 86400",
        "got -1",
    ),
    (
        {"stations": [station(pumps=[pump(units="")])]},
        "stations[0].pumps[0].units",
        "a text",
        "",
    ),
]


@pytest.mark.parametrize(("document", "key", "expected", "got"), BAD)
def test_every_error_names_file_key_expected_and_got(
    tmp_path: Path, document: Any, key: str, expected: str, got: str
) -> None:
    path = write(tmp_path, document)

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: ")
    assert expected in message
    assert got in message
    assert caught.value.key_path == key
    assert caught.value.source == str(path)


def test_secrets_are_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"security": {"admin_password": "x" * 2000}})
    assert "xxxx" not in str(caught.value)

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"database": {"url": "mysql://root:hunter2@db/x"}})
    assert "hunter2" not in str(caught.value)
    assert "root:***@" in str(caught.value)


def test_failsafe_may_be_the_stop_value(tmp_path: Path) -> None:
    config = load(tmp_path, {"stations": [station(pumps=[pump(failsafe_value=0)])]})

    assert config.stations[0].pumps[0].failsafe_value == 0.0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("server: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping of sections at the top level, got a list"),
        ("server:\n  http_port: 1\n  http_port: 2\n", "key 'http_port' given twice"),
        ("a: &x [*x]\n", ""),
    ],
)
def test_unreadable_documents(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    assert str(caught.value).startswith(f"{path}: ")
    assert words in str(caught.value)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    lines.append("alerts: *a8")

    with pytest.raises(ConfigError, match="at most 300000 values"):
        load(tmp_path, "\n".join(lines) + "\n")


def test_missing_file_and_bad_bytes(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(missing, environ={})

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"server: \xff\xfe\n")
    with pytest.raises(ConfigError, match="expected UTF-8 text"):
        load_config(binary, environ={})


def test_empty_file_is_an_empty_configuration(tmp_path: Path) -> None:
    config = load(tmp_path, "")

    assert not config.demo
    assert config.stations == ()
    assert config.server.modbus_port == 502


def test_station_definitions_round_trip() -> None:
    north = demo_stations()[0]

    definition = station_definition(north)

    assert parse_station(definition, "database station 'demo_station'") == north
    definition["pumps"][0]["max_rate"] = 0
    with pytest.raises(ConfigError) as caught:
        parse_station(definition, "database station 'demo_station'")
    assert str(caught.value).startswith(
        "database station 'demo_station': pumps[0].max_rate: expected"
    )
