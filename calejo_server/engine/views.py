"""What the engine shows of its state: frozen views with JSON-ready dicts.

Values are in the pump's engineering units (Hz unless configured), rates
in units per second, ages and durations in seconds, times as ISO 8601 UTC
strings in :meth:`to_dict`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any, Literal

__all__ = [
    "ActiveStop",
    "EmergencyStopStatus",
    "EngineHealth",
    "IntervalView",
    "Outcome",
    "PlanPumpView",
    "PlanView",
    "PlcView",
    "PumpFeedbackView",
    "PumpLimitsView",
    "PumpView",
    "RequestContext",
    "SetpointItem",
    "SetpointResult",
    "StationView",
    "WatchdogView",
]

Outcome = Literal["accepted", "clamped", "rejected", "blocked"]
StopLevel = Literal["system", "station", "pump"]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asked, from where, over which protocol (recorded in the audit log).

    ``protocol`` is one of REST, MODBUS, OPCUA, CLI, ENGINE.
    """

    user: str | None
    source_address: str | None
    protocol: str


ENGINE_CONTEXT = RequestContext(user=None, source_address=None, protocol="ENGINE")


@dataclasses.dataclass(frozen=True, slots=True)
class SetpointItem:
    """One setpoint of a batch; ``value`` is whatever arrived."""

    station_id: str
    pump_id: str
    value: object


