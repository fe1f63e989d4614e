"""``calejo compliance-report``: each control computed from what is there.

A compliant site is built once for the module by the real parts: an
adapter started and stopped (users, roles, audit rows, the REST
certificate), ``calejo certs generate`` (the OPC UA certificate) and a
verified database backup. Each test copies it, turns one thing off (in the
configuration or the database) and sees the control it belongs to
reported as not met, with the values read as evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import yaml

from calejo_server import audit
from calejo_server.app import Adapter
from calejo_server.config import Config, load_config
from calejo_server.ops import certs as ops_certs
from calejo_server.ops import compliance
from calejo_server.ops.backup import Actor, run_backup
from calejo_server.storage import open_storage
from calejo_server.storage.base import AuditQuery, RoleRecord, Storage, UserRecord
from tests.server.conftest import adapter_env, free_port, run_calejo
from tests.server.storage.conftest import (  # the storage tests' fixtures
    postgres_database,
    postgres_server,
    postgres_url,
)

__all__ = ["postgres_database", "postgres_server", "postgres_url"]

T = TypeVar("T")
TIMEOUT = 60.0
ACTOR = Actor("cli:compliance-test", "CLI")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


def site_document(root: Path) -> dict[str, Any]:
    """A configuration that meets every control."""
    return {
        "server": {
            "bind": "127.0.0.1",
            "data_dir": str(root / "data"),
            "http_port": free_port(),
            "modbus_port": free_port(),
            "opcua_port": free_port(),
        },
        "security": {"admin_password": "correct-horse-battery-staple"},
        "stations": [
            {
                "station_id": "north",
                "pumps": [
                    {
                        "pump_id": "p1",
                        "min_value": 20,
                        "max_value": 50,
                        "max_rate": 0.5,
                        "failsafe_value": 35,
                    }
                ],
            }
        ],
        "tls": {"enabled": True},
        "opcua": {"security_modes": ["SignAndEncrypt"]},
        "alerts": {
            "webhook": {
                "enabled": True,
                "url": "http://127.0.0.1:9/calejo",
                "secret": "a-secret-of-some-length",
            },
            "routing": {"CRITICAL": [], "HIGH": [], "MEDIUM": [], "LOW": []},
        },
        "backup": {"enabled": False, "folder": str(root / "backups")},
    }


def write_config(root: Path, document: dict[str, Any]) -> Path:
    path = root / "calejo.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Storage]:
    storage = open_storage(config.database.url, config.server.data_dir)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


async def _build(config: Config) -> None:
    adapter = Adapter(config, out=io.StringIO())
    await adapter.start()
    await adapter.stop()
    await asyncio.to_thread(ops_certs.generate, config)
    async with opened(config) as storage:
        folder = compliance.backup_folder(config)
        await run_backup("database", config, storage, folder / "database", actor=ACTOR)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compliant site, built once; tests work on copies."""
    root = tmp_path_factory.mktemp("site")
    path = write_config(root, site_document(root))
    run(_build(load_config(path, environ={})))
    return root


@dataclasses.dataclass
class Site:
    root: Path
    document: dict[str, Any]

    @property
    def config_file(self) -> Path:
        return self.root / "calejo.yaml"

    def config(self, **sections: Any) -> Config:
        """The configuration, with ``sections`` merged in (one level deep)."""
        document = json.loads(json.dumps(self.document))
        for name, values in sections.items():
            document.setdefault(name, {}).update(values)
        write_config(self.root, document)
        return load_config(self.config_file, environ={})

    @property
    def database(self) -> Path:
        return self.root / "data" / "calejo.db"


@pytest.fixture
def copy(site: Path, tmp_path: Path) -> Site:
    """A copy of the compliant site, its configuration pointing at the copy."""
    root = tmp_path / "site"
    shutil.copytree(site, root)
    document = yaml.safe_load((root / "calejo.yaml").read_text(encoding="utf-8"))
    document["server"]["data_dir"] = str(root / "data")
    document["backup"]["folder"] = str(root / "backups")
    write_config(root, document)
    return Site(root, document)


