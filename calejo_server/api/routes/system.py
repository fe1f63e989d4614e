"""Health, status, metrics and the OpenAPI document: open to anyone."""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

from starlette.responses import Response

from calejo_server.api import models
from calejo_server.api.endpoint import Call, Endpoint, answer
from calejo_server.api.health import ComponentHealth
from calejo_server.api.schemas import Text
from calejo_server.metrics import CONTENT_TYPE

TAG = "system"


def _version() -> str:
    try:
        return importlib.metadata.version("calejo-control-adapter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


def _down_detail(components: dict[str, ComponentHealth]) -> str:
    down = [
        f"{name}: {health.detail}"
        for name, health in components.items()
        if health.state == "down"
    ]
    return "the adapter is down: " + "; ".join(down)


async def health(call: Call) -> Response:
    status, components = call.services.health.check()
    if status != "down":
        return answer({"status": status})

    return answer(
        {"status": "down", "error": "unavailable", "detail": _down_detail(components)},
        503,
    )


async def health_detailed(call: Call) -> Response:
    status, components = call.services.health.check()
    body: dict[str, Any] = {
        "status": status,
        "components": {name: health.to_dict() for name, health in components.items()},
    }
    if status != "down":
        return answer(body)

    body.update(error="unavailable", detail=_down_detail(components))
    return answer(body, 503)


async def status(call: Call) -> Response:
    services = call.services
    engine = services.engine
    overall, components = services.health.check()
    stations = engine.stations()
    storage = components.get("storage")

    return answer(
        {
            "status": overall,
            "version": VERSION,
            "started_at": services.started_at.isoformat(),
            "uptime": round(time.monotonic() - services.started, 3),
            "stations": len(stations),
            "pumps": sum(len(station.pumps) for station in stations),
            "emergency_stop": engine.system_emergency_stop().active,
            "stations_in_emergency_stop": sum(1 for s in stations if s.emergency_stop),
            "stations_in_failsafe": sum(1 for s in stations if s.failsafe),
            "heartbeat": engine.heartbeat,
            "storage": storage.state if storage is not None else "down",
        }
    )


async def metrics(call: Call) -> Response:
    return Response(call.services.metrics.render(), media_type=CONTENT_TYPE)


async def openapi_document(call: Call) -> Response:
    return Response(call.services.openapi, media_type="application/json")


ENDPOINTS = [
    Endpoint(
        "GET",
        "/health",
        health,
        "Whether the adapter is up",
        TAG,
        access=None,
        answer=models.HEALTH,
        answers=((503, models.HEALTH),),
        description=(
            "ok or degraded (storage degraded, engine ticks late); 503 with "
            "status down when the engine is not ticking or storage is down."
        ),
        operation_id="health",
    ),
    Endpoint(
        "GET",
        "/health/detailed",
        health_detailed,
        "The health of each component",
        TAG,
        access=None,
        answer=models.HEALTH_DETAILED,
        answers=((503, models.HEALTH_DETAILED),),
        description=(
            "storage, engine (tick lag), watchdog (per station), modbus, opcua, "
            "alerts (not_configured until they run), certificates (days left "
            "of the CA and of the OPC UA and REST certificates in use)."
        ),
        operation_id="healthDetailed",
    ),
    Endpoint(
        "GET",
        "/status",
        status,
        "A summary of the adapter",
        TAG,
        access=None,
        answer=models.STATUS,
        operation_id="status",
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        TAG,
        access=None,
        answer=Text(description="the Prometheus text exposition format"),
        media_type="text/plain",
        operation_id="metrics",
    ),
    Endpoint(
        "GET",
        "/openapi.json",
        openapi_document,
        "This document",
        TAG,
        access=None,
        answer=None,
        operation_id="openapi",
    ),
]
