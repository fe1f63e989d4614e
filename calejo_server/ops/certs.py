"""``calejo certs``: make, rotate and check the adapter's certificates.

The certificate folder (:func:`calejo_server.certs.certificate_folder`)
holds the local CA (``ca.crt``, ``ca.key``), the OPC UA server's
certificate (``server.pem``, ``server.key``) and, with ``tls.enabled``,
the REST API's (``rest.pem``, ``rest.key``; see :mod:`calejo_server.tls`).

``generate``
    Creates what is missing: the CA, the OPC UA certificate (when OPC UA
    is enabled) and the REST certificate (when TLS is enabled, or when
    ``--which rest`` asks for it). ``--days`` is the lifetime of a new
    server certificate (default 730).
``rotate``
    Issues a new certificate and key for the OPC UA server and the REST
    API (those the local CA issued), with the same names; the old pair is
    kept as ``server.pem.previous``/``server.key.previous`` (and
    ``rest.pem.previous``...). The CA itself is not rotated: every client
    that trusts it would have to be given the new one. Audited as
    CERTIFICATE_ROTATED. A running adapter serves the new REST certificate
    to new connections within twice ``tls.reload_interval`` seconds; its
    OPC UA server uses the new one from its next start.
``check``
    Prints subject, issuer, expiry and days left of each certificate and
    exits 1 when one is missing, unreadable, not signed by the local CA
    (server certificates), does not match its key, has expired or expires
    within ``--days`` days (default 30).

:func:`certificate_check` is the ``certificates`` component of
``/health/detailed``: the days left of the CA and of the certificates the
running adapter serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

from cryptography import x509

from calejo_server import audit, certs
from calejo_server.config import Config, load_config
from calejo_server.storage.base import AuditRecord
from calejo_server.tls import (
    TlsConfig,
    cert_matches,
    issue_rest_certificate,
    issued_by,
    parse_tls,
)

if TYPE_CHECKING:
    from calejo_server.api.health import Check, ComponentHealth
    from calejo_server.storage.base import Storage

logger = logging.getLogger(__name__)

PREVIOUS: Final = ".previous"
WARN_DAYS: Final = 30
LIFETIME_DAYS: Final = 730
MAX_LIFETIME_DAYS: Final = 3650
WHICH: Final = ("opcua", "rest", "all")

Name = Literal["ca", "opcua", "rest"]


class CertsError(Exception):
    """A certificate cannot be made or rotated; the message names the file."""


@dataclasses.dataclass(frozen=True, slots=True)
class Slot:
    """One certificate the adapter uses, and whether the configuration needs it."""

    name: Name
    cert: Path
    key: Path
    needed: bool
    why_not: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Assessment:
    """What :func:`assess` found about one slot."""

    slot: Slot
    info: certs.CertificateInfo | None
    problem: str | None
    days_left: float | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def absent(self) -> bool:
        """Not needed and not there: nothing to report on."""
        return not self.slot.needed and self.info is None and self.problem is None


@dataclasses.dataclass(frozen=True, slots=True)
class _OpcUa:
    enabled: bool
    application_uri: str | None
    hostnames: tuple[str, ...]


def _opcua(config: Config) -> _OpcUa:
    from calejo_server.protocols.opcua import parse_opcua_config

    options = parse_opcua_config(config)
    return _OpcUa(
        enabled=options.enabled,
        application_uri=options.application_uri,
        hostnames=(options.host, *options.hostnames),
    )


def certificate_slots(
    config: Config, which: str = "all", *, opcua_enabled: bool | None = None
) -> list[Slot]:
    """The CA and the certificates ``which`` names, with what the config needs."""
    folder = certs.certificate_folder(config)
    files = certs.CertificateFiles(folder)
    tls = parse_tls(config)
    if opcua_enabled is None:
        opcua_enabled = _opcua(config).enabled

    slots: list[Slot] = []
    if which in ("opcua", "all"):
        slots.append(
            Slot(
                "opcua",
                files.server_cert,
                files.server_key,
                needed=opcua_enabled or which == "opcua",
                why_not="opcua.enabled is false",
            )
        )
    if which in ("rest", "all"):
        slots.append(
            Slot(
                "rest",
                tls.cert_file,
                tls.key_file,
                needed=tls.enabled or which == "rest",
                why_not="tls.enabled is false",
            )
        )

    # The CA signs the OPC UA certificate, and a REST one kept beside it.
    signs = [s for s in slots if s.needed and s.cert.parent == folder]
    ca = Slot(
        "ca",
        files.ca_cert,
        files.ca_key,
        needed=bool(signs),
        why_not="no certificate of the folder is in use",
    )
    return [ca, *slots]


# Checking.


def assess(
    slot: Slot,
    ca: x509.Certificate | None,
    *,
    warn_days: float = WARN_DAYS,
    now: dt.datetime | None = None,
) -> Assessment:
    """Read the certificate of ``slot`` and name the first thing wrong with it.

    ``ca`` is the local CA's certificate, against which the OPC UA
    certificate must verify (a REST certificate may come from another
    authority).
    """
    moment = now or dt.datetime.now(dt.UTC)
    if not slot.cert.exists():
        problem = f"{slot.cert}: missing" if slot.needed else None
        return Assessment(slot, None, problem, None)

    try:
        cert = certs.load_certificate(slot.cert)
        info = certs.certificate_info(slot.cert)
    except certs.CertificateError as exc:
        return Assessment(slot, None, str(exc), None)

    days = info.seconds_left(moment) / 86400
    return Assessment(slot, info, _first_problem(slot, cert, ca, days, warn_days), days)


def _first_problem(
    slot: Slot,
    cert: x509.Certificate,
    ca: x509.Certificate | None,
    days: float,
    warn_days: float,
) -> str | None:
    if days <= 0:
        return f"{slot.cert}: expired {cert.not_valid_after_utc.isoformat()}"
    if days <= warn_days:
        return (
            f"{slot.cert}: expires in {days:.1f} days "
            f"({cert.not_valid_after_utc.isoformat()}), within {warn_days:g} days"
        )

    if slot.name == "ca":
        return _key_problem(slot, cert)

    if slot.name == "opcua" and (ca is None or not issued_by(cert, ca)):
        authority = slot.cert.parent / certs.CA_CERT
        return f"{slot.cert}: not signed by the local CA {authority}"
    return _key_problem(slot, cert)


def _key_problem(slot: Slot, cert: x509.Certificate) -> str | None:
    try:
        key = certs.load_private_key(slot.key)
    except certs.CertificateError as exc:
        return str(exc)
    if not cert_matches(cert, key):
        return f"{slot.key}: not the private key of {slot.cert}"
    return None


def assess_all(
    slots: Sequence[Slot],
    *,
    warn_days: float = WARN_DAYS,
    now: dt.datetime | None = None,
) -> list[Assessment]:
    """:func:`assess` each slot against the CA of the first (the ``ca`` slot)."""
    ca: x509.Certificate | None = None
    with contextlib.suppress(certs.CertificateError):
        ca = certs.load_certificate(slots[0].cert)
    return [assess(slot, ca, warn_days=warn_days, now=now) for slot in slots]


def print_assessments(assessments: Sequence[Assessment], out: TextIO) -> None:
    """Subject, issuer, expiry and days left per certificate, or its problem."""
    for item in assessments:
        slot, info = item.slot, item.info
        if item.absent:
            print(f"{slot.name}: not configured ({slot.why_not})", file=out)
            continue

        print(f"{slot.name}: {'ok' if item.ok else item.problem}", file=out)
        print(f"  file:      {slot.cert}", file=out)
        if info is None:
            continue
        print(f"  subject:   {info.subject}", file=out)
        print(f"  issuer:    {info.issuer}", file=out)
        print(f"  not after: {info.not_after.isoformat()}", file=out)
        print(f"  days left: {item.days_left:.1f}", file=out)


# The health component.


class _Cached:
    """Assessments of the slots, read again only when a file changes."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._infos: dict[Name, tuple[certs.CertificateInfo | None, str | None]] = {}

    def get(
        self, slots: Sequence[Slot], now: dt.datetime
    ) -> list[tuple[Slot, certs.CertificateInfo | None, str | None]]:
        key = tuple(
            (slot, _signature(slot.cert), _signature(slot.key)) for slot in slots
        )
        if key != self._key:
            fresh = assess_all(slots, warn_days=0, now=now)
            self._infos = {a.slot.name: (a.info, a.problem) for a in fresh}
            self._key = key
        return [(slot, *self._infos[slot.name]) for slot in slots]


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def certificate_check(
    config: Config,
    services: Sequence[Any],
    *,
    warn_days: float = WARN_DAYS,
) -> Check:
    """The ``certificates`` component of ``/health/detailed``.

    Reports the CA and the certificates the running ``services`` use: the
    OPC UA server's when a service named ``opcua`` listens, the REST
    API's when TLS is on (the CA when either is, or when it exists).
    Degraded when one is missing, unusable, expired or expires within
    ``warn_days``; not configured when no certificate is in use.
    """
    tls = parse_tls(config)
    cache = _Cached()

    def check() -> ComponentHealth:
        from calejo_server.api.health import ComponentHealth

        opcua = any(
            getattr(service, "name", None) == "opcua" and service.addresses()
            for service in services
        )
        slots = certificate_slots(config, "all", opcua_enabled=opcua)
        slots = [s for s in slots if s.name != "rest" or tls.enabled]
        slots = [s for s in slots if s.name != "opcua" or opcua]
        slots = [s for s in slots if s.name != "ca" or opcua or s.cert.exists()]
        if not slots:
            return ComponentHealth(
                "not_configured",
                "no certificate in use (opc ua not running, tls.enabled false)",
                critical=False,
            )
        now = dt.datetime.now(dt.UTC)

        data: dict[str, Any] = {}
        problems: list[str] = []
        for slot, info, problem in cache.get(slots, now):
            days = round(info.seconds_left(now) / 86400, 1) if info else None
            data[f"{slot.name}_days_left"] = days
            data[f"{slot.name}_expires"] = info.not_after.isoformat() if info else None
            if problem is None and days is not None and days <= warn_days:
                problem = f"expires in {days:g} days"
            if problem is not None:
                problems.append(f"{slot.name} certificate: {problem}")

        if problems:
            return ComponentHealth("degraded", "; ".join(problems), data)
        shown = ", ".join(
            f"{slot.name} {data[f'{slot.name}_days_left']:g} days" for slot in slots
        )
        return ComponentHealth("ok", f"days left: {shown}", data)

    return check


