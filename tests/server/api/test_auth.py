"""Logins, tokens, lockout, throttling, users and roles over the REST API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from calejo_server.engine import ManualClock

from .conftest import API, ApiServer, assert_error, bearer

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
LOGIN = f"{API}/auth/login"
STATIONS = f"{API}/pump-stations"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def timed(make_server: Callable[..., ApiServer], clock: ManualClock) -> ApiServer:
    """A server whose directory reads the manual clock."""
    return make_server(clock=clock)


def login(
    api: ApiServer, username: str, password: str
) -> tuple[int, dict[str, object]]:
    response = api.client.post(LOGIN, json={"username": username, "password": password})
    return response.status_code, response.json()


def test_login_answers_a_bearer_token(api: ApiServer) -> None:
    response = api.client.post(
        LOGIN, json={"username": "admin", "password": api.admin_password}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert len(body["access_token"]) >= 43
    assert body["must_change_password"] is False
    assert "manage_users" in body["permissions"]
    assert (
        api.client.get(STATIONS, headers=bearer(body["access_token"])).status_code
        == 200
    )


def test_unknown_user_and_wrong_password_get_the_same_answer(api: ApiServer) -> None:
    api.add_user("viewer", "vera")

    unknown = api.client.post(
        LOGIN, json={"username": "nobody", "password": "whatever!"}
    )
    wrong = api.client.post(LOGIN, json={"username": "vera", "password": "whatever!"})

    assert_error(unknown, 401, "login_failed")
    assert_error(wrong, 401, "login_failed")
    assert unknown.json() == wrong.json()
    reasons = [
        e["details"]["reason"] for e in api.audit(event_type="INVALID_AUTHENTICATION")
    ]
    assert reasons[-2:] == ["unknown user", "wrong password"]


def test_five_failures_lock_the_account_for_fifteen_minutes(
    timed: ApiServer, clock: ManualClock
) -> None:
    api = timed
    _, name, password = api.add_user("operator", "olga")

    for _ in range(5):
        assert login(api, name, "not the password")[0] == 401

    status, body = login(api, name, password)
    assert status == 401
    assert body["error"] == "login_failed"
    locked = api.audit(event_type="ACCOUNT_LOCKED")
    assert len(locked) == 1
    assert locked[0]["user"] == "olga"
    assert locked[0]["severity"] == "HIGH"
    user = api.client.get(
        f"{API}/users/{api.users[name][0]}", headers=api.admin()
    ).json()
    assert user["locked_until"] is not None

    clock.advance(899)
    assert login(api, name, password)[0] == 401

    clock.advance(2)
    assert login(api, name, password)[0] == 200


def test_an_administrator_can_lift_a_lockout(timed: ApiServer) -> None:
    api = timed
    user_id, name, password = api.add_user("operator", "otto")
    for _ in range(5):
        login(api, name, "not the password")

    response = api.client.put(
        f"{API}/users/{user_id}", json={"locked": False}, headers=api.admin()
    )

    assert response.status_code == 200
    assert response.json()["locked_until"] is None
    assert login(api, name, password)[0] == 200


def test_a_source_with_too_many_failures_is_throttled(
    timed: ApiServer, clock: ManualClock
) -> None:
    api = timed
    admin = api.admin()

    for _ in range(21):
        assert login(api, "ghost", "wrong password")[0] == 401

    response = api.client.post(LOGIN, json={"username": "admin", "password": "x"})
    assert_error(response, 429, "too_many_requests")
    assert response.headers["retry-after"] == "60"
    right = api.client.post(
        LOGIN, json={"username": "admin", "password": api.admin_password}
    )
    assert_error(right, 429)
    assert_error(api.client.get(STATIONS), 429)
    assert api.client.get(STATIONS, headers=admin).status_code == 200
    throttled = api.audit(event_type="SOURCE_THROTTLED")
    assert len(throttled) == 1
    assert throttled[0]["source_address"] == "127.0.0.1"

    clock.advance(61)
    assert login(api, "admin", api.admin_password)[0] == 200


def test_tokens_expire_when_idle(timed: ApiServer, clock: ManualClock) -> None:
    api = timed
    headers = api.admin()

    clock.advance(899)
    assert api.client.get(STATIONS, headers=headers).status_code == 200
    clock.advance(899)
    assert api.client.get(STATIONS, headers=headers).status_code == 200
    clock.advance(901)

    assert_error(api.client.get(STATIONS, headers=headers), 401, "unauthorized")


def test_tokens_expire_after_twelve_hours_however_used(
    timed: ApiServer, clock: ManualClock
) -> None:
    api = timed
    token = api.login("admin", api.admin_password)
    used = 0.0

    while used + 850 < 43200:
        clock.advance(850)
        used += 850
        assert api.client.get(STATIONS, headers=bearer(token)).status_code == 200

    clock.advance(43200 - used)
    assert_error(api.client.get(STATIONS, headers=bearer(token)), 401)


def test_logout_revokes_the_token_at_once(api: ApiServer) -> None:
    token = api.login("admin", api.admin_password)
    other = api.login("admin", api.admin_password)

    response = api.client.post(f"{API}/auth/logout", headers=bearer(token))

    assert response.status_code == 204
    assert_error(api.client.get(STATIONS, headers=bearer(token)), 401)
    assert api.client.get(STATIONS, headers=bearer(other)).status_code == 200
    assert api.audit(event_type="LOGOUT")[-1]["user"] == "admin"


def test_deactivation_revokes_every_token_at_once(api: ApiServer) -> None:
    user_id, name, password = api.add_user("operator", "oscar")
    first = api.login(name, password)
    second = api.login(name, password)

    response = api.client.delete(f"{API}/users/{user_id}", headers=api.admin())

    assert response.status_code == 200
    assert response.json()["active"] is False
    for token in (first, second):
        assert_error(api.client.get(STATIONS, headers=bearer(token)), 401)
    assert login(api, name, password)[0] == 401
    deactivated = api.audit(event_type="USER_DEACTIVATED")
    assert deactivated[-1]["details"]["username"] == "oscar"


def test_a_one_time_password_must_be_changed_first(api: ApiServer) -> None:
    created = api.client.post(
        f"{API}/users",
        json={"username": "nina", "email": "nina@example.org", "role": "viewer"},
        headers=api.admin(),
    )
    assert created.status_code == 201
    initial = created.json()["initial_password"]
    assert created.json()["must_change_password"] is True
    assert len(initial) >= 12

    status, body = login(api, "nina", initial)
    assert status == 200
    assert body["must_change_password"] is True
    token = bearer(str(body["access_token"]))
    assert_error(
        api.client.get(STATIONS, headers=token), 403, "password_change_required"
    )

    change = f"{API}/auth/change-password"
    short = api.client.post(
        change, json={"old_password": initial, "new_password": "short"}, headers=token
    )
    assert "at least 12" in assert_error(short, 422)
    named = api.client.post(
        change,
        json={"old_password": initial, "new_password": "my-NINA-password-1"},
        headers=token,
    )
    assert "username" in assert_error(named, 422, "password_policy")
    wrong = api.client.post(
        change,
        json={"old_password": "not it at all", "new_password": "a fine new passphrase"},
        headers=token,
    )
    assert_error(wrong, 403, "wrong_password")

    done = api.client.post(
        change,
        json={"old_password": initial, "new_password": "a fine new passphrase"},
        headers=token,
    )
    assert done.status_code == 200
    assert done.json()["must_change_password"] is False
    assert api.client.get(STATIONS, headers=token).status_code == 200
    assert login(api, "nina", initial)[0] == 401
    assert login(api, "nina", "a fine new passphrase")[0] == 200
    assert api.audit(event_type="PASSWORD_CHANGED")[-1]["user"] == "nina"


def test_changing_the_password_revokes_the_other_tokens(api: ApiServer) -> None:
    _, name, password = api.add_user("viewer", "victor")
    current = api.login(name, password)
    other = api.login(name, password)

    response = api.client.post(
        f"{API}/auth/change-password",
        json={"old_password": password, "new_password": "another long passphrase"},
        headers=bearer(current),
    )

    assert response.status_code == 200
    assert api.client.get(STATIONS, headers=bearer(current)).status_code == 200
    assert_error(api.client.get(STATIONS, headers=bearer(other)), 401)


def test_an_administrator_reset_requires_a_change_and_revokes(api: ApiServer) -> None:
    user_id, name, password = api.add_user("viewer", "wanda")
    token = api.login(name, password)

    response = api.client.put(
        f"{API}/users/{user_id}",
        json={"password": "set by the administrator"},
        headers=api.admin(),
    )

    assert response.status_code == 200
    assert response.json()["must_change_password"] is True
    assert_error(api.client.get(STATIONS, headers=bearer(token)), 401)
    status, body = login(api, name, "set by the administrator")
    assert status == 200 and body["must_change_password"] is True


def test_user_fields_are_checked(api: ApiServer) -> None:
    admin = api.admin()
    cases = [
        ({"username": "ab", "email": "a@b.org", "role": "viewer"}, "username"),
        ({"username": "has space", "email": "a@b.org", "role": "viewer"}, "username"),
        ({"username": "fine", "email": "no-at-sign", "role": "viewer"}, "email"),
        ({"username": "fine", "email": "a@b.org", "role": "king"}, "role"),
        ({"username": "fine", "email": "a@b.org", "role": "viewer", "x": 1}, "x"),
        ({"email": "a@b.org", "role": "viewer"}, "username"),
        (
            {
                "username": "fine",
                "email": "a@b.org",
                "role": "viewer",
                "password": "short",
            },
            "password",
        ),
    ]
    for body, field in cases:
        detail = assert_error(
            api.client.post(f"{API}/users", json=body, headers=admin), 422
        )
        assert detail.startswith(f"field '{field}'"), detail

    assert len(api.client.get(f"{API}/users", headers=admin).json()["users"]) == 1


def test_usernames_are_unique_regardless_of_case(api: ApiServer) -> None:
    api.add_user("viewer", "Paula")

    response = api.client.post(
        f"{API}/users",
        json={"username": "paula", "email": "p@example.org", "role": "viewer"},
        headers=api.admin(),
    )

    assert "taken" in assert_error(response, 409, "conflict")


def test_the_last_administrator_cannot_be_removed(api: ApiServer) -> None:
    admin_id = api.client.get(f"{API}/users", headers=api.admin()).json()["users"][0][
        "user_id"
    ]

    assert_error(api.client.delete(f"{API}/users/{admin_id}", headers=api.admin()), 409)
    demote = api.client.put(
        f"{API}/users/{admin_id}", json={"role": "viewer"}, headers=api.admin()
    )
    assert "last active user" in assert_error(demote, 409)

    api.add_user("admin", "second-admin")
    assert (
        api.client.delete(f"{API}/users/{admin_id}", headers=api.admin()).status_code
        == 200
    )


def test_role_changes_take_effect_at_once(api: ApiServer) -> None:
    viewer = api.headers("viewer")
    setpoint = f"{API}/pump-stations/north/pumps/p2/setpoint"
    assert_error(api.client.put(setpoint, json={"value": 30}, headers=viewer), 403)

    response = api.client.put(
        f"{API}/roles/viewer",
        json={"permissions": ["write_setpoints", "read_pump_status"]},
        headers=api.admin(),
    )

    assert response.status_code == 200
    assert response.json() == {
        "role": "viewer",
        "permissions": ["read_pump_status", "write_setpoints"],
    }
    assert (
        api.client.put(setpoint, json={"value": 30}, headers=viewer).status_code == 200
    )
    changed = api.audit(event_type="ROLE_CHANGED")[-1]
    assert changed["details"]["role"] == "viewer"


def test_a_users_new_role_holds_for_the_token_in_use(api: ApiServer) -> None:
    user_id, username, password = api.add_user("operator")
    token = bearer(api.login(username, password))
    setpoint = f"{API}/pump-stations/north/pumps/p2/setpoint"
    assert api.client.put(setpoint, json={"value": 30}, headers=token).is_success

    for role, status in (("viewer", 403), ("operator", 200), ("viewer", 403)):
        response = api.client.put(
            f"{API}/users/{user_id}", json={"role": role}, headers=api.admin()
        )
        assert response.status_code == 200, response.text

        answer = api.client.put(setpoint, json={"value": 31}, headers=token)
        assert answer.status_code == status, (role, answer.text)


def test_admin_keeps_user_and_role_management(api: ApiServer) -> None:
    admin = api.admin()

    response = api.client.put(
        f"{API}/roles/admin", json={"permissions": ["read_pump_status"]}, headers=admin
    )
    assert "must keep" in assert_error(response, 422)
    unknown = api.client.put(
        f"{API}/roles/viewer", json={"permissions": ["fly"]}, headers=admin
    )
    assert_error(unknown, 422)
    missing = api.client.put(
        f"{API}/roles/king", json={"permissions": []}, headers=admin
    )
    assert_error(missing, 404, "unknown_role")

    roles = api.client.get(f"{API}/roles", headers=admin).json()
    admin_role = next(r for r in roles["roles"] if r["role"] == "admin")
    assert set(admin_role["permissions"]) == set(roles["permissions"])


def test_authorization_header_forms(api: ApiServer) -> None:
    token = api.login("admin", api.admin_password)

    assert api.client.get(
        STATIONS, headers={"Authorization": f"bearer {token}"}
    ).is_success
    for header in (
        token,
        f"Basic {token}",
        "Bearer",
        f"Bearer {token} extra",
        "x" * 600,
    ):
        response = api.client.get(STATIONS, headers={"Authorization": header})
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
