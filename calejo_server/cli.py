"""The ``calejo`` command.

Each subcommand is a small function registered in :data:`COMMANDS`: a
name, a one-line help, a function that declares its arguments and the
function that runs it and returns the exit code. ``python -m
calejo_server`` runs the same command.

Exit codes: 0 success; 1 the command failed (a broken audit chain, an
unknown user, a degraded adapter for ``health-check``); 2 a usage or
configuration error (and ``health-check``: the adapter is down or
unreachable); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import getpass
import logging
import os
import select
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from calejo_server.config import Config, ConfigError, load_config
from calejo_server.ops import (
    audit_report,
    backup_commands,
    certs,
    compliance,
    db_check,
    health,
    perf,
    recovery,
    security,
)
from calejo_server.protocols import modbus_commands, opcua_cli
from calejo_server.storage.base import Storage, StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A command cannot do what was asked; the message says why."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """One ``calejo`` subcommand."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- serve ------------------------------------------------------------------


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the adapter: control engine, REST API (and the protocol servers "
        "the configuration enables) in one process, until SIGTERM or Ctrl-C. "
        "Without a configuration it serves a demonstration station on the "
        "embedded database in ./calejo-data."
    )


def run_serve(args: argparse.Namespace) -> int:
    from calejo_server.app import serve

    config = _load(args)
    return serve(config)


# -- users ------------------------------------------------------------------


def _users_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Manage the adapter's users directly in its storage, through the same "
        "rules as the REST API (password policy, roles, audit). Only while "
        "the adapter is not running on this data folder; while it runs, use "
        "the REST API (/api/v1/users)."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    actions.add_parser("list", help="list the users")

    add = actions.add_parser("add", help="create a user")
    add.add_argument("username")
    add.add_argument("--role", required=True, help="admin, operator, ...")
    add.add_argument("--email", required=True)
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input; without it a one-time "
        "password is generated, to be changed at first login",
    )

    deactivate = actions.add_parser(
        "deactivate", help="deactivate a user and revoke their tokens"
    )
    deactivate.add_argument("username")

    reset = actions.add_parser(
        "reset-password",
        help="set a new one-time password (printed), to be changed at login",
    )
    reset.add_argument("username")
    reset.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the new password from standard input instead",
    )


def run_users(args: argparse.Namespace) -> int:
    config = _load(args)
    return _run_async(_users(config, args, sys.stdout))


@dataclasses.dataclass(frozen=True, slots=True)
class CommandContext:
    """Who does a change from the command line, for the audit log."""

    user: str
    source_address: str | None = None
    protocol: str = "CLI"


async def _users(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    from calejo_server.security import PasswordPolicyError, Security, SecurityError

    if args.action == "list":
        async with opened_storage(config, read_only=True) as storage:
            snapshot = await storage.load()
        _print_users(snapshot.users, out)
        return EXIT_OK

    password = _read_password() if getattr(args, "password_stdin", False) else None
    ctx = CommandContext(user=operator_name())

    with _offline(config):
        async with opened_storage(config) as storage:
            security = Security(config.security, storage)
            await security.start()
            try:
                return await _change_user(security, args, password, ctx, out)
            except (SecurityError, PasswordPolicyError) as exc:
                raise CommandError(str(exc)) from exc
            finally:
                await security.stop()


async def _change_user(
    security: Any,
    args: argparse.Namespace,
    password: str | None,
    ctx: CommandContext,
    out: TextIO,
) -> int:
    if args.action == "add":
        view, initial = await security.create_user(
            args.username, args.email, args.role, password, ctx
        )
        print(f"user {view.username!r} created with role {view.role}", file=out)
        if initial is not None:
            _print_one_time(view.username, initial, out)
        return EXIT_OK

    user = security.user_by_name(args.username)
    if args.action == "deactivate":
        await security.deactivate_user(user.user_id, ctx)
        print(f"user {user.username!r} deactivated; tokens revoked", file=out)
        return EXIT_OK

    generated = await security.reset_password(user.user_id, ctx, password)
    print(f"password of {user.username!r} reset; tokens revoked", file=out)
    if generated is not None:
        _print_one_time(user.username, generated, out)
    return EXIT_OK


def _print_one_time(username: str, password: str, out: TextIO) -> None:
    print(
        f"one-time password of {username!r} (shown once; it must be changed "
        f"at first login):\n    password: {password}",
        file=out,
    )


def _print_users(users: Sequence[Any], out: TextIO) -> None:
    rows = [("USERNAME", "ROLE", "EMAIL", "ACTIVE", "MUST CHANGE", "LOCKED UNTIL")]
    now = dt.datetime.now(dt.UTC)
    for user in sorted(users, key=lambda u: u.username.casefold()):
        locked = (
            user.locked_until if user.locked_until and user.locked_until > now else None
        )
        rows.append(
            (
                user.username,
                user.role,
                user.email,
                "yes" if user.active else "no",
                "yes" if user.must_change_password else "no",
                locked.isoformat(timespec="seconds") if locked else "-",
            )
        )

    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) for cell, w in zip(row, widths, strict=True)
            ).rstrip(),
            file=out,
        )


