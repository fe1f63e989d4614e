"""The REST API as a Starlette application: :func:`create_app`.

The application holds no state of its own: it calls the engine for live
state, the directory (:class:`~calejo_server.security.Security`) for
users and tokens, and the storage only to read the audit log. Around the
routes sits one pure ASGI layer, :class:`FrontDoor`, in place of the
error and exception middleware Starlette would otherwise wrap around
them (each of which wraps every answer's ``send`` once more). It

- adds the security headers to every answer,
- refuses bodies over the limit (by Content-Length at once, and by
  counting the bytes as they stream in),
- counts every answer into the metrics, by route template,
- answers the known errors (:data:`~calejo_server.api.errors.KNOWN_ERRORS`:
  404 and 405 from the router, refusals of the engine and the directory)
  as JSON, and turns any other error into a JSON 500 without details,
  logged with its traceback for the operator.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.convertors import StringConvertor
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from calejo_server.api import openapi
from calejo_server.api.endpoint import HOT_PATHS, Endpoint, Services, build_routes
from calejo_server.api.errors import ApiError, error_answer, error_response
from calejo_server.api.health import (
    HealthRegistry,
    engine_check,
    storage_check,
    watchdog_check,
)
from calejo_server.api.routes import all_endpoints
from calejo_server.metrics import Metrics, route_template
from calejo_server.storage.base import utcnow

if TYPE_CHECKING:
    from calejo_server.alerts import AlertService
    from calejo_server.config import Config
    from calejo_server.engine import Engine
    from calejo_server.security import Security
    from calejo_server.storage.base import Storage

logger = logging.getLogger(__name__)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
DEFAULT_MAX_BODY = 1_048_576
NO_HANDLERS: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})
"""Starlette's per-request exception handlers: none, so that a plain
Starlette route's errors, too, reach the front door."""
FUTURE_COMPONENTS = ("modbus", "opcua", "alerts")


def create_app(
    *,
    engine: Engine,
    security: Security,
    storage: Storage,
    config: Config | None = None,
    metrics: Metrics | None = None,
    health: HealthRegistry | None = None,
    lifespan: Lifespan[Starlette] | None = None,
    endpoints: Sequence[Endpoint] | None = None,
    alerts: AlertService | None = None,
) -> Starlette:
    """The REST API of one adapter (routes under ``/api/v1``).

    ``metrics``: the adapter's :class:`~calejo_server.metrics.Metrics`
    (requests are counted into it and ``GET /metrics`` renders it); when
    None a fresh one is made and bound to the engine and the storage.
    ``health``: a registry other components add their checks to; when
    None a fresh one is made. Storage, engine and watchdog checks are
    registered, and ``modbus``, ``opcua`` and ``alerts`` are marked not
    configured unless already registered. ``lifespan`` is handed to
    Starlette (tests start the engine and the directory there).
    ``alerts``: the adapter's alert service, for ``POST /alerts/test``.
    The returned app's ``state.calejo`` holds the :class:`Services`.
    """
    if metrics is None:
        metrics = Metrics()
        metrics.bind_engine(engine)
        metrics.bind_storage(storage)

    health = health if health is not None else HealthRegistry()
    health.register("storage", storage_check(storage))
    health.register("engine", engine_check(engine))
    health.register("watchdog", watchdog_check(engine))
    for name in FUTURE_COMPONENTS:
        if name not in health.names():
            health.not_configured(name)

    max_body = (
        config.security.max_body_bytes if config is not None else DEFAULT_MAX_BODY
    )
    services = Services(
        engine=engine,
        security=security,
        storage=storage,
        metrics=metrics,
        health=health,
        config=config,
        max_body_bytes=max_body,
        started_at=utcnow(),
        alerts=alerts,
    )

    endpoints = list(endpoints) if endpoints is not None else all_endpoints()
    services.openapi = openapi.render(openapi.document(endpoints))

    app = RestApp(
        routes=build_routes(endpoints, services),
        lifespan=lifespan,
        metrics=metrics,
        max_body_bytes=max_body,
    )
    app.state.calejo = services
    return app


