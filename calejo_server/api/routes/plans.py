"""Optimizer plans: intervals with a setpoint per pump."""

from __future__ import annotations

from starlette.responses import Response

from calejo_server.api import models
from calejo_server.api.endpoint import Call, Endpoint, answer
from calejo_server.security.roles import READ_PUMP_STATUS, WRITE_SETPOINTS

TAG = "plans"


async def submit_plan(call: Call) -> Response:
    view = await call.services.engine.submit_plan(call.body, call.ctx)
    return answer(view.to_dict(), 201)


async def list_plans(call: Call) -> Response:
    return answer({"plans": [plan.to_dict() for plan in call.services.engine.plans()]})


ENDPOINTS = [
    Endpoint(
        "POST",
        "/plans",
        submit_plan,
        "Submit a plan",
        TAG,
        access=WRITE_SETPOINTS,
        body=models.PLAN_BODY,
        answer=models.PLAN,
        status=201,
        errors=(409, 503),
        description=(
            "Each pump follows the most recently received plan covering it: when "
            "an interval begins its setpoint goes through the gate once. A "
            "higher version of a plan id supersedes it; the same or a lower one "
            "is 409. 422 names the part that is wrong, e.g. "
            "pumps[0].intervals[2] (unsorted, overlapping, already ended) or an "
            "unknown station or pump."
        ),
        operation_id="submitPlan",
    ),
    Endpoint(
        "GET",
        "/plans",
        list_plans,
        "The plans held",
        TAG,
        access=READ_PUMP_STATUS,
        answer=models.PLANS,
        operation_id="listPlans",
    ),
]
