"""A logical, backend-neutral dump of every table of the adapter's database.

Tables are found in the database's own catalog (``sqlite_schema``; in
PostgreSQL, ``pg_class`` in the current schema), so a table that a later
migration adds is dumped and loaded without a change here. Each table is
one part: one JSON line per row, the values in the order of the columns
the dump lists, rows ordered by primary key. Parts are listed so that a
table comes after the tables its foreign keys point at.

Values are JSON where JSON holds them exactly (null, true and false,
integers, finite floats, text); otherwise a tagged object of one key:

``{"$time": "2026-01-31T12:00:00.000000+00:00"}``
    a timestamp, ISO 8601 with microseconds; in UTC when it has a zone
``{"$date": "2026-01-31"}``, ``{"$decimal": "12.50"}``
``{"$float": "NaN"}``
    also ``"Infinity"`` and ``"-Infinity"``
``{"$bytes": "<base64>"}``
``{"$json": <document>}``
    the document of a json or jsonb column
``{"$array": [...]}``
    an array column, its items encoded the same way

SQLite holds times, JSON documents and arrays as text and booleans as
integers (see :mod:`calejo_server.storage.sqlite`), and its dump holds them
so. Loading converts by the target: into PostgreSQL by the type of each
target column (text to ``timestamptz``, ``jsonb``, ``text[]``; 0 and 1 to
``boolean``); into SQLite, tagged values are written the way that backend
writes them (times as ISO 8601 UTC text with microseconds, documents and
arrays as compact JSON text, booleans as 0 and 1). So a dump of either
backend loads into either, and a dump loaded into the backend it came from
gives back the same rows.

A target is built at exactly the schema version the dump was taken at
(the migrations up to it), so its tables are the dump's tables; the
adapter applies the later migrations when it next opens the database.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import decimal
import json
import logging
import math
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import asyncpg

from calejo_server import audit
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditRecord, AuditRow, ChainVerdict
from calejo_server.storage.durable import load_migrations

logger = logging.getLogger(__name__)

AUDIT_TABLE = "compliance_audit_log"
CHAIN_HEAD_TABLE = "audit_chain_head"
MIGRATIONS_TABLE = "schema_migrations"

BATCH_ROWS = 2000
"""Rows read, encoded or inserted per step."""

MAX_LINE_BYTES = 64 * 1024 * 1024
"""The longest row line a dump may hold."""

PG_CONNECT_TIMEOUT = 10.0
PG_COMMAND_TIMEOUT = 300.0
"""Seconds one statement of a dump or a restore may take."""

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_SQLITE_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
_PG_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version integer PRIMARY KEY, name text NOT NULL, "
    "applied_at timestamptz NOT NULL DEFAULT now())"
)

_TAGS = frozenset({"$time", "$date", "$decimal", "$float", "$bytes", "$json", "$array"})


class DumpError(Exception):
    """A database could not be dumped or loaded; the message says which part."""


class Cancelled(Exception):
    """The work was asked to stop (the adapter is shutting down)."""


# ---------------------------------------------------------------------------
# Tables and columns.


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    """One column: its declared type and the kind of value it holds.

    Kinds: integer, real, numeric, text, boolean, timestamptz, timestamp,
    date, json, bytes, uuid, ``array:<kind>``, and ``any`` (an SQLite
    column without a type).
    """

    name: str
    type: str
    kind: str


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    """One table: columns in order, primary key, the tables it refers to."""

    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    references: tuple[str, ...]

    @property
    def part(self) -> str:
        """Its part of an archive: ``database/<name>.jsonl``."""
        return f"database/{self.name}.jsonl"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "columns": [[c.name, c.type, c.kind] for c in self.columns],
            "primary_key": list(self.primary_key),
            "references": list(self.references),
        }

    @classmethod
    def from_json(cls, value: object, where: str) -> Table:
        """A table as a manifest lists it; DumpError naming ``where``."""
        if not isinstance(value, dict):
            raise DumpError(f"{where}: expected a table object, got {value!r:.80}")
        name = value.get("name")
        if not isinstance(name, str) or _TABLE_NAME.fullmatch(name) is None:
            raise DumpError(f"{where}: expected a table name, got {name!r:.80}")
        columns = value.get("columns")
        if not isinstance(columns, list) or not columns:
            raise DumpError(f"{where}: table {name}: expected a list of columns")
        parsed: list[Column] = []
        for entry in columns:
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not all(isinstance(item, str) for item in entry)
            ):
                raise DumpError(
                    f"{where}: table {name}: expected columns as [name, type, "
                    f"kind], got {entry!r:.80}"
                )
            parsed.append(Column(entry[0], entry[1], entry[2]))
        return cls(
            name=name,
            columns=tuple(parsed),
            primary_key=_names(value.get("primary_key"), f"{where}: table {name}"),
            references=_names(value.get("references"), f"{where}: table {name}"),
        )


def _names(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DumpError(f"{where}: expected a list of names, got {value!r:.80}")
    return tuple(value)


@dataclasses.dataclass(frozen=True, slots=True)
class TableDump:
    """A table as dumped: its definition and the number of rows."""

    table: Table
    rows: int
    path: Path


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseDump:
    """What :func:`dump_database` wrote, for the manifest."""

    backend: str
    source: dict[str, Any]
    schema_version: int
    tables: tuple[TableDump, ...]
    chain_head: tuple[int, str]


def load_order(tables: Sequence[Table]) -> list[Table]:
    """``tables`` with each after the tables its foreign keys point at.

    Ties and tables caught in a cycle of references keep name order.
    """
    by_name = {table.name: table for table in sorted(tables, key=lambda t: t.name)}
    placed: list[Table] = []
    done: set[str] = set()
    pending = list(by_name)
    while pending:
        ready = [
            name
            for name in pending
            if all(
                ref == name or ref in done or ref not in by_name
                for ref in by_name[name].references
            )
        ]
        if not ready:
            logger.warning(
                "tables %s refer to each other in a cycle; loading them in name order",
                ", ".join(pending),
            )
            ready = list(pending)
        for name in ready:
            placed.append(by_name[name])
            done.add(name)
        pending = [name for name in pending if name not in done]
    return placed


def quote(name: str) -> str:
    """``name`` as an SQL identifier (both backends)."""
    return '"' + name.replace('"', '""') + '"'


def _check_table_name(name: str, where: str) -> None:
    if _TABLE_NAME.fullmatch(name) is None:
        raise DumpError(
            f"{where}: table {name!r}: expected a name of letters, digits and _ "
            "(up to 63), which the archive can name a part after"
        )


# ---------------------------------------------------------------------------
# Where the database is.


@dataclasses.dataclass(frozen=True, slots=True)
class SQLiteDatabase:
    """An SQLite file."""

    path: Path
    backend: str = "sqlite"

    def where(self) -> str:
        return f"sqlite at {self.path}"


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresDatabase:
    """A PostgreSQL database (and, through the URL, its search path)."""

    dsn: str
    host: str
    port: int
    database: str
    backend: str = "postgresql"

    def where(self) -> str:
        return f"postgresql at {self.host}:{self.port}/{self.database}"


Database = SQLiteDatabase | PostgresDatabase


def locate(database_url: str | None, data_dir: Path) -> Database:
    """The database the storage would open for ``database_url``.

    Raises :class:`~calejo_server.storage.base.StorageError` for a URL the
    storage refuses.
    """
    from calejo_server.storage.postgres import PostgresStorage
    from calejo_server.storage.sqlite import SQLiteStorage

    storage = open_storage(database_url, data_dir)
    if isinstance(storage, SQLiteStorage):
        return SQLiteDatabase(storage.path.absolute())
    assert isinstance(storage, PostgresStorage)
    return PostgresDatabase(
        dsn=storage.dsn,
        host=storage.host,
        port=storage.port,
        database=storage.database,
    )


# ---------------------------------------------------------------------------
# Encoding values into the dump.


def _iso_time(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        return moment.isoformat(timespec="microseconds")
    return audit.iso_utc(moment)


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return {"$float": "NaN"}
    return {"$float": "Infinity" if value > 0 else "-Infinity"}


def encode_plain(value: Any) -> Any:
    """An SQLite value (or any plain value) as it goes into the dump."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _encode_float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"$time": _iso_time(value)}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return str(value)
    raise DumpError(f"expected a storable value, got {type(value).__name__}")


