"""The endpoints of the REST API, one module per area."""

from __future__ import annotations

from calejo_server.api.endpoint import Endpoint
from calejo_server.api.routes import (
    alerts,
    audit,
    auth,
    plans,
    stations,
    system,
    users,
)


def all_endpoints() -> list[Endpoint]:
    """Every endpoint of ``/api/v1``, in the order the document lists them."""
    return [
        *system.ENDPOINTS,
        *auth.ENDPOINTS,
        *users.ENDPOINTS,
        *stations.ENDPOINTS,
        *plans.ENDPOINTS,
        *audit.ENDPOINTS,
        *alerts.ENDPOINTS,
    ]


__all__ = ["all_endpoints"]
