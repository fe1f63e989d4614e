"""docs/OPERATIONS_MAINTENANCE.md, run as written against a live adapter.

One adapter for the module, set up as the guide describes a site: a
configuration file and an environment file under a temporary ``/etc``,
PostgreSQL (a database of its own on the shared server, dropped at the
end), HTTPS, OPC UA with SignAndEncrypt only, a Modbus allow-list, a
webhook alert channel (answered by a small receiver here), scheduled
backups, a log folder.

The guide's conventions, which these tests hold it to:

- Every ```sh block runs, in the order of the guide, one command (a line,
  or lines joined by a trailing backslash) at a time in bash with
  ``pipefail``; variables and the working folder carry over from one
  command to the next. A block runs not when the line before its fence
  (blank lines between allowed) is ``<!-- not run: <reason> -->``.
- A command exits 0 unless its trailing comment ends in ``(exit N)``.
- ``sudo systemctl start|stop|restart calejo-control-adapter`` stops and
  starts the adapter of the test; ``sudo -E COMMAND`` runs COMMAND as the
  test's user, who owns the test's files; any other ``sudo``,
  ``systemctl``, ``journalctl`` or ``docker`` needs the not-run marker.
- Every ```sql block runs with psql against the adapter's database in
  read-only transactions.
- The paths and ports of a production host (``/etc/calejo``,
  ``/var/lib/calejo``, ``/var/backup/calejo``, ``/var/log/calejo``,
  ``/opt/calejo``, ports 8080, 502, 4840) are rewritten to the test's.
- Every ```yaml block whose top-level keys are sections of the adapter's
  configuration loads as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from calejo_server import cli
from calejo_server.alerts.settings import parse_alerts_config
from calejo_server.api.routes import all_endpoints
from calejo_server.config import load_config
from calejo_server.logs import parse_logging
from calejo_server.ops.backup import parse_backup_settings
from calejo_server.protocols.opcua import parse_opcua_config
from calejo_server.tls import parse_tls
from tests.server.conftest import AdapterProcess, free_port
from tests.server.storage.conftest import postgres_server

__all__ = ["postgres_server"]

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "OPERATIONS_MAINTENANCE.md"
SCRIPTS = REPO / "scripts"
SERVICE = "calejo-control-adapter"
ADMIN_PASSWORD = "correct-horse-battery-staple"
WEBHOOK_SECRET = "a-webhook-secret-of-some-length"
COMMAND_TIMEOUT = 120.0
READY_TIMEOUT = 60.0

FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>[^>]+?) -->$")
EXPECTED_EXIT = re.compile(r"#.*\(exit (?P<code>\d+)\)\s*$")
CONTROL = re.compile(
    rf"^(?:sudo\s+)?systemctl\s+(?P<action>start|stop|restart)\s+{SERVICE}\s*$"
)
AS_ADMINISTRATOR = re.compile(r"^sudo -E (?=\S)")
NEEDS_MARKER = re.compile(r"^\s*(?:sudo|systemctl|journalctl|docker)\b")
CONFIG_SECTIONS = frozenset(
    {
        "server",
        "database",
        "engine",
        "security",
        "stations",
        "modbus",
        "alerts",
        "backup",
        "opcua",
        "logging",
        "certificates",
        "tls",
    }
)


# -- the guide, parsed ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced block: where it starts, its language, its text, whether it runs."""

    line: int
    language: str
    text: str
    run: bool


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a shell block, the line it starts on, its exit status."""

    line: int
    text: str
    expected: int


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue

        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        if index >= len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: the block is not closed")
        index += 1

        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = NOT_RUN.match(lines[before].strip()) if before >= 0 else None
        found.append(
            Block(start + 1, opening["language"], "\n".join(body), marker is None)
        )
    return found


def parse_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    pending: list[str] = []
    first = 0
    for offset, raw in enumerate(block.text.splitlines(), start=1):
        if not pending:
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            first = block.line + offset
        if raw.endswith("\\"):
            pending.append(raw)
            continue
        pending.append(raw)
        text = "\n".join(pending)
        pending = []
        expected = EXPECTED_EXIT.search(text.splitlines()[-1])
        commands.append(Command(first, text, int(expected["code"]) if expected else 0))
    assert not pending, f"guide line {first}: a command ends in a backslash"
    return commands


def guide_blocks() -> list[Block]:
    return parse_blocks(GUIDE)


# -- the site -----------------------------------------------------------------------


class WebhookReceiver:
    """Answers every POST with 204 and keeps the bodies."""

    def __init__(self) -> None:
        received: list[bytes] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append(self.rfile.read(length))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@dataclasses.dataclass
class Site:
    """The adapter of the test, its files and how to reach it."""

    root: Path
    config: Path
    env_file: Path
    data: Path
    backups: Path
    logs: Path
    database_url: str
    http_port: int
    modbus_port: int
    opcua_port: int
    adapter_env: dict[str, str]
    shell_env: dict[str, str]
    adapter: AdapterProcess | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        if self.adapter is not None and self.adapter.process.poll() is None:
            return
        if self.adapter is not None:
            self.adapter.close()
        self.adapter = AdapterProcess([], dict(self.adapter_env), self.data)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.adapter.process.poll() is not None:
                pytest.fail(
                    f"the adapter exited while starting:\n{self.adapter.output}"
                )
            with contextlib.suppress(httpx.TransportError):
                answer = httpx.get(f"{self.url}/api/v1/health", verify=False, timeout=2)
                if answer.status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"the adapter did not answer within {READY_TIMEOUT} s")

    def stop(self) -> None:
        if self.adapter is None or self.adapter.process.poll() is not None:
            return
        code = self.adapter.stop(signal.SIGTERM)
        assert code == 0, f"the adapter exited with {code}:\n{self.adapter.output}"

    def wait_for_scheduled_backups(self) -> None:
        """The three archives the schedule writes at start, verified."""
        patterns = ("calejo-full-*.tar.gz", "database/*.tar.gz", "config/*.tar.gz")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if all(any(self.backups.glob(p)) for p in patterns):
                state = httpx.get(
                    f"{self.url}/api/v1/health/detailed", verify=False, timeout=5
                ).json()["components"]["backup"]["state"]
                if state == "ok":
                    return
            time.sleep(0.2)
        pytest.fail(f"no scheduled backups in {self.backups} within {READY_TIMEOUT} s")

    def rewrite(self, text: str) -> str:
        """The production paths and ports of the guide as this site's."""
        paths = {
            "/opt/calejo": str(REPO),
            "/etc/calejo/calejo.yaml": str(self.config),
            "/etc/calejo/calejo.env": str(self.env_file),
            "/var/lib/calejo": str(self.data),
            "/var/backup/calejo": str(self.backups),
            "/var/log/calejo": str(self.logs),
        }
        for old in sorted(paths, key=len, reverse=True):
            text = text.replace(old, paths[old])
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{self.http_port}")
        text = text.replace("127.0.0.1:4840", f"127.0.0.1:{self.opcua_port}")
        text = re.sub(r"127\.0\.0\.1 502\b", f"127.0.0.1 {self.modbus_port}", text)
        return re.sub(r"--modbus-port 502\b", f"--modbus-port {self.modbus_port}", text)


