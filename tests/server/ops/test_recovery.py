"""``calejo recovery check|verify`` against a live adapter: a stop that a
restart lost is named, a state saved after the last start is no proof of a
restart, and no backup means not ready (the guide's test runs the ready
and recovered paths on PostgreSQL)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

STOP = "/pump-stations/demo_station/pumps/pump_2/emergency-stop"


def test_a_stop_lost_in_a_restart_is_named(
    adapter_factory: Callable[..., Any],
    admin_env: dict[str, str],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    password = admin_env["CALEJO_ADMIN_PASSWORD"]
    adapter = adapter_factory(env=admin_env)
    env = {**adapter.env, "CALEJO_PASSWORD": password}
    headers = {"Authorization": f"Bearer {adapter.login('admin', password)}"}
    stopped = httpx.post(
        f"{adapter.api}{STOP}",
        json={"reason": "impeller replacement", "operator": "fitter"},
        headers=headers,
        timeout=10,
    )
    assert stopped.status_code == 200, stopped.text

    saved = tmp_path / "state.json"
    checked = calejo(
        ["recovery", "check", "--user", "admin", "--save", str(saved)], env
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "emergency stops latched in the database: 1" in checked.stdout
    assert "pump demo_station/pump_2: since" in checked.stdout
    assert "by fitter: impeller replacement" in checked.stdout
    assert "no full or database backup to restore from" in checked.stdout
    assert "recovery: NOT READY" in checked.stdout
    state = json.loads(saved.read_text())
    assert [s["pump_id"] for s in state["stops"]] == ["pump_2"]

    # The stop is cleared behind the saved state's back, and the adapter
    # restarts: the verification names the stop that is gone.
    cleared = httpx.request(
        "DELETE",
        f"{adapter.api}{STOP}",
        json={"reason": "cleared by mistake"},
        headers=headers,
        timeout=10,
    )
    assert cleared.status_code == 200, cleared.text
    assert adapter.stop(signal.SIGTERM) == 0
    restarted = adapter_factory(env=adapter.env, data_dir=adapter.data_dir)

    verified = calejo(
        ["recovery", "verify", "--user", "admin", "--against", str(saved)], env
    )
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "latched at" in verified.stdout
    assert "but not in the adapter: pump demo_station/pump_2" in verified.stdout
    assert "activate it again" in verified.stdout
    assert "recovery: NOT VERIFIED" in verified.stdout

    # A state saved after the last start proves no restart.
    again = tmp_path / "again.json"
    calejo(["recovery", "check", "--save", str(again)], env)
    unrestarted = calejo(["recovery", "verify", "--against", str(again)], env)
    assert unrestarted.returncode == 1
    assert "it was not restarted" in unrestarted.stdout
    assert restarted.process.poll() is None


def test_a_snapshot_that_is_not_one_is_a_usage_error(
    calejo: Callable[..., subprocess.CompletedProcess[str]],
    make_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    bogus = tmp_path / "state.json"
    bogus.write_text('{"format": 99}')

    result = calejo(
        ["recovery", "verify", "--against", str(bogus), "--wait", "0"],
        make_env(tmp_path / "data"),
    )

    assert result.returncode == 2
    assert "calejo recovery check --save" in result.stderr
    assert "Traceback" not in result.stderr