def _pg_encoder(kind: str) -> Callable[[Any], Any]:
    """How a PostgreSQL value of ``kind`` goes into the dump."""
    if kind == "json":

        def json_value(value: Any) -> Any:
            if value is None:
                return None
            document = json.loads(value) if isinstance(value, str) else value
            return {"$json": document}

        return json_value

    if kind.startswith("array:"):
        item = _pg_encoder(kind[len("array:") :])

        def array_value(value: Any) -> Any:
            if value is None:
                return None
            return {"$array": _encode_items(value, item)}

        return array_value

    return encode_plain


def _encode_items(items: Iterable[Any], item: Callable[[Any], Any]) -> list[Any]:
    encoded: list[Any] = []
    for value in items:
        if isinstance(value, list):
            encoded.append(_encode_items(value, item))
        else:
            encoded.append(item(value))
    return encoded


def row_line(values: Sequence[Any]) -> bytes:
    """One row as its line of the dump (ASCII JSON, newline at the end)."""
    text = json.dumps(list(values), separators=(",", ":"), allow_nan=False)
    return text.encode("ascii") + b"\n"


# ---------------------------------------------------------------------------
# Decoding values out of the dump.


def _tag(value: dict[str, Any], where: str) -> tuple[str, Any]:
    if len(value) != 1:
        raise DumpError(
            f"{where}: expected a value or a tagged value of one key, got an "
            f"object with keys {sorted(value)[:5]}"
        )
    ((key, inner),) = value.items()
    if key not in _TAGS:
        raise DumpError(
            f"{where}: expected one of the tags {', '.join(sorted(_TAGS))}, "
            f"got {key!r:.40}"
        )
    return key, inner


def _parse_time(text: object, where: str) -> dt.datetime:
    if not isinstance(text, str):
        raise DumpError(f"{where}: expected an ISO 8601 time, got {text!r:.60}")
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise DumpError(
            f"{where}: expected an ISO 8601 time, got {text!r:.60}"
        ) from None


