"""``calejo security``: the adapter's security seen from outside and inside.

``scan``
    probes a running adapter as a client on the network would: TLS on the
    REST API (protocol, certificate), its security headers, that requests
    without a valid token are refused, the OPC UA endpoints offered (no
    security None, no anonymous logins, unless the configuration asks for
    them; a session without security refused), Modbus TCP (the allow-list
    of ``modbus.allowed_clients``, whether this host is answered); and, on
    the adapter's host, the modes of the configuration file, the data
    folder and database, the private keys and the backup archives.
``policy``
    the configuration against the security policy: lockout, session
    timeouts, password length, TLS, OPC UA security, the Modbus
    allow-list, alert channels, backups, log files, the watchdog.
``controls``
    the IEC 62443-3-3 system requirements (or the ISO/IEC 27001 Annex A
    controls) as ``calejo compliance-report`` evaluates them, one line
    each; not recorded in the audit log.
``risk``
    a risk register: each threat to the adapter with its impact, the
    likelihood that the findings of scan, policy and controls leave, and
    the resulting level.
``assess``
    all of the above in one verdict; ``report`` writes it as one Markdown
    or JSON document.

Findings have a severity, CRITICAL, HIGH, MEDIUM or LOW (passed checks
are listed as ``ok``). Exit codes: 0 nothing at or above ``--fail-on``
(default HIGH; for ``controls``: every control met; for ``risk``: no risk
HIGH or CRITICAL), 1 otherwise, 2 the adapter unreachable or a usage
error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import ssl
import stat
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from calejo_server.config import Config, load_config
from calejo_server.ops import remote as remote_mod
from calejo_server.ops.remote import Remote, RemoteError

EXIT_OK: Final = 0
EXIT_FINDINGS: Final = 1
EXIT_UNREACHABLE: Final = 2

Severity = Literal["CRITICAL", "HIGH", "MEDIUM", "LOW"]
SEVERITIES: Final[tuple[Severity, ...]] = ("CRITICAL", "HIGH", "MEDIUM", "LOW")
_RANK: Final = {name: len(SEVERITIES) - i for i, name in enumerate(SEVERITIES)}

CERTIFICATE_WARN_DAYS: Final = 30
MAX_LOGIN_ATTEMPTS: Final = 10
MIN_LOCKOUT_SECONDS: Final = 300.0
MAX_IDLE_SECONDS: Final = 1800.0
MAX_SESSION_SECONDS: Final = 86400.0
MAX_SOURCE_FAILURES: Final = 100
MAX_WATCHDOG_SECONDS: Final = 3600.0
MAX_BACKUP_INTERVAL: Final = 26 * 3600.0
DEPRECATED_POLICIES: Final = frozenset({"Basic128Rsa15", "Basic256", "None"})
PROBE_ID: Final = "calejo-security-scan"
"""The station, pump and path names of probes; no adapter has them."""


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One check: passed (``severity`` None) or a finding of a severity."""

    check: str
    severity: Severity | None
    title: str
    evidence: str
    remedy: str = ""

    @property
    def area(self) -> str:
        return self.check.split(".", 1)[0]

    @property
    def passed(self) -> bool:
        return self.severity is None

    def at_least(self, severity: Severity) -> bool:
        return self.severity is not None and _RANK[self.severity] >= _RANK[severity]

    def label(self) -> str:
        return self.severity or "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity,
            "status": self.label(),
            "title": self.title,
            "evidence": self.evidence,
            "remedy": self.remedy,
        }


def _ok(check: str, title: str, evidence: str) -> Finding:
    return Finding(check, None, title, evidence)


# -- scan: the REST API -----------------------------------------------------------


_REFUSED_READS: Final = ("/users",)
"""Reads tried without a token. Each refused request counts against this
host's address (``security.source_failure_limit`` a minute), so the scan
makes three in all."""
_OPEN_PATHS: Final = ("/health", "/health/detailed", "/status", "/metrics")


def scan_rest(remote: Remote) -> list[Finding]:
    """Probe the REST API; :class:`RemoteError` when it does not answer."""
    answer = remote.get("/health")
    found = _tls_findings(remote)
    found += _header_findings(answer.headers)
    found.append(_refusal_finding(remote))
    found.append(_error_finding(remote))
    found.append(
        Finding(
            "rest.open",
            "LOW",
            "status and metrics are readable without logging in (by design)",
            f"{', '.join('/api/v1' + p for p in _OPEN_PATHS)} answer anyone who "
            "reaches the port: versions, component states, figures",
            "let only the control network and the monitoring host reach the "
            "REST port (firewall)",
        )
    )
    return found


def _untrusted(remote: Remote) -> Finding | None:
    """A finding when the REST API's certificate does not verify, else None."""
    try:
        remote.get("/health")
    except RemoteError as exc:
        if not isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise
        return Finding(
            "rest.certificate",
            "HIGH",
            "the REST API's certificate is not trusted",
            f"{exc} (trust: {_trust_text(remote)})",
            "serve a certificate of the local CA (calejo certs generate "
            "--which rest) or pass --cafile with the authority that issued it",
        )
    return None


def _trust_text(remote: Remote) -> str:
    return remote.trust.description if remote.trust is not None else "system"


def _insecure_trust() -> Any:
    from calejo_server.ops.health import Trust
    from calejo_server.tls import client_context

    return Trust(client_context(insecure=True), "certificate not checked")


def _tls_findings(remote: Remote) -> list[Finding]:
    if remote.scheme != "https":
        return [
            Finding(
                "rest.tls",
                "HIGH",
                "the REST API answers plain HTTP",
                f"{remote.api} is http: passwords, tokens and setpoints cross the "
                "network unencrypted",
                "tls.enabled: true in the configuration (certificates are issued "
                "from the local CA at start)",
            )
        ]

    facts = remote.tls_facts()
    if facts is None:
        return []
    found: list[Finding] = []
    protocol = facts.version or "unknown"
    if protocol in ("TLSv1.2", "TLSv1.3"):
        found.append(
            _ok(
                "rest.tls",
                "the REST API answers HTTPS only",
                f"{protocol}, {facts.cipher}",
            )
        )
    else:
        found.append(
            Finding(
                "rest.tls",
                "HIGH",
                "the REST API negotiated an old TLS protocol",
                f"{protocol}, {facts.cipher}",
                "serve TLS 1.2 or newer",
            )
        )
    if facts.certificate is not None:
        found.append(
            _certificate_finding(
                "rest.certificate", "the REST API's certificate", facts.certificate
            )
        )
    return found


