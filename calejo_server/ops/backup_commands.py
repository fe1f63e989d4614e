"""``calejo backup``, ``calejo verify-backup`` and ``calejo restore``.

``calejo backup full|config|database [--output DIR]`` writes one archive
(see :mod:`calejo_server.ops.backup`), verifies it and, when it went to
the configured backup folder, prunes that kind's folder;
``calejo backup prune [--dry-run]`` applies the retention alone.

``calejo verify-backup FILE`` prints one line per check and exits 1
naming the part that failed.

``calejo restore full|config|database FILE [--yes]`` refuses while an
adapter runs on the data folder, verifies the archive, shows what it will
replace and asks for ``yes`` (typed on a terminal; without a terminal,
``--yes`` is required), then restores.

Exit codes: 0 done, 1 failed (a bad archive, a refused restore), 2 a
usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from calejo_server.config import Config, load_config
from calejo_server.ops.archive import KINDS, ArchiveError, Kind
from calejo_server.ops.backup import (
    Actor,
    BackupError,
    BackupSettings,
    Check,
    RestoreResult,
    Verification,
    backup_root,
    describe,
    kind_folder,
    parse_backup_settings,
    plan_restore,
    prune,
    record,
    restore_archive,
    restore_record,
    run_backup,
    set_spool_aside,
    verification_record,
    verify_archive,
)
from calejo_server.ops.dump import (
    DumpError,
    PostgresDatabase,
    SQLiteDatabase,
    connect_postgres,
    locate,
)
from calejo_server.storage.base import StorageError


def _actor() -> Actor:
    from calejo_server import cli

    return Actor(cli.operator_name(), "CLI")


def _printer(out: TextIO) -> Callable[[Check], None]:
    def report(check: Check) -> None:
        print(check.line(), file=out, flush=True)

    return report


# -- backup -----------------------------------------------------------------


def backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write one backup archive (tar.gz, mode 0600) and verify it: full "
        "(database and configuration), database (every table, backend-"
        "neutral) or config (the configuration file, certificate and trust "
        "folders). Without --output it goes to the backup folder of the "
        "configuration, whose folder of that kind is then pruned. 'prune' "
        "applies the retention (backup.keep, backup.max_count) alone."
    )
    parser.add_argument("kind", choices=(*KINDS, "prune"), metavar="KIND")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="write the archive into DIR (not pruned) instead of the backup folder",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="prune: list what would be deleted, delete nothing",
    )


def run_backup_command(args: argparse.Namespace) -> int:
    from calejo_server import cli

    config = load_config(getattr(args, "config", None))
    settings = parse_backup_settings(config)
    root = backup_root(settings, config)
    if args.kind == "prune":
        return cli._run_async(_prune(config, root, settings, args.dry_run, sys.stdout))

    kind: Kind = args.kind
    if args.output is not None:
        folder, prune_with = args.output, None
    else:
        folder, prune_with = kind_folder(root, kind), (root, settings)
    return cli._run_async(_backup(config, kind, folder, prune_with, sys.stdout))


async def _backup(
    config: Config,
    kind: Kind,
    folder: Path,
    prune_with: tuple[Path, BackupSettings] | None,
    out: TextIO,
) -> int:
    from calejo_server import cli

    if kind in ("full", "database"):
        await _require_database(config)
    async with cli.opened_storage(config, read_only=True) as storage:
        try:
            outcome = await run_backup(
                kind,
                config,
                storage,
                folder,
                actor=_actor(),
                prune_with=prune_with,
            )
        except BackupError as exc:
            raise cli.CommandError(str(exc)) from exc

    print(f"written: {outcome.path}", file=out)
    print(f"  {describe(outcome.manifest)}", file=out)
    print(f"  {outcome.size} bytes, sha256 {outcome.sha256}", file=out)
    print(
        f"verified: {len(outcome.verification.checks)} checks passed "
        "(digests, scratch restore, row counts, audit chain)",
        file=out,
    )
    for item in outcome.pruned:
        print(f"pruned: {item.path} ({item.reason})", file=out)
    return cli.EXIT_OK


async def _require_database(config: Config) -> None:
    """Refuse to back up a database that is not there (instead of creating it)."""
    from calejo_server import cli

    try:
        database = locate(config.database.url, config.server.data_dir)
    except StorageError as exc:
        raise cli.CommandError(str(exc), cli.EXIT_USAGE) from exc
    if isinstance(database, SQLiteDatabase):
        if not database.path.exists():
            raise cli.CommandError(
                f"no database at {database.path}: is the data folder right "
                "(server.data_dir, CALEJO_DATA_DIR)?"
            )
        return
    try:
        conn = await connect_postgres(database)
    except DumpError as exc:
        raise cli.CommandError(str(exc)) from exc
    await conn.close()


async def _prune(
    config: Config, root: Path, settings: BackupSettings, dry_run: bool, out: TextIO
) -> int:
    from calejo_server import audit, cli
    from calejo_server.ops.backup import audit_record

    pruned = await asyncio.to_thread(prune, root, settings, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for item in pruned:
        print(f"{verb}: {item.path} ({item.kind}, {item.reason})", file=out)
    print(f"{len(pruned)} archive(s) {verb} in {root}", file=out)
    if dry_run or not pruned:
        return cli.EXIT_OK

    details = {
        "archives": [str(item.path) for item in pruned],
        "reasons": [item.reason for item in pruned],
    }
    async with cli.opened_storage(config, read_only=True) as storage:
        try:
            await record(
                storage, [audit_record(audit.BACKUP_PRUNED, _actor(), details)]
            )
        except BackupError as exc:
            raise cli.CommandError(f"archives deleted but {exc}") from exc
    return cli.EXIT_OK


# -- verify-backup ------------------------------------------------------------


def verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check a backup archive: the manifest and every part's SHA-256, the "
        "database restored into a scratch SQLite database (from either "
        "backend), its row counts and its audit chain, the configuration "
        "file. One line per check; exit 1 naming the part that failed. The "
        "result is recorded in the audit log of the configured database when "
        "that database exists."
    )
    parser.add_argument("file", type=Path, metavar="FILE")


def run_verify(args: argparse.Namespace) -> int:
    from calejo_server import cli

    config = load_config(getattr(args, "config", None))
    verification = verify_archive(args.file, report=_printer(sys.stdout))
    failure = verification.failure
    if failure is None:
        print(f"backup verified: {args.file}", file=sys.stdout)
    else:
        print(
            f"backup verification failed: {failure.name}: {failure.detail}",
            file=sys.stdout,
        )
    cli._run_async(_record_quietly(config, verification))
    return cli.EXIT_OK if failure is None else cli.EXIT_FAILED


async def _record_quietly(config: Config, verification: Verification) -> None:
    """Record a verification in the audit log when the database is there."""
    from calejo_server import cli

    try:
        database = locate(config.database.url, config.server.data_dir)
        if isinstance(database, SQLiteDatabase) and not database.path.exists():
            return
        if isinstance(database, PostgresDatabase):
            conn = await connect_postgres(database)
            await conn.close()
        async with cli.opened_storage(config, read_only=True) as storage:
            await record(storage, [verification_record(verification, _actor())])
    except (cli.CommandError, BackupError, DumpError, StorageError) as exc:
        print(f"calejo: note: not recorded in the audit log: {exc}", file=sys.stderr)


# -- restore ------------------------------------------------------------------


def restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Restore a backup archive: full (database and configuration), "
        "database (every table, into the configured database, at the schema "
        "version of the archive; the adapter migrates it forward at its next "
        "start) or config (the configuration file, certificate and trust "
        "folders). Refused while an adapter runs on the data folder. The "
        "archive is verified first; what is replaced is kept beside it as "
        "*.before-restore (SQLite files, configuration); PostgreSQL is "
        "replaced in one transaction."
    )
    parser.add_argument("kind", choices=KINDS, metavar="KIND")
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (required when standard input is "
        "not a terminal)",
    )


def run_restore(args: argparse.Namespace) -> int:
    from calejo_server import cli
    from calejo_server.app import AdapterError, DataDirLock

    config = load_config(getattr(args, "config", None))
    kind: Kind = args.kind
    if not args.yes and not sys.stdin.isatty():
        raise cli.CommandError(
            f"restore {kind} replaces the current data; standard input is not a "
            "terminal to confirm on, so pass --yes to restore without asking",
            cli.EXIT_USAGE,
        )

    lock = DataDirLock(config.server.data_dir)
    try:
        lock.acquire()
    except AdapterError as exc:
        raise cli.CommandError(f"{exc}; stop it before restoring") from exc
    try:
        return _restore(config, kind, args.file, args.yes, sys.stdout)
    finally:
        lock.release()


def _restore(config: Config, kind: Kind, path: Path, yes: bool, out: TextIO) -> int:
    from calejo_server import cli

    print(f"verifying {path}", file=out, flush=True)
    verification = verify_archive(path, report=_printer(out))
    failure = verification.failure
    if failure is not None:
        cli._run_async(_record_quietly(config, verification))
        raise cli.CommandError(
            f"restore refused: the archive failed verification: "
            f"{failure.name}: {failure.detail}"
        )
    manifest = verification.manifest
    assert manifest is not None

    try:
        plan = plan_restore(kind, manifest, verification, config)
    except (BackupError, StorageError) as exc:
        raise cli.CommandError(str(exc)) from exc
    print(f"archive: {describe(manifest)}", file=out)
    for line in plan.lines():
        print(f"will {line}", file=out)
    out.flush()
    if not yes:
        answer = input("Type yes to restore: ")
        if answer.strip() != "yes":
            raise cli.CommandError(
                f"restore cancelled: expected 'yes', got {answer.strip()!r:.40}"
            )

    if plan.database is not None:
        aside = set_spool_aside(config, plan.database.backend)
        if aside is not None:
            print(f"spooled records of the old database kept in {aside}", file=out)
    try:
        result = cli._run_async(restore_archive(path, plan, verification))
    except (BackupError, DumpError, ArchiveError, OSError) as exc:
        cli._run_async(_record_restore_failure(config, kind, path, str(exc)))
        raise cli.CommandError(f"restore {kind} failed: {exc}") from exc

    for kept in result.kept:
        print(f"kept the replaced data as {kept}", file=out)
    if plan.database is not None:
        print(
            f"database restored: {result.rows} rows into {plan.database.where()}",
            file=out,
        )
    if plan.config_file is not None:
        print(f"config restored: {plan.config_file}", file=out)
    for folder, target in plan.folders:
        print(f"config restored: {target} ({folder.role})", file=out)

    cli._run_async(_record_restore(config, result, verification))
    print("restore completed; start the adapter", file=out)
    return cli.EXIT_OK


async def _record_restore(
    config: Config, result: RestoreResult, verification: Verification
) -> None:
    from calejo_server import cli

    async with cli.opened_storage(config) as storage:
        try:
            await record(storage, [restore_record(result, verification, _actor())])
        except BackupError as exc:
            raise cli.CommandError(f"restore completed but {exc}") from exc


async def _record_restore_failure(
    config: Config, kind: Kind, path: Path, error: str
) -> None:
    from calejo_server import audit, cli
    from calejo_server.ops.backup import audit_record

    details = {"kind": kind, "archive": str(path), "error": error}
    try:
        async with cli.opened_storage(config) as storage:
            await record(
                storage, [audit_record(audit.RESTORE_FAILED, _actor(), details)]
            )
    except (cli.CommandError, BackupError) as exc:
        print(f"calejo: note: not recorded in the audit log: {exc}", file=sys.stderr)
