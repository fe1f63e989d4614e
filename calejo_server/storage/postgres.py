"""The PostgreSQL backend, through asyncpg.

Writes go through one dedicated connection, one transaction per group of
write() calls; reads through a small pool. Every call to the database is
bounded by a timeout, so a database that stops answering makes the
storage degraded (see :mod:`calejo_server.storage.durable`) within seconds
instead of stalling the adapter.

Adapters may share one database: each transaction that appends to the
audit log first locks the chain head row (``SELECT ... FOR UPDATE``), so
appends from several adapters follow one another and the chain stays one
chain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from calejo_server import audit
from calejo_server.storage.base import (
    AlertQuery,
    AlertRecord,
    AlertRow,
    AuditQuery,
    AuditRecord,
    AuditRow,
    ChainVerdict,
    EmergencyStopRecord,
    PlanRecord,
    Record,
    RoleRecord,
    SetpointRecord,
    Snapshot,
    StationRecord,
    StationStateRecord,
    StorageError,
    TokenRecord,
    UserRecord,
    utcnow,
)
from calejo_server.storage.durable import (
    BatchRejected,
    DurableStorage,
    Unavailable,
    check_schema_version,
    emergency_stop_scope,
    load_migrations,
)

logger = logging.getLogger(__name__)

_Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"

DEFAULT_DATABASE = "calejo"
"""The database used when the URL names none."""

DEFAULT_PORT = 5432

MIGRATION_LOCK = 0x43414C454A4F
"""The advisory lock key that serialises migrations between adapters."""

PAGE_ROWS = 2000
"""Audit rows read per step by audit_iter and audit_verify."""

MAX_QUERY_ROWS = 10_000
"""Most rows one audit_query returns."""

_AUDIT_COLUMNS = (
    'id, uid, "timestamp", severity, event_type, user_name, source_address, '
    "protocol, station_id, pump_id, old_value, new_value, outcome, details, "
    "prev_hash, hash"
)

_INSERT_AUDIT = (
    f"INSERT INTO compliance_audit_log ({_AUDIT_COLUMNS}) VALUES "
    "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, $15, $16)"
)

_UPSERTS: dict[type[Any], str] = {
    SetpointRecord: (
        "INSERT INTO setpoints (station_id, pump_id, requested, target, applied, "
        "outcome, source, user_name, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
        "ON CONFLICT (station_id, pump_id) DO UPDATE SET "
        "requested = excluded.requested, target = excluded.target, "
        "applied = excluded.applied, outcome = excluded.outcome, "
        "source = excluded.source, user_name = excluded.user_name, at = excluded.at"
    ),
    PlanRecord: (
        "INSERT INTO plans AS p (plan_id, version, received_at, body, user_name) "
        "VALUES ($1, $2, $3, $4::jsonb, $5) "
        "ON CONFLICT (plan_id) DO UPDATE SET version = excluded.version, "
        "received_at = excluded.received_at, body = excluded.body, "
        "user_name = excluded.user_name WHERE excluded.version >= p.version"
    ),
    EmergencyStopRecord: (
        "INSERT INTO emergency_stops (level, scope, station_id, pump_id, active, "
        "reason, operator, at, since) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
        "ON CONFLICT (level, scope) DO UPDATE SET station_id = excluded.station_id, "
        "pump_id = excluded.pump_id, active = excluded.active, "
        "reason = excluded.reason, operator = excluded.operator, "
        "at = excluded.at, since = excluded.since"
    ),
    StationStateRecord: (
        "INSERT INTO station_states (station_id, last_fresh_at, failsafe) "
        "VALUES ($1, $2, $3) ON CONFLICT (station_id) DO UPDATE SET "
        "last_fresh_at = excluded.last_fresh_at, failsafe = excluded.failsafe"
    ),
    StationRecord: (
        "INSERT INTO stations (station_id, definition) VALUES ($1, $2::jsonb) "
        "ON CONFLICT (station_id) DO UPDATE SET definition = excluded.definition"
    ),
    UserRecord: (
        "INSERT INTO users (user_id, username, email, role, password_hash, active, "
        "must_change_password, failed_logins, locked_until, created_at, updated_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
        "ON CONFLICT (user_id) DO UPDATE SET username = excluded.username, "
        "email = excluded.email, role = excluded.role, "
        "password_hash = excluded.password_hash, active = excluded.active, "
        "must_change_password = excluded.must_change_password, "
        "failed_logins = excluded.failed_logins, "
        "locked_until = excluded.locked_until, created_at = excluded.created_at, "
        "updated_at = excluded.updated_at"
    ),
    RoleRecord: (
        "INSERT INTO roles (role, permissions) VALUES ($1, $2) "
        "ON CONFLICT (role) DO UPDATE SET permissions = excluded.permissions"
    ),
    TokenRecord: (
        "INSERT INTO tokens (token_hash, user_id, created_at, expires_at, revoked) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_hash) DO UPDATE SET "
        "user_id = excluded.user_id, created_at = excluded.created_at, "
        "expires_at = excluded.expires_at, revoked = excluded.revoked"
    ),
    AlertRecord: (
        "INSERT INTO alerts (alert_id, kind, severity, summary, station_id, "
        "pump_id, first_raised, last_raised, repeat_count, details, deliveries) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11::jsonb) "
        "ON CONFLICT (alert_id) DO UPDATE SET kind = excluded.kind, "
        "severity = excluded.severity, summary = excluded.summary, "
        "station_id = excluded.station_id, pump_id = excluded.pump_id, "
        "first_raised = excluded.first_raised, last_raised = excluded.last_raised, "
        "repeat_count = excluded.repeat_count, details = excluded.details, "
        "deliveries = excluded.deliveries"
    ),
}

_ALERT_COLUMNS = (
    "seq, alert_id, kind, severity, summary, station_id, pump_id, first_raised, "
    "last_raised, repeat_count, details, deliveries"
)

_REJECTED_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    OverflowError,
)

_UNAVAILABLE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

_CONFIGURATION_ERRORS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InsufficientPrivilegeError,
)


def _json_text(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _state_row(record: Record) -> tuple[Any, ...]:
    """The upsert parameters of one state record."""
    if isinstance(record, SetpointRecord):
        return (
            record.station_id,
            record.pump_id,
            record.requested,
            record.target,
            record.applied,
            record.outcome,
            record.source,
            record.user,
            record.at,
        )
    if isinstance(record, StationStateRecord):
        return (record.station_id, record.last_fresh_at, bool(record.failsafe))
    if isinstance(record, EmergencyStopRecord):
        return (
            record.level,
            emergency_stop_scope(record),
            record.station_id,
            record.pump_id,
            bool(record.active),
            record.reason,
            record.operator,
            record.at,
            record.since,
        )
    if isinstance(record, PlanRecord):
        return (
            record.plan_id,
            record.version,
            record.received_at,
            _json_text(record.body),
            record.user,
        )
    if isinstance(record, StationRecord):
        return (record.station_id, _json_text(record.definition))
    if isinstance(record, UserRecord):
        return (
            record.user_id,
            record.username,
            record.email,
            record.role,
            record.password_hash,
            bool(record.active),
            bool(record.must_change_password),
            record.failed_logins,
            record.locked_until,
            record.created_at,
            record.updated_at,
        )
    if isinstance(record, RoleRecord):
        return (record.role, list(record.permissions))
    if isinstance(record, TokenRecord):
        return (
            record.token_hash,
            record.user_id,
            record.created_at,
            record.expires_at,
            bool(record.revoked),
        )
    if isinstance(record, AlertRecord):
        return (
            record.alert_id,
            record.kind,
            record.severity,
            record.summary,
            record.station_id,
            record.pump_id,
            record.first_raised,
            record.last_raised,
            record.repeat_count,
            _json_text(record.details),
            _json_text(record.deliveries),
        )
    raise TypeError(f"expected a state record, got {type(record).__name__}")


def _audit_row(row: asyncpg.Record) -> AuditRow:
    record = AuditRecord(
        uid=row[1],
        timestamp=row[2],
        severity=row[3],
        event_type=row[4],
        user=row[5],
        source_address=row[6],
        protocol=row[7],
        station_id=row[8],
        pump_id=row[9],
        old_value=row[10],
        new_value=row[11],
        outcome=row[12],
        details=json.loads(row[13]),
    )
    return AuditRow(id=row[0], record=record, prev_hash=row[14], hash=row[15])


def _alert_row(row: asyncpg.Record) -> AlertRow:
    record = AlertRecord(
        alert_id=row[1],
        kind=row[2],
        severity=row[3],
        summary=row[4],
        station_id=row[5],
        pump_id=row[6],
        first_raised=row[7],
        last_raised=row[8],
        repeat_count=row[9],
        details=json.loads(row[10]),
        deliveries=json.loads(row[11]),
    )
    return AlertRow(seq=row[0], record=record)


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short reason for an operator: "connection refused", "no answer ..."."""
    root = _root_cause(exc)
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(root, asyncpg.ConnectionDoesNotExistError | ConnectionResetError):
        return "connection lost"
    if isinstance(root, asyncpg.InterfaceError) and "connection is closed" in str(root):
        return "connection lost"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror.lower()
    text = str(root).strip()
    return text or type(root).__name__


