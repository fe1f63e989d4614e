"""The trust list of the OPC UA server: which client certificates may connect.

A client certificate is trusted when its exact copy lies in the trusted
folder (the usual case for self-signed SCADA client certificates), or when a
CA certificate in that folder issued it directly. It must also be valid
now, and not revoked by a CRL in the CRL folder when there is one.

Files ending in ``.der``, ``.pem``, ``.crt`` or ``.cer`` are read; a PEM
file may hold several certificates. The folders are read again when their
modification time changes, so an operator trusts a new client by copying
its certificate in, without a restart.

A refused certificate is copied (once, up to :data:`MAX_REJECTED` files) to
the rejected folder, named by its SHA-1 thumbprint, so the operator can
move it to the trusted folder after checking it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

logger = logging.getLogger(__name__)

CERTIFICATE_SUFFIXES = (".der", ".pem", ".crt", ".cer")
CRL_SUFFIXES = (".der", ".pem", ".crl")
MAX_REJECTED = 100
"""The rejected folder stops growing at this many files."""

MAX_FILE_BYTES = 1 << 20


class Refusal(Exception):
    """A client certificate is refused; ``code`` says why in OPC UA terms."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True, slots=True)
class _Snapshot:
    leaves: frozenset[bytes]
    authorities: tuple[x509.Certificate, ...]
    revoked: frozenset[tuple[bytes, int]]
    stamp: tuple[float, float]


