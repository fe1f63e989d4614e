"""``calejo performance``: measure a running adapter and judge it by its KPIs.

``test``
    times requests on read-only paths of the REST API (``/health``,
    ``/status`` and, with ``--user``, the station and pump reads) and,
    with ``--modbus-port``, Modbus TCP reads of holding registers
    (function code 3). It writes setpoints only when the operator names a
    station, a pump and a value (``--station``, ``--pump``,
    ``--setpoint``). Prints p50, p95, p99 and the slowest per path.
``report``
    reads ``/metrics`` twice, ``--window`` seconds apart, and prints the
    request latency quantiles (estimated from the histograms), setpoint
    outcomes, engine tick lag, storage state and errors, process CPU and
    resident memory, Modbus connections and, when the configuration names
    PostgreSQL, the database connections (``pg_stat_activity``).
``analysis``
    the same figures, each judged against its threshold.
``monitor``
    one line of the main figures every ``--interval`` seconds, ``--count``
    lines.

The thresholds (:data:`KPIS`): REST response time p95 under 100 ms,
alert over 500 ms; process CPU under 50 % of one core, alert over 80 %;
resident memory under 300 MB, alert over 500 MB; engine tick lag under
half the tick interval, alert over the whole interval; database
connections under 50 % of ``max_connections``, alert over 80 %; Modbus
connections under 80 % of ``modbus.max_connections``, alert over 95 %;
storage spool empty and storage state ok.

Exit codes: 0 done (``test`` and ``analysis``: nothing over an alert
threshold and no failed request), 1 a figure over its alert threshold or
failed requests, 2 the adapter unreachable or a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import json
import math
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from prometheus_client.parser import text_string_to_metric_families

from calejo_server.config import Config, ConfigError, load_config
from calejo_server.ops import remote as remote_mod
from calejo_server.ops.remote import Remote, RemoteError

EXIT_OK: Final = 0
EXIT_ALERT: Final = 1
EXIT_UNREACHABLE: Final = 2

REQUEST_HISTOGRAM: Final = "calejo_http_request_duration_seconds"
METRICS_ROUTE: Final = "/api/v1/metrics"
MB: Final = 1_000_000

Verdict = Literal["ok", "warning", "alert", "info"]


@dataclasses.dataclass(frozen=True, slots=True)
class Kpi:
    """A figure's target (ok at or below) and alert threshold (alert above)."""

    name: str
    unit: str
    target: float
    alert: float

    def judge(self, value: float) -> Verdict:
        if value <= self.target:
            return "ok"
        if value <= self.alert:
            return "warning"
        return "alert"

    def text(self) -> str:
        return (
            f"target < {self.target:g} {self.unit}, alert > {self.alert:g} {self.unit}"
        )


RESPONSE_TIME: Final = Kpi("response time p95", "ms", 100.0, 500.0)
CPU: Final = Kpi("process cpu", "%", 50.0, 80.0)
MEMORY: Final = Kpi("resident memory", "MB", 300.0, 500.0)
DB_CONNECTIONS: Final = Kpi("database connections", "%", 50.0, 80.0)
MODBUS_CONNECTIONS: Final = Kpi("modbus connections", "%", 80.0, 95.0)

KPIS: Final = (RESPONSE_TIME, CPU, MEMORY, DB_CONNECTIONS, MODBUS_CONNECTIONS)
"""The thresholds with fixed values; the tick lag's follow the tick interval."""


# -- /metrics -----------------------------------------------------------------


