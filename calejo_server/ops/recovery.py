"""``calejo recovery check|verify``: can the plant recover, and did it?

``check`` (before anything goes wrong, daily, and before planned work)
reads the running adapter and its database: the adapter's health, the
emergency stops latched (in the database, and live when the adapter
answers: each stop with ``--user``, else their number), the stations in
failsafe, the audit chain, the newest verified backup, the certificates.
It is ready when the database answers with its chain intact, a full or
database backup at most 26 hours old has been verified, no certificate
in use has expired or expires within 7 days, the adapter answers and
holds every stop the database holds. ``--save FILE`` keeps what it saw
(stops, stations) as JSON for ``verify``.

``verify`` (after a restart, a restore or a move to another host) waits
up to ``--wait`` seconds for the adapter to answer, then checks that it
is not down, that it started after the saved state was taken, that every
stop latched before (``--against FILE``, else in the database) is latched
again, that every station is served, and that the audit chain is intact.

Exit codes: 0 ready (``verify``: recovered), 1 not (each reason is
printed), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from calejo_server.config import Config, load_config
from calejo_server.ops import remote as remote_mod
from calejo_server.ops.remote import Remote, RemoteError
from calejo_server.storage.base import StorageError

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
CERTIFICATE_DAYS: Final = 7
BACKUP_MAX_AGE: Final = dt.timedelta(hours=26)
SNAPSHOT_FORMAT: Final = 1

StopKey = tuple[str, str | None, str | None]


def _key(stop: Mapping[str, Any]) -> StopKey:
    return (str(stop["level"]), stop.get("station_id"), stop.get("pump_id"))


def _stop_text(stop: Mapping[str, Any]) -> str:
    scope = {
        "system": "system",
        "station": f"station {stop.get('station_id')}",
        "pump": f"pump {stop.get('station_id')}/{stop.get('pump_id')}",
    }.get(str(stop.get("level")), str(stop.get("level")))
    return (
        f"{scope}: since {stop.get('since')} by {stop.get('operator')}: "
        f"{stop.get('reason')}"
    )


@dataclasses.dataclass(slots=True)
class Stored:
    """What the database holds: latched stops, station states, the chain."""

    where: str
    stops: list[dict[str, Any]]
    failsafe: dict[str, bool]
    chain_ok: bool
    chain_text: str
    backup: Any | None
    error: str | None = None


@dataclasses.dataclass(slots=True)
class Live:
    """What the running adapter answers."""

    api: str
    status: str
    started_at: dt.datetime | None
    stations: dict[str, bool]
    stops: list[dict[str, Any]] | None
    stop_count: int | None
    error: str | None = None
    opcua: bool | None = None
    """Whether the adapter runs OPC UA (None: it did not say)."""


async def read_stored(config: Config) -> Stored:
    from calejo_server import cli
    from calejo_server.ops.compliance import _backups

    try:
        async with cli.opened_storage(config, read_only=True) as storage:
            snapshot = await storage.load()
            chain = await storage.audit_verify()
            backup = await _backups(config, storage)
            where_of = getattr(storage, "where", None)
            where = str(where_of()) if callable(where_of) else storage.backend
    except (cli.CommandError, StorageError) as exc:
        return Stored("the database", [], {}, False, "", None, str(exc))

    stops = [
        {
            "level": r.level,
            "station_id": r.station_id,
            "pump_id": r.pump_id,
            "since": (r.since or r.at).isoformat(),
            "reason": r.reason,
            "operator": r.operator,
        }
        for r in snapshot.emergency_stops
        if r.active
    ]
    failsafe = {s.station_id: s.failsafe for s in snapshot.station_states}
    chain_text = (
        f"audit chain intact ({chain.checked} rows)"
        if chain.ok
        else f"audit chain broken at row id {chain.first_bad_id}: {chain.reason}"
    )
    return Stored(where, stops, failsafe, chain.ok, chain_text, backup)


def read_live(remote: Remote, token: str | None) -> Live:
    """The adapter's health, stations, and stops; ``error`` when it is down."""
    try:
        code, detailed = remote.get_json("/health/detailed")
        _, status = remote.get_json("/status")
    except RemoteError as exc:
        return Live(remote.api, "unreachable", None, {}, None, None, str(exc))

    state = (
        str(detailed.get("status", "down")) if isinstance(detailed, dict) else "down"
    )
    if code >= 500 and state == "ok":
        state = "down"
    components = detailed.get("components", {}) if isinstance(detailed, dict) else {}
    watchdog = components.get("watchdog", {}) if isinstance(components, dict) else {}
    stations = {
        sid: bool(item.get("failsafe"))
        for sid, item in (watchdog.get("stations") or {}).items()
        if isinstance(item, dict)
    }
    opcua = components.get("opcua") if isinstance(components, dict) else None
    serving = (
        opcua.get("state") != "not_configured" if isinstance(opcua, dict) else None
    )
    started = None
    if isinstance(status, dict) and status.get("started_at"):
        started = dt.datetime.fromisoformat(str(status["started_at"]))

    stops = None
    count = None
    if token is not None:
        code, body = remote.get_json("/emergency-stop-status", token=token)
        if code == 200 and isinstance(body, dict):
            stops = list(body.get("stops") or [])
            count = len(stops)
    if count is None:
        try:
            from calejo_server.ops.perf import scrape

            value = scrape(remote).value("calejo_emergency_stops_active")
            count = int(value) if value is not None else None
        except RemoteError:
            count = None
    return Live(remote.api, state, started, stations, stops, count, opcua=serving)


