"""``calejo performance``: quantiles from histograms, figures judged against
their KPIs, and the commands against an HTTP server answering like an
adapter (the guide's test runs them against a live one)."""

from __future__ import annotations

import json

import pytest

from calejo_server import cli
from calejo_server.ops import perf
from calejo_server.ops.perf import Context, Histogram, Scrape
from tests.server.conftest import free_port
from tests.server.ops.fake_adapter import fake_adapter, json_answer, text_answer

HEALTHY = {
    "process_cpu_seconds_total": 10.0,
    "process_resident_memory_bytes": 150e6,
    "process_start_time_seconds": 1.0,
    "calejo_engine_tick_lag_seconds": 0.001,
    "calejo_engine_tick_duration_seconds": 0.0002,
    "calejo_storage_spooled_records": 0.0,
    "calejo_storage_errors_total": 0.0,
    "calejo_modbus_connections": 2.0,
    "calejo_failsafe_stations": 0.0,
}


def metrics_text(values: dict[str, float], state: str = "ok") -> str:
    lines = [f"{name} {value}" for name, value in values.items()]
    lines += [
        f'calejo_storage_state{{state="{name}"}} {1.0 if name == state else 0.0}'
        for name in ("ok", "degraded", "down")
    ]
    route = 'route="/api/v1/status",method="GET",status="200"'
    for bound, count in (("0.001", 90), ("0.01", 99), ("0.1", 100), ("+Inf", 100)):
        lines.append(
            f'calejo_http_request_duration_seconds_bucket{{le="{bound}",{route}}} '
            f"{count}"
        )
    lines.append(f"calejo_http_request_duration_seconds_count{{{route}}} 100")
    lines.append(f"calejo_http_request_duration_seconds_sum{{{route}}} 0.2")
    return "\n".join(lines) + "\n"


def context(tick_interval: float = 0.1) -> Context:
    return Context(
        {"status": "ok"},
        {
            "engine": {"tick_interval": tick_interval},
            "modbus": {"max_connections": 64},
        },
        None,
    )


def test_quantiles_are_interpolated_inside_their_bucket() -> None:
    histogram = Histogram(
        ((0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)), 100.0, 30.0
    )

    assert histogram.quantile(0.5) == pytest.approx(0.1)
    assert histogram.quantile(0.95) == pytest.approx(0.75)
    assert histogram.quantile(0.99) == pytest.approx(0.95)
    assert histogram.mean() == pytest.approx(0.3)
    assert Histogram((), 0.0, 0.0).quantile(0.5) is None

    overflow = Histogram(((0.1, 0.0), (float("inf"), 10.0)), 10.0, 5.0)
    assert overflow.quantile(0.5) == pytest.approx(0.1)

    later = Histogram(
        ((0.1, 60.0), (0.5, 100.0), (1.0, 110.0), (float("inf"), 110.0)), 110.0, 30.5
    )
    window = later.minus(histogram)
    assert window.count == 10.0
    assert window.quantile(0.5) == pytest.approx(0.05)
    assert window.mean() == pytest.approx(0.05)


def test_the_metrics_route_is_left_out_of_the_latency() -> None:
    text = metrics_text(HEALTHY) + (
        'calejo_http_request_duration_seconds_bucket{le="+Inf",route="/api/v1/metrics",'
        'method="GET",status="200"} 1000\n'
    )
    scrape = Scrape.parse(text)

    assert scrape.histogram(perf.REQUEST_HISTOGRAM).count == 100.0
    everything = scrape.histogram(perf.REQUEST_HISTOGRAM, lambda _: True)
    assert everything.buckets[-1][1] == 1100.0
    assert scrape.value("calejo_storage_state", state="ok") == 1.0
    assert scrape.value("no_such_metric") is None


def test_each_figure_is_judged_against_its_threshold() -> None:
    before = Scrape.parse(metrics_text(HEALTHY), at=0.0)
    good = Scrape.parse(
        metrics_text({**HEALTHY, "process_cpu_seconds_total": 10.1}), at=1.0
    )
    assert perf.worst(perf.figures(before, good, context())) == "ok"

    bad = Scrape.parse(
        metrics_text(
            {
                **HEALTHY,
                "process_cpu_seconds_total": 10.9,
                "process_resident_memory_bytes": 600e6,
                "calejo_engine_tick_lag_seconds": 0.2,
                "calejo_storage_spooled_records": 12.0,
                "calejo_modbus_connections": 63.0,
            },
            state="degraded",
        ),
        at=1.0,
    )
    alerts = {
        (f.section, f.name)
        for f in perf.figures(before, bad, context())
        if f.verdict == "alert"
    }
    assert ("process", "cpu in the window (of one core)") in alerts
    assert ("process", "resident memory") in alerts
    assert ("engine", "tick lag (last tick)") in alerts
    assert ("storage", "state") in alerts
    assert ("storage", "records spooled for the database") in alerts
    assert ("modbus", "connections of modbus.max_connections") in alerts

    # A longer tick interval moves the tick lag's thresholds with it.
    slow = perf.figures(before, bad, context(tick_interval=1.0))
    lag = next(f for f in slow if f.name == "tick lag (last tick)")
    assert lag.verdict == "ok"


