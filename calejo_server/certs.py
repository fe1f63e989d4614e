"""Certificates of the adapter: a local CA and the server certificate it signs.

The certificate folder (``data_dir/certs`` by default, ``/app/certs`` in the
container) holds PEM files:

``ca.crt``, ``ca.key``
    The local certificate authority. Its key signs the server certificate
    (and, on request, client certificates for SCADA systems).
``server.pem``, ``server.key``
    The certificate and private key of the OPC UA server. The subject
    alternative names carry the server's application URI (OPC UA clients
    check it) and the host names and addresses it answers on.

so that ``openssl verify -CAfile ca.crt server.pem`` passes and
``openssl x509 -enddate -noout -in server.pem`` shows the expiry. Private
keys are written with mode 0600, every file atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from calejo_server.config import Config, ConfigError

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

KEY_SIZE = 2048
"""RSA key size, bits: within what Basic256Sha256 and Aes256_Sha256_RsaPss accept."""

CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=730)
RENEW_WITHIN = dt.timedelta(days=30)
"""A server certificate closer than this to its expiry is reissued at start."""

_BACKDATE = dt.timedelta(minutes=5)
_ORGANIZATION = "Calejo"


class CertificateError(Exception):
    """A certificate or key is missing, unreadable or does not fit the others."""


@dataclasses.dataclass(frozen=True, slots=True)
class CertificateFiles:
    """Where the certificates and keys of one adapter live."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.folder / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY


@dataclasses.dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What an operator needs to know about one certificate."""

    path: Path
    subject: str
    issuer: str
    serial_number: int
    not_before: dt.datetime
    not_after: dt.datetime
    application_uri: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    sha256_fingerprint: str

    def seconds_left(self, now: dt.datetime | None = None) -> float:
        """Seconds until the certificate expires (negative once it has)."""
        moment = now or dt.datetime.now(dt.UTC)
        return (self.not_after - moment).total_seconds()

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "subject": self.subject,
            "issuer": self.issuer,
            "serial_number": format(self.serial_number, "x"),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "application_uri": self.application_uri,
            "dns_names": list(self.dns_names),
            "ip_addresses": list(self.ip_addresses),
            "sha256_fingerprint": self.sha256_fingerprint,
        }


def certificate_folder(config: Config, data_dir: Path | None = None) -> Path:
    """The certificate folder: ``certificates.dir``, else ``data_dir/certs``.

    The ``certificates:`` section of the configuration::

        certificates:
          dir: /app/certs        # default: <data_dir>/certs

    Raises ConfigError for an unknown key or a value that is not a path.
    """
    where = str(config.source) if config.source else "<demonstration configuration>"
    base = data_dir if data_dir is not None else config.server.data_dir
    section = config.raw.get("certificates")
    if section is None:
        return base / "certs"

    if not isinstance(section, Mapping):
        raise ConfigError(
            f"{where}: certificates: expected a mapping, got {type(section).__name__}",
            source=where,
            key_path="certificates",
        )

    for key in section:
        if key != "dir":
            raise ConfigError(
                f"{where}: certificates.{key}: unknown key; expected dir",
                source=where,
                key_path=f"certificates.{key}",
            )

    folder = section.get("dir")
    if folder is None:
        return base / "certs"
    if not isinstance(folder, str) or not folder:
        raise ConfigError(
            f"{where}: certificates.dir: expected a folder path, got {folder!r}",
            source=where,
            key_path="certificates.dir",
        )
    return Path(folder)


def default_application_uri(hostname: str | None = None) -> str:
    """The OPC UA application URI of an adapter on ``hostname``."""
    return f"urn:{hostname or socket.gethostname()}:calejo:control-adapter"


def default_hostnames(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Names and addresses for a server certificate: this host, loopback, extra."""
    names: list[str] = [socket.gethostname(), "localhost", "127.0.0.1"]
    for name in extra:
        if name and name not in ("0.0.0.0", "::") and name not in names:
            names.append(name)
    return tuple(dict.fromkeys(names))


