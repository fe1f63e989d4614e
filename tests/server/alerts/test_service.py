"""The alert service on real storage, with real servers behind every channel.

Routing by severity, retries with backoff, failures recorded in the alerts
table and the audit log and shown in the health, suppression of repeats,
a full queue, the sources (engine, security, certificates), and a bounded
stop while a webhook hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from calejo_server import certs
from calejo_server.alerts import ALERT_DELIVERY_FAILED, ALERT_SENT, AlertService
from calejo_server.alerts.settings import parse_alerts_section
from calejo_server.alerts.sources import certificate_paths
from calejo_server.api.health import HealthRegistry
from calejo_server.config import load_config
from calejo_server.engine import Engine, ManualClock, RequestContext
from calejo_server.engine.clock import Clock
from calejo_server.security import Passwords, Security, Throttled
from calejo_server.security.directory import AuthError
from calejo_server.storage import open_storage
from calejo_server.storage.base import AlertQuery, AlertRow, AuditQuery, Storage
from tests.server.storage.conftest import run

from .stand_ins import (
    HANG,
    HttpStandIn,
    SmtpServer,
    email_section,
    free_port,
    sms_section,
    webhook_section,
)

FAST_RETRY = {"attempts": 3, "initial_backoff": 0.05, "max_backoff": 0.1}
OPERATOR = RequestContext(user="alice", source_address="10.0.0.5", protocol="REST")


@contextlib.asynccontextmanager
async def running(
    data_dir: Path,
    alerts: dict[str, Any],
    *,
    clock: Clock | None = None,
    certificates: dict[str, Path] | None = None,
    start: bool = True,
) -> AsyncIterator[tuple[AlertService, Storage, HealthRegistry]]:
    """An alert service on SQLite in ``data_dir``, started; stopped after."""
    storage = open_storage(None, data_dir)
    await storage.open()
    health = HealthRegistry()
    service = AlertService(
        parse_alerts_section(alerts, "test configuration"),
        storage,
        health=health,
        clock=clock,
        certificates=certificates,
        adapter="plant-host",
    )
    try:
        if start:
            await service.start()
        yield service, storage, health
    finally:
        await service.stop()
        await storage.close()


async def stored(storage: Storage, **query: Any) -> list[AlertRow]:
    return await storage.alerts_query(AlertQuery(limit=1000, **query))


async def audited(storage: Storage, event_type: str) -> list[dict[str, Any]]:
    rows = await storage.audit_query(AuditQuery(event_type=event_type, limit=1000))
    return [{**row.record.details, "severity": row.record.severity} for row in rows]


def by_kind(rows: list[AlertRow]) -> dict[str, AlertRow]:
    return {row.record.kind: row for row in rows}


# -- routing ----------------------------------------------------------------


def test_each_severity_goes_to_its_channels(
    tmp_path: Path,
    smtp_server: Callable[..., SmtpServer],
    http_stand_in: Callable[..., HttpStandIn],
) -> None:
    smtp = smtp_server()
    twilio = http_stand_in(default=201)
    hook = http_stand_in()
    alerts = {
        "email": email_section(smtp),
        "sms": sms_section(twilio),
        "webhook": webhook_section(hook),
    }

    async def main() -> None:
        async with running(tmp_path, alerts) as (service, storage, health):
            for severity in ("CRITICAL", "HIGH", "MEDIUM", "LOW"):
                service.raise_alert(
                    f"{severity.lower()}_thing", severity, f"a {severity} thing"
                )
            await service.wait_idle(20)

            rows = by_kind(await stored(storage))
            deliveries = {
                kind: {name: d["status"] for name, d in row.record.deliveries.items()}
                for kind, row in rows.items()
            }
            assert deliveries == {
                "critical_thing": {"sms": "sent", "email": "sent", "webhook": "sent"},
                "high_thing": {"email": "sent", "webhook": "sent"},
                "medium_thing": {"email": "sent"},
                "low_thing": {},
            }
            sent = await audited(storage, ALERT_SENT)
            assert sorted((d["kind"], d["channel"]) for d in sent) == [
                ("critical_thing", "email"),
                ("critical_thing", "sms"),
                ("critical_thing", "webhook"),
                ("high_thing", "email"),
                ("high_thing", "webhook"),
                ("medium_thing", "email"),
            ]
            assert all(d["severity"] == "LOW" and d["attempts"] == 1 for d in sent)
            assert health.check()[1]["alerts"].state == "ok"

    run(main())

    assert sorted(mail.subject for mail in smtp.mails) == [
        "[Calejo CRITICAL] a CRITICAL thing",
        "[Calejo HIGH] a HIGH thing",
        "[Calejo MEDIUM] a MEDIUM thing",
    ]
    assert [seen.form["Body"] for seen in twilio.requests] == [
        "[Calejo CRITICAL] a CRITICAL thing"
    ] * 2
    hooked = sorted(json.loads(seen.body)["severity"] for seen in hook.requests)
    assert hooked == ["CRITICAL", "HIGH"]


def test_routing_is_configurable_and_skips_channels_that_are_off(
    tmp_path: Path, http_stand_in: Callable[..., HttpStandIn]
) -> None:
    hook = http_stand_in()
    alerts = {
        "webhook": webhook_section(hook),
        "routing": {"LOW": ["webhook"], "CRITICAL": ["sms", "email"]},
    }

    async def main() -> None:
        async with running(tmp_path, alerts) as (service, storage, _):
            service.raise_alert("note", "low", "for the record")
            service.raise_alert("flood", "CRITICAL", "nobody routes this to a hook")
            await service.wait_idle(20)

            rows = by_kind(await stored(storage))
            assert rows["note"].record.deliveries["webhook"]["status"] == "sent"
            assert rows["flood"].record.deliveries == {}

    run(main())
    assert [json.loads(seen.body)["kind"] for seen in hook.requests] == ["note"]


# -- retries and failures -------------------------------------------------------


def test_a_delivery_is_retried_with_backoff_until_it_succeeds(
    tmp_path: Path, http_stand_in: Callable[..., HttpStandIn]
) -> None:
    hook = http_stand_in(script=[500, 500])
    alerts = {"webhook": webhook_section(hook), "retry": FAST_RETRY}

    async def main() -> None:
        async with running(tmp_path, alerts) as (service, storage, health):
            service.raise_alert("pump_trip", "HIGH", "pump p1 tripped", pump_id="p1")
            await service.wait_idle(20)

            (row,) = await stored(storage)
            delivery = row.record.deliveries["webhook"]
            assert delivery["status"] == "sent"
            assert [a["ok"] for a in delivery["attempts"]] == [False, False, True]
            assert delivery["attempts"][0]["detail"] == (
                f"{hook.url}/hooks/calejo answered HTTP 500"
            )
            times = [dt.datetime.fromisoformat(a["at"]) for a in delivery["attempts"]]
            assert (times[1] - times[0]).total_seconds() >= 0.05
            assert (times[2] - times[1]).total_seconds() >= 0.1
            assert delivery["sent_at"] == delivery["attempts"][-1]["at"]

            (sent,) = await audited(storage, ALERT_SENT)
            assert sent["attempts"] == 3 and sent["channel"] == "webhook"
            assert await audited(storage, ALERT_DELIVERY_FAILED) == []

            component = health.check()[1]["alerts"]
            assert component.state == "ok"
            channel = component.data["channels"]["webhook"]
            assert channel["sent"] == 1 and channel["failed"] == 0
            assert channel["last_success"] > channel["last_failure"]

    run(main())
    assert [seen.headers["x-calejo-attempt"] for seen in hook.requests] == [
        "1",
        "2",
        "3",
    ]


def test_a_provider_answering_500_is_retried_recorded_and_surfaced(
    tmp_path: Path, http_stand_in: Callable[..., HttpStandIn]
) -> None:
    twilio = http_stand_in(default=500, answer_body={"message": "upstream down"})
    alerts = {"sms": sms_section(twilio), "retry": FAST_RETRY}

    async def main() -> None:
        async with running(tmp_path, alerts) as (service, storage, health):
            service.raise_alert("storage_degraded", "CRITICAL", "database away")
            await service.wait_idle(20)

            (row,) = await stored(storage)
            delivery = row.record.deliveries["sms"]
            assert delivery["status"] == "failed"
            assert len(delivery["attempts"]) == 3
            assert not any(a["ok"] for a in delivery["attempts"])
            assert (
                "answered HTTP 500: upstream down" in delivery["attempts"][-1]["detail"]
            )

            (failed,) = await audited(storage, ALERT_DELIVERY_FAILED)
            assert failed["severity"] == "HIGH"
            assert failed["channel"] == "sms" and failed["attempts"] == 3
            assert failed["alert_id"] == row.record.alert_id

            status, components = health.check()
            alerts_health = components["alerts"]
            assert status == "degraded"
            assert alerts_health.state == "degraded"
            assert "last delivery failed on sms" in alerts_health.detail
            channel = alerts_health.data["channels"]["sms"]
            assert channel["failed"] == 1 and channel["pending"] == 0
            assert channel["last_success"] is None
            assert "HTTP 500" in channel["last_error"]

    run(main())
    assert len(twilio.requests) == 3 * 2


def test_a_wrong_smtp_password_is_retried_recorded_and_surfaced(
    tmp_path: Path, smtp_server: Callable[..., SmtpServer]
) -> None:
    smtp = smtp_server(username="calejo", password="right password")
    alerts = {
        "email": email_section(smtp, password="wrong password"),
        "retry": FAST_RETRY,
    }

    async def main() -> None:
        async with running(tmp_path, alerts) as (service, storage, health):
            service.raise_alert("failsafe_entered", "HIGH", "station north in failsafe")
            await service.wait_idle(20)

            (row,) = await stored(storage)
            delivery = row.record.deliveries["email"]
            assert delivery["status"] == "failed"
            assert len(delivery["attempts"]) == 3
            assert (
                "refused the login of 'calejo': 535"
                in delivery["attempts"][0]["detail"]
            )
            assert len(await audited(storage, ALERT_DELIVERY_FAILED)) == 1
            assert health.check()[1]["alerts"].state == "degraded"

    run(main())
    assert smtp.mails == [] and smtp.refused_logins >= 3


def test_an_unreachable_webhook_is_a_recorded_failure(tmp_path: Path) -> None:
    alerts = {
        "webhook": {
            "enabled": True,
            "url": f"http://127.0.0.1:{free_port()}/hook",
            "secret": "0123456789abcdef",
        },
        "retry": {"attempts": 2, "initial_backoff": 0.01, "max_backoff": 0.01},
    }

    async def main() -> None:
        async with running(tmp_path, alerts) as (service, storage, health):
            service.raise_alert("emergency_stop", "CRITICAL", "stop", station_id="n")
            await service.wait_idle(20)

            (row,) = await stored(storage)
            delivery = row.record.deliveries["webhook"]
            assert delivery["status"] == "failed"
            assert delivery["attempts"][0]["detail"].startswith(
                "cannot reach http://127.0.0.1:"
            )
            assert health.check()[1]["alerts"].state == "degraded"

    run(main())


# -- repeats ----------------------------------------------------------------------


def test_repeats_within_the_window_are_counted_and_reported_next_time(
    tmp_path: Path, http_stand_in: Callable[..., HttpStandIn]
) -> None:
    hook = http_stand_in()
    clock = ManualClock()
    alerts = {"webhook": webhook_section(hook), "suppress_window": 300}

    async def main() -> None:
        async with running(tmp_path, alerts, clock=clock) as (service, storage, _):
            service.raise_alert("failsafe_entered", "HIGH", "first", station_id="n")
            for _ in range(3):
                clock.advance(10)
                service.raise_alert("failsafe_entered", "HIGH", "again", station_id="n")
            service.raise_alert("failsafe_entered", "HIGH", "other", station_id="s")
            service.raise_alert("failsafe_entered", "CRITICAL", "worse", station_id="n")
            await service.wait_idle(20)

            rows = await stored(storage, station_id="n")
            first = rows[-1].record
            assert first.summary == "first"
            assert first.repeat_count == 3
            assert (first.last_raised - first.first_raised).total_seconds() == 30
            assert len(await stored(storage)) == 3
            health = service.health()
            assert health.data["suppressed"] == 3 and health.data["raised"] == 6

            clock.advance(300)
            service.raise_alert("failsafe_entered", "HIGH", "later", station_id="n")
            await service.wait_idle(20)

            later = (await stored(storage, station_id="n"))[0].record
            assert later.summary == "later" and later.repeat_count == 0
            assert "suppressed_earlier" not in later.details

    run(main())

    payloads = {
        json.loads(seen.body)["summary"]: json.loads(seen.body)
        for seen in hook.requests
    }
    assert sorted(payloads) == ["first", "later", "other", "worse"]
    earlier = payloads["worse"]["details"]["suppressed_earlier"]
    assert earlier["repeat_count"] == 3


def test_the_count_of_suppressed_repeats_is_in_the_next_delivery(
    tmp_path: Path,
    http_stand_in: Callable[..., HttpStandIn],
    smtp_server: Callable[..., SmtpServer],
) -> None:
    hook = http_stand_in()
    smtp = smtp_server()
    clock = ManualClock()
    alerts = {
        "webhook": webhook_section(hook),
        "email": email_section(smtp),
        "suppress_window": 60,
    }

    async def main() -> None:
        async with running(tmp_path, alerts, clock=clock) as (service, storage, _):
            for _ in range(5):
                service.raise_alert("source_throttled", "HIGH", "source blocked")
                clock.advance(1)
            await service.wait_idle(20)
            clock.advance(60)
            service.raise_alert("source_throttled", "HIGH", "source blocked again")
            await service.wait_idle(20)

            newest, oldest = (await stored(storage))[:2]
            assert oldest.record.repeat_count == 4
            earlier = newest.record.details["suppressed_earlier"]
            assert earlier["repeat_count"] == 4
            assert earlier["alert_id"] == oldest.record.alert_id

    run(main())

    assert len(hook.requests) == 2
    second = json.loads(hook.requests[1].body)
    assert second["details"]["suppressed_earlier"]["repeat_count"] == 4
    assert len(smtp.mails) == 2
    assert "4 repeat(s) of the previous alert" in smtp.mails[1].body


# -- the queue --------------------------------------------------------------------


def test_a_full_queue_drops_counts_and_shows_it(tmp_path: Path) -> None:
    alerts = {"queue_size": 2}

    async def main() -> None:
        async with running(tmp_path, alerts, start=False) as (service, storage, _):
            for number in range(5):
                service.raise_alert(f"kind_{number}", "MEDIUM", f"alert {number}")
            assert service.health().state == "degraded"
            assert service.health().data["dropped"] == 3
            assert "3 alert(s) dropped" in service.health().detail

            await service.start()
            await service.wait_idle(20)
            kinds = sorted(row.record.kind for row in await stored(storage))
            assert kinds == ["kind_0", "kind_1"]

    run(main())


def test_raising_from_another_thread_is_safe(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, {}) as (service, storage, _):
            thread = threading.Thread(
                target=service.raise_alert,
                args=("backup_failed", "HIGH", "the hourly backup failed"),
                kwargs={"details": {"archive": "/var/backup/x.tar.gz"}},
            )
            thread.start()
            thread.join(5)
            for _ in range(200):
                if await stored(storage):
                    break
                await service.wait_idle(5)
            (row,) = await stored(storage)
            assert row.record.kind == "backup_failed"
            assert row.record.details == {"archive": "/var/backup/x.tar.gz"}

    run(main())


def test_a_bad_kind_or_severity_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, {}) as (service, _, _):
            with pytest.raises(ValueError, match="expected one of LOW, MEDIUM"):
                service.raise_alert("x", "SEVERE", "what")
            with pytest.raises(ValueError, match="alert kind"):
                service.raise_alert("", "LOW", "what")

    run(main())


# -- stopping -------------------------------------------------------------------------


def test_stop_is_bounded_while_a_webhook_hangs(
    tmp_path: Path, http_stand_in: Callable[..., HttpStandIn]
) -> None:
    hook = http_stand_in(script=[HANG])
    alerts = {"webhook": webhook_section(hook), "timeout": 60}

    async def main() -> None:
        storage = open_storage(None, tmp_path)
        await storage.open()
        service = AlertService(parse_alerts_section(alerts, "test"), storage)
        await service.start()
        service.raise_alert("emergency_stop", "CRITICAL", "stop", station_id="n")
        for _ in range(500):
            if hook.hanging:
                break
            await asyncio.sleep(0.02)
        assert hook.hanging == 1
        assert service.health().data["channels"]["webhook"]["pending"] == 1

        await service.stop()

        (row,) = await stored(storage)
        assert row.record.deliveries["webhook"]["status"] == "pending"
        await storage.close()

    run(main(), timeout=20)


# -- sources --------------------------------------------------------------------------


def write_config(folder: Path, **sections: Any) -> Path:
    document = {
        "server": {"data_dir": str(folder / "data")},
        "stations": [
            {
                "station_id": "north",
                "pumps": [
                    {
                        "pump_id": "p1",
                        "min_value": 20,
                        "max_value": 50,
                        "max_rate": math.inf,
                        "failsafe_value": 35,
                    }
                ],
            }
        ],
        **sections,
    }
    path = folder / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_engine_events_raise_alerts(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), environ={})

    async def main() -> None:
        async with running(config.server.data_dir, {}) as (service, storage, _):
            engine = Engine(config, storage)
            service.watch_engine(engine)
            await engine.start()
            try:
                await engine.set_setpoint("north", "p1", 30.0, OPERATOR)
                await engine.emergency_stop(
                    "station", "north", None, "flooding", "alice", OPERATOR
                )
                await engine.clear_emergency_stop(
                    "station", "north", None, "dry again", "alice", OPERATOR
                )
                await engine.emergency_stop(
                    "pump", "north", "p1", "vibration", "bob", OPERATOR
                )
            finally:
                await engine.stop()
            await service.wait_idle(20)

            rows = {
                (r.record.kind, r.record.pump_id): r.record
                for r in await stored(storage)
            }
            stop = rows[("emergency_stop", None)]
            assert stop.severity == "CRITICAL" and stop.station_id == "north"
            assert "flooding" in stop.summary and stop.details["operator"] == "alice"
            assert rows[("emergency_stop_cleared", None)].severity == "HIGH"
            assert rows[("emergency_stop", "p1")].severity == "CRITICAL"
            assert rows[("failsafe_exited", None)].severity == "MEDIUM"

    run(main())


def test_lockouts_and_blocked_sources_raise_alerts(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path, security={"lockout_threshold": 2, "source_failure_limit": 3}
        ),
        environ={},
    )

    async def main() -> None:
        async with running(config.server.data_dir, {}) as (service, storage, _):
            security = Security(
                config.security,
                storage,
                passwords=Passwords(time_cost=1, memory_cost=8192, parallelism=1),
            )
            await security.start()
            service.watch_security(security)
            await security.ensure_admin("correct horse battery staple")
            for _ in range(4):
                with pytest.raises(AuthError):
                    await security.login("admin", "wrong", "10.9.8.7")
            with pytest.raises(Throttled):
                await security.login("admin", "wrong", "10.9.8.7")
            await security.stop()
            await service.wait_idle(20)

            rows = by_kind(await stored(storage))
            locked = rows["account_locked"].record
            assert locked.severity == "HIGH"
            assert "account 'admin' locked until" in locked.summary
            assert locked.details["source_address"] == "10.9.8.7"
            throttled = rows["source_throttled"].record
            assert throttled.severity == "HIGH"
            assert throttled.summary.startswith("source 10.9.8.7 blocked for")

    run(main())


def test_certificates_near_expiry_raise_high_then_critical(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    files = certs.ensure_certificates(folder, "urn:test:calejo", ["localhost"])
    ca = certs.load_certificate(files.ca_cert)
    ca_key = certs.load_private_key(files.ca_key)
    now = dt.datetime.now(dt.UTC)

    def issue(name: str, days: float, start: dt.datetime = now) -> Path:
        path = folder / f"{name}.pem"
        certs.issue_certificate(
            ca,
            ca_key,
            path,
            folder / f"{name}.key",
            application_uri=f"urn:test:{name}",
            common_name=name,
            server=True,
            lifetime=dt.timedelta(days=days),
            now=start,
        )
        return path

    (folder / "garbage.pem").write_text("not a certificate\n")
    paths = {
        "ca": files.ca_cert,
        "opcua": issue("soon", 20),
        "rest": issue("sooner", 3),
        "old": issue("old", 10, now - dt.timedelta(days=12)),
        "bad": folder / "garbage.pem",
        "gone": folder / "missing.pem",
    }
    clock = ManualClock(start=now)

    async def main() -> None:
        async with running(tmp_path / "data", {}, clock=clock, certificates=paths) as (
            service,
            storage,
            _,
        ):
            checks = await service.check_certificates()
            await service.wait_idle(20)
            assert sorted(check.name for check in checks) == [
                "bad",
                "ca",
                "old",
                "opcua",
                "rest",
            ]

            rows = {row.record.kind: row.record for row in await stored(storage)}
            assert set(rows) == {
                "opcua_certificate_expiring",
                "rest_certificate_expiring",
                "old_certificate_expiring",
                "bad_certificate_unreadable",
            }
            soon = rows["opcua_certificate_expiring"]
            assert soon.severity == "HIGH"
            assert soon.summary.startswith("OPC UA server certificate")
            assert "expires in 19 day(s)" in soon.summary
            assert rows["rest_certificate_expiring"].severity == "CRITICAL"
            old = rows["old_certificate_expiring"]
            assert old.severity == "CRITICAL" and "expired 2 day(s) ago" in old.summary
            assert rows["bad_certificate_unreadable"].severity == "HIGH"
            days_left = service.health().data["certificates"]["opcua"]["days_left"]
            assert days_left == pytest.approx(20, abs=0.01)

    run(main())


def test_the_certificates_watched_follow_the_configuration(tmp_path: Path) -> None:
    plain = load_config(write_config(tmp_path), environ={})
    folder = tmp_path / "data" / "certs"
    assert certificate_paths(plain) == {
        "ca": folder / "ca.crt",
        "opcua": folder / "server.pem",
    }

    tls = load_config(
        write_config(
            tmp_path,
            opcua={"enabled": False},
            tls={"enabled": True, "cert_file": str(tmp_path / "rest.pem")},
        ),
        environ={},
    )
    assert certificate_paths(tls) == {
        "ca": folder / "ca.crt",
        "rest": tmp_path / "rest.pem",
    }