# Making and rotating.


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One certificate made or rotated, for the output and the audit log."""

    slot: Slot
    action: Literal["created", "rotated", "kept"]
    info: certs.CertificateInfo
    previous: certs.CertificateInfo | None = None

    def audit_record(self, user: str) -> AuditRecord:
        event_type = (
            audit.CERTIFICATE_ROTATED
            if self.action == "rotated"
            else audit.CERTIFICATE_CREATED
        )
        details: dict[str, Any] = {
            "certificate": self.slot.name,
            "path": str(self.slot.cert),
            "subject": self.info.subject,
            "serial_number": format(self.info.serial_number, "x"),
            "sha256_fingerprint": self.info.sha256_fingerprint,
            "not_after": self.info.not_after.isoformat(),
        }
        old_value = None
        if self.previous is not None:
            details["previous_path"] = str(_previous(self.slot.cert))
            details["previous_serial_number"] = format(self.previous.serial_number, "x")
            details["previous_not_after"] = self.previous.not_after.isoformat()
            old_value = self.previous.sha256_fingerprint
        return AuditRecord(
            event_type=event_type,
            severity=audit.severity_of(event_type),
            user=user,
            protocol="CLI",
            old_value=old_value,
            new_value=self.info.sha256_fingerprint,
            outcome=self.action,
            details=details,
        )


def generate(
    config: Config,
    which: str = "all",
    *,
    lifetime: dt.timedelta = certs.SERVER_LIFETIME,
    now: dt.datetime | None = None,
) -> list[Change]:
    """Create the certificates of ``which`` that are missing; see the module."""
    moment = now or dt.datetime.now(dt.UTC)
    folder = certs.certificate_folder(config)
    files = certs.CertificateFiles(folder)
    opcua = _opcua(config)
    slots = {slot.name: slot for slot in certificate_slots(config, which)}
    changes: list[Change] = []

    ca_existed = files.ca_cert.exists()
    certs.ensure_authority(folder, now=moment)
    action: Literal["created", "kept"] = "kept" if ca_existed else "created"
    changes.append(Change(slots["ca"], action, certs.certificate_info(files.ca_cert)))

    opcua_slot = slots.get("opcua")
    if opcua_slot is not None and opcua_slot.needed:
        if _pair_missing(opcua_slot):
            _issue_opcua(opcua, files, lifetime, moment)
            action = "created"
        else:
            action = "kept"
        info = certs.certificate_info(opcua_slot.cert)
        changes.append(Change(opcua_slot, action, info))

    rest_slot = slots.get("rest")
    if rest_slot is not None and rest_slot.needed:
        tls = parse_tls(config)
        if _pair_missing(rest_slot):
            issue_rest_certificate(tls, lifetime=lifetime, now=moment)
            action = "created"
        else:
            action = "kept"
        changes.append(Change(rest_slot, action, certs.certificate_info(tls.cert_file)))
    return changes


def _pair_missing(slot: Slot) -> bool:
    have_cert, have_key = slot.cert.exists(), slot.key.exists()
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        missing = slot.key if have_cert else slot.cert
        raise CertsError(
            f"{slot.name} certificate: expected both {slot.cert} and {slot.key}, "
            f"{missing} is missing; restore it, or remove both to create a new pair"
        )
    return True


def _issue_opcua(
    opcua: _OpcUa,
    files: certs.CertificateFiles,
    lifetime: dt.timedelta,
    now: dt.datetime,
    *,
    previous: x509.Certificate | None = None,
    cert_path: Path | None = None,
    key_path: Path | None = None,
) -> None:
    uri = opcua.application_uri
    names = list(certs.default_hostnames(opcua.hostnames))
    common_name = f"Calejo Control Adapter ({names[0]})"
    if previous is not None:
        uri = uri or _first_uri(previous)
        names = _names_of(previous, names)
        common_name = _common_name(previous) or common_name

    ca_cert, ca_key = certs.ensure_authority(files.folder, now=now)
    certs.issue_certificate(
        ca_cert,
        ca_key,
        cert_path or files.server_cert,
        key_path or files.server_key,
        application_uri=uri or certs.default_application_uri(),
        common_name=common_name,
        hostnames=names,
        server=True,
        lifetime=lifetime,
        now=now,
    )


def rotate(
    config: Config,
    which: str = "all",
    *,
    lifetime: dt.timedelta = certs.SERVER_LIFETIME,
    now: dt.datetime | None = None,
) -> list[Change]:
    """Issue new server certificates (same names), keeping the old as ``.previous``.

    ``which`` ``all`` rotates the OPC UA certificate and, when TLS is on or
    ``rest.pem`` exists, the REST one. Raises CertsError when a certificate
    to rotate is missing or was not issued by the local CA.
    """
    moment = now or dt.datetime.now(dt.UTC)
    folder = certs.certificate_folder(config)
    files = certs.CertificateFiles(folder)
    if not files.ca_cert.exists() or not files.ca_key.exists():
        raise CertsError(
            f"certificate authority {files.ca_cert}: missing; nothing to rotate "
            "(calejo certs generate creates the certificates)"
        )
    ca_cert, _ = certs.ensure_authority(folder, now=moment)

    slots = [s for s in certificate_slots(config, which)[1:] if _to_rotate(s, which)]
    if not slots:
        raise CertsError(
            f"no certificate to rotate in {folder} for --which {which} "
            "(calejo certs generate creates them)"
        )

    opcua = _opcua(config)
    tls = parse_tls(config)
    planned = [(slot, _rotatable(slot, ca_cert)) for slot in slots]
    changes: list[Change] = []
    for slot, old in planned:
        before = certs.certificate_info(slot.cert)
        staged_cert = slot.cert.with_name(f".{slot.cert.name}.rotating")
        staged_key = slot.key.with_name(f".{slot.key.name}.rotating")
        try:
            if slot.name == "opcua":
                _issue_opcua(
                    opcua,
                    files,
                    lifetime,
                    moment,
                    previous=old,
                    cert_path=staged_cert,
                    key_path=staged_key,
                )
            else:
                issue_rest_certificate(
                    tls,
                    hostnames=_names_of(old, list(tls.names())),
                    lifetime=lifetime,
                    cert_path=staged_cert,
                    key_path=staged_key,
                    now=moment,
                )
            _keep_previous(slot.cert)
            _keep_previous(slot.key)
            os.replace(staged_key, slot.key)
            os.replace(staged_cert, slot.cert)
        finally:
            for path in (staged_cert, staged_key):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        logger.info("rotated the %s certificate %s", slot.name, slot.cert)
        changes.append(
            Change(slot, "rotated", certs.certificate_info(slot.cert), before)
        )
    return changes


def _to_rotate(slot: Slot, which: str) -> bool:
    if which != "all":
        return True
    return slot.needed or slot.cert.exists()


def _rotatable(slot: Slot, ca: x509.Certificate) -> x509.Certificate:
    if not slot.cert.exists() or not slot.key.exists():
        missing = slot.cert if not slot.cert.exists() else slot.key
        raise CertsError(
            f"{slot.name} certificate: {missing} is missing, nothing to rotate "
            "(calejo certs generate creates it)"
        )
    try:
        cert = certs.load_certificate(slot.cert)
    except certs.CertificateError as exc:
        raise CertsError(str(exc)) from exc
    if not issued_by(cert, ca):
        raise CertsError(
            f"{slot.name} certificate {slot.cert}: issued by "
            f"{cert.issuer.rfc4514_string()}, not by the local CA; replace it "
            "with a new one from that authority"
        )
    return cert


def _keep_previous(path: Path) -> None:
    """Make ``<path>.previous`` the current file (atomically, same mode)."""
    staged = path.with_name(f".{path.name}{PREVIOUS}.tmp")
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    os.link(path, staged)
    os.replace(staged, _previous(path))


def _previous(path: Path) -> Path:
    return path.with_name(path.name + PREVIOUS)


def _first_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _names_of(cert: x509.Certificate, extra: Sequence[str]) -> list[str]:
    """The DNS names and addresses of ``cert``, then those of ``extra``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return list(extra)
    names = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return list(dict.fromkeys([*names, *extra]))