def _certificate_finding(check: str, what: str, der: bytes) -> Finding:
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return Finding(check, "MEDIUM", f"{what} cannot be read", str(exc))
    expires = cert.not_valid_after_utc
    days = (expires - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    evidence = (
        f"subject {cert.subject.rfc4514_string()}, expires "
        f"{expires.isoformat(timespec='seconds')} ({days:.0f} days)"
    )
    if days <= 0:
        return Finding(
            check, "HIGH", f"{what} has expired", evidence, "calejo certs rotate"
        )
    if days <= CERTIFICATE_WARN_DAYS:
        return Finding(
            check,
            "MEDIUM",
            f"{what} expires within {CERTIFICATE_WARN_DAYS} days",
            evidence,
            "calejo certs rotate",
        )
    return _ok(check, f"{what} is valid", evidence)


def _header_findings(headers: Mapping[str, str]) -> list[Finding]:
    from calejo_server.api.app import SECURITY_HEADERS

    expected = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
    missing = [
        f"{name}: {value}"
        for name, value in expected.items()
        if headers.get(name, "").lower() != value.lower()
    ]
    found: list[Finding] = []
    if missing:
        found.append(
            Finding(
                "rest.headers",
                "MEDIUM",
                "security headers missing or different",
                f"expected {'; '.join(missing)}",
                "answer through the adapter directly, or make the proxy in front "
                "keep these headers",
            )
        )
    else:
        found.append(
            _ok("rest.headers", "security headers present", ", ".join(expected))
        )

    server = headers.get("server")
    if server:
        found.append(
            Finding(
                "rest.server_header",
                "LOW",
                "the answer names the server software",
                f"server: {server}",
                "remove the Server header in the proxy in front of the adapter",
            )
        )
    return found


def _refusal_finding(remote: Remote) -> Finding:
    probes: list[tuple[str, str, str | None, object]] = [
        ("GET", path, None, None) for path in _REFUSED_READS
    ]
    probes.append(
        (
            "PUT",
            f"/pump-stations/{PROBE_ID}/pumps/{PROBE_ID}/setpoint",
            None,
            {"value": 0},
        )
    )
    probes.append(("GET", "/pump-stations", PROBE_ID, None))

    let_through: list[str] = []
    odd: list[str] = []
    for method, path, token, body in probes:
        answer = remote.request(method, path, token=token, body=body)
        what = f"{method} /api/v1{path}{' with a forged token' if token else ''}"
        if answer.status == 401:
            continue
        if answer.status < 400 or answer.status in (404, 409, 422):
            let_through.append(f"{what} answered {answer.status}")
        elif answer.status != 403:
            odd.append(f"{what} answered {answer.status}")

    if let_through:
        return Finding(
            "rest.auth",
            "CRITICAL",
            "requests without a valid token were not refused",
            "; ".join(let_through),
            "stop exposing this adapter and report the defect: every route but "
            "health, status, metrics and login needs a bearer token",
        )
    if odd:
        return Finding(
            "rest.auth",
            "MEDIUM",
            "requests without a valid token got an unexpected answer",
            "; ".join(odd),
            "expected 401 for each; look at the adapter's log",
        )
    return _ok(
        "rest.auth",
        "requests without a valid token are refused",
        f"{len(probes)} requests (a read of the users, a setpoint write to an "
        "unknown pump, a forged token) answered 401",
    )


def _error_finding(remote: Remote) -> Finding:
    answer = remote.get(f"/{PROBE_ID}")
    text = answer.body.decode(errors="replace")
    data = answer.json()
    if "Traceback" in text or 'File "' in text:
        return Finding(
            "rest.errors",
            "MEDIUM",
            "an error answer shows program internals",
            text[:200],
            "report the defect; errors must be JSON without tracebacks",
        )
    if answer.status == 404 and isinstance(data, dict) and "error" in data:
        return _ok(
            "rest.errors",
            "errors are JSON without internals",
            f"404 {data.get('error')}",
        )
    return Finding(
        "rest.errors",
        "LOW",
        "an unknown path got an unexpected answer",
        f"{answer.status} {text[:120]}",
        "expected 404 with a JSON error",
    )


# -- scan: OPC UA -----------------------------------------------------------------


_MODES: Final = {1: "None", 2: "Sign", 3: "SignAndEncrypt"}


@dataclasses.dataclass(frozen=True, slots=True)
class OpcUaTarget:
    url: str
    allow_none: bool
    allow_anonymous: bool


def opcua_target(
    config: Config, host: str, live: Mapping[str, Any] | None = None
) -> OpcUaTarget | None:
    """The OPC UA endpoint as seen from here; None when OPC UA is off.

    ``live`` is the adapter's ``opcua`` health component: the endpoint it
    listens on (the configured port may be 0, a free one picked at start).
    """
    from urllib.parse import urlsplit

    from calejo_server.protocols.opcua import parse_opcua_config

    options = parse_opcua_config(config)
    if not options.enabled:
        return None
    endpoint = options.endpoint
    if live is not None and isinstance(live.get("endpoint"), str):
        endpoint = live["endpoint"]
    parts = urlsplit(endpoint)
    endpoint_host = parts.hostname or host
    if endpoint_host in _WILDCARDS:
        endpoint_host = host
    shown = f"[{endpoint_host}]" if ":" in endpoint_host else endpoint_host
    return OpcUaTarget(
        f"opc.tcp://{shown}:{parts.port or options.port}",
        options.allow_none_endpoint,
        options.allow_anonymous,
    )


async def scan_opcua(target: OpcUaTarget, timeout: float) -> list[Finding]:
    """The endpoints the server offers, and a session without security tried."""
    import logging

    from asyncua.client.client import Client
    from asyncua.ua.uaerrors import UaError

    logging.getLogger("asyncua").setLevel(logging.CRITICAL + 1)
    try:
        endpoints = await asyncio.wait_for(
            Client(target.url, timeout=timeout).connect_and_get_server_endpoints(),
            timeout,
        )
    except (OSError, TimeoutError, UaError) as exc:
        return [
            Finding(
                "opcua.reachable",
                "MEDIUM",
                "the OPC UA server did not answer",
                f"{target.url}: {exc or type(exc).__name__}",
                "is the adapter running with opcua.enabled? is the port open?",
            )
        ]

    offered = sorted(
        {
            (
                e.SecurityPolicyUri.rsplit("#", 1)[-1],
                _MODES.get(int(e.SecurityMode), "?"),
            )
            for e in endpoints
        }
    )
    tokens = {
        token.TokenType.name
        if hasattr(token.TokenType, "name")
        else str(token.TokenType)
        for e in endpoints
        for token in e.UserIdentityTokens
    }
    listing = ", ".join(f"{policy}/{mode}" for policy, mode in offered)
    found: list[Finding] = [
        _ok("opcua.endpoints", "endpoints offered", f"{target.url}: {listing}")
    ]

    unsecured = [f"{p}/{m}" for p, m in offered if p == "None" or m == "None"]
    if unsecured:
        configured = target.allow_none
        found.append(
            Finding(
                "opcua.none",
                "MEDIUM" if configured else "HIGH",
                "an endpoint without security is offered"
                + (" (opcua.allow_none_endpoint: true)" if configured else ""),
                ", ".join(unsecured),
                "opcua.allow_none_endpoint: false",
            )
        )
    else:
        found.append(_ok("opcua.none", "no endpoint without security", listing))

    deprecated = [f"{p}/{m}" for p, m in offered if p in DEPRECATED_POLICIES - {"None"}]
    if deprecated:
        found.append(
            Finding(
                "opcua.policies",
                "HIGH",
                "deprecated security policies are offered",
                ", ".join(deprecated),
                "opcua.security_policies: [Basic256Sha256, Aes256_Sha256_RsaPss]",
            )
        )

    signed_only = [f"{p}/{m}" for p, m in offered if m == "Sign"]
    if signed_only:
        found.append(
            Finding(
                "opcua.encryption",
                "MEDIUM",
                "endpoints that sign but do not encrypt are offered",
                f"{', '.join(signed_only)}: values are readable on the network",
                "opcua.security_modes: [SignAndEncrypt]",
            )
        )
    else:
        found.append(
            _ok("opcua.encryption", "every endpoint signs and encrypts", listing)
        )

    if "Anonymous" in tokens:
        configured = target.allow_anonymous
        found.append(
            Finding(
                "opcua.anonymous",
                "MEDIUM" if configured else "HIGH",
                "anonymous sessions are offered"
                + (" (opcua.allow_anonymous: true)" if configured else ""),
                f"user token types: {', '.join(sorted(tokens))}",
                "opcua.allow_anonymous: false",
            )
        )
    else:
        found.append(
            _ok(
                "opcua.anonymous",
                "anonymous sessions are not offered",
                f"user token types: {', '.join(sorted(tokens)) or 'none'}",
            )
        )

    found.append(await _unsecured_session(target, timeout))
    certificate = next(
        (e.ServerCertificate for e in endpoints if e.ServerCertificate), None
    )
    if certificate:
        found.append(
            _certificate_finding(
                "opcua.certificate", "the OPC UA server's certificate", certificate
            )
        )
    return found


async def _unsecured_session(target: OpcUaTarget, timeout: float) -> Finding:
    from asyncua.client.client import Client

    client = Client(target.url, timeout=timeout)
    try:
        await asyncio.wait_for(client.connect(), timeout)
    except Exception as exc:  # asyncua refuses with several exception types
        return _ok(
            "opcua.session",
            "a session without security is refused",
            type(exc).__name__,
        )
    with contextlib.suppress(Exception):  # the finding stands however it ends
        await client.disconnect()
    return Finding(
        "opcua.session",
        "MEDIUM" if target.allow_anonymous and target.allow_none else "HIGH",
        "an anonymous session without security was opened",
        f"{target.url} accepted a session with security None and no user",
        "opcua.allow_none_endpoint: false and opcua.allow_anonymous: false",
    )


# -- scan: Modbus TCP ---------------------------------------------------------------


_WILDCARDS: Final = ("0.0.0.0", "::", "")


def scan_modbus(
    config: Config, host: str, timeout: float, live: Mapping[str, Any] | None = None
) -> list[Finding]:
    """The allow-list of the configuration, and whether this host is answered.

    ``live`` is the adapter's ``modbus`` health component: where it listens
    (the configured port may be 0, a free one picked at start).
    """
    modbus = config.modbus
    if not modbus.enabled:
        return [
            _ok("modbus.enabled", "Modbus TCP is switched off", "modbus.enabled: false")
        ]

    bind = config.server.bind
    port = config.server.modbus_port
    found: list[Finding] = []
    if modbus.allowed_clients:
        networks = ", ".join(str(n) for n in modbus.allowed_clients)
        found.append(
            _ok(
                "modbus.allow_list",
                "only listed clients may connect",
                f"modbus.allowed_clients: {networks}",
            )
        )
    else:
        everywhere = bind in _WILDCARDS
        found.append(
            Finding(
                "modbus.allow_list",
                "HIGH" if everywhere else "MEDIUM",
                "any client that reaches the port may connect to Modbus TCP",
                f"modbus.allowed_clients is empty; listening on {bind}:{port}. Modbus "
                "has no login: a client reads every value and may write the PLC "
                "feedback registers",
                "modbus.allowed_clients: [the SCADA and PLC addresses]",
            )
        )

    if live is not None and isinstance(live.get("port"), int):
        port = live["port"]
    if port == 0:
        return found
    target = host if bind in _WILDCARDS else bind
    units = live.get("units") if live is not None else None
    unit = units[0] if isinstance(units, list) and units else 1
    found.append(_modbus_probe(target, port, unit, timeout))
    return found


def _modbus_probe(host: str, port: int, unit: int, timeout: float) -> Finding:
    frame = struct.pack(">HHHBBHH", 1, 0, 6, unit, 3, 0, 1)
    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.sendall(frame)
            answer = sock.recv(64)
    except TimeoutError:
        return Finding(
            "modbus.reachable",
            "LOW",
            "Modbus TCP did not answer this host in time",
            f"{host}:{port} unit {unit}",
        )
    except OSError as exc:
        return Finding(
            "modbus.reachable",
            "LOW",
            "Modbus TCP is not reachable from this host",
            f"{host}:{port}: {exc.strerror or exc}",
            "expected when this host is not in modbus.allowed_clients",
        )
    if not answer:
        return _ok(
            "modbus.reachable",
            "this host is refused by the allow-list",
            f"{host}:{port} closed the connection without an answer",
        )
    return _ok(
        "modbus.reachable",
        "Modbus TCP answers this host",
        f"{host}:{port} unit {unit} answered a read of register 0 (40001)",
    )


# -- scan: files on the adapter's host ------------------------------------------


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _reachable_by_others(path: Path) -> bool:
    """Every folder above ``path`` lets others through (o+x)."""
    for parent in path.absolute().parents:
        mode = _mode(parent)
        if mode is not None and not mode & 0o001:
            return False
    return True


def _exposed(path: Path, bits: int) -> bool:
    mode = _mode(path)
    return mode is not None and bool(mode & bits) and _reachable_by_others(path)


def scan_files(config: Config) -> list[Finding]:
    """Modes of the configuration, data folder, database, keys and backups."""
    from calejo_server import certs
    from calejo_server.ops.compliance import backup_folder
    from calejo_server.storage import DEFAULT_SQLITE_FILE

    found: list[Finding] = []
    source = config.source
    if source is None:
        found.append(
            Finding(
                "files.config",
                "MEDIUM",
                "the demonstration configuration is in use",
                "no configuration file (--config, CALEJO_CONFIG)",
                "write calejo.yaml for this site and point CALEJO_CONFIG at it",
            )
        )
    else:
        mode = _mode(source)
        shown = f"{source} mode {mode:04o}" if mode is not None else f"{source} missing"
        if mode is not None and mode & 0o022:
            found.append(
                Finding(
                    "files.config",
                    "HIGH",
                    "the configuration file is writable by group or others",
                    shown,
                    f"chmod 0640 {source} (owner root, group calejo)",
                )
            )
        elif _exposed(source, 0o004):
            found.append(
                Finding(
                    "files.config",
                    "MEDIUM",
                    "the configuration file is readable by everyone",
                    shown,
                    f"chmod 0640 {source}",
                )
            )
        else:
            found.append(
                _ok("files.config", "the configuration file is protected", shown)
            )

    data = config.server.data_dir
    mode = _mode(data)
    if mode is not None:
        shown = f"{data.absolute()} mode {mode:04o}"
        if mode & 0o002:
            found.append(
                Finding(
                    "files.data_dir",
                    "HIGH",
                    "the data folder is writable by everyone",
                    shown,
                    f"chmod 0750 {data}",
                )
            )
        else:
            found.append(
                _ok("files.data_dir", "the data folder is not world-writable", shown)
            )

    if not config.database.url:
        database = data / DEFAULT_SQLITE_FILE
        if database.exists():
            mode = _mode(database)
            shown = f"{database.absolute()} mode {mode or 0:04o}"
            if _exposed(database, 0o004):
                found.append(
                    Finding(
                        "files.database",
                        "HIGH",
                        "the database is readable by everyone",
                        f"{shown}: it holds password and token hashes and the "
                        "audit log",
                        f"chmod 0750 {data} (or 0640 {database})",
                    )
                )
            else:
                found.append(
                    _ok(
                        "files.database",
                        "the database is not readable by others",
                        shown,
                    )
                )

    folder = certs.certificate_folder(config)
    keys = sorted(folder.glob("*.key")) + sorted(folder.glob("*.key.previous"))
    loose = [
        f"{key.name} mode {_mode(key) or 0:04o}"
        for key in keys
        if (_mode(key) or 0) & 0o077
    ]
    if loose:
        found.append(
            Finding(
                "files.keys",
                "HIGH",
                "private keys are readable by others than their owner",
                f"{folder}: {', '.join(loose)}",
                f"chmod 0600 {folder}/*.key and chmod 0700 {folder}",
            )
        )
    elif keys:
        found.append(
            _ok(
                "files.keys",
                "private keys are readable by their owner only",
                f"{folder}: {', '.join(k.name for k in keys)}",
            )
        )

    backups = backup_folder(config)
    archives = sorted(backups.glob("**/calejo-*.tar.gz")) if backups.exists() else []
    open_archives = [a for a in archives if _exposed(a, 0o004)]
    if open_archives:
        found.append(
            Finding(
                "files.backups",
                "HIGH",
                "backup archives are readable by everyone",
                f"{len(open_archives)} of {len(archives)} in {backups}, e.g. "
                f"{open_archives[0].name}: they hold the private keys and the database",
                f"chmod 0600 the archives and 0750 {backups}",
            )
        )
    elif archives:
        found.append(
            _ok(
                "files.backups",
                "backup archives are not readable by others",
                f"{len(archives)} in {backups}",
            )
        )
    return found


# -- the whole scan ---------------------------------------------------------------


def scan(
    config: Config, remote: Remote, *, opcua_url: str | None = None
) -> list[Finding]:
    """Every probe; :class:`RemoteError` when the REST API does not answer.

    When the REST API's certificate does not verify, that is a finding and
    the other probes go on without checking it.
    """
    untrusted = _untrusted(remote)
    if untrusted is None:
        return _scan(config, remote, opcua_url)
    with Remote(remote.base_url, _insecure_trust(), remote.timeout) as unchecked:
        found = _scan(config, unchecked, opcua_url)
    return [untrusted, *(f for f in found if f.check != "rest.certificate")]


def _scan(config: Config, remote: Remote, opcua_url: str | None) -> list[Finding]:
    found = scan_rest(remote)

    _, detailed = remote.get_json("/health/detailed")
    components = detailed.get("components", {}) if isinstance(detailed, dict) else {}
    live_opcua = components.get("opcua") if isinstance(components, dict) else None
    live_modbus = components.get("modbus") if isinstance(components, dict) else None
    if not isinstance(live_opcua, dict) or live_opcua.get("state") == "not_configured":
        live_opcua = None
    target = opcua_target(config, remote.host, live_opcua)
    if opcua_url is not None:
        target = OpcUaTarget(
            opcua_url,
            target.allow_none if target else False,
            target.allow_anonymous if target else False,
        )
    if target is not None:
        found += asyncio.run(scan_opcua(target, remote.timeout))

    found += scan_modbus(
        config,
        remote.host,
        remote.timeout,
        live_modbus if isinstance(live_modbus, dict) else None,
    )
    found += scan_files(config)
    return found


# -- policy -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One rule of the security policy and how it went."""

    check: str
    setting: str
    required: str
    actual: str
    severity: Severity
    ok: bool

    def finding(self) -> Finding:
        title = f"{self.setting}: {self.required}"
        evidence = f"is {self.actual}"
        if self.ok:
            return _ok(self.check, title, evidence)
        return Finding(self.check, self.severity, title, evidence)


def policy(config: Config) -> list[Rule]:
    """The configuration held against the security policy."""
    from calejo_server.alerts.settings import parse_alerts_config
    from calejo_server.logs import parse_logging
    from calejo_server.ops.backup import parse_backup_settings
    from calejo_server.protocols.opcua import parse_opcua_config
    from calejo_server.security.passwords import MIN_PASSWORD_LENGTH
    from calejo_server.tls import parse_tls

    s = config.security
    rules = [
        Rule(
            "policy.lockout",
            "security.lockout_threshold",
            f"at most {MAX_LOGIN_ATTEMPTS} failed logins",
            str(s.lockout_threshold),
            "MEDIUM",
            s.lockout_threshold <= MAX_LOGIN_ATTEMPTS,
        ),
        Rule(
            "policy.lockout",
            "security.lockout_duration",
            f"at least {MIN_LOCKOUT_SECONDS:g} s",
            f"{s.lockout_duration:g} s",
            "MEDIUM",
            s.lockout_duration >= MIN_LOCKOUT_SECONDS,
        ),
        Rule(
            "policy.throttle",
            "security.source_failure_limit",
            f"at most {MAX_SOURCE_FAILURES} failures a minute from one address",
            str(s.source_failure_limit),
            "LOW",
            s.source_failure_limit <= MAX_SOURCE_FAILURES,
        ),
        Rule(
            "policy.session",
            "security.token_idle_timeout",
            f"at most {MAX_IDLE_SECONDS:g} s",
            f"{s.token_idle_timeout:g} s",
            "MEDIUM",
            s.token_idle_timeout <= MAX_IDLE_SECONDS,
        ),
        Rule(
            "policy.session",
            "security.token_absolute_timeout",
            f"at most {MAX_SESSION_SECONDS:g} s",
            f"{s.token_absolute_timeout:g} s",
            "MEDIUM",
            s.token_absolute_timeout <= MAX_SESSION_SECONDS,
        ),
        Rule(
            "policy.passwords",
            "minimum password length",
            "at least 12 characters",
            str(MIN_PASSWORD_LENGTH),
            "HIGH",
            MIN_PASSWORD_LENGTH >= 12,
        ),
    ]

    tls = parse_tls(config)
    rules.append(
        Rule(
            "policy.tls",
            "tls.enabled",
            "true (the REST API over HTTPS)",
            str(tls.enabled).lower(),
            "HIGH",
            tls.enabled,
        )
    )

    opcua = parse_opcua_config(config)
    if opcua.enabled:
        modes = list(opcua.security_modes)
        rules += [
            Rule(
                "policy.opcua",
                "opcua.allow_none_endpoint",
                "false",
                str(opcua.allow_none_endpoint).lower(),
                "HIGH",
                not opcua.allow_none_endpoint,
            ),
            Rule(
                "policy.opcua",
                "opcua.allow_anonymous",
                "false",
                str(opcua.allow_anonymous).lower(),
                "HIGH",
                not opcua.allow_anonymous,
            ),
            Rule(
                "policy.opcua",
                "opcua.security_modes",
                "[SignAndEncrypt]",
                f"[{', '.join(modes)}]",
                "MEDIUM",
                modes == ["SignAndEncrypt"],
            ),
        ]

    if config.modbus.enabled:
        everywhere = config.server.bind in ("0.0.0.0", "::", "")
        clients = config.modbus.allowed_clients
        rules.append(
            Rule(
                "policy.modbus",
                "modbus.allowed_clients",
                "the SCADA and PLC addresses (not empty)",
                f"[{', '.join(str(c) for c in clients)}]",
                "HIGH" if everywhere else "MEDIUM",
                bool(clients),
            )
        )

    alerts = parse_alerts_config(config)
    enabled = alerts.enabled_channels()
    critical = [c for c in alerts.routing.get("CRITICAL", ()) if c in enabled]
    rules += [
        Rule(
            "policy.alerts",
            "alerts.email|sms|webhook.enabled",
            "at least one channel enabled",
            ", ".join(enabled) or "none",
            "HIGH",
            bool(enabled),
        ),
        Rule(
            "policy.alerts",
            "alerts.routing.CRITICAL",
            "at least one enabled channel",
            ", ".join(critical) or "none",
            "HIGH",
            bool(critical),
        ),
        Rule(
            "policy.certificates",
            "alerts.certificates.enabled",
            "true (expiry warnings)",
            str(alerts.certificates.enabled).lower(),
            "LOW",
            alerts.certificates.enabled,
        ),
    ]

    backup = parse_backup_settings(config)
    scheduled = backup.enabled and not config.demo
    intervals = [backup.schedule.get(kind) for kind in ("database", "full")]
    shortest = min((i for i in intervals if i), default=None) if scheduled else None
    rules.append(
        Rule(
            "policy.backup",
            "backup.enabled, backup.schedule",
            "a database or full backup at least every 26 h",
            "off" if shortest is None else f"every {shortest / 3600:g} h",
            "MEDIUM",
            shortest is not None and shortest <= MAX_BACKUP_INTERVAL,
        )
    )

    logging_settings = parse_logging(config.raw, config.source)
    rules.append(
        Rule(
            "policy.logs",
            "logging.folder",
            "a folder (logs kept beyond the journal)",
            str(logging_settings.folder) if logging_settings.folder else "none",
            "LOW",
            logging_settings.folder is not None,
        )
    )
    rules.append(
        Rule(
            "policy.watchdog",
            "engine.watchdog_timeout",
            f"at most {MAX_WATCHDOG_SECONDS:g} s",
            f"{config.engine.watchdog_timeout:g} s",
            "LOW",
            config.engine.watchdog_timeout <= MAX_WATCHDOG_SECONDS,
        )
    )
    return rules


# -- controls -----------------------------------------------------------------------


async def controls(config: Config, standards: Sequence[str]) -> list[Any]:
    """The compliance reports of ``standards`` (not recorded in the audit log)."""
    from calejo_server import cli
    from calejo_server.ops import compliance
    from calejo_server.storage.base import StorageError

    async with cli.opened_storage(config, read_only=True) as storage:
        try:
            facts = await compliance.gather(config, storage)
        except StorageError as exc:
            raise cli.CommandError(f"cannot read the storage: {exc}") from exc
    return [compliance.evaluate(facts, standard) for standard in standards]


def control_findings(reports: Sequence[Any]) -> list[Finding]:
    """Each control of the reports as a finding (MEDIUM when not met)."""
    found = []
    for report in reports:
        for row in report.rows:
            check = f"controls.{row.id.replace(' ', '')}"
            title = f"{row.id} {row.title}"
            evidence = "; ".join(row.evidence)
            if row.status == "not_met":
                found.append(
                    Finding(
                        check, "MEDIUM", title, evidence, "; ".join(row.requirement)
                    )
                )
            else:
                found.append(_ok(check, title, f"{row.status}: {evidence}"))
    return found


def print_controls(reports: Sequence[Any], out: TextIO) -> None:
    from calejo_server.ops.compliance import STANDARD_TITLES

    shown = {"met": "met", "not_met": "NOT MET", "not_applicable": "n/a"}
    for report in reports:
        print(f"{STANDARD_TITLES[report.standard]}: {report.summary()}", file=out)
        for row in report.rows:
            print(f"  {row.id:<8} {shown[row.status]:<8} {row.title}", file=out)
            if row.status == "not_met":
                for evidence in row.evidence:
                    print(f"           {evidence}", file=out)


# -- risk -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Threat:
    """A threat to the adapter, its impact (1-3) and the checks that bear on it."""

    id: str
    title: str
    impact: int
    checks: tuple[str, ...]
    mitigations: str


THREATS: Final[tuple[Threat, ...]] = (
    Threat(
        "R1",
        "an unauthorised setpoint, plan or emergency stop through the REST API",
        3,
        (
            "rest.auth",
            "policy.lockout",
            "policy.session",
            "policy.passwords",
            "controls.SR1.1",
            "controls.SR1.7",
            "controls.SR1.11",
            "controls.SR2.1",
        ),
        "bearer tokens, roles, lockout, session timeouts, the safety gate's limits",
    ),
    Threat(
        "R2",
        "passwords or tokens read on the network",
        3,
        (
            "rest.tls",
            "rest.certificate",
            "policy.tls",
            "controls.SR3.1",
            "controls.SR4.1",
        ),
        "HTTPS with TLS 1.2 or newer",
    ),
    Threat(
        "R3",
        "SCADA values read or altered over OPC UA",
        2,
        (
            "opcua.none",
            "opcua.encryption",
            "opcua.anonymous",
            "opcua.session",
            "opcua.policies",
            "policy.opcua",
        ),
        "signed and encrypted endpoints, user logins, the client trust list",
    ),
    Threat(
        "R4",
        "spoofed PLC feedback or reconnaissance over Modbus TCP",
        2,
        ("modbus.allow_list", "policy.modbus"),
        "modbus.allowed_clients, the control network; no setpoint can be "
        "written over Modbus",
    ),
    Threat(
        "R5",
        "the audit trail altered or lost",
        3,
        ("controls.SR3.9", "controls.SR2.8", "controls.SR2.9", "files.database"),
        "the SHA-256 chain, append-only triggers, the outage spool",
    ),
    Threat(
        "R6",
        "data lost with no usable backup",
        3,
        ("controls.SR7.3", "policy.backup", "files.backups"),
        "scheduled, verified backups; calejo verify-backup",
    ),
    Threat(
        "R7",
        "an emergency or failure not noticed in time",
        3,
        ("policy.alerts", "controls.SR6.2"),
        "alerts by SMS, e-mail and webhook; /metrics; health checks",
    ),
    Threat(
        "R8",
        "an expired certificate stops SCADA clients or the API",
        2,
        (
            "rest.certificate",
            "opcua.certificate",
            "controls.SR1.9",
            "policy.certificates",
        ),
        "certificate expiry alerts; calejo certs check and rotate",
    ),
    Threat(
        "R9",
        "keys, password hashes or the configuration read or changed on the host",
        3,
        (
            "files.config",
            "files.data_dir",
            "files.database",
            "files.keys",
            "files.backups",
            "controls.SR7.6",
        ),
        "file modes; the service's own user; systemd sandboxing",
    ),
    Threat(
        "R10",
        "the optimizer goes quiet and pumps keep an old setpoint",
        2,
        ("policy.watchdog",),
        "the watchdog puts stations in failsafe; alerts",
    ),
)

LEVELS: Final = ((9, "CRITICAL"), (6, "HIGH"), (3, "MEDIUM"), (1, "LOW"))


@dataclasses.dataclass(frozen=True, slots=True)
class Risk:
    threat: Threat
    likelihood: int
    causes: tuple[Finding, ...]

    @property
    def score(self) -> int:
        return self.likelihood * self.threat.impact

    @property
    def level(self) -> Severity:
        for floor, name in LEVELS:
            if self.score >= floor:
                return name  # type: ignore[return-value]
        return "LOW"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.threat.id,
            "threat": self.threat.title,
            "impact": self.threat.impact,
            "likelihood": self.likelihood,
            "score": self.score,
            "level": self.level,
            "mitigations": self.threat.mitigations,
            "findings": [f"{f.check} {f.label()}: {f.title}" for f in self.causes],
        }


