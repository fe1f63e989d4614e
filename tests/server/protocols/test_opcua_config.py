"""The ``opcua:`` configuration section, and a server configured permissively."""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, ua
from asyncua.ua.uaerrors import UaStatusCodeError

from calejo_server import certs
from calejo_server.config import ConfigError, load_config
from calejo_server.protocols.opcua import OpcUaError, OpcUaServer, parse_opcua_config
from calejo_server.storage.base import AuditQuery


def config_from(
    tmp_path: Path, document: dict[str, Any], environ: dict[str, str]
) -> Any:
    path = tmp_path / "calejo.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_config(path, environ=environ)


def test_defaults_follow_the_server_section(tmp_path: Path) -> None:
    document = {"server": {"bind": "127.0.0.1", "opcua_port": 4841, "data_dir": "d"}}
    config = config_from(tmp_path, document, {})

    options = parse_opcua_config(config, environ={})

    assert options.enabled
    assert options.endpoint == "opc.tcp://127.0.0.1:4841"
    assert (options.host, options.port) == ("127.0.0.1", 4841)
    assert options.security_policies == ("Basic256Sha256", "Aes256_Sha256_RsaPss")
    assert options.security_modes == ("Sign", "SignAndEncrypt")
    assert not options.allow_anonymous and not options.allow_none_endpoint
    assert options.trust_dir == Path("d/opcua/trusted")
    assert options.rejected_dir == Path("d/opcua/rejected")
    assert options.certificate_dir == Path("d/certs")
    assert options.min_publishing_interval_ms == 50


def test_environment_overrides_a_configured_endpoint(tmp_path: Path) -> None:
    environ = {"CALEJO_OPCUA_PORT": "5000", "CALEJO_BIND": "10.0.0.7"}
    document = {"opcua": {"endpoint": "opc.tcp://0.0.0.0:4840/calejo"}}
    config = config_from(tmp_path, document, environ)

    options = parse_opcua_config(config, environ=environ)

    assert options.endpoint == "opc.tcp://10.0.0.7:5000/calejo"
    assert (options.host, options.port) == ("10.0.0.7", 5000)


def test_port_zero_is_accepted_from_the_file_and_the_environment(
    tmp_path: Path,
) -> None:
    config = config_from(tmp_path, {"server": {"opcua_port": 0}}, {})
    assert parse_opcua_config(config, environ={}).port == 0

    environ = {"CALEJO_OPCUA_PORT": "0"}
    document = {"opcua": {"endpoint": "opc.tcp://127.0.0.1:4840"}}
    config = config_from(tmp_path, document, environ)
    options = parse_opcua_config(config, environ=environ)
    assert (options.port, options.endpoint) == (0, "opc.tcp://127.0.0.1:0")


def test_ipv6_bind_is_bracketed(tmp_path: Path) -> None:
    config = config_from(tmp_path, {"server": {"bind": "::"}}, {})
    assert parse_opcua_config(config, environ={}).endpoint == "opc.tcp://[::]:4840"


def test_certificate_folder_from_its_section(tmp_path: Path) -> None:
    config = config_from(tmp_path, {"certificates": {"dir": "/app/certs"}}, {})
    assert parse_opcua_config(config, environ={}).certificate_dir == Path("/app/certs")


