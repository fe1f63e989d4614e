"""Opaque bearer tokens, kept only as their SHA-256.

A token is 32 random bytes, URL-safe base64 (43 characters, 256 bits).
The adapter keeps and stores only the SHA-256 of it, so neither memory
dumps of the token table nor the database give a usable token. Each
token expires when idle for ``idle_timeout`` seconds or, at the latest,
``absolute_timeout`` seconds after it was issued; both are measured on the
monotonic clock while the adapter runs. After a restart a token's idle
time starts again from the restart; its absolute expiry is kept.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator

MAX_TOKEN_LENGTH = 256
MAX_PENDING_EXPIRIES = 100_000


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which ``token`` is kept."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe base64."""
    return secrets.token_urlsafe(32)


@dataclasses.dataclass(slots=True)
class TokenState:
    """One live token: whose it is and when it stops being valid."""

    token_hash: str
    user_id: str
    created_at: dt.datetime
    expires_at: dt.datetime
    deadline: float
    """Absolute expiry on the monotonic clock (s)."""
    last_used: float
    """Last use on the monotonic clock (s)."""


class TokenTable:
    """The live tokens, by hash; lookups are one dict access."""

    def __init__(self, idle_timeout: float, absolute_timeout: float) -> None:
        self.idle_timeout = float(idle_timeout)
        self.absolute_timeout = float(absolute_timeout)
        self._tokens: dict[str, TokenState] = {}
        self._dropped: list[TokenState] = []

    def __len__(self) -> int:
        return len(self._tokens)

    def __iter__(self) -> Iterator[TokenState]:
        return iter(list(self._tokens.values()))

    def issue(
        self, user_id: str, now: float, utcnow: dt.datetime
    ) -> tuple[str, TokenState]:
        """A new token for ``user_id`` (not yet added: see :meth:`add`)."""
        token = new_token()
        expires_at = utcnow + dt.timedelta(seconds=self.absolute_timeout)
        state = TokenState(
            token_hash=hash_token(token),
            user_id=user_id,
            created_at=utcnow,
            expires_at=expires_at,
            deadline=now + self.absolute_timeout,
            last_used=now,
        )
        return token, state

    def restore(
        self,
        token_hash: str,
        user_id: str,
        created_at: dt.datetime,
        expires_at: dt.datetime,
        now: float,
        utcnow: dt.datetime,
    ) -> bool:
        """Take back a stored token; False if it has expired meanwhile."""
        remaining = (expires_at - utcnow).total_seconds()
        if remaining <= 0:
            return False

        self._tokens[token_hash] = TokenState(
            token_hash=token_hash,
            user_id=user_id,
            created_at=created_at,
            expires_at=expires_at,
            deadline=now + min(remaining, self.absolute_timeout),
            last_used=now,
        )
        return True

    def add(self, state: TokenState) -> None:
        self._tokens[state.token_hash] = state

    def lookup(self, token: str, now: float) -> TokenState | None:
        """The live token ``token``, marked as used now; None if not live.

        A token found expired is dropped from the table; :meth:`sweep`
        reports the ones that expire without being presented again.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None

        state = self._tokens.get(hash_token(token))
        if state is None:
            return None

        if now >= state.deadline or now - state.last_used > self.idle_timeout:
            del self._tokens[state.token_hash]
            if len(self._dropped) < MAX_PENDING_EXPIRIES:
                self._dropped.append(state)
            return None

        state.last_used = now
        return state

    def peek(self, token_hash: str) -> TokenState | None:
        return self._tokens.get(token_hash)

    def revoke(self, token_hash: str) -> TokenState | None:
        """Drop one token at once; the dropped state, or None."""
        return self._tokens.pop(token_hash, None)

    def revoke_user(self, user_id: str, keep: str | None = None) -> list[TokenState]:
        """Drop every token of ``user_id`` except ``keep`` (a hash)."""
        dropped = [
            state
            for state in self._tokens.values()
            if state.user_id == user_id and state.token_hash != keep
        ]
        for state in dropped:
            del self._tokens[state.token_hash]
        return dropped

    def sweep(self, now: float) -> list[TokenState]:
        """Drop and return the tokens that have expired by ``now``.

        The answer includes those :meth:`lookup` found expired since the
        last sweep, so that each expiry can be recorded once.
        """
        expired = [
            state
            for state in self._tokens.values()
            if now >= state.deadline or now - state.last_used > self.idle_timeout
        ]
        for state in expired:
            del self._tokens[state.token_hash]

        dropped, self._dropped = self._dropped, []
        return dropped + expired