def _matches(check: str, prefix: str) -> bool:
    return check == prefix or check.startswith(prefix + ".")


def assess_risks(found: Iterable[Finding]) -> list[Risk]:
    """Likelihood 1 with the controls in place, 2 with a MEDIUM finding
    against them, 3 with a HIGH or CRITICAL one; level by likelihood x impact."""
    found = list(found)
    risks = []
    for threat in THREATS:
        causes = tuple(
            f
            for f in found
            if not f.passed
            and f.severity != "LOW"
            and any(_matches(f.check, c) for c in threat.checks)
        )
        likelihood = 1
        if any(f.at_least("HIGH") for f in causes):
            likelihood = 3
        elif causes:
            likelihood = 2
        risks.append(Risk(threat, likelihood, causes))
    return risks


def print_risks(risks: Sequence[Risk], out: TextIO) -> None:
    print("risk  level     likelihood x impact  threat", file=out)
    for risk in sorted(risks, key=lambda r: (-r.score, r.threat.id)):
        print(
            f"{risk.threat.id:<5} {risk.level:<9} {risk.likelihood} x "
            f"{risk.threat.impact} = {risk.score}            {risk.threat.title}",
            file=out,
        )
        print(f"      mitigated by: {risk.threat.mitigations}", file=out)
        for cause in risk.causes:
            print(
                f"      raised by {cause.check} ({cause.label()}): {cause.title}",
                file=out,
            )


