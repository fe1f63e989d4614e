"""Login, logout and changing one's own password."""

from __future__ import annotations

from starlette.responses import Response

from calejo_server.api import models
from calejo_server.api.endpoint import PROTOCOL, TOKEN, Call, Endpoint, answer

TAG = "auth"


async def login(call: Call) -> Response:
    body = call.body
    result = await call.services.security.login(
        body["username"], body["password"], call.source, PROTOCOL
    )
    return answer(result.to_dict())


async def logout(call: Call) -> Response:
    assert call.principal is not None
    await call.services.security.logout(call.principal, call.source, PROTOCOL)
    return Response(status_code=204)


async def change_password(call: Call) -> Response:
    assert call.principal is not None
    body = call.body
    view = await call.services.security.change_password(
        call.principal,
        body["old_password"],
        body["new_password"],
        call.source,
        PROTOCOL,
    )
    return answer(view.to_dict())


ENDPOINTS = [
    Endpoint(
        "POST",
        "/auth/login",
        login,
        "Log in: a bearer token for a username and password",
        TAG,
        access=None,
        body=models.LOGIN_BODY,
        answer=models.LOGIN_ANSWER,
        errors=(401, 429, 503),
        description=(
            "The same 401 for an unknown user, a wrong password, a locked or a "
            "deactivated account. Five failures in a row lock the account for 15 "
            "minutes; more than 20 failures from one address in a minute block "
            "it (429 with Retry-After). The token expires after 15 minutes idle "
            "and 12 hours at most."
        ),
        operation_id="login",
    ),
    Endpoint(
        "POST",
        "/auth/logout",
        logout,
        "Log out: revoke this token at once",
        TAG,
        access=TOKEN,
        status=204,
        errors=(503,),
        during_password_change=True,
        operation_id="logout",
    ),
    Endpoint(
        "POST",
        "/auth/change-password",
        change_password,
        "Change one's own password",
        TAG,
        access=TOKEN,
        body=models.CHANGE_PASSWORD_BODY,
        answer=models.USER,
        errors=(503,),
        during_password_change=True,
        description=(
            "Required before anything else after a one-time password. Other "
            "tokens of the user are revoked. A wrong old password is 403 and "
            "counts like a failed login."
        ),
        operation_id="changePassword",
    ),
]