Labels = Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Scrape:
    """One reading of ``/metrics``: samples by name, and when it was taken."""

    at: float
    samples: Mapping[str, tuple[tuple[Labels, float], ...]]

    @classmethod
    def parse(cls, text: str, at: float = 0.0) -> Scrape:
        """Parse the Prometheus text format; ``ValueError`` when it is not."""
        found: dict[str, list[tuple[Labels, float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(
                    (dict(sample.labels), float(sample.value))
                )
        return cls(at, {name: tuple(rows) for name, rows in found.items()})

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of ``name``'s samples that carry ``labels``; None if absent."""
        rows = self.samples.get(name)
        if rows is None:
            return None
        return sum(
            value
            for row_labels, value in rows
            if all(row_labels.get(k) == v for k, v in labels.items())
        )

    def histogram(
        self, name: str, keep: Callable[[Labels], bool] = lambda _: True
    ) -> Histogram:
        """The buckets of ``name`` summed over the label sets ``keep`` accepts."""
        buckets: dict[float, float] = {}
        for labels, value in self.samples.get(f"{name}_bucket", ()):
            if not keep(labels):
                continue
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value

        def total(suffix: str) -> float:
            return sum(
                value
                for labels, value in self.samples.get(f"{name}_{suffix}", ())
                if keep(labels)
            )

        return Histogram(tuple(sorted(buckets.items())), total("count"), total("sum"))

    def label_values(self, name: str, label: str) -> list[str]:
        seen: dict[str, None] = {}
        for labels, _ in self.samples.get(name, ()):
            if label in labels:
                seen[labels[label]] = None
        return list(seen)


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative buckets ``(upper bound, count)``, the count and the sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, interpolated inside its bucket (as Prometheus'
        ``histogram_quantile``); the largest finite bound when it falls in
        the last bucket; None without observations."""
        if self.count <= 0 or not self.buckets:
            return None

        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        finite = [bound for bound, _ in self.buckets if math.isfinite(bound)]
        for bound, count in self.buckets:
            if count >= rank:
                if not math.isfinite(bound):
                    return finite[-1] if finite else None
                if count == lower_count:
                    return bound
                share = (rank - lower_count) / (count - lower_count)
                return lower_bound + (bound - lower_bound) * share
            lower_bound, lower_count = bound, count
        return finite[-1] if finite else None

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made since ``earlier`` (same buckets)."""
        before = dict(earlier.buckets)
        return Histogram(
            tuple(
                (bound, max(0.0, count - before.get(bound, 0.0)))
                for bound, count in self.buckets
            ),
            max(0.0, self.count - earlier.count),
            max(0.0, self.sum - earlier.sum),
        )


def not_metrics_route(labels: Labels) -> bool:
    """Every route but ``/metrics`` itself (monitoring, not clients)."""
    return labels.get("route") != METRICS_ROUTE


def scrape(remote: Remote) -> Scrape:
    """Read ``/metrics``; :class:`RemoteError` when it cannot be read."""
    answer = remote.get("/metrics")
    if answer.status != 200:
        raise RemoteError(f"{remote.api}/metrics answered {answer.status}")
    try:
        return Scrape.parse(answer.body.decode("utf-8"), time.monotonic())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteError(
            f"{remote.api}/metrics: expected the Prometheus text format, "
            f"could not parse it ({exc})"
        ) from exc


# -- the figures ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    """One figure of a report, its unit, and how it compares with its KPI."""

    section: str
    name: str
    value: float | None
    unit: str
    verdict: Verdict = "info"
    threshold: str = ""
    detail: str = ""
    text: str | None = None

    def shown(self) -> str:
        if self.text is not None:
            return self.text
        if self.value is None:
            return "-"
        if self.unit == "count":
            return f"{self.value:.0f}"
        return f"{self.value:.{_places(self.value)}f} {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "verdict": self.verdict,
            "threshold": self.threshold,
            "detail": self.detail,
            "text": self.text,
        }


def _places(value: float) -> int:
    magnitude = abs(value)
    if magnitude >= 100 or magnitude == 0:
        return 0 if magnitude.is_integer() or magnitude >= 100 else 1
    if magnitude >= 10:
        return 1
    return 2


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """What the figures need besides ``/metrics``."""

    status: Mapping[str, Any]
    components: Mapping[str, Any]
    database: DatabaseConnections | None


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseConnections:
    """PostgreSQL client connections: to the adapter's database, in all, allowed."""

    where: str
    ours: int
    total: int
    allowed: int
    error: str | None = None


def figures(before: Scrape, after: Scrape, context: Context) -> list[Figure]:
    """Every figure of the report, judged where a threshold applies."""
    window = max(after.at - before.at, 1e-9)
    found: list[Figure] = []
    found += _latency_figures(before, after, window)
    found += _setpoint_figures(before, after, window)
    found += _engine_figures(before, after, window, context)
    found += _storage_figures(before, after, context)
    found += _process_figures(before, after, window)
    found += _connection_figures(after, context)
    found += _plant_figures(after)
    return found


def _latency_figures(before: Scrape, after: Scrape, window: float) -> list[Figure]:
    since_start = after.histogram(REQUEST_HISTOGRAM, not_metrics_route)
    recent = since_start.minus(before.histogram(REQUEST_HISTOGRAM, not_metrics_route))
    section = "rest"
    found: list[Figure] = [
        Figure(
            section,
            "requests since start (without /metrics)",
            since_start.count,
            "count",
        ),
        Figure(
            section,
            "requests per second in the window",
            recent.count / window,
            "/s",
        ),
    ]

    # The p95 of the window is judged; without requests in the window,
    # the p95 since start.
    judged = recent if recent.count > 0 else since_start
    for label, histogram in (("since start", since_start), ("in the window", recent)):
        for q in (0.5, 0.95, 0.99):
            seconds = histogram.quantile(q)
            value = seconds * 1000 if seconds is not None else None
            verdict: Verdict = "info"
            threshold = ""
            if q == 0.95 and value is not None and histogram is judged:
                verdict, threshold = RESPONSE_TIME.judge(value), RESPONSE_TIME.text()
            found.append(
                Figure(
                    section,
                    f"response time p{round(q * 100)} {label}",
                    value,
                    "ms",
                    verdict,
                    threshold,
                    "" if value is not None else "no requests",
                )
            )

    for route in _busiest_routes(after):
        routed = after.histogram(REQUEST_HISTOGRAM, _route_is(route))
        p95 = routed.quantile(0.95)
        found.append(
            Figure(
                "routes (since start)",
                f"{route} p95",
                p95 * 1000 if p95 is not None else None,
                "ms",
                detail=f"{routed.count:.0f} requests",
            )
        )
    return found


def _route_is(route: str) -> Callable[[Labels], bool]:
    def keep(labels: Labels) -> bool:
        return labels.get("route") == route

    return keep


def _busiest_routes(scrape: Scrape, limit: int = 8) -> list[str]:
    counts: dict[str, float] = {}
    for labels, value in scrape.samples.get(f"{REQUEST_HISTOGRAM}_count", ()):
        route = labels.get("route", "")
        if route and route != METRICS_ROUTE:
            counts[route] = counts.get(route, 0.0) + value
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [route for route, _ in ranked[:limit]]


def _setpoint_figures(before: Scrape, after: Scrape, window: float) -> list[Figure]:
    found = []
    for outcome in ("accepted", "clamped", "rejected", "blocked"):
        total = after.value("calejo_setpoints_total", outcome=outcome) or 0.0
        earlier = before.value("calejo_setpoints_total", outcome=outcome) or 0.0
        found.append(
            Figure(
                "setpoints",
                f"{outcome} since start",
                total,
                "count",
                detail=f"{(total - earlier) / window:.1f}/s in the window",
            )
        )
    return found


def _engine_figures(
    before: Scrape, after: Scrape, window: float, context: Context
) -> list[Figure]:
    engine = context.components.get("engine")
    interval = 0.1
    if isinstance(engine, Mapping) and isinstance(
        engine.get("tick_interval"), int | float
    ):
        interval = float(engine["tick_interval"])
    lag = Kpi("tick lag", "ms", interval * 500, interval * 1000)

    found = []
    last = after.value("calejo_engine_tick_lag_seconds")
    if last is not None:
        found.append(
            Figure(
                "engine",
                "tick lag (last tick)",
                last * 1000,
                "ms",
                lag.judge(last * 1000),
                lag.text(),
            )
        )
    worst = after.value("calejo_engine_max_tick_lag_seconds")
    if worst is not None:
        found.append(
            Figure(
                "engine",
                "largest tick lag since start",
                worst * 1000,
                "ms",
                detail="start-up included",
            )
        )
    duration = after.value("calejo_engine_tick_duration_seconds")
    if duration is not None:
        found.append(
            Figure(
                "engine",
                "tick duration (last tick)",
                duration * 1000,
                "ms",
                lag.judge(duration * 1000),
                lag.text(),
            )
        )
    ticks_after = after.value("calejo_engine_ticks_total")
    ticks_before = before.value("calejo_engine_ticks_total")
    if ticks_after is not None and ticks_before is not None:
        found.append(
            Figure(
                "engine",
                "ticks per second",
                (ticks_after - ticks_before) / window,
                "/s",
                detail=f"tick interval {interval * 1000:g} ms",
            )
        )
    return found


def _storage_figures(before: Scrape, after: Scrape, context: Context) -> list[Figure]:
    found = []
    state = next(
        (
            labels.get("state", "?")
            for labels, value in after.samples.get("calejo_storage_state", ())
            if value == 1.0
        ),
        None,
    )
    if state is not None:
        storage = context.components.get("storage")
        detail = storage.get("detail", "") if isinstance(storage, Mapping) else ""
        found.append(
            Figure(
                "storage",
                "state",
                None,
                "",
                "ok" if state == "ok" else "alert",
                "ok",
                str(detail),
                text=state,
            )
        )

    spooled = after.value("calejo_storage_spooled_records")
    if spooled is not None:
        found.append(
            Figure(
                "storage",
                "records spooled for the database",
                spooled,
                "count",
                "ok" if spooled == 0 else "alert",
                "0",
            )
        )

    errors = after.value("calejo_storage_errors_total")
    if errors is not None:
        earlier = before.value("calejo_storage_errors_total") or 0.0
        new = errors - earlier
        found.append(
            Figure(
                "storage",
                "database errors since start",
                errors,
                "count",
                "ok" if new == 0 else "warning",
                "no new errors",
                f"{new:.0f} in the window",
            )
        )
    return found


def _process_figures(before: Scrape, after: Scrape, window: float) -> list[Figure]:
    found = []
    cpu_after = after.value("process_cpu_seconds_total")
    cpu_before = before.value("process_cpu_seconds_total")
    if cpu_after is not None and cpu_before is not None and after.at > before.at:
        percent = max(0.0, cpu_after - cpu_before) / window * 100
        found.append(
            Figure(
                "process",
                "cpu in the window (of one core)",
                percent,
                "%",
                CPU.judge(percent),
                CPU.text(),
            )
        )
    started = after.value("process_start_time_seconds")
    if cpu_after is not None and started:
        age = max(time.time() - started, 1e-9)
        found.append(
            Figure(
                "process",
                "cpu since start (of one core)",
                cpu_after / age * 100,
                "%",
                detail=f"up {age / 3600:.1f} h",
            )
        )
    rss = after.value("process_resident_memory_bytes")
    if rss is not None:
        found.append(
            Figure(
                "process",
                "resident memory",
                rss / MB,
                "MB",
                MEMORY.judge(rss / MB),
                MEMORY.text(),
            )
        )
    fds, limit = after.value("process_open_fds"), after.value("process_max_fds")
    if fds is not None:
        found.append(
            Figure(
                "process",
                "open files",
                fds,
                "count",
                detail=f"limit {limit:.0f}" if limit else "",
            )
        )
    if cpu_after is None and rss is None:
        found.append(
            Figure(
                "process",
                "cpu and memory",
                None,
                "",
                detail="not in /metrics (process_* metrics are Linux only)",
            )
        )
    return found


def _connection_figures(after: Scrape, context: Context) -> list[Figure]:
    found = []
    database = context.database
    if database is None:
        found.append(
            Figure(
                "database",
                "connections",
                None,
                "",
                detail="embedded SQLite: no database server connections",
            )
        )
    elif database.error is not None:
        found.append(
            Figure(
                "database",
                "connections",
                None,
                "",
                "warning",
                DB_CONNECTIONS.text(),
                f"{database.where}: cannot read pg_stat_activity: {database.error}",
            )
        )
    else:
        share = database.total / database.allowed * 100 if database.allowed else 0.0
        found.append(
            Figure(
                "database",
                "connections in use of max_connections",
                share,
                "%",
                DB_CONNECTIONS.judge(share),
                DB_CONNECTIONS.text(),
                f"{database.total} of {database.allowed}; {database.ours} to "
                f"{database.where}",
            )
        )

    open_now = after.value("calejo_modbus_connections")
    modbus = context.components.get("modbus")
    allowed = modbus.get("max_connections") if isinstance(modbus, Mapping) else None
    if open_now is not None:
        refused = after.value("calejo_modbus_connections_refused_total", reason="limit")
        if isinstance(allowed, int | float) and allowed > 0:
            share = open_now / allowed * 100
            found.append(
                Figure(
                    "modbus",
                    "connections of modbus.max_connections",
                    share,
                    "%",
                    MODBUS_CONNECTIONS.judge(share),
                    MODBUS_CONNECTIONS.text(),
                    f"{open_now:.0f} of {allowed:g}; refused at the limit since "
                    f"start: {refused or 0:.0f}",
                )
            )
        else:
            found.append(Figure("modbus", "connections", open_now, "count"))
    frames = after.value("calejo_modbus_frames_total")
    if frames is not None:
        exceptions = after.value("calejo_modbus_exceptions_total") or 0.0
        found.append(
            Figure(
                "modbus",
                "frames since start",
                frames,
                "count",
                detail=f"{exceptions:.0f} answered with an exception",
            )
        )
    return found


def _plant_figures(after: Scrape) -> list[Figure]:
    found = []
    for name, label, verdict_if_any in (
        ("calejo_stations", "stations", "info"),
        ("calejo_emergency_stops_active", "emergency stops latched", "info"),
        ("calejo_failsafe_stations", "stations in failsafe", "warning"),
        (
            "calejo_plc_heartbeat_lost_stations",
            "stations without PLC heartbeat",
            "warning",
        ),
    ):
        value = after.value(name)
        if value is None:
            continue
        verdict: Verdict = "info"
        if verdict_if_any == "warning":
            verdict = "warning" if value > 0 else "ok"
        found.append(Figure("plant", label, value, "count", verdict))
    return found


def worst(found: Iterable[Figure]) -> Verdict:
    verdicts = {figure.verdict for figure in found}
    if "alert" in verdicts:
        return "alert"
    if "warning" in verdicts:
        return "warning"
    return "ok"


# -- gathering ----------------------------------------------------------------


def gather_context(remote: Remote, config: Config | None) -> Context:
    """``/status``, ``/health/detailed`` and the database connections."""
    _, status = remote.get_json("/status")
    _, detailed = remote.get_json("/health/detailed")
    components = detailed.get("components", {}) if isinstance(detailed, dict) else {}
    database = None
    if config is not None and _is_postgres(config.database.url):
        database = asyncio.run(database_connections(config.database.url or ""))
    return Context(
        status if isinstance(status, dict) else {},
        components if isinstance(components, dict) else {},
        database,
    )


def _is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0].lower() in (
        "postgresql",
        "postgres",
        "postgresql+asyncpg",
    )


async def database_connections(url: str) -> DatabaseConnections:
    """Client connections of the PostgreSQL server of ``url``."""
    import asyncpg

    from calejo_server.ops.compliance import postgres_dsn
    from calejo_server.ops.dump import locate

    where = url
    try:
        database = locate(url, Path("."))
        where = database.where()
        conn = await asyncpg.connect(postgres_dsn(url), timeout=5, command_timeout=10)
    except Exception as exc:  # any failure is reported as a figure
        return DatabaseConnections(where, 0, 0, 0, str(exc) or type(exc).__name__)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE datname = current_database()) AS ours, "
            "count(*) AS total, current_setting('max_connections')::int AS allowed "
            "FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
    except asyncpg.PostgresError as exc:
        return DatabaseConnections(where, 0, 0, 0, str(exc))
    finally:
        await conn.close()
    assert row is not None
    return DatabaseConnections(where, int(row[0]), int(row[1]), int(row[2]))


