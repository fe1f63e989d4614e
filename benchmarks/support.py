"""What the benchmark suites share: ports, processes, CPU time, percentiles."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for the process either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the adapter's OPC UA worker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def adapter_env(
    data_dir: Path,
    *,
    admin_password: str,
    http: int | None = None,
    modbus: int | None = None,
    opcua: int | None = None,
) -> dict[str, str]:
    """The environment of a ``calejo serve`` on loopback: this one without
    any CALEJO_ setting or DATABASE_URL of its own, plus the given ports
    (a free one for each port not given)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CALEJO_") and k != "DATABASE_URL"
    }
    env.update(
        PYTHONPATH=str(REPO),
        CALEJO_DATA_DIR=str(data_dir),
        CALEJO_BIND="127.0.0.1",
        CALEJO_HTTP_PORT=str(http or free_port()),
        CALEJO_MODBUS_PORT=str(modbus or free_port()),
        CALEJO_OPCUA_PORT=str(opcua or free_port()),
        CALEJO_ADMIN_PASSWORD=admin_password,
    )
    return env


def start_adapter(
    config: Path,
    env: dict[str, str],
    wrapper: Sequence[str] = (),
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """``calejo serve --config config`` in the repository, its output
    discarded; ``wrapper``: a command to run it under (valgrind, say);
    ``preexec``: run in the child before it starts (to pin its CPU, say)."""
    command = [sys.executable, "-m", "calejo_server", "serve", "--config", str(config)]
    return subprocess.Popen(
        [*wrapper, *command],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec,
    )


def admin_token(http: int, password: str, timeout: float) -> str:
    """Log in as ``admin`` on the adapter at port ``http``: the bearer token."""
    answer = httpx.post(
        f"http://127.0.0.1:{http}/api/v1/auth/login",
        json={"username": "admin", "password": password},
        timeout=timeout,
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def wait_http(
    url: str, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT
) -> None:
    """Wait until ``url`` answers (any status), or fail the benchmark."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} while starting")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=1.0)
            return
        time.sleep(0.05)
    pytest.fail(f"server not ready after {timeout} s")
