"""``calejo audit report`` and ``calejo audit compliance``: the audit log over a period.

``report`` summarises what happened: rows by severity, event type,
outcome, user, protocol and station; then lists the failed logins, the
refused requests, the emergency stops, the changes to users and roles and
every other HIGH or CRITICAL event, each with its time, user, source and
details; and whether the hash chain of the whole log is intact.

``compliance`` reads the same period for the evidence an auditor asks
for: the compliance reports run and their results, the verified backups
and the longest time without one (at most 26 hours), failed backups and
restores, certificate changes, and the hash chain. Each requirement is
met or not met.

``--since`` and ``--until`` take an ISO 8601 time (UTC when it names no
zone) or a span back from now: ``90m``, ``24h``, ``7d``, ``2w``. Exit
codes: 0 done (``compliance``: every requirement met), 1 the chain is
broken (``compliance``: a requirement not met), 2 a usage error.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import itertools
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from calejo_server import audit
from calejo_server.config import Config, load_config
from calejo_server.storage.base import SEVERITIES, AuditRow, ChainVerdict, Storage

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1

FAILED_LOGINS: Final = (
    audit.INVALID_AUTHENTICATION,
    audit.ACCOUNT_LOCKED,
    audit.SOURCE_THROTTLED,
)
REFUSED: Final = (
    audit.ACCESS_DENIED,
    audit.MODBUS_CONNECTION_REFUSED,
    audit.MODBUS_WRITE_REFUSED,
    audit.SETPOINT_REJECTED,
    audit.SETPOINT_BLOCKED,
    audit.PLAN_REJECTED,
)
EMERGENCY_STOPS: Final = (audit.EMERGENCY_STOP_ACTIVATED, audit.EMERGENCY_STOP_CLEARED)
ACCOUNTS: Final = (
    audit.USER_CREATED,
    audit.USER_UPDATED,
    audit.USER_DEACTIVATED,
    audit.PASSWORD_CHANGED,
    audit.ROLE_CHANGED,
)
BACKUP_MAX_GAP: Final = dt.timedelta(hours=26)
DEFAULT_SINCE: Final = "24h"
DEFAULT_COMPLIANCE_SINCE: Final = "30d"
MAX_EVIDENCE_ROWS: Final = 100_000

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNITS: Final = {"m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def moment(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO 8601 time or a span back from ``now`` (``24h``, ``7d``)."""
    span = _SPAN.match(text)
    if span is not None:
        seconds = float(span[1]) * _UNITS[span[2]]
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-01-31T12:00:00Z or a span "
            f"back from now such as 24h, 7d or 2w, got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


# -- reading the period ----------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Period:
    """The rows of a period, counted and the notable ones kept."""

    since: dt.datetime
    until: dt.datetime
    rows: int = 0
    first: dt.datetime | None = None
    last: dt.datetime | None = None
    by_severity: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    by_event: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    by_outcome: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    by_user: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    by_protocol: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    by_station: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    kept: dict[str, list[AuditRow]] = dataclasses.field(default_factory=dict)

    def add(self, row: AuditRow, keep: Mapping[str, Sequence[str]], limit: int) -> None:
        record = row.record
        self.rows += 1
        self.first = self.first or record.timestamp
        self.last = record.timestamp
        self.by_severity[record.severity] += 1
        self.by_event[record.event_type] += 1
        self.by_outcome[record.outcome or "-"] += 1
        self.by_user[record.user or "-"] += 1
        self.by_protocol[record.protocol or "-"] += 1
        if record.station_id:
            self.by_station[record.station_id] += 1

        for name, events in keep.items():
            if record.event_type in events or (
                not events and _other_serious(record.event_type, record.severity, keep)
            ):
                rows = self.kept.setdefault(name, [])
                if len(rows) < limit:
                    rows.append(row)
                break

    def count(self, events: Iterable[str]) -> int:
        return sum(self.by_event[e] for e in events)


def _other_serious(
    event: str, severity: str, keep: Mapping[str, Sequence[str]]
) -> bool:
    if severity not in ("HIGH", "CRITICAL"):
        return False
    return not any(event in events for events in keep.values())


REPORT_LISTS: Final[Mapping[str, Sequence[str]]] = {
    "failed logins": FAILED_LOGINS,
    "refused requests": REFUSED,
    "emergency stops": EMERGENCY_STOPS,
    "users and roles changed": ACCOUNTS,
    "other HIGH and CRITICAL events": (),
}

