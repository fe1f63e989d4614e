"""``calejo modbus-map`` and ``calejo modbus read``."""

from __future__ import annotations

import csv
import io
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from calejo_core import codecs
from calejo_server.cli import main

from .modbus_support import ModbusStack, write_config

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "modbus.md"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModbusStack]:
    stack = ModbusStack(tmp_path_factory.mktemp("modbus-cli"))
    try:
        yield stack
    finally:
        stack.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_map_csv_lists_every_row_of_every_station(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)

    code, out, _ = run(capsys, "modbus-map", "--format", "csv", "--config", str(config))

    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = len(codecs.register_map(2)) + len(codecs.register_map(1, "CDAB"))
    assert len(rows) == expected
    by_name = {(r["unit_id"], r["name"]): r for r in rows}
    p2_rate = by_name[("1", "pump1.max_rate_x10")]
    assert (p2_rate["address"], p2_rate["number"], p2_rate["pump_id"]) == (
        "117",
        "40118",
        "p2",
    )
    assert (p2_rate["scale"], p2_rate["units"], p2_rate["access"]) == (
        "10",
        "rpm/s",
        "read",
    )
    south_float = by_name[("5", "pump0.applied")]
    assert (south_float["type"], south_float["count"]) == ("float32 CDAB", "2")
    assert south_float["station_id"] == "south"
    speed = by_name[("1", "pump1.speed_x10")]
    assert (speed["units"], speed["access"]) == ("rpm", "read/write")
    coil = by_name[("5", "station_emergency_stop")]
    assert (coil["address"], coil["number"], coil["type"]) == ("1", "00002", "coil")
    assert by_name[("1", "station_level")]["units"] == "cm"


def test_map_markdown_of_the_demonstration_station_is_the_documented_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CALEJO_CONFIG", raising=False)

    code, out, _ = run(capsys, "modbus-map")

    assert code == 0
    doc = DOC.read_text(encoding="utf-8")
    found = re.search(
        r"<!-- calejo modbus-map: begin -->\n(.*)<!-- calejo modbus-map: end -->",
        doc,
        re.DOTALL,
    )
    assert found is not None, "docs/modbus.md lost its map markers"
    assert found.group(1) == out
    assert out.startswith("### Unit 1: station demo_station (3 pumps, float32 ABCD)")
    assert out.count("\n| ") == len(codecs.register_map(3)) + 2  # header, rule


def test_read_prints_address_value_and_name(live: ModbusStack, tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "calejo_server",
            "modbus",
            "read",
            "127.0.0.1",
            str(live.port),
            "2",
            "1",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "    2      2  pump_count\n"


def test_read_registers_and_coils_in_process(
    live: ModbusStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path))
    port = str(live.port)

    code, out, _ = run(
        capsys, "modbus", "read", "127.0.0.1", port, "100", "4", "--config", config
    )
    assert code == 0
    lines = out.splitlines()
    applied = live.engine.pump("north", "p1").applied
    assert lines[0] == f"  100  {round(applied * 10):>5}  pump0.applied_x10 (p1) = " + (
        f"{applied:g} Hz"
    )
    assert lines[1].endswith("pump0.applied (p1) word 1 of 2")
    assert lines[2].endswith("pump0.applied (p1) word 2 of 2")
    assert lines[3].endswith("pump0.status (p1)")

    code, out, _ = run(
        capsys, "modbus", "read", "127.0.0.1", port, "0", "2", "--unit", "5",
        "--coils", "--config", config,
    )  # fmt: skip
    assert code == 0
    assert out.splitlines() == [
        "    0      0  system_emergency_stop",
        "    1      0  station_emergency_stop",
    ]


def test_read_errors_exit_1_saying_why(
    live: ModbusStack, capsys: pytest.CaptureFixture[str]
) -> None:
    port = str(live.port)

    code, _, err = run(
        capsys, "modbus", "read", "127.0.0.1", port, "0", "1", "--unit", "9"
    )
    assert code == 1
    assert f"127.0.0.1:{port} unit 9 answered exception 0B" in err
    assert "registers 0..0" in err

    code, _, err = run(capsys, "modbus", "read", "127.0.0.1", port, "5000", "3")
    assert code == 1
    assert "exception 02 (illegal data address) for registers 5000..5002" in err

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free = str(closed.getsockname()[1])
    code, _, err = run(capsys, "modbus", "read", "127.0.0.1", free, "0", "1")
    assert code == 1
    assert f"cannot connect to 127.0.0.1:{free}" in err

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        quiet = str(silent.getsockname()[1])
        code, _, err = run(
            capsys, "modbus", "read", "127.0.0.1", quiet, "0", "1", "--timeout", "0.3"
        )
    assert code == 1
    assert (
        f"no answer from 127.0.0.1:{quiet} unit 1 for registers 0..0 within 0.3 s"
        in (err)
    )

    code, _, err = run(capsys, "modbus", "read", "127.0.0.1", port, "0", "126")
    assert code == 2
    assert "expected 1 to 125 registers per read, got 126" in err


def test_read_arguments_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["modbus", "read", "127.0.0.1", "70000", "0", "1"])

    assert caught.value.code == 2
    assert "expected a port from 1 to 65535, got 70000" in capsys.readouterr().err
