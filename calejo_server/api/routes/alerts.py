"""Alerts: the recorded ones, newest first (view_alerts), and a test alert
through every enabled channel (manage_alerts)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from calejo_server.alerts.settings import CHANNELS
from calejo_server.api.endpoint import Call, Endpoint, Param, answer
from calejo_server.api.errors import ApiError
from calejo_server.api.models import ID_PATTERN
from calejo_server.api.models import answer as answer_schema
from calejo_server.api.schemas import (
    AnyObject,
    Array,
    Boolean,
    DateTime,
    Integer,
    Nullable,
    Object,
    String,
)
from calejo_server.audit import iso_utc
from calejo_server.security.roles import MANAGE_ALERTS, VIEW_ALERTS
from calejo_server.storage.base import SEVERITIES, AlertQuery, AlertRow

TAG = "alerts"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
DELIVERY_STATES = ("pending", "sent", "failed")

QUERY = (
    Param("severity", String(enum=SEVERITIES), "only this severity"),
    Param(
        "kind",
        String(
            pattern=r"[A-Za-z0-9_.:-]{1,64}",
            pattern_text="an alert kind like emergency_stop",
        ),
        "only this kind, e.g. emergency_stop",
    ),
    Param("since", DateTime(), "only alerts last raised at or after this time"),
    Param(
        "station_id",
        String(pattern=ID_PATTERN, pattern_text="a station id"),
        "only alerts of this station",
    ),
    Param(
        "before_seq",
        Integer(minimum=1, maximum=2**62),
        "alerts raised before this one (the previous page's next_before_seq)",
    ),
    Param(
        "limit",
        Integer(minimum=1, maximum=MAX_LIMIT),
        f"alerts per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})",
    ),
)

ATTEMPT = answer_schema(
    {
        "at": DateTime(),
        "ok": Boolean(),
        "detail": String(description="what the channel answered"),
    },
    "one try at delivering the alert",
)

DELIVERY = answer_schema(
    {
        "status": String(enum=DELIVERY_STATES),
        "recipients": Integer(minimum=0),
        "sent_at": Nullable(DateTime()),
        "attempts": Array(ATTEMPT),
    },
    "what became of the alert on one channel",
)

ALERT = answer_schema(
    {
        "id": String(description="the alert id"),
        "seq": Integer(minimum=1, description="order of raising; for paging"),
        "kind": String(description="what happened, e.g. emergency_stop"),
        "severity": String(enum=SEVERITIES),
        "summary": String(),
        "station_id": Nullable(String()),
        "pump_id": Nullable(String()),
        "first_raised": DateTime(),
        "last_raised": DateTime(description="the latest repeat"),
        "repeat_count": Integer(
            minimum=0, description="repeats suppressed into this alert"
        ),
        "details": AnyObject(),
        "deliveries": Object(
            {}, extra=DELIVERY, description="channel name -> delivery"
        ),
    },
    "one alert and its deliveries",
)

ALERT_PAGE = answer_schema(
    {
        "alerts": Array(ALERT),
        "next_before_seq": Nullable(
            Integer(minimum=1),
            description="pass as before_seq for the next page; null at the end",
        ),
    }
)

CHANNEL_RESULT = answer_schema(
    {
        "enabled": Boolean(),
        "ok": Nullable(Boolean(), description="null when the channel is off"),
        "detail": String(),
    },
    "what the test alert did on one channel",
)

TEST_ANSWER = answer_schema(
    {
        "alert_id": String(),
        "channels": answer_schema({name: CHANNEL_RESULT for name in CHANNELS}),
    }
)


def alert_dict(row: AlertRow) -> dict[str, Any]:
    record = row.record
    return {
        "id": record.alert_id,
        "seq": row.seq,
        "kind": record.kind,
        "severity": record.severity,
        "summary": record.summary,
        "station_id": record.station_id,
        "pump_id": record.pump_id,
        "first_raised": iso_utc(record.first_raised),
        "last_raised": iso_utc(record.last_raised),
        "repeat_count": record.repeat_count,
        "details": record.details,
        "deliveries": record.deliveries,
    }


async def list_alerts(call: Call) -> Response:
    query = call.query
    limit = query.get("limit", DEFAULT_LIMIT)
    rows = await call.services.storage.alerts_query(
        AlertQuery(
            severity=query.get("severity"),
            kind=query.get("kind"),
            since=query.get("since"),
            station_id=query.get("station_id"),
            before_seq=query.get("before_seq"),
            limit=limit + 1,
        )
    )

    more = len(rows) > limit
    rows = rows[:limit]
    return answer(
        {
            "alerts": [alert_dict(row) for row in rows],
            "next_before_seq": rows[-1].seq if more and rows else None,
        }
    )


async def send_test_alert(call: Call) -> Response:
    service = call.services.alerts
    if service is None:
        raise ApiError(
            503, "unavailable", "the alert service is not running in this adapter"
        )

    user = call.principal.username if call.principal is not None else None
    alert_id, results = await service.send_test(user=user, source=call.source)
    return answer(
        {
            "alert_id": alert_id,
            "channels": {name: result.to_dict() for name, result in results.items()},
        }
    )


ENDPOINTS = [
    Endpoint(
        "GET",
        "/alerts",
        list_alerts,
        "Read the recorded alerts",
        TAG,
        access=VIEW_ALERTS,
        query=QUERY,
        answer=ALERT_PAGE,
        errors=(503,),
        description=(
            "Newest first, with each channel's delivery status and attempts. "
            "Page with before_seq: pass the answer's next_before_seq until it "
            "is null."
        ),
        operation_id="listAlerts",
    ),
    Endpoint(
        "POST",
        "/alerts/test",
        send_test_alert,
        "Send a test alert through every enabled channel",
        TAG,
        access=MANAGE_ALERTS,
        answer=TEST_ANSWER,
        errors=(503,),
        description=(
            "One attempt per enabled channel, now (no queue, no retry, no "
            "suppression); the answer has each channel's result, and the "
            "alert and its deliveries are recorded like any other. 503 when "
            "the alert service is not running."
        ),
        operation_id="testAlert",
    ),
]
