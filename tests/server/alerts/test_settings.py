"""The ``alerts:`` section: defaults, a full section, and exact errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from calejo_server.alerts.settings import (
    DEFAULT_ROUTING,
    AlertSettings,
    parse_alerts_config,
)
from calejo_server.config import ConfigError, load_config

SID = "AC" + "ab" * 16


def settings_of(
    tmp_path: Path, alerts: Any, environ: dict[str, str] | None = None
) -> AlertSettings:
    path = tmp_path / "calejo.yaml"
    text = alerts if isinstance(alerts, str) else yaml.safe_dump({"alerts": alerts})
    path.write_text(text, encoding="utf-8")
    return parse_alerts_config(load_config(path, environ=environ or {}))


def error_of(tmp_path: Path, alerts: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        settings_of(tmp_path, alerts)
    return caught.value


def test_without_a_section_every_default_holds(tmp_path: Path) -> None:
    settings = parse_alerts_config(load_config(None, environ={}))

    assert settings == AlertSettings()
    assert settings.enabled_channels() == ()
    assert dict(settings.routing) == dict(DEFAULT_ROUTING)
    assert settings.routing["CRITICAL"] == ("sms", "email", "webhook")
    assert settings.routing["HIGH"] == ("email", "webhook")
    assert settings.routing["MEDIUM"] == ("email",)
    assert settings.routing["LOW"] == ()
    assert settings.suppress_window == 300.0
    assert (settings.retry.attempts, settings.retry.initial_backoff) == (5, 1.0)
    assert settings.email.starttls is True and settings.email.use_tls is False
    assert settings.sms.api_url == "https://api.twilio.com"


def test_a_full_section_with_secrets_from_the_environment(tmp_path: Path) -> None:
    text = f"""
alerts:
  email:
    enabled: true
    smtp_server: smtp.plant.example
    smtp_port: ${{SMTP_PORT}}
    from_address: calejo@plant.example
    to_addresses: [duty@plant.example, chief@plant.example]
    username: calejo
    password: ${{SMTP_PASSWORD}}
  sms:
    enabled: ${{SMS_ON:-true}}
    provider: twilio
    account_sid: {SID}
    auth_token: ${{TWILIO_TOKEN}}
    from_number: "+15550100"
    to_numbers: ["+15550101"]
  webhook:
    enabled: true
    url: https://hooks.plant.example/calejo
    secret: ${{HOOK_SECRET}}
  routing:
    critical: [sms, webhook]
    LOW: [webhook]
  suppress_window: 60
  retry: {{attempts: 3, initial_backoff: 0.5, max_backoff: 4}}
  timeout: 5
  certificates: {{warn_days: 20, critical_days: 5, check_interval: 3600}}
"""
    settings = settings_of(
        tmp_path,
        text,
        {
            "SMTP_PORT": "2525",
            "SMTP_PASSWORD": "smtp secret",
            "TWILIO_TOKEN": "token",
            "HOOK_SECRET": "0123456789abcdef-hook",
        },
    )

    assert settings.enabled_channels() == ("sms", "email", "webhook")
    assert settings.email.smtp_port == 2525
    assert settings.email.password == "smtp secret"
    assert "smtp secret" not in repr(settings)
    assert settings.email.to_addresses == ("duty@plant.example", "chief@plant.example")
    assert settings.sms.enabled is True and settings.sms.auth_token == "token"
    assert settings.webhook.secret == "0123456789abcdef-hook"
    assert settings.routing["CRITICAL"] == ("sms", "webhook")
    assert settings.routing["LOW"] == ("webhook",)
    assert settings.routing["HIGH"] == ("email", "webhook")
    assert settings.retry.backoff(1) == 0.5
    assert [settings.retry.backoff(n) for n in (2, 3, 4)] == [1.0, 2.0, 4.0]
    assert settings.certificates.warn_days == 20.0


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        (
            {"emial": {}},
            "alerts.emial: unknown key; expected one of certificates, email, "
            "queue_size, retry, routing, sms, suppress_window, timeout, webhook",
        ),
        (
            {"email": {"enabled": True}},
            "alerts.email.smtp_server: expected a host name or address, "
            "got nothing (null)",
        ),
        (
            {
                "email": {
                    "enabled": True,
                    "smtp_server": "smtp",
                    "from_address": "a@b",
                    "to_addresses": [],
                }
            },
            "alerts.email.to_addresses: expected a non-empty list of e-mail "
            "addresses, got a list of 0 items",
        ),
        (
            {"email": {"smtp_port": 70000}},
            "alerts.email.smtp_port: expected an integer from 1 to 65535, got 70000",
        ),
        (
            {"email": {"use_tls": True, "starttls": True}},
            "alerts.email.starttls: expected false when use_tls is true",
        ),
        (
            {"email": {"username": "calejo"}},
            "alerts.email.password: expected a password to go with username",
        ),
        (
            {"sms": {"provider": "nexmo"}},
            "alerts.sms.provider: expected twilio, got 'nexmo' (a text)",
        ),
        (
            {"sms": {"account_sid": "XY123"}},
            "alerts.sms.account_sid: expected AC followed by 32 hex digits",
        ),
        (
            {"sms": {"to_numbers": ["5550101"]}},
            "alerts.sms.to_numbers[0]: expected a non-empty list of phone numbers "
            "in E.164 form, got '5550101' (a text)",
        ),
        (
            {"webhook": {"url": "ftp://hooks.example"}},
            "alerts.webhook.url: expected an http:// or https:// URL",
        ),
        (
            {"webhook": {"enabled": True, "url": "https://hooks.example"}},
            "alerts.webhook.secret: expected a secret of at least 16 characters, "
            "got nothing (null)",
        ),
        (
            {"routing": {"URGENT": ["sms"]}},
            "alerts.routing.URGENT: unknown severity; expected one of LOW, MEDIUM, "
            "HIGH, CRITICAL",
        ),
        (
            {"routing": {"HIGH": ["sms", "pager"]}},
            "alerts.routing.HIGH[1]: expected a list of channels from sms, email, "
            "webhook (may be empty), got 'pager' (a text)",
        ),
        (
            {"retry": {"initial_backoff": 10, "max_backoff": 5}},
            "alerts.retry.max_backoff: expected at least initial_backoff (10 s), got 5",
        ),
        (
            {"retry": {"attempts": 0}},
            "alerts.retry.attempts: expected an integer from 1 to 100, got 0",
        ),
        (
            {"suppress_window": "soon"},
            "alerts.suppress_window: expected a number from 0 to 604800, got "
            "'soon' (a text)",
        ),
        (
            {"certificates": {"warn_days": 5, "critical_days": 7}},
            "alerts.certificates.critical_days: expected at most warn_days (5)",
        ),
    ],
)
def test_a_wrong_value_names_the_key_and_what_was_expected(
    tmp_path: Path, alerts: dict[str, Any], message: str
) -> None:
    error = error_of(tmp_path, alerts)

    assert message in str(error)
    assert str(error).startswith(str(tmp_path / "calejo.yaml"))
    assert error.key_path is not None and error.key_path.startswith("alerts")


def test_a_secret_is_never_shown(tmp_path: Path) -> None:
    error = error_of(tmp_path, {"webhook": {"secret": "short-secret"}})

    assert "alerts.webhook.secret" in str(error)
    assert "short-secret" not in str(error)
    assert "not shown" in str(error)
