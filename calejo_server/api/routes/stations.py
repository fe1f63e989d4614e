"""Stations and pumps: state, setpoints and emergency stops.

A setpoint whose value is not a JSON number is not a setpoint request at
all: the body does not fit the schema, so the answer is 422 naming the
field and the gate is never asked. The gate's ``rejected`` outcome is for
values that are numbers yet unusable, which arrive by other ways (NaN or
infinity over Modbus or through ``calejo_core``), and for unknown pumps
in a batch. A number is answered 200 with the gate's outcome: accepted,
clamped (to the nearest limit), or blocked (an emergency stop covers the
pump; the target is recorded, the applied value stays at stop).
"""

from __future__ import annotations

from starlette.responses import Response

from calejo_server.api import models
from calejo_server.api.endpoint import Call, Endpoint, Param, answer
from calejo_server.api.schemas import String
from calejo_server.engine.views import EmergencyStopStatus, SetpointItem
from calejo_server.security.roles import (
    CLEAR_EMERGENCY_STOP,
    EMERGENCY_STOP,
    READ_PUMP_STATUS,
    WRITE_SETPOINTS,
)

TAG = "stations"

STATION_ID = Param(
    "station_id",
    String(min_length=1, max_length=128),
    "the station's id (unknown: 404 naming it)",
    True,
)
PUMP_ID = Param(
    "pump_id",
    String(min_length=1, max_length=128),
    "the pump's id within the station (unknown: 404 naming it)",
    True,
)
STATION = (STATION_ID,)
PUMP = (STATION_ID, PUMP_ID)


async def list_stations(call: Call) -> Response:
    stations = call.services.engine.stations()
    return answer({"stations": [station.to_dict() for station in stations]})


async def get_station(call: Call) -> Response:
    return answer(call.services.engine.station(call.path("station_id")).to_dict())


async def get_pump(call: Call) -> Response:
    view = call.services.engine.pump(call.path("station_id"), call.path("pump_id"))
    return answer(view.to_dict())


async def put_setpoint(call: Call) -> Response:
    result = await call.services.engine.set_setpoint(
        call.path("station_id"), call.path("pump_id"), call.body["value"], call.ctx
    )
    call.services.metrics.count_setpoint(result.outcome)
    return answer(result.to_dict())


async def post_setpoints(call: Call) -> Response:
    items = [
        SetpointItem(item["station_id"], item["pump_id"], item["value"])
        for item in call.body["setpoints"]
    ]
    results = await call.services.engine.set_setpoints(items, call.ctx)

    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    for outcome, count in counts.items():
        call.services.metrics.count_setpoint(outcome, count)
    return answer({"results": [result.to_dict() for result in results]})


def _stop_args(call: Call) -> tuple[str, str]:
    assert call.principal is not None
    body = call.body
    return body["reason"], body.get("operator") or call.principal.username


def _status(status: EmergencyStopStatus) -> Response:
    return answer(status.to_dict())


async def stop_system(call: Call) -> Response:
    reason, operator = _stop_args(call)
    engine = call.services.engine
    return _status(
        await engine.emergency_stop("system", None, None, reason, operator, call.ctx)
    )


async def clear_system(call: Call) -> Response:
    reason, operator = _stop_args(call)
    engine = call.services.engine
    return _status(
        await engine.clear_emergency_stop(
            "system", None, None, reason, operator, call.ctx
        )
    )


async def system_status(call: Call) -> Response:
    return _status(call.services.engine.system_emergency_stop())


async def stop_station(call: Call) -> Response:
    reason, operator = _stop_args(call)
    status = await call.services.engine.emergency_stop(
        "station", call.path("station_id"), None, reason, operator, call.ctx
    )
    return _status(status)


async def clear_station(call: Call) -> Response:
    reason, operator = _stop_args(call)
    status = await call.services.engine.clear_emergency_stop(
        "station", call.path("station_id"), None, reason, operator, call.ctx
    )
    return _status(status)


async def station_status(call: Call) -> Response:
    return _status(call.services.engine.emergency_stop_status(call.path("station_id")))


async def stop_pump(call: Call) -> Response:
    reason, operator = _stop_args(call)
    status = await call.services.engine.emergency_stop(
        "pump",
        call.path("station_id"),
        call.path("pump_id"),
        reason,
        operator,
        call.ctx,
    )
    return _status(status)


async def clear_pump(call: Call) -> Response:
    reason, operator = _stop_args(call)
    status = await call.services.engine.clear_emergency_stop(
        "pump",
        call.path("station_id"),
        call.path("pump_id"),
        reason,
        operator,
        call.ctx,
    )
    return _status(status)


async def pump_status(call: Call) -> Response:
    status = call.services.engine.pump_emergency_stop_status(
        call.path("station_id"), call.path("pump_id")
    )
    return _status(status)


_STOP_NOTE = (
    "Latched until cleared; the covered pumps go to their stop value at once, "
    "durable before the answer. Activating an active stop answers its status."
)
_CLEAR_NOTE = (
    "Clears exactly this stop (others stay latched); the pumps ramp up from "
    "their stop value. 409 when it is not active."
)