def _read_password() -> str:
    line = sys.stdin.readline()
    if not line:
        raise CommandError(
            "--password-stdin: expected a password on standard input, got nothing"
        )
    return line.rstrip("\r\n")


@contextlib.contextmanager
def _offline(config: Config) -> Iterator[None]:
    """Hold the data folder's lock: refuse while an adapter runs on it."""
    from calejo_server.app import AdapterError, DataDirLock

    lock = DataDirLock(config.server.data_dir)
    try:
        lock.acquire()
    except AdapterError as exc:
        raise CommandError(
            f"{exc}; while the adapter runs, manage users through its REST API "
            "(/api/v1/users)"
        ) from exc

    try:
        yield
    finally:
        lock.release()


# -- audit ------------------------------------------------------------------


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export the audit log, verify its hash chain, summarise a period "
        "(report) or gather its compliance evidence (compliance)."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    export = actions.add_parser("export", help="write the audit log")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument(
        "--since",
        type=_iso_datetime,
        help="only rows at or after this ISO 8601 time (UTC if no zone)",
    )
    export.add_argument(
        "--output", type=Path, help="write here instead of standard output"
    )

    actions.add_parser(
        "verify",
        help="walk the hash chain: exit 0 when intact, 1 naming the first broken row",
    )
    audit_report.add_actions(actions)


def run_audit(args: argparse.Namespace) -> int:
    if args.action in ("report", "compliance"):
        return audit_report.run(args)
    config = _load(args)
    if args.action == "export":
        return _run_async(_audit_export(config, args))
    return _run_async(_audit_verify(config, sys.stdout))


async def _audit_export(config: Config, args: argparse.Namespace) -> int:
    from calejo_server import audit

    async with opened_storage(config, read_only=True) as storage:
        if args.output is None:
            count = await audit.export(storage, args.format, sys.stdout, args.since)
            sys.stdout.flush()
        else:
            with _open_output(args.output) as out:
                count = await audit.export(storage, args.format, out, args.since)

    target = args.output if args.output is not None else "standard output"
    print(f"{count} audit rows written to {target}", file=sys.stderr)
    return EXIT_OK


async def _audit_verify(config: Config, out: TextIO) -> int:
    from calejo_server import audit

    async with opened_storage(config, read_only=True) as storage:
        verdict = await audit.verify(storage)

    if verdict.ok:
        print(f"audit chain intact: {verdict.checked} rows verified", file=out)
        return EXIT_OK

    print(
        f"audit chain broken at row id {verdict.first_bad_id}: {verdict.reason} "
        f"({verdict.checked} rows checked)",
        file=out,
    )
    return EXIT_FAILED


def _open_output(path: Path) -> TextIO:
    try:
        return path.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise CommandError(
            f"cannot write {path}: {exc.strerror or exc}", EXIT_FAILED
        ) from exc


# -- common -----------------------------------------------------------------


def _iso_datetime(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-01-31T12:00:00Z, got {text!r}"
        ) from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value


