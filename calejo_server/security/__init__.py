"""Users, roles, passwords and bearer tokens of the adapter."""

from __future__ import annotations

from calejo_server.security.directory import (
    AuthError,
    Clock,
    Context,
    InvalidUser,
    LoginResult,
    Principal,
    Security,
    SecurityError,
    SystemClock,
    Throttled,
    UnknownUser,
    UserConflict,
    UserView,
    WrongPassword,
)
from calejo_server.security.passwords import (
    HashingBusy,
    PasswordPolicyError,
    Passwords,
    check_policy,
    generate_password,
)
from calejo_server.security.roles import (
    DEFAULT_ROLES,
    PERMISSIONS,
    ROLES,
    RoleError,
    UnknownRole,
)
from calejo_server.security.tokens import hash_token

__all__ = [
    "DEFAULT_ROLES",
    "PERMISSIONS",
    "ROLES",
    "AuthError",
    "Clock",
    "Context",
    "HashingBusy",
    "InvalidUser",
    "LoginResult",
    "PasswordPolicyError",
    "Passwords",
    "Principal",
    "RoleError",
    "Security",
    "SecurityError",
    "SystemClock",
    "Throttled",
    "UnknownRole",
    "UnknownUser",
    "UserConflict",
    "UserView",
    "WrongPassword",
    "check_policy",
    "generate_password",
    "hash_token",
]
