"""Password hashing (argon2id) and the password policy.

Hashes use argon2id with the parameters of RFC 9106's second
recommendation (3 passes, 64 MiB, 4 lanes) unless told otherwise. A hash
made with other parameters still verifies and is reported by
:meth:`Passwords.needs_rehash`, so it is replaced at the next successful
login. Hashing costs about a tenth of a second of CPU and 64 MiB of
memory, so it runs in worker threads, a few at a time, never on the event
loop; a burst of logins beyond what may wait is refused rather than
queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import string

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

logger = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256
GENERATED_PASSWORD_LENGTH = 24
_ALPHABET = string.ascii_letters + string.digits


class PasswordPolicyError(ValueError):
    """A new password does not satisfy the policy; the message says why."""


class HashingBusy(Exception):
    """Too many password checks are already waiting for a worker."""


def check_policy(password: str, username: str) -> None:
    """Raise :class:`PasswordPolicyError` unless ``password`` may be used.

    At least 12 and at most 256 characters, not all white space, and not
    containing the username (compared without regard to case).
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordPolicyError(
            f"password too short: expected at least {MIN_PASSWORD_LENGTH} "
            f"characters, got {len(password)}"
        )

    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordPolicyError(
            f"password too long: expected at most {MAX_PASSWORD_LENGTH} "
            f"characters, got {len(password)}"
        )

    if not password.strip():
        raise PasswordPolicyError("password must not be only white space")

    if username and username.casefold() in password.casefold():
        raise PasswordPolicyError("password must not contain the username")


def generate_password() -> str:
    """A random password of 24 letters and digits (about 142 bits)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(GENERATED_PASSWORD_LENGTH))


class Passwords:
    """argon2id hashing with bounded concurrency, off the event loop.

    ``time_cost`` (passes), ``memory_cost`` (KiB) and ``parallelism``
    (lanes) are argon2's parameters. ``workers`` hashes run at once;
    at most ``max_waiting`` more wait for a worker before
    :class:`HashingBusy` is raised.
    """

    def __init__(
        self,
        *,
        time_cost: int = 3,
        memory_cost: int = 65536,
        parallelism: int = 4,
        workers: int | None = None,
        max_waiting: int = 64,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._max_waiting = max_waiting
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0

    @property
    def parameters(self) -> tuple[int, int, int]:
        """(time_cost, memory_cost in KiB, parallelism)."""
        hasher = self._hasher
        return (hasher.time_cost, hasher.memory_cost, hasher.parallelism)

    def hash_now(self, password: str) -> str:
        """Hash ``password`` in this thread (blocking: not on the loop)."""
        return self._hasher.hash(password)

    def verify_now(self, stored: str, password: str) -> bool:
        """Check ``password`` against ``stored`` in this thread."""
        try:
            return self._hasher.verify(stored, password)
        except VerificationError:
            return False
        except InvalidHashError:
            logger.error("stored password hash is not a valid argon2 hash")
            return False

    def needs_rehash(self, stored: str) -> bool:
        """Whether ``stored`` was made with other parameters than these."""
        try:
            return self._hasher.check_needs_rehash(stored)
        except (InvalidHashError, ValueError):
            return True

    async def hash(self, password: str) -> str:
        """Hash ``password`` in a worker thread."""
        async with self._slot():
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str, password: str) -> bool:
        """Check ``password`` against ``stored`` in a worker thread."""
        async with self._slot():
            return await asyncio.to_thread(self.verify_now, stored, password)

    def _slot(self) -> _Slot:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)

        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise HashingBusy(
                f"too many password checks in progress: {self._waiting} waiting"
            )
        return _Slot(self)


class _Slot:
    """Holds one of the hashing workers for the time of one hash."""

    def __init__(self, owner: Passwords) -> None:
        self._owner = owner

    async def __aenter__(self) -> None:
        owner = self._owner
        assert owner._slots is not None

        owner._waiting += 1
        try:
            await owner._slots.acquire()
        finally:
            owner._waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        assert self._owner._slots is not None
        self._owner._slots.release()
