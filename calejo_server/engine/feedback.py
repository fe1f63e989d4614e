"""What PLCs write over Modbus: feedback values and the PLC heartbeat.

A station's PLC may write a few registers of the station's image (the
layout is :func:`calejo_core.codecs.register_map`): its heartbeat (3), the
station level (5) and, for pump k, speed x 10, running and power x 10 at
``1000 + 10 k``. The Modbus frame handler asks :meth:`PlcFeedback.write`
before it stores a write: 0 lets it store the values, anything else is
the Modbus exception code the client gets, and nothing is stored.

The rules, each value as the register holds it:

=============  ==============================================================
register       accepted
=============  ==============================================================
heartbeat      any uint16; what counts is that it changes
station level  any int16 (cm): -32768 to 32767, all the register can hold
speed x 10     0 to ``OVERSPEED`` (1.2) x the pump's ``max_value``, in the
               register's 0.1 steps
running        0 or 1
power x 10     any uint16: 0 to 6553.5 kW (unsigned, so never negative)
=============  ==============================================================

A write with any value outside its rule is refused whole with exception
03 (illegal data value). Refusals are audited, at most ``burst`` records
per source address and event type per minute; the rest are counted and
the count is recorded with the next record or when the minute ends.

The heartbeat is watched once the PLC has written it: when it has not
changed for ``heartbeat_timeout`` seconds the station's PLC counts as lost
(a ``plc_heartbeat_lost`` event, audited, logged), and restored at its
next change. Register 4 holds the seconds since it last changed, updated
each second (65535 until the PLC first writes the heartbeat).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from calejo_core import codecs
from calejo_core import modbus as frames
from calejo_server import audit
from calejo_server.config import PumpConfig, StationConfig
from calejo_server.engine import events
from calejo_server.engine.clock import Clock
from calejo_server.engine.events import EngineEvent
from calejo_server.engine.views import PlcView, PumpFeedbackView, RequestContext
from calejo_server.storage.base import AuditRecord, Record

__all__ = ["OVERSPEED", "AuditLimiter", "PlcFeedback"]

logger = logging.getLogger(__name__)

OVERSPEED: Final = 1.2
"""Speed feedback may reach this multiple of the pump's max_value."""
NEVER: Final = 65535
"""Register 4 before the PLC first writes its heartbeat."""
BURST: Final = 5
"""Refusals audited one by one per source and event type per window."""
WINDOW: Final = 60.0
"""Seconds of the audit window of refusals."""
WINDOW_TOTAL: Final = 50
"""Refusals audited one by one per event type per window, all sources."""

_HEARTBEAT = codecs.PLC_HEARTBEAT
_LEVEL = codecs.STATION_LEVEL
_FEEDBACK = codecs.FEEDBACK_BASE
_STRIDE = codecs.FEEDBACK_STRIDE
_SPEED = codecs.FEEDBACK_SPEED_X10
_RUNNING = codecs.FEEDBACK_RUNNING
_POWER = codecs.FEEDBACK_POWER_X10


@dataclasses.dataclass(slots=True)
class _Pump:
    pump_id: str
    units: str
    speed_limit: int
    """The largest speed x 10 accepted."""
    speed: float | None = None
    running: bool | None = None
    power: float | None = None
    updated_at: dt.datetime | None = None


@dataclasses.dataclass(slots=True)
class _Station:
    station_id: str
    unit_id: int
    image: codecs.StationImage
    pumps: list[_Pump]
    heartbeat: int | None = None
    changed: float = -math.inf
    lost: bool = False
    level: int | None = None
    last_write_at: dt.datetime | None = None


@dataclasses.dataclass(slots=True)
class _Budget:
    start: float
    recorded: int = 0
    suppressed: int = 0
    """Refusals not recorded, and not yet counted in a record."""


LimitKey = tuple[str, str | None]
"""(event type, source address)."""


