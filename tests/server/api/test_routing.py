"""Routing: the order of the routes never changes which one answers."""

from __future__ import annotations

import re
from typing import Any, cast

from starlette.routing import Match, Route

from calejo_server.api.endpoint import HOT_PATHS, Services, build_routes
from calejo_server.api.routes import all_endpoints


def _routes() -> list[Route]:
    return build_routes(all_endpoints(), cast(Services, None))


def _scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "path": path, "root_path": "", "method": method}


def test_the_setpoint_writes_are_tried_first() -> None:
    routes = _routes()

    assert [route.path for route in routes[: len(HOT_PATHS)]] == list(HOT_PATHS)
    assert len({route.path for route in routes}) == len(routes)


def test_no_two_routes_match_the_same_path() -> None:
    routes = _routes()
    for route in routes:
        for fill in ("x", "pumps", "emergency-stop", "setpoint", "me", "test"):
            path = re.sub(r"\{[^}]+\}", fill, route.path)
            matching = [
                other.path
                for other in routes
                if other.matches(_scope(path))[0] is not Match.NONE
            ]
            assert matching == [route.path], path


def test_every_declared_method_has_its_route() -> None:
    routes = {route.path: route for route in _routes()}
    for endpoint in all_endpoints():
        route = routes[endpoint.full_path]
        assert route.methods is not None and endpoint.method in route.methods
