"""GET /alerts (filtered, paged) and POST /alerts/test against real channels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from calejo_server.alerts.settings import parse_alerts_section
from tests.server.alerts.stand_ins import (
    HttpStandIn,
    sms_section,
    wait_for,
    webhook_section,
)

from .conftest import API, ApiServer, assert_error


def _alerts(api: ApiServer, role: str = "viewer", **query: Any) -> dict[str, Any]:
    response = api.client.get(f"{API}/alerts", params=query, headers=api.headers(role))
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


def test_alerts_are_listed_newest_first_filtered_and_paged(api: ApiServer) -> None:
    # With nothing fresh yet, the engine starts both stations in failsafe,
    # and each of those is an alert of its own.
    wait_for(lambda: len(_alerts(api)["alerts"]) == 2, what="the start-up alerts")
    started = {a["station_id"]: a for a in _alerts(api)["alerts"]}
    assert set(started) == {"north", "south"}
    assert {a["kind"] for a in started.values()} == {"failsafe_entered"}
    south = started["south"]
    assert south["repeat_count"] == 0

    api.alerts.raise_alert(
        "emergency_stop", "CRITICAL", "stop north", station_id="north"
    )
    api.alerts.raise_alert(
        "failsafe_entered", "HIGH", "south failsafe", station_id="south"
    )
    api.alerts.raise_alert("backup_failed", "HIGH", "disk full", details={"free": 0})
    api.alerts.raise_alert("note", "LOW", "for the record")

    def recorded() -> bool:
        alerts = _alerts(api)["alerts"]
        repeats = {a["id"]: a["repeat_count"] for a in alerts}
        return len(alerts) == 5 and repeats[south["id"]] == 1

    wait_for(recorded, what="three new alerts and one repeat recorded")

    # The second failsafe of south, within the suppress window, is a repeat:
    # counted on the first one, not listed again.
    every = _alerts(api)["alerts"]
    assert [a["kind"] for a in every] == [
        "note",
        "backup_failed",
        "emergency_stop",
        "failsafe_entered",
        "failsafe_entered",
    ]
    assert [a["seq"] for a in every] == sorted((a["seq"] for a in every), reverse=True)
    note, backup, stop = every[:3]
    assert note["severity"] == "LOW" and note["station_id"] is None
    assert note["summary"] == "for the record" and note["deliveries"] == {}
    assert backup["details"] == {"free": 0} and backup["station_id"] is None
    assert stop["severity"] == "CRITICAL" and stop["station_id"] == "north"
    assert stop["summary"] == "stop north" and stop["repeat_count"] == 0
    assert stop["deliveries"] == {}
    assert stop["first_raised"] == stop["last_raised"]
    repeated = next(a for a in every if a["id"] == south["id"])
    assert repeated["first_raised"] == south["first_raised"]
    assert repeated["last_raised"] >= stop["first_raised"]

    high = _alerts(api, severity="HIGH")["alerts"]
    assert [a["kind"] for a in high] == [
        "backup_failed",
        "failsafe_entered",
        "failsafe_entered",
    ]
    assert [a["id"] for a in _alerts(api, severity="LOW")["alerts"]] == [note["id"]]
    assert [a["kind"] for a in _alerts(api, kind="note")["alerts"]] == ["note"]
    north = _alerts(api, station_id="north")["alerts"]
    assert [a["id"] for a in north] == [stop["id"], started["north"]["id"]]
    assert _alerts(api, since="2999-01-01T00:00:00Z")["alerts"] == []
    since_stop = _alerts(api, since=stop["first_raised"])["alerts"]
    assert {a["id"] for a in since_stop} == {
        note["id"],
        backup["id"],
        stop["id"],
        south["id"],
    }

    first = _alerts(api, limit=3)
    assert [a["id"] for a in first["alerts"]] == [a["id"] for a in every[:3]]
    assert first["next_before_seq"] == every[2]["seq"]
    rest = _alerts(api, limit=3, before_seq=first["next_before_seq"])
    assert [a["id"] for a in rest["alerts"]] == [a["id"] for a in every[3:]]
    assert rest["next_before_seq"] is None


def test_a_bad_filter_is_a_json_error(api: ApiServer) -> None:
    headers = api.headers("auditor")

    response = api.client.get(f"{API}/alerts?severity=SEVERE", headers=headers)
    detail = assert_error(response, 422, "validation_error")
    assert detail.startswith("query parameter 'severity': expected one of LOW")

    response = api.client.get(f"{API}/alerts?limit=0", headers=headers)
    assert_error(response, 422, "validation_error")


def test_a_test_alert_reports_each_channel_and_is_recorded(
    make_server: Callable[..., ApiServer],
    http_stand_in: Callable[..., HttpStandIn],
) -> None:
    hook = http_stand_in()
    twilio = http_stand_in(default=500)
    settings = parse_alerts_section(
        {"webhook": webhook_section(hook), "sms": sms_section(twilio)}, "test"
    )
    api = make_server(alerts=settings)

    response = api.client.post(f"{API}/alerts/test", headers=api.admin())

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["channels"]["webhook"] == {
        "enabled": True,
        "ok": True,
        "detail": "delivered to 1 recipient(s)",
    }
    sms = body["channels"]["sms"]
    assert sms["enabled"] is True and sms["ok"] is False
    assert "answered HTTP 500" in sms["detail"]
    assert body["channels"]["email"] == {
        "enabled": False,
        "ok": None,
        "detail": "email is not enabled in alerts.email",
    }
    # The hook also gets the engine's start-up failsafe alerts (HIGH).
    tested = [
        seen
        for seen in hook.requests
        if seen.headers["x-calejo-alert-id"] == body["alert_id"]
    ]
    assert len(tested) == 1
    assert len(twilio.requests) == 2

    (alert,) = _alerts(api, kind="test")["alerts"]
    assert alert["id"] == body["alert_id"]
    assert alert["details"]["requested_by"] == "admin"
    assert alert["deliveries"]["webhook"]["status"] == "sent"
    assert alert["deliveries"]["sms"]["status"] == "failed"
    assert len(alert["deliveries"]["sms"]["attempts"]) == 1

    def of_the_test(event_type: str) -> list[dict[str, Any]]:
        entries = api.audit(event_type=event_type)
        return [e for e in entries if e["details"]["alert_id"] == body["alert_id"]]

    sent = of_the_test("ALERT_SENT")
    assert [(e["user"], e["details"]["channel"]) for e in sent] == [
        ("admin", "webhook")
    ]
    failed = of_the_test("ALERT_DELIVERY_FAILED")
    assert [(e["severity"], e["details"]["channel"]) for e in failed] == [
        ("HIGH", "sms")
    ]

    health = api.client.get(f"{API}/health/detailed").json()
    component = health["components"]["alerts"]
    assert health["status"] == "degraded"
    assert component["state"] == "degraded"
    assert component["channels"]["sms"]["last_failure"] is not None
    assert "HTTP 500" in component["channels"]["sms"]["last_error"]
    assert component["channels"]["webhook"]["last_success"] is not None
    assert component["channels"]["email"]["enabled"] is False


def test_without_channels_a_test_alert_goes_nowhere_and_says_so(
    api: ApiServer,
) -> None:
    response = api.client.post(f"{API}/alerts/test", headers=api.admin())

    assert response.status_code == 200
    channels = response.json()["channels"]
    assert {name: c["enabled"] for name, c in channels.items()} == {
        "sms": False,
        "email": False,
        "webhook": False,
    }
    health = api.client.get(f"{API}/health/detailed").json()
    assert health["components"]["alerts"]["state"] == "not_configured"