@pytest.mark.parametrize(
    ("document", "key_path", "expected"),
    [
        ({"opcua": 5}, "opcua", "a mapping"),
        ({"opcua": {"bogus": 1}}, "opcua.bogus", "unknown key"),
        ({"opcua": {"enabled": "yes"}}, "opcua.enabled", "true or false"),
        ({"opcua": {"endpoint": "http://host:1"}}, "opcua.endpoint", "opc.tcp://"),
        ({"opcua": {"endpoint": "opc.tcp://host"}}, "opcua.endpoint", "opc.tcp://"),
        (
            {"opcua": {"security_policies": ["Basic128Rsa15"]}},
            "opcua.security_policies[0]",
            "Basic256Sha256",
        ),
        ({"opcua": {"security_policies": []}}, "opcua.security_policies", "non-empty"),
        ({"opcua": {"security_modes": ["None"]}}, "opcua.security_modes[0]", "Sign"),
        (
            {"opcua": {"min_publishing_interval_ms": 0}},
            "opcua.min_publishing_interval_ms",
            "a number from 1",
        ),
        ({"opcua": {"max_connections": True}}, "opcua.max_connections", "a number"),
        ({"opcua": {"application_uri": "http://x"}}, "opcua.application_uri", "urn:"),
        ({"opcua": {"trust_dir": ""}}, "opcua.trust_dir", "a folder path"),
        ({"opcua": {"hostnames": "host"}}, "opcua.hostnames", "a list of host names"),
        ({"certificates": {"folder": "x"}}, "certificates.folder", "unknown key"),
        ({"certificates": {"dir": 5}}, "certificates.dir", "a folder path"),
    ],
)
def test_errors_name_file_key_and_expectation(
    tmp_path: Path, document: dict[str, Any], key_path: str, expected: str
) -> None:
    config = config_from(tmp_path, document, {})

    with pytest.raises(ConfigError) as caught:
        parse_opcua_config(config, environ={})

    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'calejo.yaml'}: {key_path}: ")
    assert expected in message
    assert caught.value.key_path == key_path


# A permissive server: anonymous sessions and an endpoint without security.


@pytest.fixture(scope="module")
def open_adapter(opcua_harness: Any) -> Any:
    return opcua_harness.start(
        {
            "allow_anonymous": True,
            "allow_none_endpoint": True,
            "security_policies": ["Basic256Sha256"],
            "security_modes": ["SignAndEncrypt"],
        },
        name="open",
    )


def test_configured_none_endpoint_and_anonymous_are_offered(
    opcua_harness: Any, open_adapter: Any
) -> None:
    async def scenario() -> list[Any]:
        client = Client(open_adapter.url, timeout=5)
        return list(await client.connect_and_get_server_endpoints())

    endpoints = opcua_harness.run(scenario())
    offered = {
        (e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode) for e in endpoints
    }
    assert offered == {
        ("None", ua.MessageSecurityMode.None_),
        ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt),
    }
    for endpoint in endpoints:
        tokens = {token.TokenType for token in endpoint.UserIdentityTokens}
        assert tokens == {ua.UserTokenType.Anonymous, ua.UserTokenType.UserName}


def test_anonymous_session_reads_but_may_not_stop(
    opcua_harness: Any, open_adapter: Any
) -> None:
    async def scenario() -> None:
        before = await open_adapter.storage.audit_query(
            AuditQuery(event_type="ACCESS_DENIED")
        )
        async with opcua_harness.client(open_adapter, None, secure=False) as client:
            ns = await open_adapter.namespace(client)
            limit = client.get_node(f"ns={ns};s=PumpStations/north/Pumps/p1/MaxValue")
            assert await limit.read_value() == 50.0

            station = client.get_node(f"ns={ns};s=PumpStations/north")
            stop = client.get_node(
                f"ns={ns};s=PumpStations/north/ActivateEmergencyStop"
            )
            with pytest.raises(UaStatusCodeError) as caught:
                await station.call_method(stop, ua.Variant("x", ua.VariantType.String))
            assert caught.value.code == ua.StatusCodes.BadUserAccessDenied

        after = await open_adapter.storage.audit_query(
            AuditQuery(event_type="ACCESS_DENIED")
        )
        assert len(after) == len(before) + 1
        assert after[-1].record.user is None
        assert after[-1].record.protocol == "OPCUA"
        assert not open_adapter.engine.emergency_stop_status("north").active

    opcua_harness.run(scenario())


def test_unconfigured_mode_is_refused(opcua_harness: Any, open_adapter: Any) -> None:
    async def scenario() -> None:
        client = await opcua_harness.make_client(
            open_adapter, "oper", mode=ua.MessageSecurityMode.Sign, pin_server=True
        )
        with pytest.raises(UaStatusCodeError) as caught:
            await client.connect()
        with contextlib.suppress(Exception):
            await client.disconnect()
        assert caught.value.code == ua.StatusCodes.BadSecurityModeRejected

    opcua_harness.run(scenario())