COMPLIANCE_LISTS: Final[Mapping[str, Sequence[str]]] = {
    "compliance reports": (audit.COMPLIANCE_REPORT,),
    "verified backups": (audit.BACKUP_VERIFIED,),
    "failed backups": (audit.BACKUP_FAILED, audit.BACKUP_VERIFICATION_FAILED),
    "restores": (audit.RESTORE_COMPLETED, audit.RESTORE_FAILED),
    "certificates": (audit.CERTIFICATE_CREATED, audit.CERTIFICATE_ROTATED),
    "users and roles changed": ACCOUNTS,
}


async def read_period(
    storage: Storage,
    since: dt.datetime,
    until: dt.datetime,
    keep: Mapping[str, Sequence[str]],
    limit: int,
) -> Period:
    period = Period(since, until)
    async for row in storage.audit_iter(since):
        if row.record.timestamp > until:
            break
        period.add(row, keep, limit)
    return period


# -- rendering ------------------------------------------------------------------


def row_line(row: AuditRow) -> str:
    """One audit row in one line: time, severity, event, who, where, what."""
    r = row.record
    parts = [
        f"#{row.id}",
        r.timestamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        r.severity,
        r.event_type,
    ]
    if r.user:
        parts.append(f"user={r.user}")
    if r.source_address:
        parts.append(f"from={r.source_address}")
    if r.protocol:
        parts.append(f"via={r.protocol}")
    if r.station_id:
        parts.append(f"station={r.station_id}" + (f"/{r.pump_id}" if r.pump_id else ""))
    if r.outcome:
        parts.append(f"outcome={r.outcome}")
    if r.new_value:
        parts.append(f"value={r.new_value}")
    if r.details:
        text = json.dumps(r.details, sort_keys=True, separators=(",", ":"))
        parts.append(text if len(text) <= 160 else text[:157] + "...")
    return " ".join(parts)


def _counts(
    counter: collections.Counter[str], limit: int = 20
) -> list[tuple[str, int]]:
    return counter.most_common(limit)


def _period_header(period: Period) -> list[str]:
    return [
        f"- Period: {period.since.isoformat(timespec='seconds')} to "
        f"{period.until.isoformat(timespec='seconds')}",
        f"- Rows: {period.rows}"
        + (
            f" (first {period.first.isoformat(timespec='seconds')}, last "
            f"{period.last.isoformat(timespec='seconds')})"
            if period.first and period.last
            else ""
        ),
    ]


def _chain_text(chain: ChainVerdict) -> str:
    if chain.ok:
        return f"intact: {chain.checked} rows verified"
    return f"BROKEN at row id {chain.first_bad_id}: {chain.reason}"


def report_markdown(period: Period, chain: ChainVerdict, storage_where: str) -> str:
    lines = [
        "# Audit report",
        "",
        *_period_header(period),
        f"- Storage: {storage_where}",
        f"- Hash chain of the whole log: {_chain_text(chain)}",
        "",
        "## Rows by severity",
        "",
        "| severity | rows |",
        "|---|---|",
    ]
    lines += [f"| {s} | {period.by_severity.get(s, 0)} |" for s in reversed(SEVERITIES)]
    for title, counter in (
        ("event type", period.by_event),
        ("outcome", period.by_outcome),
        ("user", period.by_user),
        ("protocol", period.by_protocol),
        ("station", period.by_station),
    ):
        lines += ["", f"## Rows by {title}", "", f"| {title} | rows |", "|---|---|"]
        rows = _counts(counter)
        lines += [f"| {name} | {count} |" for name, count in rows] or ["| - | 0 |"]
        if len(counter) > len(rows):
            lines.append(f"| ({len(counter) - len(rows)} more) | |")

    for name, events in REPORT_LISTS.items():
        total = period.count(events) if events else None
        kept = period.kept.get(name, [])
        heading = f"## {name[0].upper()}{name[1:]}"
        heading += f" ({total})" if total is not None else f" ({len(kept)} shown)"
        lines += ["", heading, ""]
        lines += [f"- {row_line(row)}" for row in kept] or ["- none"]
        if total is not None and total > len(kept):
            lines.append(f"- ... and {total - len(kept)} more (raise --limit)")
    return "\n".join(lines) + "\n"


