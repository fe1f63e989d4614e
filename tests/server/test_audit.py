"""The canonical content of audit records: one exact text, however written."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calejo_server import audit
from calejo_server.storage.base import AuditRecord

RECORD = AuditRecord(
    "SETPOINT_CHANGED",
    "LOW",
    dt.datetime(2030, 1, 1, 12, 0, 0, 250, tzinfo=dt.UTC),
    "admin",
    "127.0.0.1",
    "REST",
    "bench_00",
    "p01",
    "35.0",
    "42.5",
    "accepted",
    {"requested": 42.5, "applied": 35.0, "units": "Hz", "detail": 'é "x"'},
    uid="0123456789abcdef0123456789abcdef",
)
CONTENT = (
    '{"details":{"applied":35.0,"detail":"\\u00e9 \\"x\\"","requested":42.5,'
    '"units":"Hz"},"event_type":"SETPOINT_CHANGED","new_value":"42.5",'
    '"old_value":"35.0","outcome":"accepted","protocol":"REST","pump_id":"p01",'
    '"severity":"LOW","source_address":"127.0.0.1","station_id":"bench_00",'
    '"timestamp":"2030-01-01T12:00:00.000250+00:00",'
    '"uid":"0123456789abcdef0123456789abcdef","user":"admin"}'
)
HASH = "ddc4fc6eb7151cb0ff3d76c8474b767bb9d7e3ef8187433bf64bedec5cf9ae93"


def _reference(record: AuditRecord) -> str:
    """The canonical content as its definition states it: one JSON object."""
    content = {
        "details": record.details,
        "event_type": record.event_type,
        "new_value": record.new_value,
        "old_value": record.old_value,
        "outcome": record.outcome,
        "protocol": record.protocol,
        "pump_id": record.pump_id,
        "severity": record.severity,
        "source_address": record.source_address,
        "station_id": record.station_id,
        "timestamp": audit.iso_utc(record.timestamp),
        "uid": record.uid,
        "user": record.user,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)


class Text(str):
    """A str subclass, as a caller might pass."""


TEXTS = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.text(st.characters(codec="utf-8"), max_size=6),
    st.sampled_from(['"', "\\", "\x00\x1f\x7f", "\u2028", "é", Text("t")]),
    st.integers(-5, 5),
    st.floats(allow_nan=False),
)
DETAILS = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def records(draw: st.DrawFn) -> AuditRecord:
    texts = [draw(TEXTS) for _ in range(11)]
    moment = draw(st.datetimes(min_value=dt.datetime(2000, 1, 2)))
    zone = draw(st.sampled_from([dt.UTC, None, dt.timezone(dt.timedelta(hours=-3))]))
    return AuditRecord(
        event_type=texts[0],
        severity=texts[1],
        timestamp=moment.replace(tzinfo=zone),
        user=texts[2],
        source_address=texts[3],
        protocol=texts[4],
        station_id=texts[5],
        pump_id=texts[6],
        old_value=texts[7],
        new_value=texts[8],
        outcome=texts[9],
        details=draw(st.one_of(st.dictionaries(st.text(), DETAILS), DETAILS)),
        uid=texts[10],
    )


def test_the_canonical_content_and_hash_of_a_known_record() -> None:
    assert audit.canonical_content(RECORD) == CONTENT == _reference(RECORD)
    assert audit.chain_hash(audit.GENESIS_HASH, RECORD) == HASH
    stamp = audit.iso_utc(RECORD.timestamp)
    assert audit.chain_hash(audit.GENESIS_HASH, RECORD, stamp) == HASH


@settings(max_examples=800, deadline=None)
@given(records())
def test_canonical_content_is_the_sorted_json_object(record: AuditRecord) -> None:
    try:
        expected: Any = _reference(record)
    except (TypeError, ValueError) as exc:
        expected = type(exc)

    if isinstance(expected, str):
        assert audit.canonical_content(record) == expected
    else:
        with pytest.raises(expected):
            audit.canonical_content(record)
