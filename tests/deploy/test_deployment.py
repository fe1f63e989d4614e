"""The deployment files: Dockerfile, compose file, example configuration,
systemd unit.

No Docker daemon is needed. The files are parsed and held against each
other and against the project: the Dockerfile builds the wheel with the
commands the README documents and copies what the build needs; the compose
file wires the adapter to PostgreSQL 15 with named volumes; the example
configuration loads through the adapter's own loader with the environment
the container would have, and puts certificates, logs and backups in those
volumes. ``docker compose config`` and ``systemd-analyze`` check the files
too where they are installed (the test says so when it skips them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from calejo_server import certs
from calejo_server.alerts.settings import parse_alerts_config
from calejo_server.config import Config, ConfigError, load_config
from calejo_server.logs import parse_logging
from calejo_server.ops.backup import parse_backup_settings
from calejo_server.ops.health import default_url
from calejo_server.protocols.opcua import parse_opcua_config
from calejo_server.tls import parse_tls

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / "env.example"
UNIT = DOCKER / "systemd" / "calejo-control-adapter.service"

PORTS = {8080, 502, 4840}
"""REST API, Modbus TCP and OPC UA, as DESIGN.md numbers them."""

DESIGN_ENV = {
    "DATABASE_URL",
    "CALEJO_DATA_DIR",
    "CALEJO_HTTP_PORT",
    "CALEJO_MODBUS_PORT",
    "CALEJO_OPCUA_PORT",
    "CALEJO_BIND",
    "CALEJO_ADMIN_PASSWORD",
}
"""The environment variables DESIGN.md says override the configuration."""

HOST_ENV = {
    "POSTGRES_PASSWORD": "pg-password-0123",
    "CALEJO_ADMIN_PASSWORD": "first-login-0123",
    "CALEJO_SMTP_PASSWORD": "smtp-password-0123",
    "CALEJO_TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
    "CALEJO_TWILIO_AUTH_TOKEN": "twilio-token-0123",
    "CALEJO_WEBHOOK_SECRET": "webhook-secret-0123456789",
}
"""What an operator puts in docker/.env: every secret compose asks for."""

VOLUME_FOLDERS = {"/app/data", "/app/certs", "/var/backup/calejo", "/var/log/calejo"}
"""Where the container keeps what must outlast it."""

COMMAND_TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# Reading a Dockerfile.


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def commands(self) -> list[list[str]]:
        """The shell commands of every RUN, split at ``&&``, as words."""
        found: list[list[str]] = []
        for run in self.all("RUN"):
            found.extend(split_commands(run.arguments))
        return found

    def environment(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for env in self.all("ENV"):
            for word in shlex.split(env.arguments):
                name, sep, value = word.partition("=")
                assert sep, f"ENV at line {env.line}: expected NAME=value, got {word}"
                values[name] = value
        return values

    def workdir(self) -> PurePosixPath:
        folder = PurePosixPath("/")
        for workdir in self.all("WORKDIR"):
            folder = folder / workdir.arguments.strip()
        return folder


def read_dockerfile(path: Path) -> list[Stage]:
    """The stages of ``path``, each with its instructions in order."""
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text(encoding="utf-8")):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0]))
            continue

        assert stages, f"{path}:{instruction.line}: an instruction before FROM"
        stages[-1].instructions.append(instruction)
    return stages


def _instructions(text: str) -> Iterator[Instruction]:
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number

        continued = line.endswith("\\")
        pending.append(line[:-1].strip() if continued else line)
        if continued:
            continue

        keyword, _, arguments = " ".join(pending).partition(" ")
        yield Instruction(keyword.upper(), arguments.strip(), start)
        pending = []

    assert not pending, "the Dockerfile ends inside a continued line"


def split_commands(shell: str) -> list[list[str]]:
    """``a x && b y`` as [[a, x], [b, y]]."""
    commands: list[list[str]] = [[]]
    for word in shlex.split(shell):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def exec_form(arguments: str) -> list[str]:
    """The words of an exec-form (JSON array) instruction, else shell words."""
    if arguments.startswith("["):
        words = json.loads(arguments)
        assert isinstance(words, list)
        return [str(word) for word in words]
    return shlex.split(arguments)


def healthcheck_command(stage: Stage) -> str:
    """The shell command of the stage's HEALTHCHECK."""
    (check,) = stage.all("HEALTHCHECK")
    options, marker, command = check.arguments.partition(" CMD ")
    assert marker, f"HEALTHCHECK at line {check.line}: expected CMD, got {options}"
    assert all(word.startswith("--") for word in options.split())
    return " ".join(command.split())


