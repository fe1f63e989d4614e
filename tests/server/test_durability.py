"""Acknowledged means durable: crashes and database outages lose nothing.

Each test drives a real ``calejo serve`` process with several concurrent
clients, breaks something underneath it (SIGKILL, a PostgreSQL outage),
and then checks every acknowledged change against the audit log.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

STATION = "demo_station"
STREAM_SECONDS = 1.5
SETPOINT_CLIENTS = 4


@dataclasses.dataclass
class Acknowledged:
    """What the clients were told was done, and what was still in flight."""

    setpoints: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    stops: list[bool] = dataclasses.field(default_factory=list)
    stop_in_flight: bool | None = None
    errors: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _setpoint_client(
    api: str, token: str, number: int, done: threading.Event, acked: Acknowledged
) -> None:
    pump = f"pump_{number % 2 + 1}"
    url = f"{api}/pump-stations/{STATION}/pumps/{pump}/setpoint"
    with httpx.Client(headers=_auth(token), timeout=5) as client:
        for step in range(1000):
            if done.is_set():
                return
            value = round(20.0 + number * 7 + step * 0.01, 2)
            try:
                answer = client.put(url, json={"value": value})
            except httpx.TransportError:
                return
            if answer.status_code != 200:
                with acked.lock:
                    acked.errors.append(f"{answer.status_code} {answer.text}")
                return
            with acked.lock:
                acked.setpoints.append((pump, value))


def _stop_client(
    api: str, token: str, done: threading.Event, acked: Acknowledged
) -> None:
    url = f"{api}/pump-stations/{STATION}/emergency-stop"
    with httpx.Client(headers=_auth(token), timeout=5) as client:
        for step in range(1000):
            if done.is_set():
                return
            activate = step % 2 == 0
            body = {"reason": f"drill {step}", "operator": "durability test"}
            acked.stop_in_flight = activate
            try:
                if activate:
                    answer = client.post(url, json=body)
                else:
                    answer = client.request("DELETE", url, json=body)
            except httpx.TransportError:
                return
            if answer.status_code != 200:
                with acked.lock:
                    acked.errors.append(f"{answer.status_code} {answer.text}")
                return
            with acked.lock:
                acked.stops.append(activate)
                acked.stop_in_flight = None


def _stream(
    api: str, token: str, acked: Acknowledged
) -> tuple[threading.Event, list[threading.Thread]]:
    done = threading.Event()
    threads = [
        threading.Thread(target=_setpoint_client, args=(api, token, n, done, acked))
        for n in range(SETPOINT_CLIENTS)
    ]
    threads.append(
        threading.Thread(target=_stop_client, args=(api, token, done, acked))
    )
    for thread in threads:
        thread.start()
    return done, threads


def _join(done: threading.Event, threads: list[threading.Thread]) -> None:
    done.set()
    for thread in threads:
        thread.join(15)
        assert not thread.is_alive()


def _export(calejo: Callable[..., Any], env: dict[str, str]) -> list[dict[str, Any]]:
    result = calejo(["audit", "export", "--format", "json"], env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def _number(text: object) -> float | None:
    try:
        return round(float(str(text)), 2)
    except ValueError:
        return None


def _check_audit(
    rows: list[dict[str, Any]], acked: Acknowledged, *, exact: bool = False
) -> None:
    setpoint_rows: dict[tuple[str, float | None], int] = {}
    for row in rows:
        if str(row["event_type"]).startswith("SETPOINT_"):
            key = (row["pump_id"], _number(row["new_value"]))
            setpoint_rows[key] = setpoint_rows.get(key, 0) + 1

    missing = [
        item for item in acked.setpoints if (item[0], item[1]) not in setpoint_rows
    ]
    assert not missing, f"acknowledged setpoints missing from the audit: {missing[:5]}"
    if exact:
        doubled = [item for item in acked.setpoints if setpoint_rows[item] != 1]
        assert not doubled, f"setpoints audited more than once: {doubled[:5]}"

    uids = [row["uid"] for row in rows]
    assert len(uids) == len(set(uids)), "an audit record was stored twice"

    activated = sum(
        1 for row in rows if row["event_type"] == "EMERGENCY_STOP_ACTIVATED"
    )
    cleared = sum(1 for row in rows if row["event_type"] == "EMERGENCY_STOP_CLEARED")
    assert activated >= acked.stops.count(True)
    assert cleared >= acked.stops.count(False)
    if exact:
        assert activated == acked.stops.count(True)
        assert cleared == acked.stops.count(False)


def _expected_stop_states(acked: Acknowledged) -> set[bool]:
    states = {acked.stops[-1] if acked.stops else False}
    if acked.stop_in_flight is not None:
        states.add(acked.stop_in_flight)
    return states


def test_sigkill_during_writes_loses_no_acknowledged_change(
    adapter_factory: Callable[..., Any],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    admin_env: dict[str, str],
    make_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = make_env(data, admin_env)
    adapter = adapter_factory(env=env, data_dir=data)
    token = adapter.login("admin", admin_env["CALEJO_ADMIN_PASSWORD"])
    acked = Acknowledged()

    done, threads = _stream(adapter.api, token, acked)
    time.sleep(STREAM_SECONDS)
    adapter.kill()
    _join(done, threads)

    assert not acked.errors, acked.errors
    assert len(acked.setpoints) > 20
    assert len(acked.stops) > 2

    restarted = adapter_factory(env=env, data_dir=data)
    token = restarted.login("admin", admin_env["CALEJO_ADMIN_PASSWORD"])
    status = httpx.get(
        f"{restarted.api}/pump-stations/{STATION}/emergency-stop-status",
        headers=_auth(token),
        timeout=10,
    )
    assert status.status_code == 200, status.text
    assert status.json()["active"] in _expected_stop_states(acked)
    assert restarted.stop(signal.SIGTERM) == 0

    _check_audit(_export(calejo, env), acked)
    verified = calejo(["audit", "verify"], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _health(api: str) -> str:
    try:
        answer = httpx.get(f"{api}/health", timeout=5)
    except httpx.TransportError:
        return "unreachable"
    return str(answer.json().get("status"))


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_postgresql_outage_spools_and_delivers_exactly_once(
    adapter_factory: Callable[..., Any],
    private_postgres: Any,
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    admin_env: dict[str, str],
    make_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = make_env(data, {**admin_env, "DATABASE_URL": private_postgres.url()})
    adapter = adapter_factory(env=env, data_dir=data)
    token = adapter.login("admin", admin_env["CALEJO_ADMIN_PASSWORD"])
    assert _health(adapter.api) == "ok"
    acked = Acknowledged()

    done, threads = _stream(adapter.api, token, acked)
    try:
        _wait_for(lambda: len(acked.setpoints) > 20, 20, "writes before the outage")
        private_postgres.stop("immediate")

        # The adapter keeps answering, says it is degraded, and still gates.
        _wait_for(lambda: _health(adapter.api) == "degraded", 20, "degraded")
        during = len(acked.setpoints)
        _wait_for(
            lambda: len(acked.setpoints) > during + 20, 20, "writes in the outage"
        )
        check = calejo(["health-check", "--url", adapter.base_url], env)
        assert check.returncode == 1, check.stdout + check.stderr
        assert "degraded" in check.stdout
        gated = httpx.put(
            f"{adapter.api}/pump-stations/{STATION}/pumps/pump_3/setpoint",
            json={"value": 99.0},
            headers=_auth(token),
            timeout=10,
        )
        assert gated.status_code == 200, gated.text
        assert gated.json()["target"] == 50.0
        assert gated.json()["outcome"] in ("clamped", "blocked")

        private_postgres.start()
        _wait_for(lambda: _health(adapter.api) == "ok", 40, "recovered")
        after = len(acked.setpoints)
        _wait_for(lambda: len(acked.setpoints) > after + 20, 20, "writes after")
    finally:
        _join(done, threads)

    assert not acked.errors, acked.errors
    healthy = calejo(["health-check", "--url", adapter.base_url], env)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert adapter.stop(signal.SIGTERM) == 0

    rows = _export(calejo, env)
    _check_audit(rows, acked, exact=True)
    verified = calejo(["audit", "verify"], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
