"""Alerts by e-mail, SMS and webhook.

The adapter raises an alert when something needs a person: an emergency
stop, a station in failsafe, the database out of reach, a locked account,
a certificate about to expire, a failed backup. Each alert has a kind, a
severity (LOW, MEDIUM, HIGH, CRITICAL), a one-sentence summary, details,
and the station and pump it concerns. It is recorded in the ``alerts``
table and goes out on the channels its severity is routed to: by default
CRITICAL by SMS, e-mail and webhook; HIGH by e-mail and webhook; MEDIUM by
e-mail; LOW is recorded only (``GET /api/v1/alerts``, the log). Every
delivery and every failure is recorded in the alerts table and audited
(ALERT_SENT, ALERT_DELIVERY_FAILED).

Raising an alert from other parts of the adapter::

    adapter.alerts.raise_alert(
        "backup_failed",                  # kind: what happened, 1-64 characters
        "HIGH",                           # LOW, MEDIUM, HIGH or CRITICAL
        "the hourly database backup failed: disk full",
        station_id=None,                  # the station and pump it concerns
        pump_id=None,
        details={"archive": "/var/backup/calejo/database/..."},
    )

The call returns at once and never waits for storage or a network: the
alert goes on a bounded queue and is delivered (with retries) in the
background. A repeat of the same kind, station and pump within
``alerts.suppress_window`` seconds (300) is counted on the first alert
instead of being delivered again. It may be called from any thread, and
raises ValueError only for an empty kind or an unknown severity.

Modules: :mod:`.service` (the service), :mod:`.settings` (the ``alerts:``
section), :mod:`.channels` (e-mail, Twilio, webhook), :mod:`.signing` (the
webhook signature and how a receiver checks it), :mod:`.sources` (engine
events, lockouts, certificates), :mod:`.model` (an alert and its
deliveries).
"""

from __future__ import annotations

from calejo_server.alerts.model import Alert, Attempt, Delivery
from calejo_server.alerts.service import (
    ALERT_DELIVERY_FAILED,
    ALERT_SENT,
    AlertService,
    ChannelResult,
)
from calejo_server.alerts.settings import (
    CHANNELS,
    DEFAULT_ROUTING,
    AlertSettings,
    parse_alerts_config,
)
from calejo_server.alerts.signing import SignatureError, verify_signature

__all__ = [
    "ALERT_DELIVERY_FAILED",
    "ALERT_SENT",
    "CHANNELS",
    "DEFAULT_ROUTING",
    "Alert",
    "AlertService",
    "AlertSettings",
    "Attempt",
    "ChannelResult",
    "Delivery",
    "SignatureError",
    "parse_alerts_config",
    "verify_signature",
]
