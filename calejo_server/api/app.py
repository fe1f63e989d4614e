"""The REST API as a Starlette application: :func:`create_app`.

The application holds no state of its own: it calls the engine for live
state, the directory (:class:`~calejo_server.security.Security`) for
users and tokens, and the storage only to read the audit log. Around the
routes sits one pure ASGI middleware, :class:`FrontDoor`, which

- adds the security headers to every answer,
- refuses bodies over the limit (by Content-Length at once, and by
  counting the bytes as they stream in),
- turns any unexpected error into a JSON 500 without details, logged
  with its traceback for the operator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from calejo_server.api import openapi
from calejo_server.api.endpoint import Endpoint, Services, build_routes
from calejo_server.api.errors import ApiError, error_response, handle_error
from calejo_server.api.health import (
    HealthRegistry,
    engine_check,
    storage_check,
    watchdog_check,
)
from calejo_server.api.routes import all_endpoints
from calejo_server.api.schemas import ValidationError
from calejo_server.engine.errors import EngineError
from calejo_server.metrics import Metrics, MetricsMiddleware
from calejo_server.security import (
    PasswordPolicyError,
    RoleError,
    SecurityError,
    UnknownRole,
)
from calejo_server.storage.base import StorageError, utcnow

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

    handlers: dict[Any, Any] = {
        HTTPException: handle_error,
        ApiError: handle_error,
        ValidationError: handle_error,
        EngineError: handle_error,
        StorageError: handle_error,
        SecurityError: handle_error,
        PasswordPolicyError: handle_error,
        RoleError: handle_error,
        UnknownRole: handle_error,
    }
    app = Starlette(
        routes=build_routes(endpoints, services),
        middleware=[
            Middleware(FrontDoor, max_body_bytes=max_body),
            Middleware(MetricsMiddleware, metrics=metrics),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.calejo = services
    return app


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, got: int | None) -> None:
        seen = f"got {got} bytes" if got is not None else "got more"
        super().__init__(
            413,
            "payload_too_large",
            f"request body too large: at most {limit} bytes, {seen}",
        )


class FrontDoor:
    """Security headers, the body limit, and a JSON 500 for faults."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                headers.extend(SECURITY_HEADERS)
                message["headers"] = headers
            await send(message)

        declared = _content_length(scope)
        if declared is None:
            await _refuse(
                send_with_headers, 400, "bad_request", "invalid Content-Length"
            )
            return
        if declared > self.max_body_bytes:
            error = BodyTooLarge(self.max_body_bytes, declared)
            await _refuse(send_with_headers, 413, error.code, error.detail)
            return

        try:
            await self.app(scope, self._counting(receive), send_with_headers)
        except Exception:
            logger.exception(
                "error answering %s %s", scope.get("method"), scope.get("path")
            )
            if started:
                raise
            await _refuse(
                send_with_headers,
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
