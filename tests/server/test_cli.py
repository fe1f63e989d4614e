"""The ``calejo`` command: parsing, exit codes, and each subcommand for real."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from calejo_server import cli

BROKEN_PUMP = """\
stations:
  - station_id: north
    pumps:
      - pump_id: p1
        min_value: 20
        max_value: 50
        max_rate: -1
        failsafe_value: 35
"""


def test_help_lists_every_registered_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])

    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command.name in shown


def test_command_table_names_are_unique() -> None:
    names = [command.name for command in cli.COMMANDS]

    assert len(names) == len(set(names))
    assert {"serve", "users", "audit", "health-check"} <= set(names)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])

    assert exit_info.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


@pytest.mark.parametrize("before", [True, False])
def test_config_error_exits_2_naming_the_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], before: bool
) -> None:
    config = tmp_path / "calejo.yaml"
    config.write_text(BROKEN_PUMP, encoding="utf-8")
    args = ["audit", "verify"]
    args = (
        ["--config", str(config), *args] if before else [*args, "--config", str(config)]
    )

    code = cli.main(args)

    err = capsys.readouterr().err
    assert code == 2
    assert "stations[0].pumps[0].max_rate" in err
    assert str(config) in err
    assert "Traceback" not in err


def test_missing_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.yaml"

    code = cli.main(["serve", "--config", str(missing)])

    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_logging_section_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "calejo.yaml"
    config.write_text("logging:\n  level: LOUD\n", encoding="utf-8")

    code = cli.main(["serve", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert "logging.level" in err
    assert "LOUD" in err


def test_bad_since_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "export", "--since", "yesterday"])

    assert exit_info.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err


def test_export_into_a_closed_pipe_stops_quietly(
    tmp_path: Path,
    make_env: Callable[..., dict[str, str]],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    env = make_env(tmp_path / "data")
    added = calejo(
        ["users", "add", "olga", "--role", "viewer", "--email", "o@example.org"],
        env,
    )
    assert added.returncode == 0, added.stderr

    for fmt in ("csv", "json"):
        # As `calejo audit export | head -0`: the reader is gone before the
        # first row is written.
        process = subprocess.Popen(
            [sys.executable, "-m", "calejo_server", "audit", "export", "--format", fmt],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        try:
            error = process.stderr.read().decode()
            returncode = process.wait(timeout=60)
        finally:
            process.kill()
            process.stderr.close()
        assert returncode == 1, error
        assert error == ""

    whole = calejo(["audit", "export", "--format", "json"], env)
    assert whole.returncode == 0, whole.stderr
    assert [row["event_type"] for row in json.loads(whole.stdout)][-1] == (
        "USER_CREATED"
    )


def test_health_check_unreachable_exits_2(
    capsys: pytest.CaptureFixture[str], unused_port: Callable[[], int]
) -> None:
    code = cli.main(["health-check", "--url", f"http://127.0.0.1:{unused_port()}"])

    assert code == 2
    assert "down" in capsys.readouterr().out


def test_users_audit_and_health_check_against_a_real_adapter(
    tmp_path: Path,
    adapter_factory: Callable[..., Any],
    admin_env: dict[str, str],
    make_env: Callable[..., dict[str, str]],
    calejo: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    data = tmp_path / "data"
    env = make_env(data, admin_env)
    run_calejo = calejo

    # Users are managed offline, in the storage, before the adapter runs.
    added = run_calejo(
        [
            "users",
            "add",
            "olivia",
            "--role",
            "operator",
            "--email",
            "o@example.org",
            "--password-stdin",
        ],
        env,
        stdin="operator-password-42\n",
    )
    assert added.returncode == 0, added.stderr
    generated = run_calejo(
        ["users", "add", "victor", "--role", "viewer", "--email", "v@example.org"],
        env,
    )
    assert generated.returncode == 0, generated.stderr
    assert "password" in generated.stdout.lower()

    duplicate = run_calejo(
        [
            "users",
            "add",
            "olivia",
            "--role",
            "viewer",
            "--email",
            "x@example.org",
            "--password-stdin",
        ],
        env,
        stdin="another-password-42\n",
    )
    assert duplicate.returncode == 1
    assert "olivia" in duplicate.stderr

    weak = run_calejo(
        [
            "users",
            "add",
            "walter",
            "--role",
            "viewer",
            "--email",
            "w@example.org",
            "--password-stdin",
        ],
        env,
        stdin="short\n",
    )
    assert weak.returncode == 1
    assert "password" in weak.stderr

    bad_role = run_calejo(
        ["users", "add", "rita", "--role", "wizard", "--email", "r@example.org"],
        env,
    )
    assert bad_role.returncode == 1
    assert "wizard" in bad_role.stderr

    listed = run_calejo(["users", "list"], env)
    assert listed.returncode == 0, listed.stderr
    assert "olivia" in listed.stdout
    assert "operator" in listed.stdout
    assert "victor" in listed.stdout

    # The adapter sees them; the operator can log in and write.
    adapter = adapter_factory(env=env, data_dir=data)
    token = adapter.login("olivia", "operator-password-42")
    answer = httpx.put(
        f"{adapter.api}/pump-stations/demo_station/pumps/pump_1/setpoint",
        json={"value": 41.0},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10.0,
    )
    assert answer.status_code == 200, answer.text

    # While it runs, offline user changes are refused: it holds the data.
    refused = run_calejo(["users", "deactivate", "olivia"], env)
    assert refused.returncode == 1
    assert "running" in refused.stderr

    # health-check against the running adapter.
    health = run_calejo(["health-check", "--url", adapter.base_url], env)
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.splitlines()[0] == "adapter: ok"
    assert any(line.startswith("storage:") for line in health.stdout.splitlines())
    from_config = run_calejo(["health-check"], env)
    assert from_config.returncode == 0, from_config.stdout + from_config.stderr

    # The audit log can be read and verified while the adapter runs.
    exported = run_calejo(["audit", "export", "--format", "json"], env)
    assert exported.returncode == 0, exported.stderr
    rows = json.loads(exported.stdout)
    events = [row["event_type"] for row in rows]
    assert "USER_CREATED" in events
    assert "SETPOINT_CHANGED" in events

    assert adapter.stop(signal.SIGTERM) == 0

    # Offline again: deactivate, reset a password, verify, export to a file.
    assert run_calejo(["users", "deactivate", "olivia"], env).returncode == 0
    missing = run_calejo(["users", "deactivate", "nobody"], env)
    assert missing.returncode == 1
    assert "nobody" in missing.stderr

    reset = run_calejo(["users", "reset-password", "victor"], env)
    assert reset.returncode == 0, reset.stderr
    assert "password" in reset.stdout.lower()

    verified = run_calejo(["audit", "verify"], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact" in verified.stdout

    out = tmp_path / "audit.csv"
    to_file = run_calejo(
        [
            "audit",
            "export",
            "--format",
            "csv",
            "--output",
            str(out),
            "--since",
            "2000-01-01T00:00:00Z",
        ],
        env,
    )
    assert to_file.returncode == 0, to_file.stderr
    text = out.read_text(encoding="utf-8")
    assert "USER_DEACTIVATED" in text
    assert "PASSWORD_CHANGED" in text or "USER_UPDATED" in text

    future = run_calejo(
        ["audit", "export", "--format", "json", "--since", "2999-01-01T00:00:00"],
        env,
    )
    assert future.returncode == 0, future.stderr
    assert json.loads(future.stdout) == []

    # A deactivated user cannot log in any more.
    again = adapter_factory(env=env, data_dir=data)
    denied = httpx.post(
        f"{again.api}/auth/login",
        json={"username": "olivia", "password": "operator-password-42"},
        timeout=10.0,
    )
    assert denied.status_code == 401
    assert again.stop(signal.SIGTERM) == 0