# ---------------------------------------------------------------------------
# Reading the README, the compose file, the ignore file.


def readme_build_commands() -> list[list[str]]:
    """The plain build commands of the README's "Building a wheel"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Building a wheel\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "README.md: expected a section '## Building a wheel'"

    commands: list[list[str]] = []
    for block in re.findall(r"^```sh\n(.*?)^```", match.group(1), re.M | re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "python":
                commands.append(words)
    assert commands, "README.md: 'Building a wheel' shows no python command"
    return commands


_COMPOSE_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})"
)


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}``, ``$$``."""

    def replace(match: re.Match[str]) -> str:
        escaped, name, operator, argument = match.groups()
        if escaped:
            return "$"

        value = environ.get(name)
        if operator and operator.startswith(":") and not value:
            value = None  # with the colon, empty counts as unset
        if operator in (":-", "-"):
            return argument if value is None else value
        if operator in (":?", "?"):
            if value is None:
                raise KeyError(f"{name}: {argument}")
            return value
        return value or ""

    return _COMPOSE_VARIABLE.sub(replace, text)


def interpolated(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: interpolated(value, environ) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, environ) for value in node]
    if isinstance(node, str):
        return interpolate(node, environ)
    return node


def compose_document(environ: Mapping[str, str] = HOST_ENV) -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    result = interpolated(document, environ)
    assert isinstance(result, dict)
    return result


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        return not self.source.startswith((".", "/", "~"))


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    found = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"expected the short volume syntax: {entry}"
        source, target, *options = entry.split(":")
        found.append(Mount(source, target, "ro" in options))
    return found


def container_ports(service: Mapping[str, Any]) -> set[int]:
    return {int(str(entry).split(":")[-1].split("/")[0]) for entry in service["ports"]}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "expected environment as a mapping"
    return {str(key): str(value) for key, value in env.items()}


def dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Does the build context leave ``path`` out? The last matching rule
    wins; a rule matches a path or any folder above it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        rules.append((negated, re.compile(_glob(pattern.strip("/")))))
    return rules


def _glob(pattern: str) -> str:
    out = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            out.append(".*")
            index += 2
        elif pattern[index] == "*":
            out.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            out.append("[^/]")
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            out.append(pattern[index : end + 1])
            index = end + 1
        else:
            out.append(re.escape(pattern[index]))
            index += 1
    return "".join(out)


# ---------------------------------------------------------------------------
# What the build needs, from the project's own files.


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as source:
        return tomllib.load(source)


def files_the_build_needs() -> set[str]:
    """Top-level files and folders ``python -m build`` reads."""
    project = pyproject()
    needed = {"pyproject.toml"}
    for name in ("setup.py", "MANIFEST.in"):
        if (ROOT / name).exists():
            needed.add(name)

    readme = project["project"].get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    if readme:
        needed.add(str(readme))

    find = project["tool"]["setuptools"]["packages"]["find"]
    for pattern in find["include"]:
        needed.add(pattern.rstrip("*").rstrip("."))

    manifest = ROOT / "MANIFEST.in"
    if manifest.exists():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if not words or words[0] not in ("include", "recursive-include", "graft"):
                continue
            for pattern in words[1:2] if words[0] != "include" else words[1:]:
                needed.add(pattern.split("/")[0])
    return {name for name in needed if "*" not in name}


def build_stage() -> Stage:
    stages = read_dockerfile(DOCKERFILE)
    (stage,) = [s for s in stages if s.name == "build"]
    return stage


def runtime_stage() -> Stage:
    return read_dockerfile(DOCKERFILE)[-1]


# ---------------------------------------------------------------------------
# The Dockerfile.


def test_the_dockerfile_has_a_build_stage_and_a_runtime_stage() -> None:
    stages = read_dockerfile(DOCKERFILE)

    assert [stage.name for stage in stages] == ["build", None]
    assert stages[0].base == stages[1].base
    assert stages[0].base.startswith("python:3.11")
    needed = Requirement("python" + pyproject()["project"]["requires-python"])
    assert needed.specifier.contains("3.11")


