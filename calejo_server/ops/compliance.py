"""``calejo compliance-report``: the adapter held against IEC 62443 and ISO 27001.

Each check reads the configuration and the database as they are now (the
users, roles, audit log and its protection, the certificates, the backups
folder) and decides whether one requirement is met. The checks, each with
the IEC 62443-3-3 system requirement it answers and its ISO/IEC
27001:2022 Annex A counterparts:

======  ==========================================  ===================
SR      what is checked                             Annex A
======  ==========================================  ===================
1.1     every active user named uniquely, with a    A.5.16
        known role; no anonymous OPC UA sessions
1.7     argon2id password hashes for every active   A.5.17
        user; minimum length at least 12
1.9     CA and server certificates valid more than  A.8.24
        30 days, signed by the local CA, RSA 2048+
        bits, private keys readable by the owner only
1.11    lockout after at most 10 failed logins,     A.8.5
        for at least 300 s
2.1     viewer, auditor and optimizer roles hold    A.5.15, A.8.2
        no more than their least privilege
2.6     sessions end after at most 30 min idle and  A.8.5
        24 h in all
2.8     the audit log records the adapter's starts  A.8.15
        and user and access events
2.9     at least 1 GiB free for the audit log and   A.8.15
        its outage spool
3.1     no OPC UA endpoint without signing; REST    A.8.20, A.8.24
        over TLS
3.9     audit hash chain intact; UPDATE, DELETE     A.8.15, A.5.33
        (and TRUNCATE) refused by triggers
4.1     every OPC UA endpoint SignAndEncrypt; REST  A.8.24
        over TLS
6.2     at least one alert channel enabled          A.8.16
7.3     a backup of the database at most 26 h old,  A.8.13
        verified (BACKUP_VERIFIED in the audit log)
7.6     a configuration file (not the demo), not    A.8.9
        writable by group or others; data folder
        not writable by others
======  ==========================================  ===================

The report lists each control with its clause, title, status (met, not
met, not applicable) and the evidence: the values read. For ISO 27001 a
control is met when every check mapped to it is. The command exits 0
when every control is met (or not applicable), 1 otherwise, and records
COMPLIANCE_REPORT in the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import re
import shutil
import sqlite3
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from calejo_server import audit, certs
from calejo_server.config import Config, load_config
from calejo_server.security.passwords import MIN_PASSWORD_LENGTH
from calejo_server.security.roles import (
    AUDITOR,
    CLEAR_EMERGENCY_STOP,
    DEFAULT_ROLES,
    EMERGENCY_STOP,
    OPTIMIZER,
    VIEWER,
    WRITE_SETPOINTS,
)
from calejo_server.storage.base import (
    AuditQuery,
    AuditRecord,
    AuditRow,
    ChainVerdict,
    Storage,
    StorageError,
    UserRecord,
)
from calejo_server.tls import TlsConfig, parse_tls

if TYPE_CHECKING:
    from calejo_server.ops.certs import Assessment

logger = logging.getLogger(__name__)

STANDARDS: Final = ("iec62443", "iso27001")
FORMATS: Final = ("md", "json")

MAX_LOGIN_ATTEMPTS: Final = 10
MIN_LOCKOUT_SECONDS: Final = 300.0
MAX_IDLE_SECONDS: Final = 1800.0
MAX_SESSION_SECONDS: Final = 86400.0
MIN_FREE_BYTES: Final = 1 << 30
MIN_RSA_BITS: Final = 2048
CERTIFICATE_DAYS: Final = 30
BACKUP_MAX_AGE: Final = dt.timedelta(hours=26)
ARGON2ID: Final = "$argon2id$"

CONTROL_PERMISSIONS: Final = frozenset(
    {WRITE_SETPOINTS, EMERGENCY_STOP, CLEAR_EMERGENCY_STOP}
)
"""Permissions that change what the pumps do; ``manage_*`` ones change who may."""

LEAST_PRIVILEGE: Final[Mapping[str, frozenset[str]]] = {
    VIEWER: frozenset(),
    AUDITOR: frozenset(),
    OPTIMIZER: frozenset({WRITE_SETPOINTS}),
}
"""The changing permissions each role without operating or administrative
duties may hold (reading permissions are not limited)."""

ACCESS_EVENTS: Final = (
    audit.LOGIN_SUCCESS,
    audit.INVALID_AUTHENTICATION,
    audit.ACCESS_DENIED,
    audit.LOGOUT,
    audit.ACCOUNT_LOCKED,
)
ACCOUNT_EVENTS: Final = (
    audit.USER_CREATED,
    audit.USER_UPDATED,
    audit.USER_DEACTIVATED,
    audit.PASSWORD_CHANGED,
    audit.ROLE_CHANGED,
)
CONTROL_EVENTS: Final = (
    audit.SETPOINT_CHANGED,
    audit.PLAN_RECEIVED,
    audit.EMERGENCY_STOP_ACTIVATED,
    audit.EMERGENCY_STOP_CLEARED,
)

Status = Literal["met", "not_met", "not_applicable"]
MET: Final[Status] = "met"
NOT_MET: Final[Status] = "not_met"
NOT_APPLICABLE: Final[Status] = "not_applicable"


# What is read.


@dataclasses.dataclass(frozen=True, slots=True)
class OpcUaFacts:
    enabled: bool
    endpoint: str
    allow_anonymous: bool
    allow_none_endpoint: bool
    security_policies: tuple[str, ...]
    security_modes: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class TriggerFacts:
    """Which changes to the audit table a trigger refuses."""

    refused: frozenset[str]
    names: tuple[str, ...]
    needed: frozenset[str]
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SpaceFacts:
    label: str
    path: Path
    free: int


@dataclasses.dataclass(frozen=True, slots=True)
class BackupFacts:
    folder: Path
    newest: Path | None
    newest_at: dt.datetime | None
    archives: int
    verified: bool
    verified_at: dt.datetime | None


@dataclasses.dataclass(slots=True)
class Facts:
    """Everything the checks read, gathered once."""

    config: Config
    now: dt.datetime
    backend: str
    storage_where: str
    opcua: OpcUaFacts
    tls: TlsConfig
    users: list[UserRecord]
    roles: dict[str, tuple[str, ...]]
    roles_stored: bool
    chain: ChainVerdict
    head: AuditRow | None
    events: dict[str, bool]
    triggers: TriggerFacts
    space: list[SpaceFacts]
    certificates: list[Assessment]
    backups: BackupFacts


# The checks.


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    evidence: str


@dataclasses.dataclass(frozen=True, slots=True)
class Control:
    """One check: the clause it answers, its counterparts, what is required."""

    sr: str
    title: str
    iso: tuple[str, ...]
    requirement: str
    evaluate: Callable[[Facts], Finding]


ISO_TITLES: Final[Mapping[str, str]] = {
    "A.5.15": "Access control",
    "A.5.16": "Identity management",
    "A.5.17": "Authentication information",
    "A.5.33": "Protection of records",
    "A.8.2": "Privileged access rights",
    "A.8.5": "Secure authentication",
    "A.8.9": "Configuration management",
    "A.8.13": "Information backup",
    "A.8.15": "Logging",
    "A.8.16": "Monitoring activities",
    "A.8.20": "Networks security",
    "A.8.24": "Use of cryptography",
}


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _hours(span: dt.timedelta) -> str:
    return f"{span.total_seconds() / 3600:.3g} h"


def _yaml(value: bool) -> str:
    return "true" if value else "false"


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _key_bits(path: Path) -> int | None:
    try:
        key = certs.load_certificate(path).public_key()
    except certs.CertificateError:
        return None
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None


def _verdict(problems: Sequence[str], evidence: str) -> Finding:
    if problems:
        return Finding(NOT_MET, f"{evidence}; not met: {'; '.join(problems)}")
    return Finding(MET, evidence)


def _identification(facts: Facts) -> Finding:
    active = [user for user in facts.users if user.active]
    problems: list[str] = []
    if not active:
        problems.append("no active user")

    seen: dict[str, list[str]] = {}
    for user in facts.users:
        seen.setdefault(user.username.casefold(), []).append(user.username)
    clashes = [names for names in seen.values() if len(names) > 1]
    if clashes:
        shown = ", ".join("/".join(names) for names in clashes)
        problems.append(f"usernames that differ only in case: {shown}")

    unknown = [f"{u.username} ({u.role})" for u in active if u.role not in facts.roles]
    if unknown:
        problems.append(f"active users with an unknown role: {', '.join(unknown)}")

    opcua = facts.opcua
    anonymous = f"opcua.allow_anonymous={_yaml(opcua.allow_anonymous)}"
    if not opcua.enabled:
        anonymous = "opc ua disabled"
    elif opcua.allow_anonymous:
        problems.append("opc ua admits anonymous sessions, which name no user")

    evidence = (
        f"{len(facts.users)} users, {len(active)} active; usernames "
        f"{'not ' if clashes else ''}unique (case-insensitive); {anonymous}"
    )
    return _verdict(problems, evidence)


def _passwords(facts: Facts) -> Finding:
    active = [user for user in facts.users if user.active]
    weak = [u.username for u in active if not u.password_hash.startswith(ARGON2ID)]
    pending = [u.username for u in active if u.must_change_password]
    problems: list[str] = []
    if weak:
        problems.append(f"password hashes that are not argon2id: {', '.join(weak)}")
    if MIN_PASSWORD_LENGTH < 12:
        problems.append(f"minimum password length {MIN_PASSWORD_LENGTH} under 12")

    evidence = (
        f"minimum password length {MIN_PASSWORD_LENGTH}, username not allowed in "
        f"the password; argon2id hashes: {len(active) - len(weak)} of "
        f"{len(active)} active users; one-time passwords not yet changed: "
        f"{', '.join(pending) if pending else 'none'}"
    )
    return _verdict(problems, evidence)


def _login_attempts(facts: Facts) -> Finding:
    security = facts.config.security
    problems: list[str] = []
    if security.lockout_threshold > MAX_LOGIN_ATTEMPTS:
        problems.append(
            f"lockout_threshold {security.lockout_threshold} above {MAX_LOGIN_ATTEMPTS}"
        )
    if security.lockout_duration < MIN_LOCKOUT_SECONDS:
        problems.append(
            f"lockout_duration {security.lockout_duration:g} s under "
            f"{MIN_LOCKOUT_SECONDS:g} s"
        )

    evidence = (
        f"lockout_threshold={security.lockout_threshold}, lockout_duration="
        f"{security.lockout_duration:g} s, source_failure_limit="
        f"{security.source_failure_limit} per minute"
    )
    return _verdict(problems, evidence)


def _authorization(facts: Facts) -> Finding:
    problems: list[str] = []
    for role, allowed in LEAST_PRIVILEGE.items():
        held = set(facts.roles.get(role, ()))
        changing = {p for p in held if p in CONTROL_PERMISSIONS or _manages(p)}
        extra = sorted(changing - allowed)
        if extra:
            problems.append(f"role {role} also holds {', '.join(extra)}")

    holders: dict[str, int] = {}
    for user in facts.users:
        if user.active:
            holders[user.role] = holders.get(user.role, 0) + 1
    counts = ", ".join(f"{role} {n}" for role, n in sorted(holders.items()))
    source = "stored roles" if facts.roles_stored else "default roles (none stored)"
    evidence = f"{source}; active users by role: {counts or 'none'}"
    return _verdict(problems, evidence)


def _manages(permission: str) -> bool:
    return permission.startswith("manage_")


def _session_termination(facts: Facts) -> Finding:
    security = facts.config.security
    problems: list[str] = []
    if security.token_idle_timeout > MAX_IDLE_SECONDS:
        problems.append(
            f"token_idle_timeout {security.token_idle_timeout:g} s above "
            f"{MAX_IDLE_SECONDS:g} s"
        )
    if security.token_absolute_timeout > MAX_SESSION_SECONDS:
        problems.append(
            f"token_absolute_timeout {security.token_absolute_timeout:g} s above "
            f"{MAX_SESSION_SECONDS:g} s"
        )

    evidence = (
        f"token_idle_timeout={security.token_idle_timeout:g} s, "
        f"token_absolute_timeout={security.token_absolute_timeout:g} s; "
        "POST /auth/logout revokes a token, deactivating a user revokes theirs"
    )
    return _verdict(problems, evidence)


def _auditable_events(facts: Facts) -> Finding:
    def recorded(names: Sequence[str]) -> list[str]:
        return [name for name in names if facts.events.get(name)]

    starts = recorded((audit.ADAPTER_STARTED,))
    access = recorded(ACCESS_EVENTS)
    accounts = recorded(ACCOUNT_EVENTS)
    control = recorded(CONTROL_EVENTS)

    problems: list[str] = []
    if facts.chain.checked == 0:
        problems.append("the audit log is empty")
    if not starts:
        problems.append("no ADAPTER_STARTED row")
    if not access and not accounts:
        problems.append("no authentication or user management row")

    def shown(names: list[str]) -> str:
        return ", ".join(names) if names else "none yet"

    evidence = (
        f"{facts.chain.checked} audit rows; adapter starts: {shown(starts)}; "
        f"access: {shown(access)}; accounts: {shown(accounts)}; "
        f"control: {shown(control)}"
    )
    return _verdict(problems, evidence)


def _audit_storage(facts: Facts) -> Finding:
    problems = [
        f"{space.label} {space.path}: {_size(space.free)} free, under "
        f"{_size(MIN_FREE_BYTES)}"
        for space in facts.space
        if space.free < MIN_FREE_BYTES
    ]
    shown = "; ".join(
        f"{space.label} {space.path}: {_size(space.free)} free" for space in facts.space
    )
    evidence = f"{facts.storage_where}; {shown}"
    if facts.backend == "postgresql":
        evidence += "; the database's own disk is the PostgreSQL server's"
    return _verdict(problems, evidence)


def _audit_protection(facts: Facts) -> Finding:
    chain = facts.chain
    problems: list[str] = []
    if chain.ok:
        head = facts.head.id if facts.head is not None else 0
        chain_text = f"audit chain intact: {chain.checked} rows, head id {head}"
    else:
        chain_text = (
            f"audit chain broken at row id {chain.first_bad_id}: {chain.reason}"
        )
        problems.append(chain_text)

    triggers = facts.triggers
    if triggers.error is not None:
        problems.append(f"cannot read the triggers: {triggers.error}")
    missing = sorted(triggers.needed - triggers.refused)
    if missing:
        problems.append(
            f"compliance_audit_log accepts {', '.join(missing)} (no trigger refuses)"
        )
    trigger_text = (
        f"append-only triggers: {', '.join(triggers.names) or 'none'} refusing "
        f"{', '.join(sorted(triggers.refused)) or 'nothing'}"
    )
    return _verdict(problems, f"{chain_text}; {trigger_text}")


def _integrity(facts: Facts) -> Finding:
    opcua = facts.opcua
    problems: list[str] = []
    if opcua.enabled and opcua.allow_none_endpoint:
        problems.append("opc ua offers an endpoint with security None")
    if not facts.tls.enabled:
        problems.append("the rest api answers plain http")

    evidence = (
        f"{_opcua_text(opcua)}; tls.enabled={_yaml(facts.tls.enabled)}; modbus tcp "
        "has no integrity protection of its own: keep it on the control network"
    )
    return _verdict(problems, evidence)


def _confidentiality(facts: Facts) -> Finding:
    opcua = facts.opcua
    problems: list[str] = []
    if opcua.enabled:
        if opcua.allow_none_endpoint:
            problems.append("opc ua offers an endpoint with security None")
        plain = [mode for mode in opcua.security_modes if mode != "SignAndEncrypt"]
        if plain:
            problems.append(
                f"opc ua endpoints with mode {', '.join(plain)} carry values "
                "unencrypted"
            )
    if not facts.tls.enabled:
        problems.append("the rest api answers plain http")

    evidence = f"{_opcua_text(opcua)}; tls.enabled={_yaml(facts.tls.enabled)}"
    return _verdict(problems, evidence)


def _opcua_text(opcua: OpcUaFacts) -> str:
    if not opcua.enabled:
        return "opc ua disabled"
    return (
        f"opcua.allow_none_endpoint={_yaml(opcua.allow_none_endpoint)}, "
        f"security_modes=[{', '.join(opcua.security_modes)}], "
        f"security_policies=[{', '.join(opcua.security_policies)}]"
    )


def _public_keys(facts: Facts) -> Finding:
    problems: list[str] = []
    shown: list[str] = []
    for item in facts.certificates:
        slot = item.slot
        if item.absent:
            shown.append(f"{slot.name}: not configured")
            continue
        if item.problem is not None:
            problems.append(f"{slot.name}: {item.problem}")
        if item.info is None:
            continue

        bits = _key_bits(slot.cert)
        if bits is not None and bits < MIN_RSA_BITS:
            problems.append(
                f"{slot.name}: RSA key of {bits} bits, under {MIN_RSA_BITS}"
            )
        mode = _mode(slot.key)
        if mode is not None and mode & 0o077:
            problems.append(
                f"{slot.key}: mode {mode:04o}, readable by others than its owner"
            )
        shown.append(
            f"{slot.cert.name} RSA {bits if bits is not None else '?'} bits, "
            f"{item.days_left:.0f} days left, key mode "
            f"{f'{mode:04o}' if mode is not None else 'missing'}"
        )
    return _verdict(problems, "; ".join(shown))


def _monitoring(facts: Facts) -> Finding:
    section = facts.config.raw.get("alerts")
    channels: list[str] = []
    enabled: list[str] = []
    if isinstance(section, Mapping):
        for name in ("email", "sms", "webhook"):
            value = section.get(name)
            if isinstance(value, Mapping):
                on = value.get("enabled") is True
                channels.append(f"{name} {'enabled' if on else 'disabled'}")
                if on:
                    enabled.append(name)

    problems = [] if enabled else ["no alert channel is enabled"]
    evidence = f"alerts: {', '.join(channels) if channels else 'not configured'}"
    return _verdict(problems, evidence)


def _backup(facts: Facts) -> Finding:
    backups = facts.backups
    if backups.newest is None or backups.newest_at is None:
        return Finding(NOT_MET, f"no backup archive in {backups.folder}")

    age = facts.now - backups.newest_at
    problems: list[str] = []
    if age > BACKUP_MAX_AGE:
        problems.append(
            f"the newest backup is {_hours(age)} old, more than "
            f"{_hours(BACKUP_MAX_AGE)}"
        )
    if not backups.verified:
        problems.append(
            f"no {audit.BACKUP_VERIFIED} audit row names {backups.newest.name} "
            "with the digest it has now"
        )

    verified = (
        f", verified {backups.verified_at.isoformat(timespec='seconds')}"
        if backups.verified_at is not None
        else ""
    )
    evidence = (
        f"{backups.archives} archives in {backups.folder}; newest "
        f"{backups.newest.name}, {_hours(age)} old{verified}"
    )
    return _verdict(problems, evidence)


def _configuration(facts: Facts) -> Finding:
    config = facts.config
    problems: list[str] = []
    if config.source is None:
        problems.append("the demonstration configuration is in use (no file)")
        file_text = "no configuration file"
    else:
        mode = _mode(config.source)
        file_text = f"configuration {config.source} mode " + (
            f"{mode:04o}" if mode is not None else "unreadable"
        )
        if mode is not None and mode & 0o022:
            problems.append(f"{config.source} is writable by group or others")

    data_dir = config.server.data_dir
    data_mode = _mode(data_dir)
    data_text = f"data folder {data_dir} mode " + (
        f"{data_mode:04o}" if data_mode is not None else "missing"
    )
    if data_mode is not None and data_mode & 0o002:
        problems.append(f"{data_dir} is writable by others")
    return _verdict(problems, f"{file_text}; {data_text}")


CONTROLS: Final[tuple[Control, ...]] = (
    Control(
        "SR 1.1",
        "Human user identification and authentication",
        ("A.5.16",),
        "every active user has a unique name and a known role; no anonymous "
        "opc ua sessions",
        _identification,
    ),
    Control(
        "SR 1.7",
        "Strength of password-based authentication",
        ("A.5.17",),
        f"passwords of at least 12 characters; argon2id hashes for every active "
        f"user ({ARGON2ID})",
        _passwords,
    ),
    Control(
        "SR 1.9",
        "Strength of public key-based authentication",
        ("A.8.24",),
        f"CA and server certificates valid for more than {CERTIFICATE_DAYS} days, "
        f"signed by the local CA, RSA keys of {MIN_RSA_BITS} bits or more, "
        "private keys readable by their owner only",
        _public_keys,
    ),
    Control(
        "SR 1.11",
        "Unsuccessful login attempts",
        ("A.8.5",),
        f"an account locks after at most {MAX_LOGIN_ATTEMPTS} failed logins, for "
        f"at least {MIN_LOCKOUT_SECONDS:g} s",
        _login_attempts,
    ),
    Control(
        "SR 2.1",
        "Authorization enforcement",
        ("A.5.15", "A.8.2"),
        "viewer and auditor roles change nothing (no setpoints, emergency "
        "stops or management); the optimizer role changes setpoints only",
        _authorization,
    ),
    Control(
        "SR 2.6",
        "Remote session termination",
        ("A.8.5",),
        f"sessions end after at most {MAX_IDLE_SECONDS:g} s idle and "
        f"{MAX_SESSION_SECONDS:g} s in all",
        _session_termination,
    ),
    Control(
        "SR 2.8",
        "Auditable events",
        ("A.8.15",),
        "the audit log records the adapter's starts and authentication or user "
        "management events",
        _auditable_events,
    ),
    Control(
        "SR 2.9",
        "Audit storage capacity",
        ("A.8.15",),
        f"at least {_size(MIN_FREE_BYTES)} free for the audit log and its outage spool",
        _audit_storage,
    ),
    Control(
        "SR 3.1",
        "Communication integrity",
        ("A.8.20", "A.8.24"),
        "no opc ua endpoint without signing; the rest api over tls",
        _integrity,
    ),
    Control(
        "SR 3.9",
        "Protection of audit information",
        ("A.8.15", "A.5.33"),
        "the audit hash chain verifies; triggers refuse UPDATE and DELETE (and "
        "TRUNCATE on PostgreSQL) of the audit table",
        _audit_protection,
    ),
    Control(
        "SR 4.1",
        "Information confidentiality",
        ("A.8.24",),
        "every opc ua endpoint SignAndEncrypt; the rest api over tls",
        _confidentiality,
    ),
    Control(
        "SR 6.2",
        "Continuous monitoring",
        ("A.8.16",),
        "at least one alert channel (email, sms, webhook) enabled",
        _monitoring,
    ),
    Control(
        "SR 7.3",
        "Control system backup",
        ("A.8.13",),
        f"a backup archive at most {_hours(BACKUP_MAX_AGE)} old, verified "
        f"({audit.BACKUP_VERIFIED} in the audit log)",
        _backup,
    ),
    Control(
        "SR 7.6",
        "Network and security configuration settings",
        ("A.8.9",),
        "a configuration file (not the demonstration), not writable by group or "
        "others; a data folder not writable by others",
        _configuration,
    ),
)
"""Every check, in IEC 62443-3-3 order."""


# Gathering.


async def gather(
    config: Config, storage: Storage, *, now: dt.datetime | None = None
) -> Facts:
    """Read what the checks need from ``config`` and the open ``storage``."""
    from calejo_server.ops.certs import assess_all, certificate_slots

    moment = now or dt.datetime.now(dt.UTC)
    opcua = await asyncio.to_thread(_opcua_facts, config)
    snapshot = await storage.load()
    roles = dict(DEFAULT_ROLES)
    roles.update({record.role: record.permissions for record in snapshot.roles})

    chain = await storage.audit_verify()
    head = await _head(storage, chain)
    names = (audit.ADAPTER_STARTED, *ACCESS_EVENTS, *ACCOUNT_EVENTS, *CONTROL_EVENTS)
    events = {name: await _recorded(storage, name) for name in names}

    slots = certificate_slots(config, "all", opcua_enabled=opcua.enabled)
    assessments = await asyncio.to_thread(
        assess_all, slots, warn_days=CERTIFICATE_DAYS, now=moment
    )
    return Facts(
        config=config,
        now=moment,
        backend=storage.backend,
        storage_where=_where(storage),
        opcua=opcua,
        tls=parse_tls(config),
        users=list(snapshot.users),
        roles=roles,
        roles_stored=bool(snapshot.roles),
        chain=chain,
        head=head,
        events=events,
        triggers=await _triggers(config, storage),
        space=_space(config, storage),
        certificates=assessments,
        backups=await _backups(config, storage),
    )


def _opcua_facts(config: Config) -> OpcUaFacts:
    from calejo_server.protocols.opcua import parse_opcua_config

    options = parse_opcua_config(config)
    return OpcUaFacts(
        enabled=options.enabled,
        endpoint=options.endpoint,
        allow_anonymous=options.allow_anonymous,
        allow_none_endpoint=options.allow_none_endpoint,
        security_policies=options.security_policies,
        security_modes=options.security_modes,
    )


def _where(storage: Storage) -> str:
    where = getattr(storage, "where", None)
    return str(where()) if callable(where) else storage.backend


async def _head(storage: Storage, chain: ChainVerdict) -> AuditRow | None:
    if chain.checked == 0:
        return None
    rows = await storage.audit_query(
        AuditQuery(after_id=max(chain.checked - 1, 0), limit=1)
    )
    return rows[-1] if rows else None


async def _recorded(storage: Storage, event_type: str) -> bool:
    return bool(await storage.audit_query(AuditQuery(event_type=event_type, limit=1)))


# The audit table's triggers.

_SQLITE_TRIGGER = re.compile(
    r"\b(?:BEFORE|AFTER|INSTEAD\s+OF)\s+(UPDATE|DELETE|INSERT)\b(\s+OF\b)?",
    re.IGNORECASE,
)
_SQLITE_REFUSES = re.compile(r"RAISE\s*\(\s*(?:ABORT|FAIL|ROLLBACK)\b", re.IGNORECASE)

# pg_trigger.tgtype bits (PostgreSQL's trigger.h).
_PG_EVENTS: Final = {8: "DELETE", 16: "UPDATE", 32: "TRUNCATE"}
_PG_REFUSE_FUNCTION: Final = "calejo_audit_log_refuse_change"


async def _triggers(config: Config, storage: Storage) -> TriggerFacts:
    if storage.backend == "sqlite":
        path = getattr(storage, "path", None)
        if not isinstance(path, Path):
            return TriggerFacts(
                frozenset(),
                (),
                frozenset({"UPDATE", "DELETE"}),
                "the sqlite file is unknown",
            )
        return await asyncio.to_thread(_sqlite_triggers, path)
    return await _postgres_triggers(config.database.url or "")


def _sqlite_triggers(path: Path) -> TriggerFacts:
    needed = frozenset({"UPDATE", "DELETE"})
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return TriggerFacts(frozenset(), (), needed, f"{path}: {exc}")
    try:
        rows = con.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
            "AND tbl_name = 'compliance_audit_log' ORDER BY name"
        ).fetchall()
    except sqlite3.Error as exc:
        return TriggerFacts(frozenset(), (), needed, f"{path}: {exc}")
    finally:
        con.close()

    refused: set[str] = set()
    names: list[str] = []
    for name, sql in rows:
        match = _SQLITE_TRIGGER.search(sql or "")
        if match is None or match.group(2) or not _SQLITE_REFUSES.search(sql):
            continue
        refused.add(match.group(1).upper())
        names.append(str(name))
    return TriggerFacts(frozenset(refused), tuple(names), needed)


def postgres_dsn(url: str) -> str:
    """``url`` as asyncpg takes it, naming the default database when it has none."""
    from calejo_server.storage.postgres import DEFAULT_DATABASE

    parts = urlsplit(url)
    database = parts.path.lstrip("/") or DEFAULT_DATABASE
    return urlunsplit(("postgresql", parts.netloc, "/" + database, parts.query, ""))


async def _postgres_triggers(url: str) -> TriggerFacts:
    import asyncpg

    needed = frozenset(_PG_EVENTS.values())
    try:
        conn = await asyncpg.connect(postgres_dsn(url), timeout=5, command_timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return TriggerFacts(frozenset(), (), needed, str(exc) or type(exc).__name__)
    try:
        rows = await conn.fetch(
            "SELECT t.tgname, t.tgtype, t.tgenabled, p.proname FROM pg_trigger t "
            "JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE t.tgrelid = to_regclass('compliance_audit_log') "
            "AND NOT t.tgisinternal ORDER BY t.tgname"
        )
    except asyncpg.PostgresError as exc:
        return TriggerFacts(frozenset(), (), needed, str(exc))
    finally:
        await conn.close()

    refused: set[str] = set()
    names: list[str] = []
    for row in rows:
        enabled = row["tgenabled"] in ("O", "A", b"O", b"A")
        if not enabled or row["proname"] != _PG_REFUSE_FUNCTION:
            continue
        events = {name for bit, name in _PG_EVENTS.items() if row["tgtype"] & bit}
        if events:
            refused |= events
            names.append(str(row["tgname"]))
    return TriggerFacts(frozenset(refused), tuple(names), needed)


# Space and backups.


def _space(config: Config, storage: Storage) -> list[SpaceFacts]:
    places: list[tuple[str, Path]] = []
    path = getattr(storage, "path", None)
    if storage.backend == "sqlite" and isinstance(path, Path):
        places.append(("database folder", path.parent))
    places.append(("spool folder", config.server.data_dir))

    found: list[SpaceFacts] = []
    for label, place in places:
        existing = place
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        found.append(SpaceFacts(label, place, shutil.disk_usage(existing).free))
    return found


def backup_folder(config: Config) -> Path:
    """Where backups are written (see :mod:`calejo_server.ops.backup`)."""
    from calejo_server.ops.backup import backup_root, parse_backup_settings

    return backup_root(parse_backup_settings(config), config)


async def _backups(config: Config, storage: Storage) -> BackupFacts:
    from calejo_server.ops.archive import digest_file
    from calejo_server.ops.backup import list_archives

    folder = backup_folder(config)
    archives = [
        archive
        for kind in ("full", "database")
        for archive in await asyncio.to_thread(list_archives, folder, kind)
    ]
    if not archives:
        return BackupFacts(folder, None, None, 0, False, None)

    newest = max(archives, key=lambda archive: archive.created_at)
    rows = await storage.audit_query(
        AuditQuery(
            event_type=audit.BACKUP_VERIFIED,
            since=newest.created_at - dt.timedelta(minutes=5),
            limit=1000,
        )
    )
    digest: str | None = None
    verified_at = None
    for row in rows:
        if not _names(row.record, newest.path):
            continue
        recorded = row.record.details.get("sha256")
        if recorded is not None:
            if digest is None:
                digest, _ = await asyncio.to_thread(digest_file, newest.path)
            if recorded != digest:
                continue
        verified_at = row.record.timestamp
    return BackupFacts(
        folder,
        newest.path,
        newest.created_at,
        len(archives),
        verified_at is not None,
        verified_at,
    )


def _names(record: AuditRecord, archive: Path) -> bool:
    text = json.dumps(record.details, sort_keys=True)
    fields = (text, record.new_value or "", record.old_value or "")
    return any(archive.name in field for field in fields)


# Evaluating and reporting.


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One control of the report."""

    id: str
    title: str
    status: Status
    requirement: tuple[str, ...]
    evidence: tuple[str, ...]
    counterparts: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "requirement": list(self.requirement),
            "evidence": list(self.evidence),
            "counterparts": [{"id": i, "title": t} for i, t in self.counterparts],
        }


