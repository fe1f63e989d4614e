"""Routing: the order of the routes never changes which one answers."""

from __future__ import annotations

import re
from typing import Any, cast

from starlette.routing import Match, Route, Router

from calejo_server.api.app import FrontDoor, RestApp, hot_routes
from calejo_server.api.endpoint import HOT_PATHS, Services, build_routes
from calejo_server.api.routes import all_endpoints
from calejo_server.metrics import Metrics


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


def _door(routes: list[Route]) -> FrontDoor:
    return FrontDoor(Router(routes=routes), Metrics(), hot=hot_routes(routes))


def test_the_door_routes_the_setpoint_writes_as_the_router_would() -> None:
    routes = _routes()
    door = _door(routes)
    assert [route.path for route in door.hot] == list(HOT_PATHS)

    path = "/api/v1/pump-stations/north/pumps/p1/setpoint"
    scope = _scope(path, "PUT")
    app = door._route(scope)
    match, child = routes[0].matches(_scope(path, "PUT"))
    assert match is Match.FULL
    assert app is routes[0].app
    assert scope["route"] is routes[0]
    assert (
        scope["path_params"]
        == child["path_params"]
        == {
            "station_id": "north",
            "pump_id": "p1",
        }
    )


def test_the_door_leaves_everything_else_to_the_router() -> None:
    door = _door(_routes())
    for path, method in (
        ("/api/v1/pump-stations/north/pumps/p1/setpoint", "GET"),  # 405
        ("/api/v1/pump-stations/north/pumps/p1/setpoint/", "PUT"),  # 404
        ("/api/v1/pump-stations/north/pumps/p1", "GET"),
        ("/api/v1/health", "GET"),
    ):
        scope = _scope(path, method)
        assert door._route(scope) is door.app, (method, path)
        assert "route" not in scope

    mounted = {**_scope("/api/v1/setpoints", "POST"), "root_path": "/adapter"}
    assert door._route(mounted) is door.app


def test_middleware_of_the_app_turns_the_door_routing_off() -> None:
    from starlette.middleware import Middleware

    class Passing:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    app = RestApp(metrics=Metrics(), routes=_routes(), middleware=[Middleware(Passing)])
    door = app.build_middleware_stack()
    assert isinstance(door, FrontDoor) and door.hot == ()
