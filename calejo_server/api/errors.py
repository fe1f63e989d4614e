"""Error answers of the REST API: always ``{"error": code, "detail": sentence}``.

Every refusal is an :class:`ApiError`, or an error of the engine or the
directory that :func:`api_error` translates; nothing else reaches the
client, least of all a stack trace. :data:`KNOWN_ERRORS` are the types
:func:`error_answer` answers; anything else is a fault.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from calejo_server.api.schemas import ValidationError
from calejo_server.engine.errors import (
    EmergencyStopConflict,
    EngineError,
    InvalidRequest,
    PlanConflict,
    PlanError,
    UnknownPump,
    UnknownStation,
)
from calejo_server.security import (
    AuthError,
    InvalidUser,
    PasswordPolicyError,
    RoleError,
    SecurityError,
    Throttled,
    UnknownRole,
    UnknownUser,
    UserConflict,
    WrongPassword,
)
from calejo_server.security.throttle import retry_after_header
from calejo_server.storage.base import StorageError

logger = logging.getLogger(__name__)

DEFAULT_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}
"""The error code of each status when nothing more specific applies."""


class ApiError(Exception):
    """A refusal: the status, a short code and a sentence for people."""

    def __init__(
        self,
        status: int,
        code: str | None,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.detail = detail
        self.headers = dict(headers or {})


class JSONAnswer(Response):
    """A JSON answer encoded with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONAnswer({"error": code, "detail": detail}, status, dict(headers or {}))


def api_error(exc: Exception) -> ApiError | None:
    """The answer to an error of a lower layer, or None if it is a fault."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return ApiError(422, "validation_error", str(exc))
    if isinstance(exc, EngineError):
        return _engine_error(exc)
    if isinstance(exc, StorageError):
        logger.error("storage refused a write: %s", exc)
        return ApiError(
            503,
            "storage_unavailable",
            f"the change could not be made durable; nothing was changed: {exc}",
            {"Retry-After": "5"},
        )
    return _security_error(exc)


def _engine_error(exc: EngineError) -> ApiError:
    if isinstance(exc, UnknownStation | UnknownPump):
        code = "unknown_station" if isinstance(exc, UnknownStation) else "unknown_pump"
        status = 422 if exc.field else 404
        return ApiError(status, code, str(exc))
    if isinstance(exc, PlanError):
        return ApiError(422, "invalid_plan", str(exc))
    if isinstance(exc, InvalidRequest):
        return ApiError(422, "validation_error", str(exc))
    if isinstance(exc, PlanConflict):
        return ApiError(409, "plan_conflict", str(exc))
    if isinstance(exc, EmergencyStopConflict):
        return ApiError(409, "emergency_stop_not_active", str(exc))
    return ApiError(422, "refused", str(exc))


def _security_error(exc: Exception) -> ApiError | None:
    if isinstance(exc, Throttled):
        return ApiError(
            429,
            "too_many_requests",
            f"{exc}; try again in {retry_after_header(exc.retry_after)} s",
            {"Retry-After": retry_after_header(exc.retry_after)},
        )
    if isinstance(exc, AuthError):
        return ApiError(401, "login_failed", str(exc))
    if isinstance(exc, WrongPassword):
        return ApiError(403, "wrong_password", str(exc))
    if isinstance(exc, UnknownUser):
        return ApiError(404, "unknown_user", str(exc))
    if isinstance(exc, UnknownRole):
        return ApiError(404, "unknown_role", str(exc))
    if isinstance(exc, UserConflict):
        return ApiError(409, "conflict", str(exc))
    if isinstance(exc, PasswordPolicyError):
        return ApiError(422, "password_policy", str(exc))
    if isinstance(exc, InvalidUser | RoleError):
        return ApiError(422, "validation_error", str(exc))
    return None


KNOWN_ERRORS: tuple[type[Exception], ...] = (
    HTTPException,
    ApiError,
    ValidationError,
    EngineError,
    StorageError,
    SecurityError,
    PasswordPolicyError,
    RoleError,
    UnknownRole,
)
"""The errors that have an answer; :func:`error_answer` gives it."""


def error_answer(scope: Scope, exc: Exception) -> Response | None:
    """The JSON answer of a known error, or None if ``exc`` is a fault."""
    if isinstance(exc, HTTPException):
        return _http_exception(Request(scope), exc)
    if not isinstance(exc, KNOWN_ERRORS):
        return None

    error = api_error(exc)
    if error is None:
        return None
    return error_response(error.status, error.code, error.detail, error.headers)


def _http_exception(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    headers = dict(exc.headers or {})

    if status == 404:
        detail = f"no such resource: {request.url.path[:200]}"
    elif status == 405:
        allowed = headers.get("Allow") or headers.get("allow") or ""
        detail = f"method {request.method} not allowed here; allowed: {allowed}"
    else:
        detail = (
            exc.detail
            if isinstance(exc.detail, str)
            else DEFAULT_CODES.get(status, "error")
        )
    return error_response(status, DEFAULT_CODES.get(status, "error"), detail, headers)
