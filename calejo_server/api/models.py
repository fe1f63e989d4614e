"""The shapes of the API's request bodies and answers.

Request bodies are closed objects (unknown fields are errors); answers
are open (a client must ignore fields it does not know). Values are in
the pump's engineering units (Hz unless configured), rates in units per
second, ages in seconds, times RFC 3339 in UTC.
"""

from __future__ import annotations

from calejo_server.api.schemas import (
    AnyObject,
    Array,
    Boolean,
    DateTime,
    Integer,
    Nullable,
    Number,
    Object,
    Schema,
    String,
)
from calejo_server.security.directory import EMAIL_PATTERN, USERNAME_PATTERN
from calejo_server.security.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH
from calejo_server.security.roles import PERMISSIONS, ROLES
from calejo_server.storage.base import SEVERITIES

OUTCOMES = ("accepted", "clamped", "rejected", "blocked")
STOP_LEVELS = ("system", "station", "pump")
MAX_BATCH = 10_000
ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
NOT_BLANK = r"[\s\S]*\S[\s\S]*"


def answer(properties: dict[str, Schema], description: str | None = None) -> Object:
    """An open answer object in which every listed field is present."""
    return Object(
        properties, required=tuple(properties), closed=False, description=description
    )


def _text(description: str | None = None) -> String:
    return String(description=description)


def _optional_text(description: str | None = None) -> Nullable:
    return Nullable(String(), description=description)


def _time(description: str | None = None) -> DateTime:
    return DateTime(description=description)


def _optional_time(description: str | None = None) -> Nullable:
    return Nullable(DateTime(), description=description)


# -- errors ------------------------------------------------------------------

ERROR = answer(
    {
        "error": String(description="a short, stable code, e.g. unknown_station"),
        "detail": String(
            description="a sentence saying what was expected and what arrived"
        ),
    },
    "an error",
)

# -- stations, pumps, setpoints -------------------------------------------------

PUMP_LIMITS = answer(
    {
        "min_value": Number(description="lowest setpoint (units)"),
        "max_value": Number(description="highest setpoint (units)"),
        "max_rate": Nullable(
            Number(), description="fastest change (units per second); null: no ramp"
        ),
        "failsafe_value": Number(description="setpoint in failsafe (units)"),
        "stop_value": Number(description="setpoint meaning stopped (units)"),
        "allow_stop": Boolean(description="whether a request of stop_value stops"),
        "min_switch_interval": Number(
            description="seconds from a stop to the next start"
        ),
    }
)

PUMP_FEEDBACK = answer(
    {
        "speed": Nullable(Number(), description="actual speed (units)"),
        "running": Nullable(Boolean()),
        "power": Nullable(Number(), description="power (kW)"),
        "updated_at": _time("when the PLC last wrote any of them"),
    },
    "what the station's PLC last wrote about the pump over Modbus; each "
    "value null until written",
)

PLC = answer(
    {
        "heartbeat": Nullable(Integer(minimum=0, maximum=65535)),
        "heartbeat_age": Nullable(
            Number(), description="seconds since the heartbeat last changed"
        ),
        "heartbeat_lost": Boolean(description="unchanged past heartbeat_timeout"),
        "heartbeat_timeout": Number(description="seconds"),
        "level": Nullable(
            Integer(minimum=-32768, maximum=32767), description="station level (cm)"
        ),
        "last_write_at": _optional_time("the PLC's last accepted write"),
    },
    "the station's PLC as seen over Modbus",
)

PUMP = answer(
    {
        "station_id": _text(),
        "pump_id": _text(),
        "name": _text(),
        "units": _text("engineering units of the values, e.g. Hz"),
        "limits": PUMP_LIMITS,
        "target": Number(description="what was asked, after the gate (units)"),
        "applied": Number(description="what SCADA reads now (units)"),
        "status": Integer(
            minimum=0,
            maximum=65535,
            description="bits: 0 e-stop, 1 failsafe, 2 clamped, 3 ramping, 4 rejected",
        ),
        "emergency_stop": Boolean(),
        "failsafe": Boolean(),
        "clamped": Boolean(),
        "ramping": Boolean(),
        "rejected": Boolean(description="the last request was rejected"),
        "last_outcome": Nullable(String(enum=OUTCOMES)),
        "setpoint_age": Nullable(
            Number(), description="seconds since the last setpoint"
        ),
        "last_setpoint_at": _optional_time(),
        "plan_id": _optional_text("the plan whose interval the pump follows now"),
        "feedback": Nullable(PUMP_FEEDBACK),
    },
    "one pump",
)

STATION = answer(
    {
        "station_id": _text(),
        "name": _text(),
        "unit_id": Integer(minimum=1, maximum=247, description="Modbus unit id"),
        "pumps": Array(PUMP),
        "emergency_stop": Boolean(description="an emergency stop covers a pump"),
        "failsafe": Boolean(),
        "plan_stale": Boolean(description="no plan interval covers now or later"),
        "last_fresh_at": _optional_time("last setpoint or plan received"),
        "status": Integer(
            minimum=0,
            maximum=65535,
            description=(
                "bits: 0 any e-stop, 1 failsafe, 2 plan stale, 3 storage degraded"
            ),
        ),
        "storage_degraded": Boolean(),
        "plc": Nullable(PLC),
    },
    "one station",
)

