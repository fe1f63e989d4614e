"""The one storage interface, and the records that cross it.

The control engine and the security layer keep the live state in memory;
storage makes each change durable and gives it back at start-up. Every
change is a record; :meth:`Storage.write` makes a sequence of records
durable, in order and atomically, before it returns: in the database when
the database answers, else in the local spool, from which it is delivered
once when the database is back.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

Severity = Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]
SEVERITIES: tuple[Severity, ...] = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
EmergencyStopLevel = Literal["system", "station", "pump"]
HealthState = Literal["ok", "degraded", "down"]

logger = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.UTC)


def new_uid() -> str:
    """A unique key for a record, so a redelivered record lands once.

    A time-ordered (version 7) UUID in hex: 48 bits of Unix time in
    milliseconds, then 74 random bits. Records written together get keys
    that sit together in the unique index, so a commit of many audit
    rows changes one or two of its pages rather than one page per row.
    """
    millis = time.time_ns() // 1_000_000
    bits = _UID_RANDOM.getrandbits(80)
    bits = (bits & ~_UID_MARK_MASK) | _UID_MARKS
    return (millis << 80 | bits).to_bytes(16, "big").hex()


_UID_RANDOM = random.Random(os.urandom(32))
"""The random part of record keys: they must not collide, not be secret,
so a generator seeded once from the system's randomness serves (one
system call per key would cost more than the rest of a record)."""
_UID_MARK_MASK = 0xF000_C000_0000_0000_0000
_UID_MARKS = 0x7000_8000_0000_0000_0000
"""The version (7) and variant (RFC 9562) bits within the last 80 bits."""


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRecord:
    """One row of the tamper-evident audit log, before it is chained."""

    event_type: str
    severity: Severity
    timestamp: dt.datetime = dataclasses.field(default_factory=utcnow)
    user: str | None = None
    source_address: str | None = None
    protocol: str | None = None
    station_id: str | None = None
    pump_id: str | None = None
    old_value: str | None = None
    new_value: str | None = None
    outcome: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    uid: str = dataclasses.field(default_factory=new_uid)


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRow:
    """An audit record as stored: with its id and place in the chain."""

    id: int
    record: AuditRecord
    prev_hash: str
    hash: str


@dataclasses.dataclass(frozen=True, slots=True)
class SetpointRecord:
    """The latest setpoint of one pump (one row per pump, replaced)."""

    station_id: str
    pump_id: str
    requested: float | None
    target: float
    applied: float
    outcome: str
    source: str
    user: str | None
    at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class PlanRecord:
    """One version of an optimizer plan (one row per plan id, replaced)."""

    plan_id: str
    version: int
    received_at: dt.datetime
    body: dict[str, Any]
    user: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class EmergencyStopRecord:
    """The state of one emergency stop (one row per level and scope)."""

    level: EmergencyStopLevel
    station_id: str | None
    pump_id: str | None
    active: bool
    reason: str
    operator: str
    at: dt.datetime
    since: dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class StationStateRecord:
    """What the watchdog needs after a restart (one row per station)."""

    station_id: str
    last_fresh_at: dt.datetime | None
    failsafe: bool


@dataclasses.dataclass(frozen=True, slots=True)
class StationRecord:
    """A station's definition (pumps and limits) kept in the database."""

    station_id: str
    definition: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    username: str
    email: str
    role: str
    password_hash: str
    active: bool
    must_change_password: bool
    failed_logins: int
    locked_until: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class RoleRecord:
    role: str
    permissions: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class AlertRecord:
    """One alert and what became of its deliveries (one row per alert, replaced).

    ``repeat_count`` counts the repeats suppressed into this alert after it
    was raised; ``deliveries`` maps each channel to its status and attempts
    (see :mod:`calejo_server.alerts`).
    """

    alert_id: str
    kind: str
    severity: Severity
    summary: str
    station_id: str | None
    pump_id: str | None
    first_raised: dt.datetime
    last_raised: dt.datetime
    repeat_count: int
    details: dict[str, Any]
    deliveries: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class AlertRow:
    """An alert as stored, with its place in the order alerts were raised."""

    seq: int
    record: AlertRecord