def _optional_config(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(
            f"calejo: note: the configuration does not load, so no database "
            f"figures: {exc}",
            file=sys.stderr,
        )
        return None


# -- report and analysis ----------------------------------------------------------


def run_report(args: argparse.Namespace, *, judge: bool) -> int:
    config = _optional_config(args)
    with remote_mod.connect(args, config) as remote:
        try:
            first = scrape(remote)
            if args.window > 0:
                time.sleep(args.window)
            second = scrape(remote) if args.window > 0 else first
            context = gather_context(remote, config)
        except RemoteError as exc:
            print(f"calejo: the adapter did not answer: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE

    found = figures(first, second, context)
    if args.format == "json":
        document = {
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "adapter": remote.api,
            "window_seconds": args.window,
            "status": context.status,
            "verdict": worst(found) if judge else None,
            "figures": [figure.to_dict() for figure in found],
        }
        print(json.dumps(document, indent=2))
    else:
        _print_figures(found, context, remote.api, args.window, judge, sys.stdout)

    if judge and worst(found) == "alert":
        return EXIT_ALERT
    return EXIT_OK


def _print_figures(
    found: Sequence[Figure],
    context: Context,
    api: str,
    window: float,
    judge: bool,
    out: TextIO,
) -> None:
    status = context.status
    uptime = float(status.get("uptime") or 0)
    print(
        f"adapter {api}: {status.get('status', '?')}, version "
        f"{status.get('version', '?')}, up {uptime / 3600:.1f} h; window {window:g} s",
        file=out,
    )
    section = None
    for figure in found:
        if figure.section != section:
            section = figure.section
            print(f"{section}:", file=out)
        line = f"  {figure.name}: {figure.shown()}"
        if judge and figure.verdict != "info":
            line += f"  [{figure.verdict}"
            line += f"; {figure.threshold}]" if figure.threshold else "]"
        if figure.detail:
            line += f"  ({figure.detail})"
        print(line, file=out)

    if not judge:
        return
    alerts = [f for f in found if f.verdict == "alert"]
    warnings = [f for f in found if f.verdict == "warning"]
    if alerts:
        names = ", ".join(f"{f.section} {f.name}" for f in alerts)
        print(f"verdict: alert - over the alert threshold: {names}", file=out)
    elif warnings:
        names = ", ".join(f"{f.section} {f.name}" for f in warnings)
        print(f"verdict: warning - above target: {names}", file=out)
    else:
        print("verdict: ok - every figure within its target", file=out)


# -- monitor ------------------------------------------------------------------


def run_monitor(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.count < 1:
        from calejo_server.cli import EXIT_USAGE, CommandError

        raise CommandError(
            f"expected --interval above 0 and --count of at least 1, got "
            f"{args.interval:g} and {args.count}",
            EXIT_USAGE,
        )

    out = sys.stdout
    missed = 0
    with remote_mod.connect(args) as remote:
        try:
            previous = scrape(remote)
        except RemoteError as exc:
            print(f"calejo: the adapter did not answer: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE

        for _ in range(args.count):
            time.sleep(args.interval)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            try:
                current = scrape(remote)
                _, health = remote.get_json("/health")
            except RemoteError as exc:
                missed += 1
                print(f"{stamp} status=unreachable ({exc})", file=out, flush=True)
                continue
            status = health.get("status", "?") if isinstance(health, dict) else "?"
            if status == "down":
                missed += 1
            print(
                f"{stamp} {monitor_line(previous, current, status)}",
                file=out,
                flush=True,
            )
            previous = current
    return EXIT_ALERT if missed else EXIT_OK


def monitor_line(before: Scrape, after: Scrape, status: str) -> str:
    """``status=ok req/s=... rest_p95_ms=... cpu_pct=... ...`` for one interval."""
    window = max(after.at - before.at, 1e-9)
    recent = after.histogram(REQUEST_HISTOGRAM, not_metrics_route).minus(
        before.histogram(REQUEST_HISTOGRAM, not_metrics_route)
    )
    p95 = recent.quantile(0.95)

    def delta(name: str) -> float:
        return (after.value(name) or 0.0) - (before.value(name) or 0.0)

    setpoints = sum(
        (after.value("calejo_setpoints_total", outcome=o) or 0.0)
        - (before.value("calejo_setpoints_total", outcome=o) or 0.0)
        for o in ("accepted", "clamped", "rejected", "blocked")
    )
    rss = after.value("process_resident_memory_bytes")
    lag = after.value("calejo_engine_tick_lag_seconds")
    parts = [
        f"status={status}",
        f"req/s={recent.count / window:.1f}",
        f"rest_p95_ms={p95 * 1000:.1f}" if p95 is not None else "rest_p95_ms=-",
        f"setpoints/s={setpoints / window:.1f}",
        f"cpu_pct={delta('process_cpu_seconds_total') / window * 100:.1f}",
        f"rss_mb={rss / MB:.0f}" if rss is not None else "rss_mb=-",
        f"tick_lag_ms={lag * 1000:.1f}" if lag is not None else "tick_lag_ms=-",
        f"spooled={after.value('calejo_storage_spooled_records') or 0:.0f}",
        f"storage_errors={delta('calejo_storage_errors_total'):.0f}",
        f"modbus_conn={after.value('calejo_modbus_connections') or 0:.0f}",
        f"estops={after.value('calejo_emergency_stops_active') or 0:.0f}",
        f"failsafe={after.value('calejo_failsafe_stations') or 0:.0f}",
    ]
    return " ".join(parts)


# -- test ---------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Timing:
    """The latencies of one path, in seconds, and its failures."""

    name: str
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def fail(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile by the nearest-rank method."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = max(0, math.ceil(q * len(ordered)) - 1)
        return ordered[index]

    def verdict(self) -> Verdict:
        p95 = self.percentile(0.95)
        if self.errors:
            return "alert"
        if p95 is None:
            return "info"
        return RESPONSE_TIME.judge(p95 * 1000)


Probe = Callable[[Any], tuple[str | None, str | None]]
"""One request on a worker's connection: (error or None, outcome or None)."""


def _http_probe(
    method: str, path: str, token: str | None, body: object = None
) -> Probe:
    def probe(remote: Any) -> tuple[str | None, str | None]:
        answer = remote.request(method, path, token=token, body=body)
        if answer.status >= 400:
            data = answer.json()
            detail = data.get("detail") if isinstance(data, dict) else None
            return f"{answer.status} {detail or ''}".strip(), None
        data = answer.json()
        outcome = data.get("outcome") if isinstance(data, dict) else None
        return None, outcome if isinstance(outcome, str) else None

    return probe


class ModbusReader:
    """Reads holding registers (function code 3) over one TCP connection."""

    def __init__(self, host: str, port: int, unit: int, timeout: float) -> None:
        self.host, self.port, self.unit, self.timeout = host, port, unit, timeout
        self._sock: socket.socket | None = None
        self._tid = 0

    def read(self, address: int, count: int) -> list[int]:
        """The registers, or ``OSError``/``ValueError`` naming what went wrong."""
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tid = (self._tid + 1) & 0xFFFF
        frame = struct.pack(">HHHBBHH", self._tid, 0, 6, self.unit, 3, address, count)
        try:
            self._sock.sendall(frame)
            header = self._exactly(7)
            tid, _, length, _ = struct.unpack(">HHHB", header)
            pdu = self._exactly(length - 1)
        except (OSError, ValueError):
            self.close()
            raise
        if tid != self._tid:
            self.close()
            raise ValueError(f"answer to transaction {tid}, expected {self._tid}")
        if pdu[0] == 0x83:
            raise ValueError(f"exception {pdu[1]:02d} from unit {self.unit}")
        return list(struct.unpack(f">{pdu[1] // 2}H", pdu[2:]))

    def _exactly(self, size: int) -> bytes:
        assert self._sock is not None
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ValueError("the server closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _modbus_probe(address: int, count: int) -> Probe:
    def probe(reader: Any) -> tuple[str | None, str | None]:
        reader.read(address, count)
        return None, None

    return probe


def measure(
    name: str,
    probe: Probe,
    make_client: Callable[[], Any],
    requests: int,
    concurrency: int,
    warmup: int = 3,
) -> Timing:
    """Run ``requests`` probes over ``concurrency`` connections; their timings."""
    timing = Timing(name)
    lock = threading.Lock()
    shares = [
        requests // concurrency + (i < requests % concurrency)
        for i in range(concurrency)
    ]

    def worker(share: int) -> None:
        client = make_client()
        try:
            for index in range(warmup + share):
                started = time.perf_counter()
                try:
                    error, outcome = probe(client)
                except (RemoteError, OSError, ValueError) as exc:
                    error, outcome = str(exc) or type(exc).__name__, None
                elapsed = time.perf_counter() - started
                if index < warmup:
                    continue
                with lock:
                    if error is not None:
                        timing.fail(error)
                    else:
                        timing.latencies.append(elapsed)
                    if outcome is not None:
                        timing.outcomes[outcome] = timing.outcomes.get(outcome, 0) + 1
        finally:
            client.close()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, share) for share in shares if share]:
            future.result()
    timing.seconds = time.perf_counter() - started
    return timing


def run_test(args: argparse.Namespace) -> int:
    from calejo_server.cli import EXIT_USAGE, CommandError

    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 256:
        raise CommandError(
            f"expected --requests from 1 to 1000000 and --concurrency from 1 to "
            f"256, got {args.requests} and {args.concurrency}",
            EXIT_USAGE,
        )
    writes = (args.station, args.pump, args.setpoint)
    if any(item is not None for item in writes) and None in writes:
        raise CommandError(
            "setpoint writes need all of --station, --pump and --setpoint; got "
            + ", ".join(
                f"{flag} {'given' if item is not None else 'missing'}"
                for flag, item in zip(
                    ("--station", "--pump", "--setpoint"), writes, strict=True
                )
            ),
            EXIT_USAGE,
        )
    if args.setpoint is not None and args.user is None:
        raise CommandError("--setpoint needs --user (write_setpoints)", EXIT_USAGE)

    remote = remote_mod.connect(args)
    with remote:
        try:
            remote.get("/health")
        except RemoteError as exc:
            print(f"calejo: the adapter did not answer: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        token = remote_mod.login(remote, args.user)
        plan = _plan(remote, token, args)

    def new_remote() -> Remote:
        return Remote(remote.base_url, remote.trust, remote.timeout)

    timings: list[Timing] = []
    for name, probe, factory in plan:
        # Writes are made exactly --requests times: no warm-up.
        warmup = 0 if name.startswith("PUT ") else 3
        timings.append(
            measure(
                name,
                probe,
                factory or new_remote,
                args.requests,
                args.concurrency,
                warmup,
            )
        )
    _print_timings(timings, args, sys.stdout)
    failed = any(t.verdict() == "alert" for t in timings)
    return EXIT_ALERT if failed else EXIT_OK


def _plan(
    remote: Remote, token: str | None, args: argparse.Namespace
) -> list[tuple[str, Probe, Callable[[], Any] | None]]:
    plan: list[tuple[str, Probe, Callable[[], Any] | None]] = [
        ("GET /api/v1/health", _http_probe("GET", "/health", None), None),
        ("GET /api/v1/status", _http_probe("GET", "/status", None), None),
    ]
    if token is not None:
        plan.append(
            (
                "GET /api/v1/pump-stations",
                _http_probe("GET", "/pump-stations", token),
                None,
            )
        )
        status, body = remote.get_json("/pump-stations", token=token)
        stations = body.get("stations", []) if isinstance(body, dict) else []
        if status == 200 and stations and stations[0].get("pumps"):
            sid = stations[0]["station_id"]
            pid = stations[0]["pumps"][0]["pump_id"]
            path = f"/pump-stations/{sid}/pumps/{pid}"
            plan.append((f"GET /api/v1{path}", _http_probe("GET", path, token), None))

    if args.modbus_port is not None:
        host = args.modbus_host or remote.host
        unit = args.unit

        def reader() -> ModbusReader:
            return ModbusReader(host, args.modbus_port, unit, remote.timeout)

        plan.append(
            (
                f"modbus fc3 {host}:{args.modbus_port} unit {unit} registers 0-3",
                _modbus_probe(0, 4),
                reader,
            )
        )
        plan.append(
            (
                f"modbus fc3 {host}:{args.modbus_port} unit {unit} registers 100-103",
                _modbus_probe(100, 4),
                reader,
            )
        )

    if args.setpoint is not None:
        path = f"/pump-stations/{args.station}/pumps/{args.pump}/setpoint"
        plan.append(
            (
                f"PUT /api/v1{path} value {args.setpoint:g}",
                _http_probe("PUT", path, token, {"value": args.setpoint}),
                None,
            )
        )
    return plan


def _print_timings(
    timings: Sequence[Timing], args: argparse.Namespace, out: TextIO
) -> None:
    width = max(len(t.name) for t in timings)
    header = (
        f"{'path':<{width}}  {'requests':>8}  {'errors':>6}  {'p50 ms':>8}  "
        f"{'p95 ms':>8}  {'p99 ms':>8}  {'max ms':>8}  {'req/s':>8}  verdict"
    )
    print(header, file=out)

    def ms(value: float | None) -> str:
        return f"{value * 1000:8.2f}" if value is not None else f"{'-':>8}"

    for t in timings:
        done = len(t.latencies) + t.errors
        rate = done / t.seconds if t.seconds > 0 else 0.0
        print(
            f"{t.name:<{width}}  {done:>8}  {t.errors:>6}  {ms(t.percentile(0.5))}  "
            f"{ms(t.percentile(0.95))}  {ms(t.percentile(0.99))}  "
            f"{ms(max(t.latencies) if t.latencies else None)}  {rate:8.0f}  "
            f"{t.verdict()}",
            file=out,
        )
        if t.first_error is not None:
            print(f"  first error: {t.first_error}", file=out)
        if t.outcomes:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items()))
            print(f"  outcomes: {shown}", file=out)

    print(
        f"KPI: {RESPONSE_TIME.text()} (p95 of each path); concurrency "
        f"{args.concurrency}",
        file=out,
    )
    verdicts = {t.verdict() for t in timings}
    if "alert" in verdicts:
        print(
            "verdict: alert - a path is over 500 ms at p95 or has failed requests",
            file=out,
        )
    elif "warning" in verdicts:
        print("verdict: warning - a path is above the 100 ms target at p95", file=out)
    else:
        print("verdict: ok - every path within the 100 ms target at p95", file=out)


# -- the command ----------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure a running adapter: time requests (test), read /metrics and "
        "report the figures (report), judge them against their thresholds "
        "(analysis), or print one line of them at intervals (monitor)."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    test = actions.add_parser(
        "test",
        help="time read-only REST (and Modbus) requests against the 100 ms target",
    )
    remote_mod.add_arguments(test)
    test.add_argument(
        "--requests", type=int, default=200, help="requests per path (default 200)"
    )
    test.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="connections in parallel (default 4)",
    )
    remote_mod.add_login_arguments(test, "the station and pump reads")
    test.add_argument(
        "--modbus-port", type=int, help="also time Modbus TCP reads on this port"
    )
    test.add_argument(
        "--modbus-host", help="the Modbus host (default: the host of the URL)"
    )
    test.add_argument(
        "--unit", type=int, default=1, help="the Modbus unit id to read (default 1)"
    )
    test.add_argument(
        "--station", help="write setpoints to this station (with --pump, --setpoint)"
    )
    test.add_argument("--pump", help="write setpoints to this pump")
    test.add_argument(
        "--setpoint",
        type=float,
        help="the value to write, --requests times, through the safety gate",
    )

    for name, text in (
        ("report", "print the figures of /metrics: latency, cpu, memory, ..."),
        ("analysis", "judge the figures of /metrics against their thresholds"),
    ):
        sub = actions.add_parser(name, help=text)
        remote_mod.add_arguments(sub)
        sub.add_argument(
            "--window",
            type=float,
            default=1.0,
            help="seconds between the two readings of /metrics (default 1; 0: one "
            "reading, figures since start only)",
        )
        sub.add_argument("--format", choices=("text", "json"), default="text")

    monitor = actions.add_parser(
        "monitor", help="one line of the main figures every --interval seconds"
    )
    remote_mod.add_arguments(monitor)
    monitor.add_argument(
        "--interval", type=float, default=5.0, help="seconds between lines (default 5)"
    )
    monitor.add_argument(
        "--count", type=int, default=12, help="lines to print (default 12)"
    )


def run(args: argparse.Namespace) -> int:
    """``calejo performance ACTION``."""
    if args.action == "test":
        return run_test(args)
    if args.action == "monitor":
        return run_monitor(args)
    if args.window < 0 or args.window > 3600:
        from calejo_server.cli import EXIT_USAGE, CommandError

        raise CommandError(
            f"--window: expected 0 to 3600 seconds, got {args.window:g}", EXIT_USAGE
        )
    return run_report(args, judge=args.action == "analysis")