ENDPOINTS = [
    Endpoint(
        "GET",
        "/pump-stations",
        list_stations,
        "Every station with its pumps",
        TAG,
        access=READ_PUMP_STATUS,
        answer=models.STATIONS,
        operation_id="listStations",
    ),
    Endpoint(
        "GET",
        "/pump-stations/{station_id}",
        get_station,
        "One station with its pumps",
        TAG,
        access=READ_PUMP_STATUS,
        path_params=STATION,
        answer=models.STATION,
        operation_id="getStation",
    ),
    Endpoint(
        "GET",
        "/pump-stations/{station_id}/pumps/{pump_id}",
        get_pump,
        "One pump",
        TAG,
        access=READ_PUMP_STATUS,
        path_params=PUMP,
        answer=models.PUMP,
        operation_id="getPump",
    ),
    Endpoint(
        "PUT",
        "/pump-stations/{station_id}/pumps/{pump_id}/setpoint",
        put_setpoint,
        "Set a pump's setpoint, through the safety gate",
        TAG,
        access=WRITE_SETPOINTS,
        path_params=PUMP,
        body=models.SETPOINT_BODY,
        answer=models.SETPOINT_RESULT,
        errors=(503,),
        description=(
            "Answered with the gate's outcome: accepted, clamped (to the nearest "
            "limit) or blocked (an emergency stop covers the pump). Durable and "
            "audited before the answer. A value that is not a number is 422."
        ),
        operation_id="setSetpoint",
    ),
    Endpoint(
        "POST",
        "/setpoints",
        post_setpoints,
        "Set many setpoints at once",
        TAG,
        access=WRITE_SETPOINTS,
        body=models.SETPOINTS_BODY,
        answer=models.SETPOINTS_RESULT,
        errors=(503,),
        description=(
            "One outcome per item, in order; an item naming an unknown station "
            "or pump is rejected and the others go ahead. At most 10,000 items; "
            "one durable write for all."
        ),
        operation_id="setSetpoints",
    ),
    Endpoint(
        "POST",
        "/emergency-stop",
        stop_system,
        "Emergency stop of every pump",
        TAG,
        access=EMERGENCY_STOP,
        body=models.STOP_BODY,
        answer=models.STOP_STATUS,
        errors=(503,),
        description=_STOP_NOTE,
        operation_id="stopSystem",
    ),
    Endpoint(
        "DELETE",
        "/emergency-stop",
        clear_system,
        "Clear the system emergency stop",
        TAG,
        access=CLEAR_EMERGENCY_STOP,
        body=models.STOP_BODY,
        answer=models.STOP_STATUS,
        errors=(409, 503),
        description=_CLEAR_NOTE,
        operation_id="clearSystemStop",
    ),
    Endpoint(
        "GET",
        "/emergency-stop-status",
        system_status,
        "Every active emergency stop",
        TAG,
        access=READ_PUMP_STATUS,
        answer=models.STOP_STATUS,
        operation_id="systemStopStatus",
    ),
    Endpoint(
        "POST",
        "/pump-stations/{station_id}/emergency-stop",
        stop_station,
        "Emergency stop of a station",
        TAG,
        access=EMERGENCY_STOP,
        path_params=STATION,
        body=models.STOP_BODY,
        answer=models.STOP_STATUS,
        errors=(503,),
        description=_STOP_NOTE,
        operation_id="stopStation",
    ),
    Endpoint(
        "DELETE",
        "/pump-stations/{station_id}/emergency-stop",
        clear_station,
        "Clear a station's emergency stop",
        TAG,
        access=CLEAR_EMERGENCY_STOP,
        path_params=STATION,
        body=models.STOP_BODY,
        answer=models.STOP_STATUS,
        errors=(409, 503),
        description=_CLEAR_NOTE,
        operation_id="clearStationStop",
    ),
    Endpoint(
        "GET",
        "/pump-stations/{station_id}/emergency-stop-status",
        station_status,
        "The emergency stops bearing on a station",
        TAG,
        access=READ_PUMP_STATUS,
        path_params=STATION,
        answer=models.STOP_STATUS,
        description=(
            "active, level (the strongest), since, reason, by whom, every stop."
        ),
        operation_id="stationStopStatus",
    ),
    Endpoint(
        "POST",
        "/pump-stations/{station_id}/pumps/{pump_id}/emergency-stop",
        stop_pump,
        "Emergency stop of one pump",
        TAG,
        access=EMERGENCY_STOP,
        path_params=PUMP,
        body=models.STOP_BODY,
        answer=models.STOP_STATUS,
        errors=(503,),
        description=_STOP_NOTE,
        operation_id="stopPump",
    ),
    Endpoint(
        "DELETE",
        "/pump-stations/{station_id}/pumps/{pump_id}/emergency-stop",
        clear_pump,
        "Clear a pump's emergency stop",
        TAG,
        access=CLEAR_EMERGENCY_STOP,
        path_params=PUMP,
        body=models.STOP_BODY,
        answer=models.STOP_STATUS,
        errors=(409, 503),
        description=_CLEAR_NOTE,
        operation_id="clearPumpStop",
    ),
    Endpoint(
        "GET",
        "/pump-stations/{station_id}/pumps/{pump_id}/emergency-stop-status",
        pump_status,
        "The emergency stops bearing on a pump",
        TAG,
        access=READ_PUMP_STATUS,
        path_params=PUMP,
        answer=models.STOP_STATUS,
        operation_id="pumpStopStatus",
    ),
]
