"""The adapter's users, roles and tokens: logins, lockout and throttling.

:class:`Security` keeps the whole directory in memory, loaded from the
storage snapshot at start, so that checking a token is one dictionary
lookup and logins keep working while the database is away (every change
still goes through ``Storage.write``, which spools it then). Changes are
made durable before they take effect and before the caller is answered;
failed logins and throttling take effect even if recording them fails,
so an outage of the storage never weakens the lockout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from calejo_server import audit
from calejo_server.config import SecurityConfig
from calejo_server.security.passwords import (
    HashingBusy,
    PasswordPolicyError,
    Passwords,
    check_policy,
    generate_password,
)
from calejo_server.security.roles import (
    ADMIN,
    DEFAULT_ROLES,
    MANAGE_USERS,
    ROLES,
    UnknownRole,
    normalise_permissions,
)
from calejo_server.security.throttle import SourceThrottle
from calejo_server.security.tokens import TokenState, TokenTable, hash_token
from calejo_server.storage.base import (
    AuditRecord,
    Record,
    RoleRecord,
    Snapshot,
    Storage,
    StorageError,
    TokenRecord,
    UserRecord,
    new_uid,
)

logger = logging.getLogger(__name__)

USERNAME_PATTERN = r"[A-Za-z0-9_.-]{3,64}"
EMAIL_PATTERN = r"[^@\s]{1,64}@[^@\s]{1,189}"
ADMIN_USERNAME = "admin"
ADMIN_EMAIL = "admin@localhost"
SWEEP_INTERVAL = 30.0
ACCESS_CHANGE_TIMEOUT = 2.0
LOGIN_FAILED = "invalid username or password"
MAX_LOGGED_USERNAME = 64

_USERNAME = re.compile(USERNAME_PATTERN)
_EMAIL = re.compile(EMAIL_PATTERN)


class Clock(Protocol):
    """Where the directory reads time: monotonic seconds and UTC."""

    def monotonic(self) -> float: ...

    def utcnow(self) -> dt.datetime: ...


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def utcnow(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class Context(Protocol):
    """Who asks, from where, over which protocol (the engine's RequestContext)."""

    @property
    def user(self) -> str | None: ...

    @property
    def source_address(self) -> str | None: ...

    @property
    def protocol(self) -> str: ...


class SecurityError(Exception):
    """Base of the errors of the directory."""


class AuthError(SecurityError):
    """A login failed; the message is the same whatever the reason."""

    def __init__(self, message: str = LOGIN_FAILED) -> None:
        super().__init__(message)


class Throttled(SecurityError):
    """The source is blocked (too many failures) or logins are saturated."""

    def __init__(self, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WrongPassword(SecurityError):
    """The current password given to change a password is wrong."""


class UnknownUser(SecurityError, LookupError):
    """No user with that id or name."""

    def __init__(self, key: str, what: str = "id") -> None:
        super().__init__(f"unknown user {what} {key!r}")
        self.key = key


class UserConflict(SecurityError):
    """A change that conflicts with existing users (a taken name, the last admin)."""


class InvalidUser(SecurityError, ValueError):
    """A user field that is not acceptable; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user, as a request or a session sees it."""

    user_id: str
    username: str
    role: str
    permissions: frozenset[str]
    must_change_password: bool
    token_hash: str | None = None

    def can(self, permission: str) -> bool:
        return permission in self.permissions


@dataclasses.dataclass(frozen=True, slots=True)
class LoginResult:
    """A fresh token; ``expires_in`` is its idle timeout (s)."""

    access_token: str
    expires_in: int
    expires_at: dt.datetime
    principal: Principal

    def to_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "expires_at": _iso(self.expires_at),
            "must_change_password": self.principal.must_change_password,
            "role": self.principal.role,
            "permissions": sorted(self.principal.permissions),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class UserView:
    """A user as the API shows it: never the password hash."""

    user_id: str
    username: str
    email: str
    role: str
    active: bool
    must_change_password: bool
    locked_until: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "username": self.username,
            "email": self.email,
            "role": self.role,
            "active": self.active,
            "must_change_password": self.must_change_password,
            "locked_until": _iso(self.locked_until),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat()


def _view(user: UserRecord, now: dt.datetime) -> UserView:
    locked = (
        user.locked_until if user.locked_until and user.locked_until > now else None
    )
    return UserView(
        user_id=user.user_id,
        username=user.username,
        email=user.email,
        role=user.role,
        active=user.active,
        must_change_password=user.must_change_password,
        locked_until=locked,
        created_at=user.created_at,
        updated_at=user.updated_at,
    )


def check_username(username: object) -> str:
    """``username`` if it is 3 to 64 of ``A-Z a-z 0-9 _ . -``."""
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise InvalidUser(
            "username",
            f"expected 3 to 64 of the characters A-Z a-z 0-9 _ . -, got {username!r}",
        )
    return username


def check_email(email: object) -> str:
    """``email`` if it looks like ``local@domain`` (at most 254 characters)."""
    if not isinstance(email, str) or len(email) > 254 or not _EMAIL.fullmatch(email):
        raise InvalidUser(
            "email", f"expected an address like name@domain, got {email!r}"
        )
    return email


def check_role(role: object) -> str:
    if not isinstance(role, str) or role not in DEFAULT_ROLES:
        raise InvalidUser("role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    return role


class Security:
    """Users, roles and tokens of one adapter, in memory, durably kept."""

    def __init__(
        self,
        config: SecurityConfig,
        storage: Storage,
        *,
        clock: Clock | None = None,
        passwords: Passwords | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.passwords = passwords if passwords is not None else Passwords()
        self.tokens = TokenTable(
            config.token_idle_timeout, config.token_absolute_timeout
        )
        self.throttle = SourceThrottle(config.source_failure_limit)

        self._users: dict[str, UserRecord] = {}
        self._names: dict[str, str] = {}
        self._roles: dict[str, tuple[str, ...]] = dict(DEFAULT_ROLES)
        self._grants: dict[str, frozenset[str]] = {
            role: frozenset(perms) for role, perms in DEFAULT_ROLES.items()
        }
        self._principals: dict[
            str, tuple[UserRecord, frozenset[str] | None, Principal]
        ] = {}
        """Per token hash: the principal last made, and the user record and
        grants it was made from (it is reused while both are the same)."""
        self._lock = asyncio.Lock()
        self._dummy_hash = ""
        self._sweeper: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[AuditRecord], None]] = []
        self._access_watchers: list[Callable[[], Awaitable[None]]] = []

    # -- life cycle ----------------------------------------------------------

    async def start(self, snapshot: Snapshot | None = None) -> None:
        """Load users, roles and live tokens; start expiring idle tokens.

        ``snapshot`` saves a second ``storage.load()`` when the caller
        has one already.
        """
        if snapshot is None:
            snapshot = await self.storage.load()

        self._dummy_hash = await self.passwords.hash(generate_password())
        self._load(snapshot)

        missing = [
            RoleRecord(role, perms)
            for role, perms in self._roles.items()
            if role not in {r.role for r in snapshot.roles}
        ]
        if missing:
            await self.storage.write(missing)

        if self._sweeper is None:
            self._sweeper = asyncio.create_task(
                self._sweep_forever(), name="security-sweeper"
            )
        logger.info(
            "security: %d user(s), %d live token(s)", len(self._users), len(self.tokens)
        )

    def add_listener(
        self, callback: Callable[[AuditRecord], None]
    ) -> Callable[[], None]:
        """Call ``callback`` with each ACCOUNT_LOCKED and SOURCE_THROTTLED record.

        It runs synchronously on the event loop when the lockout or the
        block takes effect, and must not block. Returns its remover.
        """
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def on_access_change(
        self, callback: Callable[[], Awaitable[None]]
    ) -> Callable[[], None]:
        """Await ``callback()`` whenever what some user may do has changed.

        That is a user's role or active state, or a role's permissions. It
        runs once the change is durable and before the call that made it
        returns, at most :data:`ACCESS_CHANGE_TIMEOUT` seconds (logged when
        longer), so that front ends holding sessions of their own (OPC UA)
        apply a revocation before it is acknowledged. Returns its remover.
        """
        self._access_watchers.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._access_watchers.remove(callback)

        return remove

    async def _access_changed(self) -> None:
        for callback in tuple(self._access_watchers):
            try:
                await asyncio.wait_for(callback(), ACCESS_CHANGE_TIMEOUT)
            except TimeoutError:
                logger.warning(
                    "security: %r did not apply an access change within %.0f s",
                    callback,
                    ACCESS_CHANGE_TIMEOUT,
                )
            except Exception:
                logger.exception("security: %r failed on an access change", callback)

    def _tell(self, record: AuditRecord) -> AuditRecord:
        for callback in tuple(self._listeners):
            try:
                callback(record)
            except Exception:
                logger.exception(
                    "security listener %r failed on %s", callback, record.event_type
                )
        return record

    def _load(self, snapshot: Snapshot) -> None:
        for record in snapshot.roles:
            if record.role not in DEFAULT_ROLES:
                logger.warning(
                    "security: stored role %r is not known; ignored", record.role
                )
                continue
            try:
                perms = normalise_permissions(record.role, record.permissions)
            except ValueError as exc:
                logger.error("security: stored role %r ignored: %s", record.role, exc)
                continue
            self._set_grants(record.role, perms)

        for user in snapshot.users:
            self._users[user.user_id] = user
            self._names[user.username.casefold()] = user.user_id

        now = self.clock.monotonic()
        utcnow = self.clock.utcnow()
        for token in snapshot.tokens:
            owner = self._users.get(token.user_id)
            if token.revoked or owner is None or not owner.active:
                continue
            self.tokens.restore(
                token.token_hash,
                token.user_id,
                token.created_at,
                token.expires_at,
                now,
                utcnow,
            )

    async def stop(self) -> None:
        """Stop the sweeper and record the tokens that expired meanwhile."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

        await self.sweep()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except Exception:
                logger.exception("security: sweeping expired tokens failed")

    async def sweep(self) -> int:
        """Drop expired tokens and forget old failures; the tokens dropped."""
        now = self.clock.monotonic()
        self.throttle.sweep(now)

        expired = self.tokens.sweep(now)
        gone = [h for h in self._principals if self.tokens.peek(h) is None]
        for token_hash in gone:
            del self._principals[token_hash]
        if not expired:
            return 0

        try:
            await self.storage.write([_token_record(state, True) for state in expired])
        except StorageError as exc:
            logger.error(
                "security: could not record %d expired token(s): %s", len(expired), exc
            )
        return len(expired)

    async def ensure_admin(self, password: str | None) -> str | None:
        """Create the first administrator, ``admin``, unless there is one.

        With ``password`` (CALEJO_ADMIN_PASSWORD), that is its password;
        it must pass the password policy. Without, a random one is made
        and returned, for the caller to show once. Returns None when no
        password was generated (an administrator exists, or ``password``
        was given).
        """
        async with self._lock:
            if ADMIN_USERNAME in self._names or self._active_admins():
                return None

            generated = None
            if password is None:
                generated = password = generate_password()
            try:
                check_policy(password, ADMIN_USERNAME)
            except PasswordPolicyError as exc:
                raise PasswordPolicyError(f"admin password: {exc}") from None

            password_hash = await self.passwords.hash(password)
            now = self.clock.utcnow()
            user = UserRecord(
                user_id=new_uid(),
                username=ADMIN_USERNAME,
                email=ADMIN_EMAIL,
                role=ADMIN,
                password_hash=password_hash,
                active=True,
                must_change_password=False,
                failed_logins=0,
                locked_until=None,
                created_at=now,
                updated_at=now,
            )
            record = self._audit(
                audit.USER_CREATED,
                user="system",
                source=None,
                protocol="SYSTEM",
                details={
                    "username": ADMIN_USERNAME,
                    "role": ADMIN,
                    "reason": "first start",
                },
            )
            await self.storage.write([user, record])
            self._put_user(user)

        logger.info("security: administrator %r created", ADMIN_USERNAME)
        return generated

    # -- authentication ------------------------------------------------------

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a live bearer token, or None (cheap, in memory).

        The token is looked up, and its expiry checked, every time; only
        the principal it maps to is reused while its user record and role
        grants are the same objects (both are replaced on every change).
        """
        state = self.tokens.lookup(token, self.clock.monotonic())
        if state is None:
            return None

        user = self._users.get(state.user_id)
        if user is None or not user.active:
            self.tokens.revoke(state.token_hash)
            return None

        grants = self._grants.get(user.role)
        cached = self._principals.get(state.token_hash)
        if cached is not None and cached[0] is user and cached[1] is grants:
            return cached[2]

        principal = self._principal(user, state.token_hash)
        self._principals[state.token_hash] = (user, grants, principal)
        return principal

    def retry_after(self, source: str | None) -> float | None:
        """Seconds ``source`` must wait before authenticating again, or None."""
        return self.throttle.retry_after(source, self.clock.monotonic())

    async def login(
        self,
        username: str,
        password: str,
        source: str | None,
        protocol: str = "REST",
    ) -> LoginResult:
        """Check the credentials and issue a token.

        Raises :class:`AuthError` (same message for an unknown user, a
        wrong password, a locked or deactivated account),
        :class:`Throttled` for a blocked source.
        """
        user = await self._check_credentials(username, password, source, protocol)

        async with self._lock:
            current = self._users.get(user.user_id)
            if current is None or not current.active:
                raise AuthError()

            token, state = self.tokens.issue(
                current.user_id, self.clock.monotonic(), self.clock.utcnow()
            )
            record = self._audit(
                audit.LOGIN_SUCCESS,
                user=current.username,
                source=source,
                protocol=protocol,
            )
            await self.storage.write([_token_record(state, False), record])
            self.tokens.add(state)

        principal = self._principal(current, state.token_hash)
        return LoginResult(
            access_token=token,
            expires_in=int(min(self.tokens.idle_timeout, self.tokens.absolute_timeout)),
            expires_at=state.expires_at,
            principal=principal,
        )

    async def check_password(
        self,
        username: str,
        password: str,
        source: str | None,
        protocol: str,
    ) -> Principal:
        """Check a username and password without issuing a token.

        For sessions of other protocols (OPC UA). Same rules, lockout,
        throttling and audit as :meth:`login`.
        """
        user = await self._check_credentials(username, password, source, protocol)
        return self._principal(user, None)

    async def _check_credentials(
        self,
        username: str,
        password: str,
        source: str | None,
        protocol: str,
    ) -> UserRecord:
        retry = self.retry_after(source)
        if retry is not None:
            raise Throttled(
                retry, f"too many failed logins from {source or 'this source'}"
            )

        user_id = (
            self._names.get(username.casefold()) if isinstance(username, str) else None
        )
        user = self._users.get(user_id) if user_id else None
        stored = user.password_hash if user is not None else self._dummy_hash
        ok = await self._verify(stored, password)

        async with self._lock:
            current = self._users.get(user.user_id) if user is not None else None
            now = self.clock.utcnow()

            reason = None
            if current is None:
                reason = "unknown user"
            elif not current.active:
                reason = "user deactivated"
            elif current.locked_until is not None and current.locked_until > now:
                reason = "account locked"
            elif not ok or current.password_hash != stored:
                reason = "wrong password"

            if reason is None:
                assert current is not None
                await self._login_succeeded(current, password, now)
                return self._users[current.user_id]

            await self._login_failed(username, current, reason, source, protocol, now)
        raise AuthError()

    async def _verify(self, stored: str, password: str) -> bool:
        try:
            return await self.passwords.verify(stored, password)
        except HashingBusy as exc:
            raise Throttled(1.0, "too many logins in progress; try again") from exc

    async def _login_succeeded(
        self, user: UserRecord, password: str, now: dt.datetime
    ) -> None:
        changes: dict[str, Any] = {}
        if user.failed_logins or user.locked_until is not None:
            changes.update(failed_logins=0, locked_until=None)

        if self.passwords.needs_rehash(user.password_hash):
            changes["password_hash"] = await self.passwords.hash(password)

        if not changes:
            return

        updated = dataclasses.replace(user, updated_at=now, **changes)
        try:
            await self.storage.write([updated])
        except StorageError as exc:
            logger.error(
                "security: could not record login of %r: %s", user.username, exc
            )
        self._put_user(updated)

    async def _login_failed(
        self,
        attempted: str,
        user: UserRecord | None,
        reason: str,
        source: str | None,
        protocol: str,
        now: dt.datetime,
    ) -> None:
        name = attempted[:MAX_LOGGED_USERNAME] if isinstance(attempted, str) else None
        records: list[Record] = [
            self._audit(
                audit.INVALID_AUTHENTICATION,
                user=name,
                source=source,
                protocol=protocol,
                outcome="denied",
                details={"reason": reason, "action": "login"},
            )
        ]

        if user is not None and reason == "wrong password":
            records += self._count_failure(user, source, protocol, now)

        if self.throttle.failure(source, self.clock.monotonic()):
            records.append(self._throttled_record(source, protocol))

        await self._write_regardless(records)
        logger.warning(
            "login failed for %r from %s over %s: %s", name, source, protocol, reason
        )

    def _count_failure(
        self, user: UserRecord, source: str | None, protocol: str, now: dt.datetime
    ) -> list[Record]:
        failed = user.failed_logins + 1
        if failed < self.config.lockout_threshold:
            updated = dataclasses.replace(user, failed_logins=failed, updated_at=now)
            self._put_user(updated)
            return [updated]

        until = now + dt.timedelta(seconds=self.config.lockout_duration)
        updated = dataclasses.replace(
            user, failed_logins=0, locked_until=until, updated_at=now
        )
        self._put_user(updated)
        logger.warning(
            "account %r locked until %s after %d failed logins",
            user.username,
            _iso(until),
            failed,
        )
        locked = self._audit(
            audit.ACCOUNT_LOCKED,
            user=user.username,
            source=source,
            protocol=protocol,
            details={"failed_logins": failed, "locked_until": _iso(until)},
        )
        return [updated, self._tell(locked)]

    def _throttled_record(self, source: str | None, protocol: str) -> AuditRecord:
        logger.warning(
            "source %s blocked for %.0f s: more than %d failed authentications "
            "in %.0f s",
            source,
            self.throttle.block,
            self.throttle.limit,
            self.throttle.window,
        )
        throttled = self._audit(
            audit.SOURCE_THROTTLED,
            user=None,
            source=source,
            protocol=protocol,
            details={
                "failures": self.throttle.limit + 1,
                "window_seconds": self.throttle.window,
                "blocked_seconds": self.throttle.block,
            },
        )
        return self._tell(throttled)

    async def deny(
        self,
        *,
        status: int,
        reason: str,
        principal: Principal | None,
        source: str | None,
        protocol: str,
        method: str,
        path: str,
        permission: str | None = None,
    ) -> None:
        """Record a refused request: 401 (bad or no token) or 403.

        A 401 counts against the source like a failed login
        (INVALID_AUTHENTICATION); a 403 is ACCESS_DENIED for the user.
        """
        details: dict[str, Any] = {
            "reason": reason,
            "method": method,
            "path": path[:256],
        }
        if permission is not None:
            details["permission"] = permission

        if status == 403:
            record = self._audit(
                audit.ACCESS_DENIED,
                user=principal.username if principal else None,
                source=source,
                protocol=protocol,
                outcome="denied",
                details=details,
            )
            await self._write_regardless([record])
            return

        records: list[Record] = [
            self._audit(
                audit.INVALID_AUTHENTICATION,
                user=None,
                source=source,
                protocol=protocol,
                outcome="denied",
                details=details,
            )
        ]
        if self.throttle.failure(source, self.clock.monotonic()):
            records.append(self._throttled_record(source, protocol))
        await self._write_regardless(records)

    async def logout(
        self, principal: Principal, source: str | None, protocol: str = "REST"
    ) -> None:
        """Revoke the principal's token at once."""
        if principal.token_hash is None:
            return

        async with self._lock:
            state = self.tokens.peek(principal.token_hash)
            if state is None:
                return

            record = self._audit(
                audit.LOGOUT, user=principal.username, source=source, protocol=protocol
            )
            await self.storage.write([_token_record(state, True), record])
            self.tokens.revoke(state.token_hash)

    async def change_password(
        self,
        principal: Principal,
        old_password: str,
        new_password: str,
        source: str | None,
        protocol: str = "REST",
    ) -> UserView:
        """Change one's own password; other tokens of the user are revoked.

        Raises :class:`PasswordPolicyError` for a new password that does
        not pass the policy or equals the old one, :class:`WrongPassword`
        when ``old_password`` is wrong (counted like a failed login).
        """
        user = self._users.get(principal.user_id)
        if user is None:
            raise UnknownUser(principal.user_id)

        check_policy(new_password, user.username)
        if new_password == old_password:
            raise PasswordPolicyError("the new password must differ from the old one")

        ok = await self._verify(user.password_hash, old_password)
        new_hash = await self.passwords.hash(new_password) if ok else ""

        async with self._lock:
            current = self._users.get(user.user_id)
            now = self.clock.utcnow()
            if current is None or not current.active:
                raise UnknownUser(principal.user_id)

            if not ok or current.password_hash != user.password_hash:
                await self._login_failed(
                    current.username, current, "wrong password", source, protocol, now
                )
                raise WrongPassword("the current password is wrong")

            updated = dataclasses.replace(
                current,
                password_hash=new_hash,
                must_change_password=False,
                failed_logins=0,
                updated_at=now,
            )
            keep = principal.token_hash
            revoked = [
                s
                for s in self.tokens
                if s.user_id == current.user_id and s.token_hash != keep
            ]
            records: list[Record] = [updated]
            records += [_token_record(state, True) for state in revoked]
            records.append(
                self._audit(
                    audit.PASSWORD_CHANGED,
                    user=current.username,
                    source=source,
                    protocol=protocol,
                    details={"username": current.username, "by": "self"},
                )
            )
            await self.storage.write(records)
            self._put_user(updated)
            self.tokens.revoke_user(current.user_id, keep=keep)

        return _view(updated, now)

    # -- users ---------------------------------------------------------------

    def users(self) -> list[UserView]:
        now = self.clock.utcnow()
        return sorted(
            (_view(user, now) for user in self._users.values()),
            key=lambda view: view.username.casefold(),
        )

    def user(self, user_id: str) -> UserView:
        user = self._users.get(user_id)
        if user is None:
            raise UnknownUser(user_id)
        return _view(user, self.clock.utcnow())

    def user_by_name(self, username: str) -> UserView:
        user_id = self._names.get(username.casefold())
        if user_id is None:
            raise UnknownUser(username, "name")
        return self.user(user_id)

    async def create_user(
        self,
        username: str,
        email: str,
        role: str,
        password: str | None,
        ctx: Context,
    ) -> tuple[UserView, str | None]:
        """Create a user; without ``password`` a one-time one is returned.

        A user created without a password must change the one returned at
        first login before anything else is allowed.
        """
        check_username(username)
        check_email(email)
        check_role(role)

        initial = None
        if password is None:
            initial = password = generate_password()
        check_policy(password, username)

        if username.casefold() in self._names:
            raise UserConflict(f"username {username!r} is taken")

        password_hash = await self.passwords.hash(password)

        async with self._lock:
            if username.casefold() in self._names:
                raise UserConflict(f"username {username!r} is taken")

            now = self.clock.utcnow()
            user = UserRecord(
                user_id=new_uid(),
                username=username,
                email=email,
                role=role,
                password_hash=password_hash,
                active=True,
                must_change_password=initial is not None,
                failed_logins=0,
                locked_until=None,
                created_at=now,
                updated_at=now,
            )
            record = self._audit(
                audit.USER_CREATED,
                user=ctx.user,
                source=ctx.source_address,
                protocol=ctx.protocol,
                new_value=role,
                details={"user_id": user.user_id, "username": username, "role": role},
            )
            await self.storage.write([user, record])
            self._put_user(user)

        logger.info("user %r (%s) created by %s", username, role, ctx.user)
        return _view(user, now), initial

    async def update_user(
        self,
        user_id: str,
        ctx: Context,
        *,
        email: str | None = None,
        role: str | None = None,
        active: bool | None = None,
        password: str | None = None,
        must_change_password: bool | None = None,
        unlock: bool = False,
    ) -> UserView:
        """Change some fields of a user (the others stay as they are).

        Deactivating revokes every token of the user at once. Setting a
        password revokes the user's tokens and, unless told otherwise,
        requires the user to change it at the next login. No change may
        leave the adapter without an active administrator.
        """
        if email is not None:
            check_email(email)
        if role is not None:
            check_role(role)

        user = self._users.get(user_id)
        if user is None:
            raise UnknownUser(user_id)

        if password is not None:
            check_policy(password, user.username)
        password_hash = await self.passwords.hash(password) if password else None

        async with self._lock:
            current = self._users.get(user_id)
            if current is None:
                raise UnknownUser(user_id)

            now = self.clock.utcnow()
            changes: dict[str, Any] = {}
            if email is not None and email != current.email:
                changes["email"] = email
            if role is not None and role != current.role:
                changes["role"] = role
            if active is not None and active != current.active:
                changes["active"] = active
            if password_hash is not None:
                changes["password_hash"] = password_hash
                changes["must_change_password"] = (
                    must_change_password if must_change_password is not None else True
                )
            elif (
                must_change_password is not None
                and must_change_password != current.must_change_password
            ):
                changes["must_change_password"] = must_change_password
            if (unlock or password_hash is not None) and (
                current.locked_until is not None or current.failed_logins
            ):
                changes.update(locked_until=None, failed_logins=0)

            if not changes:
                return _view(current, now)

            updated = dataclasses.replace(current, updated_at=now, **changes)
            self._refuse_losing_last_admin(current, updated)

            revoke = not updated.active or password_hash is not None
            states = [s for s in self.tokens if s.user_id == user_id] if revoke else []
            records: list[Record] = [updated]
            records += [_token_record(state, True) for state in states]
            records += self._user_change_records(current, updated, changes, ctx)
            await self.storage.write(records)

            self._put_user(updated)
            if revoke:
                self.tokens.revoke_user(user_id)

        if "role" in changes or "active" in changes:
            await self._access_changed()

        logger.info(
            "user %r changed by %s: %s",
            updated.username,
            ctx.user,
            ", ".join(sorted(k for k in changes if k != "password_hash")) or "password",
        )
        return _view(updated, now)

    def _user_change_records(
        self,
        old: UserRecord,
        new: UserRecord,
        changes: dict[str, Any],
        ctx: Context,
    ) -> list[Record]:
        base = {"user_id": new.user_id, "username": new.username}
        records: list[Record] = []

        if "active" in changes and not new.active:
            records.append(
                self._audit(
                    audit.USER_DEACTIVATED,
                    user=ctx.user,
                    source=ctx.source_address,
                    protocol=ctx.protocol,
                    details=base,
                )
            )

        if "password_hash" in changes:
            records.append(
                self._audit(
                    audit.PASSWORD_CHANGED,
                    user=ctx.user,
                    source=ctx.source_address,
                    protocol=ctx.protocol,
                    details={**base, "by": "administrator"},
                )
            )

        shown = {
            key: [getattr(old, key), value]
            for key, value in changes.items()
            if key in ("email", "role", "must_change_password", "locked_until")
            or (key == "active" and new.active)
        }
        if "locked_until" in shown:
            shown["locked_until"] = [_iso(old.locked_until), None]
        if shown:
            records.append(
                self._audit(
                    audit.USER_UPDATED,
                    user=ctx.user,
                    source=ctx.source_address,
                    protocol=ctx.protocol,
                    old_value=old.role if "role" in changes else None,
                    new_value=new.role if "role" in changes else None,
                    details={**base, "changes": shown},
                )
            )
        return records

    async def deactivate_user(self, user_id: str, ctx: Context) -> UserView:
        """Deactivate a user and revoke all of their tokens at once."""
        return await self.update_user(user_id, ctx, active=False)

    async def reset_password(
        self, user_id: str, ctx: Context, password: str | None = None
    ) -> str | None:
        """Set a new password, to be changed at the next login.

        Without ``password`` a one-time password is generated and
        returned; it also clears a lockout.
        """
        generated = None
        if password is None:
            generated = password = generate_password()

        await self.update_user(
            user_id, ctx, password=password, must_change_password=True, unlock=True
        )
        return generated

    def _refuse_losing_last_admin(self, old: UserRecord, new: UserRecord) -> None:
        was_admin = old.active and MANAGE_USERS in self.permissions_of(old.role)
        still_admin = new.active and MANAGE_USERS in self.permissions_of(new.role)
        if not was_admin or still_admin:
            return

        others = [
            u
            for u in self._users.values()
            if u.user_id != old.user_id
            and u.active
            and MANAGE_USERS in self._grants.get(u.role, frozenset())
        ]
        if not others:
            raise UserConflict(
                f"user {old.username!r} is the last active user who can manage "
                "users; it cannot be deactivated or lose that permission"
            )

    def _active_admins(self) -> list[UserRecord]:
        return [u for u in self._users.values() if u.active and u.role == ADMIN]

    # -- roles ---------------------------------------------------------------

    def roles(self) -> dict[str, tuple[str, ...]]:
        """Each role and the permissions it grants."""
        return dict(self._roles)

    async def set_role_permissions(
        self, role: str, permissions: Iterable[str], ctx: Context
    ) -> tuple[str, ...]:
        """Replace the permissions of ``role``; they take effect at once.

        Raises :class:`UnknownRole`, :class:`RoleError` (unknown
        permission, or taking user or role management from ``admin``).
        """
        perms = normalise_permissions(role, permissions)

        async with self._lock:
            old = self._roles[role]
            if perms == old:
                return perms

            if MANAGE_USERS in old and MANAGE_USERS not in perms:
                self._refuse_role_losing_last_admin(role)

            record = self._audit(
                audit.ROLE_CHANGED,
                user=ctx.user,
                source=ctx.source_address,
                protocol=ctx.protocol,
                old_value=",".join(old),
                new_value=",".join(perms),
                details={
                    "role": role,
                    "permissions": list(perms),
                    "previous": list(old),
                },
            )
            await self.storage.write([RoleRecord(role, perms), record])
            self._set_grants(role, perms)

        await self._access_changed()

        logger.info("role %r changed by %s: %s", role, ctx.user, ", ".join(perms))
        return perms

    def _refuse_role_losing_last_admin(self, role: str) -> None:
        others = [
            u
            for u in self._users.values()
            if u.active
            and u.role != role
            and MANAGE_USERS in self._grants.get(u.role, frozenset())
        ]
        if not others:
            raise UserConflict(
                f"role {role!r}: no other active user could manage users"
            )

    def permissions_of(self, role: str) -> frozenset[str]:
        return self._grants.get(role, frozenset())

    # -- internals -----------------------------------------------------------

    def _set_grants(self, role: str, perms: tuple[str, ...]) -> None:
        self._roles[role] = perms
        self._grants[role] = frozenset(perms)

    def _put_user(self, user: UserRecord) -> None:
        self._users[user.user_id] = user
        self._names[user.username.casefold()] = user.user_id

    def _principal(self, user: UserRecord, token_hash: str | None) -> Principal:
        return Principal(
            user_id=user.user_id,
            username=user.username,
            role=user.role,
            permissions=self._grants.get(user.role, frozenset()),
            must_change_password=user.must_change_password,
            token_hash=token_hash,
        )

    def _audit(
        self,
        event_type: str,
        *,
        user: str | None,
        source: str | None,
        protocol: str | None,
        outcome: str | None = None,
        old_value: str | None = None,
        new_value: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> AuditRecord:
        return AuditRecord(
            event_type=event_type,
            severity=audit.severity_of(event_type),
            timestamp=self.clock.utcnow(),
            user=user,
            source_address=source,
            protocol=protocol,
            old_value=old_value,
            new_value=new_value,
            outcome=outcome,
            details=details or {},
        )

    async def _write_regardless(self, records: Sequence[Record]) -> None:
        try:
            await self.storage.write(records)
        except StorageError as exc:
            logger.error(
                "security: could not record %s: %s",
                ", ".join(sorted({type(r).__name__ for r in records})),
                exc,
            )


def _token_record(state: TokenState, revoked: bool) -> TokenRecord:
    return TokenRecord(
        token_hash=state.token_hash,
        user_id=state.user_id,
        created_at=state.created_at,
        expires_at=state.expires_at,
        revoked=revoked,
    )


__all__ = [
    "AuthError",
    "Clock",
    "Context",
    "InvalidUser",
    "LoginResult",
    "Principal",
    "Security",
    "SecurityError",
    "SystemClock",
    "Throttled",
    "UnknownRole",
    "UnknownUser",
    "UserConflict",
    "UserView",
    "WrongPassword",
    "hash_token",
]