@dataclasses.dataclass(frozen=True, slots=True)
class AlertQuery:
    """Filters for reading alerts, newest first; all optional.

    ``since`` keeps alerts last raised at or after it; ``before_seq`` pages
    back from the previous page's last ``seq``.
    """

    severity: Severity | None = None
    kind: str | None = None
    since: dt.datetime | None = None
    station_id: str | None = None
    before_seq: int | None = None
    limit: int = 100


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRecord:
    """A bearer token, by the SHA-256 of its secret; never the secret."""

    token_hash: str
    user_id: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked: bool


Record = (
    AuditRecord
    | SetpointRecord
    | PlanRecord
    | EmergencyStopRecord
    | StationStateRecord
    | StationRecord
    | UserRecord
    | RoleRecord
    | TokenRecord
    | AlertRecord
)


@dataclasses.dataclass(slots=True)
class Snapshot:
    """Everything the adapter reloads at start-up."""

    users: list[UserRecord]
    roles: list[RoleRecord]
    tokens: list[TokenRecord]
    setpoints: list[SetpointRecord]
    plans: list[PlanRecord]
    emergency_stops: list[EmergencyStopRecord]
    station_states: list[StationStateRecord]
    stations: list[StationRecord]


@dataclasses.dataclass(slots=True)
class StorageHealth:
    state: HealthState
    backend: str
    detail: str
    spooled: int = 0
    errors: int = 0
    last_error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters for reading the audit log; all optional."""

    severity: Severity | None = None
    event_type: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    station_id: str | None = None
    user: str | None = None
    after_id: int = 0
    limit: int = 100


@dataclasses.dataclass(frozen=True, slots=True)
class ChainVerdict:
    """The result of walking the audit chain."""

    ok: bool
    checked: int
    first_bad_id: int | None = None
    reason: str | None = None


HealthListener = Callable[[StorageHealth], None]
"""Called with the new health on each change of state (ok, degraded, down)."""


class StorageError(Exception):
    """Storage could not do what was asked (and nothing was written)."""


class Storage(abc.ABC):
    """Durable state and audit log of one adapter."""

    backend: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, apply pending migrations, deliver any spooled records."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush what is pending and release connections and files."""

    @abc.abstractmethod
    async def write(self, records: Sequence[Record]) -> None:
        """Make ``records`` durable, in order and all together.

        Returns only once they are committed to the database or, while
        the database is unreachable, fsynced to the local spool.
        """

    @abc.abstractmethod
    async def load(self) -> Snapshot:
        """Everything needed to resume after a restart."""

    @abc.abstractmethod
    async def audit_query(self, query: AuditQuery) -> list[AuditRow]:
        """Audit rows matching ``query``, oldest first, after ``after_id``."""

    @abc.abstractmethod
    def audit_iter(self, since: dt.datetime | None = None) -> AsyncIterator[AuditRow]:
        """All audit rows from ``since`` (or the first), oldest first."""

    @abc.abstractmethod
    async def audit_verify(self) -> ChainVerdict:
        """Walk the whole chain; name the first row that breaks it."""

    @abc.abstractmethod
    async def alerts_query(self, query: AlertQuery) -> list[AlertRow]:
        """Alerts matching ``query``, newest first, before ``before_seq``."""

    @abc.abstractmethod
    def health(self) -> StorageHealth:
        """Current state, without touching the database."""

    def add_health_listener(self, callback: HealthListener) -> Callable[[], None]:
        """Call ``callback`` on each change of health state; returns a remover.

        Callbacks run in the event loop, synchronously, and must not block.
        """
        listeners: list[HealthListener] = self.__dict__.setdefault(
            "_health_listeners", []
        )
        listeners.append(callback)

        def remove() -> None:
            if callback in listeners:
                listeners.remove(callback)

        return remove

    def _notify_health(self, health: StorageHealth) -> None:
        """Tell every health listener about ``health``; a failing one is logged."""
        for callback in list(self.__dict__.get("_health_listeners", ())):
            try:
                callback(health)
            except Exception:
                logger.exception("storage health listener %r failed", callback)
