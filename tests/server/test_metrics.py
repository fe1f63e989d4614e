"""Request and setpoint counts render as prometheus-client's own types would."""

from __future__ import annotations

import re

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from calejo_server.metrics import REQUEST_BUCKETS, Metrics

OBSERVED = [
    ("/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint", "PUT", 200, 0.0007),
    ("/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint", "PUT", 200, 0.001),
    ("/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint", "PUT", 422, 0.0),
    ("/api/v1/health", "GET", 200, 0.0031),
    ("<unmatched>", "GET", 404, 7.5),
    ("/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint", "PUT", 200, 5.0),
]
OUTCOMES = [("accepted", 1), ("clamped", 1), ("accepted", 3), ("rejected", 2)]
CREATED = re.compile(r"^(\w+_created\{.*\}) \S+$", re.MULTILINE)


def _reference() -> bytes:
    registry = CollectorRegistry()
    requests = Counter(
        "calejo_http_requests",
        "HTTP requests answered, by route template, method and status.",
        ("route", "method", "status"),
        registry=registry,
    )
    duration = Histogram(
        "calejo_http_request_duration_seconds",
        "Time from request to the end of the answer, in seconds.",
        ("route", "method", "status"),
        buckets=REQUEST_BUCKETS,
        registry=registry,
    )
    setpoints = Counter(
        "calejo_setpoints",
        "Setpoint requests, by outcome (accepted, clamped, rejected, blocked).",
        ("outcome",),
        registry=registry,
    )
    for route, method, status, seconds in OBSERVED:
        requests.labels(route, method, str(status)).inc()
        duration.labels(route, method, str(status)).observe(seconds)
    for outcome, amount in OUTCOMES:
        setpoints.labels(outcome).inc(amount)
    return generate_latest(registry)


def _counted() -> bytes:
    metrics = Metrics()
    for route, method, status, seconds in OBSERVED:
        metrics.observe_request(route, method, status, seconds)
    for outcome, amount in OUTCOMES:
        metrics.count_setpoint(outcome, amount)
    text = metrics.render().decode()
    return text[: text.index("# HELP process_")].encode()


def _without_times(text: bytes) -> str:
    return CREATED.sub(r"\1 <time>", text.decode())


def test_counts_render_exactly_as_prometheus_client_types() -> None:
    assert _without_times(_counted()) == _without_times(_reference())


def test_nothing_counted_renders_the_bare_families() -> None:
    text = Metrics().render().decode()

    assert "# TYPE calejo_http_requests_total counter" in text
    assert "# TYPE calejo_http_request_duration_seconds histogram" in text
    assert "# TYPE calejo_setpoints_total counter" in text
    assert "calejo_setpoints_total{" not in text


def test_created_series_follow_the_library_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)

    assert _counted() == _reference()
    assert b"_created" not in _counted()
