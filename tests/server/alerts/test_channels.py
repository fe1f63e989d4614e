"""Each channel against a real server on loopback: SMTP, Twilio, a webhook."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Callable

import pytest

from calejo_server.alerts.channels import (
    DeliveryError,
    EmailChannel,
    SmsChannel,
    WebhookChannel,
    http_client,
)
from calejo_server.alerts.model import SUPPRESSED_EARLIER, Alert
from calejo_server.alerts.settings import EmailSettings, SmsSettings, WebhookSettings
from calejo_server.alerts.signing import (
    REPLAY_WINDOW,
    SignatureError,
    signature_header,
    verify_signature,
)
from tests.server.storage.conftest import run

from .stand_ins import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    WEBHOOK_SECRET,
    HttpStandIn,
    Pki,
    SmtpServer,
    free_port,
)

AT = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)


def an_alert(**changes: object) -> Alert:
    alert = Alert(
        alert_id="a1b2c3",
        kind="emergency_stop",
        severity="CRITICAL",
        summary="emergency stop activated (station north) by alice: flooding",
        station_id="north",
        pump_id=None,
        first_raised=AT,
        last_raised=AT,
        details={"level": "station", "reason": "flooding"},
    )
    for name, value in changes.items():
        setattr(alert, name, value)
    return alert


def email_settings(smtp: SmtpServer, **changes: object) -> EmailSettings:
    values: dict[str, object] = {
        "enabled": True,
        "smtp_server": "127.0.0.1",
        "smtp_port": smtp.port,
        "from_address": "calejo@plant.example",
        "to_addresses": ("duty@plant.example", "chief@plant.example"),
        "username": smtp.username,
        "password": smtp.password,
        "starttls": False,
    }
    values.update(changes)
    return EmailSettings(**values)  # type: ignore[arg-type]


# -- e-mail -------------------------------------------------------------------


def test_email_logs_in_and_delivers_subject_and_body(
    smtp_server: Callable[..., SmtpServer],
) -> None:
    smtp = smtp_server(username="calejo", password="smtp password")
    channel = EmailChannel(email_settings(smtp), 5.0, "plant-host")
    alert = an_alert(
        repeat_count=2,
        details={
            "reason": "flooding",
            SUPPRESSED_EARLIER: {
                "alert_id": "0ld",
                "repeat_count": 4,
                "first_raised": "2026-01-31T11:58:00.000000+00:00",
            },
        },
    )

    failed = run(channel.send(alert, channel.recipients, 1))

    assert failed == {}
    (mail,) = smtp.mails
    assert mail.login == "calejo" and mail.tls is False
    assert mail.sender == "calejo@plant.example"
    assert mail.recipients == ["duty@plant.example", "chief@plant.example"]
    assert mail.subject == (
        "[Calejo CRITICAL] emergency stop activated (station north) by alice: flooding"
    )
    assert mail.message["X-Calejo-Alert-Id"] == "a1b2c3"
    body = mail.body
    assert "CRITICAL alert (respond within 15 minutes)" in body
    assert "plant-host" in body
    assert "Where:         station north" in body
    assert "Repeats:       2 suppressed into this alert" in body
    assert "4 repeat(s) of the previous alert 0ld" in body
    assert "  reason: flooding" in body
    assert "Alert id: a1b2c3" in body


def test_email_over_starttls_with_the_local_ca(
    smtp_server: Callable[..., SmtpServer], pki: Pki
) -> None:
    smtp = smtp_server(
        username="calejo",
        password="smtp password",
        tls_context=pki.server_context(),
        require_starttls=True,
    )
    settings = email_settings(smtp, starttls=True, ca_file=pki.ca_file)
    channel = EmailChannel(settings, 5.0, "plant-host")

    assert run(channel.send(an_alert(), channel.recipients, 1)) == {}

    (mail,) = smtp.mails
    assert mail.tls is True
    assert mail.login == "calejo"


def test_starttls_is_required_when_configured(
    smtp_server: Callable[..., SmtpServer],
) -> None:
    smtp = smtp_server()
    channel = EmailChannel(email_settings(smtp, starttls=True), 5.0, "plant-host")

    with pytest.raises(DeliveryError, match=f"127.0.0.1:{smtp.port}"):
        run(channel.send(an_alert(), channel.recipients, 1))
    assert smtp.mails == []


def test_a_wrong_smtp_password_is_a_failed_attempt(
    smtp_server: Callable[..., SmtpServer],
) -> None:
    smtp = smtp_server(username="calejo", password="smtp password")
    channel = EmailChannel(
        email_settings(smtp, password="wrong password"), 5.0, "plant-host"
    )

    with pytest.raises(DeliveryError) as caught:
        run(channel.send(an_alert(), channel.recipients, 1))

    assert str(caught.value).startswith(
        f"smtp server 127.0.0.1:{smtp.port} refused the login of 'calejo': 535"
    )
    assert smtp.refused_logins >= 1 and smtp.mails == []


def test_an_smtp_server_that_is_not_there() -> None:
    port = free_port()
    settings = EmailSettings(
        enabled=True,
        smtp_server="127.0.0.1",
        smtp_port=port,
        from_address="calejo@plant.example",
        to_addresses=("duty@plant.example",),
        starttls=False,
    )

    with pytest.raises(
        DeliveryError, match=f"cannot reach smtp server 127.0.0.1:{port}"
    ):
        run(
            EmailChannel(settings, 2.0, "h").send(an_alert(), ["duty@plant.example"], 1)
        )


# -- SMS ----------------------------------------------------------------------


def sms_settings(twilio: HttpStandIn) -> SmsSettings:
    return SmsSettings(
        enabled=True,
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number="+15550100",
        to_numbers=("+15550101", "+15550102"),
        api_url=twilio.url,
    )


def test_sms_posts_to_twilio_as_its_api_expects(
    http_stand_in: Callable[..., HttpStandIn],
) -> None:
    twilio = http_stand_in(default=201, answer_body={"sid": "SM1", "status": "queued"})

    async def send() -> dict[str, str]:
        async with http_client(5.0) as client:
            channel = SmsChannel(sms_settings(twilio), client)
            return dict(await channel.send(an_alert(), channel.recipients, 1))

    assert run(send()) == {}

    assert len(twilio.requests) == 2
    expected_auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    for seen in twilio.requests:
        assert seen.method == "POST"
        assert seen.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        assert seen.headers["authorization"] == f"Basic {expected_auth}"
        assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
        assert seen.form["From"] == "+15550100"
        assert seen.form["Body"].startswith("[Calejo CRITICAL] emergency stop")
        assert len(seen.form["Body"]) <= 320
    assert sorted(seen.form["To"] for seen in twilio.requests) == [
        "+15550101",
        "+15550102",
    ]


def test_sms_names_the_numbers_the_provider_refused(
    http_stand_in: Callable[..., HttpStandIn],
) -> None:
    twilio = http_stand_in(
        script=[500],
        default=201,
        answer_body={"code": 20500, "message": "Internal Server Error"},
    )

    async def send() -> dict[str, str]:
        async with http_client(5.0) as client:
            channel = SmsChannel(sms_settings(twilio), client)
            return dict(await channel.send(an_alert(), ["+15550101"], 1))

    assert run(send()) == {
        "+15550101": f"{twilio.url} answered HTTP 500: Internal Server Error "
        "(code 20500)"
    }


# -- webhook --------------------------------------------------------------------


def webhook_settings(hook: HttpStandIn) -> WebhookSettings:
    return WebhookSettings(
        enabled=True, url=f"{hook.url}/hooks/calejo?token=t0k3n", secret=WEBHOOK_SECRET
    )


def test_the_webhook_is_signed_so_the_receiver_can_check_it(
    http_stand_in: Callable[..., HttpStandIn],
) -> None:
    hook = http_stand_in()

    async def send() -> dict[str, str]:
        async with http_client(5.0) as client:
            channel = WebhookChannel(webhook_settings(hook), client, "plant-host")
            assert channel.recipients == (f"{hook.url}/hooks/calejo",)
            return dict(await channel.send(an_alert(), channel.recipients, 3))

    assert run(send()) == {}

    (seen,) = hook.requests
    assert seen.path == "/hooks/calejo"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-calejo-alert-id"] == "a1b2c3"
    assert seen.headers["x-calejo-attempt"] == "3"
    verify_signature(
        WEBHOOK_SECRET,
        seen.headers["x-calejo-timestamp"],
        seen.headers["x-calejo-signature"],
        seen.body,
    )
    payload = json.loads(seen.body)
    assert payload["alert_id"] == "a1b2c3"
    assert payload["severity"] == "CRITICAL"
    assert payload["station_id"] == "north" and payload["pump_id"] is None
    assert payload["details"] == {"level": "station", "reason": "flooding"}
    assert payload["adapter"] == "plant-host"
    assert payload["first_raised"] == "2026-01-31T12:00:00.000000+00:00"


def test_a_webhook_answering_500_fails_the_attempt(
    http_stand_in: Callable[..., HttpStandIn],
) -> None:
    hook = http_stand_in(default=500)

    async def send() -> None:
        async with http_client(5.0) as client:
            channel = WebhookChannel(webhook_settings(hook), client, "plant-host")
            await channel.send(an_alert(), channel.recipients, 1)

    with pytest.raises(DeliveryError) as caught:
        run(send())
    assert str(caught.value) == f"{hook.url}/hooks/calejo answered HTTP 500"
    assert "t0k3n" not in str(caught.value)


def test_a_receiver_refuses_a_changed_body_a_wrong_secret_and_a_replay() -> None:
    body = b'{"alert_id":"a1b2c3"}'
    now = 1_800_000_000
    stamp = str(now)
    header = signature_header(WEBHOOK_SECRET, stamp, body)

    verify_signature(WEBHOOK_SECRET, stamp, header, body, now=now + 10)

    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(WEBHOOK_SECRET, stamp, header, body + b" ", now=now)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature("another secret of length", stamp, header, body, now=now)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(WEBHOOK_SECRET, str(now + 1), header, body, now=now)
    with pytest.raises(SignatureError, match=r"within 300 s of now, got one 301 s old"):
        verify_signature(
            WEBHOOK_SECRET, stamp, header, body, now=now + REPLAY_WINDOW + 1
        )
    with pytest.raises(SignatureError, match="start with 'sha256='"):
        verify_signature(WEBHOOK_SECRET, stamp, header[7:], body, now=now)
    with pytest.raises(SignatureError, match="expected both"):
        verify_signature(WEBHOOK_SECRET, None, header, body, now=now)


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"x":1}'
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), b"1700000000." + body, hashlib.sha256
    ).hexdigest()

    assert signature_header(WEBHOOK_SECRET, "1700000000", body) == f"sha256={expected}"