@dataclasses.dataclass(frozen=True, slots=True)
class SetpointResult:
    """What the gate made of one setpoint request.

    ``requested`` is the value as received (None when it is not a number),
    ``target`` the pump's target after the request, ``applied`` what SCADA
    reads now; ``detail`` explains a clamped, rejected or blocked outcome.
    """

    station_id: str
    pump_id: str
    outcome: Outcome
    requested: float | None
    target: float | None
    applied: float | None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "pump_id": self.pump_id,
            "outcome": self.outcome,
            "requested": _number(self.requested),
            "target": _number(self.target),
            "applied": _number(self.applied),
            "detail": self.detail,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PumpLimitsView:
    """The limits the gate holds a pump to."""

    min_value: float
    max_value: float
    max_rate: float
    failsafe_value: float
    stop_value: float
    allow_stop: bool
    min_switch_interval: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "max_rate": _number(self.max_rate),
            "failsafe_value": self.failsafe_value,
            "stop_value": self.stop_value,
            "allow_stop": self.allow_stop,
            "min_switch_interval": self.min_switch_interval,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PumpFeedbackView:
    """What the station's PLC last wrote about a pump (Modbus registers).

    ``speed`` in the pump's units, ``power`` in kW, each None until the
    PLC first writes it; ``updated_at`` is when any of them was last
    written.
    """

    speed: float | None
    running: bool | None
    power: float | None
    updated_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "speed": self.speed,
            "running": self.running,
            "power": self.power,
            "updated_at": _time(self.updated_at),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PlcView:
    """The station's PLC as seen over Modbus: heartbeat and level.

    ``heartbeat_age`` is the seconds since the heartbeat register last
    changed (None before the PLC first wrote it); ``heartbeat_lost`` once
    it stood still for the configured timeout. ``level`` is in cm (None
    until written).
    """

    heartbeat: int | None
    heartbeat_age: float | None
    heartbeat_lost: bool
    heartbeat_timeout: float
    level: int | None
    last_write_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "heartbeat": self.heartbeat,
            "heartbeat_age": self.heartbeat_age,
            "heartbeat_lost": self.heartbeat_lost,
            "heartbeat_timeout": self.heartbeat_timeout,
            "level": self.level,
            "last_write_at": _time(self.last_write_at),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PumpView:
    """One pump: limits, target, applied value and status.

    ``status`` holds the Modbus status bits (0 e-stop, 1 failsafe, 2
    clamped, 3 ramping, 4 last request rejected), also given as flags.
    ``max_rate`` of infinity (no ramp) shows as None in :meth:`to_dict`.
    ``plan_id`` names the plan whose interval the pump follows now;
    ``feedback`` is what the PLC last wrote (None until it writes).
    """

    station_id: str
    pump_id: str
    name: str
    units: str
    limits: PumpLimitsView
    target: float
    applied: float
    status: int
    emergency_stop: bool
    failsafe: bool
    clamped: bool
    ramping: bool
    rejected: bool
    last_outcome: Outcome | None
    setpoint_age: float | None
    last_setpoint_at: dt.datetime | None
    plan_id: str | None = None
    feedback: PumpFeedbackView | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "pump_id": self.pump_id,
            "name": self.name,
            "units": self.units,
            "limits": self.limits.to_dict(),
            "target": self.target,
            "applied": self.applied,
            "status": self.status,
            "emergency_stop": self.emergency_stop,
            "failsafe": self.failsafe,
            "clamped": self.clamped,
            "ramping": self.ramping,
            "rejected": self.rejected,
            "last_outcome": self.last_outcome,
            "setpoint_age": self.setpoint_age,
            "last_setpoint_at": _time(self.last_setpoint_at),
            "plan_id": self.plan_id,
            "feedback": self.feedback.to_dict() if self.feedback else None,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class StationView:
    """One station, its pumps in register order, and its status bits.

    ``status`` holds the station status bits (0 any e-stop, 1 failsafe, 2
    plan stale, 3 storage degraded). ``plc`` is the station PLC's
    heartbeat and level as written over Modbus.
    """

    station_id: str
    name: str
    unit_id: int
    pumps: tuple[PumpView, ...]
    emergency_stop: bool
    failsafe: bool
    plan_stale: bool
    last_fresh_at: dt.datetime | None
    status: int = 0
    storage_degraded: bool = False
    plc: PlcView | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "name": self.name,
            "unit_id": self.unit_id,
            "pumps": [pump.to_dict() for pump in self.pumps],
            "emergency_stop": self.emergency_stop,
            "failsafe": self.failsafe,
            "plan_stale": self.plan_stale,
            "last_fresh_at": _time(self.last_fresh_at),
            "status": self.status,
            "storage_degraded": self.storage_degraded,
            "plc": self.plc.to_dict() if self.plc else None,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ActiveStop:
    """One latched emergency stop."""

    level: StopLevel
    station_id: str | None
    pump_id: str | None
    since: dt.datetime
    reason: str
    operator: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "station_id": self.station_id,
            "pump_id": self.pump_id,
            "since": _time(self.since),
            "reason": self.reason,
            "operator": self.operator,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class EmergencyStopStatus:
    """The emergency stops bearing on a scope (the system, a station, a pump).

    ``active`` when a stop covers at least one pump of the scope; ``level``
    is the strongest such stop (system, then station, then pump) and
    ``since``, ``reason``, ``operator`` are that stop's; ``stops`` lists
    every active stop bearing on the scope (for the system: all of them).
    """

    active: bool
    level: StopLevel | None
    since: dt.datetime | None
    reason: str | None
    operator: str | None
    stops: tuple[ActiveStop, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "level": self.level,
            "since": _time(self.since),
            "reason": self.reason,
            "operator": self.operator,
            "stops": [stop.to_dict() for stop in self.stops],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class IntervalView:
    """One interval of a plan: the setpoint from ``start`` until ``end``."""

    start: dt.datetime
    end: dt.datetime
    setpoint: float
    target_flow: float | None = None
    power: float | None = None
    level: float | None = None

    def to_dict(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "start": _time(self.start),
            "end": _time(self.end),
            "setpoint": self.setpoint,
        }
        for key in ("target_flow", "power", "level"):
            value = getattr(self, key)
            if value is not None:
                item[key] = value
        return item


@dataclasses.dataclass(frozen=True, slots=True)
class PlanPumpView:
    """The intervals a plan gives one pump."""

    station_id: str
    pump_id: str
    intervals: tuple[IntervalView, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "pump_id": self.pump_id,
            "intervals": [interval.to_dict() for interval in self.intervals],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PlanView:
    """One plan as held: ``state`` is pending, active or ended."""

    plan_id: str
    version: int
    description: str | None
    received_at: dt.datetime
    user: str | None
    state: Literal["pending", "active", "ended"]
    start: dt.datetime
    end: dt.datetime
    pumps: tuple[PlanPumpView, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "version": self.version,
            "description": self.description,
            "received_at": _time(self.received_at),
            "user": self.user,
            "state": self.state,
            "start": _time(self.start),
            "end": _time(self.end),
            "pumps": [pump.to_dict() for pump in self.pumps],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class WatchdogView:
    """The watchdog of one station: how fresh its last setpoint or plan is."""

    station_id: str
    failsafe: bool
    last_fresh_at: dt.datetime | None
    age: float | None
    timeout: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "failsafe": self.failsafe,
            "last_fresh_at": _time(self.last_fresh_at),
            "age": self.age,
            "timeout": self.timeout,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class EngineHealth:
    """How the engine is doing.

    ``status`` is ok, degraded (storage degraded, ticks late by more than
    one interval, or a station in failsafe) or down (not ticking).
    ``tick_lag`` is how late the last tick started, ``max_tick_lag`` the
    largest since start, ``tick_duration`` how long the last tick took, all
    in seconds.
    """

    status: Literal["ok", "degraded", "down"]
    running: bool
    ticks: int
    last_tick_at: dt.datetime | None
    tick_interval: float
    tick_lag: float
    max_tick_lag: float
    tick_duration: float
    heartbeat: int
    storage: str
    stations: tuple[WatchdogView, ...]
    pending_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "running": self.running,
            "ticks": self.ticks,
            "last_tick_at": _time(self.last_tick_at),
            "tick_interval": self.tick_interval,
            "tick_lag": self.tick_lag,
            "max_tick_lag": self.max_tick_lag,
            "tick_duration": self.tick_duration,
            "heartbeat": self.heartbeat,
            "storage": self.storage,
            "stations": [station.to_dict() for station in self.stations],
            "pending_records": self.pending_records,
        }


def _time(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None


def _number(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value
