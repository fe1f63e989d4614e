"""``calejo db check``: is the adapter's database whole?

Read-only, and safe while the adapter runs. For SQLite: ``PRAGMA
integrity_check`` and ``PRAGMA foreign_key_check``. For PostgreSQL: the
catalog (no index left invalid, no constraint left unvalidated, and the
B-tree indexes of the adapter's tables checked with ``amcheck`` when that
extension is installed). For both: every table the migrations create is
there, the schema version is the newest this adapter knows (an older one
is migrated at the next start; a newer one means a newer adapter wrote
it), triggers refuse UPDATE and DELETE (and TRUNCATE) on
``compliance_audit_log``, and the audit log's hash chain is intact up to
the head the database records.

Exit codes: 0 every check passed, 1 a check failed (each is printed with
what it found), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any, Final, TextIO

from calejo_server.audit import ChainVerifier
from calejo_server.config import Config, load_config
from calejo_server.ops import compliance, dump
from calejo_server.ops.dump import (
    AUDIT_TABLE,
    CHAIN_HEAD_TABLE,
    MIGRATIONS_TABLE,
    DumpError,
    PostgresDatabase,
    SQLiteDatabase,
)
from calejo_server.storage.base import ChainVerdict, StorageError
from calejo_server.storage.durable import load_migrations

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
BATCH: Final = 2000


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def expected_tables() -> frozenset[str]:
    """The tables the newest migrations create (built in memory)."""
    con = sqlite3.connect(":memory:")
    try:
        dump.migrate_sqlite(con, len(load_migrations("sqlite")))
        return frozenset(table.name for table in dump.sqlite_tables(con))
    finally:
        con.close()


def _tables_check(present: set[str]) -> Check:
    missing = sorted(expected_tables() - present)
    if missing:
        return Check("tables", False, f"missing: {', '.join(missing)}")
    return Check("tables", True, f"all {len(expected_tables())} tables present")


def _version_check(backend: str, version: int) -> Check:
    newest = len(load_migrations(backend))
    if version == newest:
        return Check(
            "schema version", True, f"{version}, the newest this adapter knows"
        )
    if version < newest:
        return Check(
            "schema version",
            False,
            f"{version}, older than this adapter's {newest}: the adapter applies "
            f"migrations {version + 1} to {newest} when it next starts",
        )
    return Check(
        "schema version",
        False,
        f"{version}, newer than this adapter's {newest}: a newer adapter wrote "
        "this database; upgrade this one or restore a backup of its version",
    )


def _trigger_check(facts: compliance.TriggerFacts) -> Check:
    if facts.error is not None:
        return Check("append-only triggers", False, f"cannot read them: {facts.error}")
    missing = sorted(facts.needed - facts.refused)
    if missing:
        return Check(
            "append-only triggers",
            False,
            f"{AUDIT_TABLE} accepts {', '.join(missing)}: no trigger refuses it",
        )
    return Check(
        "append-only triggers",
        True,
        f"{', '.join(facts.names)} refuse {', '.join(sorted(facts.refused))}",
    )


def _chain_check(verdict: ChainVerdict) -> Check:
    if verdict.ok:
        return Check("audit chain", True, f"intact: {verdict.checked} rows verified")
    return Check(
        "audit chain",
        False,
        f"broken at row id {verdict.first_bad_id}: {verdict.reason} "
        f"({verdict.checked} rows verified before it)",
    )


# -- SQLite ----------------------------------------------------------------------


def check_sqlite(database: SQLiteDatabase) -> list[Check]:
    path = database.path
    if not path.exists():
        return [Check("database", False, f"{database.where()}: no database file there")]
    try:
        con = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=30,
            isolation_level=None,
        )
    except sqlite3.Error as exc:
        return [Check("database", False, f"{database.where()}: cannot open: {exc}")]

    checks = [Check("database", True, database.where())]
    try:
        problems = [row[0] for row in con.execute("PRAGMA integrity_check(20)")]
        checks.append(
            Check("integrity", True, "PRAGMA integrity_check: ok")
            if problems == ["ok"]
            else Check("integrity", False, "; ".join(problems))
        )
        keys = con.execute("PRAGMA foreign_key_check").fetchall()
        checks.append(
            Check("foreign keys", not keys, f"{len(keys)} rows refer to missing rows")
            if keys
            else Check("foreign keys", True, "PRAGMA foreign_key_check: none broken")
        )

        present = {table.name for table in dump.sqlite_tables(con)}
        checks.append(_tables_check(present))
        if MIGRATIONS_TABLE in present:
            version = con.execute(
                f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
            ).fetchone()[0]
            checks.append(_version_check("sqlite", int(version)))
        checks.append(_trigger_check(compliance._sqlite_triggers(path)))
        if {AUDIT_TABLE, CHAIN_HEAD_TABLE} <= present:
            checks.append(_chain_check(_sqlite_chain(con)))
    except sqlite3.Error as exc:
        checks.append(Check("database", False, f"{database.where()}: {exc}"))
    finally:
        con.close()
    return checks


def _sqlite_chain(con: sqlite3.Connection) -> ChainVerdict:
    con.execute("BEGIN")
    try:
        head = con.execute(
            f"SELECT last_id, last_hash FROM {CHAIN_HEAD_TABLE} WHERE id = 1"
        ).fetchone()
        cursor = con.execute(dump._AUDIT_SELECT)
        names = [column[0] for column in cursor.description]
        verifier = ChainVerifier()

        def rows() -> Iterator[Any]:
            while batch := cursor.fetchmany(BATCH):
                yield from batch

        for values in rows():
            if not verifier.feed(dump.audit_row(dict(zip(names, values, strict=True)))):
                break
    finally:
        con.execute("ROLLBACK")
    return verifier.finish((int(head[0]), str(head[1])) if head else None)


# -- PostgreSQL ---------------------------------------------------------------------


async def check_postgres(database: PostgresDatabase, url: str) -> list[Check]:
    import asyncpg

    try:
        conn = await dump.connect_postgres(database)
    except DumpError as exc:
        return [Check("database", False, str(exc))]

    checks = [Check("database", True, database.where())]
    try:
        triggers = await compliance._postgres_triggers(url)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            present = {table.name for table in await dump.postgres_tables(conn)}
            checks.append(_tables_check(present))
            checks += await _pg_catalog(conn, present)
            checks.append(
                _version_check("postgresql", await dump.postgres_schema_version(conn))
            )
            checks.append(_trigger_check(triggers))
            if {AUDIT_TABLE, CHAIN_HEAD_TABLE} <= present:
                checks.append(_chain_check(await _pg_chain(conn)))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        checks.append(Check("database", False, f"{database.where()}: {exc}"))
    finally:
        await conn.close()
    return checks


async def _pg_catalog(conn: Any, present: set[str]) -> list[Check]:
    invalid = await conn.fetch(
        "SELECT c.relname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND NOT (i.indisvalid AND i.indisready) "
        "ORDER BY 1"
    )
    unvalidated = await conn.fetch(
        "SELECT conname FROM pg_constraint "
        "WHERE connamespace = current_schema()::regnamespace AND NOT convalidated "
        "ORDER BY 1"
    )
    problems = [f"index {r[0]} invalid" for r in invalid]
    problems += [f"constraint {r[0]} not validated" for r in unvalidated]
    checks = [
        Check("catalog", False, "; ".join(problems))
        if problems
        else Check("catalog", True, "every index valid, every constraint validated")
    ]

    amcheck = await conn.fetchval(
        "SELECT extnamespace::regnamespace::text FROM pg_extension "
        "WHERE extname = 'amcheck'"
    )
    if amcheck is None:
        checks.append(
            Check(
                "index structure",
                True,
                "not checked: the amcheck extension is not installed "
                "(CREATE EXTENSION amcheck adds it)",
            )
        )
        return checks

    indexes = await conn.fetch(
        "SELECT c.relname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_am a ON a.oid = c.relam "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND a.amname = 'btree' "
        "AND t.relname = ANY($1::text[]) ORDER BY 1",
        sorted(present),
    )
    broken = []
    for row in indexes:
        try:
            await conn.execute(f"SELECT {amcheck}.bt_index_check($1::regclass)", row[0])
        except Exception as exc:  # amcheck reports corruption as an error
            broken.append(f"{row[0]}: {exc}")
    checks.append(
        Check("index structure", False, "; ".join(broken))
        if broken
        else Check(
            "index structure", True, f"amcheck: {len(indexes)} B-tree indexes sound"
        )
    )
    return checks


async def _pg_chain(conn: Any) -> ChainVerdict:
    head = await conn.fetchrow(
        f"SELECT last_id, last_hash FROM {CHAIN_HEAD_TABLE} WHERE id = 1"
    )
    verifier = ChainVerifier()
    cursor = await conn.cursor(dump._AUDIT_SELECT)
    while batch := await cursor.fetch(BATCH):
        for record in batch:
            if not verifier.feed(dump.audit_row(dict(record))):
                return verifier.finish()
    return verifier.finish((int(head[0]), str(head[1])) if head else None)


# -- the command ------------------------------------------------------------------


def run_checks(config: Config) -> list[Check]:
    """Every check of the configured database."""
    try:
        database = dump.locate(config.database.url, config.server.data_dir)
    except StorageError as exc:
        from calejo_server import cli

        raise cli.CommandError(str(exc), cli.EXIT_USAGE) from exc
    if isinstance(database, SQLiteDatabase):
        return check_sqlite(database)
    return asyncio.run(check_postgres(database, config.database.url or ""))


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check the adapter's database, read-only (also while it runs): SQLite "
        "integrity_check or the PostgreSQL catalog, the tables, the schema "
        "version, the append-only triggers of the audit log and its hash chain. "
        "Exit 0 when every check passes, 1 otherwise."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="check the database, read-only")
    check.add_argument("--format", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    """``calejo db check``."""
    config = load_config(getattr(args, "config", None))
    checks = run_checks(config)
    _print(checks, args.format, sys.stdout)
    return EXIT_OK if all(check.ok for check in checks) else EXIT_FAILED


def _print(checks: list[Check], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        document = {
            "ok": all(c.ok for c in checks),
            "checks": [dataclasses.asdict(c) for c in checks],
        }
        print(json.dumps(document, indent=2), file=out)
        return
    for check in checks:
        print(check.line(), file=out)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"database check failed: {', '.join(failed)}", file=out)
    else:
        print(f"database check passed: {len(checks)} checks", file=out)
