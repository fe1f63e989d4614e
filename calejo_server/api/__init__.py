"""The REST API of the adapter (Starlette, under ``/api/v1``)."""

from __future__ import annotations

from calejo_server.api.app import create_app
from calejo_server.api.health import ComponentHealth, HealthRegistry

__all__ = ["ComponentHealth", "HealthRegistry", "create_app"]
