"""``calejo opcua browse|read`` against a live OPC UA server.

The server (real engine, security and OPC UA server) runs on the harness
loop; the command runs as ``calejo`` would run it, through
:func:`calejo_server.cli.main`, in a worker thread meanwhile, so the two
talk over loopback. The real ``calejo`` process is run against a real
``calejo serve`` in test_opcua_process.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from calejo_server import cli

STATION = "PumpStations/north"


@pytest.fixture(scope="module")
def adapter(opcua_harness: Any) -> Any:
    return opcua_harness.start(name="cli")


@pytest.fixture(autouse=True)
def asyncua_logging() -> Iterator[None]:
    """The command quiets asyncua's logger; give the next test it back."""
    logger = logging.getLogger("asyncua")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def calejo(
    opcua_harness: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Any:
    """Run ``calejo ARGS``; (exit code, standard output, standard error)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CALEJO_OPCUA_PASSWORD", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = opcua_harness.run(asyncio.to_thread(cli.main, list(args)), 60.0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def secure(opcua_harness: Any, user: str = "oper") -> list[str]:
    trusted = opcua_harness.trusted
    return [
        "--user",
        user,
        "--password",
        opcua_harness.users[user][1],
        "--cert",
        str(trusted.cert),
        "--key",
        str(trusted.key),
    ]


def test_browse_lists_children_with_their_values(
    opcua_harness: Any, adapter: Any, calejo: Any
) -> None:
    options = secure(opcua_harness)

    code, out, err = calejo("opcua", "browse", adapter.url, *options)
    assert code == 0, err
    assert "2:PumpStations" in out and "ns=2;s=PumpStations" in out
    assert "0:Server" in out

    code, out, err = calejo("opcua", "browse", adapter.url, STATION, *options)
    assert code == 0, err
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert set(lines) >= {
        "2:EmergencyStop",
        "2:Failsafe",
        "2:PlanStale",
        "2:Status",
        "2:Pumps",
        "2:ActivateEmergencyStop",
        "2:ClearEmergencyStop",
    }
    assert lines["2:EmergencyStop"].startswith("Variable")
    assert lines["2:EmergencyStop"].endswith("= False")
    assert lines["2:Pumps"].startswith("Object")

    code, out, err = calejo(
        "opcua", "browse", adapter.url, f"{STATION}/Pumps/p2", "--json", *options
    )
    assert code == 0, err
    rows = {row["browse_name"]: row for row in json.loads(out)}
    assert rows["2:MaxRate"]["value"] == 2.0
    assert rows["2:MaxRate"]["type"] == "Double"
    assert rows["2:SetpointAge"]["status"] == "BadWaitingForInitialData"
    assert rows["2:PlanId"] == {
        "browse_name": "2:PlanId",
        "node_class": "Variable",
        "node_id": f"ns=2;s={STATION}/Pumps/p2/PlanId",
        "value": "",
        "type": "String",
        "status": "Good",
        "source_timestamp": rows["2:PlanId"]["source_timestamp"],
    }


def test_read_by_path_and_by_node_id(
    opcua_harness: Any, adapter: Any, calejo: Any
) -> None:
    options = secure(opcua_harness, "watcher")
    applied = adapter.engine.pump("north", "p1").applied

    code, out, err = calejo(
        "opcua", "read", adapter.url, f"{STATION}/Pumps/p1/Setpoint", *options
    )
    assert code == 0, err
    assert out.startswith(f"ns=2;s={STATION}/Pumps/p1/Setpoint = {applied} (Double, ")

    code, out, err = calejo(
        "opcua",
        "read",
        adapter.url,
        "ns=2;s=System/Heartbeat",
        "--json",
        "--policy",
        "Aes256_Sha256_RsaPss",
        "--mode",
        "Sign",
        *options,
    )
    assert code == 0, err
    value = json.loads(out)
    assert (value["type"], value["status"]) == ("UInt32", "Good")
    assert value["value"] >= 0

    code, out, err = calejo(
        "opcua", "read", adapter.url, "0:Server/0:ServerStatus/0:State", *options
    )
    assert code == 0, err
    assert out.startswith("i=2259 = 0 (Int32, Good")


def test_a_generated_certificate_works_once_trusted(
    opcua_harness: Any, adapter: Any, calejo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALEJO_OPCUA_PASSWORD", opcua_harness.users["oper"][1])
    args = ("opcua", "read", adapter.url, f"{STATION}/Failsafe", "--user", "oper")

    code, out, err = calejo(*args)
    made = Path(err.split("made a client certificate ", 1)[1].split(" ", 1)[0])
    assert code == 1, out
    assert made.is_file() and made.parent.name == "opcua-client"
    assert f"does not trust the client certificate {made}" in err
    assert "trusted folder" in err

    shutil.copy(made, adapter.server.options.trust_dir / "cli-client.pem")
    try:
        code, out, err = calejo(*args)
        assert code == 0, err
        assert "made a client certificate" not in err
        assert out.startswith(f"ns=2;s={STATION}/Failsafe = ")
    finally:
        (adapter.server.options.trust_dir / "cli-client.pem").unlink()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_refusals_and_failures_are_one_clear_line(
    opcua_harness: Any,
    adapter: Any,
    calejo: Any,
    silent_port: int,
    closed_port: int,
) -> None:
    url = adapter.url
    trusted = opcua_harness.trusted
    cert = ["--cert", str(trusted.cert), "--key", str(trusted.key)]
    node = f"{STATION}/Failsafe"
    cases = [
        (
            [url, node, "--user", "oper", "--password", "not-it", *cert],
            f"{url} refused the login of 'oper' (BadUserAccessDenied)",
        ),
        ([url, node, *cert], f"{url} refused an anonymous session"),
        (
            [url, f"{STATION}/Nowhere", *secure(opcua_harness)],
            f"{url} has no node '{STATION}/Nowhere' (BadNoMatch)",
        ),
        (
            [url, node, "--policy", "None", "--user", "oper", "--password", "x"],
            f"{url} refuses sessions without security (BadSecurityPolicyRejected)",
        ),
        (
            [f"opc.tcp://127.0.0.1:{closed_port}", node, *cert],
            "connection refused",
        ),
        (
            [f"opc.tcp://127.0.0.1:{silent_port}", node, "--timeout", "1", *cert],
            f"no answer from opc.tcp://127.0.0.1:{silent_port} within 1 s",
        ),
    ]
    for arguments, expected in cases:
        code, out, err = calejo("opcua", "read", *arguments)
        assert code == 1, (arguments, out, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("calejo: ") and expected in lines[0], err


def test_usage_errors_exit_2(opcua_harness: Any, adapter: Any, calejo: Any) -> None:
    trusted = opcua_harness.trusted
    code, _, err = calejo(
        "opcua", "read", adapter.url, "x", "--cert", str(trusted.cert)
    )
    assert code == 2
    assert "--cert and --key go together" in err

    code, _, err = calejo("opcua", "read", adapter.url, "x", "--user", "oper")
    assert code == 2
    assert "expected --password or $CALEJO_OPCUA_PASSWORD" in err

    code, _, err = calejo("opcua", "read", adapter.url, "x", "--timeout", "0")
    assert code == 2
    assert "--timeout: expected 0 to 3600 seconds, got 0.0" in err