STANDARD_TITLES: Final[Mapping[str, str]] = {
    "iec62443": "IEC 62443-3-3:2013 system security requirements",
    "iso27001": "ISO/IEC 27001:2022 Annex A",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    standard: str
    generated_at: dt.datetime
    version: str
    configuration: str
    storage: str
    rows: tuple[Row, ...]

    def count(self, status: Status) -> int:
        return sum(1 for row in self.rows if row.status == status)

    @property
    def ok(self) -> bool:
        return self.count(NOT_MET) == 0

    def not_met(self) -> list[str]:
        return [row.id for row in self.rows if row.status == NOT_MET]

    def summary(self) -> str:
        return (
            f"{self.count(MET)} of {len(self.rows)} controls met, "
            f"{self.count(NOT_MET)} not met, {self.count(NOT_APPLICABLE)} not "
            "applicable"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "standard": self.standard,
            "standard_title": STANDARD_TITLES[self.standard],
            "generated_at": self.generated_at.isoformat(),
            "adapter_version": self.version,
            "configuration": self.configuration,
            "storage": self.storage,
            "summary": {
                "controls": len(self.rows),
                "met": self.count(MET),
                "not_met": self.count(NOT_MET),
                "not_applicable": self.count(NOT_APPLICABLE),
            },
            "controls": [row.to_dict() for row in self.rows],
        }


def evaluate(facts: Facts, standard: str) -> Report:
    """Run every check on ``facts``; the rows of ``standard``."""
    if standard not in STANDARDS:
        raise ValueError(
            f"expected a standard of {', '.join(STANDARDS)}, got {standard!r}"
        )

    findings = [(control, control.evaluate(facts)) for control in CONTROLS]
    if standard == "iec62443":
        rows = tuple(
            Row(
                control.sr,
                control.title,
                finding.status,
                (control.requirement,),
                (finding.evidence,),
                tuple((clause, ISO_TITLES[clause]) for clause in control.iso),
            )
            for control, finding in findings
        )
    else:
        rows = _iso_rows(findings)

    config = facts.config
    return Report(
        standard=standard,
        generated_at=facts.now,
        version=_version(),
        configuration=str(config.source) if config.source else "demonstration",
        storage=facts.storage_where,
        rows=rows,
    )


def _iso_rows(findings: Sequence[tuple[Control, Finding]]) -> tuple[Row, ...]:
    by_clause: dict[str, list[tuple[Control, Finding]]] = {}
    for control, finding in findings:
        for clause in control.iso:
            by_clause.setdefault(clause, []).append((control, finding))

    rows: list[Row] = []
    for clause in sorted(by_clause, key=_clause_order):
        members = by_clause[clause]
        statuses = {finding.status for _, finding in members}
        status: Status = NOT_APPLICABLE
        if NOT_MET in statuses:
            status = NOT_MET
        elif MET in statuses:
            status = MET
        rows.append(
            Row(
                clause,
                ISO_TITLES[clause],
                status,
                tuple(f"{c.sr}: {c.requirement}" for c, _ in members),
                tuple(f"{c.sr}: {f.evidence}" for c, f in members),
                tuple((c.sr, c.title) for c, _ in members),
            )
        )
    return tuple(rows)


def _clause_order(clause: str) -> tuple[int, ...]:
    return tuple(int(part) for part in clause.removeprefix("A.").split("."))


def _version() -> str:
    try:
        return importlib.metadata.version("calejo-control-adapter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def render(report: Report, fmt: str) -> str:
    """The report as Markdown (``md``) or JSON (``json``)."""
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2) + "\n"
    return _markdown(report)


def _markdown(report: Report) -> str:
    status_text = {MET: "met", NOT_MET: "NOT MET", NOT_APPLICABLE: "not applicable"}
    lines = [
        f"# Compliance report: {STANDARD_TITLES[report.standard]}",
        "",
        f"- Generated: {report.generated_at.isoformat(timespec='seconds')}",
        f"- Adapter: calejo-control-adapter {report.version}",
        f"- Configuration: {report.configuration}",
        f"- Storage: {report.storage}",
        f"- Result: {report.summary()}",
        "",
        "| Control | Title | Status |",
        "|---|---|---|",
    ]
    lines += [
        f"| {row.id} | {row.title} | {status_text[row.status]} |" for row in report.rows
    ]
    for row in report.rows:
        counterparts = ", ".join(f"{i} {t}" for i, t in row.counterparts)
        lines += ["", f"## {row.id} {row.title}: {status_text[row.status]}", ""]
        lines += [f"- Required: {text}" for text in row.requirement]
        lines += [f"- Evidence: {text}" for text in row.evidence]
        lines.append(f"- Counterparts: {counterparts}")
    return "\n".join(lines) + "\n"


# The command.


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Evaluate the configuration and the database against the controls of "
        "IEC 62443-3-3 or ISO/IEC 27001:2022 Annex A, print each with its "
        "evidence, and record the report in the audit log. Exit 0 when every "
        "control is met, 1 otherwise."
    )
    parser.add_argument("--standard", choices=STANDARDS, required=True)
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument(
        "--output", type=Path, help="write here instead of standard output"
    )