def site_config(root: Path, ports: dict[str, int], webhook: int) -> str:
    document = {
        "server": {
            "bind": "127.0.0.1",
            "http_port": ports["http"],
            "modbus_port": ports["modbus"],
            "opcua_port": ports["opcua"],
            "data_dir": str(root / "lib"),
        },
        "security": {"admin_password": "${CALEJO_ADMIN_PASSWORD}"},
        "tls": {"enabled": True},
        "opcua": {"security_modes": ["SignAndEncrypt"]},
        "modbus": {"allowed_clients": ["127.0.0.1"]},
        "alerts": {
            "webhook": {
                "enabled": True,
                "url": f"http://127.0.0.1:{webhook}/hooks/calejo",
                "secret": "${CALEJO_WEBHOOK_SECRET}",
            }
        },
        "backup": {"folder": str(root / "backup"), "start_delay": 0},
        "logging": {"folder": str(root / "log")},
        "stations": [
            {
                "station_id": "north",
                "name": "North pump station",
                "pumps": [_pump("pump_1"), _pump("pump_2")],
            },
            {
                "station_id": "south",
                "name": "South pump station",
                "pumps": [_pump("pump_1"), _pump("pump_2"), _pump("pump_3")],
            },
        ],
    }
    return yaml.safe_dump(document, sort_keys=False)


