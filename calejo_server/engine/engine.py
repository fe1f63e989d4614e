"""The control engine: the one owner of live state.

One :class:`calejo_core.gate.Gate` holds every pump of every station (pump
index = order across stations, stations in configuration order), and one
:class:`calejo_core.codecs.StationImage` per station holds what Modbus
clients read. The engine is the only writer of both.

A tick every ``engine.tick_interval`` seconds advances the ramps, writes
the images (one C loop over all pumps), the heartbeat (+1 each second)
and the station status bits, applies plan intervals that begin, and runs
the watchdog. It does no Python work per pump except for pumps whose plan
interval changes.

Every write (setpoint, plan, emergency stop, clear) changes the gate and
the images at once and is durable (``storage.write`` awaited) before it
returns; what the tick itself does (failsafe, plan intervals) is written
by a background writer in the order it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import heapq
import logging
import math
import numbers
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt

from calejo_core import codecs, gate
from calejo_server import audit
from calejo_server.config import (
    Config,
    ConfigError,
    PumpConfig,
    StationConfig,
    parse_station,
)
from calejo_server.engine import events
from calejo_server.engine.clock import Clock, SystemClock
from calejo_server.engine.errors import (
    EmergencyStopConflict,
    EngineError,
    InvalidRequest,
    PlanConflict,
    PlanError,
    UnknownPump,
    UnknownStation,
)
from calejo_server.engine.events import EngineEvent, EventHub
from calejo_server.engine.feedback import PlcFeedback
from calejo_server.engine.plans import (
    Interval,
    Plan,
    Schedule,
    last_end_for,
    parse_plan,
)
from calejo_server.engine.views import (
    ENGINE_CONTEXT,
    ActiveStop,
    EmergencyStopStatus,
    EngineHealth,
    Outcome,
    PlanView,
    PumpLimitsView,
    PumpView,
    RequestContext,
    SetpointItem,
    SetpointResult,
    StationView,
    StopLevel,
    WatchdogView,
)
from calejo_server.storage.base import (
    AuditRecord,
    EmergencyStopRecord,
    PlanRecord,
    Record,
    SetpointRecord,
    Severity,
    Snapshot,
    StationStateRecord,
    Storage,
    StorageHealth,
)

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

OUTCOME_NAMES: Final[tuple[Outcome, ...]] = (
    "accepted",
    "clamped",
    "rejected",
    "blocked",
)
LEVELS: Final[tuple[StopLevel, ...]] = ("system", "station", "pump")
PLAN_RETENTION: Final = 86400.0
"""Seconds an ended plan stays held (and listed) before it is let go."""
CHECKPOINT_RATE: Final = 200
"""Setpoint records per second, at most, that keep ramps' progress durable."""
CHECKPOINT: Final = "checkpoint"
"""The source of a setpoint record written for a pump never given one."""
MAX_PENDING: Final = 1_000_000
"""Records the background writer holds while storage refuses them."""
FRESHNESS_STORE_INTERVAL: Final = 1.0
"""Seconds a station's stored last-fresh time may lag a stream of setpoints."""

_STATUS_ESTOP = gate.STATUS_EMERGENCY_STOP
_STATUS_FAILSAFE = gate.STATUS_FAILSAFE
_STATUS_CLAMPED = gate.STATUS_CLAMPED
_STATUS_RAMPING = gate.STATUS_RAMPING
_STATUS_REJECTED = gate.STATUS_REJECTED

Identity = tuple[str, int, int]
_ALL: Final = slice(None)
"""(plan_id, version, interval index): the interval a pump follows."""


@dataclasses.dataclass(frozen=True, slots=True)
class _StationViews:
    """One station's part of the gate's arrays, sliced once."""

    applied: npt.NDArray[np.float64]
    status: npt.NDArray[np.uint16]
    target: npt.NDArray[np.float64]
    outcome: npt.NDArray[np.uint8]
    last_set: npt.NDArray[np.float64]
    ages: npt.NDArray[np.float64]
    """Written at each refresh: seconds since each pump's last setpoint."""


@dataclasses.dataclass(slots=True)
class _Station:
    index: int
    config: StationConfig
    first: int
    count: int
    image: codecs.StationImage
    pumps: dict[str, int]
    last_fresh: float = -math.inf
    last_fresh_at: dt.datetime | None = None
    failsafe: bool = False
    plan_stale: bool = True
    pump_stops: int = 0
    status_bits: int = -1
    views: _StationViews | None = None
    """The station's slices of the gate's arrays, when those are views."""
    stored_fresh_at: dt.datetime | None = None
    stored_failsafe: bool | None = None
    """What the station's last state record holds (None before the first)."""

    @property
    def station_id(self) -> str:
        return self.config.station_id

    @property
    def span(self) -> range:
        return range(self.first, self.first + self.count)


@dataclasses.dataclass(slots=True)
class _Stop:
    level: StopLevel
    station_id: str | None
    pump_id: str | None
    since: dt.datetime
    reason: str
    operator: str

    def view(self) -> ActiveStop:
        return ActiveStop(
            level=self.level,
            station_id=self.station_id,
            pump_id=self.pump_id,
            since=self.since,
            reason=self.reason,
            operator=self.operator,
        )


StopKey = tuple[StopLevel, str | None, str | None]


