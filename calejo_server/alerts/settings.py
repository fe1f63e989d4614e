"""The ``alerts:`` section of the configuration, checked.

Every key is optional; a channel's other keys are required only when it
is ``enabled``::

    alerts:
      email:
        enabled: true
        smtp_server: smtp.example.org
        smtp_port: 587               # default 587 (465 with use_tls)
        from_address: calejo@example.org
        to_addresses: [duty@example.org]
        username: calejo             # with password: log in (AUTH)
        password: ${SMTP_PASSWORD}
        starttls: true               # upgrade the connection (STARTTLS)
        use_tls: false               # TLS from the first byte (port 465)
        ca_file: /etc/calejo/smtp-ca.pem   # trust for the server; default: system
      sms:
        enabled: true
        provider: twilio
        account_sid: AC0123...       # AC and 32 hex digits
        auth_token: ${TWILIO_AUTH_TOKEN}
        from_number: "+15550100"     # E.164
        to_numbers: ["+15550101"]
        api_url: https://api.twilio.com
      webhook:
        enabled: true
        url: https://hooks.example.org/calejo
        secret: ${CALEJO_WEBHOOK_SECRET}   # at least 16 characters
        ca_file: /etc/calejo/hooks-ca.pem  # default: system trust
      routing:                       # severity -> channels
        CRITICAL: [sms, email, webhook]
        HIGH: [email, webhook]
        MEDIUM: [email]
        LOW: []                      # recorded only (dashboard and log)
      suppress_window: 300           # seconds: a repeat within it is counted
      retry:
        attempts: 5                  # per channel and alert, first one included
        initial_backoff: 1           # seconds before the second attempt
        max_backoff: 60              # the wait doubles up to this
      timeout: 10                    # seconds one attempt may take
      queue_size: 1000               # alerts waiting per queue before overflow
      certificates:
        enabled: true
        check_interval: 86400        # seconds between checks
        warn_days: 30                # HIGH below this many days left
        critical_days: 7             # CRITICAL below this, or expired

A severity missing from ``routing`` keeps its default channels; a channel
routed but not enabled is skipped. Numbers and booleans may come from an
environment variable (``smtp_port: ${SMTP_PORT}``). Secrets (``password``,
``auth_token``, ``secret``) are never shown in error messages.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from calejo_server.config import Config, ConfigError, value_error
from calejo_server.storage.base import SEVERITIES, Severity

__all__ = [
    "CHANNELS",
    "DEFAULT_ROUTING",
    "AlertSettings",
    "CertificateSettings",
    "EmailSettings",
    "RetrySettings",
    "SmsSettings",
    "WebhookSettings",
    "parse_alerts_config",
]

CHANNELS: Final = ("sms", "email", "webhook")
"""Every channel an alert can go out on."""

DEFAULT_ROUTING: Final[Mapping[Severity, tuple[str, ...]]] = {
    "CRITICAL": ("sms", "email", "webhook"),
    "HIGH": ("email", "webhook"),
    "MEDIUM": ("email",),
    "LOW": (),
}
"""The channels of each severity unless ``alerts.routing`` says otherwise."""

_EMAIL = re.compile(r"[^@\s<>,;]{1,64}@[^@\s<>,;]{1,189}")
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")
MIN_SECRET = 16


@dataclasses.dataclass(frozen=True, slots=True)
class EmailSettings:
    """E-mail through an SMTP server."""

    enabled: bool = False
    smtp_server: str = ""
    smtp_port: int = 587
    from_address: str = ""
    to_addresses: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    starttls: bool = True
    use_tls: bool = False
    ca_file: Path | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SmsSettings:
    """Text messages through Twilio's REST API."""

    enabled: bool = False
    provider: str = "twilio"
    account_sid: str = ""
    auth_token: str = dataclasses.field(default="", repr=False)
    from_number: str = ""
    to_numbers: tuple[str, ...] = ()
    api_url: str = "https://api.twilio.com"


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookSettings:
    """A JSON POST signed with HMAC-SHA256 (see :mod:`.signing`)."""

    enabled: bool = False
    url: str = ""
    secret: str = dataclasses.field(default="", repr=False)
    ca_file: Path | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RetrySettings:
    """How often and how patiently one delivery is tried (seconds)."""

    attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 60.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.initial_backoff * 2.0 ** (attempt - 1), self.max_backoff)