# -- assessment and report ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Assessment:
    generated_at: dt.datetime
    adapter: str
    configuration: str
    scan: tuple[Finding, ...]
    policy: tuple[Finding, ...]
    controls: tuple[Finding, ...]
    risks: tuple[Risk, ...]

    def findings(self) -> list[Finding]:
        return [*self.scan, *self.policy, *self.controls]

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings() if f.severity == severity)

    @property
    def rating(self) -> str:
        worst = [f for f in self.findings() if f.at_least("HIGH")]
        risky = [r for r in self.risks if r.level in ("HIGH", "CRITICAL")]
        if worst or risky:
            return "at risk"
        if any(f.at_least("MEDIUM") for f in self.findings()):
            return "acceptable with remarks"
        return "good"

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in SEVERITIES)
        passed = sum(1 for f in self.findings() if f.passed)
        return f"{self.rating}: {counts}; {passed} checks passed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat(timespec="seconds"),
            "adapter": self.adapter,
            "configuration": self.configuration,
            "rating": self.rating,
            "summary": {s: self.count(s) for s in SEVERITIES},
            "scan": [f.to_dict() for f in self.scan],
            "policy": [f.to_dict() for f in self.policy],
            "controls": [f.to_dict() for f in self.controls],
            "risks": [r.to_dict() for r in self.risks],
        }