def test_the_build_stage_runs_the_readme_build_commands() -> None:
    documented = readme_build_commands()
    stage = build_stage()

    # Besides the C compiler from the system's packages, the stage runs
    # exactly the README's commands, in the same order.
    run = [c for c in stage.commands() if c[0] not in ("apt-get", "rm")]
    assert run == documented
    assert [c[:3] for c in documented] == [
        ["python", "-m", "pip"],
        ["python", "-m", "build"],
    ]
    assert "--no-isolation" not in documented[1]


def test_the_readme_pins_what_pyproject_and_the_makefile_pin() -> None:
    project = pyproject()
    (install, _build) = readme_build_commands()
    (frontend,) = [Requirement(word) for word in install[4:]]
    dev = [Requirement(r) for r in project["project"]["optional-dependencies"]["dev"]]
    (pinned,) = [r for r in dev if r.name == frontend.name]
    assert frontend == pinned

    # python -m build installs [build-system].requires in isolation; make
    # dist builds with .venv's tools, which the Makefile installs with the
    # same pins.
    required = {Requirement(r) for r in project["build-system"]["requires"]}
    for requirement in required:
        assert requirement.specifier, f"{requirement.name}: expected a pinned range"
        assert any(spec.operator == "<" for spec in requirement.specifier), (
            f"{requirement.name}: expected an upper bound, got {requirement}"
        )

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    joined = makefile.replace("\\\n", " ")
    installs = [
        line for line in joined.splitlines() if "pip install" in line and '"' in line
    ]
    (line,) = [line for line in installs if "Cython" in line]
    quoted = re.findall(r'"([^"]+)"', line)
    assert {Requirement(r) for r in quoted} == required