STATIONS = answer({"stations": Array(STATION)})

SETPOINT_BODY = Object(
    {"value": Number(description="the setpoint (units)", example=42.5)},
    required=("value",),
    description="a setpoint",
)

SETPOINT_RESULT = answer(
    {
        "station_id": _text(),
        "pump_id": _text(),
        "outcome": String(enum=OUTCOMES),
        "requested": Nullable(Number(), description="the value as received"),
        "target": Nullable(Number(), description="the target after the request"),
        "applied": Nullable(Number(), description="what SCADA reads now"),
        "detail": _optional_text("why a request was clamped, rejected or blocked"),
    },
    "what the safety gate made of one setpoint",
)

SETPOINT_ITEM = Object(
    {
        "station_id": String(min_length=1, max_length=128),
        "pump_id": String(min_length=1, max_length=128),
        "value": Number(description="the setpoint (units)"),
    },
    required=("station_id", "pump_id", "value"),
)

SETPOINTS_BODY = Object(
    {"setpoints": Array(SETPOINT_ITEM, min_items=1, max_items=MAX_BATCH)},
    required=("setpoints",),
    description="many setpoints; an unknown pump makes its item rejected",
)

SETPOINTS_RESULT = answer({"results": Array(SETPOINT_RESULT)})

# -- emergency stops ----------------------------------------------------------

STOP_BODY = Object(
    {
        "reason": String(
            min_length=1,
            max_length=500,
            pattern=NOT_BLANK,
            pattern_text="a reason that is not blank",
            example="blockage reported at the inlet",
        ),
        "operator": String(
            min_length=1,
            max_length=200,
            pattern=NOT_BLANK,
            pattern_text="a name that is not blank",
            description="who asks (default: the logged-in user)",
        ),
    },
    required=("reason",),
)

ACTIVE_STOP = answer(
    {
        "level": String(enum=STOP_LEVELS),
        "station_id": _optional_text(),
        "pump_id": _optional_text(),
        "since": _time(),
        "reason": _text(),
        "operator": _text(),
    }
)

STOP_STATUS = answer(
    {
        "active": Boolean(),
        "level": Nullable(
            String(enum=STOP_LEVELS), description="the strongest active stop"
        ),
        "since": _optional_time(),
        "reason": _optional_text(),
        "operator": _optional_text(),
        "stops": Array(ACTIVE_STOP),
    },
    "the emergency stops bearing on a scope",
)

# -- plans ----------------------------------------------------------------------

_FINITE = Number()

INTERVAL_BODY = Object(
    {
        "start": DateTime(as_text=True),
        "end": DateTime(as_text=True),
        "setpoint": Number(description="the setpoint from start until end (units)"),
        "target_flow": Nullable(_FINITE),
        "power": Nullable(_FINITE),
        "level": Nullable(_FINITE),
    },
    required=("start", "end", "setpoint"),
)

PLAN_BODY = Object(
    {
        "plan_id": String(
            pattern=r"[A-Za-z0-9_.:-]{1,128}",
            pattern_text="1 to 128 of A-Z a-z 0-9 _ . : -",
            example="day-2025-06-01",
        ),
        "version": Integer(minimum=1, maximum=2**53, description="higher supersedes"),
        "description": Nullable(String(max_length=1000)),
        "pumps": Array(
            Object(
                {
                    "station_id": String(min_length=1, max_length=128),
                    "pump_id": String(min_length=1, max_length=128),
                    "intervals": Array(INTERVAL_BODY, min_items=1, max_items=10_000),
                },
                required=("station_id", "pump_id", "intervals"),
            ),
            min_items=1,
            max_items=10_000,
        ),
    },
    required=("plan_id", "version", "pumps"),
    description=(
        "an optimizer plan: per pump, sorted, non-overlapping intervals, each "
        "ending in the future; at most 10,000 intervals in all"
    ),
)

INTERVAL = answer({"start": _time(), "end": _time(), "setpoint": Number()})

PLAN = answer(
    {
        "plan_id": _text(),
        "version": Integer(minimum=1),
        "description": _optional_text(),
        "received_at": _time(),
        "user": _optional_text(),
        "state": String(enum=("pending", "active", "ended")),
        "start": _time(),
        "end": _time(),
        "pumps": Array(
            answer(
                {
                    "station_id": _text(),
                    "pump_id": _text(),
                    "intervals": Array(INTERVAL),
                }
            )
        ),
    },
    "a plan as held",
)

PLANS = answer({"plans": Array(PLAN)})

# -- users, roles, login ----------------------------------------------------------

USERNAME = String(
    pattern=USERNAME_PATTERN,
    pattern_text="3 to 64 of A-Z a-z 0-9 _ . -",
    example="operator.north",
)
EMAIL = String(
    max_length=254,
    pattern=EMAIL_PATTERN,
    pattern_text="an address like name@domain",
    example="operator@utility.example",
)
NEW_PASSWORD = String(
    min_length=MIN_PASSWORD_LENGTH,
    max_length=MAX_PASSWORD_LENGTH,
    description="at least 12 characters, not containing the username",
)
ROLE = String(enum=ROLES)