class RestApp(Starlette):
    """Starlette with :class:`FrontDoor` as its outermost layer.

    Routing, requests, answers, state and the lifespan are Starlette's;
    only the stack around the router differs: the front door, then any
    middleware added to the app, then the router.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = self.router
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        # With middleware of its own between the door and the router, every
        # request goes the whole way.
        hot = () if self.user_middleware else hot_routes(self.router.routes)
        return FrontDoor(app, self.metrics, self.max_body_bytes, hot)


def hot_routes(routes: Sequence[BaseRoute]) -> tuple[Route, ...]:
    """The routes of :data:`~calejo_server.api.endpoint.HOT_PATHS`, whose
    path parameters are plain text (so that their match is Starlette's)."""
    return tuple(
        route
        for route in routes
        if isinstance(route, Route)
        and route.path in HOT_PATHS
        and all(type(c) is StringConvertor for c in route.param_convertors.values())
    )


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, got: int | None) -> None:
        seen = f"got {got} bytes" if got is not None else "got more"
        super().__init__(
            413,
            "payload_too_large",
            f"request body too large: at most {limit} bytes, {seen}",
        )


class FrontDoor:
    """Security headers, the body limit, metrics, and the JSON error answers.

    An answer refused at the door (a malformed or too large
    Content-Length) is not counted in the metrics: it never reached a
    route.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        hot: Sequence[Route] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.hot = tuple(hot)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        root_path = scope.get("root_path", "")
        status = 0

        async def respond(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        declared = _content_length(scope)
        if declared is None:
            await _refuse(respond, 400, "bad_request", "invalid Content-Length")
            return
        if declared > self.max_body_bytes:
            error = BodyTooLarge(self.max_body_bytes, declared)
            await _refuse(respond, 413, error.code, error.detail)
            return

        scope["starlette.exception_handlers"] = NO_HANDLERS
        receive = self._counting(receive)
        try:
            await self._route(scope)(scope, receive, respond)
        except Exception as exc:
            await self._answer_error(scope, receive, respond, exc, status != 0)
        finally:
            self.metrics.observe_request(
                route_template(scope, root_path),
                scope["method"],
                status or 500,
                time.perf_counter() - started,
            )

    def _route(self, scope: Scope) -> ASGIApp:
        """The app for this request: a hot route's own, matched here as the
        router would match it (the setpoint writes skip the walk through
        the router), or the router."""
        if self.hot and not scope.get("root_path"):
            path, method = scope["path"], scope["method"]
            for route in self.hot:
                match = route.path_regex.match(path)
                if match is not None:
                    if route.methods and method not in route.methods:
                        break  # the router answers 405
                    scope["route"] = route
                    scope["endpoint"] = route.endpoint
                    scope["path_params"] = match.groupdict()
                    return route.app
        return self.app

    async def _answer_error(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception, started: bool
    ) -> None:
        answer = None if started else error_answer(scope, exc)
        if answer is not None:
            await answer(scope, receive, send)
            return

        logger.error(
            "error answering %s %s",
            scope.get("method"),
            scope.get("path"),
            exc_info=exc,
        )
        if started:
            raise exc
        await _refuse(
            send,
            500,
            "internal_error",
            "the adapter could not answer this request; the error is logged",
        )

    def _counting(self, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, None)
            return message

        return counted


def _content_length(scope: Scope) -> int | None:
    """The declared body length: 0 when absent, None when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 18:
                return None
            return int(text)
    return 0


async def _refuse(send: Send, status: int, code: str, detail: str) -> None:
    response = error_response(status, code, detail)
    headers = [(k, v) for k, v in response.raw_headers]
    if status in (400, 413):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def lifespan_of(
    start: Callable[[], Any], stop: Callable[[], Any]
) -> Lifespan[Starlette]:
    """A lifespan that awaits ``start()`` before serving and ``stop()`` after."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await start()
        try:
            yield
        finally:
            await stop()

    return lifespan
