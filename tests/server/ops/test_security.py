"""``calejo security``: the policy of a configuration, file modes on the host,
the REST probes against servers that answer well and badly, and the risk
register built from the findings (the guide's test scans a live adapter)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from calejo_server import cli
from calejo_server.config import load_config
from calejo_server.ops import security
from calejo_server.ops.remote import Remote
from calejo_server.ops.security import Finding
from tests.server.ops.fake_adapter import fake_adapter, json_answer

SECURE = {
    "server": {"bind": "127.0.0.1"},
    "tls": {"enabled": True},
    "opcua": {"security_modes": ["SignAndEncrypt"]},
    "modbus": {"allowed_clients": ["10.0.0.0/24"]},
    "alerts": {
        "webhook": {
            "enabled": True,
            "url": "https://hooks.example.org/calejo",
            "secret": "a-secret-of-some-length",
        }
    },
    "logging": {"folder": "/var/log/calejo"},
    "stations": [
        {
            "station_id": "north",
            "pumps": [
                {
                    "pump_id": "p1",
                    "min_value": 20,
                    "max_value": 50,
                    "max_rate": 0.5,
                    "failsafe_value": 35,
                }
            ],
        }
    ],
}


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder others may enter (0755 up to /), as a host's folders are."""
    folder = Path(tempfile.mkdtemp(prefix="calejo-security-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_config(folder: Path, document: dict[str, object], mode: int = 0o600) -> Path:
    server = {"bind": "127.0.0.1", "data_dir": str(folder / "data")}
    document = {
        **document,
        "server": server,
        "backup": {"folder": str(folder / "backups")},
    }
    path = folder / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    path.chmod(mode)
    return path


def test_a_secure_configuration_holds_to_the_policy(
    open_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(write_config(open_folder, SECURE))
    assert [r for r in security.policy(config) if not r.ok] == []

    code = cli.main(
        ["security", "policy", "--config", str(open_folder / "calejo.yaml")]
    )
    assert code == 0
    assert "findings: 0 CRITICAL, 0 HIGH, 0 MEDIUM, 0 LOW" in capsys.readouterr().out


def test_the_demonstration_configuration_breaks_the_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CALEJO_CONFIG", raising=False)
    failing = {r.setting: r for r in security.policy(load_config()) if not r.ok}

    assert failing["tls.enabled"].severity == "HIGH"
    assert failing["alerts.email|sms|webhook.enabled"].severity == "HIGH"
    assert failing["opcua.security_modes"].actual == "[Sign, SignAndEncrypt]"
    assert failing["backup.enabled, backup.schedule"].actual == "off"

    assert cli.main(["security", "policy", "--fail-on", "CRITICAL"]) == 0
    assert cli.main(["security", "policy"]) == 1
    assert "HIGH     policy.tls" in capsys.readouterr().out


def test_loose_file_modes_are_found(open_folder: Path) -> None:
    config_path = write_config(open_folder, SECURE, mode=0o666)
    config = load_config(config_path)
    certs = open_folder / "data" / "certs"
    certs.mkdir(parents=True)
    (open_folder / "data").chmod(0o755)
    (certs / "server.key").write_text("key")
    (certs / "server.key").chmod(0o644)
    (certs / "ca.key").write_text("key")
    (certs / "ca.key").chmod(0o600)
    database = open_folder / "data" / "calejo.db"
    database.write_text("")
    database.chmod(0o644)
    archives = open_folder / "backups"
    archives.mkdir()
    archives.chmod(0o755)
    archive = archives / "calejo-full-20260101T000000Z.tar.gz"
    archive.write_bytes(b"")
    archive.chmod(0o644)

    found = {f.check: f for f in security.scan_files(config)}
    assert found["files.config"].severity == "HIGH"
    assert found["files.keys"].severity == "HIGH"
    assert "server.key mode 0644" in found["files.keys"].evidence
    assert "ca.key" not in found["files.keys"].evidence
    assert found["files.database"].severity == "HIGH"
    assert found["files.backups"].severity == "HIGH"
    assert found["files.data_dir"].passed

    # The same files behind a folder others cannot enter are not exposed.
    config_path.chmod(0o600)
    (open_folder / "data").chmod(0o750)
    archives.chmod(0o700)
    (certs / "server.key").chmod(0o600)
    found = {f.check: f for f in security.scan_files(load_config(config_path))}
    assert all(f.passed for f in found.values()), found


PROBE = "/api/v1/pump-stations/calejo-security-scan/pumps/calejo-security-scan"


def _open_door() -> dict[str, object]:
    """An HTTP server that lets every request through: what a scan must catch."""
    answer = json_answer({"users": []})
    return {
        "GET /api/v1/health": json_answer({"status": "ok"}),
        "GET /api/v1/users": answer,
        "GET /api/v1/pump-stations": answer,
        f"PUT {PROBE}/setpoint": json_answer({"error": "not_found"}, 404),
    }


def test_requests_let_through_without_a_token_are_critical() -> None:
    with fake_adapter(_open_door()) as server, Remote(server.url) as remote:
        found = {f.check: f for f in security.scan_rest(remote)}

    assert found["rest.auth"].severity == "CRITICAL"
    assert "GET /api/v1/users answered 200" in found["rest.auth"].evidence
    assert "answered 404" in found["rest.auth"].evidence
    assert found["rest.tls"].severity == "HIGH"
    assert found["rest.headers"].severity == "MEDIUM"
    assert found["rest.server_header"].severity == "LOW"


def test_a_well_guarded_api_passes_the_rest_probes() -> None:
    from calejo_server.api.app import SECURITY_HEADERS

    headers = {k.decode(): v.decode() for k, v in SECURITY_HEADERS}
    refused = (
        401,
        {**headers, "Content-Type": "application/json"},
        b'{"error": "unauthorized"}',
    )
    routes: dict[str, object] = {
        "GET /api/v1/health": (200, headers, b'{"status": "ok"}'),
        "GET /api/v1/users": refused,
        "GET /api/v1/pump-stations": refused,
        f"PUT {PROBE}/setpoint": refused,
    }
    with fake_adapter(routes) as server, Remote(server.url) as remote:
        found = {f.check: f for f in security.scan_rest(remote)}
        probes = len(server.requests)

    assert found["rest.auth"].passed
    assert found["rest.headers"].passed
    assert found["rest.errors"].passed
    # Few probes: each refused one counts against this host's address.
    assert probes <= 5


def test_risks_rise_with_the_findings_against_their_mitigations() -> None:
    calm = {r.threat.id: r for r in security.assess_risks([])}
    assert {r.level for r in calm.values()} <= {"LOW", "MEDIUM"}
    assert calm["R2"].score == 3

    found = [
        Finding("rest.tls", "HIGH", "plain http", "http"),
        Finding("modbus.allow_list", "MEDIUM", "no allow-list", "[]"),
        Finding("controls.SR7.3", "MEDIUM", "SR 7.3 Control system backup", "none"),
        Finding("rest.open", "LOW", "open status", "by design"),
    ]
    risks = {r.threat.id: r for r in security.assess_risks(found)}
    assert risks["R2"].level == "CRITICAL"
    assert risks["R4"].likelihood == 2
    assert risks["R6"].level == "HIGH"
    assert risks["R1"].causes == ()
    assert all(f.check != "rest.open" for r in risks.values() for f in r.causes)


def test_the_scan_of_an_unreachable_adapter_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CALEJO_CONFIG", raising=False)
    from tests.server.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["security", "scan", "--url", url]) == 2
    assert "did not answer" in capsys.readouterr().err
    assert not os.environ.get("CALEJO_CONFIG")
