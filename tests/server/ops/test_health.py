"""``calejo health-check`` against live adapters: HTTPS, degraded, stopped.

Also the REST certificate rotated under a running adapter: new connections
get the new certificate at once, and a restart keeps it and the state.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asyncua import Client
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from calejo_server import certs
from calejo_server.ops.health import COMPONENTS
from calejo_server.tls import client_context

STATION = {
    "station_id": "north",
    "pumps": [
        {
            "pump_id": "p1",
            "min_value": 20,
            "max_value": 50,
            "max_rate": 1000,
            "failsafe_value": 35,
        }
    ],
}
SETPOINT = "/pump-stations/north/pumps/p1/setpoint"
WAIT = 30.0


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _serial(port: int, trust: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def _status(url: str, trust: ssl.SSLContext | None = None) -> str:
    """The adapter's status at ``url`` (``.../health``), or unreachable."""
    try:
        answer = httpx.get(url, verify=trust or True, timeout=2)
    except httpx.TransportError:
        return "unreachable"
    return str(answer.json().get("status"))


def _lines(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        name, _, rest = line.partition(": ")
        found[name] = rest
    return found


def test_https_health_check_rotation_and_restart(
    tmp_path: Path,
    adapter_factory: Callable[..., Any],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
    admin_env: dict[str, str],
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "https.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "stations": [STATION],
                "tls": {"enabled": True, "reload_interval": 0.2},
            }
        ),
        encoding="utf-8",
    )
    env = make_env(data, admin_env)
    adapter = adapter_factory(
        config=config.read_text(encoding="utf-8"), env=env, data_dir=data, wait=False
    )
    ca = data / "certs" / "ca.crt"
    api = f"https://127.0.0.1:{adapter.port}/api/v1"
    _wait_for(lambda: ca.exists(), "the local CA")
    trust = client_context(ca)
    _wait_for(lambda: _status(f"{api}/health", trust) == "ok", "https, all started")
    # The REST API answers as soon as it listens; the line that says so may
    # reach the log a moment later.
    _wait_for(lambda: f"listening on {api}" in adapter.output, "the https address")

    # From the configuration: https, checked against the local CA.
    checked = calejo(["health-check", "--config", str(config)], env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = _lines(checked.stdout)
    assert checked.stdout.splitlines()[0] == "adapter: ok"
    assert lines["rest"].startswith(f"ok - {api}/health/detailed answered 200 in ")
    assert f"(https, verified against {ca})" in lines["rest"]
    for name in (*COMPONENTS, "engine"):
        assert name in lines, checked.stdout
    assert lines["certificates"].startswith("ok - days left: ca 3650")
    assert "opcua_days_left=730" in lines["certificates"]
    assert "rest_days_left=730" in lines["certificates"]

    insecure = calejo(["health-check", "--url", api, "--insecure"], env)
    assert insecure.returncode == 0, insecure.stdout
    assert "certificate not checked" in insecure.stdout

    stranger = tmp_path / "stranger"
    certs.ensure_authority(stranger)
    refused = calejo(
        ["health-check", "--url", api, "--cafile", str(stranger / "ca.crt")], env
    )
    assert refused.returncode == 2
    assert "certificate verify failed" in refused.stdout
    plain = calejo(["health-check", "--url", f"http://127.0.0.1:{adapter.port}"], env)
    assert plain.returncode == 2, plain.stdout

    # State the restart must keep.
    with httpx.Client(verify=trust, timeout=10) as client:
        login = client.post(
            f"{api}/auth/login",
            json={"username": "admin", "password": admin_env["CALEJO_ADMIN_PASSWORD"]},
        )
        assert login.status_code == 200, login.text
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        written = client.put(f"{api}{SETPOINT}", json={"value": 42.5}, headers=headers)
        assert written.status_code == 200, written.text

    # Rotation reaches new REST connections of the running adapter; its
    # OPC UA server keeps the certificate it started with until a restart.
    opcua = f"opc.tcp://127.0.0.1:{env['CALEJO_OPCUA_PORT']}"
    opcua_before = _opcua_certificate(opcua)
    assert opcua_before == _der(data / "certs" / "server.pem")
    before = _serial(adapter.port, trust)
    rotated = calejo(["certs", "rotate", "--config", str(config)], env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "opcua: restart the adapter (pid" in rotated.stdout
    after = certs.certificate_info(data / "certs" / "rest.pem").serial_number
    assert after != before
    _wait_for(lambda: _serial(adapter.port, trust) == after, "the new certificate")
    assert "serving the new certificate" in adapter.output
    assert _opcua_certificate(opcua) == opcua_before

    # A restart keeps the rotated certificate and the state.
    assert adapter.stop(signal.SIGTERM) == 0
    again = adapter_factory(
        config=config.read_text(encoding="utf-8"), env=env, data_dir=data, wait=False
    )
    _wait_for(lambda: _status(f"{api}/health", trust) == "ok", "https, restarted")
    assert _serial(again.port, trust) == after
    with httpx.Client(verify=trust, timeout=10) as client:
        login = client.post(
            f"{api}/auth/login",
            json={"username": "admin", "password": admin_env["CALEJO_ADMIN_PASSWORD"]},
        )
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        station = client.get(f"{api}/pump-stations/north", headers=headers).json()
    (pump,) = station["pumps"]
    assert pump["target"] == 42.5
    opcua_after = _opcua_certificate(opcua)
    assert opcua_after == _der(data / "certs" / "server.pem") != opcua_before
    assert again.stop(signal.SIGTERM) == 0


def _der(path: Path) -> bytes:
    return certs.load_certificate(path).public_bytes(serialization.Encoding.DER)


def _opcua_certificate(url: str) -> bytes:
    """The certificate the OPC UA server shows in its endpoints (DER)."""

    async def fetch() -> bytes:
        endpoints = await asyncio.wait_for(
            Client(url, timeout=10).connect_and_get_server_endpoints(), 20
        )
        (found,) = {bytes(endpoint.ServerCertificate) for endpoint in endpoints}
        return found

    return asyncio.run(fetch())


@pytest.mark.postgres
def test_degraded_storage_exits_1(
    tmp_path: Path,
    adapter_factory: Callable[..., Any],
    private_postgres: Any,
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
    admin_env: dict[str, str],
) -> None:
    data = tmp_path / "data"
    env = make_env(data, {**admin_env, "DATABASE_URL": private_postgres.url()})
    adapter = adapter_factory(env=env, data_dir=data)
    token = adapter.login("admin", admin_env["CALEJO_ADMIN_PASSWORD"])
    _wait_for(lambda: _status(f"{adapter.api}/health") == "ok", "all started")
    healthy = calejo(["health-check", "--url", adapter.base_url], env)
    assert healthy.returncode == 0, healthy.stdout

    private_postgres.stop("immediate")
    answer = httpx.put(
        f"{adapter.api}/pump-stations/demo_station/pumps/pump_1/setpoint",
        json={"value": 30.0},
        headers={"Authorization": f"Bearer {token}"},
        timeout=15,
    )
    assert answer.status_code == 200, answer.text

    def degraded() -> bool:
        status = httpx.get(f"{adapter.api}/health", timeout=5).json()["status"]
        return bool(status == "degraded")

    _wait_for(degraded, "storage degraded")
    check = calejo(["health-check", "--url", adapter.base_url], env)

    assert check.returncode == 1, check.stdout
    lines = _lines(check.stdout)
    assert lines["adapter"] == "degraded"
    assert lines["storage"].startswith("degraded")
    assert lines["rest"].startswith("ok")
    for name in COMPONENTS:
        assert name in lines


def test_a_stopped_adapter_exits_2_with_a_line_per_component(
    adapter_factory: Callable[..., Any],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    adapter = adapter_factory()
    _wait_for(lambda: _status(f"{adapter.api}/health") == "ok", "all started")
    assert (
        calejo(["health-check", "--url", adapter.base_url], adapter.env).returncode == 0
    )
    assert adapter.stop(signal.SIGTERM) == 0

    check = calejo(["health-check", "--url", adapter.base_url], adapter.env)

    assert check.returncode == 2
    lines = _lines(check.stdout)
    assert lines["adapter"].startswith("down (cannot reach")
    assert lines["rest"].startswith("down")
    for name in COMPONENTS:
        assert lines[name] == "unknown - the adapter did not answer"
