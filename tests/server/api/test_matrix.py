"""Every endpoint against every role, no token and a bad token.

The expected access comes from the contract (DESIGN.md's table and the
roles of the interfaces), written out here independently of the
endpoint declarations, and the test first checks that this table and the
application's routes name the same operations.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import API, ROLES, ApiServer, bearer

GRANTS: dict[str, set[str]] = {
    "admin": {
        "read_pump_status",
        "write_setpoints",
        "emergency_stop",
        "clear_emergency_stop",
        "view_audit_log",
        "manage_users",
        "manage_roles",
        "view_alerts",
        "manage_alerts",
    },
    "operator": {
        "read_pump_status",
        "write_setpoints",
        "emergency_stop",
        "clear_emergency_stop",
        "view_audit_log",
        "view_alerts",
    },
    "optimizer": {"read_pump_status", "write_setpoints"},
    "viewer": {"read_pump_status", "view_alerts"},
    "auditor": {"read_pump_status", "view_audit_log", "view_alerts"},
}
ANYONE = None
TOKEN = "token"
STOP = {"reason": "matrix test"}
_counter = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    path: str
    access: str | None
    ok: int
    body: Callable[[], Any] | None = None
    ok_error: str | None = None
    """The error code expected instead of success, for an allowed caller."""


def _plan() -> dict[str, Any]:
    number = next(_counter)
    return {
        "plan_id": f"matrix-{number}",
        "version": 1,
        "pumps": [
            {
                "station_id": "north",
                "pump_id": "p1",
                "intervals": [
                    {
                        "start": "2090-01-01T00:00:00Z",
                        "end": "2090-01-01T01:00:00Z",
                        "setpoint": 30,
                    }
                ],
            }
        ],
    }


def _new_user() -> dict[str, Any]:
    number = next(_counter)
    return {"username": f"new-{number}", "email": "new@example.org", "role": "viewer"}


def cases(admin_id: str, victim_id: str) -> list[Case]:
    station = f"{API}/pump-stations/north"
    pump = f"{station}/pumps/p1"
    return [
        Case("GET", f"{API}/health", ANYONE, 200),
        Case("GET", f"{API}/health/detailed", ANYONE, 200),
        Case("GET", f"{API}/status", ANYONE, 200),
        Case("GET", f"{API}/metrics", ANYONE, 200),
        Case("GET", f"{API}/openapi.json", ANYONE, 200),
        Case(
            "POST",
            f"{API}/auth/change-password",
            TOKEN,
            403,
            lambda: {"old_password": "not the password", "new_password": "x" * 16},
            ok_error="wrong_password",
        ),
        Case("GET", f"{API}/users", "manage_users", 200),
        Case("POST", f"{API}/users", "manage_users", 201, _new_user),
        Case("GET", f"{API}/users/{admin_id}", "manage_users", 200),
        Case(
            "PUT",
            f"{API}/users/{victim_id}",
            "manage_users",
            200,
            lambda: {"email": "changed@example.org"},
        ),
        Case("DELETE", f"{API}/users/{victim_id}", "manage_users", 200),
        Case("GET", f"{API}/roles", "manage_roles", 200),
        Case(
            "PUT",
            f"{API}/roles/auditor",
            "manage_roles",
            200,
            lambda: {
                "permissions": ["read_pump_status", "view_audit_log", "view_alerts"]
            },
        ),
        Case("GET", f"{API}/pump-stations", "read_pump_status", 200),
        Case("GET", station, "read_pump_status", 200),
        Case("GET", pump, "read_pump_status", 200),
        Case("PUT", f"{pump}/setpoint", "write_setpoints", 200, lambda: {"value": 33}),
        Case(
            "POST",
            f"{API}/setpoints",
            "write_setpoints",
            200,
            lambda: {
                "setpoints": [{"station_id": "south", "pump_id": "p1", "value": 31}]
            },
        ),
        Case("POST", f"{API}/plans", "write_setpoints", 201, _plan),
        Case("GET", f"{API}/plans", "read_pump_status", 200),
        Case("POST", f"{API}/emergency-stop", "emergency_stop", 200, lambda: STOP),
        Case(
            "DELETE", f"{API}/emergency-stop", "clear_emergency_stop", 200, lambda: STOP
        ),
        Case("GET", f"{API}/emergency-stop-status", "read_pump_status", 200),
        Case("POST", f"{station}/emergency-stop", "emergency_stop", 200, lambda: STOP),
        Case(
            "DELETE",
            f"{station}/emergency-stop",
            "clear_emergency_stop",
            200,
            lambda: STOP,
        ),
        Case("GET", f"{station}/emergency-stop-status", "read_pump_status", 200),
        Case("POST", f"{pump}/emergency-stop", "emergency_stop", 200, lambda: STOP),
        Case(
            "DELETE",
            f"{pump}/emergency-stop",
            "clear_emergency_stop",
            200,
            lambda: STOP,
        ),
        Case("GET", f"{pump}/emergency-stop-status", "read_pump_status", 200),
        Case("GET", f"{API}/audit-log", "view_audit_log", 200),
        Case("GET", f"{API}/alerts", "view_alerts", 200),
        Case("POST", f"{API}/alerts/test", "manage_alerts", 200),
        Case("POST", f"{API}/auth/logout", TOKEN, 204),
        Case(
            "POST",
            f"{API}/auth/login",
            ANYONE,
            200,
            lambda: {"username": "matrix-admin", "password": "matrix admin password"},
        ),
    ]


def _template(path: str) -> str:
    parts = path.split("/")
    names = {
        "north": "{station_id}",
        "p1": "{pump_id}",
        "auditor": "{role}",
    }
    out = []
    for index, part in enumerate(parts):
        if parts[index - 1] == "users" and index > 0 and part:
            out.append("{user_id}")
        else:
            out.append(names.get(part, part))
    return "/".join(out)


def _app_operations(api: ApiServer) -> set[tuple[str, str]]:
    document = api.client.get(f"{API}/openapi.json").json()
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
    }


@pytest.fixture
def matrix_api(make_server: Callable[..., ApiServer]) -> ApiServer:
    return make_server(security={"source_failure_limit": 10_000})


def test_matrix_covers_every_operation(matrix_api: ApiServer) -> None:
    table = {(case.method, _template(case.path)) for case in cases("u", "v")}

    assert table == _app_operations(matrix_api)


def test_every_role_every_endpoint(matrix_api: ApiServer) -> None:
    api = matrix_api
    admin_id = api.client.get(f"{API}/users", headers=api.admin()).json()["users"][0][
        "user_id"
    ]
    api.add_user("admin", "matrix-admin", "matrix admin password")
    callers: dict[str, dict[str, str]] = {
        "none": {},
        "bad": bearer("not-a-token-at-all"),
    }
    for role in ROLES:
        token = api.login("admin", api.admin_password) if role == "admin" else None
        callers[role] = bearer(token) if token else api.headers(role)

    failures = []
    for caller, headers in callers.items():
        victim_id = api.add_user("viewer")[0]
        for case in cases(admin_id, victim_id):
            body = case.body() if case.body is not None else None
            response = api.client.request(
                case.method, case.path, json=body, headers=headers
            )
            expected, error = _expected(case, caller)
            got_error = _error_code(response)
            if response.status_code != expected or (error and got_error != error):
                failures.append(
                    f"{caller:9} {case.method:6} {case.path}: expected {expected} "
                    f"{error or ''}, got {response.status_code} {response.text[:160]}"
                )

    assert not failures, "\n".join(failures)


def _expected(case: Case, caller: str) -> tuple[int, str | None]:
    if case.access is ANYONE:
        return case.ok, None
    if caller in ("none", "bad"):
        return 401, "unauthorized"
    if case.access == TOKEN or case.access in GRANTS[caller]:
        return case.ok, case.ok_error
    return 403, "forbidden"


def _error_code(response: Any) -> str | None:
    if not response.content or not response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        return None
    body = response.json()
    return body.get("error") if isinstance(body, dict) else None


def test_denials_are_audited_with_the_source(matrix_api: ApiServer) -> None:
    api = matrix_api
    viewer = api.headers("viewer")

    assert api.client.get(f"{API}/users", headers=viewer).status_code == 403
    assert api.client.get(f"{API}/users").status_code == 401
    assert api.client.get(f"{API}/users", headers=bearer("forged")).status_code == 401

    denied = api.audit(event_type="ACCESS_DENIED")
    assert denied[-1]["user"] == "viewer-1"
    assert denied[-1]["source_address"] == "127.0.0.1"
    assert denied[-1]["details"]["permission"] == "manage_users"
    assert denied[-1]["severity"] == "MEDIUM"

    invalid = api.audit(event_type="INVALID_AUTHENTICATION")
    reasons = [entry["details"]["reason"] for entry in invalid[-2:]]
    assert reasons == ["no bearer token", "unknown, expired or revoked token"]
    assert all(entry["source_address"] == "127.0.0.1" for entry in invalid[-2:])
    assert all(entry["severity"] == "HIGH" for entry in invalid[-2:])
