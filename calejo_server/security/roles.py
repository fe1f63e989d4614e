"""Roles and the permissions each one grants.

The five roles are fixed; which permissions each grants can be changed
(``PUT /api/v1/roles/{role}``), except that ``admin`` always keeps
``manage_users`` and ``manage_roles``, so the adapter can never be left
without someone able to repair its users and roles.
"""

from __future__ import annotations

from collections.abc import Iterable

READ_PUMP_STATUS = "read_pump_status"
WRITE_SETPOINTS = "write_setpoints"
EMERGENCY_STOP = "emergency_stop"
CLEAR_EMERGENCY_STOP = "clear_emergency_stop"
VIEW_AUDIT_LOG = "view_audit_log"
MANAGE_USERS = "manage_users"
MANAGE_ROLES = "manage_roles"
VIEW_ALERTS = "view_alerts"
MANAGE_ALERTS = "manage_alerts"

PERMISSIONS: tuple[str, ...] = (
    READ_PUMP_STATUS,
    WRITE_SETPOINTS,
    EMERGENCY_STOP,
    CLEAR_EMERGENCY_STOP,
    VIEW_AUDIT_LOG,
    MANAGE_USERS,
    MANAGE_ROLES,
    VIEW_ALERTS,
    MANAGE_ALERTS,
)
"""Every permission name, in a stable order."""

ADMIN = "admin"
OPERATOR = "operator"
OPTIMIZER = "optimizer"
VIEWER = "viewer"
AUDITOR = "auditor"

DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    ADMIN: PERMISSIONS,
    OPERATOR: (
        READ_PUMP_STATUS,
        WRITE_SETPOINTS,
        EMERGENCY_STOP,
        CLEAR_EMERGENCY_STOP,
        VIEW_AUDIT_LOG,
        VIEW_ALERTS,
    ),
    OPTIMIZER: (READ_PUMP_STATUS, WRITE_SETPOINTS),
    VIEWER: (READ_PUMP_STATUS, VIEW_ALERTS),
    AUDITOR: (READ_PUMP_STATUS, VIEW_AUDIT_LOG, VIEW_ALERTS),
}
"""The roles and what they grant on a new installation."""

ROLES: tuple[str, ...] = tuple(DEFAULT_ROLES)
"""Every role name."""

ADMIN_KEEPS: tuple[str, ...] = (MANAGE_USERS, MANAGE_ROLES)
"""Permissions the admin role cannot lose."""


class UnknownRole(LookupError):
    """No role of that name."""

    def __init__(self, role: str) -> None:
        super().__init__(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        self.role = role


class RoleError(ValueError):
    """A change to a role's permissions that is not allowed."""


def normalise_permissions(role: str, permissions: Iterable[str]) -> tuple[str, ...]:
    """The permissions of ``role`` in canonical order, checked.

    Raises :class:`UnknownRole` for a role that does not exist and
    :class:`RoleError` for an unknown permission name or for taking
    ``manage_users`` or ``manage_roles`` from ``admin``.
    """
    if role not in DEFAULT_ROLES:
        raise UnknownRole(role)

    wanted = set(permissions)
    unknown = sorted(wanted.difference(PERMISSIONS))
    if unknown:
        raise RoleError(
            f"unknown permission {unknown[0]!r}: expected any of "
            f"{', '.join(PERMISSIONS)}"
        )

    if role == ADMIN:
        missing = [name for name in ADMIN_KEEPS if name not in wanted]
        if missing:
            raise RoleError(
                f"role 'admin' must keep {missing[0]!r}, so that users and "
                "roles can always be managed"
            )

    return tuple(name for name in PERMISSIONS if name in wanted)