def _pump(pump_id: str) -> dict[str, Any]:
    return {
        "pump_id": pump_id,
        "min_value": 20,
        "max_value": 50,
        "max_rate": 0.5,
        "failsafe_value": 35,
    }


def _cleared_environment() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CALEJO_", "PG"))
        and key not in ("DATABASE_URL", "BASH_ENV", "ENV")
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "/usr/bin:/bin")])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _require(program: str) -> None:
    if shutil.which(program) is not None:
        return
    message = f"the guide's commands need {program}, which is not installed"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: the guide must run)")
    pytest.skip(message)


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def site(
    postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    for program in ("bash", "curl", "jq", "psql", "pg_isready", "openssl"):
        _require(program)

    root = tmp_path_factory.mktemp("site")
    etc, data, backups, logs = root / "etc", root / "lib", root / "backup", root / "log"
    for folder in (etc, backups, logs, root / "xdg"):
        folder.mkdir()
    data.mkdir(mode=0o750)

    name = f"calejo_guide_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(_execute(postgres_server, f'CREATE DATABASE "{name}"'))
    database_url = postgres_server.rsplit("/", 1)[0] + f"/{name}"

    receiver = WebhookReceiver()
    ports = {"http": free_port(), "modbus": free_port(), "opcua": free_port()}
    config = etc / "calejo.yaml"
    config.write_text(site_config(root, ports, receiver.port), encoding="utf-8")
    config.chmod(0o600)
    env_file = etc / "calejo.env"
    env_file.write_text(
        f"DATABASE_URL={database_url}\n"
        f"CALEJO_ADMIN_PASSWORD={ADMIN_PASSWORD}\n"
        f"CALEJO_WEBHOOK_SECRET={WEBHOOK_SECRET}\n",
        encoding="utf-8",
    )
    env_file.chmod(0o600)

    base = _cleared_environment()
    base["XDG_CONFIG_HOME"] = str(root / "xdg")
    adapter_env = {
        **base,
        "CALEJO_CONFIG": str(config),
        "CALEJO_DATA_DIR": str(data),
        "DATABASE_URL": database_url,
        "CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "CALEJO_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "CALEJO_BIND": "127.0.0.1",
        "CALEJO_HTTP_PORT": str(ports["http"]),
        "CALEJO_MODBUS_PORT": str(ports["modbus"]),
        "CALEJO_OPCUA_PORT": str(ports["opcua"]),
    }
    shell_env = {**base, "CALEJO_PASSWORD": ADMIN_PASSWORD}

    site = Site(
        root,
        config,
        env_file,
        data,
        backups,
        logs,
        database_url,
        ports["http"],
        ports["modbus"],
        ports["opcua"],
        adapter_env,
        shell_env,
    )
    try:
        site.start()
        site.wait_for_scheduled_backups()
        yield site
    finally:
        if site.adapter is not None:
            site.adapter.close()
        receiver.close()
        asyncio.run(
            _execute(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        )


# -- running the guide --------------------------------------------------------------


class Shell:
    """Runs one command at a time; exported variables and the folder carry over."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.state = site.root / "shell"
        self.state.mkdir(exist_ok=True)
        (self.state / "cwd").write_text(str(REPO))

    def run(self, text: str) -> subprocess.CompletedProcess[str]:
        script = (
            'STATE="$1"\n'
            "set -a\n"
            'if [ -f "$STATE/env" ]; then . "$STATE/env"; fi\n'
            'cd "$(cat "$STATE/cwd")"\n'
            "set -o pipefail\n"
            f"{text}\n"
            "status=$?\n"
            'export -p > "$STATE/env"\n'
            'pwd > "$STATE/cwd"\n'
            'exit "$status"\n'
        )
        return subprocess.run(
            ["bash", "--noprofile", "--norc", "-c", script, "guide", str(self.state)],
            env=self.site.shell_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )


def _psql(site: Site, sql: str) -> subprocess.CompletedProcess[str]:
    env = {**site.shell_env, "PGOPTIONS": "-c default_transaction_read_only=on"}
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", site.database_url]
    return subprocess.run(
        [*command, "-f", "-"],
        input=sql,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def _failure(line: int, text: str, expected: int, result: Any, site: Site) -> str:
    output = (result.stdout + result.stderr)[-3000:]
    tail = ""
    if site.adapter is not None:
        tail = "\n".join(site.adapter.lines[-15:])
    return (
        f"{GUIDE.name}:{line}: expected exit {expected}, got {result.returncode}\n"
        f"$ {text}\n{output}\n--- the adapter's last lines ---\n{tail}"
    )


# -- the tests --------------------------------------------------------------------


def test_metric_names_in_the_guide_are_served(site: Site) -> None:
    site.start()
    text = httpx.get(f"{site.url}/api/v1/metrics", verify=False, timeout=10).text
    served = set(re.findall(r"^([a-z_:]+)", text, re.MULTILINE))
    families = set(re.findall(r"^# TYPE ([a-z_:]+) ", text, re.MULTILINE))

    # Metric names, not module paths (calejo_server.app) or wheel file names.
    named = set(
        re.findall(
            r"(?<![\w./])((?:calejo|process)_[a-z_]+)(?![\w./-])",
            GUIDE.read_text(encoding="utf-8"),
        )
    )
    assert named, "the guide names no metric"
    unknown = sorted(
        name
        for name in named
        if name not in served
        and name not in families
        and re.sub(r"_(bucket|count|sum|total)$", "", name) not in families
    )
    assert not unknown, f"metrics the adapter does not serve: {unknown}"


def test_every_command_of_the_guide_runs(site: Site) -> None:
    site.start()
    shell = Shell(site)
    ran = 0
    for block in guide_blocks():
        if not block.run:
            continue
        if block.language == "sql":
            result = _psql(site, site.rewrite(block.text))
            assert result.returncode == 0, _failure(
                block.line, block.text, 0, result, site
            )
            ran += 1
            continue
        if block.language != "sh":
            continue

        for command in parse_commands(block):
            control = CONTROL.match(command.text.strip())
            if control is not None:
                action = control["action"]
                if action in ("stop", "restart"):
                    site.stop()
                if action in ("start", "restart"):
                    site.start()
                continue
            text = AS_ADMINISTRATOR.sub("", command.text.strip())
            assert not NEEDS_MARKER.search(text), (
                f"{GUIDE.name}:{command.line}: {command.text!r} needs root, systemd "
                "or Docker: mark its block <!-- not run: <reason> -->"
            )

            result = shell.run(site.rewrite(text))
            assert result.returncode == command.expected, _failure(
                command.line, command.text, command.expected, result, site
            )
            ran += 1

    assert ran >= 60, f"only {ran} commands ran"
    assert site.adapter is not None and site.adapter.process.poll() is None
    assert "Traceback" not in site.adapter.output


def test_configuration_examples_load(tmp_path: Path) -> None:
    environ = {
        "CALEJO_SMTP_PASSWORD": "smtp-password",
        "CALEJO_TWILIO_AUTH_TOKEN": "twilio-token",
        "CALEJO_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    checked = 0
    for block in guide_blocks():
        if block.language != "yaml":
            continue
        document = yaml.safe_load(block.text)
        if not isinstance(document, dict) or not set(document) & CONFIG_SECTIONS:
            continue
        assert set(document) <= CONFIG_SECTIONS, (
            f"{GUIDE.name}:{block.line}: not configuration sections: "
            f"{sorted(set(document) - CONFIG_SECTIONS)}"
        )

        path = tmp_path / f"example-{block.line}.yaml"
        path.write_text(block.text, encoding="utf-8")
        config = load_config(path, environ)
        parse_alerts_config(config)
        parse_backup_settings(config)
        parse_opcua_config(config)
        parse_tls(config)
        parse_logging(config.raw, config.source)
        checked += 1
    assert checked >= 2


def test_endpoints_in_the_guide_exist() -> None:
    routes = [
        (endpoint.method, re.sub(r"\{[^}]+\}", "[^/]+", endpoint.path))
        for endpoint in all_endpoints()
    ]
    mentioned = set(
        re.findall(r"/api/v1(/[A-Za-z0-9_{}$\-/.]*)", GUIDE.read_text(encoding="utf-8"))
    )
    unknown = []
    for path in mentioned:
        path = re.sub(r"\$[A-Za-z_]+", "x", path).rstrip("/.")
        if not path or path == "/":
            continue
        if not any(re.fullmatch(pattern, path) for _, pattern in routes):
            unknown.append(path)
    assert not unknown, f"paths the REST API does not have: {sorted(unknown)}"


# -- the scripts -------------------------------------------------------------------


def _scripts() -> list[Path]:
    """The scripts (the hidden helper they share is not one)."""
    if not SCRIPTS.exists():
        return []
    return [path for path in SCRIPTS.iterdir() if not path.name.startswith(".")]


def _scripts_named_in_the_guide() -> set[str]:
    text = GUIDE.read_text(encoding="utf-8")
    return set(re.findall(r"scripts/([a-z0-9][a-z0-9-]*)", text)) | set(
        re.findall(r"^\| `([a-z0-9-]+)` \| `calejo ", text, re.MULTILINE)
    )


def _exec_arguments(script: Path) -> list[str]:
    lines = script.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#!/bin/sh", f"{script.name}: expected #!/bin/sh first"
    assert lines[1].startswith("# ") and lines[2].startswith("# "), (
        f"{script.name}: expected two comment lines saying what it does"
    )
    assert "set -eu" in lines, f"{script.name}: expected set -eu"
    final = lines[-1]
    match = re.fullmatch(r'exec "\$calejo" ([a-z0-9 =-]+) "\$@"', final)
    assert match, f'{script.name}: expected to end in exec "$calejo" ... "$@"'
    return match[1].split()


def test_every_script_is_in_the_guide_and_every_named_one_exists() -> None:
    present = {path.name for path in _scripts()}
    named = _scripts_named_in_the_guide()
    assert named - present == set(), f"named in the guide, missing: {named - present}"
    assert present - named == set(), f"not in the guide: {present - named}"


@pytest.mark.parametrize("name", sorted(path.name for path in _scripts()))
def test_script_is_a_thin_wrapper_whose_help_works(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    script = SCRIPTS / name
    assert os.access(script, os.X_OK), f"{name} is not executable"
    arguments = _exec_arguments(script)

    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*arguments, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: calejo {arguments[0]}" in capsys.readouterr().out


def test_scripts_find_calejo(tmp_path: Path) -> None:
    script = SCRIPTS / "health-check"
    plain = {
        key: value
        for key, value in _cleared_environment().items()
        if key != "CALEJO_BIN"
    }
    plain["PATH"] = "/usr/bin:/bin"

    # Not on PATH: the checkout's .venv, as the tests run from it.
    venv_calejo = REPO / ".venv" / "bin" / "calejo"
    if venv_calejo.exists():
        found = subprocess.run(
            [str(script), "--help"],
            env=plain,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert found.returncode == 0, found.stderr
        assert "usage: calejo health-check" in found.stdout

    # CALEJO_BIN first; a copy of the script with nothing to find fails clearly.
    fake = tmp_path / "fake-calejo"
    fake.write_text('#!/bin/sh\necho "fake calejo $*"\n', encoding="utf-8")
    fake.chmod(0o755)
    chosen = subprocess.run(
        [str(script), "--url", "https://adapter:8080"],
        env={**plain, "CALEJO_BIN": str(fake)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (
        chosen.stdout.strip() == "fake calejo health-check --url https://adapter:8080"
    )

    lonely = tmp_path / "scripts" / "health-check"
    lonely.parent.mkdir()
    shutil.copy2(script, lonely)
    shutil.copy2(SCRIPTS / ".find-calejo", lonely.parent / ".find-calejo")
    missing = subprocess.run(
        [str(lonely)],
        env=plain,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 127
    assert "calejo not found" in missing.stderr
