"""``calejo certs generate|rotate|check`` and the certificates health component."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from calejo_server import audit, certs
from calejo_server.config import Config, load_config
from calejo_server.ops import certs as ops_certs
from calejo_server.tls import parse_tls
from tests.server.conftest import adapter_env, run_calejo

OPENSSL = shutil.which("openssl")


def write_config(root: Path, **sections: Any) -> Path:
    document: dict[str, Any] = {"server": {"data_dir": str(root / "data")}}
    document.update(sections)
    path = root / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def calejo(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = root / "calejo.yaml"
    return run_calejo([*args, "--config", str(config)], adapter_env(root / "data"))


def audit_rows(root: Path) -> list[dict[str, Any]]:
    exported = calejo(root, "audit", "export", "--format", "json")
    assert exported.returncode == 0, exported.stderr
    rows: list[dict[str, Any]] = json.loads(exported.stdout)
    return rows


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *args], capture_output=True, text=True, timeout=30, check=False
    )


def folder(root: Path) -> Path:
    return root / "data" / "certs"


# generate and check.


def test_generate_creates_what_is_missing_once_and_audits_it(tmp_path: Path) -> None:
    write_config(tmp_path, tls={"enabled": True})

    made = calejo(tmp_path, "certs", "generate")
    again = calejo(tmp_path, "certs", "generate")

    assert made.returncode == 0, made.stderr
    for name in ("ca", "opcua", "rest"):
        assert f"{name}: created" in made.stdout
        assert f"{name}: kept" in again.stdout
    rows = [r for r in audit_rows(tmp_path) if r["event_type"].startswith("CERT")]
    assert [(r["event_type"], r["details"]["certificate"]) for r in rows] == [
        (audit.CERTIFICATE_CREATED, "ca"),
        (audit.CERTIFICATE_CREATED, "opcua"),
        (audit.CERTIFICATE_CREATED, "rest"),
    ]
    assert all(r["user"].startswith("cli:") for r in rows)
    for name in ("ca.key", "server.key", "rest.key"):
        assert (folder(tmp_path) / name).stat().st_mode & 0o077 == 0


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl tool")
def test_openssl_verifies_both_server_certificates(tmp_path: Path) -> None:
    write_config(tmp_path, tls={"enabled": True})
    assert calejo(tmp_path, "certs", "generate").returncode == 0
    ca = str(folder(tmp_path) / "ca.crt")

    for name in ("server.pem", "rest.pem"):
        verify = openssl("verify", "-CAfile", ca, str(folder(tmp_path) / name))
        assert verify.returncode == 0, verify.stderr
        enddate = openssl(
            "x509", "-enddate", "-noout", "-in", str(folder(tmp_path) / name)
        )
        assert enddate.stdout.startswith("notAfter=")


def test_check_prints_each_certificate_and_exits_1_within_the_window(
    tmp_path: Path,
) -> None:
    write_config(tmp_path)
    assert calejo(tmp_path, "certs", "generate", "--days", "60").returncode == 0

    fine = calejo(tmp_path, "certs", "check")
    close = calejo(tmp_path, "certs", "check", "--days", "90")

    assert fine.returncode == 0, fine.stdout
    info = certs.certificate_info(folder(tmp_path) / "server.pem")
    for text in (
        "opcua: ok",
        f"subject:   {info.subject}",
        f"issuer:    {info.issuer}",
        f"not after: {info.not_after.isoformat()}",
        "days left: 60.0",
        "rest: not configured (tls.enabled is false)",
    ):
        assert text in fine.stdout
    assert close.returncode == 1
    assert "expires in 60.0 days" in close.stdout
    assert "within 90 days" in close.stdout
    assert close.stdout.rstrip().endswith("needs attention: opcua")


def test_check_names_a_missing_file_and_a_file_that_is_not_a_certificate(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, tls={"enabled": True})
    assert calejo(tmp_path, "certs", "generate").returncode == 0
    server = folder(tmp_path) / "server.pem"
    server.write_text("this is not a certificate\n", encoding="utf-8")
    (folder(tmp_path) / "rest.pem").unlink()

    result = calejo(tmp_path, "certs", "check")

    assert result.returncode == 1
    assert f"opcua: certificate {server}: expected a PEM or DER x509" in result.stdout
    assert f"rest: {folder(tmp_path) / 'rest.pem'}: missing" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_finds_a_server_certificate_the_ca_did_not_sign(tmp_path: Path) -> None:
    write_config(tmp_path)
    assert calejo(tmp_path, "certs", "generate").returncode == 0
    certs.self_signed_certificate(
        folder(tmp_path) / "server.pem",
        folder(tmp_path) / "server.key",
        application_uri="urn:elsewhere",
        common_name="elsewhere",
        server=True,
    )

    result = calejo(tmp_path, "certs", "check", "--which", "opcua")

    assert result.returncode == 1
    assert "not signed by the local CA" in result.stdout


def test_expired_is_reported_as_expired(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), environ={})
    ops_certs.generate(config)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=800)

    found = ops_certs.assess_all(ops_certs.certificate_slots(config), now=later)

    by_name = {a.slot.name: a for a in found}
    assert by_name["ca"].ok
    assert by_name["opcua"].problem is not None
    assert "expired" in by_name["opcua"].problem
    assert by_name["opcua"].days_left is not None and by_name["opcua"].days_left < 0


# rotate.


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl tool")
def test_rotate_keeps_the_previous_pair_names_and_audits(tmp_path: Path) -> None:
    write_config(tmp_path, tls={"enabled": True, "hostnames": ["scada.example"]})
    assert calejo(tmp_path, "certs", "generate").returncode == 0
    certs_dir = folder(tmp_path)
    before = {
        name: (certs_dir / name).read_bytes()
        for name in ("server.pem", "server.key", "rest.pem", "rest.key", "ca.crt")
    }
    old_server = certs.certificate_info(certs_dir / "server.pem")
    old_rest = certs.certificate_info(certs_dir / "rest.pem")

    rotated = calejo(tmp_path, "certs", "rotate")

    assert rotated.returncode == 0, rotated.stderr
    for name in ("server.pem", "server.key", "rest.pem", "rest.key"):
        assert (certs_dir / f"{name}.previous").read_bytes() == before[name]
        assert (certs_dir / name).read_bytes() != before[name]
    assert (certs_dir / "ca.crt").read_bytes() == before["ca.crt"]
    assert (certs_dir / "server.key.previous").stat().st_mode & 0o077 == 0
    assert not [p for p in certs_dir.iterdir() if p.name.startswith(".")]

    new_server = certs.certificate_info(certs_dir / "server.pem")
    new_rest = certs.certificate_info(certs_dir / "rest.pem")
    assert new_server.application_uri == old_server.application_uri
    assert set(new_server.dns_names) == set(old_server.dns_names)
    assert "scada.example" in new_rest.dns_names
    assert new_rest.ip_addresses == old_rest.ip_addresses
    for name in ("server.pem", "rest.pem"):
        verify = openssl(
            "verify", "-CAfile", str(certs_dir / "ca.crt"), str(certs_dir / name)
        )
        assert verify.returncode == 0, verify.stderr
    assert "opcua: the adapter serves it from its next start" in rotated.stdout

    rows = [r for r in audit_rows(tmp_path) if r["event_type"] == "CERTIFICATE_ROTATED"]
    assert [r["details"]["certificate"] for r in rows] == ["opcua", "rest"]
    assert rows[0]["old_value"] == old_server.sha256_fingerprint
    assert rows[0]["new_value"] == new_server.sha256_fingerprint
    assert rows[0]["details"]["previous_path"] == str(certs_dir / "server.pem.previous")
    assert calejo(tmp_path, "audit", "verify").returncode == 0


def test_rotate_refuses_a_certificate_of_another_authority(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    certs.self_signed_certificate(
        foreign / "api.pem",
        foreign / "api.key",
        application_uri="urn:foreign",
        common_name="foreign",
        server=True,
    )
    write_config(
        tmp_path,
        tls={
            "enabled": True,
            "cert_file": str(foreign / "api.pem"),
            "key_file": str(foreign / "api.key"),
        },
    )
    assert calejo(tmp_path, "certs", "generate", "--which", "opcua").returncode == 0
    server_before = (folder(tmp_path) / "server.pem").read_bytes()

    result = calejo(tmp_path, "certs", "rotate")

    assert result.returncode == 1
    assert f"rest certificate {foreign / 'api.pem'}" in result.stderr
    assert "not by the local CA" in result.stderr
    assert (folder(tmp_path) / "server.pem").read_bytes() == server_before
    assert not (folder(tmp_path) / "server.pem.previous").exists()


def test_rotate_without_certificates_says_to_generate(tmp_path: Path) -> None:
    write_config(tmp_path)

    result = calejo(tmp_path, "certs", "rotate")

    assert result.returncode == 1
    assert "calejo certs generate" in result.stderr


@pytest.mark.parametrize("days", ["-1", "soon", "4000"])
def test_bad_days_is_a_usage_error(tmp_path: Path, days: str) -> None:
    write_config(tmp_path)

    result = calejo(tmp_path, "certs", "check", "--days", days)

    assert result.returncode == 2
    assert "expected whole days" in result.stderr


# The health component.


def component(config: Config, services: list[Any]) -> dict[str, Any]:
    health = ops_certs.certificate_check(config, services)()
    return {**health.to_dict(), "critical": health.critical}


def test_the_component_reports_days_left_and_degrades_near_expiry(
    tmp_path: Path,
) -> None:
    config = load_config(write_config(tmp_path, tls={"enabled": True}), environ={})
    ops_certs.generate(config, "rest", lifetime=dt.timedelta(days=400))

    fine = component(config, [])
    assert fine["state"] == "ok"
    assert fine["rest_days_left"] == pytest.approx(400, abs=0.2)
    assert fine["ca_days_left"] == pytest.approx(3650, abs=0.2)
    assert "opcua_days_left" not in fine

    settings = parse_tls(config)
    settings.cert_file.unlink()
    settings.key_file.unlink()
    ops_certs.generate(config, "rest", lifetime=dt.timedelta(days=12))
    near = component(config, [])
    assert near["state"] == "degraded"
    assert near["critical"]
    assert "rest certificate: expires in 12 days" in near["detail"]

    settings.cert_file.write_text("garbage\n", encoding="utf-8")
    broken = component(config, [])
    assert broken["state"] == "degraded"
    assert str(settings.cert_file) in broken["detail"]
    assert broken["rest_days_left"] is None


def test_generate_and_rotate_functions_share_the_rules(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), environ={})
    made = ops_certs.generate(config)
    assert [(c.slot.name, c.action) for c in made] == [
        ("ca", "created"),
        ("opcua", "created"),
    ]

    (folder(tmp_path) / "server.key").unlink()
    with pytest.raises(ops_certs.CertsError) as error:
        ops_certs.generate(config)
    assert str(folder(tmp_path) / "server.key") in str(error.value)

    with pytest.raises(ops_certs.CertsError):
        ops_certs.rotate(config, "opcua")


def test_the_component_is_not_configured_without_certificates_in_use(
    tmp_path: Path,
) -> None:
    config = load_config(write_config(tmp_path), environ={})

    health = component(config, [])

    assert health["state"] == "not_configured"
    assert not health["critical"]