def run(args: argparse.Namespace) -> int:
    """``calejo compliance-report``."""
    config = load_config(getattr(args, "config", None))
    return asyncio.run(
        _report(config, args.standard, args.format, args.output, sys.stdout)
    )


async def _report(
    config: Config, standard: str, fmt: str, output: Path | None, out: TextIO
) -> int:
    from calejo_server import cli

    async with cli.opened_storage(config, read_only=True) as storage:
        try:
            facts = await gather(config, storage)
        except StorageError as exc:
            raise cli.CommandError(f"cannot read the storage: {exc}") from exc
        report = evaluate(facts, standard)
        text = render(report, fmt)

        if output is None:
            out.write(text)
            out.flush()
        else:
            _write(output, text)
            print(f"{report.summary()}; written to {output}", file=sys.stderr)

        record = audit_record(report, fmt, output, text, cli.operator_name())
        try:
            await storage.write([record])
        except StorageError as exc:
            raise cli.CommandError(
                f"report made but the audit log could not record it: {exc}"
            ) from exc
    return 0 if report.ok else 1


def audit_record(
    report: Report, fmt: str, output: Path | None, text: str, user: str
) -> AuditRecord:
    """The COMPLIANCE_REPORT row that records ``report``."""
    return AuditRecord(
        event_type=audit.COMPLIANCE_REPORT,
        severity=audit.severity_of(audit.COMPLIANCE_REPORT),
        user=user,
        protocol="CLI",
        outcome="met" if report.ok else "not_met",
        details={
            "standard": report.standard,
            "format": fmt,
            "output": str(output) if output is not None else "standard output",
            "controls": len(report.rows),
            "met": report.count(MET),
            "not_met": report.not_met(),
            "not_applicable": report.count(NOT_APPLICABLE),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        },
    )


def _write(path: Path, text: str) -> None:
    from calejo_server import cli

    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise cli.CommandError(f"cannot write {path}: {exc.strerror or exc}") from exc
