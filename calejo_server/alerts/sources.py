"""Where alerts come from: engine events, the security directory, certificates.

Each source turns what it sees into the arguments of
:meth:`~calejo_server.alerts.service.AlertService.raise_alert`:

=========================  ==========  ==========================================
alert kind                 severity    raised when
=========================  ==========  ==========================================
emergency_stop             CRITICAL    an emergency stop is activated
emergency_stop_cleared     HIGH        it is cleared
failsafe_entered           HIGH        the watchdog puts a station in failsafe
failsafe_exited            MEDIUM      a fresh setpoint or plan ends it
storage_degraded           CRITICAL    the database is unreachable (spooling)
storage_recovered          MEDIUM      it answers again, spool delivered
plc_heartbeat_lost         HIGH        a PLC stops writing its heartbeat
plc_heartbeat_restored     LOW         it writes it again
account_locked             HIGH        too many failed logins lock an account
source_throttled           HIGH        an address is blocked for failing to log in
<name>_certificate_expiring  HIGH      under ``warn_days`` left (30)
                           CRITICAL    under ``critical_days`` left (7) or expired
<name>_certificate_unreadable HIGH     the file is there but is no certificate
=========================  ==========  ==========================================

``<name>`` is ``ca`` (the local CA), ``opcua`` (the OPC UA server
certificate) or ``rest`` (the REST API's TLS certificate, when TLS is on).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from calejo_server import audit, certs
from calejo_server.alerts.settings import CertificateSettings
from calejo_server.config import Config
from calejo_server.engine import events
from calejo_server.storage.base import AuditRecord, Severity
from calejo_server.tls import parse_tls

__all__ = [
    "CERTIFICATE_NAMES",
    "EVENT_ALERTS",
    "SECURITY_ALERTS",
    "AlertArgs",
    "CertificateCheck",
    "certificate_alert",
    "certificate_paths",
    "check_certificate",
    "event_alert",
    "security_alert",
]

EVENT_ALERTS: Final[Mapping[str, Severity]] = {
    events.EMERGENCY_STOP: "CRITICAL",
    events.EMERGENCY_STOP_CLEARED: "HIGH",
    events.FAILSAFE_ENTERED: "HIGH",
    events.FAILSAFE_EXITED: "MEDIUM",
    events.STORAGE_DEGRADED: "CRITICAL",
    events.STORAGE_RECOVERED: "MEDIUM",
    "plc_heartbeat_lost": "HIGH",
    "plc_heartbeat_restored": "LOW",
}
"""The engine events that raise an alert, by event kind, and its severity."""

SECURITY_ALERTS: Final[Mapping[str, tuple[str, Severity]]] = {
    audit.ACCOUNT_LOCKED: ("account_locked", "HIGH"),
    audit.SOURCE_THROTTLED: ("source_throttled", "HIGH"),
}
"""Audit events of the security directory that raise an alert: kind, severity."""

CERTIFICATE_NAMES: Final[Mapping[str, str]] = {
    "ca": "local CA certificate",
    "opcua": "OPC UA server certificate",
    "rest": "REST API TLS certificate",
}


@dataclasses.dataclass(frozen=True, slots=True)
class AlertArgs:
    """The arguments of one ``raise_alert`` call."""

    kind: str
    severity: Severity
    summary: str
    station_id: str | None = None
    pump_id: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def event_alert(event: events.EngineEvent) -> AlertArgs | None:
    """The alert an engine event raises, or None for events that raise none."""
    severity = EVENT_ALERTS.get(event.kind)
    if severity is None:
        return None
    details = {**event.details, "at": audit.iso_utc(event.at)}
    return AlertArgs(
        kind=event.kind,
        severity=severity,
        summary=event.message,
        station_id=event.station_id,
        pump_id=event.pump_id,
        details=details,
    )


def security_alert(record: AuditRecord) -> AlertArgs | None:
    """The alert of a lockout or a blocked source, or None for other records."""
    known = SECURITY_ALERTS.get(record.event_type)
    if known is None:
        return None

    kind, severity = known
    details: dict[str, Any] = {
        **record.details,
        "user": record.user,
        "source_address": record.source_address,
        "protocol": record.protocol,
    }
    source = record.source_address or "an unknown address"
    if kind == "account_locked":
        summary = (
            f"account {record.user!r} locked until "
            f"{record.details.get('locked_until')} after "
            f"{record.details.get('failed_logins')} failed logins (last from "
            f"{source} over {record.protocol})"
        )
    else:
        summary = (
            f"source {source} blocked for {record.details.get('blocked_seconds')} s: "
            f"more than {int(record.details.get('failures', 1)) - 1} failed "
            f"authentications within {record.details.get('window_seconds')} s "
            f"over {record.protocol}"
        )
    return AlertArgs(kind=kind, severity=severity, summary=summary, details=details)


@dataclasses.dataclass(frozen=True, slots=True)
class CertificateCheck:
    """What one look at a certificate file found."""

    name: str
    path: Path
    not_after: dt.datetime | None = None
    days_left: float | None = None
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "certificate": self.name,
            "path": str(self.path),
            "not_after": audit.iso_utc(self.not_after) if self.not_after else None,
            "days_left": (
                round(self.days_left, 2) if self.days_left is not None else None
            ),
            "problem": self.problem,
        }


def certificate_paths(config: Config) -> dict[str, Path]:
    """The certificates the adapter serves with, by name.

    The local CA and, unless ``opcua.enabled`` is false, the OPC UA server
    certificate from the certificate folder; with ``tls.enabled``, the
    REST API's certificate (see :mod:`calejo_server.tls`).
    """
    folder = certs.certificate_folder(config)
    paths = {"ca": folder / certs.CA_CERT}

    opcua = config.raw.get("opcua")
    if not (isinstance(opcua, Mapping) and opcua.get("enabled") is False):
        paths["opcua"] = folder / certs.SERVER_CERT

    tls = parse_tls(config)
    if tls.enabled:
        paths["rest"] = tls.cert_file
    return paths


def check_certificate(
    name: str, path: Path, now: dt.datetime
) -> CertificateCheck | None:
    """Read the certificate at ``path``; None when there is no such file."""
    if not path.exists():
        return None
    try:
        expiry = certs.certificate_expiry(path)
    except certs.CertificateError as exc:
        return CertificateCheck(name, path, problem=str(exc))
    days = (expiry - now).total_seconds() / 86400.0
    return CertificateCheck(name, path, not_after=expiry, days_left=days)


def certificate_alert(
    check: CertificateCheck, settings: CertificateSettings
) -> AlertArgs | None:
    """The alert a certificate check raises, or None when it has time left."""
    label = CERTIFICATE_NAMES.get(check.name, f"{check.name} certificate")
    details = check.to_dict()
    if check.problem is not None:
        return AlertArgs(
            kind=f"{check.name}_certificate_unreadable",
            severity="HIGH",
            summary=f"{label} {check.path} cannot be read: {check.problem}",
            details=details,
        )

    days = check.days_left
    assert days is not None and check.not_after is not None
    if days >= settings.warn_days:
        return None

    severity: Severity = "CRITICAL" if days < settings.critical_days else "HIGH"
    until = audit.iso_utc(check.not_after)
    if days <= 0:
        ago = math.floor(-days)
        summary = f"{label} {check.path} expired {ago} day(s) ago ({until})"
    else:
        summary = (
            f"{label} {check.path} expires in {math.floor(days)} day(s) ({until}); "
            "renew it (calejo certs rotate)"
        )
    return AlertArgs(
        kind=f"{check.name}_certificate_expiring",
        severity=severity,
        summary=summary,
        details=details,
    )
