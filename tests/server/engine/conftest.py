"""Fixtures of the engine tests: real storage, a manual clock, engines.

``make_engine`` writes a configuration file, opens the real storage (SQLite
in a temporary data folder) and starts an :class:`Engine` driven by a
:class:`ManualClock`; every engine and storage it made is stopped and
closed at the end of the test. ``restart`` stops an engine, closes its
storage and starts a fresh pair on the same data folder and database.

A test parametrised with ``@BOTH_BACKENDS`` runs on SQLite and on a fresh
schema of the PostgreSQL test database (the storage tests' fixtures).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from calejo_server.config import Config, load_config
from calejo_server.engine import Engine, ManualClock, RequestContext
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditQuery, AuditRow, Record, Storage
from tests.server.storage.conftest import (  # the storage tests' fixtures
    postgres_database,
    postgres_server,
    postgres_url,
)

__all__ = ["postgres_database", "postgres_server", "postgres_url"]

BOTH_BACKENDS = pytest.mark.parametrize(
    "database_url",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
    indirect=True,
)

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
CTX = RequestContext(user="alice", source_address="192.0.2.10", protocol="REST")


def pump(pump_id: str, **limits: Any) -> dict[str, Any]:
    """A pump entry: 20-50 Hz, 0.5 Hz/s, failsafe 35, unless told."""
    entry: dict[str, Any] = {
        "pump_id": pump_id,
        "min_value": 20,
        "max_value": 50,
        "max_rate": 0.5,
        "failsafe_value": 35,
    }
    entry.update(limits)
    return entry


def two_stations() -> list[dict[str, Any]]:
    """north (unit 1: p1, p2) and south (unit 2: p1), plain limits."""
    return [
        {"station_id": "north", "pumps": [pump("p1"), pump("p2")]},
        {"station_id": "south", "pumps": [pump("p1", max_rate=math.inf)]},
    ]


class CountingStorage(Storage):
    """The real storage, counting the write() calls made through it."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.writes: list[Sequence[Record]] = []

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def write(self, records: Sequence[Record]) -> None:
        self.writes.append(list(records))
        await self.inner.write(records)

    async def load(self) -> Any:
        return await self.inner.load()

    async def audit_query(self, query: AuditQuery) -> list[AuditRow]:
        return await self.inner.audit_query(query)

    def audit_iter(self, since: dt.datetime | None = None) -> Any:
        return self.inner.audit_iter(since)

    async def audit_verify(self) -> Any:
        return await self.inner.audit_verify()

    async def alerts_query(self, query: Any) -> Any:
        return await self.inner.alerts_query(query)

    def health(self) -> Any:
        return self.inner.health()

    def add_health_listener(self, callback: Any) -> Any:
        return self.inner.add_health_listener(callback)


@dataclasses.dataclass
class Harness:
    """Makes engines on real storage in one data folder."""

    tmp: Path
    clock: ManualClock
    database_url: str | None = None
    made: list[tuple[Engine, Storage]] = dataclasses.field(default_factory=list)
    storage: CountingStorage | None = None
    config: Config | None = None

    def write_config(
        self, stations: list[dict[str, Any]] | None = None, **engine: Any
    ) -> Config:
        document: dict[str, Any] = {
            "server": {"data_dir": str(self.tmp / "data")},
            "database": {"url": self.database_url},
            "engine": {"tick_interval": 0.05, "watchdog_timeout": 60, **engine},
        }
        if stations is not None:
            document["stations"] = stations
        path = self.tmp / "calejo.yaml"
        path.write_text(yaml.safe_dump(document), encoding="utf-8")
        return load_config(path, environ={})

    async def start(self, config: Config | None = None) -> Engine:
        config = config or self.config
        assert config is not None
        self.config = config
        inner = open_storage(config.database.url, config.server.data_dir)
        storage = CountingStorage(inner)
        await storage.open()
        engine = Engine(config, storage, clock=self.clock)
        self.made.append((engine, storage))
        await engine.start()
        self.storage = storage
        return engine

    async def restart(self, engine: Engine) -> Engine:
        await self.stop(engine)
        return await self.start()

    async def stop(self, engine: Engine) -> None:
        for index, (made, storage) in enumerate(self.made):
            if made is engine:
                await engine.stop()
                await storage.close()
                del self.made[index]
                return

    async def audit(self, event_type: str | None = None) -> list[AuditRow]:
        assert self.storage is not None
        return await self.storage.audit_query(
            AuditQuery(event_type=event_type, limit=1000)
        )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data folder) unless parametrised "postgresql"."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def harness(tmp_path: Path, database_url: str | None) -> AsyncIterator[Harness]:
    made = Harness(tmp=tmp_path, clock=ManualClock(START), database_url=database_url)
    yield made
    for engine, storage in reversed(made.made):
        await engine.stop()
        await storage.close()


MakeEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
def make_engine(harness: Harness) -> MakeEngine:
    """Start an engine over the stations given (default: two_stations())."""

    async def make(
        stations: list[dict[str, Any]] | None = None, **engine: Any
    ) -> Engine:
        config = harness.write_config(
            two_stations() if stations is None else stations, **engine
        )
        return await harness.start(config)

    return make
