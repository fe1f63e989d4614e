"""The logical dump: catalog, value encoding, loading into either backend.

The adapter's own tables use a few column types; a table added later may
use others. Here a table with every type the format holds is created in
a PostgreSQL schema beside the adapter's tables, dumped, loaded into a
second schema and compared row by row (and its sequence carries on after
the loaded keys). The codecs are checked value by value in both
directions, and bad input is refused naming the part, line and column.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import math
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from calejo_server.ops import dump
from calejo_server.ops.dump import Column, DumpError, Table
from calejo_server.storage import open_storage
from tests.server.storage.conftest import (  # the storage tests' fixtures
    postgres_database,
    postgres_server,
    postgres_url,
)

__all__ = ["postgres_database", "postgres_server", "postgres_url"]

GAUGES = """
CREATE TABLE gauges (
    id bigserial PRIMARY KEY,
    reading numeric(12, 4),
    day date,
    blob bytea,
    ref uuid,
    local_time timestamp,
    level double precision,
    tags text[],
    stamps timestamptz[],
    doc jsonb,
    raw json,
    note varchar(20),
    flag boolean,
    small smallint
)
"""

ROWS: list[tuple[Any, ...]] = [
    (
        decimal.Decimal("12.5000"),
        dt.date(2030, 1, 31),
        b"\x00\xffbytes",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        dt.datetime(2030, 1, 31, 23, 59, 59, 999999),
        math.nan,
        ["a", "b,c", 'quote"d', None],
        [dt.datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC)],
        json.dumps({"z": [1, 2.5, None], "a": "\u00e9t\u00e9"}),
        '"just a string"',
        "pump\u00a0room",
        True,
        -32768,
    ),
    (
        decimal.Decimal("-0.0001"),
        None,
        b"",
        None,
        None,
        math.inf,
        [],
        None,
        "[]",
        "3",
        None,
        False,
        None,
    ),
    (None,) * 13,
]


def _rows_sql() -> str:
    columns = (
        "reading, day, blob, ref, local_time, level, tags, stamps, doc, raw, note, "
        "flag, small"
    )
    marks = ", ".join(f"${i}" for i in range(1, 14))
    return f"INSERT INTO gauges ({columns}) VALUES ({marks})"


async def _schema(url: str, name: str) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    base = url.split("?", 1)[0]
    return f"{base}?search_path={name}"


async def _drop(url: str, name: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def _migrated(url: str, data_dir: Path) -> None:
    storage = open_storage(url, data_dir)
    await storage.open()
    await storage.close()


async def _gauges(url: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch("SELECT * FROM gauges ORDER BY id")]
    finally:
        await conn.close()


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, float) and isinstance(right, float):
        return (math.isnan(left) and math.isnan(right)) or left == right
    return bool(left == right)


@pytest.mark.postgres
def test_every_supported_type_round_trips_through_postgresql(
    postgres_url: str, tmp_path: Path
) -> None:
    target_name = f"t_{secrets.token_hex(6)}"

    async def main() -> None:
        await _migrated(postgres_url, tmp_path / "a")
        conn = await asyncpg.connect(postgres_url, timeout=10)
        try:
            await conn.execute(GAUGES)
            await conn.executemany(_rows_sql(), ROWS)
        finally:
            await conn.close()
        source = dump.locate(postgres_url, tmp_path / "a")
        assert isinstance(source, dump.PostgresDatabase)
        folder = tmp_path / "dump"
        folder.mkdir()
        dumped = await dump.dump_postgres(source, folder)

        tables = {t.table.name: t for t in dumped.tables}
        assert tables["gauges"].rows == 3
        kinds = {c.name: c.kind for c in tables["gauges"].table.columns}
        assert kinds["tags"] == "array:text"
        assert kinds["stamps"] == "array:timestamptz"
        assert kinds["reading"] == "numeric" and kinds["raw"] == "json"
        first = json.loads((folder / "gauges.jsonl").read_text().splitlines()[0])
        assert first[1] == {"$decimal": "12.5000"}
        assert first[6] == {"$float": "NaN"}
        assert first[8] == {"$array": [{"$time": "2030-01-01T00:00:00.000001+00:00"}]}

        target_url = await _schema(postgres_url, target_name)
        await _migrated(target_url, tmp_path / "b")
        conn = await asyncpg.connect(target_url, timeout=10)
        try:
            await conn.execute(GAUGES)
            target = dump.locate(target_url, tmp_path / "b")
            assert isinstance(target, dump.PostgresDatabase)
            async with conn.transaction():
                loader = dump.PostgresLoader(
                    conn,
                    target,
                    dumped.schema_version,
                    [t.table for t in dumped.tables],
                )
                await loader.begin()
                for item in dumped.tables:
                    lines = item.path.read_bytes().splitlines()
                    assert await loader.load(item.table, lines) == item.rows
                await loader.end()
                chain = await loader.chain()
            assert chain.verdict.ok and chain.head == dumped.chain_head
            new_id = await conn.fetchval(
                "INSERT INTO gauges (note) VALUES ('after') RETURNING id"
            )
        finally:
            await conn.close()

        before = await _gauges(postgres_url)
        after = await _gauges(target_url)
        assert new_id == 4, "the sequence carries on after the loaded keys"
        assert len(after) == 4
        for old, new in zip(before, after[:3], strict=True):
            assert all(_same(a, b) for a, b in zip(old, new, strict=True)), (old, new)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        asyncio.run(_drop(postgres_url, target_name))


def test_a_table_the_target_schema_lacks_is_named(tmp_path: Path) -> None:
    table = Table("gauges", (Column("id", "integer", "integer"),), ("id",), ())

    with pytest.raises(DumpError) as error:
        dump.SQLiteLoader(tmp_path / "new.db", 1, [table])

    assert str(error.value).startswith("database/gauges.jsonl: table gauges ")
    assert "a migration is missing for sqlite" in str(error.value)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (None, None),
        (True, 1),
        (7, 7),
        (2.5, 2.5),
        ("text", "text"),
        ({"$float": "-Infinity"}, -math.inf),
        ({"$bytes": "AP8="}, b"\x00\xff"),
        (
            {"$time": "2030-01-31T13:00:00.000001+01:00"},
            "2030-01-31T12:00:00.000001+00:00",
        ),
        ({"$time": "2030-01-31T12:00:00"}, "2030-01-31T12:00:00.000000"),
        ({"$json": {"b": 1, "a": "\u00e9"}}, '{"b":1,"a":"\u00e9"}'),
        ({"$json": "scalar"}, '"scalar"'),
        (
            {"$array": [{"$time": "2030-01-01T00:00:00+00:00"}, None]},
            '["2030-01-01T00:00:00.000000+00:00",null]',
        ),
        ({"$decimal": "1.50"}, "1.50"),
    ],
)
def test_values_as_sqlite_stores_them(value: Any, stored: Any) -> None:
    assert dump.to_sqlite(value, "here") == stored


@pytest.mark.parametrize(
    ("kind", "value", "sent"),
    [
        ("boolean", 1, True),
        ("boolean", False, False),
        ("integer", 5, 5),
        ("real", 3, 3.0),
        ("real", {"$float": "NaN"}, "nan"),
        ("numeric", {"$decimal": "1.50"}, decimal.Decimal("1.50")),
        ("text", "t", "t"),
        (
            "timestamptz",
            "2030-01-31T12:00:00.000001+00:00",
            dt.datetime(2030, 1, 31, 12, 0, 0, 1, tzinfo=dt.UTC),
        ),
        (
            "timestamptz",
            "2030-01-31T12:00:00",
            dt.datetime(2030, 1, 31, 12, tzinfo=dt.UTC),
        ),
        (
            "timestamp",
            {"$time": "2030-01-31T13:00:00+01:00"},
            dt.datetime(2030, 1, 31, 12),
        ),
        ("date", "2030-01-31", dt.date(2030, 1, 31)),
        ("json", '{"a": 1}', '{"a": 1}'),
        ("json", {"$json": [1, "x"]}, '[1, "x"]'),
        ("bytes", {"$bytes": "AP8="}, b"\x00\xff"),
        ("uuid", str(uuid.UUID(int=7)), uuid.UUID(int=7)),
        ("array:text", '["a","b"]', ["a", "b"]),
        ("array:text", {"$array": ["a", None]}, ["a", None]),
        (
            "array:timestamptz",
            {"$array": [{"$time": "2030-01-01T00:00:00+00:00"}]},
            [dt.datetime(2030, 1, 1, tzinfo=dt.UTC)],
        ),
    ],
)
def test_values_as_postgresql_takes_them(kind: str, value: Any, sent: Any) -> None:
    converted = dump.pg_converter(kind)(value, "here")
    if sent == "nan":
        assert math.isnan(converted)
    else:
        assert converted == sent
        assert type(converted) is type(sent)


@pytest.mark.parametrize(
    ("kind", "value", "words"),
    [
        ("boolean", 2, "expected a value for a boolean column, got 2"),
        ("integer", 1.5, "expected a value for an integer column, got 1.5"),
        ("text", 5, "expected a value for a text column, got 5"),
        ("timestamptz", "yesterday", "expected an ISO 8601 time, got 'yesterday'"),
        ("json", "{not json", "expected JSON text for a json column"),
        ("array:text", "no list", "expected a value for an array column"),
        ("text", {"$when": "now"}, "expected one of the tags"),
        ("text", {"$time": "x", "$date": "y"}, "tagged value of one key"),
    ],
)
def test_bad_values_are_refused_where_they_are(
    kind: str, value: Any, words: str
) -> None:
    with pytest.raises(DumpError) as error:
        dump.pg_converter(kind)(value, "database/t.jsonl line 3 column c")

    assert str(error.value).startswith("database/t.jsonl line 3 column c: ")
    assert words in str(error.value)


def test_lines_are_checked_for_shape(tmp_path: Path) -> None:
    where = "database/t.jsonl line 2"
    with pytest.raises(DumpError, match="expected a list of 3 values, got 2 values"):
        dump.parse_line(b"[1,2]", 3, where)
    with pytest.raises(DumpError, match="expected a JSON row, got invalid JSON"):
        dump.parse_line(b"[1,", 3, where)

    def chunks() -> Iterator[bytes]:
        yield b"[1]\n[2"
        yield b"]\n[3]"

    with pytest.raises(DumpError, match="the last line has no newline"):
        list(dump.read_lines(chunks(), "database/t.jsonl"))
    assert list(dump.read_lines(iter([b"[1]\n[", b"2]\n"]), "x")) == [b"[1]", b"[2]"]


def test_tables_load_after_the_tables_they_refer_to() -> None:
    def table(name: str, *references: str) -> Table:
        return Table(name, (Column("id", "integer", "integer"),), ("id",), references)

    order = dump.load_order(
        [table("readings", "pumps"), table("pumps", "stations"), table("stations")]
    )
    assert [t.name for t in order] == ["stations", "pumps", "readings"]

    cycle = dump.load_order([table("b", "a"), table("a", "b"), table("c")])
    assert [t.name for t in cycle] == ["c", "a", "b"]
