"""Users (manage_users) and roles (manage_roles)."""

from __future__ import annotations

from starlette.responses import Response

from calejo_server.api import models
from calejo_server.api.endpoint import Call, Endpoint, Param, answer
from calejo_server.api.schemas import String
from calejo_server.security.roles import MANAGE_ROLES, MANAGE_USERS, PERMISSIONS

TAG = "users"

USER_ID = Param("user_id", String(min_length=1, max_length=64), "the user's id", True)
ROLE = Param("role", models.ROLE, "the role's name", True)


async def list_users(call: Call) -> Response:
    return answer(
        {"users": [view.to_dict() for view in call.services.security.users()]}
    )


async def get_user(call: Call) -> Response:
    return answer(call.services.security.user(call.path("user_id")).to_dict())


async def create_user(call: Call) -> Response:
    body = call.body
    view, initial = await call.services.security.create_user(
        body["username"], body["email"], body["role"], body.get("password"), call.ctx
    )
    return answer({**view.to_dict(), "initial_password": initial}, 201)


async def update_user(call: Call) -> Response:
    body = call.body
    view = await call.services.security.update_user(
        call.path("user_id"),
        call.ctx,
        email=body.get("email"),
        role=body.get("role"),
        active=body.get("active"),
        password=body.get("password"),
        must_change_password=body.get("must_change_password"),
        unlock="locked" in body,
    )
    return answer(view.to_dict())


async def deactivate_user(call: Call) -> Response:
    view = await call.services.security.deactivate_user(call.path("user_id"), call.ctx)
    return answer(view.to_dict())


async def list_roles(call: Call) -> Response:
    roles = call.services.security.roles()
    return answer(
        {
            "roles": [
                {"role": role, "permissions": list(perms)}
                for role, perms in roles.items()
            ],
            "permissions": list(PERMISSIONS),
        }
    )


async def set_role(call: Call) -> Response:
    role = call.path("role")
    perms = await call.services.security.set_role_permissions(
        role, call.body["permissions"], call.ctx
    )
    return answer({"role": role, "permissions": list(perms)})


ENDPOINTS = [
    Endpoint(
        "GET",
        "/users",
        list_users,
        "List the users",
        TAG,
        access=MANAGE_USERS,
        answer=models.USERS,
        operation_id="listUsers",
    ),
    Endpoint(
        "POST",
        "/users",
        create_user,
        "Create a user",
        TAG,
        access=MANAGE_USERS,
        body=models.NEW_USER_BODY,
        answer=models.NEW_USER,
        status=201,
        errors=(409, 503),
        description=(
            "Without a password, the answer carries a one-time initial password "
            "that must be changed (POST /auth/change-password) before the user "
            "can do anything else."
        ),
        operation_id="createUser",
    ),
    Endpoint(
        "GET",
        "/users/{user_id}",
        get_user,
        "One user",
        TAG,
        access=MANAGE_USERS,
        path_params=(USER_ID,),
        answer=models.USER,
        operation_id="getUser",
    ),
    Endpoint(
        "PUT",
        "/users/{user_id}",
        update_user,
        "Change a user",
        TAG,
        access=MANAGE_USERS,
        path_params=(USER_ID,),
        body=models.USER_CHANGE_BODY,
        answer=models.USER,
        errors=(409, 503),
        description=(
            "Deactivating revokes the user's tokens at once; setting a password "
            "revokes them too and, unless must_change_password is false, asks "
            "for a change at the next login. 409 when no active user could "
            "manage users any more."
        ),
        operation_id="updateUser",
    ),
    Endpoint(
        "DELETE",
        "/users/{user_id}",
        deactivate_user,
        "Deactivate a user (revokes their tokens at once)",
        TAG,
        access=MANAGE_USERS,
        path_params=(USER_ID,),
        answer=models.USER,
        errors=(409, 503),
        operation_id="deactivateUser",
    ),
    Endpoint(
        "GET",
        "/roles",
        list_roles,
        "The roles and their permissions",
        TAG,
        access=MANAGE_ROLES,
        answer=models.ROLES_ANSWER,
        operation_id="listRoles",
    ),
    Endpoint(
        "PUT",
        "/roles/{role}",
        set_role,
        "Set the permissions of a role",
        TAG,
        access=MANAGE_ROLES,
        path_params=(ROLE,),
        body=models.ROLE_BODY,
        answer=models.ROLE_ANSWER,
        errors=(409, 503),
        description="admin always keeps manage_users and manage_roles (422 otherwise).",
        operation_id="setRole",
    ),
]