def _load(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _run_async(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def opened_storage(
    config: Config, *, read_only: bool = False
) -> AsyncIterator[Storage]:
    """The configured storage, open for the length of a command.

    ``read_only`` commands may run beside an adapter using the same data
    folder; they then keep their own (empty) spool folder, so they never
    deliver or touch the spool of the running adapter.
    """
    from calejo_server.app import DataDirLock
    from calejo_server.storage import DEFAULT_SQLITE_FILE, open_storage

    url = config.database.url
    data_dir = config.server.data_dir
    with contextlib.ExitStack() as stack:
        if read_only and DataDirLock.holder(data_dir) is not None:
            if not url:
                url = f"sqlite:///{(data_dir / DEFAULT_SQLITE_FILE).resolve()}"
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))

        storage = open_storage(url, data_dir)
        try:
            await storage.open()
        except StorageError as exc:
            raise CommandError(f"cannot open the storage: {exc}") from exc

        try:
            yield storage
        finally:
            await storage.close()


def operator_name() -> str:
    """Who runs the command, for the audit log (``cli:<login>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


COMMANDS: tuple[Command, ...] = (
    Command("serve", "run the adapter", _serve_arguments, run_serve),
    Command("users", "list, add, deactivate users", _users_arguments, run_users),
    Command(
        "audit",
        "export, verify or summarise the audit log",
        _audit_arguments,
        run_audit,
    ),
    Command(
        "health-check",
        "ask a running adapter for its health",
        health.arguments,
        health.run,
    ),
    Command(
        "backup",
        "write a verified backup archive, or prune old ones",
        backup_commands.backup_arguments,
        backup_commands.run_backup_command,
    ),
    Command(
        "verify-backup",
        "check a backup archive, part by part",
        backup_commands.verify_arguments,
        backup_commands.run_verify,
    ),
    Command(
        "restore",
        "restore the database and/or configuration from a backup",
        backup_commands.restore_arguments,
        backup_commands.run_restore,
    ),
    Command(
        "certs",
        "make, rotate or check the certificates",
        certs.arguments,
        certs.run,
    ),
    Command(
        "compliance-report",
        "evaluate the adapter against IEC 62443-3-3 or ISO 27001",
        compliance.arguments,
        compliance.run,
    ),
    Command(
        "modbus-map",
        "print the Modbus register map of the stations",
        modbus_commands.map_arguments,
        modbus_commands.run_map,
    ),
    Command(
        "modbus",
        "read registers from a Modbus TCP server",
        modbus_commands.modbus_arguments,
        modbus_commands.run_modbus,
    ),
    Command(
        "opcua",
        "browse or read an OPC UA server",
        opcua_cli.add_arguments,
        opcua_cli.run,
    ),
    Command(
        "performance",
        "time a running adapter, report and judge its KPIs from /metrics",
        perf.arguments,
        perf.run,
    ),
    Command(
        "security",
        "scan a running adapter, check the policy, controls and risks",
        security.arguments,
        security.run,
    ),
    Command(
        "db",
        "check the database: integrity, schema, triggers, audit chain",
        db_check.arguments,
        db_check.run,
    ),
    Command(
        "recovery",
        "can the plant recover (check), and did it (verify)",
        recovery.arguments,
        recovery.run,
    ),
)
"""Every subcommand, in the order ``calejo --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``calejo`` with every registered command."""
    parser = argparse.ArgumentParser(
        prog="calejo", description="The Calejo Control Adapter."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)

    _add_config_option(parser, top=True)
    return parser


def _add_config_option(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--config FILE`` on ``parser`` and every subcommand beneath it.

    Accepted before or after the subcommand (``calejo --config F serve``
    and ``calejo serve --config F``); only the top level sets a default.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help="the YAML configuration (default: $CALEJO_CONFIG, else the "
        "demonstration station)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_config_option(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``calejo`` with ``argv`` (default: the process arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"calejo: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"calejo: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        if not _stdout_closed():
            print(f"calejo: {exc}", file=sys.stderr)
            return EXIT_FAILED
        # Whoever read the output has gone (``calejo audit export | head``):
        # stop quietly, as other tools do, and let the interpreter's last
        # flush of the output go nowhere rather than fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED

    return code


def _stdout_closed() -> bool:
    """Whether the standard output is a pipe that nobody reads any more."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return False
    return any(mask & select.POLLERR for _, mask in events)


if __name__ == "__main__":
    sys.exit(main())
