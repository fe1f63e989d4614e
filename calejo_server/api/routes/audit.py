"""The audit log, filtered and paged (view_audit_log)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from calejo_server.api import models
from calejo_server.api.endpoint import Call, Endpoint, Param, answer
from calejo_server.api.schemas import DateTime, Integer, String
from calejo_server.security.roles import VIEW_AUDIT_LOG
from calejo_server.storage.base import SEVERITIES, AuditQuery, AuditRow

TAG = "audit"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

QUERY = (
    Param("severity", String(enum=SEVERITIES), "only this severity"),
    Param(
        "event_type",
        String(
            pattern=r"[A-Z_]{1,64}", pattern_text="an event type like SETPOINT_CHANGED"
        ),
        "only this event type, e.g. SETPOINT_CHANGED",
    ),
    Param("since", DateTime(), "only rows at or after this time"),
    Param("until", DateTime(), "only rows at or before this time"),
    Param(
        "station_id", String(min_length=1, max_length=128), "only rows of this station"
    ),
    Param("user", String(min_length=1, max_length=256), "only rows of this user"),
    Param(
        "after_id",
        Integer(minimum=0, maximum=2**62),
        "rows with a larger id (the previous page's next_after_id)",
    ),
    Param(
        "limit",
        Integer(minimum=1, maximum=MAX_LIMIT),
        f"rows per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})",
    ),
)


def row_dict(row: AuditRow) -> dict[str, Any]:
    record = row.record
    return {
        "id": row.id,
        "timestamp": record.timestamp.isoformat(),
        "severity": record.severity,
        "event_type": record.event_type,
        "user": record.user,
        "source_address": record.source_address,
        "protocol": record.protocol,
        "station_id": record.station_id,
        "pump_id": record.pump_id,
        "old_value": record.old_value,
        "new_value": record.new_value,
        "outcome": record.outcome,
        "details": record.details,
        "uid": record.uid,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


async def audit_log(call: Call) -> Response:
    query = call.query
    limit = query.get("limit", DEFAULT_LIMIT)
    rows = await call.services.storage.audit_query(
        AuditQuery(
            severity=query.get("severity"),
            event_type=query.get("event_type"),
            since=query.get("since"),
            until=query.get("until"),
            station_id=query.get("station_id"),
            user=query.get("user"),
            after_id=query.get("after_id", 0),
            limit=limit + 1,
        )
    )

    more = len(rows) > limit
    rows = rows[:limit]
    return answer(
        {
            "entries": [row_dict(row) for row in rows],
            "next_after_id": rows[-1].id if more and rows else None,
        }
    )


ENDPOINTS = [
    Endpoint(
        "GET",
        "/audit-log",
        audit_log,
        "Read the audit log",
        TAG,
        access=VIEW_AUDIT_LOG,
        query=QUERY,
        answer=models.AUDIT_PAGE,
        errors=(503,),
        description=(
            "Oldest first. Page with after_id: pass the answer's next_after_id "
            "until it is null."
        ),
        operation_id="auditLog",
    ),
]
