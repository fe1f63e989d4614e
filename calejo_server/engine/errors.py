"""The errors of the control engine; the REST API maps each to a status."""

from __future__ import annotations

__all__ = [
    "EmergencyStopConflict",
    "EngineError",
    "InvalidRequest",
    "PlanConflict",
    "PlanError",
    "UnknownPump",
    "UnknownStation",
]


class EngineError(Exception):
    """The engine refused a request; nothing was changed."""


class InvalidRequest(EngineError, ValueError):
    """An argument the engine cannot use (422): which one, and why."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class UnknownStation(EngineError, LookupError):
    """No station has this id (404)."""

    def __init__(self, station_id: str, field: str | None = None) -> None:
        where = f"{field}: " if field else ""
        super().__init__(f"{where}unknown station {_shown(station_id)}")
        self.station_id = station_id
        self.field = field


class UnknownPump(EngineError, LookupError):
    """The station has no pump with this id (404)."""

    def __init__(self, station_id: str, pump_id: str, field: str | None = None) -> None:
        where = f"{field}: " if field else ""
        super().__init__(
            f"{where}unknown pump {_shown(pump_id)} at station {_shown(station_id)}"
        )
        self.station_id = station_id
        self.pump_id = pump_id
        self.field = field


class PlanError(EngineError, ValueError):
    """A plan that cannot be followed (422); ``field`` names the part."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


class PlanConflict(EngineError):
    """A plan whose version is not newer than the one held (409)."""

    def __init__(self, plan_id: str, version: int, current: int) -> None:
        super().__init__(
            f"plan {_shown(plan_id)}: expected a version above {current}, got {version}"
        )
        self.plan_id = plan_id
        self.version = version
        self.current = current


class EmergencyStopConflict(EngineError):
    """Clearing an emergency stop that is not active (409)."""


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= 64 else text[:61] + "...")