USER = answer(
    {
        "user_id": _text(),
        "username": _text(),
        "email": _text(),
        "role": _text(),
        "active": Boolean(),
        "must_change_password": Boolean(),
        "locked_until": _optional_time("set while the account is locked"),
        "created_at": _time(),
        "updated_at": _time(),
    },
    "a user (never the password)",
)

USERS = answer({"users": Array(USER)})

NEW_USER_BODY = Object(
    {"username": USERNAME, "email": EMAIL, "role": ROLE, "password": NEW_PASSWORD},
    required=("username", "email", "role"),
    description="without a password, a one-time password is generated and returned",
)

NEW_USER = answer(
    {
        **USER.properties,
        "initial_password": _optional_text(
            "the one-time password (shown once), when none was given"
        ),
    }
)

USER_CHANGE_BODY = Object(
    {
        "email": EMAIL,
        "role": ROLE,
        "active": Boolean(description="false deactivates and revokes all tokens"),
        "password": NEW_PASSWORD,
        "must_change_password": Boolean(),
        "locked": Boolean(const=False, description="false lifts a lockout"),
    },
    min_properties=1,
    description="the fields to change; the others stay",
)

PERMISSION_LIST = Array(
    String(enum=PERMISSIONS), max_items=len(PERMISSIONS), unique=True
)

ROLE_BODY = Object({"permissions": PERMISSION_LIST}, required=("permissions",))

ROLE_ANSWER = answer({"role": ROLE, "permissions": Array(String(enum=PERMISSIONS))})

ROLES_ANSWER = answer(
    {
        "roles": Array(ROLE_ANSWER),
        "permissions": Array(String(enum=PERMISSIONS), description="every permission"),
    }
)

LOGIN_BODY = Object(
    {
        "username": String(min_length=1, max_length=256),
        "password": String(min_length=1, max_length=1024),
    },
    required=("username", "password"),
)

LOGIN_ANSWER = answer(
    {
        "access_token": _text("send as 'Authorization: Bearer <token>'"),
        "token_type": String(enum=("bearer",)),
        "expires_in": Integer(minimum=0, description="idle timeout (s)"),
        "expires_at": _time("absolute expiry"),
        "must_change_password": Boolean(),
        "role": _text(),
        "permissions": Array(String(enum=PERMISSIONS)),
    }
)

CHANGE_PASSWORD_BODY = Object(
    {
        "old_password": String(min_length=1, max_length=1024),
        "new_password": NEW_PASSWORD,
    },
    required=("old_password", "new_password"),
)

# -- audit ------------------------------------------------------------------------

AUDIT_ENTRY = answer(
    {
        "id": Integer(minimum=1),
        "timestamp": _time(),
        "severity": String(enum=SEVERITIES),
        "event_type": _text(),
        "user": _optional_text(),
        "source_address": _optional_text(),
        "protocol": _optional_text(),
        "station_id": _optional_text(),
        "pump_id": _optional_text(),
        "old_value": _optional_text(),
        "new_value": _optional_text(),
        "outcome": _optional_text(),
        "details": AnyObject(),
        "uid": _text(),
        "prev_hash": _text("SHA-256 (hex) of the previous row"),
        "hash": _text("SHA-256 (hex) over prev_hash and this row's content"),
    },
    "one row of the tamper-evident audit log",
)

AUDIT_PAGE = answer(
    {
        "entries": Array(AUDIT_ENTRY),
        "next_after_id": Nullable(
            Integer(minimum=1),
            description="pass as after_id for the next page; null at the end",
        ),
    }
)

# -- health and status ------------------------------------------------------------

HEALTH_STATES = ("ok", "degraded", "down")

HEALTH = Object(
    {
        "status": String(enum=HEALTH_STATES),
        "error": String(),
        "detail": String(),
    },
    required=("status",),
    closed=False,
)

COMPONENT = Object(
    {
        "state": String(enum=(*HEALTH_STATES, "not_configured")),
        "detail": String(),
    },
    required=("state", "detail"),
    closed=False,
)

HEALTH_DETAILED = Object(
    {
        "status": String(enum=HEALTH_STATES),
        "components": Object(
            {}, extra=COMPONENT, description="component name -> health"
        ),
        "error": String(),
        "detail": String(),
    },
    required=("status", "components"),
    closed=False,
)

STATUS = answer(
    {
        "status": String(enum=HEALTH_STATES),
        "version": _text(),
        "started_at": _time(),
        "uptime": Number(minimum=0, description="seconds since start"),
        "stations": Integer(minimum=0),
        "pumps": Integer(minimum=0),
        "emergency_stop": Boolean(
            description="a system-level emergency stop is active"
        ),
        "stations_in_emergency_stop": Integer(minimum=0),
        "stations_in_failsafe": Integer(minimum=0),
        "heartbeat": Integer(minimum=0, maximum=65535),
        "storage": String(enum=HEALTH_STATES),
    },
    "a summary of the adapter",
)