def _certificate_problems(config: Config, opcua: bool | None) -> tuple[list[str], str]:
    from calejo_server.ops.certs import assess_all, certificate_slots

    slots = certificate_slots(config, opcua_enabled=opcua)
    assessments = assess_all(slots, warn_days=CERTIFICATE_DAYS)
    problems = [a.problem for a in assessments if a.problem is not None]
    shown = ", ".join(
        f"{a.slot.name} {a.days_left:.0f} days"
        for a in assessments
        if a.days_left is not None
    )
    return problems, shown or "none in use"


def _stop_problems(
    expected: Sequence[Mapping[str, Any]], live: Live, source: str
) -> list[str]:
    if live.error is not None or live.status == "unreachable":
        return []
    if live.stops is not None:
        held = {_key(stop) for stop in live.stops}
        return [
            f"latched {source} but not in the adapter: {_stop_text(stop)}"
            for stop in expected
            if _key(stop) not in held
        ]
    if live.stop_count is not None and live.stop_count < len(expected):
        return [
            f"{len(expected)} stops latched {source}, the adapter holds "
            f"{live.stop_count} (log in with --user to see which)"
        ]
    return []


def _print_stops(title: str, stops: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    print(f"{title}: {len(stops)}", file=out)
    for stop in stops:
        print(f"  {_stop_text(stop)}", file=out)


# -- check ----------------------------------------------------------------------


def check(
    config: Config, remote: Remote, token: str | None, out: TextIO
) -> tuple[bool, dict[str, Any]]:
    stored = asyncio.run(read_stored(config))
    live = read_live(remote, token)
    now = dt.datetime.now(dt.UTC)
    problems: list[str] = []

    if live.error is not None:
        print(f"adapter: unreachable ({live.error})", file=out)
        problems.append("the adapter does not answer")
    else:
        started = (
            live.started_at.isoformat(timespec="seconds") if live.started_at else "?"
        )
        print(f"adapter: {live.status} ({live.api}, started {started})", file=out)
        if live.status == "down":
            problems.append("the adapter reports itself down")

    if stored.error is not None:
        print(f"database: {stored.error}", file=out)
        problems.append("the database cannot be read")
    else:
        print(f"database: {stored.where}: {stored.chain_text}", file=out)
        if not stored.chain_ok:
            problems.append(stored.chain_text)

    _print_stops("emergency stops latched in the database", stored.stops, out)
    if live.stops is not None:
        _print_stops("emergency stops latched in the adapter", live.stops, out)
    elif live.stop_count is not None:
        print(
            f"emergency stops latched in the adapter: {live.stop_count} (log in "
            "with --user to list them)",
            file=out,
        )
    problems += _stop_problems(stored.stops, live, "in the database")

    stations = live.stations or stored.failsafe
    failsafe = sorted(sid for sid, on in stations.items() if on)
    print(
        f"stations: {len(stations)}; in failsafe: {', '.join(failsafe) or 'none'}",
        file=out,
    )

    backup = stored.backup
    if backup is None or backup.newest is None or backup.newest_at is None:
        folder = backup.folder if backup is not None else "the backup folder"
        print(f"backup: none in {folder}", file=out)
        problems.append("no full or database backup to restore from")
    else:
        age = now - backup.newest_at
        verified = (
            f"verified {backup.verified_at.isoformat(timespec='seconds')}"
            if backup.verified_at
            else "NOT verified"
        )
        print(
            f"backup: {backup.newest} ({age.total_seconds() / 3600:.1f} h old, "
            f"{verified})",
            file=out,
        )
        if age > BACKUP_MAX_AGE:
            problems.append(
                f"the newest backup is {age.total_seconds() / 3600:.1f} h old, more "
                "than 26 h"
            )
        if not backup.verified:
            problems.append(f"the newest backup {backup.newest.name} is not verified")

    cert_problems, shown = _certificate_problems(config, live.opcua)
    print(f"certificates: {shown}", file=out)
    problems += cert_problems

    if problems:
        print("recovery: NOT READY", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
    else:
        print("recovery: ready", file=out)

    snapshot = {
        "format": SNAPSHOT_FORMAT,
        "taken_at": now.isoformat(),
        "adapter": live.api,
        "adapter_started_at": live.started_at.isoformat() if live.started_at else None,
        "stops": live.stops if live.stops is not None else stored.stops,
        "stations": sorted(stations),
        "failsafe": failsafe,
        "backup": str(backup.newest) if backup is not None and backup.newest else None,
    }
    return not problems, snapshot


# -- verify -----------------------------------------------------------------------


def load_snapshot(path: Path) -> dict[str, Any]:
    from calejo_server import cli

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise cli.CommandError(
            f"--against {path}: cannot read it: {exc.strerror or exc}", cli.EXIT_USAGE
        ) from exc
    except ValueError as exc:
        raise cli.CommandError(
            f"--against {path}: expected the JSON that 'recovery check --save' "
            f"writes, got something else ({exc})",
            cli.EXIT_USAGE,
        ) from exc
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise cli.CommandError(
            f"--against {path}: expected a snapshot of format {SNAPSHOT_FORMAT} "
            "from 'calejo recovery check --save'",
            cli.EXIT_USAGE,
        )
    return data


def wait_for(remote: Remote, seconds: float) -> bool:
    """Poll ``/health`` until the adapter answers and is not down, bounded."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            code, body = remote.get_json("/health")
            if code < 500 and isinstance(body, dict):
                return True
        except RemoteError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def verify(
    config: Config,
    remote: Remote,
    token: str | None,
    snapshot: Mapping[str, Any] | None,
    out: TextIO,
) -> bool:
    live = read_live(remote, token)
    stored = asyncio.run(read_stored(config))
    problems: list[str] = []

    if live.error is not None:
        print(f"adapter: unreachable ({live.error})", file=out)
        print("recovery: NOT VERIFIED", file=out)
        print("  - the adapter does not answer", file=out)
        return False

    started = live.started_at
    print(
        f"adapter: {live.status} ({live.api}, started "
        f"{started.isoformat(timespec='seconds') if started else '?'})",
        file=out,
    )
    if live.status == "down":
        problems.append("the adapter reports itself down")

    if snapshot is not None:
        taken = dt.datetime.fromisoformat(str(snapshot["taken_at"]))
        expected = list(snapshot.get("stops") or [])
        source = f"at {taken.isoformat(timespec='seconds')}"
        if started is not None and started < taken:
            problems.append(
                f"the adapter has run since {started.isoformat(timespec='seconds')}, "
                "before the saved state was taken: it was not restarted"
            )
        stations = [str(s) for s in snapshot.get("stations") or []]
    else:
        expected = stored.stops
        source = "in the database"
        stations = sorted(stored.failsafe)

    _print_stops(f"emergency stops latched {source}", expected, out)
    if live.stops is not None:
        _print_stops("emergency stops latched in the adapter", live.stops, out)
    elif live.stop_count is not None:
        print(f"emergency stops latched in the adapter: {live.stop_count}", file=out)
    problems += [
        f"{problem}: activate it again"
        for problem in _stop_problems(expected, live, source)
    ]

    missing = [sid for sid in stations if sid not in live.stations]
    failsafe = sorted(sid for sid, on in live.stations.items() if on)
    print(
        f"stations served: {len(live.stations)}; in failsafe: "
        f"{', '.join(failsafe) or 'none'} (until a fresh setpoint or plan)",
        file=out,
    )
    if missing:
        problems.append(f"stations not served any more: {', '.join(missing)}")

    if stored.error is not None:
        print(f"database: {stored.error}", file=out)
        problems.append("the database cannot be read")
    else:
        print(f"database: {stored.where}: {stored.chain_text}", file=out)
        if not stored.chain_ok:
            problems.append(stored.chain_text)

    if problems:
        print("recovery: NOT VERIFIED", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
        return False
    print("recovery: verified", file=out)
    return True


# -- the command -----------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Before an emergency: can the plant recover (check)? After a restart, "
        "restore or move: did it (verify)? Reads the running adapter and its "
        "database: emergency stops, failsafe, audit chain, backups, certificates."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check_parser = actions.add_parser(
        "check", help="stops, failsafe, backups, certificates: ready to recover?"
    )
    check_parser.add_argument(
        "--save",
        type=Path,
        metavar="FILE",
        help="keep the state seen as JSON for verify",
    )
    verify_parser = actions.add_parser(
        "verify", help="after a recovery: the adapter back, with its stops latched"
    )
    verify_parser.add_argument(
        "--against",
        type=Path,
        metavar="FILE",
        help="the state 'check --save' kept (default: the stops in the database)",
    )
    verify_parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="seconds to wait for the adapter to answer (default 30)",
    )
    for sub in (check_parser, verify_parser):
        remote_mod.add_arguments(sub)
        remote_mod.add_login_arguments(sub, "listing each emergency stop")


def run(args: argparse.Namespace) -> int:
    """``calejo recovery check|verify``."""
    from calejo_server import cli

    config = load_config(getattr(args, "config", None))
    out = sys.stdout
    with remote_mod.connect(args, config) as remote:
        if args.action == "check":
            token = _login_quietly(remote, args.user, out)
            ready, snapshot = check(config, remote, token, out)
            if args.save is not None:
                _save(args.save, snapshot)
                print(f"state saved to {args.save}", file=out)
            return EXIT_OK if ready else EXIT_FAILED

        if not 0 <= args.wait <= 3600:
            raise cli.CommandError(
                f"--wait: expected 0 to 3600 seconds, got {args.wait:g}", cli.EXIT_USAGE
            )
        saved = load_snapshot(args.against) if args.against is not None else None
        wait_for(remote, args.wait)
        token = _login_quietly(remote, args.user, out)
        return EXIT_OK if verify(config, remote, token, saved, out) else EXIT_FAILED


def _login_quietly(remote: Remote, user: str | None, out: TextIO) -> str | None:
    """A token, or None when the adapter does not answer (reported later)."""
    from calejo_server import cli

    if user is None:
        return None
    try:
        remote.get("/health")
    except RemoteError:
        return None
    try:
        return remote_mod.login(remote, user)
    except cli.CommandError as exc:
        if exc.exit_code == cli.EXIT_USAGE:
            raise
        print(f"login: {exc}; the stops are counted, not listed", file=out)
        return None


def _save(path: Path, snapshot: Mapping[str, Any]) -> None:
    from calejo_server import cli

    try:
        path.write_text(json.dumps(snapshot, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise cli.CommandError(f"cannot write {path}: {exc.strerror or exc}") from exc