def test_the_build_stage_copies_everything_the_build_needs() -> None:
    stage = build_stage()
    needed = files_the_build_needs()
    assert {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md"} <= needed
    assert {"calejo_core", "calejo_server"} <= needed

    copied: dict[str, str] = {}
    for copy in stage.all("COPY"):
        words = [w for w in shlex.split(copy.arguments) if not w.startswith("--")]
        *sources, destination = words
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            name = source.rstrip("/")
            if destination.endswith("/"):
                copied[name] = destination + name
            else:
                assert len(sources) == 1, copy.arguments
                copied[name] = destination

    missing = needed - set(copied)
    assert not missing, f"the build stage does not copy {sorted(missing)}"
    for name, destination in copied.items():
        assert PurePosixPath(destination) == PurePosixPath(".") / name, (
            f"COPY {name}: expected it at ./{name} in the build folder, "
            f"got {destination}"
        )


def test_the_build_context_lets_in_the_sources_and_keeps_out_the_rest() -> None:
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    listed = subprocess.run(
        ["git", "ls-files", "--", *sorted(files_the_build_needs())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    sources = listed.stdout.split()
    assert any(name.endswith(".pyx") for name in sources)
    assert any(name.endswith(".sql") for name in sources)

    kept_out = [name for name in sources if dockerignore_excludes(name, rules)]
    assert kept_out == []

    for leftover in (
        ".venv/bin/python",
        ".git/HEAD",
        "build/lib/calejo_core/gate.so",
        "dist/calejo_control_adapter-0.1.0.tar.gz",
        "calejo_core/gate.c",
        "calejo_core/gate.cpython-311-x86_64-linux-gnu.so",
        "calejo_server/__pycache__/app.cpython-311.pyc",
        "calejo_server/api/__pycache__",
        "tests/core/test_gate.py",
        "docker/.env",
        "calejo-data/calejo.db",
    ):
        assert dockerignore_excludes(leftover, rules), leftover


def test_the_runtime_stage_installs_the_wheel_and_runs_unprivileged() -> None:
    build = build_stage()
    runtime = runtime_stage()
    (_install, command) = readme_build_commands()
    outdir = command[command.index("--outdir") + 1]
    wheels = build.workdir() / outdir

    (copy,) = [c for c in runtime.all("COPY") if "--from=build" in c.arguments]
    source = PurePosixPath(shlex.split(copy.arguments)[1])
    assert source == wheels
    installs = [
        c for c in runtime.commands() if c[:4] == ["python", "-m", "pip", "install"]
    ]
    assert any("[server]" in word for c in installs for word in c)
    assert not any(c[0] == "apt-get" for c in runtime.commands()), "no compiler here"

    (user,) = runtime.all("USER")
    name = user.arguments.split(":")[0]
    assert name not in ("root", "0", "")
    creating = " ".join(" ".join(c) for c in runtime.commands())
    assert f"--uid {name}" in creating or f"useradd {name}" in creating

    made = {w for c in runtime.commands() if c[:2] == ["mkdir", "-p"] for w in c[2:]}
    owned = {w for c in runtime.commands() if c[0] == "chown" for w in c[2:]}
    assert made >= VOLUME_FOLDERS
    assert owned >= VOLUME_FOLDERS
    (volume,) = runtime.all("VOLUME")
    assert set(exec_form(volume.arguments)) == VOLUME_FOLDERS

    (expose,) = runtime.all("EXPOSE")
    assert {int(port) for port in expose.arguments.split()} == PORTS

    env = runtime.environment()
    assert env["CALEJO_DATA_DIR"] == "/app/data"
    assert {int(env[f"CALEJO_{n}_PORT"]) for n in ("HTTP", "MODBUS", "OPCUA")} == PORTS
    assert env["CALEJO_BIND"] == "0.0.0.0"

    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert exec_form(entrypoint.arguments) + exec_form(cmd.arguments) == [
        "calejo",
        "serve",
    ]
    assert healthcheck_command(runtime).startswith("calejo health-check")


@pytest.mark.parametrize(
    ("exit_code", "healthy"),
    [(0, True), (1, True), (2, False)],
    ids=["ok", "degraded", "down"],
)
def test_the_health_check_counts_a_degraded_adapter_as_alive(
    tmp_path: Path, exit_code: int, healthy: bool
) -> None:
    # A stand-in calejo that answers as health-check does: 0 ok, 1
    # degraded, 2 down. The HEALTHCHECK line runs under /bin/sh, as Docker
    # runs it.
    stand_in = tmp_path / "calejo"
    stand_in.write_text(f"#!/bin/sh\nexit {exit_code}\n", encoding="utf-8")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}{os.pathsep}/usr/bin:/bin"}

    result = subprocess.run(
        ["/bin/sh", "-c", healthcheck_command(runtime_stage())],
        env=env,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
    )

    assert (result.returncode == 0) is healthy


def test_the_health_check_finds_no_adapter_unhealthy(tmp_path: Path) -> None:
    # The real command, with nothing listening where the configuration says.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bin_folder = Path(sys.executable).parent
    assert (bin_folder / "calejo").exists()
    env = {
        "PATH": f"{bin_folder}{os.pathsep}/usr/bin:/bin",
        "CALEJO_HTTP_PORT": str(port),
        "HOME": str(tmp_path),
    }

    result = subprocess.run(
        ["/bin/sh", "-c", healthcheck_command(runtime_stage())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "adapter: down" in result.stdout


# ---------------------------------------------------------------------------
# The compose file.


def test_the_compose_file_runs_the_adapter_with_postgresql_15() -> None:
    document = compose_document()
    services = document["services"]
    assert set(services) == {"postgres", "adapter"}

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert postgres["environment"]["POSTGRES_PASSWORD"] == HOST_ENV["POSTGRES_PASSWORD"]
    assert "ports" not in postgres, "only the adapter needs the database"

    adapter = services["adapter"]
    build = adapter["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert adapter["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert container_ports(adapter) == PORTS
    for service in services.values():
        assert service["restart"] == "unless-stopped"
        assert service["healthcheck"]["test"]

    # The compose file checks the adapter as the image does.
    kind, command = adapter["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    assert " ".join(command.split()) == healthcheck_command(runtime_stage())


def test_the_compose_file_keeps_state_in_named_volumes() -> None:
    document = compose_document()
    declared = set(document["volumes"])
    services = document["services"]

    used: set[str] = set()
    for name, service in services.items():
        for mount in mounts(service):
            if mount.named:
                assert mount.source in declared, f"{name}: {mount.source} undeclared"
                used.add(mount.source)
    assert used == declared, f"declared but unused: {sorted(declared - used)}"

    postgres = {m.target: m for m in mounts(services["postgres"])}
    assert postgres["/var/lib/postgresql/data"].named

    adapter = {m.target: m for m in mounts(services["adapter"])}
    for folder in VOLUME_FOLDERS:
        assert adapter[folder].named, f"{folder}: expected a named volume"
        assert not adapter[folder].read_only
    sources = [adapter[folder].source for folder in VOLUME_FOLDERS]
    assert len(set(sources)) == len(sources)

    config = adapter["/app/config"]
    assert not config.named and config.read_only
    assert (COMPOSE.parent / config.source).resolve() == DOCKER / "config"


def test_the_compose_file_takes_every_secret_from_the_environment() -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for name, service in raw["services"].items():
        for key, value in environment(service).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|SID|DATABASE_URL", key):
                assert "${" in value, f"{name}.{key}: a secret written in the file"

    # A missing secret stops compose, naming it.
    for secret in HOST_ENV:
        short = {k: v for k, v in HOST_ENV.items() if k != secret}
        with pytest.raises(KeyError, match=secret):
            compose_document(short)

    # docker/env.example lists every variable the compose file reads.
    listed = set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, _ = line.partition("=")
            assert sep, f"env.example: expected NAME=value, got {line!r}"
            listed.add(name.strip())
    text = COMPOSE.read_text(encoding="utf-8")
    read = {m.group(2) for m in _COMPOSE_VARIABLE.finditer(text) if m.group(2)}
    assert read == listed


def test_the_container_gets_every_variable_design_names() -> None:
    adapter = compose_document()["services"]["adapter"]
    container = {**runtime_stage().environment(), **environment(adapter)}

    assert set(container) >= DESIGN_ENV

    url = urlsplit(container["DATABASE_URL"])
    postgres = compose_document()["services"]["postgres"]["environment"]
    assert url.scheme == "postgresql" and url.hostname == "postgres"
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == HOST_ENV["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"] == "/calejo"


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here")
    version = subprocess.run(
        [docker, "compose", "version"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    if version.returncode != 0:
        pytest.skip(f"docker compose is not installed here: {version.stderr.strip()}")
    return [docker, "compose", "-f", str(COMPOSE)]


def test_docker_compose_reads_the_compose_file() -> None:
    compose = _docker_compose()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **HOST_ENV}

    result = subprocess.run(
        [*compose, "config"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )

    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    assert set(document["services"]) == {"postgres", "adapter"}
    assert set(document["volumes"]) == set(compose_document()["volumes"])
    adapter = document["services"]["adapter"]
    assert (
        adapter["environment"]["CALEJO_WEBHOOK_SECRET"]
        == (HOST_ENV["CALEJO_WEBHOOK_SECRET"])
    )

    short = {k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"}
    refused = subprocess.run(
        [*compose, "config"],
        env=short,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr


# ---------------------------------------------------------------------------
# The example configuration the compose file mounts.


def container_config(without: str | None = None) -> tuple[Config, dict[str, str]]:
    """The example configuration, loaded as the adapter in the container
    loads it: the file that the compose mount and CALEJO_CONFIG point at,
    with the image's and the compose file's environment (less ``without``).
    """
    adapter = compose_document()["services"]["adapter"]
    env = {**runtime_stage().environment(), **environment(adapter)}

    inside = PurePosixPath(env["CALEJO_CONFIG"])
    (mount,) = [m for m in mounts(adapter) if inside.is_relative_to(m.target)]
    path = COMPOSE.parent / mount.source / inside.relative_to(mount.target)
    assert path.is_file(), f"CALEJO_CONFIG {inside}: no {path}"

    if without is not None:
        del env[without]
    return load_config(path, environ=env), env


def test_the_example_configuration_loads_as_the_container_loads_it() -> None:
    config, env = container_config()

    assert not config.demo and config.stations
    assert config.database.url == env["DATABASE_URL"]
    assert config.security.admin_password == HOST_ENV["CALEJO_ADMIN_PASSWORD"]
    assert {
        config.server.http_port,
        config.server.modbus_port,
        config.server.opcua_port,
    } == PORTS
    assert default_url(config) == "http://127.0.0.1:8080"

    alerts = parse_alerts_config(config)
    assert set(alerts.enabled_channels()) == {"sms", "email", "webhook"}
    assert alerts.email.password == HOST_ENV["CALEJO_SMTP_PASSWORD"]
    assert alerts.sms.account_sid == HOST_ENV["CALEJO_TWILIO_ACCOUNT_SID"]
    assert alerts.sms.auth_token == HOST_ENV["CALEJO_TWILIO_AUTH_TOKEN"]
    assert alerts.webhook.secret == HOST_ENV["CALEJO_WEBHOOK_SECRET"]
    assert alerts.routing["LOW"] == ()

    # Everything the adapter keeps lives in the container's volumes.
    logs = parse_logging(config.raw, config.source)
    backup = parse_backup_settings(config)
    opcua = parse_opcua_config(config, environ=env)
    tls = parse_tls(config)
    assert certs.certificate_folder(config) == Path("/app/certs")
    assert opcua.certificate_dir == tls.certificate_dir == Path("/app/certs")
    assert logs.folder == Path("/var/log/calejo")
    assert backup.folder == Path("/var/backup/calejo")
    assert config.server.data_dir == Path("/app/data")
    for folder in (opcua.trust_dir, opcua.rejected_dir, opcua.crl_dir):
        assert folder.is_relative_to("/app/data")


def test_the_example_configuration_names_a_missing_secret() -> None:
    # Compose refuses first; without compose, the loader refuses too.
    with pytest.raises(ConfigError) as caught:
        container_config(without="CALEJO_WEBHOOK_SECRET")

    message = str(caught.value)
    assert "alerts.webhook.secret" in message
    assert "CALEJO_WEBHOOK_SECRET" in message


def test_every_variable_of_the_example_configuration_comes_from_compose() -> None:
    adapter = compose_document()["services"]["adapter"]
    given = set(environment(adapter)) | set(runtime_stage().environment())
    document = yaml.safe_load((DOCKER / "config" / "calejo.yaml").read_text("utf-8"))

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    reference = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
    names = []
    for text in strings(document):
        for match in reference.finditer(text):
            name, default = match.groups()
            assert default is not None or name in given, f"{name}: not set by compose"
            names.append(name)
    assert "DATABASE_URL" in names and "CALEJO_WEBHOOK_SECRET" in names


# ---------------------------------------------------------------------------
# The systemd unit.


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order; a key
    may repeat (Environment=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path}:{number}: expected Key=value"
        current.append((key.strip(), value.strip()))
    return sections


def one(entries: list[tuple[str, str]], key: str) -> str:
    values = [value for name, value in entries if name == key]
    assert len(values) == 1, f"{key}=: expected once, got {values}"
    return values[0]


def every(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in entries if name == key]


def test_the_systemd_unit_runs_calejo_serve_unprivileged_and_hardened() -> None:
    unit = read_unit(UNIT)
    service = unit["Service"]

    assert one(service, "User") == "calejo" and one(service, "Group") == "calejo"
    command = shlex.split(one(service, "ExecStart"))
    assert Path(command[0]).is_absolute() and Path(command[0]).name == "calejo"
    assert command[1:] == ["serve"]
    assert one(service, "Restart") in ("on-failure", "always")
    assert float(one(service, "RestartSec")) > 0
    assert one(unit["Unit"], "StartLimitIntervalSec") == "0"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"

    env = dict(value.split("=", 1) for value in every(service, "Environment"))
    state = Path("/var/lib") / one(service, "StateDirectory")
    assert Path(env["CALEJO_DATA_DIR"]) == state
    assert Path(one(service, "WorkingDirectory")) == state
    assert env["CALEJO_CONFIG"].startswith("/etc/")
    assert Path("/var/log") / one(service, "LogsDirectory") == Path("/var/log/calejo")
    assert "-/var/backup/calejo" in one(service, "ReadWritePaths").split()

    # Only the capability that port 502 needs; no way back to more.
    assert one(service, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(service, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    for key, value in {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectControlGroups": "true",
        "RestrictNamespaces": "true",
        "RestrictSUIDSGID": "true",
        "LockPersonality": "true",
        "SystemCallArchitectures": "native",
    }.items():
        assert one(service, key) == value, key
    assert "@system-service" in every(service, "SystemCallFilter")


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart at this environment's calejo, which exists."""
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    calejo = Path(sys.executable).parent / "calejo"
    assert calejo.exists(), calejo

    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={calejo}", text, flags=re.M)
    assert count == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    copy = _unit_copy(tmp_path)

    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )

    # verify reports an unknown key or a bad value on stderr and still exits
    # 0; lines about other units (the host's) do not count.
    about_unit = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stderr
    assert about_unit == []


def test_systemd_rates_the_unit_well_hardened(tmp_path: Path) -> None:
    copy = _unit_copy(tmp_path)

    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(copy)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )

    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if found is None:
        pytest.skip(
            f"systemd-analyze security --offline is not supported here: "
            f"{result.stderr.strip()[:200]}"
        )
    # 0 is fully locked down, 10 not at all; systemd calls under 2 "OK".
    assert float(found.group(1)) <= 2.0, result.stdout