@dataclasses.dataclass(frozen=True, slots=True)
class CertificateSettings:
    """The periodic check of the certificates' expiry."""

    enabled: bool = True
    check_interval: float = 86400.0
    warn_days: float = 30.0
    critical_days: float = 7.0


@dataclasses.dataclass(frozen=True, slots=True)
class AlertSettings:
    """The whole ``alerts:`` section, with defaults filled in."""

    email: EmailSettings = EmailSettings()
    sms: SmsSettings = SmsSettings()
    webhook: WebhookSettings = WebhookSettings()
    routing: Mapping[Severity, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_ROUTING)
    )
    suppress_window: float = 300.0
    retry: RetrySettings = RetrySettings()
    timeout: float = 10.0
    queue_size: int = 1000
    certificates: CertificateSettings = CertificateSettings()

    def enabled_channels(self) -> tuple[str, ...]:
        """The channels switched on, in :data:`CHANNELS` order."""
        switches = {
            "sms": self.sms.enabled,
            "email": self.email.enabled,
            "webhook": self.webhook.enabled,
        }
        return tuple(name for name in CHANNELS if switches[name])


_KEYS: Final = frozenset(
    {
        "email",
        "sms",
        "webhook",
        "routing",
        "suppress_window",
        "retry",
        "timeout",
        "queue_size",
        "certificates",
    }
)


def parse_alerts_config(config: Config) -> AlertSettings:
    """Read and check the ``alerts:`` section of ``config``.

    Raises :class:`~calejo_server.config.ConfigError` naming the file, the
    key path, what was expected and what arrived.
    """
    where = str(config.source) if config.source else "<demonstration configuration>"
    return parse_alerts_section(config.raw.get("alerts"), where)


def parse_alerts_section(node: object, where: str) -> AlertSettings:
    """Check the ``alerts:`` mapping ``node`` (None: every default)."""
    root = _Section(where, "alerts", node, _KEYS)
    return AlertSettings(
        email=_email(root.child("email", _keys(EmailSettings))),
        sms=_sms(root.child("sms", _keys(SmsSettings))),
        webhook=_webhook(root.child("webhook", _keys(WebhookSettings))),
        routing=_routing(root),
        suppress_window=root.number("suppress_window", 300.0, 0.0, 7 * 86400.0),
        retry=_retry(root.child("retry", _keys(RetrySettings))),
        timeout=root.number("timeout", 10.0, 0.1, 300.0),
        queue_size=root.integer("queue_size", 1000, 1, 1_000_000),
        certificates=_certificates(
            root.child("certificates", _keys(CertificateSettings))
        ),
    )


def _keys(cls: type[Any]) -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(cls))


def _email(section: _Section) -> EmailSettings:
    enabled = section.boolean("enabled", False)
    use_tls = section.boolean("use_tls", False)
    starttls = section.boolean("starttls", not use_tls)
    if use_tls and starttls:
        raise section.fail(
            "starttls", "false when use_tls is true (TLS from the start)", True
        )

    username = section.text("username", None, 320)
    password = section.text("password", None, 1024, secret=True)
    if username is not None and password is None:
        raise section.fail("password", "a password to go with username", None)
    if password is not None and username is None:
        raise section.fail("username", "a user name to go with password", None)

    settings = EmailSettings(
        enabled=enabled,
        smtp_server=section.host("smtp_server", required=enabled),
        smtp_port=section.integer("smtp_port", 465 if use_tls else 587, 1, 65535),
        from_address=section.address("from_address", required=enabled),
        to_addresses=section.addresses("to_addresses", required=enabled),
        username=username,
        password=password,
        starttls=starttls,
        use_tls=use_tls,
        ca_file=section.path("ca_file"),
    )
    return settings