def _root_cause(exc: BaseException) -> BaseException:
    """The first connection-level error in ``exc``'s chain, else ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current, OSError | TimeoutError | asyncpg.ConnectionDoesNotExistError
        ):
            return current
        current = current.__cause__ or current.__context__
    return exc


class PostgresStorage(DurableStorage):
    """Storage in a PostgreSQL database; see the module."""

    backend = "postgresql"

    def __init__(
        self,
        url: str,
        data_dir: Path,
        *,
        connect_timeout: float = 3.0,
        command_timeout: float = 5.0,
        pool_size: int = 4,
        retry_first: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        super().__init__(data_dir, retry_first=retry_first, retry_max=retry_max)
        parts = urlsplit(url)
        scheme = parts.scheme.lower().replace("+asyncpg", "")
        if scheme not in ("postgresql", "postgres"):
            raise StorageError(f"expected a postgresql:// url, got scheme {scheme!r}")
        database = unquote(parts.path.lstrip("/"))
        if not database:
            database = DEFAULT_DATABASE
        self.database = database
        self.host = parts.hostname or "localhost"
        self.port = parts.port or DEFAULT_PORT
        self._dsn = urlunsplit(
            ("postgresql", parts.netloc, "/" + database, parts.query, "")
        )
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._wconn: asyncpg.Connection | None = None

    def where(self) -> str:
        return f"postgresql at {self.host}:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """The connection string used, with the database name filled in."""
        return self._dsn

    def _describe(self, exc: BaseException) -> str:
        return describe_error(exc, self._command_timeout)

    # -- connections

    async def _connect(self) -> None:
        try:
            conn = await self._new_connection()
        except asyncpg.InvalidCatalogNameError:
            await self._create_database()
            conn = await self._new_connection()
        self._wconn = conn
        await self._migrate(conn)
        await self._prune_tokens(conn)
        self._pool = await self._guard(
            asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
            )
        )

    async def _new_connection(self, dsn: str | None = None) -> asyncpg.Connection:
        conn: asyncpg.Connection = await self._guard(
            asyncpg.connect(
                dsn or self._dsn,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
            )
        )
        return conn

    async def _guard(self, awaitable: Any) -> Any:
        """Await ``awaitable`` bounded by the connect timeout; map the errors."""
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                return await awaitable
        except asyncpg.InvalidCatalogNameError:
            raise
        except _CONFIGURATION_ERRORS as exc:
            raise StorageError(f"{self.where()}: {exc}") from exc
        except _UNAVAILABLE_ERRORS as exc:
            raise Unavailable(self._describe(exc)) from exc

    async def _create_database(self) -> None:
        parts = urlsplit(self._dsn)
        admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
        conn = await self._new_connection(admin)
        name = self.database.replace('"', '""')
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        except asyncpg.PostgresError as exc:
            raise StorageError(
                f"{self.where()}: database {self.database!r} does not exist and "
                f"could not be created ({exc}); create it (createdb {self.database})"
            ) from exc
        finally:
            await conn.close()
        logger.info("%s: created database %r", self.where(), self.database)

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        migrations = load_migrations(self.backend)
        try:
            for migration in migrations:
                applied = await self._apply_migration(conn, migration)
                if applied:
                    logger.info(
                        "%s: applied migration %04d_%s",
                        self.where(),
                        migration.version,
                        migration.name,
                    )
        except _CONFIGURATION_ERRORS as exc:
            raise StorageError(f"{self.where()}: {exc}") from exc
        except (asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise Unavailable(self._describe(exc)) from exc
        except asyncpg.PostgresConnectionError as exc:
            raise Unavailable(self._describe(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"{self.where()}: migration failed: {exc}") from exc

    async def _apply_migration(self, conn: asyncpg.Connection, migration: Any) -> bool:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"
            )
            check_schema_version(self.backend, self.where(), current)
            if migration.version <= current:
                return False
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            return True

    async def _prune_tokens(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.execute("DELETE FROM tokens WHERE expires_at < $1", utcnow())
        except _UNAVAILABLE_ERRORS as exc:
            raise Unavailable(self._describe(exc)) from exc

    async def _disconnect(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            await self._close_quietly(conn)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(self._command_timeout):
                    await pool.close()
            except (TimeoutError, *_UNAVAILABLE_ERRORS):
                pool.terminate()

    async def _close_quietly(self, conn: asyncpg.Connection) -> None:
        try:
            async with asyncio.timeout(self._command_timeout):
                await conn.close()
        except (TimeoutError, *_UNAVAILABLE_ERRORS):
            conn.terminate()

    def _drop_writer(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            conn.terminate()

    # -- writing

    async def _commit(
        self, batches: Sequence[Sequence[Record]], *, dedupe: bool
    ) -> None:
        audits: list[AuditRecord] = []
        states: dict[type[Any], list[tuple[Any, ...]]] = {}
        for records in batches:
            for record in records:
                if type(record) is AuditRecord:
                    audits.append(record)
                else:
                    states.setdefault(type(record), []).append(_state_row(record))

        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                conn = self._wconn
                if conn is None or conn.is_closed():
                    conn = self._wconn = await asyncpg.connect(
                        self._dsn,
                        timeout=self._connect_timeout,
                        command_timeout=self._command_timeout,
                    )
                async with conn.transaction():
                    if audits:
                        await self._append_audit(conn, audits, dedupe)
                    for cls, rows in states.items():
                        await conn.executemany(_UPSERTS[cls], rows)
        except _REJECTED_ERRORS as exc:
            raise BatchRejected(str(exc)) from exc
        except _UNAVAILABLE_ERRORS as exc:
            self._drop_writer()
            raise Unavailable(self._describe(exc)) from exc

    async def _append_audit(
        self, conn: asyncpg.Connection, audits: list[AuditRecord], dedupe: bool
    ) -> None:
        last_id, last_hash = await _chain_head(conn, for_update=True)
        if dedupe:
            stored = {
                row[0]
                for row in await conn.fetch(
                    "SELECT uid FROM compliance_audit_log WHERE uid = ANY($1::text[])",
                    [record.uid for record in audits],
                )
            }
            fresh = []
            for record in audits:
                if record.uid not in stored:
                    stored.add(record.uid)
                    fresh.append(record)
            audits = fresh
            if not audits:
                return

        rows = []
        for record in audits:
            last_id += 1
            digest = audit.chain_hash(last_hash, record)
            rows.append(
                (
                    last_id,
                    record.uid,
                    record.timestamp,
                    record.severity,
                    record.event_type,
                    record.user,
                    record.source_address,
                    record.protocol,
                    record.station_id,
                    record.pump_id,
                    record.old_value,
                    record.new_value,
                    record.outcome,
                    _json_text(record.details),
                    last_hash,
                    digest,
                )
            )
            last_hash = digest
        await conn.executemany(_INSERT_AUDIT, rows)
        await conn.execute(
            "UPDATE audit_chain_head SET last_id = $1, last_hash = $2 WHERE id = 1",
            last_id,
            last_hash,
        )

    # -- reading

    def _reader_pool(self) -> asyncpg.Pool:
        if self._phase != "open" or self._pool is None:
            raise StorageError(f"{self.where()}: storage is {self._phase_word()}")
        return self._pool

    def _read_failed(self, exc: BaseException) -> StorageError:
        self._note_error(exc)
        return StorageError(f"{self.where()}: read failed ({self._describe(exc)})")

    async def load(self) -> Snapshot:
        pool = self._reader_pool()
        now = utcnow()
        try:
            async with asyncio.timeout(
                self._connect_timeout + 4 * self._command_timeout
            ):
                async with (
                    pool.acquire() as conn,
                    conn.transaction(isolation="repeatable_read", readonly=True),
                ):
                    return await self._load_from(conn, now)
        except _UNAVAILABLE_ERRORS as exc:
            raise self._read_failed(exc) from exc

    async def _load_from(self, conn: _Connection, now: dt.datetime) -> Snapshot:
        users = [
            UserRecord(
                user_id=r[0],
                username=r[1],
                email=r[2],
                role=r[3],
                password_hash=r[4],
                active=r[5],
                must_change_password=r[6],
                failed_logins=r[7],
                locked_until=r[8],
                created_at=r[9],
                updated_at=r[10],
            )
            for r in await conn.fetch(
                "SELECT user_id, username, email, role, password_hash, active, "
                "must_change_password, failed_logins, locked_until, created_at, "
                "updated_at FROM users ORDER BY username, user_id"
            )
        ]
        roles = [
            RoleRecord(role=r[0], permissions=tuple(r[1]))
            for r in await conn.fetch(
                "SELECT role, permissions FROM roles ORDER BY role"
            )
        ]
        tokens = [
            TokenRecord(
                token_hash=r[0],
                user_id=r[1],
                created_at=r[2],
                expires_at=r[3],
                revoked=r[4],
            )
            for r in await conn.fetch(
                "SELECT token_hash, user_id, created_at, expires_at, revoked "
                "FROM tokens WHERE NOT revoked AND expires_at > $1 ORDER BY created_at",
                now,
            )
        ]
        setpoints = [
            SetpointRecord(
                station_id=r[0],
                pump_id=r[1],
                requested=r[2],
                target=r[3],
                applied=r[4],
                outcome=r[5],
                source=r[6],
                user=r[7],
                at=r[8],
            )
            for r in await conn.fetch(
                "SELECT station_id, pump_id, requested, target, applied, outcome, "
                "source, user_name, at FROM setpoints ORDER BY station_id, pump_id"
            )
        ]
        plans = [
            PlanRecord(
                plan_id=r[0],
                version=r[1],
                received_at=r[2],
                body=json.loads(r[3]),
                user=r[4],
            )
            for r in await conn.fetch(
                "SELECT plan_id, version, received_at, body, user_name FROM plans "
                "ORDER BY received_at, plan_id"
            )
        ]
        emergency_stops = [
            EmergencyStopRecord(
                level=r[0],
                station_id=r[1],
                pump_id=r[2],
                active=r[3],
                reason=r[4],
                operator=r[5],
                at=r[6],
                since=r[7],
            )
            for r in await conn.fetch(
                "SELECT level, station_id, pump_id, active, reason, operator, at, "
                "since FROM emergency_stops ORDER BY level, scope"
            )
        ]
        station_states = [
            StationStateRecord(station_id=r[0], last_fresh_at=r[1], failsafe=r[2])
            for r in await conn.fetch(
                "SELECT station_id, last_fresh_at, failsafe FROM station_states "
                "ORDER BY station_id"
            )
        ]
        stations = [
            StationRecord(station_id=r[0], definition=json.loads(r[1]))
            for r in await conn.fetch(
                "SELECT station_id, definition FROM stations ORDER BY station_id"
            )
        ]
        return Snapshot(
            users=users,
            roles=roles,
            tokens=tokens,
            setpoints=setpoints,
            plans=plans,
            emergency_stops=emergency_stops,
            station_states=station_states,
            stations=stations,
        )

    async def audit_query(self, query: AuditQuery) -> list[AuditRow]:
        pool = self._reader_pool()
        where, params = _audit_filter(query)
        limit = max(1, min(query.limit, MAX_QUERY_ROWS))
        params.append(limit)
        sql = (
            f"SELECT {_AUDIT_COLUMNS} FROM compliance_audit_log WHERE {where} "
            f"ORDER BY id LIMIT ${len(params)}"
        )
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                rows = await pool.fetch(sql, *params)
        except _UNAVAILABLE_ERRORS as exc:
            raise self._read_failed(exc) from exc
        return [_audit_row(row) for row in rows]

    async def alerts_query(self, query: AlertQuery) -> list[AlertRow]:
        pool = self._reader_pool()
        where, params = _alert_filter(query)
        limit = max(1, min(query.limit, MAX_QUERY_ROWS))
        params.append(limit)
        sql = (
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE {where} "
            f"ORDER BY seq DESC LIMIT ${len(params)}"
        )
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                rows = await pool.fetch(sql, *params)
        except _UNAVAILABLE_ERRORS as exc:
            raise self._read_failed(exc) from exc
        return [_alert_row(row) for row in rows]

    async def audit_iter(
        self, since: dt.datetime | None = None
    ) -> AsyncIterator[AuditRow]:
        after = 0
        while True:
            rows = await self.audit_query(
                AuditQuery(since=since, after_id=after, limit=PAGE_ROWS)
            )
            for row in rows:
                yield row
            if len(rows) < PAGE_ROWS:
                return
            after = rows[-1].id

    async def audit_verify(self) -> ChainVerdict:
        pool = self._reader_pool()
        verifier = audit.ChainVerifier()
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                conn = await pool.acquire()
        except _UNAVAILABLE_ERRORS as exc:
            raise self._read_failed(exc) from exc
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                head = await _chain_head(conn, for_update=False)
                cursor = await conn.cursor(
                    f"SELECT {_AUDIT_COLUMNS} FROM compliance_audit_log "
                    "WHERE id <= $1 ORDER BY id",
                    head[0],
                )
                while True:
                    page = await cursor.fetch(PAGE_ROWS, timeout=self._command_timeout)
                    if not page:
                        break
                    rows = [_audit_row(r) for r in page]
                    if not await asyncio.to_thread(_feed_all, verifier, rows):
                        break
        except (Unavailable, *_UNAVAILABLE_ERRORS) as exc:
            raise self._read_failed(exc) from exc
        finally:
            await pool.release(conn)
        return verifier.finish(head)


async def _chain_head(conn: _Connection, *, for_update: bool) -> tuple[int, str]:
    """The (last id, last hash) of the audit chain."""
    row = await conn.fetchrow(
        "SELECT last_id, last_hash FROM audit_chain_head WHERE id = 1"
        + (" FOR UPDATE" if for_update else "")
    )
    if row is None:
        raise Unavailable("the audit chain head row (audit_chain_head id 1) is missing")
    return int(row[0]), str(row[1])


def _feed_all(verifier: audit.ChainVerifier, rows: list[AuditRow]) -> bool:
    return all(verifier.feed(row) for row in rows)


def _audit_filter(query: AuditQuery) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters ($1, $2, ...) for ``query``."""
    clauses: list[str] = []
    params: list[Any] = []

    def add(clause: str, value: Any) -> None:
        params.append(value)
        clauses.append(clause.replace("?", f"${len(params)}"))

    add("id > ?", query.after_id)
    if query.severity is not None:
        add("severity = ?", query.severity)
    if query.event_type is not None:
        add("event_type = ?", query.event_type)
    if query.since is not None:
        add('"timestamp" >= ?', _aware(query.since))
    if query.until is not None:
        add('"timestamp" <= ?', _aware(query.until))
    if query.station_id is not None:
        add("station_id = ?", query.station_id)
    if query.user is not None:
        add("user_name = ?", query.user)
    return " AND ".join(clauses), params


def _alert_filter(query: AlertQuery) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters ($1, $2, ...) for ``query``."""
    clauses = ["TRUE"]
    params: list[Any] = []

    def add(clause: str, value: Any) -> None:
        params.append(value)
        clauses.append(clause.replace("?", f"${len(params)}"))

    if query.before_seq is not None:
        add("seq < ?", query.before_seq)
    if query.severity is not None:
        add("severity = ?", query.severity)
    if query.kind is not None:
        add("kind = ?", query.kind)
    if query.since is not None:
        add("last_raised >= ?", _aware(query.since))
    if query.station_id is not None:
        add("station_id = ?", query.station_id)
    return " AND ".join(clauses), params


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
