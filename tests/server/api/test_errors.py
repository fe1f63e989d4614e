"""Error answers: their shape, statuses and details; nothing changes on a 4xx."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

from starlette.responses import Response

from calejo_server.api.endpoint import Call, Endpoint
from calejo_server.api.routes import system

from .conftest import API, ApiServer, assert_error, assert_security_headers, bearer

SETPOINT = f"{API}/pump-stations/north/pumps/p2/setpoint"
STATIONS = f"{API}/pump-stations"
JSON = {"Content-Type": "application/json"}
REFUSALS = ("INVALID_AUTHENTICATION", "ACCESS_DENIED", "PLAN_REJECTED")
"""Audit events that record a refusal (no change of state)."""


def test_unknown_paths_are_json_404(api: ApiServer) -> None:
    for path in ("/", "/api/v1", f"{API}/nothing", f"{API}/pump-stations/north/x"):
        detail = assert_error(api.client.get(path), 404, "not_found")
        assert path in detail


def test_wrong_method_is_405_with_allow(api: ApiServer) -> None:
    response = api.client.post(f"{API}/health")

    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_unknown_station_and_pump_are_404_naming_them(api: ApiServer) -> None:
    admin = api.admin()

    detail = assert_error(
        api.client.get(f"{STATIONS}/atlantis", headers=admin), 404, "unknown_station"
    )
    assert "'atlantis'" in detail
    detail = assert_error(
        api.client.put(
            f"{STATIONS}/north/pumps/p9/setpoint", json={"value": 30}, headers=admin
        ),
        404,
        "unknown_pump",
    )
    assert "'p9'" in detail and "'north'" in detail


def test_values_that_are_not_numbers_are_422_naming_the_field(api: ApiServer) -> None:
    admin = api.admin()
    cases: list[tuple[Any, str]] = [
        ({"value": "42"}, "field 'value': expected a number, got string"),
        ({"value": True}, "field 'value': expected a number, got boolean"),
        ({"value": None}, "field 'value': expected a number, got null"),
        ({"value": [1]}, "field 'value': expected a number, got array"),
        ({}, "field 'value': required but missing"),
        (
            {"value": 1, "valu": 2},
            "field 'valu': not allowed here; expected only value",
        ),
        ([42], "body: expected an object, got array"),
    ]
    for body, detail in cases:
        response = api.client.put(SETPOINT, json=body, headers=admin)
        assert assert_error(response, 422, "validation_error") == detail


def test_malformed_json_is_422_saying_where(api: ApiServer) -> None:
    headers = {**api.admin(), **JSON}
    cases = (
        (b'{"value": 4', "line 1 column 12"),
        (b"{'value': 1}", "line 1 column 2"),
        (b'{"value": 1,}', "trailing comma is not allowed: line 1 column 12"),
        (b'"\\ud800"', "surrogate"),
        (b"[" * 5000 + b"]" * 5000, "line 1"),
    )
    for raw, where in cases:
        response = api.client.put(SETPOINT, content=raw, headers=headers)
        detail = assert_error(response, 422, "invalid_json")
        assert detail.startswith("the body is not valid JSON: ")
        assert where in detail

    response = api.client.put(SETPOINT, content=b"  ", headers=headers)
    assert "empty" in assert_error(response, 422, "invalid_json")


def test_nan_infinity_and_overflow_name_their_field(api: ApiServer) -> None:
    headers = {**api.admin(), **JSON}
    cases = (
        (b'{"value": NaN}', "field 'value': expected a finite number, got NaN"),
        (
            b'{"value": -Infinity}',
            "field 'value': expected a finite number, got -Infinity",
        ),
        (b'{"value": 1e400}', "field 'value': expected a finite number, got 1e400"),
        (b"NaN", "body: expected a finite number, got NaN"),
        (
            b'{"value": 1' + b"0" * 400 + b"}",
            "field 'value': expected a finite number, got an integer of 401 digits",
        ),
        (
            b"[" * 900 + b"NaN" + b"]" * 900,
            "field '" + "[0]" * 900 + "': expected a finite number, got NaN",
        ),
    )
    for raw, detail in cases:
        response = api.client.put(SETPOINT, content=raw, headers=headers)
        assert assert_error(response, 422, "validation_error") == detail

    batch = (
        b'{"setpoints": [{"station_id": "north", "pump_id": "p1", "value": 30},'
        b' {"station_id": "north", "pump_id": "p2", "value": Infinity}]}'
    )
    response = api.client.post(f"{API}/setpoints", content=batch, headers=headers)
    assert assert_error(response, 422, "validation_error") == (
        "field 'setpoints[1].value': expected a finite number, got Infinity"
    )


def test_bodies_must_be_json(api: ApiServer) -> None:
    admin = api.admin()

    response = api.client.put(SETPOINT, content=b'{"value": 30}', headers=admin)
    assert "got none" in assert_error(response, 415, "unsupported_media_type")
    response = api.client.put(
        SETPOINT,
        content=b"value=30",
        headers={**admin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(response, 415)
    response = api.client.put(
        SETPOINT,
        content=b'{"value": 30}',
        headers={**admin, "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(
    api: ApiServer,
) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"PUT {SETPOINT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**20 + 1}\r\n\r\n".encode()
        )
        answer = _read_all(sock)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"x-content-type-options: nosniff" in head.lower()
    assert b'"error":"payload_too_large"' in body


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_streamed_body_over_the_limit_is_413(api: ApiServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"value": 30, "pad": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = api.client.put(
        SETPOINT, content=chunks(), headers={**api.admin(), **JSON}
    )

    assert "too large" in assert_error(response, 413, "payload_too_large")


def test_a_body_at_the_limit_is_read(api: ApiServer) -> None:
    padding = " " * (2**20 - len(b'{"value": 30}'))
    body = ('{"value": 30}' + padding).encode()
    assert len(body) == 2**20

    response = api.client.put(SETPOINT, content=body, headers={**api.admin(), **JSON})

    assert response.status_code == 200


def test_batch_errors_name_the_item(api: ApiServer) -> None:
    admin = api.admin()
    items = [{"station_id": "north", "pump_id": "p1", "value": 30}] * 2
    items.append({"station_id": "north", "pump_id": "p2", "value": "fast"})

    response = api.client.post(
        f"{API}/setpoints", json={"setpoints": items}, headers=admin
    )
    assert assert_error(response, 422) == (
        "field 'setpoints[2].value': expected a number, got string"
    )

    too_many = [{"station_id": "north", "pump_id": "p1", "value": 30}] * 10_001
    response = api.client.post(
        f"{API}/setpoints", json={"setpoints": too_many}, headers=admin
    )
    assert "at most 10000 items" in assert_error(response, 422)
    response = api.client.post(
        f"{API}/setpoints", json={"setpoints": []}, headers=admin
    )
    assert "at least 1 item" in assert_error(response, 422)


def test_query_parameters_are_checked(api: ApiServer) -> None:
    admin = api.admin()
    cases = {
        "limit=0": "query parameter 'limit': expected at least 1, got 0",
        "limit=1001": "query parameter 'limit': expected at most 1000, got 1001",
        "limit=ten": "query parameter 'limit': expected an integer, got 'ten'",
        "severity=LOUD": "query parameter 'severity': expected one of LOW, MEDIUM, "
        "HIGH, CRITICAL, got 'LOUD'",
        "since=yesterday": "query parameter 'since': expected an RFC 3339 date-time "
        "with offset, like 2025-01-31T12:00:00Z, got 'yesterday'",
        "colour=red": "query parameter 'colour': not known here; expected severity, "
        "event_type, since, until, station_id, user, after_id, limit",
        "limit=1&limit=2": "query parameter 'limit': given more than once",
    }
    for query, detail in cases.items():
        response = api.client.get(f"{API}/audit-log?{query}", headers=admin)
        assert assert_error(response, 422, "validation_error") == detail

    response = api.client.get(f"{STATIONS}?x=1", headers=admin)
    assert "not known here; expected none" in assert_error(response, 422)


def test_faults_are_a_json_500_without_details(
    make_server: Callable[..., ApiServer],
) -> None:
    async def broken(call: Call) -> Response:
        raise RuntimeError("internal secret: /etc/calejo")

    endpoint = Endpoint("GET", "/broken", broken, "fails", "test", access=None)
    api = make_server(endpoints=[*system.ENDPOINTS, endpoint])

    response = api.client.get(f"{API}/broken")

    detail = assert_error(response, 500, "internal_error")
    assert "secret" not in detail and "RuntimeError" not in detail
    assert api.client.get(f"{API}/health").status_code == 200


def test_security_headers_on_every_answer(api: ApiServer) -> None:
    answers = [
        api.client.get(f"{API}/health"),
        api.client.get(f"{API}/metrics"),
        api.client.get(f"{API}/openapi.json"),
        api.client.get(STATIONS),
        api.client.get(STATIONS, headers=api.admin()),
        api.client.get("/nowhere"),
        api.client.delete(f"{API}/health"),
    ]
    for response in answers:
        assert_security_headers(response)


def _stable(value: Any) -> Any:
    volatile = {"setpoint_age", "applied", "ramping", "status", "age"}
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _state(api: ApiServer) -> dict[str, Any]:
    admin = api.admin()
    get = api.client.get
    audit = [
        (e["event_type"], e["outcome"])
        for e in api.audit()
        if e["event_type"] not in REFUSALS
    ]
    return _stable(
        {
            "stations": get(STATIONS, headers=admin).json(),
            "plans": get(f"{API}/plans", headers=admin).json(),
            "stops": get(f"{API}/emergency-stop-status", headers=admin).json(),
            "users": get(f"{API}/users", headers=admin).json(),
            "roles": get(f"{API}/roles", headers=admin).json(),
            "audit": audit,
        }
    )


def _plan(**interval: Any) -> dict[str, Any]:
    entry = {
        "start": "2090-01-01T00:00:00Z",
        "end": "2090-01-01T01:00:00Z",
        "setpoint": 30,
    }
    entry.update(interval)
    return {
        "plan_id": "p",
        "version": 1,
        "pumps": [{"station_id": "north", "pump_id": "p1", "intervals": [entry]}],
    }


def test_nothing_changes_when_the_answer_is_4xx(api: ApiServer) -> None:
    admin = api.admin()
    viewer = api.headers("viewer")
    api.add_user("operator", "keeper")
    user_id = api.users["keeper"][0]
    station = f"{STATIONS}/north"
    before = _state(api)

    requests: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("PUT", SETPOINT, {"value": "x"}, admin, 422),
        ("PUT", SETPOINT, {"value": 30}, viewer, 403),
        ("PUT", SETPOINT, {"value": 30}, bearer("forged"), 401),
        ("PUT", f"{station}/pumps/p9/setpoint", {"value": 30}, admin, 404),
        (
            "POST",
            f"{API}/setpoints",
            {"setpoints": [{"station_id": "north"}]},
            admin,
            422,
        ),
        (
            "POST",
            f"{API}/plans",
            _plan(start="2000-01-01T00:00:00Z", end="2000-01-01T01:00:00Z"),
            admin,
            422,
        ),
        ("POST", f"{API}/plans", _plan(setpoint="high"), admin, 422),
        ("POST", f"{API}/plans", {**_plan(), "version": 0}, admin, 422),
        ("POST", f"{API}/plans", _plan(), viewer, 403),
        ("POST", f"{station}/emergency-stop", {}, admin, 422),
        ("POST", f"{station}/emergency-stop", {"reason": "   "}, admin, 422),
        ("POST", f"{station}/emergency-stop", {"reason": "x" * 501}, admin, 422),
        ("POST", f"{station}/emergency-stop", {"reason": "r"}, viewer, 403),
        ("POST", f"{STATIONS}/atlantis/emergency-stop", {"reason": "r"}, admin, 404),
        ("DELETE", f"{station}/emergency-stop", {"reason": "r"}, admin, 409),
        ("DELETE", f"{API}/emergency-stop", {"reason": "r"}, admin, 409),
        ("POST", f"{API}/users", {"username": "x"}, admin, 422),
        (
            "POST",
            f"{API}/users",
            {"username": "keeper", "email": "k@x", "role": "viewer"},
            admin,
            409,
        ),
        ("PUT", f"{API}/users/{user_id}", {}, admin, 422),
        ("PUT", f"{API}/users/{user_id}", {"password": "short"}, admin, 422),
        ("PUT", f"{API}/users/{user_id}", {"role": "viewer"}, viewer, 403),
        ("PUT", f"{API}/users/nobody", {"role": "viewer"}, admin, 404),
        ("DELETE", f"{API}/users/nobody", None, admin, 404),
        ("PUT", f"{API}/roles/admin", {"permissions": []}, admin, 422),
        ("PUT", f"{API}/roles/viewer", {"permissions": ["nope"]}, admin, 422),
        ("GET", f"{API}/audit-log?limit=0", None, admin, 422),
    ]
    for method, path, body, headers, status in requests:
        response = api.client.request(method, path, json=body, headers=headers)
        assert response.status_code == status, (method, path, response.text)

    broken = (b'{"value": 4', b'{"value": NaN}', b'{"value": 1e400}', b"")
    for raw in broken:
        response = api.client.put(SETPOINT, content=raw, headers={**admin, **JSON})
        assert response.status_code == 422, (raw, response.text)
    plan = (
        b'{"plan_id": "p", "version": 1, "pumps": [{"station_id": "north",'
        b' "pump_id": "p1", "intervals": [{"start": "2090-01-01T00:00:00Z",'
        b' "end": "2090-01-01T01:00:00Z", "setpoint": NaN}]}]}'
    )
    response = api.client.post(f"{API}/plans", content=plan, headers={**admin, **JSON})
    assert assert_error(response, 422, "validation_error") == (
        "field 'pumps[0].intervals[0].setpoint': expected a finite number, got NaN"
    )

    assert _state(api) == before
