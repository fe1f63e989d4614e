"""Stations, setpoints, emergency stops and plans over the REST API."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .conftest import API, ApiServer, assert_error

STATIONS = f"{API}/pump-stations"
NORTH = f"{STATIONS}/north"


def setpoint(api: ApiServer, station: str, pump: str, value: Any) -> dict[str, Any]:
    response = api.client.put(
        f"{STATIONS}/{station}/pumps/{pump}/setpoint",
        json={"value": value},
        headers=api.headers("optimizer"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


def test_stations_list_pumps_with_limits_and_flags(api: ApiServer) -> None:
    response = api.client.get(STATIONS, headers=api.headers("viewer"))

    assert response.status_code == 200
    stations = response.json()["stations"]
    assert [s["station_id"] for s in stations] == ["north", "south"]
    north = stations[0]
    assert north["unit_id"] == 1
    assert [p["pump_id"] for p in north["pumps"]] == ["p1", "p2"]
    pump = north["pumps"][0]
    assert pump["limits"]["min_value"] == 20 and pump["limits"]["max_value"] == 50
    assert pump["units"] == "Hz"
    assert north["failsafe"] is True and pump["failsafe"] is True

    one = api.client.get(f"{NORTH}/pumps/p1", headers=api.headers("viewer")).json()
    assert one["pump_id"] == "p1" and one["station_id"] == "north"


def test_setpoint_outcomes(api: ApiServer) -> None:
    accepted = setpoint(api, "north", "p2", 42.5)
    assert accepted == {
        "station_id": "north",
        "pump_id": "p2",
        "outcome": "accepted",
        "requested": 42.5,
        "target": 42.5,
        "applied": accepted["applied"],
        "detail": None,
    }

    clamped = setpoint(api, "north", "p2", 70)
    assert clamped["outcome"] == "clamped"
    assert clamped["requested"] == 70 and clamped["target"] == 50
    assert clamped["detail"]

    low = setpoint(api, "south", "p1", 10)
    assert (low["outcome"], low["target"]) == ("clamped", 20)

    stop = setpoint(api, "south", "p1", 0)
    assert (stop["outcome"], stop["target"]) == ("accepted", 0)

    pump = api.client.get(f"{NORTH}/pumps/p2", headers=api.admin()).json()
    assert pump["target"] == 50 and pump["last_outcome"] == "clamped"
    assert pump["failsafe"] is False


def test_setpoints_are_audited_with_user_and_source(api: ApiServer) -> None:
    setpoint(api, "north", "p2", 33)

    row = api.audit(event_type="SETPOINT_CHANGED", station_id="north")[-1]
    assert row["user"] == "optimizer-1"
    assert row["source_address"] == "127.0.0.1"
    assert row["protocol"] == "REST"
    assert row["pump_id"] == "p2"
    assert row["outcome"] == "accepted"


def test_batch_answers_each_item_in_order(api: ApiServer) -> None:
    items = [
        {"station_id": "north", "pump_id": "p1", "value": 30},
        {"station_id": "north", "pump_id": "p9", "value": 30},
        {"station_id": "nowhere", "pump_id": "p1", "value": 30},
        {"station_id": "south", "pump_id": "p1", "value": 99},
    ]

    response = api.client.post(
        f"{API}/setpoints", json={"setpoints": items}, headers=api.headers("optimizer")
    )

    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["outcome"] for r in results] == [
        "accepted",
        "rejected",
        "rejected",
        "clamped",
    ]
    assert "'p9'" in results[1]["detail"]
    assert "'nowhere'" in results[2]["detail"]
    assert results[3]["target"] == 50


def test_a_large_batch_in_one_request(api: ApiServer) -> None:
    items = [
        {"station_id": "north", "pump_id": f"p{1 + i % 2}", "value": 20 + i % 30}
        for i in range(10_000)
    ]

    response = api.client.post(
        f"{API}/setpoints", json={"setpoints": items}, headers=api.admin()
    )

    assert response.status_code == 200
    assert len(response.json()["results"]) == 10_000


def test_station_emergency_stop_flow(api: ApiServer) -> None:
    operator = api.headers("operator")
    setpoint(api, "north", "p2", 40)

    response = api.client.post(
        f"{NORTH}/emergency-stop", json={"reason": "blocked inlet"}, headers=operator
    )
    assert response.status_code == 200
    status = response.json()
    assert status["active"] is True
    assert status["level"] == "station"
    assert status["reason"] == "blocked inlet"
    assert status["operator"] == "operator-1"
    assert status["since"]

    blocked = setpoint(api, "north", "p2", 45)
    assert blocked["outcome"] == "blocked"
    assert blocked["applied"] == 0
    assert setpoint(api, "south", "p1", 45)["outcome"] == "accepted"

    read = api.client.get(
        f"{NORTH}/emergency-stop-status", headers=api.headers("viewer")
    )
    assert read.json()["active"] is True
    station = api.client.get(NORTH, headers=operator).json()
    assert station["emergency_stop"] is True
    assert all(p["emergency_stop"] and p["applied"] == 0 for p in station["pumps"])

    again = api.client.post(
        f"{NORTH}/emergency-stop", json={"reason": "still blocked"}, headers=operator
    )
    assert again.status_code == 200 and again.json()["reason"] == "blocked inlet"

    cleared = api.client.request(
        "DELETE",
        f"{NORTH}/emergency-stop",
        json={"reason": "inlet cleared", "operator": "shift lead"},
        headers=operator,
    )
    assert cleared.status_code == 200
    assert cleared.json()["active"] is False
    conflict = api.client.request(
        "DELETE", f"{NORTH}/emergency-stop", json={"reason": "again"}, headers=operator
    )
    assert_error(conflict, 409, "emergency_stop_not_active")

    activated = api.audit(event_type="EMERGENCY_STOP_ACTIVATED")
    assert activated[0]["user"] == "operator-1"
    assert activated[0]["severity"] == "CRITICAL"
    assert activated[0]["station_id"] == "north"
    cleared_rows = api.audit(event_type="EMERGENCY_STOP_CLEARED")
    assert cleared_rows[-1]["details"]["operator"] == "shift lead"


def test_levels_of_emergency_stop(api: ApiServer) -> None:
    operator = api.headers("operator")
    pump = f"{NORTH}/pumps/p1"
    post = api.client.post

    assert post(
        f"{pump}/emergency-stop", json={"reason": "seal"}, headers=operator
    ).is_success
    status = api.client.get(f"{pump}/emergency-stop-status", headers=operator).json()
    assert (status["active"], status["level"]) == (True, "pump")
    assert setpoint(api, "north", "p2", 30)["outcome"] == "accepted"

    assert post(
        f"{API}/emergency-stop", json={"reason": "storm"}, headers=operator
    ).is_success
    system = api.client.get(f"{API}/emergency-stop-status", headers=operator).json()
    assert system["level"] == "system"
    assert {stop["level"] for stop in system["stops"]} == {"system", "pump"}
    assert setpoint(api, "south", "p1", 30)["outcome"] == "blocked"

    api.client.request(
        "DELETE",
        f"{API}/emergency-stop",
        json={"reason": "storm over"},
        headers=operator,
    )
    assert setpoint(api, "south", "p1", 30)["outcome"] == "accepted"
    assert setpoint(api, "north", "p1", 30)["outcome"] == "blocked"
    status = api.client.get(f"{pump}/emergency-stop-status", headers=operator).json()
    assert status["level"] == "pump"


def test_emergency_stop_bodies_are_checked(api: ApiServer) -> None:
    operator = api.headers("operator")
    cases = [
        (None, 415),
        ({}, 422),
        ({"reason": ""}, 422),
        ({"reason": "  \t"}, 422),
        ({"reason": "x" * 501}, 422),
        ({"reason": "ok", "operator": ""}, 422),
        ({"reason": "ok", "why": "x"}, 422),
    ]
    for body, status in cases:
        response = api.client.post(
            f"{NORTH}/emergency-stop", json=body, headers=operator
        )
        assert_error(response, status)

    status = api.client.get(f"{NORTH}/emergency-stop-status", headers=operator).json()
    assert status["active"] is False


def _interval(start: dt.datetime, minutes: int, value: float) -> dict[str, Any]:
    end = start + dt.timedelta(minutes=minutes)
    return {"start": start.isoformat(), "end": end.isoformat(), "setpoint": value}


def _plan(plan_id: str, version: int, *intervals: dict[str, Any]) -> dict[str, Any]:
    return {
        "plan_id": plan_id,
        "version": version,
        "pumps": [
            {"station_id": "north", "pump_id": "p1", "intervals": list(intervals)}
        ],
    }


def test_plans_are_received_superseded_and_listed(api: ApiServer) -> None:
    optimizer = api.headers("optimizer")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    first = _plan(
        "day-1",
        1,
        _interval(later, 30, 30),
        _interval(later + dt.timedelta(minutes=30), 30, 35),
    )

    response = api.client.post(f"{API}/plans", json=first, headers=optimizer)
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "pending"
    assert len(response.json()["pumps"][0]["intervals"]) == 2

    same = api.client.post(f"{API}/plans", json=first, headers=optimizer)
    assert "above 1" in assert_error(same, 409, "plan_conflict")

    newer = api.client.post(
        f"{API}/plans",
        json=_plan("day-1", 2, _interval(later, 60, 40)),
        headers=optimizer,
    )
    assert newer.status_code == 201

    plans = api.client.get(f"{API}/plans", headers=api.headers("viewer")).json()[
        "plans"
    ]
    assert [(p["plan_id"], p["version"]) for p in plans] == [("day-1", 2)]
    assert api.audit(event_type="PLAN_SUPERSEDED")


def test_plan_errors_name_the_interval(api: ApiServer) -> None:
    optimizer = api.headers("optimizer")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)

    overlapping = _plan("a", 1, _interval(later, 60, 30), _interval(later, 60, 31))
    detail = assert_error(
        api.client.post(f"{API}/plans", json=overlapping, headers=optimizer),
        422,
        "invalid_plan",
    )
    assert detail.startswith("pumps[0].intervals[1]")

    ended = _plan("b", 1, _interval(later, 60, 30), _interval(past, 30, 30))
    detail = assert_error(
        api.client.post(f"{API}/plans", json=ended, headers=optimizer), 422
    )
    assert detail.startswith("pumps[0].intervals[1]")

    wrong = _plan("c", 1, {**_interval(later, 60, 30), "setpoint": "fast"})
    detail = assert_error(
        api.client.post(f"{API}/plans", json=wrong, headers=optimizer), 422
    )
    assert (
        detail
        == "field 'pumps[0].intervals[0].setpoint': expected a number, got string"
    )

    unknown = _plan("d", 1, _interval(later, 60, 30))
    unknown["pumps"][0]["station_id"] = "atlantis"
    detail = assert_error(
        api.client.post(f"{API}/plans", json=unknown, headers=optimizer),
        422,
        "unknown_station",
    )
    assert "pumps[0]" in detail and "'atlantis'" in detail

    naive = _plan("e", 1, {**_interval(later, 60, 30), "start": "2090-01-01T00:00:00"})
    assert_error(api.client.post(f"{API}/plans", json=naive, headers=optimizer), 422)

    assert api.client.get(f"{API}/plans", headers=optimizer).json()["plans"] == []
