"""The control engine: live state of stations and pumps behind the safety gate.

:class:`Engine` owns the gate and the register images; the protocol front
ends (REST, Modbus, OPC UA) read from it and write through it.
"""

from calejo_server.engine.clock import Clock, ManualClock, SystemClock
from calejo_server.engine.engine import Engine
from calejo_server.engine.errors import (
    EmergencyStopConflict,
    EngineError,
    InvalidRequest,
    PlanConflict,
    PlanError,
    UnknownPump,
    UnknownStation,
)
from calejo_server.engine.events import EngineEvent
from calejo_server.engine.views import (
    ENGINE_CONTEXT,
    ActiveStop,
    EmergencyStopStatus,
    EngineHealth,
    IntervalView,
    PlanPumpView,
    PlanView,
    PumpLimitsView,
    PumpView,
    RequestContext,
    SetpointItem,
    SetpointResult,
    StationView,
    WatchdogView,
)

__all__ = [
    "ENGINE_CONTEXT",
    "ActiveStop",
    "Clock",
    "EmergencyStopConflict",
    "EmergencyStopStatus",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineHealth",
    "IntervalView",
    "InvalidRequest",
    "ManualClock",
    "PlanConflict",
    "PlanError",
    "PlanPumpView",
    "PlanView",
    "PumpLimitsView",
    "PumpView",
    "RequestContext",
    "SetpointItem",
    "SetpointResult",
    "StationView",
    "SystemClock",
    "UnknownPump",
    "UnknownStation",
    "WatchdogView",
]
