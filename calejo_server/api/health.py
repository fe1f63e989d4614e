"""The health of the adapter, component by component.

A :class:`HealthRegistry` holds one check per component. The REST API
registers storage, the engine and the watchdog; the front ends that come
later (Modbus, OPC UA, alerts) start out as ``not_configured`` and replace
that entry with their own check when they start::

    unregister = registry.register("modbus", modbus_server.health)

The adapter's status is the worst state of the components that count
(``critical``): ``down`` when any is down, else ``degraded`` when any is
degraded, else ``ok``. The watchdog does not count: a station in failsafe
is the process asking for attention (the station status says so), not
the adapter failing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from calejo_server.engine import Engine
    from calejo_server.storage.base import Storage

logger = logging.getLogger(__name__)

ComponentState = Literal["ok", "degraded", "down", "not_configured"]
Status = Literal["ok", "degraded", "down"]
_RANK: dict[str, int] = {"ok": 0, "not_configured": 0, "degraded": 1, "down": 2}


@dataclasses.dataclass(frozen=True, slots=True)
class ComponentHealth:
    """The state of one component, a sentence, and figures (JSON values)."""

    state: ComponentState
    detail: str
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    critical: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**self.data, "state": self.state, "detail": self.detail}


Check = Callable[[], ComponentHealth]


class HealthRegistry:
    """Named health checks; each is called at every health request."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def register(self, name: str, check: Check) -> Callable[[], None]:
        """Add or replace the check of ``name``; returns its remover."""
        self._checks[name] = check

        def unregister() -> None:
            if self._checks.get(name) is check:
                self.not_configured(name)

        return unregister

    def not_configured(self, name: str, detail: str | None = None) -> None:
        """Mark ``name`` as a component that is not running in this adapter."""
        health = ComponentHealth(
            "not_configured", detail or f"{name} is not configured", critical=False
        )
        self._checks[name] = lambda: health

    def names(self) -> list[str]:
        return list(self._checks)

    def check(self) -> tuple[Status, dict[str, ComponentHealth]]:
        """The overall status and the health of each component."""
        results: dict[str, ComponentHealth] = {}
        for name, check in self._checks.items():
            try:
                results[name] = check()
            except Exception as exc:
                logger.exception("health check of %s failed", name)
                results[name] = ComponentHealth("down", f"health check failed: {exc!r}")

        worst = 0
        for health in results.values():
            if health.critical:
                worst = max(worst, _RANK.get(health.state, 2))
        status: Status = ("ok", "degraded", "down")[worst]
        return status, results


def storage_check(storage: Storage) -> Check:
    """The health of the storage as it reports it (no database round trip)."""

    def check() -> ComponentHealth:
        health = storage.health()
        return ComponentHealth(
            health.state,
            health.detail,
            {
                "backend": health.backend,
                "spooled": health.spooled,
                "errors": health.errors,
                "last_error": health.last_error,
            },
        )

    return check


def engine_check(engine: Engine) -> Check:
    """Down when not running or not ticking; degraded when ticks are late."""

    def check() -> ComponentHealth:
        health = engine.health()
        data = {
            "running": health.running,
            "ticks": health.ticks,
            "last_tick_at": _iso(health.last_tick_at),
            "tick_interval": health.tick_interval,
            "tick_lag": health.tick_lag,
            "max_tick_lag": health.max_tick_lag,
            "tick_duration": health.tick_duration,
            "heartbeat": health.heartbeat,
            "pending_records": health.pending_records,
        }

        if health.status == "down":
            return ComponentHealth("down", "the engine is not ticking", data)
        if health.tick_lag > health.tick_interval:
            return ComponentHealth(
                "degraded",
                f"engine ticks are late by {health.tick_lag * 1000:.1f} ms",
                data,
            )
        if health.status == "degraded":
            return ComponentHealth(
                "degraded", f"the engine reports storage {health.storage}", data
            )
        return ComponentHealth("ok", "the engine is ticking", data)

    return check


def watchdog_check(engine: Engine) -> Check:
    """Which stations are in failsafe; reported, not counted."""

    def check() -> ComponentHealth:
        stations = engine.health().stations
        failsafe = [s.station_id for s in stations if s.failsafe]
        detail = (
            f"{len(failsafe)} of {len(stations)} station(s) in failsafe"
            if failsafe
            else f"all {len(stations)} station(s) fresh"
        )
        return ComponentHealth(
            "degraded" if failsafe else "ok",
            detail,
            {"stations": {s.station_id: s.to_dict() for s in stations}},
            critical=False,
        )

    return check


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None