def report(
    config: Config, standard: str = "iec62443", now: dt.datetime | None = None
) -> compliance.Report:
    async def main() -> compliance.Report:
        async with opened(config) as storage:
            facts = await compliance.gather(config, storage, now=now)
        return compliance.evaluate(facts, standard)

    return run(main())


def row(result: compliance.Report, control: str) -> compliance.Row:
    (found,) = [r for r in result.rows if r.id == control]
    return found


def not_met(result: compliance.Report) -> list[str]:
    return result.not_met()


# All met.


def test_the_compliant_site_meets_every_control(copy: Site) -> None:
    result = report(copy.config())

    assert result.ok, [(r.id, r.evidence) for r in result.rows if r.status != "met"]
    assert [r.id for r in result.rows] == [c.sr for c in compliance.CONTROLS]
    assert (
        "lockout_threshold=5, lockout_duration=900 s"
        in row(result, "SR 1.11").evidence[0]
    )
    protection = row(result, "SR 3.9").evidence[0]
    assert "audit chain intact:" in protection
    assert "refusing DELETE, UPDATE" in protection
    assert "verified" in row(result, "SR 7.3").evidence[0]


def test_iso_view_groups_the_checks_by_annex_a_control(copy: Site) -> None:
    result = report(copy.config(security={"lockout_threshold": 1000}), "iso27001")

    ids = [r.id for r in result.rows]
    assert ids == sorted(
        compliance.ISO_TITLES, key=lambda c: tuple(map(int, c[2:].split(".")))
    )
    assert not_met(result) == ["A.8.5"]
    secure = row(result, "A.8.5")
    assert [c for c, _ in secure.counterparts] == ["SR 1.11", "SR 2.6"]
    assert secure.evidence[0].startswith("SR 1.11: lockout_threshold=1000")
    logging_row = row(result, "A.8.15")
    assert [c for c, _ in logging_row.counterparts] == ["SR 2.8", "SR 2.9", "SR 3.9"]
    assert logging_row.status == "met"


# Turned off in the configuration.


@pytest.mark.parametrize(
    ("sections", "control", "evidence"),
    [
        (
            {"security": {"lockout_threshold": 1000}},
            "SR 1.11",
            "lockout_threshold=1000",
        ),
        ({"security": {"lockout_duration": 30}}, "SR 1.11", "lockout_duration=30 s"),
        (
            {"security": {"token_idle_timeout": 7200, "token_absolute_timeout": 7200}},
            "SR 2.6",
            "token_idle_timeout=7200 s",
        ),
        ({"opcua": {"allow_anonymous": True}}, "SR 1.1", "allow_anonymous=true"),
        (
            {"opcua": {"security_modes": ["Sign", "SignAndEncrypt"]}},
            "SR 4.1",
            "mode Sign carry values unencrypted",
        ),
        (
            {"alerts": {"webhook": {"enabled": False}}},
            "SR 6.2",
            "webhook disabled",
        ),
    ],
)
def test_a_setting_turned_off_is_one_control_not_met(
    copy: Site, sections: dict[str, Any], control: str, evidence: str
) -> None:
    result = report(copy.config(**sections))

    assert not_met(result) == [control]
    assert evidence in row(result, control).evidence[0]


def test_a_none_endpoint_breaks_integrity_and_confidentiality(copy: Site) -> None:
    result = report(copy.config(opcua={"allow_none_endpoint": True}))

    assert not_met(result) == ["SR 3.1", "SR 4.1"]
    assert "allow_none_endpoint=true" in row(result, "SR 3.1").evidence[0]
    assert "security None" in row(result, "SR 4.1").evidence[0]


def test_plain_http_breaks_integrity_and_confidentiality(copy: Site) -> None:
    result = report(copy.config(tls={"enabled": False}))

    assert not_met(result) == ["SR 3.1", "SR 4.1"]
    assert "tls.enabled=false" in row(result, "SR 3.1").evidence[0]


