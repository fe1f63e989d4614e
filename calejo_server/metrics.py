"""Prometheus metrics of one adapter.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the
process-wide default one), so several adapters or test apps can live in
one interpreter. Requests and setpoint outcomes are counted on the
request path in plain Python numbers (one dict lookup and a few additions,
no lock: only the event loop's thread counts) and turned into the same
counter and histogram families prometheus-client's own types would give
when the registry is scraped; the live state (emergency stops, failsafe
stations, storage) is read from the engine and the storage at scrape
time, so it costs nothing between scrapes. Setpoint outcomes are counted
by the front end that answers them (:meth:`Metrics.count_setpoint`).

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

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, cast

import prometheus_client.metrics
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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
BUCKET_BOUNDS = (*REQUEST_BUCKETS, math.inf)
BUCKET_LABELS: tuple[str, ...] = tuple(
    cast(Callable[[float], str], floatToGoString)(bound) for bound in BUCKET_BOUNDS
)
"""The ``le`` label of each bucket, written as prometheus-client writes it."""
UNMATCHED_ROUTE = "<unmatched>"
CONTENT_TYPE = CONTENT_TYPE_LATEST


LiveSource = Callable[[], Iterable[Metric]]

REQUESTS = "calejo_http_requests"
REQUESTS_HELP = "HTTP requests answered, by route template, method and status."
DURATION = "calejo_http_request_duration_seconds"
DURATION_HELP = "Time from request to the end of the answer, in seconds."
SETPOINTS = "calejo_setpoints"
SETPOINTS_HELP = "Setpoint requests, by outcome (accepted, clamped, rejected, blocked)."


class _RequestSeries:
    """The counts of one (route, method, status)."""

    __slots__ = ("buckets", "count", "created", "labels", "total")

    def __init__(self, route: str, method: str, status: int) -> None:
        self.labels = {"route": route, "method": method, "status": str(status)}
        self.created = time.time()
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * len(BUCKET_BOUNDS)


class Metrics:
    """The metrics of one adapter, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

        self._requests: dict[tuple[str, str, int], _RequestSeries] = {}
        self._setpoints: dict[str, list[float]] = {}
        self.registry.register(_CountsCollector(self))
        self._live = _LiveCollector()
        self.registry.register(self._live)
        ProcessCollector(registry=self.registry)

    def observe_request(
        self, route: str, method: str, status: int, seconds: float
    ) -> None:
        """Count one answered request and its duration."""
        key = (route, method, status)
        series = self._requests.get(key)
        if series is None:
            series = self._requests[key] = _RequestSeries(route, method, status)

        series.count += 1
        series.total += seconds
        series.buckets[bisect.bisect_left(BUCKET_BOUNDS, seconds)] += 1

    def count_setpoint(self, outcome: str, amount: int = 1) -> None:
        """Count ``amount`` setpoint requests that ended in ``outcome``."""
        counted = self._setpoints.get(outcome)
        if counted is None:
            counted = self._setpoints[outcome] = [0.0, time.time()]

        counted[0] += amount

    def families(self) -> list[Metric]:
        """The request and setpoint counts, as prometheus-client renders them.

        The samples, their labels and their order are those of a labelled
        ``Counter`` and ``Histogram``: ``_total`` (and ``_created``) per
        child; ``_bucket`` per bound with ``le`` (cumulative), ``_count``,
        ``_sum`` (and ``_created``).
        """
        created = getattr(prometheus_client.metrics, "_use_created", True)
        requests = Metric(REQUESTS, REQUESTS_HELP, "counter")
        duration = Metric(DURATION, DURATION_HELP, "histogram")

        for series in list(self._requests.values()):
            labels = series.labels
            requests.samples.append(
                Sample(REQUESTS + "_total", dict(labels), float(series.count))
            )
            if created:
                requests.samples.append(
                    Sample(REQUESTS + "_created", dict(labels), series.created)
                )

            cumulative = 0.0
            for bound, observed in zip(BUCKET_LABELS, series.buckets, strict=True):
                cumulative += observed
                duration.samples.append(
                    Sample(DURATION + "_bucket", {**labels, "le": bound}, cumulative)
                )
            duration.samples.append(
                Sample(DURATION + "_count", dict(labels), cumulative)
            )
            duration.samples.append(
                Sample(DURATION + "_sum", dict(labels), series.total)
            )
            if created:
                duration.samples.append(
                    Sample(DURATION + "_created", dict(labels), series.created)
                )

        setpoints = Metric(SETPOINTS, SETPOINTS_HELP, "counter")
        for outcome, (count, since) in list(self._setpoints.items()):
            setpoints.samples.append(
                Sample(SETPOINTS + "_total", {"outcome": outcome}, count)
            )
            if created:
                setpoints.samples.append(
                    Sample(SETPOINTS + "_created", {"outcome": outcome}, since)
                )
        return [requests, duration, setpoints]

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


class _CountsCollector(Collector):
    """Renders the request and setpoint counts of one :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics.families())

    def describe(self) -> Iterator[Metric]:
        return iter(
            (
                Metric(REQUESTS, REQUESTS_HELP, "counter"),
                Metric(DURATION, DURATION_HELP, "histogram"),
                Metric(SETPOINTS, SETPOINTS_HELP, "counter"),
            )
        )


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
