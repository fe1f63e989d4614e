"""The quick look of audit normalisation gives what the field-by-field way gives."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from calejo_server import audit
from calejo_server.storage.base import (
    AuditRecord,
    SetpointRecord,
    StationStateRecord,
)
from calejo_server.storage.durable import normalise


class Text(str):
    """A str subclass, as a caller might pass."""


TEXTS = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8"), max_size=6),
    st.sampled_from(
        ["p01", "bench_00", "a\x00b", "\ud800", "é", "\x7f", "", Text("x"), "42.5"]
    ),
)
OPTIONAL_TEXTS = st.one_of(st.none(), TEXTS, st.integers(-3, 3))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e16, -1e16, 9.999e15, 42.5]),
)
ZONES = st.sampled_from(
    [dt.UTC, None, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(0))]
)
TIMES = st.builds(
    lambda moment, zone: moment.replace(tzinfo=zone),
    st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2100, 1, 1)),
    ZONES,
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    FLOATS,
    TEXTS,
    TIMES,
)
JSONISH = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(TEXTS, st.integers(0, 3)), inner, max_size=3),
    ),
    max_leaves=8,
)
DETAILS = st.one_of(
    st.dictionaries(TEXTS, LEAVES, max_size=4),
    st.fixed_dictionaries({"requested": FLOATS, "applied": FLOATS, "units": TEXTS}),
    JSONISH,
    st.none(),
)


@st.composite
def audit_records(draw: st.DrawFn) -> AuditRecord:
    return AuditRecord(
        event_type=draw(st.one_of(st.just("SETPOINT_CHANGED"), TEXTS.filter(bool))),
        severity="LOW",
        timestamp=draw(TIMES),
        user=draw(OPTIONAL_TEXTS),
        source_address=draw(OPTIONAL_TEXTS),
        protocol=draw(OPTIONAL_TEXTS),
        station_id=draw(OPTIONAL_TEXTS),
        pump_id=draw(OPTIONAL_TEXTS),
        old_value=draw(OPTIONAL_TEXTS),
        new_value=draw(OPTIONAL_TEXTS),
        outcome=draw(OPTIONAL_TEXTS),
        details=draw(DETAILS),
        uid=draw(st.one_of(st.just("0123456789abcdef"), TEXTS.filter(bool))),
    )


def _same(quick: Any, thorough: Any, record: Any) -> None:
    assert (quick is record) == (thorough is record)
    assert repr(quick) == repr(thorough)


@settings(max_examples=600, deadline=None)
@given(audit_records())
def test_audit_records_are_normalised_alike(record: AuditRecord) -> None:
    _same(
        audit.normalise_audit_record(record), audit._normalised_fields(record), record
    )


@settings(max_examples=600, deadline=None)
@given(JSONISH)
def test_json_safe_values_are_found_safe(value: Any) -> None:
    assert audit.is_json_safe(value) == (repr(audit.json_safe(value)) == repr(value))


def test_what_the_engine_writes_is_kept_as_it_is() -> None:
    wall = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    records = [
        AuditRecord(
            "SETPOINT_CHANGED",
            "LOW",
            wall,
            "admin",
            "127.0.0.1",
            "REST",
            "bench_00",
            "p01",
            "35.0",
            "42.5",
            "accepted",
            {"requested": 42.5, "applied": 35.0, "units": "Hz"},
        ),
        SetpointRecord(
            "bench_00", "p01", 42.5, 42.5, 35.0, "accepted", "REST", None, wall
        ),
        StationStateRecord("bench_00", wall, False),
    ]

    for record in records:
        assert normalise(record) is record