def test_client_issued_by_a_trusted_ca_is_accepted(
    opcua_harness: Any, open_adapter: Any, tmp_path: Path
) -> None:
    ca_folder = tmp_path / "site-ca"
    authority = certs.ensure_certificates(
        ca_folder, "urn:site:ca-holder", ["localhost"]
    )
    client_cert = tmp_path / "scada.pem"
    client_key = tmp_path / "scada-key.pem"
    certs.issue_certificate(
        certs.load_certificate(authority.ca_cert),
        certs.load_private_key(authority.ca_key),
        client_cert,
        client_key,
        application_uri="urn:site:scada",
        common_name="site scada",
        hostnames=["localhost"],
        server=False,
    )
    trust_dir = open_adapter.server.options.trust_dir
    (trust_dir / "site-ca.crt").write_bytes(authority.ca_cert.read_bytes())

    async def scenario() -> bool:
        client = Client(open_adapter.url, timeout=5)
        client.application_uri = "urn:site:scada"
        await client.set_security_string(
            f"Basic256Sha256,SignAndEncrypt,{client_cert},{client_key}"
        )
        client.set_user("watcher")
        client.set_password(opcua_harness.users["watcher"][1])
        async with client:
            ns = await open_adapter.namespace(client)
            node = client.get_node(f"ns={ns};s=PumpStations/south/EmergencyStop")
            return bool(await node.read_value() is False)

    try:
        assert opcua_harness.run(scenario())
    finally:
        (trust_dir / "site-ca.crt").unlink()


def test_disabled_server_does_not_listen(opcua_harness: Any, open_adapter: Any) -> None:
    document = {"opcua": {"enabled": False}}
    path = open_adapter.data_dir.parent / "disabled.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_config(path, environ={})
    server = OpcUaServer(open_adapter.engine, open_adapter.security, config)

    opcua_harness.run(server.start())

    assert server.addresses() == []
    assert server.health()["state"] == "not_configured"
    assert not server.health_check().critical
    opcua_harness.run(server.stop())


def test_port_zero_listens_on_a_free_port_and_names_it(
    opcua_harness: Any, open_adapter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    document = {
        "server": {"data_dir": str(open_adapter.data_dir)},
        "opcua": {"endpoint": "opc.tcp://127.0.0.1:0", "allow_none_endpoint": True},
    }
    path = open_adapter.data_dir.parent / "free-port.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_config(path, environ={})
    server = OpcUaServer(open_adapter.engine, open_adapter.security, config)

    caplog.set_level(logging.INFO, logger="calejo_server.protocols.opcua")
    opcua_harness.run(server.start(), timeout=60.0)
    try:
        port = server.options.port
        assert port != 0
        assert server.endpoint == f"opc.tcp://127.0.0.1:{port}"
        assert server.addresses() == [server.endpoint]
        assert f"opc ua server listening on {server.endpoint} " in caplog.text

        async def endpoints() -> list[str]:
            client = Client(server.endpoint, timeout=5)
            found = await client.connect_and_get_server_endpoints()
            return [endpoint.EndpointUrl for endpoint in found]

        assert set(opcua_harness.run(endpoints())) == {server.endpoint}
    finally:
        opcua_harness.run(server.stop())


def test_a_port_in_use_is_a_clear_error(opcua_harness: Any, open_adapter: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        document = {
            "server": {"data_dir": str(open_adapter.data_dir)},
            "opcua": {"endpoint": f"opc.tcp://127.0.0.1:{port}"},
        }
        path = open_adapter.data_dir.parent / "taken.yaml"
        path.write_text(yaml.safe_dump(document))
        config = load_config(path, environ={})
        server = OpcUaServer(open_adapter.engine, open_adapter.security, config)

        with pytest.raises(OpcUaError) as caught:
            opcua_harness.run(server.start(), timeout=60.0)

    assert str(caught.value) == (
        f"opc ua endpoint opc.tcp://127.0.0.1:{port}: port {port} is in use; "
        "set CALEJO_OPCUA_PORT or opcua.endpoint"
    )
    assert server.health()["state"] == "down"
    opcua_harness.run(server.stop())
