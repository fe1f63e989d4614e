"""``calejo serve`` as an operator runs it: a real process on real sockets."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

SETPOINT = "/pump-stations/demo_station/pumps/pump_1/setpoint"
SHUTDOWN_LIMIT = 5.0


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ready_token(adapter: Any, username: str, password: str) -> str:
    """Log in; if the account must change its password first, do that."""
    token: str = adapter.login(username, password)
    probe = httpx.get(f"{adapter.api}/pump-stations", headers=_auth(token), timeout=10)
    if probe.status_code == 403 and probe.json().get("error") == (
        "password_change_required"
    ):
        changed = httpx.post(
            f"{adapter.api}/auth/change-password",
            json={"old_password": password, "new_password": password + "-renewed"},
            headers=_auth(token),
            timeout=10,
        )
        assert changed.status_code in (200, 204), changed.text
        token = adapter.login(username, password + "-renewed")
    return token


def _timed_stop(adapter: Any, sig: int) -> tuple[int, float]:
    started = time.monotonic()
    code = adapter.stop(sig)
    return code, time.monotonic() - started


def test_first_start_demo_login_setpoint_and_signals(
    adapter_factory: Callable[..., Any], tmp_path: Path
) -> None:
    data = tmp_path / "data"

    first = adapter_factory(data_dir=data)
    password = first.admin_password()
    assert password, first.output
    assert first.output.count("An administrator account was created") == 1
    assert "auth/login" in first.output
    assert "curl" in first.output
    assert "listening on http://127.0.0.1:" in first.output

    token = _ready_token(first, "admin", password)
    answer = httpx.put(
        f"{first.api}{SETPOINT}", json={"value": 42.5}, headers=_auth(token), timeout=10
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["outcome"] == "accepted"
    assert result["requested"] == 42.5
    assert result["target"] == 42.5

    station = httpx.get(
        f"{first.api}/pump-stations/demo_station", headers=_auth(token), timeout=10
    )
    assert station.status_code == 200, station.text
    pumps = {pump["pump_id"]: pump for pump in station.json()["pumps"]}
    assert pumps["pump_1"]["target"] == 42.5

    code, took = _timed_stop(first, signal.SIGTERM)
    assert code == 0, first.output
    assert took < SHUTDOWN_LIMIT
    assert "Traceback" not in first.output

    second = adapter_factory(data_dir=data)
    assert second.admin_password() is None, second.output
    assert "password:" not in second.output
    token = (
        second.login("admin", password)
        if _login_ok(second, password)
        else second.login("admin", password + "-renewed")
    )
    station = httpx.get(
        f"{second.api}/pump-stations/demo_station", headers=_auth(token), timeout=10
    )
    pumps = {pump["pump_id"]: pump for pump in station.json()["pumps"]}
    assert pumps["pump_1"]["target"] == 42.5

    code, took = _timed_stop(second, signal.SIGINT)
    assert code == 0, second.output
    assert took < SHUTDOWN_LIMIT
    assert "Traceback" not in second.output


def _login_ok(adapter: Any, password: str) -> bool:
    answer = httpx.post(
        f"{adapter.api}/auth/login",
        json={"username": "admin", "password": password},
        timeout=10,
    )
    return answer.status_code == 200


def test_sigterm_lets_requests_in_flight_finish(
    adapter_factory: Callable[..., Any], admin_env: dict[str, str]
) -> None:
    adapter = adapter_factory(env=admin_env)
    token = adapter.login("admin", admin_env["CALEJO_ADMIN_PASSWORD"])
    statuses: list[int] = []
    refused = 0

    with httpx.Client(headers=_auth(token), timeout=10) as client:
        client.put(f"{adapter.api}{SETPOINT}", json={"value": 30.0})
        adapter.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_LIMIT
        while time.monotonic() < deadline and adapter.process.poll() is None:
            try:
                answer = client.put(f"{adapter.api}{SETPOINT}", json={"value": 31.0})
            except httpx.TransportError:
                refused += 1
                time.sleep(0.01)
                continue
            statuses.append(answer.status_code)

    code, _ = _timed_stop(adapter, signal.SIGTERM)
    assert code == 0, adapter.output
    assert all(status == 200 for status in statuses), statuses


def test_broken_config_exits_2_naming_the_key_path(
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    config = tmp_path / "calejo.yaml"
    config.write_text(
        "server:\n  http_port: 80800\n",
        encoding="utf-8",
    )

    result = calejo(["serve", "--config", str(config)], make_env(tmp_path / "data"))

    assert result.returncode == 2
    assert "server.http_port" in result.stderr
    assert "80800" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_environment_error_exits_2(
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    env = make_env(tmp_path / "data", {"CALEJO_HTTP_PORT": "eighty"})

    result = calejo(["serve"], env)

    assert result.returncode == 2
    assert "CALEJO_HTTP_PORT" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_port_in_use_is_a_clear_error(
    adapter_factory: Callable[..., Any],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    running = adapter_factory()
    env = make_env(tmp_path / "other", {"CALEJO_HTTP_PORT": str(running.port)})

    result = calejo(["serve"], env)

    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"127.0.0.1:{running.port}" in output
    assert "Traceback" not in output


def test_one_adapter_per_data_folder(
    adapter_factory: Callable[..., Any],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
) -> None:
    running = adapter_factory()

    result = calejo(["serve"], make_env(running.data_dir))

    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "another adapter is running" in output
    assert str(running.process.pid) in output


def test_log_files_rotate_under_the_configured_folder(
    adapter_factory: Callable[..., Any], tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    config = (
        f"logging:\n  dir: {logs}\n  max_bytes: 2048\n  backups: 2\n  level: DEBUG\n"
    )

    adapter = adapter_factory(config=config)
    for _ in range(20):
        httpx.get(f"{adapter.api}/health", timeout=10)
    assert adapter.stop(signal.SIGTERM) == 0

    files = sorted(path.name for path in logs.iterdir())
    assert "calejo.log" in files
    assert len(files) <= 3
    text = "".join(path.read_text(encoding="utf-8") for path in logs.iterdir())
    assert "stopped" in text
    assert "password:" not in text


def test_metrics_count_requests_by_route_template(
    adapter_factory: Callable[..., Any], admin_env: dict[str, str]
) -> None:
    adapter = adapter_factory(env=admin_env)
    token = adapter.login("admin", admin_env["CALEJO_ADMIN_PASSWORD"])
    with httpx.Client(headers=_auth(token), timeout=10) as client:
        assert client.put(f"{adapter.api}{SETPOINT}", json={"value": 33}).is_success
        assert client.put(f"{adapter.api}{SETPOINT}", json={"value": 99}).is_success
        client.get(f"{adapter.api}/no/such/path")

        metrics = client.get(f"{adapter.api}/metrics")

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    route = "/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint"
    assert f'route="{route}"' in text
    assert 'calejo_setpoints_total{outcome="accepted"} 1.0' in text
    assert 'calejo_setpoints_total{outcome="clamped"} 1.0' in text
    assert "calejo_failsafe_stations" in text
    assert 'calejo_storage_state{state="ok"} 1.0' in text
    assert "/no/such/path" not in text
