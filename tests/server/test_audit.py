"""The canonical content of audit records: one exact text, however written."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any
from unittest import mock

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


FLOATS = st.one_of(
    st.floats(),
    st.sampled_from([0.0, -0.0, 1e-4, 9.99e-5, 1e16, 9999999999999998.0, 1e-05]),
    st.floats(min_value=1e-6, max_value=1e-3),
    st.floats(min_value=1e15, max_value=1e17),
)
INTS = st.one_of(
    st.integers(),
    st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1]),
)
TEXTS = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.text(st.characters(codec="utf-8"), max_size=6),
    st.sampled_from(
        ['"', "\\", "\x00\x1f\x7f", "\u2028", "é", "\ud800", Text("t"), ""]
    ),
    st.integers(-5, 5),
    FLOATS,
    st.booleans(),
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    FLOATS,
    TEXTS,
    st.datetimes(),
    st.builds(Text, st.text(max_size=3)),
)
DETAILS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(), st.integers(0, 3)), inner, max_size=3),
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


@settings(max_examples=1500, deadline=None)
@given(records())
def test_canonical_content_is_the_sorted_json_object(record: AuditRecord) -> None:
    try:
        expected: Any = _reference(record)
    except (TypeError, ValueError, UnicodeError) as exc:
        expected = type(exc)

    if isinstance(expected, str):
        assert audit.canonical_content(record) == expected
    else:
        with pytest.raises(expected):
            audit.canonical_content(record)


class _Refusing:
    """Stands in for the standard encoder where orjson is expected to write."""

    def encode(self, content: object) -> str:
        raise AssertionError("written by the standard encoder")


PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10)
EVERYDAY_DETAILS = st.dictionaries(
    PRINTABLE,
    st.one_of(
        PRINTABLE,
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(min_value=1e-4, max_value=9.99e15),
        st.floats(min_value=-9.99e15, max_value=-1e-4),
        st.just(0.0),
        st.lists(st.integers(-5, 5), max_size=3),
    ),
    max_size=5,
)


@st.composite
def everyday_records(draw: st.DrawFn) -> AuditRecord:
    texts = [draw(st.one_of(st.none(), PRINTABLE)) for _ in range(10)]
    moment = draw(st.datetimes(min_value=dt.datetime(2000, 1, 2)))
    return AuditRecord(
        event_type=texts[0] or "SETPOINT_CHANGED",
        severity="LOW",
        timestamp=moment.replace(tzinfo=dt.UTC),
        user=texts[1],
        source_address=texts[2],
        protocol=texts[3],
        station_id=texts[4],
        pump_id=texts[5],
        old_value=texts[6],
        new_value=texts[7],
        outcome=texts[8],
        details=draw(EVERYDAY_DETAILS),
        uid=texts[9] or "0123456789abcdef",
    )


@settings(max_examples=1000, deadline=None)
@given(everyday_records())
def test_everyday_content_is_written_by_orjson_alike(record: AuditRecord) -> None:
    expected = _reference(record)

    with mock.patch.object(audit, "_CANONICAL_ENCODER", _Refusing()):
        assert audit.canonical_content(record) == expected


def test_only_text_beyond_printable_ascii_takes_the_standard_encoder() -> None:
    plain = dataclasses.replace(RECORD, details={**RECORD.details, "detail": 'e "x"'})

    with mock.patch.object(audit, "_CANONICAL_ENCODER", _Refusing()):
        assert audit.canonical_content(plain) == _reference(plain)
        with pytest.raises(AssertionError, match="standard encoder"):
            audit.canonical_content(RECORD)
        with pytest.raises(AssertionError, match="standard encoder"):
            audit.canonical_content(dataclasses.replace(plain, user="del\x7f"))