def _sms(section: _Section) -> SmsSettings:
    enabled = section.boolean("enabled", False)
    provider = section.text("provider", "twilio", 32)
    if provider != "twilio":
        raise section.fail("provider", "twilio", provider)

    sid = section.text("account_sid", None, 34)
    if sid is not None and not _ACCOUNT_SID.fullmatch(sid):
        raise section.fail("account_sid", "AC followed by 32 hex digits", sid)
    if enabled and sid is None:
        raise section.fail("account_sid", "AC followed by 32 hex digits", None)

    token = section.text("auth_token", None, 256, secret=True)
    if enabled and token is None:
        raise section.fail("auth_token", "the account's auth token", None)

    return SmsSettings(
        enabled=enabled,
        provider="twilio",
        account_sid=sid or "",
        auth_token=token or "",
        from_number=section.phone("from_number", required=enabled),
        to_numbers=section.phones("to_numbers", required=enabled),
        api_url=section.url("api_url", "https://api.twilio.com") or "",
    )


def _webhook(section: _Section) -> WebhookSettings:
    enabled = section.boolean("enabled", False)
    url = section.url("url", None)
    if enabled and not url:
        raise section.fail("url", "an http:// or https:// URL", None)

    secret = section.text("secret", None, 1024, secret=True)
    expected = f"a secret of at least {MIN_SECRET} characters"
    if secret is not None and len(secret) < MIN_SECRET:
        raise section.fail("secret", expected, secret, secret=True)
    if enabled and secret is None:
        raise section.fail("secret", expected, None)

    return WebhookSettings(
        enabled=enabled,
        url=url or "",
        secret=secret or "",
        ca_file=section.path("ca_file"),
    )


def _routing(root: _Section) -> dict[Severity, tuple[str, ...]]:
    routing: dict[Severity, tuple[str, ...]] = dict(DEFAULT_ROUTING)
    node = root.values.get("routing")
    if node is None:
        return routing
    if not isinstance(node, Mapping):
        raise root.fail("routing", "a mapping of severity to channels", node)

    expected = f"a list of channels from {', '.join(CHANNELS)} (may be empty)"
    for key, channels in node.items():
        severity = str(key).upper()
        if severity not in SEVERITIES:
            raise ConfigError(
                f"{root.where}: alerts.routing.{key}: unknown severity; expected "
                f"one of {', '.join(SEVERITIES)}",
                source=root.where,
                key_path=f"alerts.routing.{key}",
            )
        path = f"routing.{key}"
        if channels is None:
            channels = []
        if not isinstance(channels, list):
            raise root.fail(path, expected, channels)
        for index, channel in enumerate(channels):
            if channel not in CHANNELS:
                raise root.fail(f"{path}[{index}]", expected, channel)
        routing[severity] = tuple(dict.fromkeys(channels))
    return routing


def _retry(section: _Section) -> RetrySettings:
    initial = section.number("initial_backoff", 1.0, 0.0, 3600.0)
    maximum = section.number("max_backoff", max(60.0, initial), 0.0, 86400.0)
    if maximum < initial:
        raise section.fail(
            "max_backoff", f"at least initial_backoff ({initial:g} s)", maximum
        )
    return RetrySettings(
        attempts=section.integer("attempts", 5, 1, 100),
        initial_backoff=initial,
        max_backoff=maximum,
    )


def _certificates(section: _Section) -> CertificateSettings:
    warn = section.number("warn_days", 30.0, 0.0, 3650.0)
    critical = section.number("critical_days", 7.0, 0.0, 3650.0)
    if critical > warn:
        raise section.fail("critical_days", f"at most warn_days ({warn:g})", critical)
    return CertificateSettings(
        enabled=section.boolean("enabled", True),
        check_interval=section.number("check_interval", 86400.0, 60.0, 30 * 86400.0),
        warn_days=warn,
        critical_days=critical,
    )


