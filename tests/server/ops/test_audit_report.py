"""``calejo audit report`` and ``calejo audit compliance`` over an audit log
written with known times (SQLite; the guide's test reads PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest

from calejo_server import audit, cli
from calejo_server.ops.audit_report import moment
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditRecord

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def record(
    event: str, hours_ago: float, *, outcome: str | None = None, **details: object
) -> AuditRecord:
    return AuditRecord(
        event_type=event,
        severity=audit.severity_of(event),
        timestamp=NOW - dt.timedelta(hours=hours_ago),
        user="alice" if event != audit.INVALID_AUTHENTICATION else None,
        source_address="10.0.0.7",
        protocol="REST",
        station_id="north" if "STOP" in event or "SETPOINT" in event else None,
        outcome=outcome,
        details=dict(details),
    )


def write(data: Path, records: list[AuditRecord]) -> None:
    async def main() -> None:
        storage = open_storage(None, data)
        await storage.open()
        try:
            await storage.write(records)
        finally:
            await storage.close()

    asyncio.run(main())


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "data"
    monkeypatch.delenv("CALEJO_CONFIG", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("CALEJO_DATA_DIR", str(folder))
    return folder


def test_spans_and_times_are_read() -> None:
    assert moment("24h", NOW) == NOW - dt.timedelta(hours=24)
    assert moment("2w", NOW) == NOW - dt.timedelta(weeks=2)
    assert moment("2026-01-31T12:00:00").tzinfo == dt.UTC
    with pytest.raises(Exception, match="24h, 7d or 2w"):
        moment("yesterday")


def test_the_report_counts_and_lists_a_period(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        data,
        [
            record(audit.ADAPTER_STARTED, 48),
            record(audit.INVALID_AUTHENTICATION, 30, outcome="denied"),
            record(audit.LOGIN_SUCCESS, 5, outcome="ok"),
            record(audit.INVALID_AUTHENTICATION, 4, outcome="denied", reason="bad"),
            record(audit.ACCESS_DENIED, 3, outcome="denied", path="/api/v1/users"),
            record(audit.SETPOINT_CHANGED, 2, outcome="accepted"),
            record(audit.EMERGENCY_STOP_ACTIVATED, 1, reason="flood"),
            record(audit.FAILSAFE_ENTERED, 1),
            record(audit.USER_CREATED, 0.5, username="olivia"),
        ],
    )

    code = cli.main(["audit", "report", "--since", "24h", "--format", "json"])
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    assert document["rows"] == 7
    assert document["chain"]["ok"] is True
    assert document["by_event_type"]["INVALID_AUTHENTICATION"] == 1
    assert document["by_severity"]["CRITICAL"] == 2
    lists = document["lists"]
    assert [r["details"]["reason"] for r in lists["failed logins"]] == ["bad"]
    assert [r["event_type"] for r in lists["refused requests"]] == ["ACCESS_DENIED"]
    assert [r["event_type"] for r in lists["emergency stops"]] == [
        "EMERGENCY_STOP_ACTIVATED"
    ]
    assert [r["event_type"] for r in lists["other HIGH and CRITICAL events"]] == [
        "FAILSAFE_ENTERED"
    ]

    code = cli.main(["audit", "report", "--since", "72h", "--limit", "1"])
    text = capsys.readouterr().out
    assert code == 0
    assert "## Failed logins (2)" in text
    assert "... and 1 more (raise --limit)" in text
    assert "- Hash chain of the whole log: intact: 9 rows verified" in text


def test_compliance_evidence_needs_backups_every_26_hours(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verified = [
        record(audit.BACKUP_VERIFIED, hours, kind="full") for hours in (70, 50, 26, 2)
    ]
    reports = [
        AuditRecord(
            event_type=audit.COMPLIANCE_REPORT,
            severity="LOW",
            timestamp=NOW - dt.timedelta(hours=1),
            outcome="met",
            details={"standard": "iec62443", "not_met": []},
        )
    ]
    write(data, [record(audit.ADAPTER_STARTED, 72), *verified, *reports])

    code = cli.main(["audit", "compliance", "--since", "3d"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "| a verified full or database backup at least every 26 h | met |" in text
    assert "Result: 4 of 4 requirements met" in text

    # A later report that is not met.
    write(
        data,
        [
            AuditRecord(
                event_type=audit.COMPLIANCE_REPORT,
                severity="LOW",
                timestamp=NOW,
                outcome="not_met",
                details={"standard": "iso27001", "not_met": ["A.8.13"]},
            )
        ],
    )
    code = cli.main(["audit", "compliance", "--since", "5d", "--format", "json"])
    document = json.loads(capsys.readouterr().out)
    status = {r["name"]: r for r in document["requirements"]}
    assert code == 1
    backups = status["a verified full or database backup at least every 26 h"]
    assert backups["met"] is True
    latest = status[
        "a compliance report in the period, the latest of each standard met"
    ]
    assert latest["met"] is False
    assert "iso27001 (A.8.13)" in latest["evidence"]

    # Between the backups of 50 and 26 hours ago: none verified in 22 hours.
    code = cli.main(["audit", "compliance", "--since", "49h", "--until", "27h"])
    text = capsys.readouterr().out
    assert code == 1
    assert (
        "| a verified full or database backup at least every 26 h | NOT MET |" in text
    )


def test_a_broken_chain_fails_the_report(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    write(data, [record(audit.LOGIN_SUCCESS, 1), record(audit.LOGOUT, 0.5)])
    con = sqlite3.connect(data / "calejo.db")
    con.execute("DROP TRIGGER compliance_audit_log_no_update")
    con.execute("UPDATE compliance_audit_log SET user_name = 'mallory' WHERE id = 1")
    con.commit()
    con.close()

    code = cli.main(["audit", "report"])
    text = capsys.readouterr().out
    assert code == 1
    assert "BROKEN at row id 1" in text