def test_a_configuration_others_may_write_is_not_met(copy: Site) -> None:
    config = copy.config()
    copy.config_file.chmod(0o666)

    result = report(config)

    assert not_met(result) == ["SR 7.6"]
    assert "mode 0666" in row(result, "SR 7.6").evidence[0]


def test_the_demonstration_configuration_is_not_met(copy: Site) -> None:
    config = dataclasses.replace(copy.config(), source=None, demo=True)

    result = report(config)

    assert "SR 7.6" in not_met(result)
    assert "demonstration" in row(result, "SR 7.6").evidence[0]


# Turned off in the database and the folders.


def test_a_tampered_audit_row_breaks_the_chain(copy: Site) -> None:
    config = copy.config()
    con = sqlite3.connect(copy.database)
    (sql,) = con.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'compliance_audit_log_no_update'"
    ).fetchone()
    con.execute("DROP TRIGGER compliance_audit_log_no_update")
    con.execute("UPDATE compliance_audit_log SET user_name = 'mallory' WHERE id = 2")
    con.execute(sql)
    con.commit()
    con.close()

    result = report(config)

    assert not_met(result) == ["SR 3.9"]
    assert "audit chain broken at row id 2" in row(result, "SR 3.9").evidence[0]


def test_a_dropped_trigger_is_not_met(copy: Site) -> None:
    config = copy.config()
    con = sqlite3.connect(copy.database)
    con.execute("DROP TRIGGER compliance_audit_log_no_delete")
    con.commit()
    con.close()

    result = report(config)

    assert not_met(result) == ["SR 3.9"]
    assert "accepts DELETE" in row(result, "SR 3.9").evidence[0]


def test_no_backup_in_the_folder_is_not_met(copy: Site) -> None:
    config = copy.config()
    shutil.rmtree(copy.root / "backups")

    result = report(config)

    assert not_met(result) == ["SR 7.3"]
    assert "no backup archive in" in row(result, "SR 7.3").evidence[0]


def test_an_archive_changed_after_verification_is_not_met(copy: Site) -> None:
    config = copy.config()
    (archive,) = (copy.root / "backups" / "database").iterdir()
    with archive.open("ab") as handle:
        handle.write(b"\0")

    result = report(config)

    assert not_met(result) == ["SR 7.3"]
    assert "with the digest it has now" in row(result, "SR 7.3").evidence[0]


def test_an_old_backup_is_not_met(copy: Site) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=30)

    result = report(copy.config(), now=later)

    assert "SR 7.3" in not_met(result)
    assert "more than 26 h" in row(result, "SR 7.3").evidence[0]


def test_a_weak_hash_and_a_name_differing_in_case(copy: Site) -> None:
    config = copy.config()
    now = dt.datetime.now(dt.UTC)
    legacy = UserRecord(
        user_id="legacy-1",
        username="Admin",
        email="legacy@example.org",
        role="operator",
        password_hash="$2b$12$" + "a" * 53,
        active=True,
        must_change_password=False,
        failed_logins=0,
        locked_until=None,
        created_at=now,
        updated_at=now,
    )

    async def add() -> None:
        async with opened(config) as storage:
            await storage.write([legacy])

    run(add())
    result = report(config)

    assert not_met(result) == ["SR 1.1", "SR 1.7"]
    assert "Admin" in row(result, "SR 1.1").evidence[0]
    assert "not argon2id: Admin" in row(result, "SR 1.7").evidence[0]


def test_a_viewer_that_may_write_setpoints_is_not_least_privilege(copy: Site) -> None:
    config = copy.config()

    async def widen() -> None:
        async with opened(config) as storage:
            await storage.write(
                [RoleRecord("viewer", ("read_pump_status", "write_setpoints"))]
            )

    run(widen())
    result = report(config)

    assert not_met(result) == ["SR 2.1"]
    assert "role viewer also holds write_setpoints" in row(result, "SR 2.1").evidence[0]


def test_a_private_key_others_may_read_is_not_met(copy: Site) -> None:
    config = copy.config()
    (copy.root / "data" / "certs" / "server.key").chmod(0o644)

    result = report(config)

    assert not_met(result) == ["SR 1.9"]
    assert "mode 0644" in row(result, "SR 1.9").evidence[0]


