"""The engine's sense of time: a monotonic clock for the gate, UTC for records."""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol

from calejo_server.storage.base import utcnow

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """What the engine reads the time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (any origin)."""
        ...

    def utcnow(self) -> dt.datetime:
        """The wall-clock time, timezone-aware, in UTC."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def utcnow(self) -> dt.datetime:
        return utcnow()


class ManualClock:
    """A clock that moves only when told: both readings advance together."""

    def __init__(
        self, start: dt.datetime | None = None, monotonic: float = 1000.0
    ) -> None:
        start = start if start is not None else utcnow()
        if start.tzinfo is None:
            raise ValueError("expected a timezone-aware start time, got a naive one")
        self._wall = start.astimezone(dt.UTC)
        self._monotonic = float(monotonic)

    def monotonic(self) -> float:
        return self._monotonic

    def utcnow(self) -> dt.datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds`` (not negative)."""
        if not seconds >= 0.0:
            raise ValueError(f"expected seconds >= 0, got {seconds!r}")
        self._monotonic += seconds
        self._wall += dt.timedelta(seconds=seconds)
