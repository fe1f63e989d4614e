"""How an endpoint is declared, and the steps every request goes through.

An :class:`Endpoint` states its method and path, who may call it, the
schemas of its query, body and answer, and the handler. From that one
declaration come the route, the checks before the handler runs (token,
permission, media type, JSON, schema) and the endpoint's entry in the
OpenAPI document. A request is checked in this order, so that nothing is
revealed to a caller who may not call the endpoint: token (401, 429),
password change pending and permission (403), query (422), media type
(415), JSON (422), body schema (422).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from calejo_server.api.errors import KNOWN_ERRORS, ApiError, JSONAnswer, error_answer
from calejo_server.api.schemas import Schema, ValidationError
from calejo_server.engine.views import RequestContext
from calejo_server.security import Principal
from calejo_server.security.throttle import retry_after_header

if TYPE_CHECKING:
    from calejo_server.alerts import AlertService
    from calejo_server.api.health import HealthRegistry
    from calejo_server.config import Config
    from calejo_server.engine import Engine
    from calejo_server.metrics import Metrics
    from calejo_server.security import Security
    from calejo_server.storage.base import Storage

PREFIX = "/api/v1"
TOKEN = "authenticated"
"""Access of an endpoint open to any valid token (no permission needed)."""
PROTOCOL = "REST"
MAX_TOKEN_HEADER = 512

Handler = Callable[["Call"], Awaitable[Response]]


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter."""

    name: str
    schema: Schema
    description: str
    required: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of the API.

    ``access`` is None (anyone), :data:`TOKEN` (any valid token) or the
    permission the caller's role must grant. ``errors`` lists the error
    statuses the handler itself may answer; those that come from the
    declaration (401/403/429 for a token, 400/413/415/422 for a body,
    422 for query parameters, 404 for path parameters) are added.
    Error answers are ``{"error", "detail"}`` unless ``answers`` gives a
    status its own schema.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    access: str | None
    answer: Schema | None = None
    status: int = 200
    body: Schema | None = None
    query: tuple[Param, ...] = ()
    path_params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    answers: tuple[tuple[int, Schema], ...] = ()
    description: str = ""
    during_password_change: bool = False
    media_type: str = "application/json"
    operation_id: str = ""

    @property
    def full_path(self) -> str:
        return PREFIX + self.path

    def error_statuses(self) -> list[int]:
        statuses = set(self.errors)
        if self.access is not None:
            statuses.update((401, 403, 429))
        if self.body is not None:
            statuses.update((400, 413, 415, 422))
        if self.query:
            statuses.add(422)
        if self.path_params:
            statuses.add(404)
        return sorted(statuses)


@dataclasses.dataclass(slots=True)
class Services:
    """What the handlers work with."""

    engine: Engine
    security: Security
    storage: Storage
    metrics: Metrics
    health: HealthRegistry
    config: Config | None
    max_body_bytes: int
    started_at: dt.datetime
    started: float = dataclasses.field(default_factory=time.monotonic)
    openapi: bytes = b""
    alerts: AlertService | None = None


@dataclasses.dataclass(slots=True)
class Call:
    """One request, checked: who asks, the query and the body."""

    request: Request
    services: Services
    principal: Principal | None
    query: dict[str, Any]
    body: Any

    @property
    def source(self) -> str | None:
        return _source(self.request)

    @property
    def ctx(self) -> RequestContext:
        user = self.principal.username if self.principal is not None else None
        return RequestContext(user=user, source_address=self.source, protocol=PROTOCOL)

    def path(self, name: str) -> str:
        value = self.request.path_params[name]
        return value if isinstance(value, str) else str(value)


