"""The channels an alert goes out on: e-mail, SMS (Twilio) and a webhook.

Each channel sends one alert to some of its recipients in one attempt
and answers which recipients failed and why (an empty mapping: all
delivered), or raises :class:`DeliveryError` when the attempt failed as a
whole. Retrying, timing out and recording are the service's business.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
import time
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import aiosmtplib
import httpx

from calejo_server.alerts.model import Alert
from calejo_server.alerts.settings import EmailSettings, SmsSettings, WebhookSettings
from calejo_server.alerts.signing import (
    ALERT_ID_HEADER,
    ATTEMPT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature_header,
)

__all__ = [
    "Channel",
    "DeliveryError",
    "EmailChannel",
    "SmsChannel",
    "WebhookChannel",
    "http_client",
    "tls_context",
]

TWILIO_MESSAGES = "/2010-04-01/Accounts/{sid}/Messages.json"
USER_AGENT = "calejo-control-adapter"


class DeliveryError(Exception):
    """An attempt that reached none of the channel's recipients."""


class Channel(Protocol):
    """One way of passing an alert on."""

    name: str

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every recipient an alert goes to on this channel."""
        ...

    async def send(
        self, alert: Alert, recipients: Sequence[str], attempt: int
    ) -> Mapping[str, str]:
        """Send ``alert`` to ``recipients``; the failed ones with the reason."""
        ...


def tls_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """A verifying TLS context trusting ``ca_file``; None: the system's trust."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DeliveryError(f"cannot read the CA file {ca_file}: {reason}") from exc


class EmailChannel:
    """Alerts as plain-text e-mail through the configured SMTP server.

    STARTTLS is required when ``starttls`` is on (a server that does not
    offer it fails the attempt rather than receiving the alert in clear),
    and the login (AUTH) is made when a user name is configured.
    """

    name = "email"

    def __init__(self, settings: EmailSettings, timeout: float, adapter: str) -> None:
        self.settings = settings
        self.timeout = timeout
        self.adapter = adapter
        self._tls = tls_context(settings.ca_file)

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.settings.to_addresses

    def where(self) -> str:
        return f"{self.settings.smtp_server}:{self.settings.smtp_port}"

    def message(self, alert: Alert, recipients: Sequence[str]) -> EmailMessage:
        settings = self.settings
        domain = settings.from_address.rpartition("@")[2] or None
        message = EmailMessage()
        message["From"] = settings.from_address
        message["To"] = ", ".join(recipients)
        message["Subject"] = alert.subject()
        message["Date"] = email.utils.formatdate(localtime=False)
        message["Message-ID"] = email.utils.make_msgid("calejo", domain=domain)
        message["X-Calejo-Alert-Id"] = alert.alert_id
        message["X-Calejo-Severity"] = alert.severity
        message.set_content(alert.text(self.adapter))
        return message

    async def send(
        self, alert: Alert, recipients: Sequence[str], attempt: int
    ) -> Mapping[str, str]:
        settings = self.settings
        where = self.where()
        try:
            refused, _ = await aiosmtplib.send(
                self.message(alert, recipients),
                sender=settings.from_address,
                recipients=list(recipients),
                hostname=settings.smtp_server,
                port=settings.smtp_port,
                username=settings.username,
                password=settings.password,
                use_tls=settings.use_tls,
                start_tls=settings.starttls and not settings.use_tls,
                tls_context=self._tls,
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"smtp server {where} refused the login of {settings.username!r}: "
                f"{exc.code} {exc.message}"
            ) from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return {
                item.recipient: f"refused by {where}: {item.code} {item.message}"
                for item in exc.recipients
            }
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"smtp server {where} answered {exc.code} {exc.message}"
            ) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise DeliveryError(f"smtp server {where}: {exc}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryError(
                f"cannot reach smtp server {where}: {_reason(exc)}"
            ) from exc

        return {
            address: f"refused by {where}: {answer.code} {answer.message}"
            for address, answer in refused.items()
        }


class SmsChannel:
    """Alerts as text messages through Twilio's REST API.

    One ``POST {api_url}/2010-04-01/Accounts/{sid}/Messages.json`` per
    number, form fields ``To``, ``From`` and ``Body``, HTTP basic
    authentication with the account SID and auth token.
    """

    name = "sms"

    def __init__(self, settings: SmsSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client
        path = TWILIO_MESSAGES.format(sid=settings.account_sid)
        self.url = settings.api_url.rstrip("/") + path

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.settings.to_numbers

    async def send(
        self, alert: Alert, recipients: Sequence[str], attempt: int
    ) -> Mapping[str, str]:
        body = alert.short_text()
        answers = await asyncio.gather(
            *(self._send_one(number, body) for number in recipients)
        )
        return {
            number: problem
            for number, problem in zip(recipients, answers, strict=True)
            if problem is not None
        }

    async def _send_one(self, number: str, body: str) -> str | None:
        settings = self.settings
        host = _safe_url(settings.api_url)
        try:
            response = await self.client.post(
                self.url,
                data={"To": number, "From": settings.from_number, "Body": body},
                auth=(settings.account_sid, settings.auth_token),
            )
        except httpx.HTTPError as exc:
            return f"cannot reach {host}: {_reason(exc)}"

        if 200 <= response.status_code < 300:
            return None
        return (
            f"{host} answered HTTP {response.status_code}{_provider_message(response)}"
        )


class WebhookChannel:
    """Alerts as a signed JSON POST (see :mod:`calejo_server.alerts.signing`).

    Any 2xx answer counts as delivered; anything else, or no answer, is a
    failed attempt. Redirects are not followed.
    """

    name = "webhook"

    def __init__(
        self, settings: WebhookSettings, client: httpx.AsyncClient, adapter: str
    ) -> None:
        self.settings = settings
        self.client = client
        self.adapter = adapter

    @property
    def recipients(self) -> tuple[str, ...]:
        return (_safe_url(self.settings.url),)

    def body(self, alert: Alert) -> bytes:
        payload = {**alert.to_dict(), "adapter": self.adapter}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return text.encode("utf-8")

    async def send(
        self, alert: Alert, recipients: Sequence[str], attempt: int
    ) -> Mapping[str, str]:
        settings = self.settings
        body = self.body(alert)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature_header(settings.secret, timestamp, body),
            ALERT_ID_HEADER: alert.alert_id,
            ATTEMPT_HEADER: str(attempt),
        }
        where = _safe_url(settings.url)
        try:
            response = await self.client.post(
                settings.url, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise DeliveryError(f"cannot reach {where}: {_reason(exc)}") from exc

        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"{where} answered HTTP {response.status_code}")
        return {}


def http_client(
    timeout: float, ca_file: Path | None = None, *, trust_env: bool = True
) -> httpx.AsyncClient:
    """An HTTP client for a channel: bounded, verifying, no redirects."""
    context = tls_context(ca_file)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        verify=context if context is not None else True,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        trust_env=trust_env,
    )


def _safe_url(url: str) -> str:
    """``url`` without credentials, query or fragment (they may hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        return strerror.lower()
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if not text and cause is not None:
        return _reason(cause)
    return text or type(exc).__name__


def _provider_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    message = data.get("message")
    code = data.get("code")
    if not isinstance(message, str):
        return ""
    label = f" (code {code})" if isinstance(code, int) else ""
    return f": {message[:200]}{label}"
