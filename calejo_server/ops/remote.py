"""Talking to a running adapter over its REST API, for the operations commands.

:class:`Remote` keeps one HTTP(S) connection open to the adapter (a fresh
one after an error) and times each request from the first byte sent to
the last byte of the answer read. Over HTTPS the adapter's certificate is
checked as ``calejo health-check`` checks it: ``--cafile``, else the local
CA of the configuration's certificate folder, else the system's
authorities; ``--insecure`` checks nothing.

Commands that log in take ``--user``; the password comes from
``CALEJO_PASSWORD``, else from a prompt on a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import http.client
import json
import os
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from calejo_server.config import Config, load_config
from calejo_server.ops import health
from calejo_server.tls import TlsError

PASSWORD_VARIABLE: Final = "CALEJO_PASSWORD"
API_PREFIX: Final = "/api/v1"


class RemoteError(Exception):
    """The adapter did not answer; the message says where and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """One answer of the adapter: status, headers (lower-case names), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFacts:
    """What the TLS handshake showed: protocol, cipher, the peer certificate."""

    version: str | None
    cipher: str | None
    certificate: bytes | None
    verified: bool


class Remote:
    """One keep-alive connection to the REST API at ``base_url``.

    Not shared between threads: give each worker its own.
    """

    def __init__(
        self,
        base_url: str,
        trust: health.Trust | None = None,
        timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(
                f"expected the adapter's URL as http(s)://HOST:PORT, got {base_url!r}"
            )

        self.base_url = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        prefix = parts.path.rstrip("/")
        self.prefix = prefix if prefix.endswith(API_PREFIX) else prefix + API_PREFIX
        self.trust = trust
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    @property
    def api(self) -> str:
        """The API's base URL (``.../api/v1``)."""
        return f"{self.scheme}://{self._netloc()}{self.prefix}"

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is not None:
            return self._conn

        if self.scheme == "https":
            context = (
                self.trust.context
                if self.trust is not None
                else ssl.create_default_context()
            )
            self._conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=context
            )
        else:
            self._conn = http.client.HTTPConnection(
                self.host, self.port, timeout=self.timeout
            )
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """``method`` on ``path`` (under ``/api/v1`` unless it starts with it).

        Raises :class:`RemoteError` when no answer arrives.
        """
        target = path if path.startswith(self.prefix) else self.prefix + path
        sent = {"Accept": "application/json", **(headers or {})}
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"

        for attempt in (1, 2):
            conn = self._connection()
            started = time.perf_counter()
            try:
                conn.request(method, target, body=payload, headers=sent)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # A kept-alive connection the server closed: one fresh try.
                stale = isinstance(
                    exc, http.client.RemoteDisconnected | ConnectionResetError
                )
                if attempt == 1 and stale:
                    continue
                raise RemoteError(
                    f"{method} {self.scheme}://{self._netloc()}{target}: {_reason(exc)}"
                ) from exc
            seconds = time.perf_counter() - started
            names = {key.lower(): value for key, value in response.getheaders()}
            if response.will_close:
                self.close()
            return Answer(response.status, names, data, seconds)
        raise AssertionError("unreachable")

    def get(self, path: str, *, token: str | None = None) -> Answer:
        return self.request("GET", path, token=token)

    def get_json(self, path: str, *, token: str | None = None) -> tuple[int, Any]:
        answer = self.get(path, token=token)
        return answer.status, answer.json()

    def login(self, username: str, password: str) -> str:
        """A bearer token for ``username``; :class:`RemoteError` when refused."""
        answer = self.request(
            "POST",
            "/auth/login",
            body={"username": username, "password": password},
        )
        data = answer.json()
        token = data.get("access_token") if isinstance(data, dict) else None
        if answer.status != 200 or not isinstance(token, str):
            detail = data.get("detail") if isinstance(data, dict) else None
            raise RemoteError(
                f"login of {username!r} at {self.api} refused: {answer.status} "
                f"{detail or answer.body[:200].decode(errors='replace')}"
            )
        return token

    def tls_facts(self) -> TlsFacts | None:
        """Protocol, cipher and certificate of the open HTTPS connection."""
        conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return None
        cipher = sock.cipher()
        verified = sock.context.verify_mode != ssl.CERT_NONE
        return TlsFacts(
            version=sock.version(),
            cipher=cipher[0] if cipher else None,
            certificate=sock.getpeercert(binary_form=True),
            verified=verified,
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# Arguments shared by the commands that talk to an adapter.


def add_arguments(parser: argparse.ArgumentParser, *, timeout: float = 5.0) -> None:
    """``--url``, ``--timeout``, ``--cafile`` and ``--insecure``."""
    parser.add_argument(
        "--url",
        help="the adapter's base URL (default: http(s)://127.0.0.1:<http_port> "
        "from the configuration)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"seconds to wait for each answer (default {timeout:g})",
    )
    parser.add_argument(
        "--cafile",
        type=Path,
        help="PEM file of the authorities to trust over https (default: the "
        "local CA, ca.crt in the certificate folder, if it exists)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="over https, check neither the certificate nor the host name",
    )


def add_login_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--user``: log in as this user, for ``what``."""
    parser.add_argument(
        "--user",
        help=f"log in as this user for {what}; the password comes from "
        f"${PASSWORD_VARIABLE}, else it is asked for on a terminal",
    )


def connect(args: argparse.Namespace, config: Config | None = None) -> Remote:
    """A :class:`Remote` for the adapter that ``args`` name.

    Without ``--url`` the address comes from the configuration.
    Raises ``CommandError`` for a bad URL or CA file.
    """
    from calejo_server.cli import EXIT_USAGE, CommandError

    timeout = float(args.timeout)
    if not 0 < timeout <= 3600:
        raise CommandError(
            f"--timeout: expected 0 to 3600 seconds, got {args.timeout}", EXIT_USAGE
        )

    base = args.url
    if base is None:
        config = config or load_config(getattr(args, "config", None))
        base = health.default_url(config)

    trust: health.Trust | None = None
    if str(base).lower().startswith("https:"):
        try:
            trust = health._trust(args, config)
        except TlsError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from exc

    try:
        return Remote(base, trust, timeout)
    except RemoteError as exc:
        raise CommandError(f"--url: {exc}", EXIT_USAGE) from exc


def password_for(user: str) -> str:
    """The password of ``user``: ``CALEJO_PASSWORD``, else asked for."""
    from calejo_server.cli import EXIT_USAGE, CommandError

    from_env = os.environ.get(PASSWORD_VARIABLE)
    if from_env:
        return from_env
    if sys.stdin.isatty():
        return getpass.getpass(f"password of {user!r}: ")
    raise CommandError(
        f"--user {user}: expected the password in ${PASSWORD_VARIABLE}, got "
        "nothing (and no terminal to ask on)",
        EXIT_USAGE,
    )


def login(remote: Remote, user: str | None) -> str | None:
    """A token for ``user`` (None without one); ``CommandError`` when refused."""
    from calejo_server.cli import CommandError

    if user is None:
        return None
    try:
        return remote.login(user, password_for(user))
    except RemoteError as exc:
        raise CommandError(str(exc)) from exc