def answer(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON answer."""
    return JSONAnswer(content, status, headers)


HOT_PATHS = (
    PREFIX + "/pump-stations/{station_id}/pumps/{pump_id}/setpoint",
    PREFIX + "/setpoints",
)
"""Paths tried first when routing: the setpoint writes."""


def build_routes(endpoints: Sequence[Endpoint], services: Services) -> list[Route]:
    """One route per path, dispatching on the method (so 405 lists them all).

    No two paths of the API match the same request path, so the order of
    the routes only decides how many the router tries: :data:`HOT_PATHS`
    come first, the others in the order they are declared.
    """
    by_path: dict[str, dict[str, Endpoint]] = {}
    for endpoint in endpoints:
        methods = by_path.setdefault(endpoint.full_path, {})
        if endpoint.method in methods:
            raise ValueError(
                f"two endpoints for {endpoint.method} {endpoint.full_path}"
            )
        methods[endpoint.method] = endpoint

    paths = [path for path in HOT_PATHS if path in by_path]
    paths += [path for path in by_path if path not in HOT_PATHS]
    return [
        Route(path, Dispatch(by_path[path], services), methods=list(by_path[path]))
        for path in paths
    ]


class Dispatch:
    """The ASGI app of one path: runs the endpoint of the request's method.

    A known error (:data:`~calejo_server.api.errors.KNOWN_ERRORS`) is
    answered here, as the front door would answer it; any other error
    goes on to the front door.
    """

    def __init__(self, methods: dict[str, Endpoint], services: Services) -> None:
        self.runners = {
            method: _runner(endpoint, services) for method, endpoint in methods.items()
        }
        if "GET" in self.runners:
            self.runners.setdefault("HEAD", self.runners["GET"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await self.runners[scope["method"]](request)
        except KNOWN_ERRORS as exc:
            answer = error_answer(scope, exc)
            if answer is None:
                raise
            response = answer
        await response(scope, receive, send)


def _runner(
    endpoint: Endpoint, services: Services
) -> Callable[[Request], Awaitable[Response]]:
    query = {param.name: param for param in endpoint.query}
    required = tuple(name for name, param in query.items() if param.required)

    async def run(request: Request) -> Response:
        scope = request.scope
        authorization, content_type = _headers(scope)

        principal = None
        if endpoint.access is not None:
            principal = await _authorize(request, authorization, endpoint, services)

        values = _query(request, query) if scope.get("query_string") or required else {}

        body = None
        if endpoint.body is not None:
            body = endpoint.body.check(await _json(request, content_type), "")

        return await endpoint.handler(Call(request, services, principal, values, body))

    return run


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """The Authorization and Content-Type headers (the first of each)."""
    authorization = content_type = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
    return authorization, content_type


async def _authorize(
    request: Request, header: str | None, endpoint: Endpoint, services: Services
) -> Principal:
    security = services.security
    token = _bearer(header)
    principal = security.authenticate(token) if token else None
    source = _source(request)

    if principal is None:
        retry = security.retry_after(source)
        if retry is not None:
            raise ApiError(
                429,
                "too_many_requests",
                f"too many failed authentications from {source}; try again in "
                f"{retry_after_header(retry)} s",
                {"Retry-After": retry_after_header(retry)},
            )

        if header is None:
            reason = "no bearer token"
        elif token is None:
            reason = "malformed Authorization header"
        else:
            reason = "unknown, expired or revoked token"
        await security.deny(
            status=401,
            reason=reason,
            principal=None,
            source=source,
            protocol=PROTOCOL,
            method=request.method,
            path=request.url.path,
        )
        raise ApiError(
            401,
            "unauthorized",
            f"{reason}: expected 'Authorization: Bearer <token>' from POST "
            f"{PREFIX}/auth/login",
            {"WWW-Authenticate": 'Bearer realm="calejo"'},
        )

    if principal.must_change_password and not endpoint.during_password_change:
        await security.deny(
            status=403,
            reason="password change required",
            principal=principal,
            source=source,
            protocol=PROTOCOL,
            method=request.method,
            path=request.url.path,
        )
        raise ApiError(
            403,
            "password_change_required",
            f"user {principal.username!r} must change the password first: "
            f"POST {PREFIX}/auth/change-password",
        )

    if endpoint.access != TOKEN and not principal.can(endpoint.access or ""):
        await security.deny(
            status=403,
            reason="permission missing",
            principal=principal,
            source=source,
            protocol=PROTOCOL,
            method=request.method,
            path=request.url.path,
            permission=endpoint.access,
        )
        raise ApiError(
            403,
            "forbidden",
            f"permission {endpoint.access!r} required; role {principal.role!r} "
            "does not grant it",
        )
    return principal


def _bearer(header: str | None) -> str | None:
    if header is None or len(header) > MAX_TOKEN_HEADER:
        return None

    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _source(request: Request) -> str | None:
    client = request.scope.get("client")
    return client[0] if client is not None else None


def _query(request: Request, params: dict[str, Param]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, text in request.query_params.multi_items():
        param = params.get(name)
        if param is None:
            known = ", ".join(params) or "none"
            raise ApiError(
                422,
                "validation_error",
                f"query parameter {name[:64]!r}: not known here; expected {known}",
            )
        if name in values:
            raise ApiError(
                422,
                "validation_error",
                f"query parameter {name!r}: given more than once",
            )
        try:
            values[name] = param.schema.parse(text, name)
        except ValidationError as exc:
            raise ApiError(
                422, "validation_error", f"query parameter {name!r}: {exc.message}"
            ) from None

    for name, param in params.items():
        if param.required and name not in values:
            raise ApiError(
                422,
                "validation_error",
                f"query parameter {name!r}: required but missing",
            )
    return values


async def _json(request: Request, content_type: str | None) -> Any:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        got = repr(content_type[:80]) if content_type else "none"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"expected Content-Type application/json, got {got}",
        )

    body = await _body(request.receive)
    if not body.strip():
        raise ApiError(422, "invalid_json", "the body is empty: expected a JSON object")

    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        error = _non_finite_error(body, str(exc))
        if error is not None:
            raise ApiError(422, "validation_error", str(error)) from None
        raise ApiError(
            422, "invalid_json", f"the body is not valid JSON: {exc}"
        ) from None


class _NonFinite:
    """A number JSON cannot carry (NaN, Infinity, 1e400), as it was written."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _float_or_marker(text: str) -> float | _NonFinite:
    number = float(text)
    return number if math.isfinite(number) else _NonFinite(text[:40])


def _non_finite_error(body: bytes, reason: str) -> ValidationError | None:
    """The error naming where a body that orjson refused holds NaN,
    Infinity or a number too large for a double.

    ``reason`` is orjson's message. Only a body that may hold such a
    number is read a second time, leniently, to name the field; what the
    lenient reading makes of it is never used. None when the body is
    broken in some other way.
    """
    if not (b"NaN" in body or b"Infinity" in body or "infinity" in reason):
        return None
    try:
        document = json.loads(
            body, parse_constant=_NonFinite, parse_float=_float_or_marker
        )
    except (ValueError, RecursionError):
        return None

    # Depth first, in document order, with no recursion: the document may
    # be nested nearly as deep as the interpreter allows.
    keys: list[str | int | None] = []
    stack: list[Iterator[tuple[Any, Any]]] = [iter(((None, document),))]
    while stack:
        for key, value in stack[-1]:
            kind = type(value)
            got = None
            if kind is _NonFinite:
                got = value.text
            elif kind is int and value.bit_length() > 1024:
                got = f"an integer of {len(str(value))} digits"
            if got is not None:
                return _finite_expected([*keys[1:], key], got)
            if kind is dict:
                keys.append(key)
                stack.append(iter(value.items()))
                break
            if kind is list:
                keys.append(key)
                stack.append(enumerate(value))
                break
        else:
            stack.pop()
            if keys:
                keys.pop()
    return None


def _finite_expected(keys: list[str | int | None], got: str) -> ValidationError:
    """The error for the value found under ``keys`` (object keys, indexes)."""
    error = ValidationError("", f"expected a finite number, got {got}")
    for key in reversed(keys):
        if isinstance(key, int):
            error = error.within(f"[{key}]")
        elif key is not None:
            error = error.within(key[:64])
    return error


async def _body(receive: Receive) -> bytes:
    """The request body, read straight from the ASGI messages.

    As Starlette's ``Request.body`` reads it, without its stream: the
    chunks up to the last, and ClientDisconnect if the client leaves first.
    """
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