def _common_name(cert: x509.Certificate) -> str | None:
    found = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if not found:
        return None
    value = found[0].value
    return value if isinstance(value, str) else value.decode()


# The command.


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Make, rotate or check the certificates of the adapter: the local CA, "
        "the OPC UA server's and the REST API's (TLS)."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    for action, text in (
        ("generate", "create the certificates that are missing"),
        ("rotate", "issue new server certificates, keeping the old as *.previous"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument(
            "--days",
            type=_days(MAX_LIFETIME_DAYS),
            default=LIFETIME_DAYS,
            help=f"lifetime of a new certificate in days (default {LIFETIME_DAYS})",
        )
        _which(sub)

    check = actions.add_parser(
        "check",
        help="print each certificate's expiry; exit 1 when one needs attention",
    )
    check.add_argument(
        "--days",
        type=_days(MAX_LIFETIME_DAYS),
        default=WARN_DAYS,
        help=f"exit 1 when a certificate expires within this many days "
        f"(default {WARN_DAYS})",
    )
    _which(check)


def _which(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--which",
        choices=WHICH,
        default="all",
        help="the OPC UA certificate, the REST one, or all (the CA always)",
    )


def _days(high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected whole days from 0 to {high}, got {text!r}"
            )
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    """``calejo certs ACTION``."""
    from calejo_server import cli

    config = load_config(getattr(args, "config", None))
    if args.action == "check":
        assessments = assess_all(
            certificate_slots(config, args.which), warn_days=args.days
        )
        return report_check(assessments, sys.stdout)

    if args.days < 1:
        raise cli.CommandError(
            "--days: expected a lifetime of at least 1 day, got 0", cli.EXIT_USAGE
        )
    lifetime = dt.timedelta(days=args.days)
    return asyncio.run(_change(config, args.action, args.which, lifetime))


def report_check(assessments: Sequence[Assessment], out: TextIO) -> int:
    """Print the assessments and a verdict; 0 when all are fine, else 1."""
    print_assessments(assessments, out)
    bad = [a.slot.name for a in assessments if not a.ok]
    if bad:
        print(f"needs attention: {', '.join(bad)}", file=out)
        return 1
    return 0


async def _change(
    config: Config, action: str, which: str, lifetime: dt.timedelta
) -> int:
    from calejo_server import cli

    async with cli.opened_storage(config, read_only=True) as storage:
        try:
            if action == "generate":
                changes = await asyncio.to_thread(
                    generate, config, which, lifetime=lifetime
                )
            else:
                changes = await asyncio.to_thread(
                    rotate, config, which, lifetime=lifetime
                )
        except (CertsError, certs.CertificateError) as exc:
            raise cli.CommandError(str(exc)) from exc

        _print_changes(changes, sys.stdout)
        await _audit(storage, changes, cli.operator_name())

    if action == "rotate":
        _print_pickup(config, changes, sys.stdout)
    return 0


async def _audit(storage: Storage, changes: Sequence[Change], user: str) -> None:
    from calejo_server import cli
    from calejo_server.storage.base import StorageError

    records = [c.audit_record(user) for c in changes if c.action != "kept"]
    if not records:
        return
    try:
        await storage.write(records)
    except StorageError as exc:
        raise cli.CommandError(
            f"certificates changed but the audit log could not record it: {exc}"
        ) from exc


def _print_changes(changes: Sequence[Change], out: TextIO) -> None:
    for change in changes:
        info = change.info
        days = info.seconds_left() / 86400
        print(
            f"{change.slot.name}: {change.action} {change.slot.cert} "
            f"(serial {info.serial_number:x}, expires "
            f"{info.not_after.isoformat()}, {days:.0f} days)",
            file=out,
        )
        if change.previous is not None:
            print(
                f"  previous kept as {_previous(change.slot.cert)} "
                f"(serial {change.previous.serial_number:x})",
                file=out,
            )


def _print_pickup(config: Config, changes: Sequence[Change], out: TextIO) -> None:
    from calejo_server.app import DataDirLock

    running = DataDirLock.holder(config.server.data_dir)
    names = {change.slot.name for change in changes}
    tls: TlsConfig = parse_tls(config)
    if "rest" in names and tls.enabled:
        print(
            "rest: a running adapter serves the new certificate to new "
            f"connections within {2 * tls.reload_interval:g} s",
            file=out,
        )
    if "opcua" in names:
        when = (
            f"restart the adapter (pid {running}) to serve it"
            if running
            else "the adapter serves it from its next start"
        )
        print(f"opcua: {when}", file=out)