def _parse_float(text: object, where: str) -> float:
    if text not in ("NaN", "Infinity", "-Infinity"):
        raise DumpError(
            f"{where}: expected NaN, Infinity or -Infinity, got {text!r:.40}"
        )
    return float(str(text).replace("Infinity", "inf"))


def _parse_bytes(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise DumpError(f"{where}: expected base64 text, got {text!r:.40}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise DumpError(f"{where}: expected base64 text, got {text!r:.40}") from None


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_item(value: Any, where: str) -> Any:
    """A dump value as plain JSON (times as ISO text), for SQLite's JSON text."""
    if isinstance(value, list):
        return [_json_item(item, where) for item in value]
    if not isinstance(value, dict):
        return value
    tag, inner = _tag(value, where)
    if tag == "$time":
        return _iso_time(_parse_time(inner, where))
    if tag == "$json":
        return inner
    if tag == "$array":
        return _json_item(inner, where)
    if tag == "$float":
        _parse_float(inner, where)
    return inner


def to_sqlite(value: Any, where: str) -> Any:
    """A dump value as the SQLite backend stores it."""
    if value is None or isinstance(value, int | float | str):
        return int(value) if isinstance(value, bool) else value
    if isinstance(value, list):
        raise DumpError(f"{where}: expected a value, got a bare list")
    if not isinstance(value, dict):
        raise DumpError(f"{where}: expected a value, got {type(value).__name__}")
    tag, inner = _tag(value, where)
    if tag == "$time":
        return _iso_time(_parse_time(inner, where))
    if tag == "$float":
        return _parse_float(inner, where)
    if tag == "$bytes":
        return _parse_bytes(inner, where)
    if tag == "$json":
        return _compact_json(inner)
    if tag == "$array":
        if not isinstance(inner, list):
            raise DumpError(f"{where}: expected a list in $array, got {inner!r:.40}")
        return _compact_json(_json_item(inner, where))
    if not isinstance(inner, str):
        raise DumpError(f"{where}: expected text in {tag}, got {inner!r:.40}")
    return inner


def pg_converter(kind: str) -> Callable[[Any, str], Any]:
    """Turns a dump value into what asyncpg sends for a column of ``kind``."""
    if kind.startswith("array:"):
        return _pg_array(pg_converter(kind[len("array:") :]))
    converter = _PG_CONVERTERS.get(kind)
    if converter is None:
        raise DumpError(f"expected a column kind the restore knows, got {kind!r}")
    return converter


def _expect(kind: str, value: Any, where: str) -> DumpError:
    shown = json.dumps(value)[:60] if _jsonable(value) else type(value).__name__
    article = "an" if kind[:1] in ("a", "i", "u") else "a"
    return DumpError(
        f"{where}: expected a value for {article} {kind} column, got {shown}"
    )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _untag(value: Any, where: str) -> tuple[str | None, Any]:
    if isinstance(value, dict):
        return _tag(value, where)
    return None, value


def _pg_integer(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag is None and isinstance(inner, int) and not isinstance(inner, bool):
        return inner
    if tag is None and isinstance(inner, bool):
        return int(inner)
    raise _expect("integer", value, where)


def _pg_real(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag == "$float":
        return _parse_float(inner, where)
    if tag is None and isinstance(inner, int | float) and not isinstance(inner, bool):
        return float(inner)
    raise _expect("real", value, where)


def _pg_numeric(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag in ("$decimal", "$float") or (
        tag is None and isinstance(inner, int | float | str)
    ):
        if isinstance(inner, bool):
            raise _expect("numeric", value, where)
        try:
            return decimal.Decimal(str(inner).replace("Infinity", "Inf"))
        except decimal.InvalidOperation:
            raise _expect("numeric", value, where) from None
    raise _expect("numeric", value, where)


def _pg_text(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag is None and isinstance(inner, str):
        return inner
    raise _expect("text", value, where)


def _pg_boolean(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag is None and isinstance(inner, bool):
        return inner
    if tag is None and isinstance(inner, int) and inner in (0, 1):
        return bool(inner)
    raise _expect("boolean", value, where)


def _pg_timestamptz(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag in ("$time", None) and isinstance(inner, str):
        moment = _parse_time(inner, where)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment
    raise _expect("timestamptz", value, where)


def _pg_timestamp(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag in ("$time", None) and isinstance(inner, str):
        moment = _parse_time(inner, where)
        if moment.tzinfo is not None:
            moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
        return moment
    raise _expect("timestamp", value, where)


def _pg_date(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag in ("$date", None) and isinstance(inner, str):
        try:
            return dt.date.fromisoformat(inner)
        except ValueError:
            raise _expect("date", value, where) from None
    raise _expect("date", value, where)


def _pg_json(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag == "$json":
        return json.dumps(inner, ensure_ascii=False)
    if tag is None and isinstance(inner, str):
        try:
            json.loads(inner)
        except ValueError:
            raise DumpError(
                f"{where}: expected JSON text for a json column, got {inner!r:.60}"
            ) from None
        return inner
    raise _expect("json", value, where)


def _pg_bytes(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag == "$bytes":
        return _parse_bytes(inner, where)
    raise _expect("bytea", value, where)


def _pg_uuid(value: Any, where: str) -> Any:
    tag, inner = _untag(value, where)
    if tag is None and isinstance(inner, str):
        try:
            return uuid.UUID(inner)
        except ValueError:
            raise _expect("uuid", value, where) from None
    raise _expect("uuid", value, where)


_PG_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "integer": _pg_integer,
    "real": _pg_real,
    "numeric": _pg_numeric,
    "text": _pg_text,
    "boolean": _pg_boolean,
    "timestamptz": _pg_timestamptz,
    "timestamp": _pg_timestamp,
    "date": _pg_date,
    "json": _pg_json,
    "bytes": _pg_bytes,
    "uuid": _pg_uuid,
}


def _pg_array(item: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def convert(value: Any, where: str) -> Any:
        tag, inner = _untag(value, where)
        if tag is None and isinstance(inner, str):
            try:
                inner = json.loads(inner)
            except ValueError:
                inner = None
        elif tag != "$array":
            inner = None
        if not isinstance(inner, list):
            raise _expect("array", value, where)
        return _convert_items(inner, item, where)

    return convert


def _convert_items(
    items: list[Any], item: Callable[[Any, str], Any], where: str
) -> list[Any]:
    return [
        _convert_items(value, item, where)
        if isinstance(value, list)
        else (None if value is None else item(value, where))
        for value in items
    ]


def parse_line(line: bytes, width: int, where: str) -> list[Any]:
    """One dump line as its list of ``width`` values."""
    try:
        values = json.loads(line)
    except ValueError as exc:
        raise DumpError(
            f"{where}: expected a JSON row, got invalid JSON ({exc})"
        ) from None
    if not isinstance(values, list) or len(values) != width:
        got = f"{len(values)} values" if isinstance(values, list) else "no list"
        raise DumpError(f"{where}: expected a list of {width} values, got {got}")
    return values


# ---------------------------------------------------------------------------
# The audit chain of a loaded database.


def audit_row(values: dict[str, Any]) -> AuditRow:
    """An audit row from its columns, as either backend returns them."""
    timestamp = values["timestamp"]
    if isinstance(timestamp, str):
        timestamp = dt.datetime.fromisoformat(timestamp)
    details = values["details"]
    if isinstance(details, str):
        details = json.loads(details)
    record = AuditRecord(
        uid=values["uid"],
        timestamp=timestamp,
        severity=values["severity"],
        event_type=values["event_type"],
        user=values["user_name"],
        source_address=values["source_address"],
        protocol=values["protocol"],
        station_id=values["station_id"],
        pump_id=values["pump_id"],
        old_value=values["old_value"],
        new_value=values["new_value"],
        outcome=values["outcome"],
        details=details,
    )
    return AuditRow(
        id=int(values["id"]),
        record=record,
        prev_hash=values["prev_hash"],
        hash=values["hash"],
    )


_AUDIT_COLUMNS = (
    "id",
    "uid",
    "timestamp",
    "severity",
    "event_type",
    "user_name",
    "source_address",
    "protocol",
    "station_id",
    "pump_id",
    "old_value",
    "new_value",
    "outcome",
    "details",
    "prev_hash",
    "hash",
)
_AUDIT_SELECT = (
    f"SELECT {', '.join(quote(c) for c in _AUDIT_COLUMNS)} FROM {AUDIT_TABLE} "
    "ORDER BY id"
)


@dataclasses.dataclass(frozen=True, slots=True)
class ChainCheck:
    """The audit chain of a loaded database, and its head."""

    verdict: ChainVerdict
    head: tuple[int, str]


def _check_stop(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("stopped: the adapter is shutting down")


# ---------------------------------------------------------------------------
# SQLite.


def _sqlite_kind(declared: str) -> str:
    """The kind of an SQLite column, by its type affinity."""
    upper = declared.upper()
    if "INT" in upper:
        return "integer"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if not upper or "BLOB" in upper:
        return "any"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "real"
    return "numeric"


def sqlite_tables(con: sqlite3.Connection) -> list[Table]:
    """Every table of an SQLite database, from its catalog."""
    names = [
        row[0]
        for row in con.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
        )
    ]
    tables = []
    for name in names:
        info = con.execute(f"PRAGMA table_info({quote(name)})").fetchall()
        columns = tuple(
            Column(r[1], str(r[2]).lower(), _sqlite_kind(r[2])) for r in info
        )
        key = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
        references = sorted(
            {r[2] for r in con.execute(f"PRAGMA foreign_key_list({quote(name)})")}
        )
        tables.append(Table(name, columns, key, tuple(references)))
    return tables


def _order_by(table: Table) -> str:
    keys = table.primary_key or tuple(c.name for c in table.columns)
    return ", ".join(quote(k) for k in keys)


def _select(table: Table, *, order: bool = True) -> str:
    columns = ", ".join(quote(c.name) for c in table.columns)
    sql = f"SELECT {columns} FROM {quote(table.name)}"
    return f"{sql} ORDER BY {_order_by(table)}" if order else sql


class _PartWriter:
    """A part being written to the staging folder (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: IO[bytes] = os.fdopen(fd, "wb", buffering=1 << 20)
        self.rows = 0

    def write(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self._file.write(line)
            self.rows += 1

    def close(self) -> None:
        self._file.close()


def _sqlite_connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    if not create and not path.exists():
        raise DumpError(f"sqlite at {path}: no database file there")
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    con.execute("PRAGMA foreign_keys = OFF")
    return con


def dump_sqlite(
    database: SQLiteDatabase, folder: Path, cancel: threading.Event | None = None
) -> DatabaseDump:
    """Dump every table of an SQLite file into ``folder``, one consistent read.

    Runs on the calling thread (call it in a worker thread from asyncio).
    """
    where = database.where()
    try:
        con = _sqlite_connect(database.path)
    except sqlite3.Error as exc:
        raise DumpError(f"{where}: cannot open the database ({exc})") from exc

    try:
        con.execute("PRAGMA query_only = 1")
        con.execute("BEGIN")
        tables = load_order(sqlite_tables(con))
        _check_calejo_tables(tables, where)
        version = con.execute(
            f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
        ).fetchone()[0]
        head_row = con.execute(
            f"SELECT last_id, last_hash FROM {CHAIN_HEAD_TABLE} WHERE id = 1"
        ).fetchone()
        if head_row is None:
            raise DumpError(f"{where}: the audit chain head row is missing")

        dumped = []
        for table in tables:
            _check_table_name(table.name, where)
            part = _PartWriter(folder / f"{table.name}.jsonl")
            try:
                cursor = con.execute(_select(table))
                while rows := cursor.fetchmany(BATCH_ROWS):
                    _check_stop(cancel)
                    part.write(row_line([encode_plain(v) for v in row]) for row in rows)
            finally:
                part.close()
            dumped.append(TableDump(table, part.rows, part.path))
        con.execute("COMMIT")
    except sqlite3.Error as exc:
        raise DumpError(f"{where}: reading the database failed ({exc})") from exc
    finally:
        con.close()

    return DatabaseDump(
        backend="sqlite",
        source={"backend": "sqlite", "path": str(database.path)},
        schema_version=int(version),
        tables=tuple(dumped),
        chain_head=(int(head_row[0]), str(head_row[1])),
    )


def _check_calejo_tables(tables: Sequence[Table], where: str) -> None:
    names = {table.name for table in tables}
    if not names:
        raise DumpError(
            f"{where}: the database holds no tables (has an adapter ever opened it?)"
        )
    missing = sorted({AUDIT_TABLE, CHAIN_HEAD_TABLE, MIGRATIONS_TABLE} - names)
    if missing:
        raise DumpError(
            f"{where}: expected the adapter's tables, but {', '.join(missing)} "
            "is missing (is this the adapter's database?)"
        )


def migrate_sqlite(con: sqlite3.Connection, version: int) -> None:
    """Apply the SQLite migrations up to ``version`` (inside a transaction)."""
    from calejo_server.storage.sqlite import split_script

    migrations = load_migrations("sqlite")
    if version > len(migrations):
        raise DumpError(
            f"database: the archive's schema version {version} is newer than "
            f"this adapter knows ({len(migrations)}); restore it with a newer "
            "adapter"
        )
    con.execute(_SQLITE_MIGRATIONS_DDL)
    applied = con.execute(
        f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
    ).fetchone()[0]
    for migration in migrations[applied:version]:
        for statement in split_script(migration.sql):
            con.execute(statement)
        con.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) "
            "VALUES (?, ?, ?)",
            (migration.version, migration.name, audit.iso_utc(dt.datetime.now(dt.UTC))),
        )


class SQLiteLoader:
    """Builds a new SQLite file at a dump's schema version and loads its rows.

    Everything happens in one transaction on the calling thread;
    :meth:`finish` checks the row counts and the audit chain, then commits.
    """

    def __init__(self, path: Path, schema_version: int, tables: Sequence[Table]):
        self.path = path
        self.where = f"sqlite at {path}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self._con = _sqlite_connect(path, create=True)
        try:
            self._con.execute("PRAGMA journal_mode = DELETE")
            self._con.execute("PRAGMA synchronous = FULL")
            self._con.execute("BEGIN IMMEDIATE")
            migrate_sqlite(self._con, schema_version)
            self._targets = {t.name: t for t in sqlite_tables(self._con)}
            self._inserts = {t.name: self._prepare(t) for t in tables}
            for table in reversed(load_order(tables)):
                self._con.execute(f"DELETE FROM {quote(table.name)}")
        except BaseException:
            self.close()
            raise
        self.loaded: dict[str, int] = {}

    def _prepare(self, table: Table) -> str:
        target = self._targets.get(table.name)
        if target is None:
            raise DumpError(
                f"{table.part}: table {table.name} does not exist in the schema "
                "the archive names (a migration is missing for sqlite)"
            )
        known = {c.name for c in target.columns}
        missing = [c.name for c in table.columns if c.name not in known]
        if missing:
            raise DumpError(
                f"{table.part}: table {table.name} has no column "
                f"{', '.join(missing)} in the sqlite schema"
            )
        columns = ", ".join(quote(c.name) for c in table.columns)
        marks = ", ".join("?" * len(table.columns))
        return f"INSERT INTO {quote(table.name)} ({columns}) VALUES ({marks})"

    def load(
        self,
        table: Table,
        lines: Iterable[bytes],
        cancel: threading.Event | None = None,
    ) -> int:
        """Insert the rows of ``table`` from its dump lines; the row count."""
        sql = self._inserts[table.name]
        width = len(table.columns)
        names = [c.name for c in table.columns]
        count = 0
        batch: list[list[Any]] = []
        for line in lines:
            count += 1
            where = f"{table.part} line {count}"
            values = parse_line(line, width, where)
            batch.append(
                [
                    to_sqlite(value, f"{where} column {name}")
                    for value, name in zip(values, names, strict=True)
                ]
            )
            if len(batch) >= BATCH_ROWS:
                _check_stop(cancel)
                self._insert(sql, batch, table)
                batch = []
        if batch:
            self._insert(sql, batch, table)
        self.loaded[table.name] = self.loaded.get(table.name, 0) + count
        return count

    def _insert(self, sql: str, batch: list[list[Any]], table: Table) -> None:
        try:
            self._con.executemany(sql, batch)
        except sqlite3.Error as exc:
            raise DumpError(
                f"{table.part}: the rows do not load into table {table.name} ({exc})"
            ) from exc

    def count(self, table: str) -> int:
        return int(
            self._con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()[0]
        )

    def chain(self) -> ChainCheck:
        """Walk the loaded audit chain against the loaded chain head."""
        head = self._con.execute(
            f"SELECT last_id, last_hash FROM {CHAIN_HEAD_TABLE} WHERE id = 1"
        ).fetchone()
        if head is None:
            raise DumpError("audit chain: the chain head row is missing")
        verifier = audit.ChainVerifier()
        cursor = self._con.execute(_AUDIT_SELECT)
        while rows := cursor.fetchmany(BATCH_ROWS):
            if not all(
                verifier.feed(audit_row(dict(zip(_AUDIT_COLUMNS, r, strict=True))))
                for r in rows
            ):
                break
        head_pair = (int(head[0]), str(head[1]))
        return ChainCheck(verifier.finish(head_pair), head_pair)

    def commit(self) -> None:
        self._con.execute("COMMIT")
        self.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            if self._con.in_transaction:
                self._con.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.warning("%s: rollback failed: %s", self.where, exc)
        self._con.close()


# ---------------------------------------------------------------------------
# PostgreSQL.

_PG_KINDS = {
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "oid": "integer",
    "float4": "real",
    "float8": "real",
    "numeric": "numeric",
    "text": "text",
    "varchar": "text",
    "bpchar": "text",
    "name": "text",
    "citext": "text",
    "bool": "boolean",
    "timestamptz": "timestamptz",
    "timestamp": "timestamp",
    "date": "date",
    "json": "json",
    "jsonb": "json",
    "bytea": "bytes",
    "uuid": "uuid",
}

_PG_TABLES = (
    "SELECT c.oid, c.relname FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
    "AND NOT c.relispartition ORDER BY c.relname"
)
_PG_COLUMNS = (
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), b.typname, "
    "b.typcategory::text, e.typname "
    "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
    "JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype "
    "ELSE t.oid END "
    "LEFT JOIN pg_type e ON e.oid = b.typelem AND b.typcategory = 'A' "
    "WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped "
    "AND a.attgenerated = '' ORDER BY a.attnum"
)
_PG_PRIMARY_KEY = (
    "SELECT a.attname FROM pg_index i "
    "CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) "
    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
    "WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord"
)
_PG_REFERENCES = (
    "SELECT DISTINCT r.relname FROM pg_constraint f "
    "JOIN pg_class r ON r.oid = f.confrelid "
    "WHERE f.conrelid = $1 AND f.contype = 'f' ORDER BY r.relname"
)


def _pg_kind(
    table: str,
    column: str,
    declared: str,
    base: str,
    element: str | None,
    category: str,
) -> str:
    if category == "A" and element is not None:
        inner = _PG_KINDS.get(element.lstrip("_"))
        if inner is not None:
            return f"array:{inner}"
    kind = _PG_KINDS.get(base)
    if kind is None:
        raise DumpError(
            f"table {table} column {column}: type {declared} is not one the "
            "backup format holds (integer, real, numeric, text, boolean, "
            "timestamp, date, json, bytea, uuid and arrays of them)"
        )
    return kind


async def postgres_tables(conn: asyncpg.Connection) -> list[Table]:
    """Every table in the current schema, from the catalog."""
    tables = []
    for oid, name in await conn.fetch(_PG_TABLES):
        columns = tuple(
            Column(r[0], str(r[1]), _pg_kind(name, r[0], r[1], r[2], r[4], r[3]))
            for r in await conn.fetch(_PG_COLUMNS, oid)
        )
        key = tuple(r[0] for r in await conn.fetch(_PG_PRIMARY_KEY, oid))
        references = tuple(r[0] for r in await conn.fetch(_PG_REFERENCES, oid))
        tables.append(Table(name, columns, key, references))
    return tables


async def connect_postgres(
    database: PostgresDatabase, *, create: bool = False
) -> asyncpg.Connection:
    """A connection to ``database``; with ``create``, create it when missing."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            database.dsn,
            timeout=PG_CONNECT_TIMEOUT,
            command_timeout=PG_COMMAND_TIMEOUT,
        )
        return conn
    except asyncpg.InvalidCatalogNameError:
        if not create:
            raise DumpError(
                f"{database.where()}: database {database.database!r} does not exist"
            ) from None
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DumpError(f"{database.where()}: cannot connect ({exc})") from exc

    await _create_database(database)
    return await connect_postgres(database)


async def _create_database(database: PostgresDatabase) -> None:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database.dsn)
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    try:
        conn = await asyncpg.connect(admin, timeout=PG_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DumpError(f"{database.where()}: cannot connect ({exc})") from exc
    try:
        await conn.execute(f"CREATE DATABASE {quote(database.database)}")
    except asyncpg.DuplicateDatabaseError:
        pass
    except asyncpg.PostgresError as exc:
        raise DumpError(
            f"{database.where()}: database {database.database!r} does not exist "
            f"and could not be created ({exc})"
        ) from exc
    finally:
        await conn.close()
    logger.info("%s: created database %r", database.where(), database.database)


async def dump_postgres(
    database: PostgresDatabase, folder: Path, cancel: threading.Event | None = None
) -> DatabaseDump:
    """Dump every table of the current schema into ``folder``, one snapshot.

    Rows are read a page at a time; encoding and writing run in a worker
    thread so that the event loop stays free.
    """
    where = database.where()
    conn = await connect_postgres(database)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            tables = load_order(await postgres_tables(conn))
            _check_calejo_tables(tables, where)
            version = await conn.fetchval(
                f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
            )
            head_row = await conn.fetchrow(
                f"SELECT last_id, last_hash FROM {CHAIN_HEAD_TABLE} WHERE id = 1"
            )
            if head_row is None:
                raise DumpError(f"{where}: the audit chain head row is missing")
            identity = await conn.fetchrow(
                "SELECT current_schema(), current_setting('server_version')"
            )
            assert identity is not None

            dumped = []
            for table in tables:
                _check_table_name(table.name, where)
                dumped.append(await _dump_pg_table(conn, table, folder, cancel))
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        raise DumpError(f"{where}: reading the database failed ({exc})") from exc
    finally:
        await conn.close()

    return DatabaseDump(
        backend="postgresql",
        source={
            "backend": "postgresql",
            "host": database.host,
            "port": database.port,
            "database": database.database,
            "schema": identity[0],
            "server_version": identity[1],
        },
        schema_version=int(version),
        tables=tuple(dumped),
        chain_head=(int(head_row[0]), str(head_row[1])),
    )


async def _dump_pg_table(
    conn: asyncpg.Connection,
    table: Table,
    folder: Path,
    cancel: threading.Event | None,
) -> TableDump:
    encoders = [_pg_encoder(c.kind) for c in table.columns]

    def lines(rows: list[asyncpg.Record]) -> list[bytes]:
        return [
            row_line([encode(v) for encode, v in zip(encoders, row, strict=True)])
            for row in rows
        ]

    part = await asyncio.to_thread(_PartWriter, folder / f"{table.name}.jsonl")
    try:
        cursor = await conn.cursor(_select(table))
        while rows := await cursor.fetch(BATCH_ROWS):
            _check_stop(cancel)
            encoded = await asyncio.to_thread(lines, rows)
            await asyncio.to_thread(part.write, encoded)
    finally:
        await asyncio.to_thread(part.close)
    return TableDump(table, part.rows, part.path)


async def postgres_schema_version(conn: asyncpg.Connection) -> int:
    """The schema version of the current schema (0: no migrations table)."""
    exists = await conn.fetchval(
        "SELECT to_regclass(quote_ident(current_schema()) || '.schema_migrations')"
    )
    if exists is None:
        return 0
    return int(
        await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}")
    )


async def other_sessions(conn: asyncpg.Connection) -> list[str]:
    """Other client sessions on the same database, for an operator to read."""
    rows = await conn.fetch(
        "SELECT pid, usename, client_addr::text, application_name "
        "FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
        "ORDER BY pid"
    )
    return [
        f"pid {r[0]} user {r[1]} from {r[2] or 'local socket'}"
        + (f" ({r[3]})" if r[3] else "")
        for r in rows
    ]


class PostgresLoader:
    """Replaces the rows of a PostgreSQL database in the caller's transaction.

    :meth:`begin` migrates the schema to the dump's version when it is
    behind, checks every dumped table against the target, turns the
    tables' own triggers off (the audit log refuses deletes) and empties
    them; :meth:`load` copies rows in; :meth:`end` turns the triggers
    back on and moves sequences past the loaded keys. The caller commits
    or rolls back.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        database: PostgresDatabase,
        schema_version: int,
        tables: Sequence[Table],
    ) -> None:
        self._conn = conn
        self.where = database.where()
        self._version = schema_version
        self._tables = list(tables)
        self._targets: dict[str, Table] = {}
        self._converters: dict[str, list[Callable[[Any, str], Any]]] = {}
        self._schema = ""
        self.loaded: dict[str, int] = {}

    async def begin(self) -> None:
        from calejo_server.storage.postgres import MIGRATION_LOCK

        conn = self._conn
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        self._schema = str(await conn.fetchval("SELECT current_schema()"))
        current = await postgres_schema_version(conn)
        migrations = load_migrations("postgresql")
        if self._version > len(migrations):
            raise DumpError(
                f"database: the archive's schema version {self._version} is newer "
                f"than this adapter knows ({len(migrations)}); restore it with a "
                "newer adapter"
            )
        if current > self._version:
            raise DumpError(
                f"{self.where}: the database schema is at version {current}, the "
                f"archive was taken at version {self._version}; restore it into "
                "an empty database (the adapter migrates it forward at its next "
                "start)"
            )
        await conn.execute(_PG_MIGRATIONS_DDL)
        for migration in migrations[current : self._version]:
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )

        self._targets = {t.name: t for t in await postgres_tables(conn)}
        for table in self._tables:
            self._converters[table.name] = self._prepare(table)
        for table in self._tables:
            await conn.execute(f"ALTER TABLE {quote(table.name)} DISABLE TRIGGER USER")
        for table in reversed(load_order(self._tables)):
            await conn.execute(f"DELETE FROM {quote(table.name)}")

    def _prepare(self, table: Table) -> list[Callable[[Any, str], Any]]:
        target = self._targets.get(table.name)
        if target is None:
            raise DumpError(
                f"{table.part}: table {table.name} does not exist in the postgresql "
                f"schema {self._schema!r} at version {self._version}"
            )
        kinds = {c.name: c.kind for c in target.columns}
        missing = [c.name for c in table.columns if c.name not in kinds]
        if missing:
            raise DumpError(
                f"{table.part}: table {table.name} has no column "
                f"{', '.join(missing)} in the postgresql schema"
            )
        return [pg_converter(kinds[c.name]) for c in table.columns]

    async def load(
        self,
        table: Table,
        lines: Iterable[bytes],
        cancel: threading.Event | None = None,
    ) -> int:
        """Copy the rows of ``table`` in from its dump lines; the row count."""
        converters = self._converters[table.name]
        names = [c.name for c in table.columns]
        width = len(names)
        count = 0
        batch: list[tuple[Any, ...]] = []
        for line in lines:
            count += 1
            where = f"{table.part} line {count}"
            values = parse_line(line, width, where)
            batch.append(
                tuple(
                    None if value is None else convert(value, f"{where} column {name}")
                    for value, convert, name in zip(
                        values, converters, names, strict=True
                    )
                )
            )
            if len(batch) >= BATCH_ROWS:
                _check_stop(cancel)
                await self._copy(table, names, batch)
                batch = []
        if batch:
            await self._copy(table, names, batch)
        self.loaded[table.name] = self.loaded.get(table.name, 0) + count
        return count

    async def _copy(
        self, table: Table, names: list[str], batch: list[tuple[Any, ...]]
    ) -> None:
        try:
            await self._conn.copy_records_to_table(
                table.name, records=batch, columns=names, schema_name=self._schema
            )
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise DumpError(
                f"{table.part}: the rows do not load into table {table.name} ({exc})"
            ) from exc

    async def end(self) -> None:
        conn = self._conn
        for table in self._tables:
            await conn.execute(f"ALTER TABLE {quote(table.name)} ENABLE TRIGGER USER")
        for table in self._tables:
            for column in table.columns:
                if column.kind != "integer":
                    continue
                sequence = await conn.fetchval(
                    "SELECT pg_get_serial_sequence($1, $2)",
                    quote(table.name),
                    column.name,
                )
                if sequence is None:
                    continue
                await conn.execute(
                    f"SELECT setval($1::regclass, coalesce(max({quote(column.name)}), "
                    f"1), max({quote(column.name)}) IS NOT NULL) "
                    f"FROM {quote(table.name)}",
                    sequence,
                )

    async def count(self, table: str) -> int:
        return int(await self._conn.fetchval(f"SELECT count(*) FROM {quote(table)}"))

    async def chain(self) -> ChainCheck:
        """Walk the loaded audit chain against the loaded chain head."""
        head = await self._conn.fetchrow(
            f"SELECT last_id, last_hash FROM {CHAIN_HEAD_TABLE} WHERE id = 1"
        )
        if head is None:
            raise DumpError("audit chain: the chain head row is missing")
        verifier = audit.ChainVerifier()
        cursor = await self._conn.cursor(_AUDIT_SELECT)
        while rows := await cursor.fetch(BATCH_ROWS):
            if not all(
                verifier.feed(audit_row(dict(zip(_AUDIT_COLUMNS, r, strict=True))))
                for r in rows
            ):
                break
        head_pair = (int(head[0]), str(head[1]))
        return ChainCheck(verifier.finish(head_pair), head_pair)


def read_lines(chunks: Iterable[bytes], where: str) -> Iterator[bytes]:
    """Complete lines from a stream of byte chunks (each without its newline)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        if len(pending) > MAX_LINE_BYTES and b"\n" not in pending:
            raise DumpError(f"{where}: a line longer than {MAX_LINE_BYTES} bytes")
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        raise DumpError(f"{where}: the last line has no newline (cut short?)")
