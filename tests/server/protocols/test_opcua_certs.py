"""Certificates (calejo_server.certs) and the OPC UA trust list."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from calejo_server import certs
from calejo_server.protocols.opcua_access import Access
from calejo_server.protocols.opcua_trust import Refusal, TrustList, first_certificate

URI = "urn:test-host:calejo:control-adapter"
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> certs.CertificateFiles:
    """A CA and server certificate made once for the module (read-only use)."""
    folder = tmp_path_factory.mktemp("authority")
    return certs.ensure_certificates(folder, URI, ["test-host", "127.0.0.1"], now=NOW)


def der(path: Path) -> bytes:
    return certs.load_certificate(path).public_bytes(serialization.Encoding.DER)


def copy_authority(
    authority: certs.CertificateFiles, folder: Path
) -> certs.CertificateFiles:
    shutil.copytree(authority.folder, folder)
    return certs.CertificateFiles(folder)


# The certificate folder.


def test_first_start_creates_a_ca_and_a_server_certificate(
    authority: certs.CertificateFiles,
) -> None:
    ca = certs.load_certificate(authority.ca_cert)
    server = certs.load_certificate(authority.server_cert)

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    certs.verify_server_certificate(authority, now=NOW)

    info = certs.certificate_info(authority.server_cert)
    assert info.application_uri == URI
    assert "test-host" in info.dns_names and "127.0.0.1" in info.ip_addresses
    assert info.not_after == certs.certificate_expiry(authority.server_cert)
    assert info.not_after - NOW == certs.SERVER_LIFETIME
    assert info.seconds_left(NOW) == certs.SERVER_LIFETIME.total_seconds()
    assert info.to_dict()["application_uri"] == URI

    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage


def test_private_keys_are_private(authority: certs.CertificateFiles) -> None:
    for path in (authority.ca_key, authority.server_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(authority.folder.stat().st_mode) == 0o700
    assert not [p for p in authority.folder.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
def test_openssl_verifies_the_chain(authority: certs.CertificateFiles) -> None:
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(int(NOW.timestamp())),
            "-CAfile",
            str(authority.ca_cert),
            str(authority.server_cert),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stderr
    enddate = subprocess.run(
        ["openssl", "x509", "-enddate", "-noout", "-in", str(authority.server_cert)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert enddate.stdout.startswith("notAfter=")


def test_second_start_keeps_what_is_valid(
    authority: certs.CertificateFiles, tmp_path: Path
) -> None:
    files = copy_authority(authority, tmp_path / "certs")
    before = der(files.server_cert), der(files.ca_cert)

    certs.ensure_certificates(files.folder, URI, ["test-host"], now=NOW)

    assert (der(files.server_cert), der(files.ca_cert)) == before


def test_server_certificate_is_reissued_for_a_new_uri_or_near_expiry(
    authority: certs.CertificateFiles, tmp_path: Path
) -> None:
    files = copy_authority(authority, tmp_path / "certs")
    ca_before = der(files.ca_cert)
    first = der(files.server_cert)

    certs.ensure_certificates(files.folder, "urn:other:calejo:control-adapter", now=NOW)
    second = der(files.server_cert)
    assert second != first
    assert certs.certificate_application_uri(files.server_cert) == (
        "urn:other:calejo:control-adapter"
    )

    late = NOW + certs.SERVER_LIFETIME - dt.timedelta(days=10)
    certs.ensure_certificates(
        files.folder, "urn:other:calejo:control-adapter", now=late
    )
    assert der(files.server_cert) != second
    assert der(files.ca_cert) == ca_before
    certs.verify_server_certificate(files, now=late)


def test_a_half_missing_ca_is_an_error(
    authority: certs.CertificateFiles, tmp_path: Path
) -> None:
    files = copy_authority(authority, tmp_path / "certs")
    files.ca_key.unlink()

    with pytest.raises(certs.CertificateError) as caught:
        certs.ensure_certificates(files.folder, URI, now=NOW)

    assert "ca.key is missing" in str(caught.value)
    assert str(files.folder) in str(caught.value)


def test_a_mismatched_key_is_reported(
    authority: certs.CertificateFiles, tmp_path: Path
) -> None:
    files = copy_authority(authority, tmp_path / "certs")
    shutil.copy(files.ca_key, files.server_key)

    with pytest.raises(certs.CertificateError) as caught:
        certs.verify_server_certificate(files, now=NOW)
    assert "private key does not match" in str(caught.value)

    certs.ensure_certificates(files.folder, URI, now=NOW)
    certs.verify_server_certificate(files, now=NOW)


def test_unreadable_files_give_exact_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n")

    with pytest.raises(certs.CertificateError, match="expected a PEM or DER"):
        certs.load_certificate(garbage)
    with pytest.raises(certs.CertificateError, match="file not found"):
        certs.certificate_expiry(tmp_path / "absent.pem")
    with pytest.raises(certs.CertificateError, match="expected an unencrypted PEM"):
        certs.load_private_key(garbage)


# The trust list.


@pytest.fixture(scope="module")
def clients(
    tmp_path_factory: pytest.TempPathFactory, authority: certs.CertificateFiles
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clients")
    made = {}
    for name in ("alpha", "beta"):
        certs.self_signed_certificate(
            folder / f"{name}.pem",
            folder / f"{name}-key.pem",
            application_uri=f"urn:test:{name}",
            common_name=name,
            now=NOW,
        )
        made[name] = folder / f"{name}.pem"
    certs.issue_certificate(
        certs.load_certificate(authority.ca_cert),
        certs.load_private_key(authority.ca_key),
        folder / "issued.pem",
        folder / "issued-key.pem",
        application_uri="urn:test:issued",
        common_name="issued",
        server=False,
        now=NOW,
    )
    made["issued"] = folder / "issued.pem"
    return made


def trust_list(tmp_path: Path) -> TrustList:
    trust = TrustList(
        tmp_path / "trusted",
        rejected_dir=tmp_path / "rejected",
        crl_dir=tmp_path / "crl",
    )
    trust.ensure_folders()
    return trust


def test_a_copied_certificate_is_trusted_and_others_are_kept_aside(
    tmp_path: Path, clients: dict[str, Path]
) -> None:
    trust = trust_list(tmp_path)
    shutil.copy(clients["alpha"], trust.trusted_dir / "alpha.pem")

    cert = trust.check(der(clients["alpha"]), application_uri="urn:test:alpha", now=NOW)
    assert cert.subject.rfc4514_string().startswith("CN=alpha")

    with pytest.raises(Refusal) as caught:
        trust.check(der(clients["beta"]), now=NOW)
    assert caught.value.code == "BadCertificateUntrusted"

    rejected = list(trust.rejected_dir.iterdir())  # type: ignore[union-attr]
    thumbprint = (
        certs.load_certificate(clients["beta"]).fingerprint(hashes.SHA1()).hex()
    )
    assert [p.name for p in rejected] == [f"{thumbprint}.der"]
    assert rejected[0].read_bytes() == der(clients["beta"])


def test_new_certificates_count_without_a_restart(
    tmp_path: Path, clients: dict[str, Path]
) -> None:
    trust = trust_list(tmp_path)
    with pytest.raises(Refusal):
        trust.check(der(clients["beta"]), now=NOW)

    (trust.trusted_dir / "beta.der").write_bytes(der(clients["beta"]))
    os.utime(trust.trusted_dir, (NOW.timestamp() + 5, NOW.timestamp() + 5))

    trust.check(der(clients["beta"]), now=NOW)
    assert trust.size == 1


def test_a_trusted_ca_vouches_for_what_it_issued(
    tmp_path: Path, clients: dict[str, Path], authority: certs.CertificateFiles
) -> None:
    trust = trust_list(tmp_path)
    shutil.copy(authority.ca_cert, trust.trusted_dir / "ca.crt")

    trust.check(der(clients["issued"]), application_uri="urn:test:issued", now=NOW)
    with pytest.raises(Refusal):
        trust.check(der(clients["alpha"]), now=NOW)


def test_time_uri_and_revocation_are_checked(
    tmp_path: Path, clients: dict[str, Path], authority: certs.CertificateFiles
) -> None:
    trust = trust_list(tmp_path)
    shutil.copy(authority.ca_cert, trust.trusted_dir / "ca.crt")
    issued = der(clients["issued"])

    later = NOW + dt.timedelta(days=3650)
    with pytest.raises(Refusal) as caught:
        trust.check(issued, now=later)
    assert caught.value.code == "BadCertificateTimeInvalid"

    with pytest.raises(Refusal) as caught:
        trust.check(issued, application_uri="urn:someone:else", now=NOW)
    assert caught.value.code == "BadCertificateUriInvalid"

    cert = certs.load_certificate(clients["issued"])
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(NOW)
        .build()
    )
    ca = certs.load_certificate(authority.ca_cert)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=30))
        .add_revoked_certificate(revoked)
        .sign(certs.load_private_key(authority.ca_key), hashes.SHA256())
    )
    assert trust.crl_dir is not None
    trust.crl_dir.mkdir()
    (trust.crl_dir / "site.crl").write_bytes(
        crl.public_bytes(serialization.Encoding.PEM)
    )

    with pytest.raises(Refusal) as caught:
        trust.check(issued, now=NOW)
    assert caught.value.code == "BadCertificateRevoked"


def test_garbage_and_chains(tmp_path: Path, clients: dict[str, Path]) -> None:
    trust = trust_list(tmp_path)
    shutil.copy(clients["alpha"], trust.trusted_dir / "alpha.pem")
    (trust.trusted_dir / "broken.pem").write_text("not a certificate")

    with pytest.raises(Refusal) as caught:
        trust.check(b"\x30\x03\x02\x01\x00", now=NOW)
    assert caught.value.code == "BadCertificateInvalid"
    with pytest.raises(Refusal):
        trust.check(b"", now=NOW)

    alpha, beta = der(clients["alpha"]), der(clients["beta"])
    assert first_certificate(alpha + beta) == alpha
    assert first_certificate(alpha) == alpha
    assert first_certificate(b"\x30\x84\xff\xff\xff\xff") == b"\x30\x84\xff\xff\xff\xff"
    trust.check(alpha + beta, now=NOW)


# The certificate of CreateSession.


def test_create_session_must_reuse_the_channel_certificate(tmp_path: Path) -> None:
    trust = trust_list(tmp_path)
    clients = {}
    for name in ("alpha", "beta"):
        clients[name] = trust.trusted_dir / f"{name}.pem"
        certs.self_signed_certificate(
            clients[name],
            tmp_path / f"{name}-key.pem",
            application_uri=f"urn:test:{name}",
            common_name=name,
        )
    policy = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"
    access = Access(
        None,  # type: ignore[arg-type]
        trust,
        policy_uris={policy},
        allow_none=False,
        allow_anonymous=False,
    )
    params = ua.CreateSessionParameters()
    params.ClientDescription = ua.ApplicationDescription()
    params.ClientDescription.ApplicationUri = "urn:test:alpha"
    params.ClientCertificate = der(clients["alpha"])

    access.check_session_certificate(policy, der(clients["alpha"]), params)

    with pytest.raises(ServiceError) as caught:
        access.check_session_certificate(policy, der(clients["beta"]), params)
    assert caught.value.code == ua.StatusCodes.BadCertificateInvalid

    params.ClientDescription.ApplicationUri = "urn:test:someone-else"
    with pytest.raises(ServiceError) as caught:
        access.check_session_certificate(policy, der(clients["alpha"]), params)
    assert caught.value.code == ua.StatusCodes.BadCertificateUriInvalid
