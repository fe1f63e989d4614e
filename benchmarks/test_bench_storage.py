"""Appending to the audit log in SQLite, beside the same table with fewer
indexes.

Every setpoint appends one audit row, and the adapter's event loop pays
for SQLite's work on it. One round appends 2,500 groups of 8 rows (a
commit of the REST benchmark carries 8 or 9 setpoints), each group one
transaction as the storage writes it: its multi-row INSERT, then the
chain head; ``synchronous=NORMAL``, automatic checkpoints off, no sync, so
that the figure is SQLite's own work. The schema is the adapter's, made by
its migrations. The baseline is the same database without the indexes on
severity, event type, station and user: their keys repeat, so a new row
lands inside each index rather than at its end, and a full page there is
split by rebalancing its neighbours (at the end SQLite appends a page).

Figures in ``extra_info``: ``us_per_row`` and ``wal_frames_per_commit``.
Run::

    .venv/bin/pytest benchmarks/test_bench_storage.py --benchmark-only \
        --benchmark-group-by=group -p no:randomly
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from calejo_server.storage import sqlite as backend

GROUPS = 2_500
ROWS_PER_GROUP = 8
REPEATING = ("event_type", "severity", "station_id", "user_name")


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file with the adapter's schema, as its migrations make it."""
    folder = tmp_path_factory.mktemp("bench-storage")
    storage = backend.SQLiteStorage(folder / "calejo.db", folder)

    async def make() -> None:
        await storage.open()
        await storage.close()

    asyncio.run(make())
    return folder / "calejo.db"


def _groups() -> list[list[Any]]:
    """The parameters of each group's INSERT: setpoint audit rows."""
    groups = []
    ids = itertools.count(1)
    previous = "0" * 64
    for _ in range(GROUPS):
        values: list[Any] = []
        for pump in range(ROWS_PER_GROUP):
            row_id = next(ids)
            digest = hashlib.sha256(f"{previous}{row_id}".encode()).hexdigest()
            values += [
                row_id,
                f"{row_id:032x}",
                f"2026-12-04T16:{row_id // 60 % 60:02d}:{row_id % 60:02d}.000000+00:00",
                "LOW",
                "SETPOINT_CHANGED",
                "optimizer",
                "127.0.0.1",
                "rest",
                f"station_{pump % 4}",
                f"p{pump:02d}",
                "30.0",
                "31.0",
                "accepted",
                '{"applied":30.5,"requested":31.0,"units":"Hz"}',
                previous,
                digest,
            ]
            previous = digest
        groups.append(values)
    return groups


def _open(path: Path, drop: tuple[str, ...]) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA wal_autocheckpoint = 0")
    for column in drop:
        con.execute(f"DROP INDEX compliance_audit_log_{column}")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return con


def _append(con: sqlite3.Connection, groups: list[list[Any]]) -> None:
    insert = backend._many_rows(backend._INSERT_AUDIT, ROWS_PER_GROUP)
    for values in groups:
        con.execute("BEGIN IMMEDIATE")
        con.execute(insert, values)
        con.execute(
            "UPDATE audit_chain_head SET last_id = ?, last_hash = ? WHERE id = 1",
            (values[-16], values[-1]),
        )
        con.execute("COMMIT")


def _measure(
    benchmark: Any, schema: Path, tmp_path: Path, drop: tuple[str, ...]
) -> None:
    groups = _groups()
    frames: list[float] = []
    rounds = itertools.count()

    def fresh() -> tuple[tuple[Any, ...], dict[str, Any]]:
        path = tmp_path / f"round-{next(rounds)}.db"
        shutil.copyfile(schema, path)
        return (_open(path, drop), path), {}

    def one_round(con: sqlite3.Connection, path: Path) -> None:
        _append(con, groups)
        page = con.execute("PRAGMA page_size").fetchone()[0]
        wal = path.with_name(path.name + "-wal").stat().st_size
        frames.append((wal - 32) / (page + 24) / GROUPS)
        con.close()

    benchmark.pedantic(one_round, setup=fresh, rounds=3, iterations=1)
    benchmark.extra_info.update(
        us_per_row=round(
            benchmark.stats.stats.min / (GROUPS * ROWS_PER_GROUP) * 1e6, 2
        ),
        wal_frames_per_commit=round(min(frames), 1),
        rows_per_commit=ROWS_PER_GROUP,
        commits_per_round=GROUPS,
    )


@pytest.mark.benchmark(group="sqlite-audit-append")
def test_audit_append_with_every_index(
    benchmark: Any, schema: Path, tmp_path: Path
) -> None:
    _measure(benchmark, schema, tmp_path, ())


@pytest.mark.benchmark(group="sqlite-audit-append")
def test_audit_append_without_the_repeating_key_indexes(
    benchmark: Any, schema: Path, tmp_path: Path
) -> None:
    _measure(benchmark, schema, tmp_path, REPEATING)
