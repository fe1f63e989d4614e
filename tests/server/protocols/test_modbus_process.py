"""Modbus TCP in ``calejo serve`` as an operator runs it: a real process."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .modbus_support import RawClient, read_request, registers_of

SETPOINT = "/pump-stations/demo_station/pumps/pump_1/setpoint"
SHUTDOWN_LIMIT = 5.0
REPO = Path(__file__).resolve().parents[3]


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _token(adapter: Any, password: str) -> dict[str, str]:
    token = adapter.login("admin", password)
    headers = {"Authorization": f"Bearer {token}"}
    probe = httpx.get(f"{adapter.api}/pump-stations", headers=headers, timeout=10)
    if probe.status_code == 403:
        renewed = password + "-renewed"
        httpx.post(
            f"{adapter.api}/auth/change-password",
            json={"old_password": password, "new_password": renewed},
            headers=headers,
            timeout=10,
        ).raise_for_status()
        headers = {"Authorization": f"Bearer {adapter.login('admin', renewed)}"}
    return headers


def _mbpoll(port: int, *options: str) -> list[str]:
    """The values mbpoll prints, one per reference, for one poll."""
    result = subprocess.run(
        ["mbpoll", "-m", "tcp", "-p", str(port), "-1", "-0", *options, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"^\[\d+\]:\s+(\S+)", result.stdout, re.MULTILINE)


def test_mbpoll_reads_what_rest_set(
    adapter_factory: Callable[..., Any], admin_env: dict[str, str]
) -> None:
    if shutil.which("mbpoll") is None:
        message = "mbpoll is not installed (make test-tools installs it)"
        if _under_ci():
            pytest.fail(f"{message}; under CI=true this test must run")
        pytest.skip(message)

    adapter = adapter_factory(env=admin_env)
    port = int(adapter.env["CALEJO_MODBUS_PORT"])
    headers = _token(adapter, admin_env["CALEJO_ADMIN_PASSWORD"])
    answer = httpx.put(
        f"{adapter.api}{SETPOINT}", json={"value": 42.5}, headers=headers, timeout=10
    )
    assert answer.status_code == 200, answer.text

    limits = _mbpoll(port, "-a", "1", "-r", "104", "-c", "4")
    header = _mbpoll(port, "-a", "1", "-r", "2", "-c", "1")
    applied = _mbpoll(port, "-a", "1", "-r", "101", "-c", "1", "-t", "4:float", "-B")
    client = RawClient(port)
    try:
        same = registers_of(client.request(read_request(1, 1, 104, 4)))
    finally:
        client.close()

    assert limits == ["425", "200", "500", "5"]
    assert [int(v) for v in limits] == same
    assert header == ["3"]
    assert 0.0 <= float(applied[0]) <= 50.0


def test_sigterm_with_modbus_clients_connected_stops_within_budget(
    adapter_factory: Callable[..., Any],
) -> None:
    adapter = adapter_factory()
    port = int(adapter.env["CALEJO_MODBUS_PORT"])
    assert f"modbus: listening on tcp://127.0.0.1:{port}" in adapter.output

    polling, idle, half = RawClient(port), RawClient(port), RawClient(port)
    try:
        assert registers_of(polling.request(read_request(1, 1, 2, 1))) == [3]
        half.send(read_request(2, 1, 0, 1)[:5])

        started = time.monotonic()
        code = adapter.stop(signal.SIGTERM)
        took = time.monotonic() - started

        assert code == 0, adapter.output
        assert took < SHUTDOWN_LIMIT
        for client in (polling, idle, half):
            assert client.closed_by_server(5.0)
    finally:
        for client in (polling, idle, half):
            client.close()
    assert "modbus tcp server stopped" in adapter.output
    assert "Traceback" not in adapter.output


def test_port_502_without_root_names_calejo_modbus_port(
    make_env: Callable[..., dict[str, str]],
) -> None:
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no user 'nobody' to drop to")
        wrap = [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ]
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
    else:
        nobody = None
        wrap = []
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if start.exists() and int(start.read_text()) <= 502:
        pytest.skip("this kernel lets any user listen on port 502")

    folder = Path(tempfile.mkdtemp(prefix="calejo-modbus-502-"))
    try:
        if nobody is not None:
            os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        env = make_env(
            folder / "data",
            {
                "CALEJO_MODBUS_PORT": "502",
                "CALEJO_ADMIN_PASSWORD": "pumps-turn-at-night-for-tests-7",
            },
        )
        result = subprocess.run(
            [*wrap, sys.executable, "-m", "calejo_server", "serve"],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "cannot start: Modbus TCP: cannot listen on 127.0.0.1:502" in output
    assert "set CALEJO_MODBUS_PORT" in output
    assert "Traceback" not in output