class AuditLimiter:
    """How many refusals of one kind get an audit record of their own.

    Per key (event type, source address) at most ``burst`` records per
    ``window`` seconds, and per event type at most ``total`` over all
    sources; the others are counted. :meth:`allow` hands the count to the
    next record of its key, :meth:`overdue` those of windows that ended
    with a count no record has carried yet. At most ``max_keys`` sources
    are told apart; beyond that they share one key.
    """

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW,
        total: int = WINDOW_TOTAL,
        max_keys: int = 1024,
    ) -> None:
        self.burst = burst
        self.window = window
        self.total = total
        self.max_keys = max_keys
        self._keys: dict[LimitKey, _Budget] = {}
        self._types: dict[str, _Budget] = {}

    def allow(self, key: LimitKey, now: float) -> tuple[bool, int]:
        """(record this one?, refusals of the key not recorded before it)."""
        budget = self._keys.get(key)
        if budget is None:
            if len(self._keys) >= self.max_keys:
                key = (key[0], None)
                budget = self._keys.get(key)
            if budget is None:
                budget = self._keys[key] = _Budget(now)

        earlier = 0
        if now - budget.start >= self.window:
            earlier = budget.suppressed
            budget.start, budget.recorded, budget.suppressed = now, 0, 0

        overall = self._types.get(key[0])
        if overall is None or now - overall.start >= self.window:
            overall = self._types[key[0]] = _Budget(now)

        if budget.recorded >= self.burst or overall.recorded >= self.total:
            budget.suppressed += earlier + 1
            return False, 0

        budget.recorded += 1
        overall.recorded += 1
        earlier += budget.suppressed
        budget.suppressed = 0
        return True, earlier

    def overdue(self, now: float) -> list[tuple[LimitKey, int]]:
        """Keys whose window ended with refusals not recorded; forgets them."""
        ended = [
            key
            for key, budget in self._keys.items()
            if now - budget.start >= self.window
        ]
        counts = []
        for key in ended:
            budget = self._keys.pop(key)
            if budget.suppressed:
                counts.append((key, budget.suppressed))
        return counts