class Engine:
    """The live state of every station and pump, behind the safety gate.

    Reads are synchronous and served from memory; writes are coroutines
    that return once the change is durable. ``clock`` defaults to the
    machine's clocks; tests pass a :class:`ManualClock`.
    """

    def __init__(
        self, config: Config, storage: Storage, *, clock: Clock | None = None
    ) -> None:
        self._config = config
        self._storage = storage
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._events = EventHub()
        self._watchers: list[Callable[[int], None]] = []
        self._tick_interval = config.engine.tick_interval
        self._timeout = config.engine.watchdog_timeout

        self._stations: list[_Station] = []
        self._by_id: dict[str, _Station] = {}
        self._images: dict[int, codecs.StationImage] = {}
        self._images_view = types.MappingProxyType(self._images)
        self._pump_station: list[_Station] = []
        self._pump_config: list[PumpConfig] = []
        self._gate = gate.Gate([], None, 0.0)
        self._image_set = codecs.ImageSet([])
        self._arrays_are_views = False
        self._cached: tuple[Any, Any, Any, Any] = (None, None, None, None)

        self._last_set = np.empty(0, dtype=np.float64)
        self._last_set_at: list[dt.datetime | None] = []
        self._records: list[SetpointRecord | None] = []
        self._persisted = np.empty(0, dtype=np.float64)
        self._requested = np.zeros(0, dtype=bool)
        self._ages = np.empty(0, dtype=np.float64)

        self._stops: dict[StopKey, _Stop] = {}
        self._schedule = Schedule()
        self._following: list[Identity | None] = []
        self._due: list[tuple[float, int, int, int]] = []
        self._due_generation: dict[int, int] = {}
        self._due_counter = 0

        self._storage_degraded = False
        self._remove_listener: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

        self._pending: list[Record] = []
        self._writer: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._started = False
        self._running = False
        self._origin = 0.0
        self._heartbeat = 0
        self._seconds = -1
        self._ramping = 0
        self._images_dirty = True
        self._watchdog_due = math.inf
        self._checkpoint_from = 0
        self._checkpoint_batch = max(
            1, math.ceil(CHECKPOINT_RATE * config.engine.tick_interval)
        )

        self._ticks = 0
        self._last_tick_at: dt.datetime | None = None
        self._last_tick_loop = 0.0
        self._tick_lag = 0.0
        self._max_tick_lag = 0.0
        self._tick_duration = 0.0
        self._feedback = PlcFeedback(
            config.modbus.plc_heartbeat_timeout,
            self._clock,
            self._queue,
            self._events.emit,
        )

    # ------------------------------------------------------------------
    # life cycle

    async def start(self) -> None:
        """Load the snapshot, restore the state, write the images, start ticking.

        Stations come from the configuration file; when it names none, from
        the database's station records; without a file, the demonstration
        station. Each pump resumes from its last setpoint record without a
        ramp, latched emergency stops are applied before the first tick,
        and a station starts in failsafe unless its last fresh setpoint or
        plan is within the watchdog timeout.
        """
        if self._started:
            return

        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        snapshot = await self._storage.load()
        stations = self._choose_stations(snapshot)

        now = self._clock.monotonic()
        wall = self._clock.utcnow()
        self._build(stations, now)
        self._feedback.build((s.config, s.image) for s in self._stations)

        restored = self._restore_setpoints(snapshot, now, wall)
        self._restore_stops(snapshot, now)
        self._persisted = self._applied_array().copy()
        records = self._restore_watchdog(snapshot, now, wall)
        held = self._restore_plans(snapshot, wall)

        self._listen_to_storage()
        records.append(
            self._audit(
                audit.ADAPTER_STARTED,
                ENGINE_CONTEXT,
                details={
                    "stations": len(self._stations),
                    "pumps": len(self._pump_config),
                    "restored_setpoints": restored,
                    "active_emergency_stops": len(self._stops),
                    "plans": held,
                    "failsafe_stations": [
                        s.station_id for s in self._stations if s.failsafe
                    ],
                },
            )
        )
        await self._write(records)

        self._started = True
        self._running = True
        self.tick()
        self._tick_task = asyncio.create_task(self._run(), name="calejo-engine-tick")
        logger.info(
            "engine started: %d stations, %d pumps, %d setpoints restored, "
            "%d emergency stops latched, %d plans held",
            len(self._stations),
            len(self._pump_config),
            restored,
            len(self._stops),
            held,
        )

    async def stop(self) -> None:
        """Stop ticking, write what is pending and ADAPTER_STOPPED."""
        if not self._running:
            return
        self._running = False

        task, self._tick_task = self._tick_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None

        self._queue(self._checkpoint())
        self._queue([self._audit(audit.ADAPTER_STOPPED, ENGINE_CONTEXT)])
        await self.flush()
        if self._pending:
            logger.error(
                "engine stopped with %d records storage did not accept",
                len(self._pending),
            )
        logger.info("engine stopped")

    async def flush(self) -> None:
        """Wait until every record queued by ticks has been written.

        Once the engine is stopped, gives up after three refused attempts
        (the records stay counted in ``health().pending_records``).
        """
        attempts = 0
        while True:
            writer = self._writer
            if writer is not None and not writer.done():
                await asyncio.shield(writer)
                continue
            if not self._pending:
                return

            attempts += 1
            if not self._running and attempts > 3:
                return
            self._start_writer()
            if self._writer is None:
                return

    def subscribe(
        self,
        callback: Callable[[EngineEvent], None],
        kinds: Iterable[str] | None = None,
    ) -> Callable[[], None]:
        """Call ``callback`` with each event of ``kinds`` (every kind when None).

        Returns the unsubscribe function. Callbacks run synchronously on
        the event loop and must not block.
        """
        return self._events.subscribe(callback, kinds)

    def watch(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(station)`` whenever a request changes what SCADA reads.

        ``station`` is the station's place in configuration order. It runs
        synchronously, as soon as a setpoint, plan, emergency stop
        or failsafe has passed the gate and the station's image holds the
        new values, which is before the change is durable; events
        (:meth:`subscribe`) come after. Ramps moved by the tick do not call
        it. It must not block; returns the function that removes it.
        """
        self._watchers.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._watchers.remove(callback)

        return remove

    # ------------------------------------------------------------------
    # reads

    @property
    def images(self) -> Mapping[int, codecs.StationImage]:
        """Register image per Modbus unit id (filled at start)."""
        return self._images_view

    @property
    def heartbeat(self) -> int:
        """The adapter heartbeat: +1 each second since start, modulo 65536."""
        return self._heartbeat

    @property
    def gate(self) -> gate.Gate:
        """The gate itself, for readers that need its arrays (read-only)."""
        return self._gate

    @property
    def config(self) -> Config:
        return self._config

    def stations(self) -> list[StationView]:
        return [self._station_view(station) for station in self._stations]

    def station(self, station_id: str) -> StationView:
        return self._station_view(self._station(station_id))

    def pump(self, station_id: str, pump_id: str) -> PumpView:
        station = self._station(station_id)
        return self._pump_view(self._pump(station, pump_id))

    def pump_index(self, station_id: str, pump_id: str) -> int:
        """The gate's index of the pump (its place across all stations)."""
        return self._pump(self._station(station_id), pump_id)

    def setpoint_ages(self, pumps: slice = _ALL) -> npt.NDArray[np.float64]:
        """Seconds since each pump's last setpoint, in gate order (NaN: none).

        ``pumps`` picks a range of gate indices (a station's pumps).
        """
        return np.maximum(self._clock.monotonic() - self._last_set[pumps], 0.0)

    def plan_ids(self, pumps: slice = _ALL) -> list[str | None]:
        """The plan each pump follows now, in gate order (None: no plan)."""
        return [None if held is None else held[0] for held in self._following[pumps]]

    def plans(self) -> list[PlanView]:
        now_ts = self._clock.utcnow().timestamp()
        return [plan.view(now_ts) for plan in self._schedule.plans()]

    def emergency_stop_status(self, station_id: str) -> EmergencyStopStatus:
        station = self._station(station_id)
        stops = [
            stop
            for key, stop in self._stops.items()
            if key[0] == "system" or key[1] == station.station_id
        ]
        return _stop_status(stops)

    def pump_emergency_stop_status(
        self, station_id: str, pump_id: str
    ) -> EmergencyStopStatus:
        station = self._station(station_id)
        self._pump(station, pump_id)
        stops = [
            stop
            for key, stop in self._stops.items()
            if key[0] == "system"
            or (key[0] == "station" and key[1] == station.station_id)
            or (key[1] == station.station_id and key[2] == pump_id)
        ]
        return _stop_status(stops)

    def system_emergency_stop(self) -> EmergencyStopStatus:
        return _stop_status(list(self._stops.values()))

    def health(self) -> EngineHealth:
        loop_now = time.monotonic()
        late = loop_now - self._last_tick_loop if self._ticks else math.inf
        status: Literal["ok", "degraded", "down"]
        if not self._running or late > max(5 * self._tick_interval, 2.0):
            status = "down"
        elif self._storage_degraded or self._tick_lag > self._tick_interval:
            status = "degraded"
        else:
            status = "ok"

        now = self._clock.monotonic()
        watchdogs = tuple(
            WatchdogView(
                station_id=station.station_id,
                failsafe=station.failsafe,
                last_fresh_at=station.last_fresh_at,
                age=(now - station.last_fresh) if station.last_fresh_at else None,
                timeout=self._timeout,
            )
            for station in self._stations
        )
        return EngineHealth(
            status=status,
            running=self._running,
            ticks=self._ticks,
            last_tick_at=self._last_tick_at,
            tick_interval=self._tick_interval,
            tick_lag=self._tick_lag,
            max_tick_lag=self._max_tick_lag,
            tick_duration=self._tick_duration,
            heartbeat=self._heartbeat,
            storage="degraded" if self._storage_degraded else "ok",
            stations=watchdogs,
            pending_records=len(self._pending),
        )

    # ------------------------------------------------------------------
    # setpoints

    async def set_setpoint(
        self, station_id: str, pump_id: str, value: object, ctx: RequestContext
    ) -> SetpointResult:
        """Pass ``value`` through the gate for one pump; durable on return.

        Raises UnknownStation or UnknownPump. Any other bad value is the
        gate's "rejected" outcome, audited and answered, not raised.
        """
        station = self._station(station_id)
        pump = self._pump(station, pump_id)

        now = self._clock.monotonic()
        wall = self._clock.utcnow()
        records: list[Record] = []
        changes: list[EngineEvent] = []
        result = self._request(pump, value, ctx, now, wall, records, changes)

        self._gate.tick(now)
        self._refresh_station(station, now)
        await self._write(records)
        self._emit_all(changes)
        return result

    async def set_setpoints(
        self, items: Sequence[SetpointItem], ctx: RequestContext
    ) -> list[SetpointResult]:
        """Many setpoints at once: one outcome each, one durable write.

        An item naming an unknown station or pump is answered "rejected"
        (and audited); the others go ahead.
        """
        now = self._clock.monotonic()
        wall = self._clock.utcnow()
        records: list[Record] = []
        changes: list[EngineEvent] = []
        results: list[SetpointResult] = []
        touched: dict[int, _Station] = {}
        fresh: dict[int, _Station] = {}

        for item in items:
            try:
                station = self._station(item.station_id)
                pump = self._pump(station, item.pump_id)
            except (UnknownStation, UnknownPump) as exc:
                results.append(self._unknown(item, str(exc), ctx, wall, records))
                continue
            result = self._request(
                pump, item.value, ctx, now, wall, records, changes, state=False
            )
            results.append(result)
            touched[station.index] = station
            if result.outcome != "rejected":
                fresh[station.index] = station

        self._gate.tick(now)
        for station in touched.values():
            self._refresh_station(station, now)
        for station in fresh.values():
            if self._state_due(station):
                records.append(self._station_state(station))
        await self._write(records)
        self._emit_all(changes)
        return results

    def _request(
        self,
        pump: int,
        value: object,
        ctx: RequestContext,
        now: float,
        wall: dt.datetime,
        records: list[Record],
        changes: list[EngineEvent],
        *,
        state: bool = True,
        source: str | None = None,
        plan: tuple[Plan, int, Interval] | None = None,
    ) -> SetpointResult:
        station = self._pump_station[pump]
        station_id = station.config.station_id
        config = self._pump_config[pump]
        pump_id = config.pump_id
        old_target = self._target_array().item(pump)

        code = self._gate.request(pump, value, now)
        outcome = OUTCOME_NAMES[code]
        target = self._target_array().item(pump)
        applied = self._applied_array().item(pump)
        requested = _requested(value)
        finite = requested is not None and math.isfinite(requested)
        detail = self._detail(pump, value, requested, code, target)
        result = SetpointResult(
            station_id, pump_id, outcome, requested, target, applied, detail
        )

        if plan is not None:
            event_type = audit.PLAN_SETPOINT_APPLIED
        elif code == gate.REJECTED:
            event_type = audit.SETPOINT_REJECTED
        elif code == gate.BLOCKED:
            event_type = audit.SETPOINT_BLOCKED
        else:
            event_type = audit.SETPOINT_CHANGED

        details: dict[str, Any] = {
            "requested": requested if finite else _shown(value),
            "applied": applied,
            "units": config.units,
        }
        if detail is not None:
            details["detail"] = detail
        if plan is not None:
            held, index, interval = plan
            details.update(
                plan_id=held.plan_id,
                version=held.version,
                interval=index,
                start=interval.start.isoformat(),
                end=interval.end.isoformat(),
            )
        records.append(
            AuditRecord(
                event_type,
                audit.severity_of(event_type),
                wall,
                ctx.user,
                ctx.source_address,
                ctx.protocol,
                station_id,
                pump_id,
                repr(old_target),
                repr(target),
                outcome,
                details,
            )
        )
        self._requested[pump] = True
        if code == gate.REJECTED:
            return result

        self._last_set[pump] = now
        self._last_set_at[pump] = wall
        record = SetpointRecord(
            station_id,
            pump_id,
            requested if finite else None,
            target,
            applied,
            outcome,
            source or ctx.protocol,
            ctx.user,
            wall,
        )
        self._records[pump] = record
        self._persisted[pump] = applied
        records.append(record)
        if plan is None:
            self._refresh_watchdog(station, now, wall, ctx, records, changes)
            if state and self._state_due(station):
                records.append(self._station_state(station))

        if self._events.wants(events.SETPOINT):
            changes.append(
                EngineEvent(
                    kind=events.SETPOINT,
                    severity=audit.severity_of(event_type),
                    station_id=station_id,
                    pump_id=pump_id,
                    message=f"setpoint {outcome} for pump {pump_id} at "
                    f"station {station_id}: target {target:g} {config.units}",
                    at=wall,
                    details={
                        "outcome": outcome,
                        "target": target,
                        "applied": applied,
                        "source": source or ctx.protocol,
                    },
                )
            )
        return result

    def _unknown(
        self,
        item: SetpointItem,
        detail: str,
        ctx: RequestContext,
        wall: dt.datetime,
        records: list[Record],
    ) -> SetpointResult:
        requested = _requested(item.value)
        records.append(
            self._audit(
                audit.SETPOINT_REJECTED,
                ctx,
                station_id=_clip(item.station_id),
                pump_id=_clip(item.pump_id),
                outcome="rejected",
                details={"detail": detail, "requested": _shown(item.value)},
                at=wall,
            )
        )
        return SetpointResult(
            station_id=item.station_id,
            pump_id=item.pump_id,
            outcome="rejected",
            requested=requested,
            target=None,
            applied=None,
            detail=detail,
        )

    def _detail(
        self,
        pump: int,
        value: object,
        requested: float | None,
        code: int,
        target: float,
    ) -> str | None:
        if code == gate.ACCEPTED:
            return None

        config = self._pump_config[pump]
        station = self._pump_station[pump]
        where = f"pump {config.pump_id} at station {station.station_id}"
        units = config.units

        if code == gate.REJECTED:
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if requested is None and not real:
                what = f"value {_shown(value)} is not a number"
            elif requested is None:
                what = f"value {_shown(value)} is not a finite number"
            else:
                what = f"value {requested!r} is not a finite number"
            return f"{what}; the target of {where} stays {target:g} {units}"

        if code == gate.CLAMPED:
            assert requested is not None
            if requested > config.max_value:
                bound = f"above the maximum {config.max_value:g} {units}"
            else:
                bound = f"below the minimum {config.min_value:g} {units}"
            return (
                f"value {requested:g} {units} is {bound} of {where}; "
                f"target set to {target:g} {units}"
            )

        level = self._covering_level(pump) or "pump"
        return (
            f"an emergency stop ({level} level) covers {where}; target recorded "
            f"as {target:g} {units}, applied stays at {config.stop_value:g} {units}"
        )

    # ------------------------------------------------------------------
    # plans

    async def submit_plan(self, plan: dict[str, Any], ctx: RequestContext) -> PlanView:
        """Check, hold and persist an optimizer plan; durable on return.

        Raises PlanError (the field named), UnknownStation/UnknownPump,
        or PlanConflict when the plan id is held at the same or a newer
        version. Intervals already covering now apply at once; the plan
        refreshes the watchdog of every station it names.
        """
        wall = self._clock.utcnow()
        now = self._clock.monotonic()
        try:
            parsed = parse_plan(
                plan, self._resolve, now=wall, received_at=wall, user=ctx.user
            )
            held = self._schedule.get(parsed.plan_id)
            if held is not None and parsed.version <= held.version:
                raise PlanConflict(parsed.plan_id, parsed.version, held.version)
        except (PlanError, PlanConflict, UnknownStation, UnknownPump) as exc:
            await self._write([self._plan_rejected(plan, exc, ctx, wall)])
            raise

        previous = self._schedule.add(parsed)
        records: list[Record] = [
            PlanRecord(
                plan_id=parsed.plan_id,
                version=parsed.version,
                received_at=wall,
                body=parsed.body(),
                user=ctx.user,
            )
        ]
        if previous is not None:
            records.append(
                self._audit(
                    audit.PLAN_SUPERSEDED,
                    ctx,
                    old_value=str(previous.version),
                    new_value=str(parsed.version),
                    details={"plan_id": parsed.plan_id},
                    at=wall,
                )
            )
        records.append(
            self._audit(
                audit.PLAN_RECEIVED,
                ctx,
                new_value=str(parsed.version),
                details={
                    "plan_id": parsed.plan_id,
                    "version": parsed.version,
                    "pumps": len(parsed.pumps),
                    "intervals": parsed.interval_count,
                    "start": _iso(parsed.start_ts),
                    "end": _iso(parsed.end_ts),
                },
                at=wall,
            )
        )

        changes: list[EngineEvent] = []
        stations = self._plan_stations(parsed, previous)
        named = {self._pump_station[pump.pump].index for pump in parsed.pumps}
        for station in stations:
            if station.index in named:
                self._refresh_watchdog(station, now, wall, ctx, records, changes)

        now_ts = wall.timestamp()
        repumps = {pump.pump for pump in parsed.pumps}
        if previous is not None:
            repumps.update(pump.pump for pump in previous.pumps)
        for pump in sorted(repumps):
            self._follow(pump, now_ts, now, wall, records, changes)

        self._gate.tick(now)
        for station in stations:
            self._update_stale(station, now_ts)
            self._refresh_station(station, now)
            records.append(self._station_state(station))
        self._prune_plans(now_ts)

        await self._write(records)
        logger.info(
            "plan %s version %d received%s: %d pumps, %d intervals, %s to %s",
            parsed.plan_id,
            parsed.version,
            f" (supersedes version {previous.version})" if previous else "",
            len(parsed.pumps),
            parsed.interval_count,
            _iso(parsed.start_ts),
            _iso(parsed.end_ts),
        )
        changes.append(
            EngineEvent(
                kind=events.PLAN,
                severity=audit.LOW,
                station_id=None,
                pump_id=None,
                message=f"plan {parsed.plan_id} version {parsed.version} received",
                at=wall,
                details={"plan_id": parsed.plan_id, "version": parsed.version},
            )
        )
        self._emit_all(changes)
        return parsed.view(now_ts)

    def _resolve(self, station_id: str, pump_id: str, field: str) -> int:
        station = self._by_id.get(station_id)
        if station is None:
            raise UnknownStation(station_id, f"{field}.station_id")
        pump = station.pumps.get(pump_id)
        if pump is None:
            raise UnknownPump(station_id, pump_id, f"{field}.pump_id")
        return pump

    def _plan_rejected(
        self, body: object, exc: Exception, ctx: RequestContext, wall: dt.datetime
    ) -> AuditRecord:
        plan_id = body.get("plan_id") if isinstance(body, Mapping) else None
        version = body.get("version") if isinstance(body, Mapping) else None
        return self._audit(
            audit.PLAN_REJECTED,
            ctx,
            outcome="rejected",
            details={
                "plan_id": _clip(plan_id) if isinstance(plan_id, str) else None,
                "version": version if isinstance(version, int) else None,
                "field": getattr(exc, "field", None),
                "detail": str(exc)[:500],
            },
            at=wall,
        )

    def _plan_stations(self, plan: Plan, previous: Plan | None) -> list[_Station]:
        indices = {self._pump_station[pump.pump].index for pump in plan.pumps}
        if previous is not None:
            indices.update(
                self._pump_station[pump.pump].index for pump in previous.pumps
            )
        return [self._stations[index] for index in sorted(indices)]

    def _follow(
        self,
        pump: int,
        now_ts: float,
        now: float,
        wall: dt.datetime,
        records: list[Record],
        changes: list[EngineEvent],
    ) -> None:
        """Apply the interval pump ``pump`` should follow now, if it changed."""
        effective = self._schedule.effective(pump, now_ts)
        identity = _identity(effective)
        if identity is not None and identity != self._following[pump]:
            assert effective is not None
            plan, _, interval = effective
            ctx = RequestContext(user=plan.user, source_address=None, protocol="ENGINE")
            self._request(
                pump,
                interval.setpoint,
                ctx,
                now,
                wall,
                records,
                changes,
                state=False,
                source=f"plan:{plan.plan_id}",
                plan=effective,
            )
        self._following[pump] = identity
        self._schedule_pump(pump, now_ts)

    def _schedule_pump(self, pump: int, now_ts: float) -> None:
        self._due_counter += 1
        generation = self._due_counter
        self._due_generation[pump] = generation
        at = self._schedule.next_change(pump, now_ts)
        if at is not None:
            heapq.heappush(self._due, (at, generation, pump, 0))

    def _update_stale(self, station: _Station, now_ts: float) -> None:
        newest = self._schedule.newest_for(station.span)
        end = last_end_for(newest, station.span) if newest is not None else None
        stale = end is None or end <= now_ts
        if stale != station.plan_stale:
            station.plan_stale = stale
            logger.info(
                "station %s: plan %s",
                station.station_id,
                "stale (no interval covers now or later)" if stale else "current",
            )

        key = -1 - station.index
        self._due_counter += 1
        self._due_generation[key] = self._due_counter
        if end is not None and not stale:
            heapq.heappush(self._due, (end, self._due_counter, key, 0))

    def _run_plans(self, now_ts: float, now: float, wall: dt.datetime) -> None:
        records: list[Record] = []
        changes: list[EngineEvent] = []
        touched: dict[int, _Station] = {}

        for _ in range(len(self._due) + 1):
            if not self._due or self._due[0][0] > now_ts:
                break
            _, generation, key, _ = heapq.heappop(self._due)
            if self._due_generation.get(key) != generation:
                continue
            if key < 0:
                station = self._stations[-1 - key]
                self._update_stale(station, now_ts)
            else:
                station = self._pump_station[key]
                self._follow(key, now_ts, now, wall, records, changes)
            touched[station.index] = station

        if not touched:
            return
        if records:
            self._gate.tick(now)
        for station in touched.values():
            self._refresh_station(station, now)
        self._queue(records)
        self._emit_all(changes)

    def _prune_plans(self, now_ts: float) -> None:
        newest = {
            id(plan)
            for station in self._stations
            if (plan := self._schedule.newest_for(station.span)) is not None
        }
        for plan in self._schedule.plans():
            if plan.end_ts + PLAN_RETENTION < now_ts and id(plan) not in newest:
                self._schedule.remove(plan.plan_id)

    # ------------------------------------------------------------------
    # emergency stops

    async def emergency_stop(
        self,
        level: str,
        station_id: str | None,
        pump_id: str | None,
        reason: str,
        operator: str,
        ctx: RequestContext,
    ) -> EmergencyStopStatus:
        """Latch an emergency stop at ``level`` (system, station or pump).

        The covered pumps go to their stop value at once, with no ramp;
        durable before return. Activating an active stop answers its
        status (audited again), not an error.
        """
        key, station, pump = self._stop_scope(level, station_id, pump_id)
        reason, operator = _stop_text(reason, operator)
        wall = self._clock.utcnow()
        now = self._clock.monotonic()

        existing = self._stops.get(key)
        if existing is not None:
            await self._write(
                [
                    self._audit(
                        audit.EMERGENCY_STOP_ACTIVATED,
                        ctx,
                        station_id=key[1],
                        pump_id=key[2],
                        outcome="already_active",
                        details={
                            "level": key[0],
                            "reason": reason,
                            "operator": operator,
                            "since": existing.since.isoformat(),
                        },
                        at=wall,
                    )
                ]
            )
            return self._scope_status(key)

        stop = _Stop(key[0], key[1], key[2], wall, reason, operator)
        self._stops[key] = stop
        self._apply_stop(key, station, pump, True, now)
        records: list[Record] = [
            EmergencyStopRecord(
                level=key[0],
                station_id=key[1],
                pump_id=key[2],
                active=True,
                reason=reason,
                operator=operator,
                at=wall,
                since=wall,
            ),
            self._audit(
                audit.EMERGENCY_STOP_ACTIVATED,
                ctx,
                station_id=key[1],
                pump_id=key[2],
                outcome="activated",
                details={"level": key[0], "reason": reason, "operator": operator},
                at=wall,
            ),
        ]
        await self._write(records)

        scope = _scope_text(key)
        logger.warning(
            "EMERGENCY STOP activated (%s) by %s: %s", scope, operator, reason
        )
        self._emit(
            events.EMERGENCY_STOP,
            audit.CRITICAL,
            key[1],
            key[2],
            f"emergency stop activated ({scope}) by {operator}: {reason}",
            wall,
            {"level": key[0], "reason": reason, "operator": operator},
        )
        return self._scope_status(key)

    async def clear_emergency_stop(
        self,
        level: str,
        station_id: str | None,
        pump_id: str | None,
        reason: str,
        operator: str,
        ctx: RequestContext,
    ) -> EmergencyStopStatus:
        """Clear the stop at exactly ``level`` and scope; others stay latched.

        The pumps it covered (and no other stop covers) ramp up from their
        stop value. Raises EmergencyStopConflict when that stop is not
        active.
        """
        key, station, pump = self._stop_scope(level, station_id, pump_id)
        reason, operator = _stop_text(reason, operator)
        if key not in self._stops:
            raise EmergencyStopConflict(
                f"expected an active emergency stop ({_scope_text(key)}) to clear, "
                "got none active"
            )

        wall = self._clock.utcnow()
        now = self._clock.monotonic()
        stop = self._stops.pop(key)
        self._apply_stop(key, station, pump, False, now)
        records: list[Record] = [
            EmergencyStopRecord(
                level=key[0],
                station_id=key[1],
                pump_id=key[2],
                active=False,
                reason=reason,
                operator=operator,
                at=wall,
                since=None,
            ),
            self._audit(
                audit.EMERGENCY_STOP_CLEARED,
                ctx,
                station_id=key[1],
                pump_id=key[2],
                outcome="cleared",
                details={
                    "level": key[0],
                    "reason": reason,
                    "operator": operator,
                    "since": stop.since.isoformat(),
                    "activated_by": stop.operator,
                },
                at=wall,
            ),
        ]
        await self._write(records)

        scope = _scope_text(key)
        logger.warning("emergency stop cleared (%s) by %s: %s", scope, operator, reason)
        self._emit(
            events.EMERGENCY_STOP_CLEARED,
            audit.HIGH,
            key[1],
            key[2],
            f"emergency stop cleared ({scope}) by {operator}: {reason}",
            wall,
            {"level": key[0], "reason": reason, "operator": operator},
        )
        return self._scope_status(key)

    def _stop_scope(
        self, level: str, station_id: str | None, pump_id: str | None
    ) -> tuple[StopKey, _Station | None, int | None]:
        if level == "system":
            return ("system", None, None), None, None

        if level == "station":
            if station_id is None:
                raise InvalidRequest(
                    "expected a station id for a station-level stop, got none",
                    "station_id",
                )
            station = self._station(station_id)
            return ("station", station.station_id, None), station, None

        if level == "pump":
            if station_id is None or pump_id is None:
                raise InvalidRequest(
                    "expected a station id and a pump id for a pump-level stop",
                    "pump_id",
                )
            station = self._station(station_id)
            pump = self._pump(station, pump_id)
            return ("pump", station.station_id, pump_id), station, pump

        raise InvalidRequest(
            f"expected one of system, station, pump, got {_shown(level)}", "level"
        )

    def _apply_stop(
        self,
        key: StopKey,
        station: _Station | None,
        pump: int | None,
        active: bool,
        now: float,
    ) -> None:
        if key[0] == "system":
            self._gate.set_system_stop(active, now)
            touched = self._stations
        elif key[0] == "station":
            assert station is not None
            self._gate.set_station_stop(station.index, active, now)
            touched = [station]
        else:
            assert station is not None and pump is not None
            self._gate.set_pump_stop(pump, active, now)
            station.pump_stops += 1 if active else -1
            touched = [station]

        for each in touched:
            self._write_coils(each)
            self._refresh_station(each, now)

    def _write_coils(self, station: _Station) -> None:
        own = np.zeros(station.count, dtype=np.uint8)
        for key in self._stops:
            if key[0] == "pump" and key[1] == station.station_id:
                own[station.pumps[key[2] or ""] - station.first] = 1
        station.image.set_emergency_stops(
            ("system", None, None) in self._stops,
            ("station", station.station_id, None) in self._stops,
            own,
        )

    def _scope_status(self, key: StopKey) -> EmergencyStopStatus:
        if key[0] == "system":
            return self.system_emergency_stop()
        if key[0] == "station":
            assert key[1] is not None
            return self.emergency_stop_status(key[1])
        assert key[1] is not None and key[2] is not None
        return self.pump_emergency_stop_status(key[1], key[2])

    def _covering_level(self, pump: int) -> StopLevel | None:
        station = self._pump_station[pump]
        if ("system", None, None) in self._stops:
            return "system"
        if ("station", station.station_id, None) in self._stops:
            return "station"
        if ("pump", station.station_id, self._pump_config[pump].pump_id) in self._stops:
            return "pump"
        return None

    # ------------------------------------------------------------------
    # PLC writes over Modbus (calejo_server.engine.feedback)

    def write_feedback(
        self,
        unit: int,
        kind: int,
        address: int,
        values: npt.NDArray[np.uint16],
        ctx: RequestContext,
    ) -> int:
        """Check a PLC's write to a station image: 0 to store, else the
        Modbus exception code (03 for a bad value; audited, nothing stored)."""
        return self._feedback.write(unit, kind, address, values, ctx)

    def audit_refusal(
        self, event_type: str, ctx: RequestContext, detail: str, **details: Any
    ) -> bool:
        """Audit a refused connection or request, rate-limited per source;
        True when it got a record of its own."""
        return self._feedback.refuse(event_type, ctx, detail, **details)

    def plc_heartbeat_lost(self) -> list[str]:
        """The stations whose PLC heartbeat stands still past its timeout."""
        return self._feedback.lost_stations()

    # ------------------------------------------------------------------
    # the tick

    def tick(self) -> None:
        """One tick, now: ramps, images, heartbeat, plans, watchdog.

        The tick task calls it every ``tick_interval``; tests driving a
        manual clock call it directly. Records it makes are written in the
        background (:meth:`flush` waits for them).
        """
        started = time.perf_counter()
        now = self._clock.monotonic()

        ramping = self._gate.tick(now)
        if ramping or self._ramping or self._images_dirty:
            self._write_images()
        self._ramping = ramping

        seconds = int(now - self._origin)
        if seconds != self._seconds:
            self._second(seconds, now)

        if now >= self._watchdog_due:
            self._run_watchdog(now)

        self._queue(self._checkpoint(self._checkpoint_batch))

        if self._due:
            wall = self._clock.utcnow()
            now_ts = wall.timestamp()
            if self._due[0][0] <= now_ts:
                self._run_plans(now_ts, now, wall)

        self._ticks += 1
        self._last_tick_at = self._clock.utcnow()
        self._last_tick_loop = time.monotonic()
        self._tick_duration = time.perf_counter() - started

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._tick_interval
        due = loop.time() + interval
        while True:
            delay = due - loop.time()
            await asyncio.sleep(max(delay, 0.0))

            woke = loop.time()
            lag = max(woke - due, 0.0)
            self._tick_lag = lag
            self._max_tick_lag = max(self._max_tick_lag, lag)
            try:
                self.tick()
            except Exception:
                logger.exception("engine tick failed; the next tick will retry")

            due += interval
            if due <= woke:
                due = woke + interval

    def _write_images(self) -> None:
        self._image_set.update_pumps(self._applied_array(), self._status_array())
        self._images_dirty = False

    def _second(self, seconds: int, now: float) -> None:
        self._seconds = seconds
        self._heartbeat = seconds % 65536
        for station in self._stations:
            station.image.set_heartbeat(self._heartbeat)
        if self._pump_config:
            np.subtract(now, self._last_set, out=self._ages)
            self._image_set.update_details(
                self._target_array(), self._ages, self._outcome_array()
            )
        self._feedback.second(now)

    def _checkpoint(self, limit: int | None = None) -> list[Record]:
        """Setpoint records for pumps whose applied value moved since written.

        They keep the last request's fields and time, so a restart resumes
        from where a ramp had got to rather than from where it started. At
        most ``limit`` pumps per call, taken in turn from a rotating start.
        """
        applied = self._applied_array()
        changed = np.flatnonzero(applied != self._persisted)
        if not changed.size:
            return []
        if limit is not None and changed.size > limit:
            later = changed[changed >= self._checkpoint_from]
            changed = np.concatenate((later, changed))[:limit]
        self._checkpoint_from = int(changed[-1]) + 1

        wall = self._clock.utcnow()
        records: list[Record] = []
        for pump in changed.tolist():
            value = float(applied[pump])
            base = self._records[pump]
            if base is None:
                station = self._pump_station[pump]
                record = SetpointRecord(
                    station_id=station.station_id,
                    pump_id=self._pump_config[pump].pump_id,
                    requested=None,
                    target=float(self._target_array()[pump]),
                    applied=value,
                    outcome="accepted",
                    source=CHECKPOINT,
                    user=None,
                    at=wall,
                )
            else:
                record = SetpointRecord(
                    base.station_id,
                    base.pump_id,
                    base.requested,
                    base.target,
                    value,
                    base.outcome,
                    base.source,
                    base.user,
                    base.at,
                )
                self._records[pump] = record
            records.append(record)
            self._persisted[pump] = value
        return records

    def _refresh_station(self, station: _Station, now: float) -> None:
        """Write one station's pumps, details, coils and status bits now."""
        views = station.views
        if views is None:
            views = self._station_views(station)

        np.subtract(now, views.last_set, out=views.ages)
        station.image.update_pumps(views.applied, views.status)
        station.image.update_details(views.target, views.ages, views.outcome)
        self._write_status(station)
        self._images_dirty = True
        for callback in self._watchers:
            try:
                callback(station.index)
            except Exception:
                logger.exception("engine watcher %r failed", callback)

    def _station_views(self, station: _Station) -> _StationViews:
        span = slice(station.first, station.first + station.count)
        return _StationViews(
            applied=self._applied_array()[span],
            status=self._status_array()[span],
            target=self._target_array()[span],
            outcome=self._outcome_array()[span],
            last_set=self._last_set[span],
            ages=np.empty(station.count, dtype=np.float64),
        )

    def _write_status(self, station: _Station) -> None:
        bits = 0
        if (
            station.pump_stops
            or ("system", None, None) in self._stops
            or ("station", station.station_id, None) in self._stops
        ):
            bits |= codecs.STATION_ESTOP
        if station.failsafe:
            bits |= codecs.STATION_FAILSAFE
        if station.plan_stale:
            bits |= codecs.STATION_PLAN_STALE
        if self._storage_degraded:
            bits |= codecs.STATION_STORAGE_DEGRADED
        if bits != station.status_bits:
            station.image.set_station_status(bits)
            station.status_bits = bits

    # ------------------------------------------------------------------
    # the watchdog

    def _refresh_watchdog(
        self,
        station: _Station,
        now: float,
        wall: dt.datetime,
        ctx: RequestContext,
        records: list[Record],
        changes: list[EngineEvent],
    ) -> None:
        station.last_fresh = now
        station.last_fresh_at = wall
        self._watchdog_due = min(self._watchdog_due, now + self._timeout)
        if not station.failsafe:
            return

        self._gate.set_failsafe(station.index, False, now)
        station.failsafe = False
        records.append(
            self._audit(
                audit.FAILSAFE_EXITED,
                ctx,
                station_id=station.station_id,
                outcome="exited",
                details={"cause": "fresh setpoint or plan"},
                at=wall,
            )
        )
        logger.info(
            "station %s left failsafe: fresh setpoint or plan (%s)",
            station.station_id,
            ctx.protocol,
        )
        changes.append(
            EngineEvent(
                kind=events.FAILSAFE_EXITED,
                severity=audit.HIGH,
                station_id=station.station_id,
                pump_id=None,
                message=f"station {station.station_id} left failsafe",
                at=wall,
            )
        )

    def _run_watchdog(self, now: float) -> None:
        wall = self._clock.utcnow()
        records: list[Record] = []
        changes: list[EngineEvent] = []
        due = math.inf

        for station in self._stations:
            if station.failsafe:
                continue
            deadline = station.last_fresh + self._timeout
            if now < deadline:
                due = min(due, deadline)
                continue
            self._enter_failsafe(
                station, now, wall, records, changes, "watchdog timeout"
            )
        self._watchdog_due = due

        if records:
            self._queue(records)
            self._emit_all(changes)

    def _enter_failsafe(
        self,
        station: _Station,
        now: float,
        wall: dt.datetime,
        records: list[Record],
        changes: list[EngineEvent],
        cause: str,
    ) -> None:
        self._gate.set_failsafe(station.index, True, now)
        station.failsafe = True
        self._refresh_station(station, now)
        last = station.last_fresh_at.isoformat() if station.last_fresh_at else None
        message = (
            f"station {station.station_id} entered failsafe: no setpoint or plan "
            f"within {self._timeout:g} s ({cause}; last fresh {last or 'never'})"
        )
        records.append(self._station_state(station))
        records.append(
            self._audit(
                audit.FAILSAFE_ENTERED,
                ENGINE_CONTEXT,
                station_id=station.station_id,
                outcome="entered",
                details={
                    "cause": cause,
                    "timeout": self._timeout,
                    "last_fresh_at": last,
                },
                at=wall,
            )
        )
        logger.warning("%s", message)
        changes.append(
            EngineEvent(
                kind=events.FAILSAFE_ENTERED,
                severity=audit.CRITICAL,
                station_id=station.station_id,
                pump_id=None,
                message=message,
                at=wall,
            )
        )

    # ------------------------------------------------------------------
    # storage health

    def _listen_to_storage(self) -> None:
        add = getattr(self._storage, "add_health_listener", None)
        if add is not None:
            remove = add(self._on_storage_health)
            self._remove_listener = remove if callable(remove) else None

        health = self._storage.health()
        self._storage_degraded = health.state != "ok"

    def _on_storage_health(self, health: StorageHealth) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._storage_changed, health)
        else:
            self._storage_changed(health)

    def _storage_changed(self, health: StorageHealth) -> None:
        degraded = health.state != "ok"
        if degraded == self._storage_degraded:
            return
        self._storage_degraded = degraded

        for station in self._stations:
            self._write_status(station)

        wall = self._clock.utcnow()
        kind = events.STORAGE_DEGRADED if degraded else events.STORAGE_RECOVERED
        severity = audit.CRITICAL if degraded else audit.HIGH
        message = f"storage {health.state}: {health.detail}" + (
            f" ({health.spooled} records spooled)" if health.spooled else ""
        )
        self._emit(kind, severity, None, None, message, wall, {"state": health.state})

    # ------------------------------------------------------------------
    # start-up

    def _choose_stations(self, snapshot: Snapshot) -> tuple[StationConfig, ...]:
        from_file = self._config.stations and not self._config.demo
        if from_file or not snapshot.stations:
            return self._config.stations if self._config.stations else ()

        stations = []
        for index, record in enumerate(snapshot.stations):
            where = f"database station {record.station_id!r}"
            try:
                stations.append(
                    parse_station(record.definition, where, default_unit_id=index + 1)
                )
            except ConfigError as exc:
                raise EngineError(
                    f"cannot use the stations in the database: {exc}"
                ) from None

        ids = [station.station_id for station in stations]
        units = [station.unit_id for station in stations]
        if len(set(ids)) != len(ids) or len(set(units)) != len(units):
            raise EngineError(
                "cannot use the stations in the database: expected unique station "
                f"ids and unit ids, got ids {ids} and unit ids {units}"
            )
        return tuple(stations)

    def _build(self, stations: Iterable[StationConfig], now: float) -> None:
        limits: list[gate.PumpLimits] = []
        station_of: list[int] = []
        images = []

        for index, config in enumerate(stations):
            order = cast("codecs.WordOrder", config.float_order)
            image = codecs.StationImage(len(config.pumps), float_order=order)
            station = _Station(
                index=index,
                config=config,
                first=len(limits),
                count=len(config.pumps),
                image=image,
                pumps={},
            )
            for pump in config.pumps:
                station.pumps[pump.pump_id] = len(limits)
                limits.append(_limits(pump))
                station_of.append(index)
                self._pump_station.append(station)
                self._pump_config.append(pump)

            image.set_limits(
                np.array([p.min_value for p in config.pumps], dtype=np.float64),
                np.array([p.max_value for p in config.pumps], dtype=np.float64),
                np.array([p.max_rate for p in config.pumps], dtype=np.float64),
            )
            self._stations.append(station)
            self._by_id[config.station_id] = station
            self._images[config.unit_id] = image
            images.append(image)

        count = len(limits)
        self._gate = gate.Gate(limits, np.array(station_of, dtype=np.intp), now)
        self._image_set = codecs.ImageSet(images)
        self._arrays_are_views = _is_view(lambda: self._gate.applied)
        self._last_set = np.full(count, np.nan, dtype=np.float64)
        self._last_set_at = [None] * count
        self._records = [None] * count
        self._requested = np.zeros(count, dtype=bool)
        self._ages = np.empty(count, dtype=np.float64)
        self._following = [None] * count
        self._origin = now
        if self._arrays_are_views:
            self._cached = (
                self._gate.applied,
                self._gate.status,
                self._gate.target,
                self._gate.last_outcome,
            )
            for station in self._stations:
                station.views = self._station_views(station)

    def _restore_setpoints(
        self, snapshot: Snapshot, now: float, wall: dt.datetime
    ) -> int:
        restored = 0
        for record in snapshot.setpoints:
            station = self._by_id.get(record.station_id)
            pump = station.pumps.get(record.pump_id) if station is not None else None
            if pump is None:
                logger.warning(
                    "setpoint of unknown pump %s at station %s not restored",
                    record.pump_id,
                    record.station_id,
                )
                continue
            try:
                self._gate.restore(pump, record.target, record.applied)
            except (ValueError, TypeError) as exc:
                logger.warning(
                    "setpoint of pump %s at station %s not restored: %s",
                    record.pump_id,
                    record.station_id,
                    exc,
                )
                continue

            restored += 1
            if record.source == CHECKPOINT:
                continue
            self._records[pump] = record
            age = max((wall - record.at).total_seconds(), 0.0)
            self._last_set[pump] = now - age
            self._last_set_at[pump] = record.at
        return restored

    def _restore_stops(self, snapshot: Snapshot, now: float) -> None:
        for record in snapshot.emergency_stops:
            if not record.active:
                continue
            try:
                key, station, pump = self._stop_scope(
                    record.level, record.station_id, record.pump_id
                )
            except EngineError as exc:
                logger.warning(
                    "latched emergency stop (%s) not applied: %s",
                    _scope_text((record.level, record.station_id, record.pump_id)),
                    exc,
                )
                continue

            self._stops[key] = _Stop(
                key[0],
                key[1],
                key[2],
                record.since or record.at,
                record.reason,
                record.operator,
            )
            self._apply_stop(key, station, pump, True, now)
            logger.warning(
                "EMERGENCY STOP still latched (%s) since %s by %s: %s",
                _scope_text(key),
                (record.since or record.at).isoformat(),
                record.operator,
                record.reason,
            )

    def _restore_watchdog(
        self, snapshot: Snapshot, now: float, wall: dt.datetime
    ) -> list[Record]:
        states = {state.station_id: state for state in snapshot.station_states}
        records: list[Record] = []
        changes: list[EngineEvent] = []

        for station in self._stations:
            state = states.get(station.station_id)
            last = state.last_fresh_at if state is not None else None
            age = (wall - last).total_seconds() if last is not None else math.inf
            if last is not None:
                station.last_fresh = now - max(age, 0.0)
                station.last_fresh_at = last

            if age < self._timeout:
                self._watchdog_due = min(
                    self._watchdog_due, station.last_fresh + self._timeout
                )
                self._refresh_station(station, now)
                continue

            if state is not None and state.failsafe:
                self._gate.set_failsafe(station.index, True, now)
                station.failsafe = True
                self._refresh_station(station, now)
                logger.warning(
                    "station %s starts in failsafe, as it was (last fresh %s)",
                    station.station_id,
                    last.isoformat() if last else "never",
                )
                continue
            self._enter_failsafe(station, now, wall, records, changes, "start")

        self._emit_all(changes)
        return records

    def _restore_plans(self, snapshot: Snapshot, wall: dt.datetime) -> int:
        setpoints = {
            (record.station_id, record.pump_id): record
            for record in snapshot.setpoints
            if record.source != CHECKPOINT
        }

        def lenient(station_id: str, pump_id: str, field: str) -> int:
            station = self._by_id.get(station_id)
            pump = station.pumps.get(pump_id) if station is not None else None
            return pump if pump is not None else -1

        for stored in sorted(snapshot.plans, key=lambda r: r.received_at):
            try:
                plan = parse_plan(
                    stored.body,
                    lenient,
                    now=wall,
                    received_at=stored.received_at,
                    user=stored.user,
                    reject_past=False,
                )
            except PlanError as exc:
                logger.warning("plan %s not reloaded: %s", stored.plan_id, exc)
                continue
            self._schedule.add(plan)

        now_ts = wall.timestamp()
        self._prune_plans(now_ts)
        for pump in range(len(self._pump_config)):
            effective = self._schedule.effective(pump, now_ts)
            if effective is None:
                self._schedule_pump(pump, now_ts)
                continue

            station = self._pump_station[pump]
            record = setpoints.get(
                (station.station_id, self._pump_config[pump].pump_id)
            )
            if record is not None:
                then = self._schedule.effective(
                    pump, record.at.timestamp(), received_by=record.at
                )
                if _identity(then) == _identity(effective):
                    self._following[pump] = _identity(effective)
                    self._schedule_pump(pump, now_ts)
                    continue

            self._due_counter += 1
            self._due_generation[pump] = self._due_counter
            heapq.heappush(self._due, (now_ts, self._due_counter, pump, 0))

        for station in self._stations:
            self._update_stale(station, now_ts)
            self._write_status(station)
        return len(self._schedule)

    # ------------------------------------------------------------------
    # helpers

    def _station(self, station_id: str) -> _Station:
        station = self._by_id.get(station_id) if isinstance(station_id, str) else None
        if station is None:
            raise UnknownStation(station_id)
        return station

    def _pump(self, station: _Station, pump_id: str) -> int:
        pump = station.pumps.get(pump_id) if isinstance(pump_id, str) else None
        if pump is None:
            raise UnknownPump(station.station_id, pump_id)
        return pump

    def _applied_array(self) -> npt.NDArray[np.float64]:
        return self._cached[0] if self._arrays_are_views else self._gate.applied

    def _status_array(self) -> npt.NDArray[np.uint16]:
        return self._cached[1] if self._arrays_are_views else self._gate.status

    def _target_array(self) -> npt.NDArray[np.float64]:
        return self._cached[2] if self._arrays_are_views else self._gate.target

    def _outcome_array(self) -> npt.NDArray[np.uint8]:
        return self._cached[3] if self._arrays_are_views else self._gate.last_outcome

    def _station_view(self, station: _Station) -> StationView:
        self._write_status(station)
        bits = station.status_bits
        return StationView(
            station_id=station.station_id,
            name=station.config.name,
            unit_id=station.config.unit_id,
            pumps=tuple(self._pump_view(pump) for pump in station.span),
            emergency_stop=bool(bits & codecs.STATION_ESTOP),
            failsafe=station.failsafe,
            plan_stale=station.plan_stale,
            last_fresh_at=station.last_fresh_at,
            status=bits,
            storage_degraded=self._storage_degraded,
            plc=self._feedback.station_view(station.index),
        )

    def _pump_view(self, pump: int) -> PumpView:
        config = self._pump_config[pump]
        station = self._pump_station[pump]
        status = int(self._gate.status[pump])
        last_set = float(self._last_set[pump])
        following = self._following[pump]
        return PumpView(
            station_id=station.station_id,
            pump_id=config.pump_id,
            name=config.name or config.pump_id,
            units=config.units,
            limits=PumpLimitsView(
                min_value=config.min_value,
                max_value=config.max_value,
                max_rate=config.max_rate,
                failsafe_value=config.failsafe_value,
                stop_value=config.stop_value,
                allow_stop=config.allow_stop,
                min_switch_interval=config.min_switch_interval,
            ),
            target=float(self._gate.target[pump]),
            applied=float(self._gate.applied[pump]),
            status=status,
            emergency_stop=bool(status & _STATUS_ESTOP),
            failsafe=bool(status & _STATUS_FAILSAFE),
            clamped=bool(status & _STATUS_CLAMPED),
            ramping=bool(status & _STATUS_RAMPING),
            rejected=bool(status & _STATUS_REJECTED),
            last_outcome=(
                OUTCOME_NAMES[int(self._gate.last_outcome[pump])]
                if self._requested[pump]
                else None
            ),
            setpoint_age=(
                max(self._clock.monotonic() - last_set, 0.0)
                if not math.isnan(last_set)
                else None
            ),
            last_setpoint_at=self._last_set_at[pump],
            plan_id=following[0] if following is not None else None,
            feedback=self._feedback.pump_view(pump),
        )

    def _state_due(self, station: _Station) -> bool:
        """Whether a fresh setpoint should write the station's state.

        The state holds the failsafe flag and the time of the last fresh
        setpoint or plan, which a restart judges the watchdog by. A change
        of the flag is written at once; the time is written when the stored
        one is older than :data:`FRESHNESS_STORE_INTERVAL` (or a hundredth
        of the watchdog timeout, if less), so a stream of setpoints writes
        the state about once a second rather than with each. After a
        restart the station then counts as fresh since at most that long
        before its last setpoint: the watchdog can only act sooner.
        """
        stored = station.stored_fresh_at
        fresh = station.last_fresh_at
        if station.stored_failsafe is not station.failsafe or stored is None:
            return True
        if fresh is None:
            return False
        interval = min(FRESHNESS_STORE_INTERVAL, self._timeout / 100)
        return (fresh - stored).total_seconds() >= interval

    def _station_state(self, station: _Station) -> StationStateRecord:
        station.stored_fresh_at = station.last_fresh_at
        station.stored_failsafe = station.failsafe
        return StationStateRecord(
            station_id=station.station_id,
            last_fresh_at=station.last_fresh_at,
            failsafe=station.failsafe,
        )

    def _audit(
        self,
        event_type: str,
        ctx: RequestContext,
        *,
        station_id: str | None = None,
        pump_id: str | None = None,
        old_value: str | None = None,
        new_value: str | None = None,
        outcome: str | None = None,
        details: dict[str, Any] | None = None,
        at: dt.datetime | None = None,
    ) -> AuditRecord:
        return AuditRecord(
            event_type=event_type,
            severity=audit.severity_of(event_type),
            timestamp=at if at is not None else self._clock.utcnow(),
            user=ctx.user,
            source_address=ctx.source_address,
            protocol=ctx.protocol,
            station_id=station_id,
            pump_id=pump_id,
            old_value=old_value,
            new_value=new_value,
            outcome=outcome,
            details=details or {},
        )

    def _emit(
        self,
        kind: str,
        severity: Severity,
        station_id: str | None,
        pump_id: str | None,
        message: str,
        at: dt.datetime,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self._events.emit(
            EngineEvent(kind, severity, station_id, pump_id, message, at, details or {})
        )

    def _emit_all(self, changes: Sequence[EngineEvent]) -> None:
        for event in changes:
            self._events.emit(event)

    async def _write(self, records: Sequence[Record]) -> None:
        """Write ``records`` durably, after any the tick has queued before them.

        Queued records go first in the same call, so the storage receives
        every record in the order the state changed.
        """
        earlier, self._pending = self._pending, []
        try:
            await self._storage.write([*earlier, *records] if earlier else records)
        except BaseException:
            self._pending[:0] = earlier
            raise

    def _queue(self, records: Sequence[Record]) -> None:
        if not records:
            return
        if len(self._pending) + len(records) > MAX_PENDING:
            logger.error(
                "engine: %d records waiting for storage; %d new ones dropped",
                len(self._pending),
                len(records),
            )
            return
        self._pending.extend(records)
        if self._writer is None or self._writer.done():
            self._start_writer()

    def _start_writer(self) -> None:
        try:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_pending(), name="calejo-engine-writer"
            )
        except RuntimeError:
            self._writer = None

    async def _write_pending(self) -> None:
        delay = 0.5
        for _ in range(1_000_000):
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            try:
                await self._storage.write(batch)
                delay = 0.5
            except Exception as exc:
                self._pending[:0] = batch
                logger.error(
                    "engine: storage refused %d records (%s); retrying in %.1f s",
                    len(batch),
                    exc,
                    delay,
                )
                if not self._running:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def _limits(pump: PumpConfig) -> gate.PumpLimits:
    return gate.PumpLimits(
        pump.min_value,
        pump.max_value,
        pump.max_rate,
        pump.failsafe_value,
        pump.stop_value,
        pump.allow_stop,
        pump.min_switch_interval,
        pump_id=pump.pump_id,
    )