def report_json(period: Period, chain: ChainVerdict, storage_where: str) -> str:
    document = {
        "since": period.since.isoformat(),
        "until": period.until.isoformat(),
        "storage": storage_where,
        "rows": period.rows,
        "chain": dataclasses.asdict(chain),
        "by_severity": {s: period.by_severity.get(s, 0) for s in SEVERITIES},
        "by_event_type": dict(period.by_event.most_common()),
        "by_outcome": dict(period.by_outcome.most_common()),
        "by_user": dict(period.by_user.most_common()),
        "by_protocol": dict(period.by_protocol.most_common()),
        "by_station": dict(period.by_station.most_common()),
        "lists": {
            name: [audit.row_to_dict(row) for row in period.kept.get(name, [])]
            for name in REPORT_LISTS
        },
    }
    return json.dumps(document, indent=2, default=str) + "\n"


# -- compliance evidence ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Requirement:
    name: str
    met: bool
    evidence: str


def requirements(
    period: Period, chain: ChainVerdict, now: dt.datetime
) -> list[Requirement]:
    """What the evidence of ``period`` shows, requirement by requirement."""
    found = [
        Requirement(
            "the audit log's hash chain is intact", chain.ok, _chain_text(chain)
        )
    ]

    verified = [
        row.record.timestamp
        for row in period.kept.get("verified backups", [])
        if row.record.details.get("kind") in ("full", "database", None)
    ]
    start = max(period.since, period.first) if period.first else period.since
    end = min(period.until, now)
    marks = [start, *sorted(verified), end]
    gaps = [(b - a, a, b) for a, b in itertools.pairwise(marks)]
    longest = max(gaps, default=(dt.timedelta(0), start, end))
    hours = longest[0].total_seconds() / 3600
    found.append(
        Requirement(
            "a verified full or database backup at least every 26 h",
            bool(verified) and longest[0] <= BACKUP_MAX_GAP,
            f"{len(verified)} verified in the period; longest time without one "
            f"{hours:.1f} h ({longest[1].isoformat(timespec='minutes')} to "
            f"{longest[2].isoformat(timespec='minutes')})",
        )
    )

    reports = period.kept.get("compliance reports", [])
    latest: dict[str, AuditRow] = {}
    for row in reports:
        latest[str(row.record.details.get("standard", "?"))] = row
    not_met = [
        f"{standard} ({_controls(row.record.details.get('not_met'))})"
        for standard, row in sorted(latest.items())
        if row.record.outcome != "met"
    ]
    shown = ", ".join(
        f"{standard} {row.record.outcome} at "
        f"{row.record.timestamp.isoformat(timespec='minutes')}"
        for standard, row in sorted(latest.items())
    )
    found.append(
        Requirement(
            "a compliance report in the period, the latest of each standard met",
            bool(latest) and not not_met,
            f"{len(reports)} reports; latest: {shown or 'none'}"
            + (f"; not met: {'; '.join(not_met)}" if not_met else ""),
        )
    )

    failed_restores = [
        row
        for row in period.kept.get("restores", [])
        if row.record.event_type == audit.RESTORE_FAILED
    ]
    found.append(
        Requirement(
            "no failed restore",
            not failed_restores,
            f"{period.by_event[audit.RESTORE_COMPLETED]} completed, "
            f"{period.by_event[audit.RESTORE_FAILED]} failed",
        )
    )
    return found


def _controls(names: object) -> str:
    if isinstance(names, list) and names:
        return ", ".join(str(name) for name in names)
    return "not met"


def compliance_markdown(
    period: Period,
    chain: ChainVerdict,
    storage_where: str,
    now: dt.datetime,
    limit: int = 50,
) -> str:
    found = requirements(period, chain, now)
    met = sum(1 for r in found if r.met)
    lines = [
        "# Compliance audit: evidence in the audit log",
        "",
        *_period_header(period),
        f"- Storage: {storage_where}",
        f"- Result: {met} of {len(found)} requirements met",
        "",
        "| requirement | status | evidence |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r.name} | {'met' if r.met else 'NOT MET'} | {r.evidence} |" for r in found
    ]
    lines += [
        "",
        "## Activity",
        "",
        f"- adapter starts: {period.by_event[audit.ADAPTER_STARTED]}, stops: "
        f"{period.by_event[audit.ADAPTER_STOPPED]}",
        f"- failed logins: {period.count(FAILED_LOGINS)}, accounts locked: "
        f"{period.by_event[audit.ACCOUNT_LOCKED]}",
        f"- refused requests: {period.count(REFUSED)}",
        f"- emergency stops: {period.by_event[audit.EMERGENCY_STOP_ACTIVATED]} "
        f"activated, {period.by_event[audit.EMERGENCY_STOP_CLEARED]} cleared",
    ]
    for name, events in COMPLIANCE_LISTS.items():
        kept = period.kept.get(name, [])[-limit:]
        total = period.count(events)
        lines += ["", f"## {name[0].upper()}{name[1:]} ({total})", ""]
        if total > len(kept):
            lines.append(f"- ... {total - len(kept)} earlier (raise --limit)")
        lines += [f"- {row_line(row)}" for row in kept] or ["- none"]
    return "\n".join(lines) + "\n"