class PlcFeedback:
    """The PLC side of every station's image: checks, live state, heartbeat.

    ``queue`` takes records to write in the background, ``emit`` engine
    events; both are the engine's. :meth:`build` sets the stations (in the
    engine's order, so pump ``i`` here is the engine's pump ``i``).
    """

    def __init__(
        self,
        heartbeat_timeout: float,
        clock: Clock,
        queue: Callable[[Sequence[Record]], None],
        emit: Callable[[EngineEvent], None],
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self._clock = clock
        self._queue = queue
        self._emit = emit
        self._stations: list[_Station] = []
        self._units: dict[int, _Station] = {}
        self._pumps: list[_Pump] = []
        self.limiter = AuditLimiter()
        self.writes = 0
        self.refused = 0

    def build(
        self, stations: Iterable[tuple[StationConfig, codecs.StationImage]]
    ) -> None:
        """Serve these stations, each with the image of its unit id."""
        self._stations = []
        self._pumps = []
        for config, image in stations:
            pumps = [_pump(pump) for pump in config.pumps]
            station = _Station(config.station_id, config.unit_id, image, pumps)
            image.set_plc_heartbeat_age(NEVER)
            self._stations.append(station)
            self._pumps.extend(pumps)
        self._units = {station.unit_id: station for station in self._stations}

    # Writes.

    def write(
        self,
        unit: int,
        kind: int,
        address: int,
        values: npt.NDArray[np.uint16],
        ctx: RequestContext,
    ) -> int:
        """Check a write of ``values`` from ``address`` on; 0 to store it.

        Otherwise the Modbus exception code: 03 for a value outside its
        rule (audited), 02 for an address no PLC writes, 0x0B for a unit
        id no station has.
        """
        station = self._units.get(unit)
        if station is None:
            return frames.GATEWAY_TARGET_FAILED
        raw = values.tolist()
        if kind != frames.KIND_REGISTERS:
            first, last = address, address + len(raw) - 1
            self._refused(
                station, None, ctx, f"coils {first}..{last} are read-only", raw, address
            )
            return frames.ILLEGAL_DATA_ADDRESS

        for offset, value in enumerate(raw):
            problem = self._check(station, address + offset, value)
            if problem is not None:
                code, pump, detail = problem
                self._refused(station, pump, ctx, detail, raw, address)
                return code

        now = self._clock.monotonic()
        wall = self._clock.utcnow()
        for offset, value in enumerate(raw):
            self._store(station, address + offset, value, now, wall, ctx)
        station.last_write_at = wall
        self.writes += 1
        return 0

    def _check(
        self, station: _Station, register: int, value: int
    ) -> tuple[int, _Pump | None, str] | None:
        if register in (_HEARTBEAT, _LEVEL):
            return None

        pump, field = divmod(register - _FEEDBACK, _STRIDE)
        if register < _FEEDBACK or pump >= len(station.pumps) or field > _POWER:
            return (
                frames.ILLEGAL_DATA_ADDRESS,
                None,
                f"register {register} of station {station.station_id} is not "
                "written by the PLC",
            )

        entry = station.pumps[pump]
        where = f"pump {entry.pump_id} at station {station.station_id}"
        if field == _SPEED and value > entry.speed_limit:
            return (
                frames.ILLEGAL_DATA_VALUE,
                entry,
                f"speed feedback of {where}: expected 0 to "
                f"{entry.speed_limit / 10:g} {entry.units} ({OVERSPEED:g} x "
                f"max_value), got {value / 10:g} {entry.units} (register "
                f"{register} = {value})",
            )
        if field == _RUNNING and value > 1:
            return (
                frames.ILLEGAL_DATA_VALUE,
                entry,
                f"running feedback of {where}: expected 0 or 1, got {value} "
                f"(register {register})",
            )
        return None

    def _store(
        self,
        station: _Station,
        register: int,
        value: int,
        now: float,
        wall: dt.datetime,
        ctx: RequestContext,
    ) -> None:
        if register == _HEARTBEAT:
            self._heartbeat(station, value, now, wall, ctx)
            return
        if register == _LEVEL:
            station.level = value - 65536 if value >= 32768 else value
            return

        pump, field = divmod(register - _FEEDBACK, _STRIDE)
        entry = station.pumps[pump]
        if field == _SPEED:
            entry.speed = value / 10
        elif field == _RUNNING:
            entry.running = value == 1
        else:
            entry.power = value / 10
        entry.updated_at = wall

    def _heartbeat(
        self,
        station: _Station,
        value: int,
        now: float,
        wall: dt.datetime,
        ctx: RequestContext,
    ) -> None:
        previous = station.heartbeat
        station.heartbeat = value
        if previous is not None and previous == value:
            return

        station.changed = now
        station.image.set_plc_heartbeat_age(0)
        if previous is None:
            logger.info(
                "station %s: PLC heartbeat first written (from %s)",
                station.station_id,
                ctx.source_address or "unknown",
            )
        if not station.lost:
            return

        station.lost = False
        message = f"station {station.station_id}: PLC heartbeat restored"
        logger.warning("%s", message)
        self._queue(
            [
                _record(
                    audit.PLC_HEARTBEAT_RESTORED,
                    ctx,
                    wall,
                    station_id=station.station_id,
                    outcome="restored",
                    details={"heartbeat": value},
                )
            ]
        )
        self._emit(
            EngineEvent(
                kind=events.PLC_HEARTBEAT_RESTORED,
                severity=audit.severity_of(audit.PLC_HEARTBEAT_RESTORED),
                station_id=station.station_id,
                pump_id=None,
                message=message,
                at=wall,
                details={"heartbeat": value},
            )
        )

    def _refused(
        self,
        station: _Station,
        pump: _Pump | None,
        ctx: RequestContext,
        detail: str,
        values: list[int],
        address: int,
    ) -> None:
        self.refused += 1
        self.refuse(
            audit.MODBUS_WRITE_REFUSED,
            ctx,
            detail,
            station_id=station.station_id,
            pump_id=pump.pump_id if pump is not None else None,
            unit=station.unit_id,
            address=address,
            values=values[:16],
        )

    # Refusals of any kind (writes, connections).

    def refuse(
        self,
        event_type: str,
        ctx: RequestContext,
        detail: str,
        *,
        station_id: str | None = None,
        pump_id: str | None = None,
        **details: Any,
    ) -> bool:
        """Audit a refusal unless too many like it came lately; True if recorded."""
        allowed, earlier = self.limiter.allow(
            (event_type, ctx.source_address), self._clock.monotonic()
        )
        if not allowed:
            return False

        record_details: dict[str, Any] = {"detail": detail, **details}
        if earlier:
            record_details["suppressed"] = earlier
        self._queue(
            [
                _record(
                    event_type,
                    ctx,
                    self._clock.utcnow(),
                    station_id=station_id,
                    pump_id=pump_id,
                    outcome="refused",
                    details=record_details,
                )
            ]
        )
        return True

    # The clock.

    def second(self, now: float) -> None:
        """Once a second: heartbeat ages, lost heartbeats, refusal counts."""
        wall: dt.datetime | None = None
        records: list[Record] = []

        for station in self._stations:
            if station.heartbeat is None:
                continue
            age = now - station.changed
            station.image.set_plc_heartbeat_age(age)
            if station.lost or age < self.heartbeat_timeout:
                continue

            station.lost = True
            wall = wall or self._clock.utcnow()
            self._lost(station, age, wall, records)

        overdue = self.limiter.overdue(now)
        if overdue:
            wall = wall or self._clock.utcnow()
            for (event_type, source), count in overdue:
                ctx = RequestContext(None, source, "MODBUS")
                records.append(
                    _record(
                        event_type,
                        ctx,
                        wall,
                        outcome="suppressed",
                        details={
                            "suppressed": count,
                            "window": self.limiter.window,
                            "detail": f"{count} more refusals like it from "
                            f"{source or 'many sources'} were not recorded one by "
                            "one",
                        },
                    )
                )
        self._queue(records)

    def _lost(
        self, station: _Station, age: float, wall: dt.datetime, records: list[Record]
    ) -> None:
        message = (
            f"station {station.station_id}: PLC heartbeat lost: register "
            f"{_HEARTBEAT} unchanged for {age:.0f} s (timeout "
            f"{self.heartbeat_timeout:g} s, last value {station.heartbeat})"
        )
        logger.warning("%s", message)
        details = {
            "age": round(age, 1),
            "timeout": self.heartbeat_timeout,
            "heartbeat": station.heartbeat,
        }
        records.append(
            _record(
                audit.PLC_HEARTBEAT_LOST,
                RequestContext(None, None, "ENGINE"),
                wall,
                station_id=station.station_id,
                outcome="lost",
                details=details,
            )
        )
        self._emit(
            EngineEvent(
                kind=events.PLC_HEARTBEAT_LOST,
                severity=audit.severity_of(audit.PLC_HEARTBEAT_LOST),
                station_id=station.station_id,
                pump_id=None,
                message=message,
                at=wall,
                details=details,
            )
        )

    # Views.

    def pump_view(self, pump: int) -> PumpFeedbackView | None:
        """What the PLC last wrote about the engine's pump ``pump``."""
        entry = self._pumps[pump] if pump < len(self._pumps) else None
        if entry is None or entry.updated_at is None:
            return None
        return PumpFeedbackView(
            speed=entry.speed,
            running=entry.running,
            power=entry.power,
            updated_at=entry.updated_at,
        )

    def station_view(self, index: int) -> PlcView | None:
        """The heartbeat and level of the engine's station ``index``."""
        if index >= len(self._stations):
            return None
        station = self._stations[index]
        seen = station.heartbeat is not None
        return PlcView(
            heartbeat=station.heartbeat,
            heartbeat_age=(
                max(self._clock.monotonic() - station.changed, 0.0) if seen else None
            ),
            heartbeat_lost=station.lost,
            heartbeat_timeout=self.heartbeat_timeout,
            level=station.level,
            last_write_at=station.last_write_at,
        )

    def lost_stations(self) -> list[str]:
        """The stations whose PLC heartbeat is lost now."""
        return [station.station_id for station in self._stations if station.lost]


def _pump(config: PumpConfig) -> _Pump:
    limit = math.floor(config.max_value * OVERSPEED * 10 + 1e-6)
    return _Pump(config.pump_id, config.units, min(limit, 65535))


def _record(
    event_type: str,
    ctx: RequestContext,
    at: dt.datetime,
    *,
    station_id: str | None = None,
    pump_id: str | None = None,
    outcome: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditRecord:
    return AuditRecord(
        event_type=event_type,
        severity=audit.severity_of(event_type),
        timestamp=at,
        user=ctx.user,
        source_address=ctx.source_address,
        protocol=ctx.protocol,
        station_id=station_id,
        pump_id=pump_id,
        outcome=outcome,
        details=details or {},
    )