def test_an_empty_database_records_nothing(tmp_path: Path) -> None:
    path = write_config(tmp_path, site_document(tmp_path))

    result = report(load_config(path, environ={}))

    assert {"SR 1.1", "SR 2.8", "SR 1.9", "SR 7.3"} <= set(not_met(result))
    assert "the audit log is empty" in row(result, "SR 2.8").evidence[0]


# The command.


def test_the_command_exits_0_when_met_1_when_not_and_is_audited(
    copy: Site, tmp_path: Path
) -> None:
    copy.config()
    env = adapter_env(copy.root / "data")
    output = tmp_path / "report.json"

    met = run_calejo(
        [
            "compliance-report",
            "--standard",
            "iso27001",
            "--format",
            "json",
            "--output",
            str(output),
            "--config",
            str(copy.config_file),
        ],
        env,
    )
    assert met.returncode == 0, met.stdout + met.stderr
    document = json.loads(output.read_text(encoding="utf-8"))
    assert document["summary"]["not_met"] == 0
    assert document["standard"] == "iso27001"

    copy.config(security={"lockout_threshold": 1000})
    unmet = run_calejo(
        [
            "compliance-report",
            "--standard",
            "iec62443",
            "--config",
            str(copy.config_file),
        ],
        env,
    )
    assert unmet.returncode == 1, unmet.stdout + unmet.stderr
    assert "| SR 1.11 | Unsuccessful login attempts | NOT MET |" in unmet.stdout
    assert "lockout_threshold=1000" in unmet.stdout

    async def rows() -> list[Any]:
        config = load_config(copy.config_file, environ={})
        async with opened(config) as storage:
            return await storage.audit_query(
                AuditQuery(event_type=audit.COMPLIANCE_REPORT)
            )

    first, second = run(rows())
    assert first.record.outcome == "met"
    assert first.record.details["standard"] == "iso27001"
    assert first.record.details["output"] == str(output)
    assert second.record.outcome == "not_met"
    assert second.record.details["not_met"] == ["SR 1.11"]
    assert second.record.user and second.record.user.startswith("cli:")

    verified = run_calejo(["audit", "verify", "--config", str(copy.config_file)], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_standard_is_required(copy: Site) -> None:
    result = run_calejo(
        ["compliance-report", "--config", str(copy.config_file)],
        adapter_env(copy.root / "data"),
    )

    assert result.returncode == 2
    assert "--standard" in result.stderr


# PostgreSQL: the triggers in the catalog.


@pytest.mark.postgres
def test_postgresql_triggers_are_read_from_the_catalog(
    copy: Site, postgres_url: str
) -> None:
    config = copy.config(database={"url": postgres_url})

    async def populate() -> None:
        async with opened(config) as storage:
            await storage.write(
                [
                    audit_row(audit.ADAPTER_STARTED),
                    audit_row(audit.USER_CREATED),
                ]
            )

    run(populate())
    first = report(config)
    assert row(first, "SR 3.9").status == "met", row(first, "SR 3.9").evidence
    assert "refusing DELETE, TRUNCATE, UPDATE" in row(first, "SR 3.9").evidence[0]

    async def disable() -> None:
        conn = await asyncpg.connect(compliance.postgres_dsn(postgres_url))
        try:
            await conn.execute(
                "ALTER TABLE compliance_audit_log "
                "DISABLE TRIGGER compliance_audit_log_no_truncate"
            )
        finally:
            await conn.close()

    run(disable())
    second = report(config)
    assert row(second, "SR 3.9").status == "not_met"
    assert "accepts TRUNCATE" in row(second, "SR 3.9").evidence[0]
    assert "the database's own disk" in row(second, "SR 2.9").evidence[0]


def audit_row(event_type: str) -> Any:
    from calejo_server.storage.base import AuditRecord

    return AuditRecord(event_type, audit.severity_of(event_type), user="test")
