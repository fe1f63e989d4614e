"""Throttling of source addresses that fail to authenticate.

Each failed authentication (a wrong login, an unknown, expired or missing
token) counts against the source address it came from. A source with
more than ``limit`` failures within ``window`` seconds is blocked for
``block`` seconds: its login attempts and its requests without a valid
token are refused at once, without being checked or recorded one by one.
Requests carrying a valid token are never blocked.
"""

from __future__ import annotations

import collections
import math

UNKNOWN_SOURCE = "unknown"


class SourceThrottle:
    """Failure counts per source address over a sliding window.

    Memory stays bounded: at most ``max_sources`` sources are tracked;
    beyond that the oldest entries are forgotten first.
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        block: float = 60.0,
        max_sources: int = 100_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self.block = block
        self.max_sources = max_sources
        self._failures: dict[str, collections.deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def retry_after(self, source: str | None, now: float) -> float | None:
        """Seconds until ``source`` may try again, or None if not blocked."""
        until = self._blocked.get(source or UNKNOWN_SOURCE)
        if until is None:
            return None

        if now >= until:
            del self._blocked[source or UNKNOWN_SOURCE]
            return None
        return until - now

    def failure(self, source: str | None, now: float) -> bool:
        """Count one failure; True when it makes the source blocked."""
        key = source or UNKNOWN_SOURCE
        failures = self._failures.get(key)
        if failures is None:
            self._make_room()
            failures = self._failures[key] = collections.deque()

        failures.append(now)
        horizon = now - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()

        if len(failures) <= self.limit:
            return False

        failures.clear()
        self._blocked[key] = now + self.block
        return True

    def sweep(self, now: float) -> None:
        """Forget windows and blocks that have passed."""
        horizon = now - self.window
        for key in [k for k, f in self._failures.items() if not f or f[-1] <= horizon]:
            del self._failures[key]

        for key in [k for k, until in self._blocked.items() if until <= now]:
            del self._blocked[key]

    def _make_room(self) -> None:
        while len(self._failures) >= self.max_sources:
            oldest = next(iter(self._failures))
            del self._failures[oldest]


def retry_after_header(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
