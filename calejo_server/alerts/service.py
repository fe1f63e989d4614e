"""The alert service: suppression, routing, delivery with retries, records.

:meth:`AlertService.raise_alert` only looks at the alerts raised in the
last ``suppress_window`` seconds and puts the alert on a bounded queue; it
never waits for storage or a network. Behind the queue:

- the *intake* task records each alert in the alerts table and hands it
  to the queue of each channel its severity is routed to (channels that
  are not enabled are skipped);
- each enabled channel has its own queue, most severe alert first, and
  two delivery tasks; a delivery is tried up to ``retry.attempts`` times,
  waiting ``initial_backoff`` seconds after the first failure and twice
  as long after each next one, up to ``max_backoff``; each attempt is
  bounded by ``timeout`` and its result is kept on the alert;
- the outcome goes to the alerts table and the audit log in one write:
  ALERT_SENT (LOW) or, once the attempts are used up,
  ALERT_DELIVERY_FAILED (HIGH).

A hung SMTP server or webhook therefore holds up only its own channel,
never the engine, the REST API or another channel. A queue that is full
drops the alert for that queue; the drops are counted, logged and shown
in the health.

Repeats: an alert of the same kind, station and pump as one raised less
than ``suppress_window`` seconds before (and not more severe than it) is
not delivered again; it increments that alert's ``repeat_count`` and
``last_raised``. The next alert of that kind, station and pump carries the
count in ``details.suppressed_earlier``, and its messages say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from calejo_server.alerts.channels import (
    Channel,
    DeliveryError,
    EmailChannel,
    SmsChannel,
    WebhookChannel,
    http_client,
)
from calejo_server.alerts.model import (
    SEVERITY_RANK,
    SUPPRESSED_EARLIER,
    Alert,
    Attempt,
    Delivery,
)
from calejo_server.alerts.settings import (
    CHANNELS,
    AlertSettings,
    describe_routing,
    parse_alerts_config,
)
from calejo_server.alerts.sources import (
    EVENT_ALERTS,
    AlertArgs,
    CertificateCheck,
    certificate_alert,
    certificate_paths,
    check_certificate,
    event_alert,
    security_alert,
)
from calejo_server.api.health import ComponentHealth
from calejo_server.audit import iso_utc, json_safe
from calejo_server.config import Config, value_error
from calejo_server.engine.clock import Clock, SystemClock
from calejo_server.storage.base import (
    SEVERITIES,
    AuditRecord,
    Record,
    Severity,
    Storage,
    StorageError,
)

if TYPE_CHECKING:
    import httpx

    from calejo_server.api.health import HealthRegistry
    from calejo_server.engine import Engine, EngineEvent
    from calejo_server.security import Security

__all__ = [
    "ALERT_DELIVERY_FAILED",
    "ALERT_SENT",
    "AlertService",
    "ChannelResult",
]

logger = logging.getLogger(__name__)

ALERT_SENT: Final = "ALERT_SENT"
ALERT_DELIVERY_FAILED: Final = "ALERT_DELIVERY_FAILED"
TEST_KIND: Final = "test"

CHANNEL_WORKERS: Final = 2
"""Delivery tasks per channel: one slow delivery does not hold up the rest."""
SAVE_TIMEOUT: Final = 15.0
"""Seconds one write of the alerts table may take before it is given up."""
STOP_DRAIN: Final = 1.0
"""Seconds stop() lets queued deliveries finish before cancelling them."""
MAX_KIND: Final = 64
MAX_SUMMARY: Final = 1000
LOG_DROPS_EVERY: Final = 100
DROP_MEMORY: Final = 900.0
"""Seconds the health stays degraded after an alert was dropped."""


@dataclasses.dataclass(slots=True)
class ChannelState:
    """The health of one channel: last success and failure, counts."""

    enabled: bool
    recipients: int = 0
    pending: int = 0
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    last_success: dt.datetime | None = None
    last_failure: dt.datetime | None = None
    last_error: str | None = None

    @property
    def failing(self) -> bool:
        """The most recent attempt failed."""
        if self.last_failure is None:
            return False
        return self.last_success is None or self.last_failure > self.last_success

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "recipients": self.recipients,
            "pending": self.pending,
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "last_success": iso_utc(self.last_success) if self.last_success else None,
            "last_failure": iso_utc(self.last_failure) if self.last_failure else None,
            "last_error": self.last_error,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelResult:
    """What a test alert did on one channel."""

    enabled: bool
    ok: bool | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "ok": self.ok, "detail": self.detail}


_Key = tuple[str, str | None, str | None]


class AlertService:
    """Raises, records and delivers the adapter's alerts; see the module."""

    def __init__(
        self,
        settings: AlertSettings,
        storage: Storage,
        *,
        health: HealthRegistry | None = None,
        clock: Clock | None = None,
        certificates: Mapping[str, Path] | None = None,
        adapter: str | None = None,
        config_source: str = "<configuration>",
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.certificates = dict(certificates or {})
        self.adapter = adapter or socket.gethostname()
        self._health = health
        self._config_source = config_source

        self._intake: asyncio.Queue[tuple[Alert, bool]] = asyncio.Queue(
            settings.queue_size
        )
        self._queues: dict[str, asyncio.PriorityQueue[tuple[int, int, Alert]]] = {}
        self._channels: dict[str, Channel] = {}
        self._states = {
            name: ChannelState(enabled=name in settings.enabled_channels())
            for name in CHANNELS
        }
        self._recent: dict[_Key, tuple[Alert, float]] = {}
        self._order = itertools.count()

        self._raised = 0
        self._suppressed = 0
        self._dropped = 0
        self._last_drop: float | None = None
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[httpx.AsyncClient] = []
        self._removers: list[Callable[[], None]] = []
        self._running = False
        self._stopped = False
        self.last_certificate_checks: list[CertificateCheck] = []

    @classmethod
    def from_config(
        cls,
        config: Config,
        storage: Storage,
        *,
        health: HealthRegistry | None = None,
        clock: Clock | None = None,
    ) -> AlertService:
        """The service of the ``alerts:`` section (raises ConfigError)."""
        where = str(config.source) if config.source else "<demonstration configuration>"
        return cls(
            parse_alerts_config(config),
            storage,
            health=health,
            clock=clock,
            certificates=certificate_paths(config),
            config_source=where,
        )

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the channels, start the tasks, report into the health."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._open_channels()

        self._spawn(self._run_intake(), "alerts-intake")
        for name in self._channels:
            self._queues[name] = asyncio.PriorityQueue(self.settings.queue_size)
            self._states[name].recipients = len(self._channels[name].recipients)
            for number in range(CHANNEL_WORKERS):
                self._spawn(self._run_channel(name), f"alerts-{name}-{number}")
        if self.settings.certificates.enabled and self.certificates:
            self._spawn(self._watch_certificates(), "alerts-certificates")

        if self._health is not None:
            self._removers.append(self._health.register("alerts", self.health))
        self._running = True
        logger.info(
            "alerts: channels %s; %s; repeats suppressed for %g s",
            ", ".join(self._channels) or "none (alerts are recorded only)",
            describe_routing(self.settings.routing),
            self.settings.suppress_window,
        )

    def _open_channels(self) -> None:
        settings = self.settings
        if settings.email.enabled:
            with self._ca_file_checked("email"):
                self._channels["email"] = EmailChannel(
                    settings.email, settings.timeout, self.adapter
                )
        if settings.sms.enabled:
            client = http_client(settings.timeout)
            self._clients.append(client)
            self._channels["sms"] = SmsChannel(settings.sms, client)
        if settings.webhook.enabled:
            with self._ca_file_checked("webhook"):
                client = http_client(settings.timeout, settings.webhook.ca_file)
            self._clients.append(client)
            self._channels["webhook"] = WebhookChannel(
                settings.webhook, client, self.adapter
            )

    @contextlib.contextmanager
    def _ca_file_checked(self, channel: str) -> Iterator[None]:
        try:
            yield
        except DeliveryError as exc:
            raise value_error(
                self._config_source,
                f"alerts.{channel}.ca_file",
                "a readable file of PEM CA certificates",
                str(exc),
            ) from exc

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        """Stop listening, let queued deliveries finish (bounded), close."""
        if self._stopped:
            return
        self._stopped = True
        for remove in self._removers:
            remove()
        self._removers.clear()

        with contextlib.suppress(TimeoutError):
            await self.wait_idle(STOP_DRAIN)
        left = self._outstanding
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for client in self._clients:
            await client.aclose()
        self._clients.clear()
        self._running = False

        if left:
            logger.warning(
                "alerts: stopped with %d delivery step(s) unfinished; their alerts "
                "stay pending in the alerts table",
                left,
            )

    # -- sources --------------------------------------------------------------

    def watch_engine(self, engine: Engine) -> None:
        """Raise alerts for the engine's emergency stops, failsafe, storage."""
        self._removers.append(engine.subscribe(self._on_engine_event, EVENT_ALERTS))

    def watch_security(self, security: Security) -> None:
        """Raise alerts for locked accounts and blocked source addresses."""
        self._removers.append(security.add_listener(self._on_security_record))

    def _on_engine_event(self, event: EngineEvent) -> None:
        args = event_alert(event)
        if args is not None:
            self._raise_args(args)

    def _on_security_record(self, record: AuditRecord) -> None:
        args = security_alert(record)
        if args is not None:
            self._raise_args(args)

    def _raise_args(self, args: AlertArgs) -> None:
        self.raise_alert(
            args.kind,
            args.severity,
            args.summary,
            station_id=args.station_id,
            pump_id=args.pump_id,
            details=args.details,
        )

    # -- raising --------------------------------------------------------------

    def raise_alert(
        self,
        kind: str,
        severity: str,
        summary: str,
        *,
        station_id: str | None = None,
        pump_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise an alert; returns at once, never waits for a delivery.

        ``kind`` names what happened (``backup_failed``), ``severity`` is
        LOW, MEDIUM, HIGH or CRITICAL (any case), ``summary`` one sentence
        for the operator, ``details`` JSON-like values. Safe to call from
        any thread. Raises ValueError for an empty kind or an unknown
        severity.
        """
        level = _severity(severity)
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND:
            raise ValueError(
                f"alert kind: expected a text of 1 to {MAX_KIND} characters, "
                f"got {kind!r}"
            )
        text = " ".join(str(summary).split())[:MAX_SUMMARY] or kind
        facts = json_safe(dict(details)) if details else {}
        call = (kind, level, text, station_id, pump_id, facts)

        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._raise, *call)
            return
        self._raise(*call)

    def _raise(
        self,
        kind: str,
        severity: Severity,
        summary: str,
        station_id: str | None,
        pump_id: str | None,
        details: dict[str, Any],
    ) -> None:
        if self._stopped:
            logger.warning(
                "alert after the alert service stopped, not delivered: %s %s: %s",
                severity,
                kind,
                summary,
            )
            return

        self._raised += 1
        now = self.clock.monotonic()
        wall = self.clock.utcnow()
        key = (kind, station_id, pump_id)
        recent = self._recent.get(key)
        if recent is not None and self._is_repeat(recent, severity, now):
            self._count_repeat(recent[0], wall)
            return

        if self._intake.full():
            self._drop(None, f"{severity} {kind}: {summary}")
            return

        alert = Alert(
            alert_id=uuid.uuid4().hex,
            kind=kind,
            severity=severity,
            summary=summary,
            station_id=station_id,
            pump_id=pump_id,
            first_raised=wall,
            last_raised=wall,
            details=details,
        )
        if recent is not None and recent[0].repeat_count:
            earlier = recent[0]
            alert.details[SUPPRESSED_EARLIER] = {
                "alert_id": earlier.alert_id,
                "repeat_count": earlier.repeat_count,
                "first_raised": iso_utc(earlier.first_raised),
                "last_raised": iso_utc(earlier.last_raised),
            }
        for name in self.settings.routing.get(severity, ()):
            channel = self._channels.get(name)
            if channel is not None:
                alert.deliveries[name] = Delivery(name, len(channel.recipients))

        self._forget_old(now)
        self._recent[key] = (alert, now)
        self._enqueue(alert, deliver=True)
        logger.log(
            logging.WARNING if SEVERITY_RANK[severity] >= 2 else logging.INFO,
            "alert %s %s (%s): %s [%s]",
            severity,
            kind,
            alert.where(),
            summary,
            ", ".join(alert.deliveries) or "recorded only",
        )

    def _is_repeat(
        self, recent: tuple[Alert, float], severity: Severity, now: float
    ) -> bool:
        alert, raised = recent
        if now - raised >= self.settings.suppress_window:
            return False
        return SEVERITY_RANK[severity] <= SEVERITY_RANK[alert.severity]

    def _count_repeat(self, alert: Alert, wall: dt.datetime) -> None:
        alert.repeat_count += 1
        alert.last_raised = wall
        self._suppressed += 1
        logger.debug(
            "alert %s %s repeated (%d repeats suppressed)",
            alert.kind,
            alert.alert_id,
            alert.repeat_count,
        )
        if not alert.save_queued and not self._intake.full():
            self._enqueue(alert, deliver=False)

    def _forget_old(self, now: float) -> None:
        window = self.settings.suppress_window
        stale = [k for k, (_, raised) in self._recent.items() if now - raised >= window]
        for key in stale:
            del self._recent[key]

    def _enqueue(self, alert: Alert, *, deliver: bool) -> None:
        alert.save_queued = True
        self._busy(1)
        self._intake.put_nowait((alert, deliver))

    def _drop(self, channel: str | None, what: str) -> None:
        self._dropped += 1
        self._last_drop = self.clock.monotonic()
        if channel is not None:
            self._states[channel].dropped += 1
        if self._dropped % LOG_DROPS_EVERY == 1:
            queue = f"the {channel} queue" if channel else "the alert queue"
            logger.error(
                "alerts: %s is full (%d); dropped %s (%d dropped so far)",
                queue,
                self.settings.queue_size,
                what,
                self._dropped,
            )

    # -- the intake and the channels ------------------------------------------

    async def _run_intake(self) -> None:
        while True:
            alert, deliver = await self._intake.get()
            try:
                alert.save_queued = False
                if deliver:
                    for name in alert.deliveries:
                        self._route(name, alert)
                await self._save(alert)
            except Exception:
                logger.exception("alerts: could not handle alert %s", alert.alert_id)
            finally:
                self._busy(-1)

    def _route(self, name: str, alert: Alert) -> None:
        queue = self._queues[name]
        if queue.full():
            self._drop(name, f"{alert.severity} {alert.kind} {alert.alert_id}")
            delivery = alert.deliveries[name]
            delivery.status = "failed"
            delivery.attempts.append(
                Attempt(self.clock.utcnow(), False, "not tried: the queue was full")
            )
            return
        self._states[name].pending += 1
        self._busy(1)
        rank = -SEVERITY_RANK[alert.severity]
        queue.put_nowait((rank, next(self._order), alert))

    async def _run_channel(self, name: str) -> None:
        queue = self._queues[name]
        channel = self._channels[name]
        while True:
            _, _, alert = await queue.get()
            try:
                await self._deliver(channel, alert)
            except Exception:
                logger.exception(
                    "alerts: delivering %s on %s failed unexpectedly",
                    alert.alert_id,
                    name,
                )
            finally:
                self._states[name].pending -= 1
                self._busy(-1)

    async def _deliver(self, channel: Channel, alert: Alert) -> None:
        retry = self.settings.retry
        delivery = alert.deliveries[channel.name]
        remaining = list(channel.recipients)
        detail = ""

        for attempt in range(1, retry.attempts + 1):
            ok, detail, remaining = await self._attempt(
                channel, alert, remaining, attempt
            )
            if ok:
                await self._finish(channel.name, alert, delivery, None)
                return

            if attempt < retry.attempts:
                wait = retry.backoff(attempt)
                logger.warning(
                    "alert %s: %s attempt %d of %d failed (%s); next in %g s",
                    alert.alert_id,
                    channel.name,
                    attempt,
                    retry.attempts,
                    detail,
                    wait,
                )
                await self._save(alert)
                await asyncio.sleep(wait)

        await self._finish(channel.name, alert, delivery, None)

    async def _attempt(
        self, channel: Channel, alert: Alert, recipients: Sequence[str], attempt: int
    ) -> tuple[bool, str, list[str]]:
        """One try: (delivered to all, what happened, recipients still to reach)."""
        delivery = alert.deliveries[channel.name]
        at = self.clock.utcnow()
        timeout = self.settings.timeout
        try:
            async with asyncio.timeout(timeout):
                failed = dict(await channel.send(alert, recipients, attempt))
        except DeliveryError as exc:
            failed = {recipient: str(exc) for recipient in recipients}
        except TimeoutError:
            failed = {r: f"no answer within {timeout:g} s" for r in recipients}
        except Exception as exc:
            logger.exception("alerts: %s channel failed unexpectedly", channel.name)
            failed = {r: f"unexpected error: {exc!r}" for r in recipients}

        state = self._states[channel.name]
        left = [recipient for recipient in recipients if recipient in failed]
        if not left:
            detail = f"delivered to {len(recipients)} recipient(s)"
            delivery.attempts.append(Attempt(at, True, detail))
            state.last_success = at
            return True, detail, left

        reasons = dict.fromkeys(failed[r] for r in left)
        detail = "; ".join(reasons)
        if len(left) < len(recipients):
            detail = f"{len(left)} of {len(recipients)} recipient(s) failed: {detail}"
        delivery.attempts.append(Attempt(at, False, detail))
        state.last_failure = at
        state.last_error = detail
        return False, detail, left

    async def _finish(
        self, name: str, alert: Alert, delivery: Delivery, user: str | None
    ) -> None:
        """Settle a delivery by its last attempt; record it with its audit row."""
        last = delivery.attempts[-1]
        tries = len(delivery.attempts)
        severity: Severity = "LOW" if last.ok else "HIGH"
        event_type = ALERT_SENT if last.ok else ALERT_DELIVERY_FAILED
        if last.ok:
            delivery.status = "sent"
            delivery.sent_at = last.at
            self._states[name].sent += 1
            logger.info(
                "alert %s %s sent by %s after %d attempt(s)",
                alert.severity,
                alert.alert_id,
                name,
                tries,
            )
        else:
            delivery.status = "failed"
            self._states[name].failed += 1
            logger.error(
                "alert %s %s (%s) NOT delivered by %s after %d attempt(s): %s",
                alert.severity,
                alert.alert_id,
                alert.kind,
                name,
                tries,
                last.detail,
            )

        record = AuditRecord(
            event_type=event_type,
            severity=severity,
            timestamp=last.at,
            user=user,
            protocol="alerts",
            station_id=alert.station_id,
            pump_id=alert.pump_id,
            outcome=delivery.status,
            details={
                "alert_id": alert.alert_id,
                "kind": alert.kind,
                "alert_severity": alert.severity,
                "channel": name,
                "attempts": tries,
                "recipients": delivery.recipients,
                "detail": last.detail,
                "test": alert.kind == TEST_KIND,
            },
        )
        await self._save(alert, [record])

    async def _save(self, alert: Alert, extra: Sequence[Record] = ()) -> None:
        records: list[Record] = [alert.record(), *extra]
        try:
            async with asyncio.timeout(SAVE_TIMEOUT):
                await self.storage.write(records)
        except (StorageError, TimeoutError) as exc:
            logger.error(
                "alerts: could not record alert %s (%s): %s",
                alert.alert_id,
                ", ".join(type(r).__name__ for r in records),
                exc or "timed out",
            )

    def _busy(self, change: int) -> None:
        self._outstanding += change
        if self._outstanding <= 0:
            self._outstanding = 0
            self._idle.set()
        else:
            self._idle.clear()

    async def wait_idle(self, timeout: float) -> None:
        """Wait until every queued alert is recorded and delivered or failed.

        Raises TimeoutError after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                await self._idle.wait()
                await asyncio.sleep(0)
                if self._idle.is_set():
                    return

    # -- the test alert --------------------------------------------------------

    async def send_test(
        self, *, user: str | None = None, source: str | None = None
    ) -> tuple[str, dict[str, ChannelResult]]:
        """Send a test alert once through every enabled channel, now.

        Not suppressed, queued or retried: each channel gets one attempt
        (bounded by ``timeout``), recorded like any delivery. Returns the
        alert id and the result of every channel, enabled or not.
        """
        wall = self.clock.utcnow()
        alert = Alert(
            alert_id=uuid.uuid4().hex,
            kind=TEST_KIND,
            severity="LOW",
            summary=(
                f"test alert from the Calejo Control Adapter on {self.adapter}, "
                f"requested by {user or 'an unknown user'}"
            ),
            station_id=None,
            pump_id=None,
            first_raised=wall,
            last_raised=wall,
            details={"requested_by": user, "source_address": source},
        )
        for name, channel in self._channels.items():
            alert.deliveries[name] = Delivery(name, len(channel.recipients))
        await self._save(alert)

        async def one(channel: Channel) -> tuple[str, ChannelResult]:
            recipients = list(channel.recipients)
            ok, detail, _ = await self._attempt(channel, alert, recipients, 1)
            await self._finish(
                channel.name, alert, alert.deliveries[channel.name], user
            )
            return channel.name, ChannelResult(True, ok, detail)

        done = dict(await asyncio.gather(*(one(c) for c in self._channels.values())))
        results = {
            name: done.get(name)
            or ChannelResult(False, None, f"{name} is not enabled in alerts.{name}")
            for name in CHANNELS
        }
        return alert.alert_id, results

    # -- certificates ----------------------------------------------------------

    async def _watch_certificates(self) -> None:
        interval = self.settings.certificates.check_interval
        while True:
            try:
                await self.check_certificates()
            except Exception:
                logger.exception("alerts: the certificate check failed")
            await asyncio.sleep(interval)

    async def check_certificates(self) -> list[CertificateCheck]:
        """Look at every certificate now; raise alerts for those near expiry."""
        now = self.clock.utcnow()
        checks = await asyncio.to_thread(self._read_certificates, now)
        for check in checks:
            args = certificate_alert(check, self.settings.certificates)
            if args is not None:
                self._raise_args(args)
        self.last_certificate_checks = checks
        return checks

    def _read_certificates(self, now: dt.datetime) -> list[CertificateCheck]:
        checks = []
        for name, path in self.certificates.items():
            check = check_certificate(name, path, now)
            if check is not None:
                checks.append(check)
        return checks

    # -- health ----------------------------------------------------------------

    def health(self) -> ComponentHealth:
        """ok, degraded (a channel's last attempt failed, alerts dropped),
        or not_configured (no channel enabled: alerts are recorded only)."""
        channels = {name: state.to_dict() for name, state in self._states.items()}
        data: dict[str, Any] = {
            "channels": channels,
            "queued": self._intake.qsize(),
            "raised": self._raised,
            "suppressed": self._suppressed,
            "dropped": self._dropped,
            "suppress_window": self.settings.suppress_window,
        }
        if self.last_certificate_checks:
            data["certificates"] = {
                check.name: check.to_dict() for check in self.last_certificate_checks
            }

        dead = [t.get_name() for t in self._tasks if t.done()]
        if self._running and dead:
            return ComponentHealth(
                "degraded", f"alert tasks stopped: {', '.join(dead)}", data
            )

        failing = [
            f"{name}: {state.last_error}"
            for name, state in self._states.items()
            if state.enabled and state.failing
        ]
        if failing:
            return ComponentHealth(
                "degraded", "last delivery failed on " + "; ".join(failing), data
            )
        last_drop = self._last_drop
        if last_drop is not None and self.clock.monotonic() - last_drop < DROP_MEMORY:
            return ComponentHealth(
                "degraded",
                f"{self._dropped} alert(s) dropped so far, the last within "
                f"{DROP_MEMORY:g} s: a queue was full",
                data,
            )
        if not self._channels:
            return ComponentHealth(
                "not_configured",
                "no alert channel is enabled; alerts are recorded only",
                data,
                critical=False,
            )
        return ComponentHealth(
            "ok", f"channels {', '.join(self._channels)} delivering", data
        )


def _severity(value: str) -> Severity:
    text = value.upper() if isinstance(value, str) else ""
    for severity in SEVERITIES:
        if severity == text:
            return severity
    raise ValueError(
        f"alert severity: expected one of {', '.join(SEVERITIES)}, got {value!r}"
    )