def _adapter_routes(metrics: str) -> dict[str, object]:
    return {
        "GET /api/v1/metrics": text_answer(metrics),
        "GET /api/v1/status": json_answer({"status": "ok", "version": "0.1.0"}),
        "GET /api/v1/health": json_answer({"status": "ok"}),
        "GET /api/v1/health/detailed": json_answer(
            {"status": "ok", "components": {"engine": {"tick_interval": 0.1}}}
        ),
    }


@pytest.fixture(autouse=True)
def _no_site(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CALEJO_CONFIG", "DATABASE_URL", "CALEJO_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_analysis_exits_1_over_an_alert_threshold(
    capsys: pytest.CaptureFixture[str],
) -> None:
    healthy = metrics_text(HEALTHY)
    with fake_adapter(_adapter_routes(healthy)) as server:
        code = cli.main(
            ["performance", "analysis", "--url", server.url, "--window", "0"]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict: ok" in out

    heavy = metrics_text({**HEALTHY, "process_resident_memory_bytes": 900e6})
    with fake_adapter(_adapter_routes(heavy)) as server:
        code = cli.main(
            ["performance", "analysis", "--url", server.url, "--window", "0"]
        )
        report = cli.main(
            [
                "performance",
                "report",
                "--url",
                server.url,
                "--window",
                "0",
                "--format",
                "json",
            ]
        )
    out = capsys.readouterr().out
    assert code == 1
    assert "resident memory: 900 MB  [alert" in out
    document = json.loads(out[out.index("{") :])
    assert report == 0
    assert document["verdict"] is None
    assert any(f["name"] == "resident memory" for f in document["figures"])


def _reading_routes() -> dict[str, object]:
    station = {"station_id": "north", "pumps": [{"pump_id": "p1"}]}
    return {
        "GET /api/v1/health": json_answer({"status": "ok"}),
        "GET /api/v1/status": json_answer({"status": "ok"}),
        "POST /api/v1/auth/login": json_answer({"access_token": "t0ken"}),
        "GET /api/v1/pump-stations": json_answer({"stations": [station]}),
        "GET /api/v1/pump-stations/north/pumps/p1": json_answer({"pump_id": "p1"}),
        "PUT /api/v1/pump-stations/north/pumps/p1/setpoint": json_answer(
            {"outcome": "accepted"}
        ),
    }


def test_the_test_reads_only_unless_a_pump_and_value_are_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALEJO_PASSWORD", "operator-password")
    with fake_adapter(_reading_routes()) as server:
        code = cli.main(
            [
                "performance",
                "test",
                "--url",
                server.url,
                "--requests",
                "6",
                "--concurrency",
                "2",
                "--user",
                "operator",
            ]
        )
        methods = {(r.method, r.path) for r in server.requests}
    out = capsys.readouterr().out
    assert code == 0, out
    assert {m for m, _ in methods} == {"GET", "POST"}
    assert ("POST", "/api/v1/auth/login") in methods
    assert ("GET", "/api/v1/pump-stations/north/pumps/p1") in methods
    assert "verdict: ok" in out

    with fake_adapter(_reading_routes()) as server:
        code = cli.main(
            [
                "performance",
                "test",
                "--url",
                server.url,
                "--requests",
                "5",
                "--concurrency",
                "2",
                "--user",
                "operator",
                "--station",
                "north",
                "--pump",
                "p1",
                "--setpoint",
                "30",
            ]
        )
        writes = [r for r in server.requests if r.method == "PUT"]
    assert code == 0
    assert len(writes) == 5
    assert {json.loads(r.body)["value"] for r in writes} == {30.0}
    assert "outcomes: accepted 5" in capsys.readouterr().out


def test_a_setpoint_write_needs_station_pump_and_login(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(
        ["performance", "test", "--url", "http://127.0.0.1:9", "--setpoint", "30"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--station missing" in err
    assert "--pump missing" in err

    code = cli.main(
        [
            "performance",
            "test",
            "--url",
            "http://127.0.0.1:9",
            "--station",
            "n",
            "--pump",
            "p",
            "--setpoint",
            "30",
        ]
    )
    assert code == 2
    assert "--user" in capsys.readouterr().err


def test_failed_requests_fail_the_test(capsys: pytest.CaptureFixture[str]) -> None:
    routes = _reading_routes()
    routes["GET /api/v1/status"] = json_answer(
        {"error": "unavailable", "detail": "storage down"}, 503
    )
    with fake_adapter(routes) as server:
        code = cli.main(["performance", "test", "--url", server.url, "--requests", "4"])
    out = capsys.readouterr().out
    assert code == 1
    assert "first error: 503 storage down" in out
    assert "verdict: alert" in out


def test_monitor_prints_one_line_per_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with fake_adapter(_adapter_routes(metrics_text(HEALTHY))) as server:
        code = cli.main(
            [
                "performance",
                "monitor",
                "--url",
                server.url,
                "--interval",
                "0.05",
                "--count",
                "2",
            ]
        )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(lines) == 2
    assert all(" status=ok " in line and "rss_mb=150" in line for line in lines)


def test_an_unreachable_adapter_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for action in (["report"], ["analysis"], ["monitor", "--count", "1"], ["test"]):
        assert cli.main(["performance", *action, "--url", url]) == 2
    assert "did not answer" in capsys.readouterr().err
