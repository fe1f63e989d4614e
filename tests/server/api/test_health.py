"""Health, status, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from starlette.routing import Route

from calejo_server.api import ComponentHealth, HealthRegistry, create_app
from calejo_server.api.health import engine_check
from calejo_server.config import load_config
from calejo_server.engine import Engine
from calejo_server.security import Security
from calejo_server.storage import open_storage

from .conftest import API, ApiServer, write_config


def test_health_is_ok(api: ApiServer) -> None:
    response = api.client.get(f"{API}/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_detailed_health_names_every_component(api: ApiServer) -> None:
    body = api.client.get(f"{API}/health/detailed").json()

    components = body["components"]
    assert body["status"] == "ok"
    assert set(components) == {
        "storage",
        "engine",
        "watchdog",
        "modbus",
        "opcua",
        "alerts",
    }
    assert components["storage"]["state"] == "ok"
    assert components["storage"]["backend"] == "sqlite"
    assert components["engine"]["state"] == "ok"
    assert components["engine"]["tick_interval"] == 0.1
    assert components["watchdog"]["stations"]["north"]["failsafe"] is True
    for name in ("modbus", "opcua", "alerts"):
        assert components[name]["state"] == "not_configured"


def test_a_component_down_makes_the_adapter_down(
    make_server: Callable[..., ApiServer],
) -> None:
    registry = HealthRegistry()
    api = make_server(health=registry)
    remove = registry.register(
        "modbus", lambda: ComponentHealth("down", "port 502 is not listening")
    )

    response = api.client.get(f"{API}/health")
    assert response.status_code == 503
    assert response.json()["status"] == "down"
    assert "modbus: port 502 is not listening" in response.json()["detail"]
    detailed = api.client.get(f"{API}/health/detailed")
    assert detailed.status_code == 503
    assert detailed.json()["components"]["modbus"]["state"] == "down"

    registry.register("modbus", lambda: ComponentHealth("degraded", "slow"))
    assert api.client.get(f"{API}/health").json() == {"status": "degraded"}

    remove()
    registry.register("modbus", lambda: ComponentHealth("ok", "listening"))
    assert api.client.get(f"{API}/health").json() == {"status": "ok"}


def test_a_failing_check_counts_as_down() -> None:
    def broken() -> ComponentHealth:
        raise RuntimeError("no answer")

    registry = HealthRegistry()
    registry.register("alerts", broken)

    status, components = registry.check()
    assert status == "down"
    assert "no answer" in components["alerts"].detail


def test_an_engine_that_is_not_ticking_is_down(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), environ={})
    storage = open_storage(None, config.server.data_dir)
    engine = Engine(config, storage)

    async def check() -> ComponentHealth:
        await storage.open()
        try:
            return engine_check(engine)()
        finally:
            await storage.close()

    health = asyncio.run(check())
    assert health.state == "down"
    assert health.detail == "the engine is not ticking"


def test_status_summarises(api: ApiServer) -> None:
    body = api.client.get(f"{API}/status").json()

    assert body["status"] == "ok"
    assert body["stations"] == 2
    assert body["pumps"] == 3
    assert body["stations_in_failsafe"] == 2
    assert body["emergency_stop"] is False
    assert body["storage"] == "ok"
    assert body["uptime"] >= 0
    assert body["version"]


def test_metrics_count_requests_and_outcomes(api: ApiServer) -> None:
    headers = api.headers("optimizer")
    api.client.put(
        f"{API}/pump-stations/north/pumps/p2/setpoint",
        json={"value": 99},
        headers=headers,
    )

    response = api.client.get(f"{API}/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'calejo_setpoints_total{outcome="clamped"} 1.0' in text
    assert (
        'calejo_http_requests_total{method="PUT",'
        'route="/api/v1/pump-stations/{station_id}/pumps/{pump_id}/setpoint",'
        'status="200"} 1.0'
    ) in text
    assert "calejo_stations 2.0" in text


def test_the_document_lists_every_route_and_nothing_else(api: ApiServer) -> None:
    document = api.client.get(f"{API}/openapi.json").json()
    app = create_app(
        engine=api.engine,
        security=Security(api.config.security, api.security.storage),
        storage=api.security.storage,
    )

    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
    }
    assert routes == documented
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_document_states_access_and_bodies(api: ApiServer) -> None:
    paths = api.client.get(f"{API}/openapi.json").json()["paths"]

    assert paths[f"{API}/health"]["get"]["security"] == []
    setpoint = paths[f"{API}/pump-stations/{{station_id}}/pumps/{{pump_id}}/setpoint"][
        "put"
    ]
    assert setpoint["security"] == [{"bearer": []}]
    assert "write_setpoints" in setpoint["description"]
    body = setpoint["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["value"]
    assert body["properties"]["value"]["type"] == "number"
    assert body["additionalProperties"] is False
    assert {
        "200",
        "400",
        "401",
        "403",
        "404",
        "413",
        "415",
        "422",
        "429",
        "503",
    } == set(setpoint["responses"])
    audit = paths[f"{API}/audit-log"]["get"]
    names = [p["name"] for p in audit["parameters"]]
    assert names == [
        "severity",
        "event_type",
        "since",
        "until",
        "station_id",
        "user",
        "after_id",
        "limit",
    ]
    limit = audit["parameters"][-1]["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)