class TrustList:
    """Client certificates trusted by the OPC UA server (see the module doc)."""

    def __init__(
        self,
        trusted_dir: Path,
        *,
        rejected_dir: Path | None = None,
        crl_dir: Path | None = None,
    ) -> None:
        self.trusted_dir = trusted_dir
        self.rejected_dir = rejected_dir
        self.crl_dir = crl_dir
        self._snapshot = _Snapshot(frozenset(), (), frozenset(), (-1.0, -1.0))
        self._rejected_seen: set[str] = set()

    def ensure_folders(self) -> None:
        """Create the trusted and rejected folders if they are missing."""
        for folder in (self.trusted_dir, self.rejected_dir):
            if folder is not None:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def size(self) -> int:
        """Trusted certificates (leaves and authorities) currently loaded."""
        self._refresh()
        return len(self._snapshot.leaves) + len(self._snapshot.authorities)

    def check(
        self,
        der: bytes,
        *,
        application_uri: str | None = None,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Return the parsed certificate if it is trusted; raise :class:`Refusal`.

        ``application_uri``, when given, must be among the certificate's
        subject alternative names (OPC UA Part 4, CreateSession).
        """
        try:
            cert = x509.load_der_x509_certificate(first_certificate(der))
        except ValueError as exc:
            raise Refusal(
                "BadCertificateInvalid",
                f"client certificate: expected a DER x509 certificate, "
                f"could not parse {len(der)} bytes",
            ) from exc

        try:
            self._check(cert, application_uri, now or dt.datetime.now(dt.UTC))
        except Refusal as refusal:
            self._keep_rejected(cert, der, refusal)
            raise
        return cert

    def _check(
        self, cert: x509.Certificate, application_uri: str | None, now: dt.datetime
    ) -> None:
        name = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Refusal(
                "BadCertificateTimeInvalid",
                f"client certificate {name!r}: valid from "
                f"{cert.not_valid_before_utc.isoformat()} to "
                f"{cert.not_valid_after_utc.isoformat()}, not now",
            )

        if application_uri is not None:
            uris = _uris(cert)
            if application_uri not in uris:
                raise Refusal(
                    "BadCertificateUriInvalid",
                    f"client certificate {name!r}: expected the application uri "
                    f"{application_uri!r} among its names, got {list(uris)}",
                )

        self._refresh()
        snapshot = self._snapshot
        if not self._is_trusted(cert, snapshot, now):
            raise Refusal(
                "BadCertificateUntrusted",
                f"client certificate {name!r} (sha1 {_thumbprint(cert)}) is not "
                f"in the trusted folder {self.trusted_dir} nor issued by a CA there",
            )

        if (cert.issuer.public_bytes(), cert.serial_number) in snapshot.revoked:
            raise Refusal(
                "BadCertificateRevoked",
                f"client certificate {name!r}: revoked by its issuer's CRL",
            )

    @staticmethod
    def _is_trusted(
        cert: x509.Certificate, snapshot: _Snapshot, now: dt.datetime
    ) -> bool:
        if cert.public_bytes(serialization.Encoding.DER) in snapshot.leaves:
            return True

        for authority in snapshot.authorities:
            if authority.subject != cert.issuer:
                continue
            if (
                not authority.not_valid_before_utc
                <= now
                <= authority.not_valid_after_utc
            ):
                continue
            try:
                cert.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False

    def _refresh(self) -> None:
        stamp = (_mtime(self.trusted_dir), _mtime(self.crl_dir))
        if stamp == self._snapshot.stamp:
            return

        leaves: set[bytes] = set()
        authorities: list[x509.Certificate] = []
        for cert in _read_certificates(self.trusted_dir):
            if _is_authority(cert):
                authorities.append(cert)
            leaves.add(cert.public_bytes(serialization.Encoding.DER))

        revoked: set[tuple[bytes, int]] = set()
        for crl in _read_crls(self.crl_dir):
            issuer = crl.issuer.public_bytes()
            revoked.update((issuer, entry.serial_number) for entry in crl)

        self._snapshot = _Snapshot(
            frozenset(leaves), tuple(authorities), frozenset(revoked), stamp
        )
        logger.info(
            "opc ua trust list loaded from %s: %d certificates, %d authorities, "
            "%d revoked serial numbers",
            self.trusted_dir,
            len(leaves),
            len(authorities),
            len(revoked),
        )

    def _keep_rejected(
        self, cert: x509.Certificate, der: bytes, refusal: Refusal
    ) -> None:
        thumbprint = _thumbprint(cert)
        if thumbprint in self._rejected_seen:
            return
        if len(self._rejected_seen) >= MAX_REJECTED:
            return
        self._rejected_seen.add(thumbprint)
        logger.warning("opc ua client refused: %s", refusal)

        if self.rejected_dir is None:
            return
        try:
            existing = sum(1 for _ in self.rejected_dir.iterdir())
            if existing >= MAX_REJECTED:
                return
            target = self.rejected_dir / f"{thumbprint}.der"
            if not target.exists():
                target.write_bytes(der)
        except OSError as exc:
            logger.warning(
                "cannot keep the refused certificate in %s: %s",
                self.rejected_dir,
                exc.strerror or exc,
            )


def first_certificate(der: bytes) -> bytes:
    """The first DER certificate of ``der`` (OPC UA may send a whole chain)."""
    if len(der) < 2 or der[0] != 0x30:
        return der

    first = der[1]
    if first < 0x80:
        end = 2 + first
    else:
        width = first & 0x7F
        if width == 0 or width > 4 or len(der) < 2 + width:
            return der
        end = 2 + width + int.from_bytes(der[2 : 2 + width], "big")
    return der[:end] if end < len(der) else der


def _thumbprint(cert: x509.Certificate) -> str:
    # OPC UA names certificates by their SHA-1 thumbprint.
    return cert.fingerprint(hashes.SHA1()).hex()


def _uris(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def _is_authority(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return bool(constraints.value.ca)


def _mtime(folder: Path | None) -> float:
    if folder is None:
        return 0.0
    try:
        return os.stat(folder).st_mtime
    except OSError:
        return 0.0


def _files(folder: Path | None, suffixes: Iterable[str]) -> list[Path]:
    if folder is None:
        return []
    wanted = tuple(suffixes)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [
        path for path in entries if path.suffix.lower() in wanted and path.is_file()
    ]


def _read_small(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            logger.warning("ignoring %s: larger than %d bytes", path, MAX_FILE_BYTES)
            return None
        return path.read_bytes()
    except OSError as exc:
        logger.warning("cannot read %s: %s", path, exc.strerror or exc)
        return None


def _read_certificates(folder: Path | None) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for path in _files(folder, CERTIFICATE_SUFFIXES):
        data = _read_small(path)
        if data is None:
            continue
        try:
            if b"-----BEGIN" in data:
                certs.extend(x509.load_pem_x509_certificates(data))
            else:
                certs.append(x509.load_der_x509_certificate(data))
        except ValueError:
            logger.warning("ignoring %s: not a PEM or DER certificate", path)
    return certs


def _read_crls(folder: Path | None) -> list[x509.CertificateRevocationList]:
    crls: list[x509.CertificateRevocationList] = []
    for path in _files(folder, CRL_SUFFIXES):
        data = _read_small(path)
        if data is None:
            continue
        try:
            if b"-----BEGIN" in data:
                crls.append(x509.load_pem_x509_crl(data))
            else:
                crls.append(x509.load_der_x509_crl(data))
        except ValueError:
            logger.warning("ignoring %s: not a PEM or DER CRL", path)
    return crls
