"""Events of the engine (changes and alerts) and the subscribers to them."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from calejo_server.storage.base import Severity

__all__ = [
    "EMERGENCY_STOP",
    "EMERGENCY_STOP_CLEARED",
    "FAILSAFE_ENTERED",
    "FAILSAFE_EXITED",
    "PLAN",
    "PLC_HEARTBEAT_LOST",
    "PLC_HEARTBEAT_RESTORED",
    "SETPOINT",
    "STORAGE_DEGRADED",
    "STORAGE_RECOVERED",
    "EngineEvent",
    "EventHub",
]

logger = logging.getLogger(__name__)

SETPOINT: Final = "setpoint"
EMERGENCY_STOP: Final = "emergency_stop"
EMERGENCY_STOP_CLEARED: Final = "emergency_stop_cleared"
FAILSAFE_ENTERED: Final = "failsafe_entered"
FAILSAFE_EXITED: Final = "failsafe_exited"
STORAGE_DEGRADED: Final = "storage_degraded"
STORAGE_RECOVERED: Final = "storage_recovered"
PLAN: Final = "plan"
PLC_HEARTBEAT_LOST: Final = "plc_heartbeat_lost"
PLC_HEARTBEAT_RESTORED: Final = "plc_heartbeat_restored"


@dataclasses.dataclass(frozen=True, slots=True)
class EngineEvent:
    """Something that changed in the engine.

    ``kind`` is one of the module's constants, ``details`` carries values
    of the change (for a setpoint: outcome, target and applied, in the
    pump's units).
    """

    kind: str
    severity: Severity
    station_id: str | None
    pump_id: str | None
    message: str
    at: dt.datetime
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "station_id": self.station_id,
            "pump_id": self.pump_id,
            "message": self.message,
            "at": self.at.isoformat(),
            "details": dict(self.details),
        }


Subscriber = Callable[[EngineEvent], None]


class EventHub:
    """Calls every subscriber with each event, in subscription order.

    A subscriber takes every kind of event or only the kinds it names, so
    that the engine can skip building an event nobody takes
    (:meth:`wants`). Subscribers run synchronously on the engine's event
    loop and must not block; one that raises is logged and does not stop
    the others.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, frozenset[str] | None]] = []
        self._wanted: frozenset[str] | None = frozenset()

    def subscribe(
        self, callback: Subscriber, kinds: Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Add ``callback`` for ``kinds`` (every kind when None).

        The returned function removes it again.
        """
        entry = (callback, frozenset(kinds) if kinds is not None else None)
        self._subscribers.append(entry)
        self._update_wanted()

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(entry)
            self._update_wanted()

        return unsubscribe

    def __bool__(self) -> bool:
        return bool(self._subscribers)

    def wants(self, kind: str) -> bool:
        """Whether any subscriber takes events of ``kind``."""
        wanted = self._wanted
        return wanted is None or kind in wanted

    def emit(self, event: EngineEvent) -> None:
        for callback, kinds in tuple(self._subscribers):
            if kinds is not None and event.kind not in kinds:
                continue
            try:
                callback(event)
            except Exception:
                logger.exception(
                    "event subscriber %r failed on a %s event; continuing",
                    callback,
                    event.kind,
                )

    def _update_wanted(self) -> None:
        wanted: set[str] = set()
        for _, kinds in self._subscribers:
            if kinds is None:
                self._wanted = None
                return
            wanted |= kinds
        self._wanted = frozenset(wanted)