def assess(config: Config, remote: Remote, opcua_url: str | None) -> Assessment:
    scanned = scan(config, remote, opcua_url=opcua_url)
    rules = [rule.finding() for rule in policy(config)]
    reports = asyncio.run(controls(config, ("iec62443",)))
    checked = control_findings(reports)
    risks = assess_risks([*scanned, *rules, *checked])
    return Assessment(
        dt.datetime.now(dt.UTC),
        remote.api,
        str(config.source) if config.source else "demonstration",
        tuple(scanned),
        tuple(rules),
        tuple(checked),
        tuple(risks),
    )


def print_findings(
    found: Sequence[Finding], out: TextIO, *, all_checks: bool = True
) -> None:
    ordered = sorted(
        found, key=lambda f: (-_RANK[f.severity] if f.severity else 0, f.check)
    )
    for finding in ordered:
        if finding.passed and not all_checks:
            continue
        print(f"{finding.label():<8} {finding.check:<20} {finding.title}", file=out)
        print(f"         {finding.evidence}", file=out)
        if finding.remedy and not finding.passed:
            print(f"         fix: {finding.remedy}", file=out)


def markdown(assessment: Assessment) -> str:
    """The assessment as a Markdown document."""
    lines = [
        "# Security report: Calejo Control Adapter",
        "",
        f"- Generated: {assessment.generated_at.isoformat(timespec='seconds')}",
        f"- Adapter: {assessment.adapter}",
        f"- Configuration: {assessment.configuration}",
        f"- Rating: {assessment.summary()}",
        "",
        "## Risks",
        "",
        "| risk | level | likelihood x impact | threat | raised by |",
        "|---|---|---|---|---|",
    ]
    for risk in sorted(assessment.risks, key=lambda r: (-r.score, r.threat.id)):
        causes = ", ".join(f.check for f in risk.causes) or "-"
        lines.append(
            f"| {risk.threat.id} | {risk.level} | {risk.likelihood} x "
            f"{risk.threat.impact} | {risk.threat.title} | {causes} |"
        )
    for heading, found in (
        ("Scan of the running adapter", assessment.scan),
        ("Configuration against the security policy", assessment.policy),
        ("IEC 62443-3-3 controls", assessment.controls),
    ):
        lines += ["", f"## {heading}", "", "| status | check | what | evidence | fix |"]
        lines.append("|---|---|---|---|---|")
        for f in sorted(
            found, key=lambda f: (-_RANK[f.severity] if f.severity else 0, f.check)
        ):
            cells = [
                f.label(),
                f.check,
                f.title,
                f.evidence,
                f.remedy if not f.passed else "",
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- the command ----------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check the adapter's security: scan a running adapter from outside and "
        "its files on this host (scan), its configuration against the policy "
        "(policy), the IEC 62443 / ISO 27001 controls (controls), the risks "
        "that remain (risk), all in one verdict (assess) or document (report)."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def fail_on(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--fail-on",
            choices=SEVERITIES,
            default="HIGH",
            help="exit 1 when a finding is of this severity or worse (default HIGH)",
        )

    def output(sub: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
        sub.add_argument("--format", choices=formats, default=formats[0])
        sub.add_argument(
            "--output", type=Path, help="write here instead of standard output"
        )

    def opcua(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--opcua",
            metavar="URL",
            help="the OPC UA endpoint to probe (default: from the configuration)",
        )

    scan_parser = actions.add_parser(
        "scan", help="probe a running adapter and its files"
    )
    remote_mod.add_arguments(scan_parser)
    opcua(scan_parser)
    fail_on(scan_parser)
    output(scan_parser, ("text", "json"))

    policy_parser = actions.add_parser(
        "policy", help="the configuration against the security policy"
    )
    fail_on(policy_parser)
    output(policy_parser, ("text", "json"))

    controls_parser = actions.add_parser(
        "controls", help="the IEC 62443-3-3 (or ISO 27001) controls, one line each"
    )
    controls_parser.add_argument(
        "--standard",
        choices=("iec62443", "iso27001", "all"),
        default="all",
        help="which standard's controls (default all)",
    )
    output(controls_parser, ("text", "json"))

    for name, text in (
        ("risk", "the risk register: threats, likelihood, impact, level"),
        ("assess", "scan, policy, controls and risks in one verdict"),
        ("report", "the assessment as one Markdown or JSON document"),
    ):
        sub = actions.add_parser(name, help=text)
        remote_mod.add_arguments(sub)
        opcua(sub)
        output(sub, ("md", "json") if name == "report" else ("text", "json"))


def run(args: argparse.Namespace) -> int:
    """``calejo security ACTION``."""
    config = load_config(getattr(args, "config", None))
    if args.action == "policy":
        found = [rule.finding() for rule in policy(config)]
        return _emit_findings(found, args)
    if args.action == "controls":
        standards = (
            ("iec62443", "iso27001") if args.standard == "all" else (args.standard,)
        )
        reports = asyncio.run(controls(config, standards))
        if args.format == "json":
            text = json.dumps([r.to_dict() for r in reports], indent=2) + "\n"
        else:
            text = _captured(lambda out: print_controls(reports, out))
        _write(args.output, text)
        return EXIT_OK if all(r.ok for r in reports) else EXIT_FINDINGS

    with remote_mod.connect(args, config) as remote:
        try:
            if args.action == "scan":
                found = scan(config, remote, opcua_url=args.opcua)
                return _emit_findings(found, args)
            assessment = assess(config, remote, args.opcua)
        except RemoteError as exc:
            print(f"calejo: the adapter did not answer: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE

    if args.action == "risk":
        if args.format == "json":
            text = json.dumps([r.to_dict() for r in assessment.risks], indent=2) + "\n"
        else:
            text = _captured(lambda out: print_risks(assessment.risks, out))
        _write(args.output, text)
        high = [r for r in assessment.risks if r.level in ("HIGH", "CRITICAL")]
        return EXIT_FINDINGS if high else EXIT_OK

    if args.format == "json":
        text = json.dumps(assessment.to_dict(), indent=2) + "\n"
    elif args.action == "report":
        text = markdown(assessment)
    else:
        text = _captured(lambda out: _print_assessment(assessment, out))
    _write(args.output, text)
    if args.output is not None:
        print(f"{assessment.summary()}; written to {args.output}", file=sys.stderr)
    return EXIT_FINDINGS if assessment.rating == "at risk" else EXIT_OK


def _print_assessment(assessment: Assessment, out: TextIO) -> None:
    print(f"security assessment of {assessment.adapter}", file=out)
    print(f"configuration: {assessment.configuration}", file=out)
    for name, found in (
        ("scan", assessment.scan),
        ("policy", assessment.policy),
        ("controls (IEC 62443-3-3)", assessment.controls),
    ):
        counts = {s: sum(1 for f in found if f.severity == s) for s in SEVERITIES}
        passed = sum(1 for f in found if f.passed)
        shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
        print(f"{name}: {passed} passed; {shown}", file=out)
    remarks = [f for f in assessment.findings() if f.at_least("MEDIUM")]
    if remarks:
        print("findings:", file=out)
        print_findings(remarks, out)
    print("risks:", file=out)
    for risk in sorted(assessment.risks, key=lambda r: (-r.score, r.threat.id)):
        print(f"  {risk.threat.id:<4} {risk.level:<9} {risk.threat.title}", file=out)
    print(f"rating: {assessment.summary()}", file=out)


def _emit_findings(found: Sequence[Finding], args: argparse.Namespace) -> int:
    if args.format == "json":
        text = json.dumps([f.to_dict() for f in found], indent=2) + "\n"
    else:

        def body(out: TextIO) -> None:
            print_findings(found, out)
            counts = ", ".join(
                f"{sum(1 for f in found if f.severity == s)} {s}" for s in SEVERITIES
            )
            passed = sum(1 for f in found if f.passed)
            print(f"{passed} checks passed; findings: {counts}", file=out)

        text = _captured(body)
    _write(args.output, text)
    failing = [f for f in found if f.at_least(args.fail_on)]
    return EXIT_FINDINGS if failing else EXIT_OK


def _captured(write: Any) -> str:
    import io

    buffer = io.StringIO()
    write(buffer)
    return buffer.getvalue()


def _write(path: Path | None, text: str) -> None:
    from calejo_server import cli

    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise cli.CommandError(f"cannot write {path}: {exc.strerror or exc}") from exc
