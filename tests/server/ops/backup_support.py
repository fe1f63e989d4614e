"""Shared helpers of the backup tests: the command, a populated adapter, tables.

``populate`` drives a real adapter over its REST API (users, logins, a
failed login, setpoints, a plan, emergency stops); ``table_rows`` reads
every table of a database straight from its catalog, independently of
the backup code, and ``neutral_rows`` turns them into values that compare
equal across SQLite and PostgreSQL (times as aware datetimes, JSON text
as documents, booleans as 0 and 1).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import yaml

REPO = Path(__file__).resolve().parents[3]
CALEJO = Path(sys.executable).parent / "calejo"
ADMIN_PASSWORD = "correct-horse-battery-staple"
OPERATOR_PASSWORD = "pumps-run-all-night-7"
TIMEOUT = 120.0


def calejo(
    args: list[str],
    env: Mapping[str, str],
    *,
    stdin: str | None = "",
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``.venv/bin/calejo ARGS`` to completion (bounded)."""
    return subprocess.run(
        [str(CALEJO), *args],
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def pump(pump_id: str, **limits: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "pump_id": pump_id,
        "min_value": 20,
        "max_value": 50,
        "max_rate": float("inf"),
        "failsafe_value": 35,
    }
    entry.update(limits)
    return entry


def config_text(backup: dict[str, Any] | None = None, **sections: Any) -> str:
    """A configuration: north (p1, p2) and south (s1), OPC UA off."""
    document: dict[str, Any] = {
        "stations": [
            {"station_id": "north", "pumps": [pump("p1"), pump("p2")]},
            {"station_id": "south", "pumps": [pump("s1", min_value=10)]},
        ],
        "opcua": {"enabled": False},
        "backup": backup if backup is not None else {"enabled": False},
    }
    document.update(sections)
    return yaml.safe_dump(document)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ok(response: httpx.Response, *codes: int) -> dict[str, Any]:
    assert response.status_code in (codes or (200,)), response.text
    body = response.json() if response.content else {}
    assert isinstance(body, dict)
    return body


def populate(api: str) -> dict[str, Any]:
    """Users, a failed login, setpoints, a plan and emergency stops; what was set."""
    with httpx.Client(base_url=api, timeout=20.0) as client:
        admin = _ok(
            client.post(
                "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
        )["access_token"]
        _ok(
            client.post(
                "/users",
                json={
                    "username": "olga",
                    "email": "olga@example.org",
                    "role": "operator",
                    "password": OPERATOR_PASSWORD,
                },
                headers=auth(admin),
            ),
            201,
        )
        _ok(
            client.post(
                "/users",
                json={"username": "vic", "email": "vic@example.org", "role": "viewer"},
                headers=auth(admin),
            ),
            201,
        )
        refused = client.post(
            "/auth/login", json={"username": "olga", "password": "not-her-password"}
        )
        assert refused.status_code == 401, refused.text
        olga = _ok(
            client.post(
                "/auth/login",
                json={"username": "olga", "password": OPERATOR_PASSWORD},
            )
        )["access_token"]

        setpoints = {("north", "p1"): 42.5, ("north", "p2"): 30.25, ("south", "s1"): 99}
        for (station, pump_id), value in setpoints.items():
            _ok(
                client.put(
                    f"/pump-stations/{station}/pumps/{pump_id}/setpoint",
                    json={"value": value},
                    headers=auth(olga),
                )
            )

        start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        plan = {
            "plan_id": "night-1",
            "version": 3,
            "pumps": [
                {
                    "station_id": "north",
                    "pump_id": "p1",
                    "intervals": [
                        {
                            "start": start.isoformat(),
                            "end": (start + dt.timedelta(minutes=30)).isoformat(),
                            "setpoint": 33.3,
                        }
                    ],
                }
            ],
        }
        _ok(client.post("/plans", json=plan, headers=auth(admin)), 201)

        stop = {"reason": "wet well flooding drill", "operator": "olga"}
        _ok(
            client.post(
                "/pump-stations/south/emergency-stop", json=stop, headers=auth(olga)
            )
        )
        pump_stop = "/pump-stations/north/pumps/p2/emergency-stop"
        _ok(client.post(pump_stop, json=stop, headers=auth(olga)))
        _ok(client.request("DELETE", pump_stop, json=stop, headers=auth(admin)))
    return {"setpoints": setpoints}


# ---------------------------------------------------------------------------
# Tables, read without the backup code.


def table_rows(
    database_url: str | None, data_dir: Path
) -> dict[str, list[tuple[Any, ...]]]:
    """Every table and its rows (sorted), straight from the database."""
    if database_url is None:
        return _sqlite_rows(data_dir / "calejo.db")
    return asyncio.run(asyncio.wait_for(_postgres_rows(database_url), 60))


def _sqlite_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = sqlite3.connect(path)
    try:
        names = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            name: sorted(con.execute(f'SELECT * FROM "{name}"').fetchall(), key=repr)
            for name in names
        }
    finally:
        con.close()


async def _postgres_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        names = [
            r[0]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        ]
        result = {}
        for name in names:
            rows = await conn.fetch(f'SELECT * FROM "{name}"')
            result[name] = sorted((tuple(r) for r in rows), key=repr)
        return result
    finally:
        await conn.close()


def _neutral(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, list):
        return [_neutral(v) for v in value]
    if isinstance(value, str):
        if value[:1] in ("{", "["):
            try:
                return json.loads(value)
            except ValueError:
                return value
        if len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
            try:
                moment = dt.datetime.fromisoformat(value)
            except ValueError:
                return value
            return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return value


def neutral_rows(
    tables: Mapping[str, list[tuple[Any, ...]]],
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows with values both backends agree on, sorted again."""
    return {
        name: sorted((tuple(_neutral(v) for v in row) for row in rows), key=_canonical)
        for name, rows in tables.items()
    }


def _canonical(row: tuple[Any, ...]) -> str:
    return json.dumps(row, sort_keys=True, default=repr)


def audit_events(rows: list[tuple[Any, ...]]) -> list[str]:
    """The event types of compliance_audit_log rows, by id (column 5)."""
    return [row[4] for row in sorted(rows, key=lambda r: r[0])]
