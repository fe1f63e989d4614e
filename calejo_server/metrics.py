"""Prometheus metrics of one adapter.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the
process-wide default one), so several adapters or test apps can live in
one interpreter. Counters and histograms are updated on the request path;
the live state (emergency stops, failsafe stations, storage) is read from
the engine and the storage at scrape time, so it costs nothing between
scrapes. Setpoint outcomes are counted by the front end that answers
them (:meth:`Metrics.count_setpoint`).

Names, all prefixed ``calejo_``:

=======================================  =========  ==========================
name                                     type       labels
=======================================  =========  ==========================
http_requests_total                      counter    route, method, status
http_request_duration_seconds            histogram  route, method, status
setpoints_total                          counter    outcome
emergency_stops_active                   gauge
failsafe_stations                        gauge
stations                                 gauge
storage_errors_total                     counter
storage_spooled_records                  gauge
storage_state                            gauge      state (1 for the current)
engine_ticks_total                       counter
engine_tick_duration_seconds             gauge      (the last tick)
engine_tick_lag_seconds                  gauge      (the last tick)
engine_max_tick_lag_seconds              gauge
=======================================  =========  ==========================

The Modbus TCP server adds its own at scrape time (its ``collect``):
``modbus_connections`` (gauge), ``modbus_connections_accepted_total``,
``modbus_connections_refused_total`` (reason: limit, address),
``modbus_connections_closed_total`` (reason: idle, broken),
``modbus_frames_total``, ``modbus_exceptions_total``,
``modbus_writes_total`` (result: stored, refused) and
``plc_heartbeat_lost_stations`` (gauge).

The process itself, unprefixed as Prometheus names them on Linux:
``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_virtual_memory_bytes``, ``process_open_fds``,
``process_max_fds`` and ``process_start_time_seconds``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]

REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
UNMATCHED_ROUTE = "<unmatched>"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Incrementer(Protocol):
    def inc(self, amount: float = 1) -> None: ...


LiveSource = Callable[[], Iterable[Metric]]


class Metrics:
    """The metrics of one adapter, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

        self.http_requests = Counter(
            "calejo_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.http_request_duration = Histogram(
            "calejo_http_request_duration_seconds",
            "Time from request to the end of the answer, in seconds.",
            ("route", "method", "status"),
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.setpoints = Counter(
            "calejo_setpoints",
            "Setpoint requests, by outcome (accepted, clamped, rejected, blocked).",
            ("outcome",),
            registry=self.registry,
        )

        self._request_children: dict[
            tuple[str, str, int], tuple[_Incrementer, _Observer]
        ] = {}
        self._setpoint_children: dict[str, _Incrementer] = {}
        self._live = _LiveCollector()
        self.registry.register(self._live)
        ProcessCollector(registry=self.registry)

    def observe_request(
        self, route: str, method: str, status: int, seconds: float
    ) -> None:
        """Count one answered request and its duration."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            label = str(status)
            children = (
                self.http_requests.labels(route, method, label),
                self.http_request_duration.labels(route, method, label),
            )
            self._request_children[key] = children

        children[0].inc()
        children[1].observe(seconds)

    def count_setpoint(self, outcome: str, amount: int = 1) -> None:
        """Count ``amount`` setpoint requests that ended in ``outcome``."""
        child = self._setpoint_children.get(outcome)
        if child is None:
            child = self.setpoints.labels(outcome)
            self._setpoint_children[outcome] = child

        child.inc(amount)

    def add_live_source(self, source: LiveSource) -> None:
        """Add a callable that yields metric families at scrape time."""
        self._live.sources.append(source)

    def bind_engine(self, engine: Any) -> None:
        """Report the engine's live state (stations, e-stops, ticks) at scrapes."""
        self.add_live_source(lambda: _engine_metrics(engine))

    def bind_storage(self, storage: Any) -> None:
        """Report the storage's health (state, spool, errors)."""
        self.add_live_source(lambda: _storage_metrics(storage))

    def render(self) -> bytes:
        """The whole registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Collects the metric families of the live sources at each scrape."""

    def __init__(self) -> None:
        self.sources: list[LiveSource] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            try:
                yield from source()
            except Exception:
                logger.exception("metrics: a live source failed; skipped")

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _engine_metrics(engine: Any) -> Iterator[Metric]:
    stations = engine.stations()
    failsafe = sum(1 for station in stations if station.failsafe)
    yield _gauge("calejo_stations", "Stations served by this adapter.", len(stations))
    yield _gauge(
        "calejo_failsafe_stations",
        "Stations in failsafe (no fresh setpoint or plan in time).",
        failsafe,
    )

    stops = engine.system_emergency_stop().stops
    yield _gauge(
        "calejo_emergency_stops_active",
        "Latched emergency stops, at every level.",
        len(stops),
    )

    health = engine.health()
    ticks = CounterMetricFamily("calejo_engine_ticks", "Engine ticks since start.")
    ticks.add_metric([], float(health.ticks))
    yield ticks
    yield _gauge(
        "calejo_engine_tick_duration_seconds",
        "How long the last engine tick took, in seconds.",
        health.tick_duration,
    )
    yield _gauge(
        "calejo_engine_tick_lag_seconds",
        "How late the last engine tick started, in seconds.",
        health.tick_lag,
    )
    yield _gauge(
        "calejo_engine_max_tick_lag_seconds",
        "The latest any engine tick started since start, in seconds.",
        health.max_tick_lag,
    )


def _storage_metrics(storage: Any) -> Iterator[Metric]:
    health = storage.health()

    errors = CounterMetricFamily(
        "calejo_storage_errors",
        "Database operations that failed since start.",
    )
    errors.add_metric([], float(health.errors))
    yield errors

    yield _gauge(
        "calejo_storage_spooled_records",
        "Records waiting in the local spool for the database.",
        float(health.spooled),
    )

    state = GaugeMetricFamily(
        "calejo_storage_state",
        "Storage state: 1 for the current one of ok, degraded, down.",
        labels=("state",),
    )
    for name in ("ok", "degraded", "down"):
        state.add_metric([name], 1.0 if health.state == name else 0.0)
    yield state


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], float(value))
    return gauge


def route_template(scope: Scope, root_path: str = "") -> str:
    """The template of the route that answered, with any mount prefix."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED_ROUTE

    mounted = scope.get("root_path", "")
    if isinstance(mounted, str) and mounted.startswith(root_path):
        return mounted[len(root_path) :] + path
    return path
