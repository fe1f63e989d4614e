"""Stand-ins for the world alerts go out to, on loopback, over real sockets.

- :class:`SmtpServer`: an aiosmtpd server (its own thread) that keeps the
  messages it receives; with a user and password it offers AUTH, with a
  TLS context STARTTLS (the certificate comes from calejo_server.certs).
- :class:`HttpStandIn`: a Starlette app under uvicorn (its own thread and
  event loop) that records every request and answers from a script of
  statuses, or holds the request open ("hang") until the test ends. It
  stands in for Twilio's API and for a webhook receiver.

Both listen on free ports of 127.0.0.1 and stop at the end of the test.
The fixtures ``smtp_server`` and ``http_stand_in`` start them, ``pki``
makes a CA and a server certificate for STARTTLS; a conftest that
imports them offers them to the tests of its folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.message
import email.policy
import gc
import socket
import ssl
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from calejo_server import certs

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
HANG = "hang"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll ``condition`` from a plain test until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# SMTP


@dataclasses.dataclass
class Mail:
    """One message as the SMTP server received it."""

    sender: str
    recipients: list[str]
    message: email.message.EmailMessage
    login: str | None
    tls: bool

    @property
    def subject(self) -> str:
        # A subject folded right after "Subject:" unfolds with a leading space.
        return str(self.message["Subject"]).strip()

    @property
    def body(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class _Handler:
    def __init__(self, mails: list[Mail]) -> None:
        self.mails = mails

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        login = session.auth_data if session.authenticated else None
        self.mails.append(
            Mail(
                sender=str(envelope.mail_from),
                recipients=list(envelope.rcpt_tos),
                message=message,
                login=login.decode() if isinstance(login, bytes) else None,
                tls=session.ssl is not None,
            )
        )
        return "250 OK"


class SmtpServer:
    """An SMTP server on a free loopback port; ``mails`` fills as they arrive."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
    ) -> None:
        self.mails: list[Mail] = []
        self.refused_logins = 0
        self.port = free_port()
        self.username = username
        self.password = password
        options: dict[str, Any] = {}
        if username is not None:
            options.update(
                authenticator=self._authenticate,
                auth_require_tls=tls_context is not None,
            )
        if tls_context is not None:
            options.update(tls_context=tls_context, require_starttls=require_starttls)
        self.controller = Controller(
            _Handler(self.mails),
            hostname="127.0.0.1",
            port=self.port,
            ready_timeout=START_TIMEOUT,
            **options,
        )

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.username
            and auth_data.password.decode() == self.password
        )
        if not ok:
            self.refused_logins += 1
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=auth_data.login)

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
        # aiosmtpd leaves the transports of sessions still open when its loop
        # stopped to the garbage collector: collect them here, quietly, not
        # in whichever test happens to run next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., SmtpServer]]:
    """Start SMTP servers: ``smtp_server(username=, password=, tls_context=)``."""
    started: list[SmtpServer] = []

    def start(**options: Any) -> SmtpServer:
        server = SmtpServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclasses.dataclass(frozen=True)
class Pki:
    """A local CA and a server certificate for 127.0.0.1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    files = certs.ensure_certificates(
        folder, "urn:localhost:calejo:test-smtp", ["localhost", "127.0.0.1"]
    )
    return Pki(files.ca_cert, files.server_cert, files.server_key)


# ---------------------------------------------------------------------------
# HTTP


@dataclasses.dataclass
class Seen:
    """One request as the stand-in received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    form: dict[str, str]
    status: int | str


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpStandIn:
    """An HTTP server that records requests and answers from a script.

    ``script`` lists the answer to each request in turn (a status, or
    :data:`HANG` to hold the request open until the stand-in stops);
    after it runs out every request gets ``default``. ``answer_body`` is
    the JSON of every non-hanging answer.
    """

    def __init__(
        self,
        script: list[int | str] | None = None,
        default: int = 200,
        answer_body: dict[str, Any] | None = None,
    ) -> None:
        self.script = list(script or [])
        self.default = default
        self.answer_body = answer_body or {}
        self.requests: list[Seen] = []
        self.hanging = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._release: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])]
        )
        self._server = _Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                loop="none",
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=1,
            )
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._failures: list[BaseException] = []

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._failures.append(exc)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        await self._server.serve()

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        form: dict[str, str] = {}
        if request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            form = dict(urllib.parse.parse_qsl(body.decode(), strict_parsing=True))
        with self._lock:
            status = self.script.pop(0) if self.script else self.default
            self.requests.append(
                Seen(
                    request.method,
                    request.url.path,
                    dict(request.headers),
                    body,
                    form,
                    status,
                )
            )
        if status == HANG:
            assert self._release is not None
            with self._lock:
                self.hanging += 1
            await self._release.wait()
            return Response(status_code=503)
        assert isinstance(status, int)
        return JSONResponse(self.answer_body, status_code=status)

    def start(self) -> HttpStandIn:
        self._thread.start()
        wait_for(
            lambda: self._server.started or not self._thread.is_alive(),
            START_TIMEOUT,
            "the HTTP stand-in starts",
        )
        assert self._server.started, self._failures
        return self

    def stop(self) -> None:
        if self._loop is not None and self._release is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._release.set)
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT)
        assert not self._thread.is_alive(), "the HTTP stand-in did not stop"


@pytest.fixture
def http_stand_in() -> Iterator[Callable[..., HttpStandIn]]:
    """Start HTTP stand-ins (see :class:`HttpStandIn`); all stop at the end."""
    started: list[HttpStandIn] = []

    def start(**options: Any) -> HttpStandIn:
        server = HttpStandIn(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------------------
# Settings pointing at the stand-ins.

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-for-tests"
WEBHOOK_SECRET = "a-webhook-secret-of-some-length"


def email_section(smtp: SmtpServer, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "smtp_server": "127.0.0.1",
        "smtp_port": smtp.port,
        "from_address": "calejo@plant.example",
        "to_addresses": ["duty@plant.example", "chief@plant.example"],
        "starttls": False,
    }
    if smtp.username is not None:
        section.update(username=smtp.username, password=smtp.password)
    section.update(extra)
    return section


def sms_section(twilio: HttpStandIn, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "provider": "twilio",
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": "+15550100",
        "to_numbers": ["+15550101", "+15550102"],
        "api_url": twilio.url,
    }
    section.update(extra)
    return section


def webhook_section(hook: HttpStandIn, **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "url": f"{hook.url}/hooks/calejo?token=kept-out-of-logs",
        "secret": WEBHOOK_SECRET,
    }
    section.update(extra)
    return section
