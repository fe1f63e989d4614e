"""The ``modbus:`` section and the Modbus port in the configuration."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from calejo_server.config import Config, ConfigError, ModbusConfig, load_config


def load(folder: Path, document: dict[str, Any], **environ: str) -> Config:
    path = folder / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return load_config(path, environ=environ)


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, {})

    assert config.modbus == ModbusConfig(
        enabled=True,
        max_connections=64,
        idle_timeout=300.0,
        allowed_clients=(),
        plc_heartbeat_timeout=30.0,
    )
    assert config.server.modbus_port == 502
    assert load_config(None, environ={}).modbus == config.modbus


def test_every_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "server": {"modbus_port": 0},
            "modbus": {
                "enabled": False,
                "max_connections": 3,
                "idle_timeout": 0.5,
                "allowed_clients": ["10.1.2.3", "192.168.0.0/16", "fd00::/8"],
                "plc_heartbeat_timeout": 5,
            },
        },
    )

    assert config.server.modbus_port == 0
    assert config.modbus.enabled is False
    assert config.modbus.max_connections == 3
    assert config.modbus.idle_timeout == 0.5
    assert config.modbus.plc_heartbeat_timeout == 5.0
    assert config.modbus.allowed_clients == (
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("192.168.0.0/16"),
        ipaddress.ip_network("fd00::/8"),
    )


def test_port_zero_from_the_environment(tmp_path: Path) -> None:
    config = load(tmp_path, {}, CALEJO_MODBUS_PORT="0")

    assert config.server.modbus_port == 0


@pytest.mark.parametrize(
    ("section", "key_path", "expected", "got"),
    [
        ({"enabled": "yes"}, "modbus.enabled", "true or false", "'yes' (a text)"),
        (
            {"max_connections": 0},
            "modbus.max_connections",
            "an integer from 1 to 10000",
            "got 0",
        ),
        (
            {"idle_timeout": -1},
            "modbus.idle_timeout",
            "a number from 0.1 to 86400",
            "got -1",
        ),
        (
            {"plc_heartbeat_timeout": 0.5},
            "modbus.plc_heartbeat_timeout",
            "a number from 1 to 86400",
            "got 0.5",
        ),
        (
            {"allowed_clients": "10.0.0.0/8"},
            "modbus.allowed_clients",
            "a list of IP addresses or CIDR networks",
            "'10.0.0.0/8' (a text)",
        ),
        (
            {"allowed_clients": ["10.0.0.0/8", "scada.local"]},
            "modbus.allowed_clients[1]",
            "an IP address or a CIDR network",
            "'scada.local' (a text)",
        ),
        (
            {"allowed_clients": ["10.0.0.0/33"]},
            "modbus.allowed_clients[0]",
            "an IP address or a CIDR network",
            "'10.0.0.0/33' (a text)",
        ),
        ({"port": 502}, "modbus.port", "unknown key; expected one of", "allowed_"),
    ],
)
def test_errors_name_the_key_what_was_expected_and_what_arrived(
    tmp_path: Path, section: dict[str, Any], key_path: str, expected: str, got: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"modbus": section})

    message = str(caught.value)
    assert caught.value.key_path == key_path
    assert f"calejo.yaml: {key_path}: " in message
    assert expected in message
    assert got in message


def test_modbus_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"modbus: expected a mapping, got a list"):
        load(tmp_path, {"modbus": [1]})


def test_port_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.modbus_port: expected an integer"):
        load(tmp_path, {"server": {"modbus_port": -1}})
    with pytest.raises(ConfigError, match=r"server.http_port: expected an integer"):
        load(tmp_path, {"server": {"http_port": 0}})
