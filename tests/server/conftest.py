"""Shared fixtures of the server tests: a real ``calejo serve`` process.

``adapter_factory`` starts ``python -m calejo_server serve`` as a
subprocess on free loopback ports with a temporary data folder, waits
(bounded) until ``/api/v1/health`` answers, and kills whatever is left at
the end of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]
# Variables of the developer's environment that would change what the
# adapter under test does.
_CLEARED = (
    "CALEJO_CONFIG",
    "DATABASE_URL",
    "CALEJO_ADMIN_PASSWORD",
    "CALEJO_DATA_DIR",
    "CALEJO_HTTP_PORT",
    "CALEJO_MODBUS_PORT",
    "CALEJO_OPCUA_PORT",
    "CALEJO_BIND",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def adapter_env(
    data_dir: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of an adapter or ``calejo`` command under test."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env["CALEJO_DATA_DIR"] = str(data_dir)
    env["CALEJO_BIND"] = "127.0.0.1"
    env["CALEJO_HTTP_PORT"] = str(free_port())
    env["CALEJO_MODBUS_PORT"] = str(free_port())
    env["CALEJO_OPCUA_PORT"] = str(free_port())
    env.update(extra or {})
    return env


def run_calejo(
    args: list[str],
    env: Mapping[str, str],
    *,
    stdin: str | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m calejo_server ARGS`` to completion (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "calejo_server", *args],
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


class AdapterProcess:
    """A running ``calejo serve`` and what it printed."""

    def __init__(self, args: list[str], env: dict[str, str], data_dir: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.port = int(env["CALEJO_HTTP_PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.base_url}/api/v1"
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "calejo_server", "serve", *args],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until /api/v1/health answers (any status) and the adapter
        has said it started (every service up, the first-start banner
        printed), or fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(2.0)
                pytest.fail(
                    f"calejo serve exited with {self.process.returncode} while "
                    f"starting:\n{self.output}"
                )
            if "adapter started" in self.output:
                with contextlib.suppress(httpx.TransportError):
                    httpx.get(f"{self.api}/health", timeout=1.0)
                    return
            time.sleep(0.05)
        pytest.fail(f"calejo serve not ready after {timeout} s:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig``, wait for exit (bounded); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            pytest.fail(f"calejo serve did not exit {timeout} s after {sig}")
        self._reader.join(2.0)
        return code

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as a power cut would."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT)
        self._reader.join(2.0)

    def close(self) -> None:
        """Kill the process if it still runs; release its pipe."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self._reader.join(2.0)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def admin_password(self) -> str | None:
        """The generated admin password, if this start printed one."""
        for line in self.lines:
            text = line.strip()
            if text.startswith("password:"):
                return text.split(":", 1)[1].strip()
        return None

    def login(self, username: str, password: str) -> str:
        answer = httpx.post(
            f"{self.api}/auth/login",
            json={"username": username, "password": password},
            timeout=10.0,
        )
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        assert isinstance(token, str)
        return token


AdapterFactory = Callable[..., AdapterProcess]


@pytest.fixture
def adapter_factory(tmp_path: Path) -> Iterator[AdapterFactory]:
    """Start adapters: ``factory(config=None, env=None, data_dir=None)``.

    ``config`` is YAML text written to a file passed with ``--config``;
    ``env`` adds variables; ``data_dir`` reuses a folder (a restart).
    Each call uses new free ports unless ``env`` names them.
    """
    started: list[AdapterProcess] = []

    def start(
        config: str | None = None,
        env: Mapping[str, str] | None = None,
        data_dir: Path | None = None,
        wait: bool = True,
    ) -> AdapterProcess:
        folder = data_dir if data_dir is not None else tmp_path / "data"
        process_env = adapter_env(folder, env)
        args: list[str] = []
        if config is not None:
            config_file = tmp_path / f"calejo-{len(started)}.yaml"
            config_file.write_text(config, encoding="utf-8")
            args = ["--config", str(config_file)]

        adapter = AdapterProcess(args, process_env, folder)
        started.append(adapter)
        if wait:
            adapter.wait_ready()
        return adapter

    yield start

    for adapter in started:
        adapter.close()


@pytest.fixture
def admin_env() -> dict[str, Any]:
    """A known admin password, so a test can log in without parsing output."""
    return {"CALEJO_ADMIN_PASSWORD": "correct-horse-battery-staple"}


@pytest.fixture
def calejo() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m calejo_server ARGS`` (see :func:`run_calejo`)."""
    return run_calejo


@pytest.fixture
def make_env() -> Callable[..., dict[str, str]]:
    """Build an adapter environment (see :func:`adapter_env`)."""
    return adapter_env


@pytest.fixture
def unused_port() -> Callable[[], int]:
    """Pick a free loopback TCP port (see :func:`free_port`)."""
    return free_port


# ---------------------------------------------------------------------------
# A private PostgreSQL server that a test may stop and start (initdb into a
# temporary folder, as the ``postgres`` user when running as root; once per
# session, copied for each test; on a free port with its socket in that
# folder). Without PostgreSQL binaries the tests skip, or fail under CI=true.


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if _under_ci():
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
    pytest.skip(reason)


def _postgres_bin() -> Path | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PrivatePostgres:
    """A PostgreSQL server in a folder of its own, on a port of its own."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.sockets = root / "run"
        self.log = root / "server.log"
        self.port = port
        self.running = False

    def url(self, database: str = "calejo") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _command(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            self._command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip()} {result.stdout.strip()} {log[-2000:]}"
            )

    def initdb(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            "30",
            "stop",
        )
        self.running = False


def _make_owned_dir(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    return root


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[tuple[Path, Path]]:
    """(bin folder, initdb'd data folder) made once per session."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        _skip_or_fail("no PostgreSQL binaries (initdb) found")
        raise AssertionError("unreachable")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _skip_or_fail("running as root and there is no postgres user for initdb")
    root = _make_owned_dir("calejo-pg-template-")
    server = PrivatePostgres(bin_dir, root, free_port())
    try:
        server.initdb()
        yield bin_dir, server.data
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_postgres(postgres_template: tuple[Path, Path]) -> Iterator[PrivatePostgres]:
    """A running private server with an empty ``calejo`` database; removed after."""
    bin_dir, template = postgres_template
    root = _make_owned_dir("calejo-pg-")
    server = PrivatePostgres(bin_dir, root, free_port())
    subprocess.run(
        server._command("cp", "-a", str(template), str(server.data)),
        check=True,
        timeout=60,
    )
    (root / "run").mkdir()
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root / "run", entry.pw_uid, entry.pw_gid)
    try:
        server.start()
        asyncio.run(
            asyncio.wait_for(_create_database(server.url("postgres"), "calejo"), 30)
        )
        yield server
    finally:
        if server.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def _create_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