def _is_view(read: Callable[[], npt.NDArray[Any]]) -> bool:
    first, second = read(), read()
    return bool(np.shares_memory(first, second))


def _stop_status(stops: list[_Stop]) -> EmergencyStopStatus:
    if not stops:
        return EmergencyStopStatus(False, None, None, None, None, ())
    ordered = sorted(stops, key=lambda stop: (LEVELS.index(stop.level), stop.since))
    strongest = ordered[0]
    return EmergencyStopStatus(
        active=True,
        level=strongest.level,
        since=strongest.since,
        reason=strongest.reason,
        operator=strongest.operator,
        stops=tuple(stop.view() for stop in ordered),
    )


def _stop_text(reason: object, operator: object) -> tuple[str, str]:
    if not isinstance(reason, str) or not 1 <= len(reason.strip()) <= 500:
        raise InvalidRequest(
            f"expected a reason of 1 to 500 characters, got {_shown(reason)}", "reason"
        )
    if not isinstance(operator, str) or not 1 <= len(operator.strip()) <= 200:
        raise InvalidRequest(
            f"expected an operator name of 1 to 200 characters, got {_shown(operator)}",
            "operator",
        )
    return reason.strip(), operator.strip()


def _scope_text(key: tuple[str, str | None, str | None]) -> str:
    level, station_id, pump_id = key
    if level == "system":
        return "system"
    if level == "station":
        return f"station {station_id}"
    return f"pump {pump_id} at station {station_id}"


def _identity(effective: tuple[Plan, int, Interval] | None) -> Identity | None:
    if effective is None:
        return None
    plan, index, _ = effective
    return (plan.plan_id, plan.version, index)


def _requested(value: object) -> float | None:
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):
        return None


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 64 else text[:61] + "..."


def _clip(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= 64 else value[:61] + "..."


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()
