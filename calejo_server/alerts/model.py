"""An alert, its deliveries, and how it reads in a message."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any, Final, Literal

from calejo_server.audit import iso_utc, json_safe
from calejo_server.storage.base import AlertRecord, Severity

__all__ = [
    "SEVERITY_RANK",
    "Alert",
    "Attempt",
    "Delivery",
    "DeliveryStatus",
]

SEVERITY_RANK: Final[Mapping[str, int]] = {
    "LOW": 0,
    "MEDIUM": 1,
    "HIGH": 2,
    "CRITICAL": 3,
}
"""Severities from the least to the most urgent."""

RESPONSE_TIME: Final[Mapping[str, str]] = {
    "CRITICAL": "respond within 15 minutes",
    "HIGH": "respond within 1 hour",
    "MEDIUM": "respond within 4 hours",
    "LOW": "informational",
}

DeliveryStatus = Literal["pending", "sent", "failed"]

SUPPRESSED_EARLIER: Final = "suppressed_earlier"
"""The key in ``details`` that counts the repeats suppressed before this alert."""

SMS_LENGTH: Final = 320
"""Characters of a text message (two SMS segments)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One try at delivering an alert on one channel."""

    at: dt.datetime
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": iso_utc(self.at), "ok": self.ok, "detail": self.detail}


@dataclasses.dataclass(slots=True)
class Delivery:
    """What became of an alert on one channel."""

    channel: str
    recipients: int
    status: DeliveryStatus = "pending"
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    sent_at: dt.datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "recipients": self.recipients,
            "sent_at": iso_utc(self.sent_at) if self.sent_at else None,
            "attempts": [attempt.to_dict() for attempt in self.attempts],
        }


@dataclasses.dataclass(slots=True)
class Alert:
    """Something an operator must hear about, and how it was passed on.

    ``repeat_count`` counts the repeats of the same kind, station and pump
    that were suppressed into this alert after it was raised.
    """

    alert_id: str
    kind: str
    severity: Severity
    summary: str
    station_id: str | None
    pump_id: str | None
    first_raised: dt.datetime
    last_raised: dt.datetime
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    repeat_count: int = 0
    deliveries: dict[str, Delivery] = dataclasses.field(default_factory=dict)
    save_queued: bool = False

    def record(self) -> AlertRecord:
        """The row of the alerts table, as the alert stands now."""
        return AlertRecord(
            alert_id=self.alert_id,
            kind=self.kind,
            severity=self.severity,
            summary=self.summary,
            station_id=self.station_id,
            pump_id=self.pump_id,
            first_raised=self.first_raised,
            last_raised=self.last_raised,
            repeat_count=self.repeat_count,
            details=dict(self.details),
            deliveries={
                name: delivery.to_dict() for name, delivery in self.deliveries.items()
            },
        )

    def to_dict(self) -> dict[str, Any]:
        """The alert as JSON data (the webhook's body)."""
        return {
            "alert_id": self.alert_id,
            "kind": self.kind,
            "severity": self.severity,
            "summary": self.summary,
            "station_id": self.station_id,
            "pump_id": self.pump_id,
            "first_raised": iso_utc(self.first_raised),
            "last_raised": iso_utc(self.last_raised),
            "repeat_count": self.repeat_count,
            "details": json_safe(self.details),
        }

    # -- how it reads

    def where(self) -> str:
        """``station north, pump p1``, ``station north`` or ``system``."""
        if self.station_id is None:
            return "system"
        if self.pump_id is None:
            return f"station {self.station_id}"
        return f"station {self.station_id}, pump {self.pump_id}"

    def earlier(self) -> str | None:
        """The sentence about repeats suppressed before this alert, if any."""
        earlier = self.details.get(SUPPRESSED_EARLIER)
        if not isinstance(earlier, Mapping):
            return None
        count = earlier.get("repeat_count")
        return (
            f"{count} repeat(s) of the previous alert {earlier.get('alert_id')} "
            f"(first raised {earlier.get('first_raised')}) were suppressed"
        )

    def subject(self, prefix: str = "Calejo") -> str:
        """One line: ``[Calejo CRITICAL] <summary>``."""
        line = " ".join(self.summary.split())
        text = f"[{prefix} {self.severity}] {line}"
        return text if len(text) <= 200 else text[:197] + "..."

    def text(self, adapter: str) -> str:
        """The plain-text body of an e-mail."""
        lines = [
            f"{self.severity} alert ({RESPONSE_TIME.get(self.severity, '')}) "
            f"from the Calejo Control Adapter on {adapter}:",
            "",
            self.summary,
            "",
            f"Kind:          {self.kind}",
            f"Where:         {self.where()}",
            f"First raised:  {iso_utc(self.first_raised)}",
            f"Last raised:   {iso_utc(self.last_raised)}",
            f"Repeats:       {self.repeat_count} suppressed into this alert",
        ]
        earlier = self.earlier()
        if earlier:
            lines.append(f"Earlier:       {earlier}")

        shown = {k: v for k, v in self.details.items() if k != SUPPRESSED_EARLIER}
        if shown:
            lines += ["", "Details:"]
            for key, value in sorted(shown.items()):
                lines.append(f"  {key}: {_value_text(value)}")

        lines += ["", f"Alert id: {self.alert_id}"]
        return "\n".join(lines) + "\n"

    def short_text(self) -> str:
        """A text message: severity, summary and repeats, at most 320 characters."""
        text = self.subject()
        earlier = self.details.get(SUPPRESSED_EARLIER)
        if isinstance(earlier, Mapping):
            text += f" (+{earlier.get('repeat_count')} earlier repeats suppressed)"
        return text if len(text) <= SMS_LENGTH else text[: SMS_LENGTH - 3] + "..."


def _value_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False)