class _Section:
    """Typed reads of one mapping of the ``alerts:`` section.

    A value that came whole from ``${VAR}`` reaches :attr:`Config.raw` as
    text, so numbers and booleans are also accepted in their text form.
    """

    def __init__(
        self, where: str, path: str, node: object, keys: frozenset[str]
    ) -> None:
        self.where = where
        self.prefix = path
        if node is None:
            node = {}
        if not isinstance(node, Mapping):
            raise value_error(where, path, "a mapping", node)
        for key in node:
            if key not in keys:
                raise ConfigError(
                    f"{where}: {path}.{key}: unknown key; expected one of "
                    f"{', '.join(sorted(keys))}",
                    source=where,
                    key_path=f"{path}.{key}",
                )
        self.values: Mapping[str, Any] = node

    def child(self, key: str, keys: frozenset[str]) -> _Section:
        return _Section(self.where, f"{self.prefix}.{key}", self.values.get(key), keys)

    def fail(
        self, key: str, expected: str, got: object, *, secret: bool = False
    ) -> ConfigError:
        return value_error(
            self.where, f"{self.prefix}.{key}", expected, got, secret=secret
        )

    def boolean(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = _number_from_text(self.values.get(key, default))
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        expected = f"an integer from {low} to {high}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, expected, value)
        if not low <= value <= high:
            raise self.fail(key, expected, value)
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = _number_from_text(self.values.get(key, default))
        expected = f"a number from {low:g} to {high:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, expected, value)
        number = float(value)
        if not math.isfinite(number) or not low <= number <= high:
            raise self.fail(key, expected, value)
        return number

    def text(
        self, key: str, default: str | None, limit: int, *, secret: bool = False
    ) -> str | None:
        value = self.values.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value or len(value) > limit:
            raise self.fail(
                key,
                f"a text of 1 to {limit} characters",
                value,
                secret=secret and isinstance(value, str),
            )
        return value

    def host(self, key: str, *, required: bool) -> str:
        value = self.text(key, None, 253)
        if value is None:
            if required:
                raise self.fail(key, "a host name or address", None)
            return ""
        if any(c.isspace() or c in "/@" for c in value):
            raise self.fail(key, "a host name or address", value)
        return value

    def address(self, key: str, *, required: bool) -> str:
        value = self.text(key, None, 254)
        if value is None:
            if required:
                raise self.fail(key, "an e-mail address", None)
            return ""
        if not _EMAIL.fullmatch(value):
            raise self.fail(key, "an e-mail address", value)
        return value

    def addresses(self, key: str, *, required: bool) -> tuple[str, ...]:
        return self._list(key, _EMAIL, "e-mail addresses", required)

    def phone(self, key: str, *, required: bool) -> str:
        value = self.text(key, None, 16)
        if value is None:
            if required:
                raise self.fail(key, "a phone number in E.164 form (+15550100)", None)
            return ""
        if not _PHONE.fullmatch(value):
            raise self.fail(key, "a phone number in E.164 form (+15550100)", value)
        return value

    def phones(self, key: str, *, required: bool) -> tuple[str, ...]:
        return self._list(key, _PHONE, "phone numbers in E.164 form", required)

    def _list(
        self, key: str, pattern: re.Pattern[str], what: str, required: bool
    ) -> tuple[str, ...]:
        value = self.values.get(key)
        expected = f"a non-empty list of {what}"
        if value is None:
            if required:
                raise self.fail(key, expected, None)
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, expected, value)
        for index, item in enumerate(value):
            if not isinstance(item, str) or not pattern.fullmatch(item):
                raise self.fail(f"{key}[{index}]", expected, item)
        return tuple(dict.fromkeys(value))

    def url(self, key: str, default: str | None) -> str | None:
        value = self.text(key, default, 2048)
        if value is None:
            return None
        parts = urlsplit(value)
        try:
            _ = parts.port
        except ValueError:
            raise self.fail(key, "an http:// or https:// URL", value) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(key, "an http:// or https:// URL", value)
        return value

    def path(self, key: str) -> Path | None:
        value = self.text(key, None, 4096)
        return Path(value) if value is not None else None


def _number_from_text(value: object) -> object:
    if not isinstance(value, str):
        return value
    text = value.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return value


def describe_routing(routing: Mapping[Severity, Sequence[str]]) -> str:
    """``CRITICAL: sms, email, webhook; HIGH: ...`` for the log."""
    return "; ".join(
        f"{severity}: {', '.join(routing.get(severity, ())) or 'recorded only'}"
        for severity in reversed(SEVERITIES)
    )