def compliance_json(
    period: Period, chain: ChainVerdict, storage_where: str, now: dt.datetime
) -> str:
    found = requirements(period, chain, now)
    document = {
        "since": period.since.isoformat(),
        "until": period.until.isoformat(),
        "storage": storage_where,
        "requirements": [dataclasses.asdict(r) for r in found],
        "counts": dict(period.by_event.most_common()),
        "lists": {
            name: [audit.row_to_dict(row) for row in period.kept.get(name, [])]
            for name in COMPLIANCE_LISTS
        },
    }
    return json.dumps(document, indent=2, default=str) + "\n"


# -- the commands -------------------------------------------------------------------


def _storage_where(storage: Storage) -> str:
    where = getattr(storage, "where", None)
    return str(where()) if callable(where) else storage.backend


def add_actions(actions: Any) -> None:
    """Add ``report`` and ``compliance`` to the ``calejo audit`` actions."""
    report = actions.add_parser(
        "report",
        help="summarise a period: counts by event, severity, outcome, user; "
        "failed logins and refused requests listed",
    )
    compliance = actions.add_parser(
        "compliance",
        help="the compliance evidence of a period: reports, verified backups, "
        "restores, certificates, the hash chain",
    )
    for parser, since in (
        (report, DEFAULT_SINCE),
        (compliance, DEFAULT_COMPLIANCE_SINCE),
    ):
        parser.add_argument(
            "--since",
            type=moment,
            default=since,
            help=f"from this ISO 8601 time or this long ago: 24h, 7d, 2w "
            f"(default {since})",
        )
        parser.add_argument(
            "--until", type=moment, help="up to this time (default: now)"
        )
        parser.add_argument("--format", choices=("md", "json"), default="md")
        parser.add_argument(
            "--output", type=Path, help="write here instead of standard output"
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=50,
            help="rows listed per list (default 50)",
        )


def run(args: argparse.Namespace) -> int:
    """``calejo audit report`` or ``calejo audit compliance``."""
    from calejo_server import cli

    config = load_config(getattr(args, "config", None))
    if args.limit < 1:
        raise cli.CommandError(
            f"--limit: expected at least 1, got {args.limit}", cli.EXIT_USAGE
        )
    return cli._run_async(_run(config, args, sys.stdout))


async def _run(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from calejo_server import cli

    now = dt.datetime.now(dt.UTC)
    since = args.since if isinstance(args.since, dt.datetime) else moment(args.since)
    until = args.until or now
    if until < since:
        raise cli.CommandError(
            f"--until {until.isoformat()} is before --since {since.isoformat()}",
            cli.EXIT_USAGE,
        )

    keep = REPORT_LISTS if args.action == "report" else COMPLIANCE_LISTS
    # The compliance evidence needs every row of its lists (backup gaps).
    limit = args.limit if args.action == "report" else MAX_EVIDENCE_ROWS
    async with cli.opened_storage(config, read_only=True) as storage:
        period = await read_period(storage, since, until, keep, limit)
        chain = await storage.audit_verify()
        where = _storage_where(storage)

    if args.action == "report":
        text = (
            report_json(period, chain, where)
            if args.format == "json"
            else report_markdown(period, chain, where)
        )
        code = EXIT_OK if chain.ok else EXIT_FAILED
    else:
        text = (
            compliance_json(period, chain, where, now)
            if args.format == "json"
            else compliance_markdown(period, chain, where, now, args.limit)
        )
        code = (
            EXIT_OK
            if all(r.met for r in requirements(period, chain, now))
            else EXIT_FAILED
        )

    if args.output is None:
        out.write(text)
        out.flush()
    else:
        try:
            args.output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise cli.CommandError(
                f"cannot write {args.output}: {exc.strerror or exc}"
            ) from exc
        print(
            f"{period.rows} audit rows summarised into {args.output}", file=sys.stderr
        )
    return code
