"""The OpenAPI 3.1 document of the REST API, built from the endpoints.

Each operation's parameters, body and answers come from the same schema
objects that check the requests (:mod:`calejo_server.api.schemas`), so
the document describes what the API does, not what it was meant to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from calejo_server.api.endpoint import TOKEN, Endpoint
from calejo_server.api.models import ERROR

TITLE = "Calejo Control Adapter"
ERROR_REF = {"$ref": "#/components/schemas/Error"}

REASONS: dict[int, str] = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "Malformed request headers, such as an invalid Content-Length",
    401: "No valid bearer token (or wrong credentials at login)",
    403: "Permission missing, or the password must be changed first",
    404: "Unknown resource; the detail names it",
    409: "Conflicts with the current state",
    413: "Body larger than the limit (1 MiB by default)",
    415: "Body is not application/json",
    422: "Body not valid JSON, or body or query off the schema; the detail names where",
    429: "Too many failed authentications from this address; see Retry-After",
    503: "Unavailable: the change could not be made durable",
}

ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "the bearer scheme",
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "seconds to wait",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
            "required": True,
        }
    },
}


def document(endpoints: Sequence[Endpoint], version: str = "1") -> dict[str, Any]:
    """The OpenAPI document of ``endpoints``."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        item = paths.setdefault(endpoint.full_path, {})
        item[endpoint.method.lower()] = _operation(endpoint)

    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": version,
            "description": (
                "Safety-gated pump setpoints, plans and emergency stops for "
                "wastewater pump stations. Values are in each pump's engineering "
                "units (Hz unless configured); times are RFC 3339, UTC. Errors "
                'are {"error": code, "detail": sentence}.'
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token from POST /api/v1/auth/login",
                }
            },
            "schemas": {"Error": ERROR.json_schema()},
        },
        "security": [{"bearer": []}],
    }


def render(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id or _operation_id(endpoint),
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
    }

    description = _access_text(endpoint)
    if endpoint.description:
        description = f"{endpoint.description}\n\n{description}"
    operation["description"] = description
    operation["security"] = [] if endpoint.access is None else [{"bearer": []}]

    parameters = [_parameter(p, "path") for p in endpoint.path_params]
    parameters += [_parameter(p, "query") for p in endpoint.query]
    if parameters:
        operation["parameters"] = parameters

    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": endpoint.body.json_schema()}},
        }

    operation["responses"] = _responses(endpoint)
    return operation


def _access_text(endpoint: Endpoint) -> str:
    if endpoint.access is None:
        return "Open to anyone; no token needed."
    if endpoint.access == TOKEN:
        return "Any valid bearer token."
    return f"Requires the permission `{endpoint.access}`."


def _parameter(param: Any, where: str) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": where,
        "required": True if where == "path" else param.required,
        "description": param.description,
        "schema": param.schema.json_schema(),
    }


def _responses(endpoint: Endpoint) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    ok: dict[str, Any] = {"description": REASONS.get(endpoint.status, "OK")}
    if endpoint.status != 204:
        schema = (
            endpoint.answer.json_schema() if endpoint.answer else {"type": "object"}
        )
        ok["content"] = {endpoint.media_type: {"schema": schema}}
    responses[str(endpoint.status)] = ok

    own = dict(endpoint.answers)
    for status in sorted({*endpoint.error_statuses(), *own}):
        schema = own[status].json_schema() if status in own else ERROR_REF
        response: dict[str, Any] = {
            "description": REASONS.get(status, "Error"),
            "content": {"application/json": {"schema": schema}},
        }
        if status in ERROR_HEADERS:
            response["headers"] = ERROR_HEADERS[status]
        responses[str(status)] = response
    return responses


def _operation_id(endpoint: Endpoint) -> str:
    words = re.findall(r"[A-Za-z0-9]+", endpoint.path)
    return endpoint.method.lower() + "".join(word.capitalize() for word in words)
