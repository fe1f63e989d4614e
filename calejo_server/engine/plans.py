"""Optimizer plans: the body's checks, the plan model, the schedule lookup.

A plan gives pumps setpoints over time::

    {"plan_id": "day-2025-06-01", "version": 3, "description": "...",
     "pumps": [{"station_id": "north", "pump_id": "pump_1",
                "intervals": [{"start": "2025-06-01T00:00:00Z",
                               "end": "2025-06-01T01:00:00Z",
                               "setpoint": 42.5,
                               "target_flow": 120.0, "power": 18.5,
                               "level": 2.1}]}]}

Times are ISO 8601 with a timezone; intervals of one pump are sorted and
do not overlap (one may end where the next starts); ``setpoint`` is a
finite number in the pump's units; ``target_flow``, ``power`` and
``level`` are optional finite numbers kept for the record. A plan holds at
most :data:`MAX_INTERVALS` intervals.

Which interval a pump follows at time t (:meth:`Schedule.effective`): of
the plans with an interval covering t for that pump, the most recently
received one (its interval applies). When none covers t, the pump keeps
its last target.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

from calejo_server.engine.errors import PlanError
from calejo_server.engine.views import IntervalView, PlanPumpView, PlanView

__all__ = [
    "MAX_INTERVALS",
    "Interval",
    "Plan",
    "PumpPlan",
    "Schedule",
    "parse_plan",
]

MAX_INTERVALS: Final = 10_000
MAX_PUMPS: Final = 10_000
_PLAN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_PLAN_KEYS: Final = frozenset({"plan_id", "version", "description", "pumps"})
_PUMP_KEYS: Final = frozenset({"station_id", "pump_id", "intervals"})
_INTERVAL_KEYS: Final = frozenset(
    {"start", "end", "setpoint", "target_flow", "power", "level"}
)
_EXTRAS: Final = ("target_flow", "power", "level")

Resolve = Callable[[str, str, str], int]
"""(station_id, pump_id, field) -> pump index; raises UnknownStation/UnknownPump."""


@dataclasses.dataclass(frozen=True, slots=True)
class Interval:
    """One interval; ``start_ts`` and ``end_ts`` are POSIX seconds."""

    start: dt.datetime
    end: dt.datetime
    setpoint: float
    target_flow: float | None
    power: float | None
    level: float | None
    start_ts: float
    end_ts: float

    def view(self) -> IntervalView:
        return IntervalView(
            start=self.start,
            end=self.end,
            setpoint=self.setpoint,
            target_flow=self.target_flow,
            power=self.power,
            level=self.level,
        )

    def body(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "setpoint": self.setpoint,
        }
        for key in _EXTRAS:
            value = getattr(self, key)
            if value is not None:
                item[key] = value
        return item


@dataclasses.dataclass(frozen=True, slots=True)
class PumpPlan:
    """The intervals a plan gives one pump, sorted, with their start times."""

    station_id: str
    pump_id: str
    pump: int
    intervals: tuple[Interval, ...]
    starts: tuple[float, ...]

    def covering(self, ts: float) -> int | None:
        """Index of the interval covering POSIX time ``ts``, or None."""
        index = bisect.bisect_right(self.starts, ts) - 1
        if index < 0 or ts >= self.intervals[index].end_ts:
            return None
        return index

    def next_boundary(self, ts: float) -> float | None:
        """The first start or end strictly after ``ts``, or None."""
        index = bisect.bisect_right(self.starts, ts)
        candidates = []
        if index < len(self.intervals):
            candidates.append(self.intervals[index].start_ts)
        if index > 0 and self.intervals[index - 1].end_ts > ts:
            candidates.append(self.intervals[index - 1].end_ts)
        return min(candidates) if candidates else None


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """A checked plan, as received."""

    plan_id: str
    version: int
    description: str | None
    received_at: dt.datetime
    user: str | None
    pumps: tuple[PumpPlan, ...]
    start_ts: float
    end_ts: float

    @property
    def interval_count(self) -> int:
        return sum(len(pump.intervals) for pump in self.pumps)

    def body(self) -> dict[str, Any]:
        """The plan as a JSON-ready body, in the shape it arrived in."""
        body: dict[str, Any] = {"plan_id": self.plan_id, "version": self.version}
        if self.description is not None:
            body["description"] = self.description
        body["pumps"] = [
            {
                "station_id": pump.station_id,
                "pump_id": pump.pump_id,
                "intervals": [interval.body() for interval in pump.intervals],
            }
            for pump in self.pumps
        ]
        return body

    def view(self, now_ts: float) -> PlanView:
        state: Literal["pending", "active", "ended"]
        if now_ts < self.start_ts:
            state = "pending"
        elif now_ts < self.end_ts:
            state = "active"
        else:
            state = "ended"

        return PlanView(
            plan_id=self.plan_id,
            version=self.version,
            description=self.description,
            received_at=self.received_at,
            user=self.user,
            state=state,
            start=_from_ts(self.start_ts),
            end=_from_ts(self.end_ts),
            pumps=tuple(
                PlanPumpView(
                    station_id=pump.station_id,
                    pump_id=pump.pump_id,
                    intervals=tuple(interval.view() for interval in pump.intervals),
                )
                for pump in self.pumps
            ),
        )


def parse_plan(
    body: object,
    resolve: Resolve,
    *,
    now: dt.datetime,
    received_at: dt.datetime,
    user: str | None,
    reject_past: bool = True,
    max_intervals: int = MAX_INTERVALS,
) -> Plan:
    """Check a plan body and build the :class:`Plan`.

    ``resolve`` maps (station_id, pump_id, field) to the gate's pump index
    and raises UnknownStation/UnknownPump (or returns -1 to leave the pump
    out, as for a plan reloaded after the configuration changed). With
    ``reject_past``, an interval that ended at or before ``now`` is a
    :class:`PlanError` (a plan reloaded after a restart is not held to
    it). Raises
    :class:`PlanError` naming the field, e.g. ``pumps[0].intervals[2]``.
    """
    if not isinstance(body, Mapping):
        raise PlanError(f"expected a JSON object, got {_kind(body)}")
    _check_keys(body, _PLAN_KEYS, "")

    plan_id = body.get("plan_id")
    if not isinstance(plan_id, str) or _PLAN_ID.fullmatch(plan_id) is None:
        raise PlanError(
            "expected an id of 1 to 128 letters, digits, '_', '.', ':' or '-', "
            f"got {_kind(plan_id)}",
            "plan_id",
        )

    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PlanError(
            f"expected an integer of 1 or more, got {_kind(version)}", "version"
        )
    if version > 2**53:
        raise PlanError(f"expected an integer up to 2**53, got {version}", "version")

    description = body.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > 1000
    ):
        raise PlanError(
            f"expected a text of up to 1000 characters, got {_kind(description)}",
            "description",
        )

    entries = body.get("pumps")
    if not isinstance(entries, list) or not entries:
        raise PlanError(
            f"expected a non-empty list of pumps, got {_kind(entries)}", "pumps"
        )
    if len(entries) > MAX_PUMPS:
        raise PlanError(
            f"expected at most {MAX_PUMPS} pumps, got {len(entries)}", "pumps"
        )
    total = sum(
        len(entry["intervals"])
        for entry in entries
        if isinstance(entry, Mapping) and isinstance(entry.get("intervals"), list)
    )
    if total > max_intervals:
        raise PlanError(
            f"expected at most {max_intervals} intervals in one plan, got {total}",
            "pumps",
        )

    now_ts = now.timestamp()
    seen: dict[int, int] = {}
    pumps = []
    for index, entry in enumerate(entries):
        pump = _parse_pump(entry, f"pumps[{index}]", resolve, now_ts, reject_past)
        if pump.pump < 0:
            continue
        if pump.pump in seen:
            raise PlanError(
                f"expected each pump once, got pump {pump.pump_id!r} at station "
                f"{pump.station_id!r} again (first at pumps[{seen[pump.pump]}])",
                f"pumps[{index}]",
            )
        seen[pump.pump] = index
        pumps.append(pump)

    if not pumps:
        raise PlanError("expected at least one pump this adapter serves", "pumps")

    return Plan(
        plan_id=plan_id,
        version=version,
        description=description,
        received_at=received_at,
        user=user,
        pumps=tuple(pumps),
        start_ts=min(pump.intervals[0].start_ts for pump in pumps),
        end_ts=max(pump.intervals[-1].end_ts for pump in pumps),
    )


def _parse_pump(
    entry: object, field: str, resolve: Resolve, now_ts: float, reject_past: bool
) -> PumpPlan:
    if not isinstance(entry, Mapping):
        raise PlanError(f"expected an object, got {_kind(entry)}", field)
    _check_keys(entry, _PUMP_KEYS, field)

    station_id = entry.get("station_id")
    if not isinstance(station_id, str):
        raise PlanError(
            f"expected a station id, got {_kind(station_id)}", f"{field}.station_id"
        )
    pump_id = entry.get("pump_id")
    if not isinstance(pump_id, str):
        raise PlanError(f"expected a pump id, got {_kind(pump_id)}", f"{field}.pump_id")
    pump = resolve(station_id, pump_id, field)

    raw_intervals = entry.get("intervals")
    if not isinstance(raw_intervals, list) or not raw_intervals:
        raise PlanError(
            f"expected a non-empty list of intervals, got {_kind(raw_intervals)}",
            f"{field}.intervals",
        )

    intervals: list[Interval] = []
    for index, raw in enumerate(raw_intervals):
        where = f"{field}.intervals[{index}]"
        interval = _parse_interval(raw, where)
        if intervals and interval.start_ts < intervals[-1].end_ts:
            previous = intervals[-1]
            raise PlanError(
                f"expected a start at or after the previous interval's end "
                f"({previous.end.isoformat()}), got {interval.start.isoformat()} "
                "(intervals must be sorted and must not overlap)",
                where,
            )
        if reject_past and interval.end_ts <= now_ts:
            raise PlanError(
                f"expected an interval ending in the future, got one that ended "
                f"at {interval.end.isoformat()}",
                where,
            )
        intervals.append(interval)

    return PumpPlan(
        station_id=station_id,
        pump_id=pump_id,
        pump=pump,
        intervals=tuple(intervals),
        starts=tuple(interval.start_ts for interval in intervals),
    )


def _parse_interval(raw: object, field: str) -> Interval:
    if not isinstance(raw, Mapping):
        raise PlanError(f"expected an object, got {_kind(raw)}", field)
    _check_keys(raw, _INTERVAL_KEYS, field)

    start = _parse_time(raw.get("start"), f"{field}.start")
    end = _parse_time(raw.get("end"), f"{field}.end")
    if not start < end:
        raise PlanError(
            f"expected start before end, got start {start.isoformat()} and end "
            f"{end.isoformat()}",
            field,
        )

    setpoint = _finite(raw.get("setpoint"), f"{field}.setpoint", required=True)
    assert setpoint is not None
    extras = {key: _finite(raw.get(key), f"{field}.{key}") for key in _EXTRAS}

    return Interval(
        start=start,
        end=end,
        setpoint=setpoint,
        target_flow=extras["target_flow"],
        power=extras["power"],
        level=extras["level"],
        start_ts=start.timestamp(),
        end_ts=end.timestamp(),
    )


def _parse_time(value: object, field: str) -> dt.datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise PlanError(
            f"expected an ISO 8601 time with a timezone, got {_kind(value)}", field
        )
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise PlanError(
            f"expected an ISO 8601 time with a timezone, got {_kind(value)}", field
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise PlanError(
            f"expected an ISO 8601 time with a timezone (e.g. Z or +01:00), "
            f"got {value!r} without one",
            field,
        )
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError:
        raise PlanError(
            f"expected a time within years 1 to 9999, got {value!r}", field
        ) from None


def _finite(value: object, field: str, *, required: bool = False) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"expected a number, got {_kind(value)}", field)
    number = float(value)
    if not math.isfinite(number):
        raise PlanError(f"expected a finite number, got {value!r}", field)
    return number


def _check_keys(body: Mapping[Any, Any], allowed: frozenset[str], field: str) -> None:
    for key in body:
        if key not in allowed:
            where = f"{field}.{key}" if field else str(key)
            raise PlanError(
                f"unknown field; expected one of {', '.join(sorted(allowed))}",
                where[:200],
            )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"{shown!r} (a string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _from_ts(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


@dataclasses.dataclass(slots=True)
class _Held:
    """A plan held by the schedule, with its order of receipt."""

    plan: Plan
    order: int


class Schedule:
    """The plans held and which interval each pump follows.

    Plans are kept in order of receipt. For each pump the schedule answers
    which interval applies at a time (:meth:`effective`) and when that may
    next change (:meth:`next_change`).
    """

    def __init__(self) -> None:
        self._plans: dict[str, _Held] = {}
        self._by_pump: dict[int, list[tuple[int, PumpPlan, Plan]]] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, plan_id: str) -> Plan | None:
        held = self._plans.get(plan_id)
        return held.plan if held is not None else None

    def plans(self) -> list[Plan]:
        """The plans, oldest receipt first."""
        return [held.plan for held in sorted(self._plans.values(), key=_order)]

    def add(self, plan: Plan) -> Plan | None:
        """Hold ``plan`` as the newest; return the version it replaced."""
        previous = self._plans.pop(plan.plan_id, None)
        if previous is not None:
            self._drop_pumps(previous)

        self._order += 1
        held = _Held(plan, self._order)
        self._plans[plan.plan_id] = held
        for pump in plan.pumps:
            self._by_pump.setdefault(pump.pump, []).append((held.order, pump, plan))
        return previous.plan if previous is not None else None

    def remove(self, plan_id: str) -> None:
        held = self._plans.pop(plan_id, None)
        if held is not None:
            self._drop_pumps(held)

    def pumps_of(self, plan: Plan) -> Iterable[int]:
        return (pump.pump for pump in plan.pumps)

    def effective(
        self, pump: int, ts: float, received_by: dt.datetime | None = None
    ) -> tuple[Plan, int, Interval] | None:
        """The plan, interval index and interval pump ``pump`` follows at ``ts``.

        With ``received_by``, only plans received by then are considered.
        """
        entries = self._by_pump.get(pump)
        if not entries:
            return None

        for _, pump_plan, plan in reversed(entries):
            if received_by is not None and plan.received_at > received_by:
                continue
            index = pump_plan.covering(ts)
            if index is not None:
                return plan, index, pump_plan.intervals[index]
        return None

    def next_change(self, pump: int, ts: float) -> float | None:
        """The first time after ``ts`` at which :meth:`effective` may change."""
        entries = self._by_pump.get(pump)
        if not entries:
            return None

        times = [
            boundary
            for _, pump_plan, _ in entries
            if (boundary := pump_plan.next_boundary(ts)) is not None
        ]
        return min(times) if times else None

    def newest_for(self, pumps: range) -> Plan | None:
        """The most recently received plan naming any pump in ``pumps``."""
        best: tuple[int, Plan] | None = None
        for pump in pumps:
            entries = self._by_pump.get(pump)
            if entries and (best is None or entries[-1][0] > best[0]):
                best = (entries[-1][0], entries[-1][2])
        return best[1] if best is not None else None

    def _drop_pumps(self, held: _Held) -> None:
        for pump in held.plan.pumps:
            entries = self._by_pump.get(pump.pump, [])
            entries[:] = [entry for entry in entries if entry[0] != held.order]
            if not entries:
                self._by_pump.pop(pump.pump, None)


def _order(held: _Held) -> int:
    return held.order


def last_end_for(plan: Plan, pumps: range) -> float | None:
    """The latest interval end the plan gives any pump in ``pumps``."""
    ends = [pump.intervals[-1].end_ts for pump in plan.pumps if pump.pump in pumps]
    return max(ends) if ends else None