# Reading.


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM (or DER) certificate, with an exact error when that fails."""
    data = _read(path, "certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(
            f"certificate {path}: expected a PEM or DER x509 certificate, "
            f"could not parse it ({exc})"
        ) from exc


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Read an unencrypted PEM RSA private key."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"private key {path}: expected an unencrypted PEM private key, "
            f"could not load it ({exc})"
        ) from exc

    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError(
            f"private key {path}: expected an RSA key, got {type(key).__name__}"
        )
    return key


def certificate_info(path: Path) -> CertificateInfo:
    """Subject, issuer, validity and names of the certificate at ``path``."""
    cert = load_certificate(path)
    uris, dns, ips = _san_values(cert)
    return CertificateInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial_number=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        application_uri=uris[0] if uris else None,
        dns_names=dns,
        ip_addresses=ips,
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(":"),
    )


def certificate_expiry(path: Path) -> dt.datetime:
    """When the certificate at ``path`` expires (timezone-aware, UTC)."""
    return load_certificate(path).not_valid_after_utc


def certificate_application_uri(path: Path) -> str | None:
    """The first URI among the subject alternative names, if any."""
    uris, _, _ = _san_values(load_certificate(path))
    return uris[0] if uris else None


# Checking.


def verify_server_certificate(
    files: CertificateFiles, now: dt.datetime | None = None
) -> None:
    """Check that the server certificate is valid now, signed by the CA and
    matches its key. Raises CertificateError naming what is wrong."""
    moment = now or dt.datetime.now(dt.UTC)
    ca = load_certificate(files.ca_cert)
    cert = load_certificate(files.server_cert)
    key = load_private_key(files.server_key)

    problem = _server_problem(cert, key, ca, None, moment, dt.timedelta(0))
    if problem is not None:
        raise CertificateError(f"server certificate {files.server_cert}: {problem}")


def _server_problem(
    cert: x509.Certificate,
    key: rsa.RSAPrivateKey,
    ca: x509.Certificate,
    application_uri: str | None,
    now: dt.datetime,
    renew_within: dt.timedelta,
) -> str | None:
    if not _same_public_key(cert, key):
        return "its private key does not match it"

    if cert.issuer != ca.subject:
        expected = ca.subject.rfc4514_string()
        return f"expected issuer {expected}, got {cert.issuer.rfc4514_string()}"

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        return f"not signed by the local CA ({exc})"
    except InvalidSignature:
        return "its signature does not verify against the local CA"

    if cert.not_valid_before_utc > now:
        return f"not valid before {cert.not_valid_before_utc.isoformat()}"

    if cert.not_valid_after_utc - renew_within <= now:
        return f"expires {cert.not_valid_after_utc.isoformat()}"

    if application_uri is not None:
        uris, _, _ = _san_values(cert)
        if application_uri not in uris:
            return (
                f"expected application uri {application_uri!r} among its names, "
                f"got {list(uris)}"
            )
    return None


# Writing.


def ensure_certificates(
    folder: Path,
    application_uri: str,
    hostnames: Sequence[str] = (),
    *,
    renew_within: dt.timedelta = RENEW_WITHIN,
    key_size: int = KEY_SIZE,
    now: dt.datetime | None = None,
) -> CertificateFiles:
    """Make sure ``folder`` holds a CA and a server certificate signed by it.

    Creates what is missing. Reissues the server certificate (with a new key)
    when it does not match its key or the CA, lacks ``application_uri``, or
    expires within ``renew_within``. A CA with only one of its two files is
    an error: replacing it silently would break clients that trust it.
    """
    files = CertificateFiles(folder)
    moment = now or dt.datetime.now(dt.UTC)
    names = tuple(hostnames) or default_hostnames()
    _make_private_folder(folder)

    ca_cert, ca_key = _ensure_ca(files, key_size, moment)

    if files.server_cert.exists() and files.server_key.exists():
        cert = load_certificate(files.server_cert)
        key = load_private_key(files.server_key)
        problem = _server_problem(
            cert, key, ca_cert, application_uri, moment, renew_within
        )
        if problem is None:
            return files
        logger.warning(
            "reissuing the server certificate %s: %s", files.server_cert, problem
        )
    else:
        logger.info("creating the server certificate %s", files.server_cert)

    issue_certificate(
        ca_cert,
        ca_key,
        files.server_cert,
        files.server_key,
        application_uri=application_uri,
        common_name=f"Calejo Control Adapter ({names[0]})",
        hostnames=names,
        server=True,
        key_size=key_size,
        now=moment,
    )
    return files


def ensure_authority(
    folder: Path, *, key_size: int = KEY_SIZE, now: dt.datetime | None = None
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """The local CA of ``folder`` (certificate and key), created if missing.

    A CA with only one of its two files, or a key that does not match the
    certificate, is a CertificateError.
    """
    _make_private_folder(folder)
    return _ensure_ca(
        CertificateFiles(folder), key_size, now or dt.datetime.now(dt.UTC)
    )


def _ensure_ca(
    files: CertificateFiles, key_size: int, now: dt.datetime
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    have_cert = files.ca_cert.exists()
    have_key = files.ca_key.exists()

    if have_cert and have_key:
        cert = load_certificate(files.ca_cert)
        key = load_private_key(files.ca_key)
        if not _same_public_key(cert, key):
            raise CertificateError(
                f"certificate authority {files.ca_cert}: its key {files.ca_key} "
                "does not match it"
            )
        return cert, key

    if have_cert or have_key:
        missing = files.ca_key if have_cert else files.ca_cert
        raise CertificateError(
            f"certificate authority in {files.folder}: expected both {CA_CERT} and "
            f"{CA_KEY}, {missing.name} is missing; restore it or remove both to "
            "create a new authority"
        )

    logger.info("creating the local certificate authority %s", files.ca_cert)
    key = rsa.generate_private_key(public_exponent=65537, key_size=max(key_size, 2048))
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"Calejo Control Adapter CA ({socket.gethostname()})",
            ),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(files.ca_key, key)
    _write_cert(files.ca_cert, cert)
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    cert_path: Path,
    key_path: Path,
    *,
    application_uri: str,
    common_name: str,
    hostnames: Sequence[str] = (),
    server: bool,
    key_size: int = KEY_SIZE,
    lifetime: dt.timedelta = SERVER_LIFETIME,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Issue an OPC UA application certificate signed by the CA, with a new key.

    ``server`` selects the extended key usage: server and client
    authentication for the adapter, client authentication for a SCADA client.
    """
    moment = now or dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    builder = _application_builder(
        subject,
        ca_cert.subject,
        key,
        application_uri,
        hostnames,
        server,
        moment,
        lifetime,
    )
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
        critical=False,
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert


def self_signed_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    application_uri: str,
    common_name: str,
    hostnames: Sequence[str] = (),
    server: bool = False,
    key_size: int = KEY_SIZE,
    lifetime: dt.timedelta = SERVER_LIFETIME,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A self-signed OPC UA application certificate, as many SCADA clients use."""
    moment = now or dt.datetime.now(dt.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    builder = _application_builder(
        subject, subject, key, application_uri, hostnames, server, moment, lifetime
    )
    cert = builder.sign(key, hashes.SHA256())
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert


def _application_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: rsa.RSAPrivateKey,
    application_uri: str,
    hostnames: Sequence[str],
    server: bool,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.CertificateBuilder:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))

    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )


# Small pieces.


def _san_values(
    cert: x509.Certificate,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), (), ()
    uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return uris, dns, ips


def _same_public_key(cert: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return mine == theirs


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(f"{what} {path}: file not found") from exc
    except OSError as exc:
        raise CertificateError(
            f"{what} {path}: cannot read it ({exc.strerror})"
        ) from exc


def _make_private_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(
            f"certificate folder {folder}: cannot create it ({exc.strerror})"
        ) from exc


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(path, data, 0o600)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
