"""Record validation: every field checked for type and range, one documented error for any bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract.messages import MessageError
from agent.contract.records import Record, envelope, uuid7
from agent.contract.validate import (
    MAX_DATA_BYTES,
    MAX_DEPTH,
    MAX_SEQ,
    RecordError,
    check_record,
    load_json,
    parse_records,
)

SITE, AGENT = "toda-city-hall-1f", "station-03"

GOOD: dict[str, Any] = {
    "id": "0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e",
    "seq": 1,
    "captured_at": "2024-07-01T09:00:00.000+09:00",
    "device": "scanner",
    "kind": "barcode",
    "data": {"text": "4901234567894"},
}


def test_a_good_record_is_returned_as_it_is() -> None:
    assert check_record(GOOD) is GOOD
    # a field a later agent adds is kept, not refused (consumers ignore what they do not know)
    later = {**GOOD, "sealed": {"v": 1, "ct": "AAEC"}}
    assert check_record(later) is later
    full = {
        **GOOD,
        "source": "manual",
        "operator": "staff-7",
        "clock_synced": False,
        "site": SITE,
        "agent": AGENT,
        "seq": MAX_SEQ,
        "captured_at": "2026-11-22T06:34:50.123Z",
    }
    assert check_record(full, SITE, AGENT) is full


def test_what_the_station_sends_passes() -> None:
    rec = Record(str(uuid7()), 7, "2026-11-22T06:34:50.123Z", "scanner", "barcode", "device", {})
    env = parse_records(envelope(SITE, AGENT, [rec]), SITE, AGENT)
    assert env.records == [rec.wire()] and env.refused == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": ""}, "string id"),
        ({"id": 7}, "string id"),
        ({"id": "r1"}, "not a UUID"),
        ({"id": "0190C8E4-7D3A-7B61-9C2E-5F0A4B3C2D1E"}, "not a UUID"),
        ({"seq": 0}, "positive integer seq"),
        ({"seq": -1}, "positive integer seq"),
        ({"seq": True}, "positive integer seq"),
        ({"seq": "1"}, "positive integer seq"),
        ({"seq": 1.0}, "positive integer seq"),
        ({"seq": 2**63}, "over 2"),
        ({"seq": 2**70}, "over 2"),
        ({"captured_at": None}, "string captured_at"),
        ({"captured_at": "yesterday"}, "not an ISO 8601"),
        ({"captured_at": "2024-07-01T09:00:00"}, "no time zone"),
        ({"captured_at": "2024-07-01T09:00:00Z" + " " * 40}, "longer than"),
        ({"device": 1}, "string device"),
        ({"device": "x" * 65}, "longer than 64"),
        ({"device": "scan\nner"}, "control characters"),
        ({"kind": ["barcode"]}, "string kind"),
        ({"source": ["x"]}, "string source"),
        ({"operator": {"a": 1}}, "string operator"),
        ({"clock_synced": "yes"}, "clock_synced"),
        ({"data": "text"}, "data is not an object"),
        ({"data": None}, "data is not an object"),
        ({"data": {"t": "\ud800"}}, "not valid Unicode"),
        ({"data": {"\udfff": 1}}, "not valid Unicode"),
        ({"data": {"n": 2**64}}, "outside 64 bits"),
        ({"data": {"n": float("inf")}}, "not finite"),
        ({"data": {"t": "x" * (MAX_DATA_BYTES + 1)}}, "over the"),
        ({"surprise": float("nan")}, "unknown fields holds a number that is not finite"),
        ({"surprise": "\ud800"}, "not valid Unicode"),
        ({f"x{i}": 1 for i in range(17)}, "more than 16 fields the schema does not know"),
        ({"site": "other-site"}, "site differs"),
        ({"agent": "station-99"}, "agent differs"),
    ],
)
def test_a_record_out_of_type_or_range_is_refused(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        check_record({**GOOD, **change}, SITE, AGENT)


def test_data_nested_too_deep_is_refused() -> None:
    deep: Any = {}
    for _ in range(MAX_DEPTH):
        deep = {"a": deep}
    with pytest.raises(RecordError, match="nested deeper"):
        check_record({**GOOD, "data": deep})
    ok: Any = {}
    for _ in range(MAX_DEPTH - 1):
        ok = {"a": ok}
    assert check_record({**GOOD, "data": ok})


def test_what_is_not_an_object_is_refused() -> None:
    with pytest.raises(RecordError, match="not an object"):
        check_record([GOOD])


def _env(records: Any, **head: Any) -> bytes:
    body = {"schema": "madoguchi.records/1", "site": SITE, "agent": AGENT, "records": records}
    return json.dumps({**body, **head}).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b"{" * 10_000, "not JSON|nested"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"seq": ' + b"9" * 5000 + b"}", "not JSON"),
        (b'{"x": NaN}', "not a number"),
        (b"", "not JSON"),
        (b"[]", "not an object"),
        (b" " * 2_000_000, "over the"),
        (_env([], schema="madoguchi.records/2"), "unknown schema"),
        (_env([], site="another-site"), "differ from the topic"),
        (_env([], site="Bad Site"), "not a site/agent name"),
        (_env({"a": 1}), "must be a list"),
        (_env([1] * 10_001), "over 10000"),
    ],
)
def test_a_poison_message_is_refused_with_the_documented_error(payload: bytes, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        parse_records(payload, SITE, AGENT)


def test_good_and_bad_records_of_one_message_are_told_apart() -> None:
    bad = {**GOOD, "id": str(uuid7()), "seq": 2**63}
    other = {**GOOD, "id": str(uuid7()), "seq": 2}
    env = parse_records(_env([GOOD, bad, "x", other]), SITE, AGENT)
    assert env.records == [GOOD, other]
    assert [(r.index, r.reason.split(" ")[1]) for r in env.refused] == [(1, "seq"), (2, "is")]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()))
def test_any_bytes_give_a_result_or_the_documented_error(payload: bytes) -> None:
    try:
        env = parse_records(payload, SITE, AGENT)
    except MessageError:
        return
    for r in env.records:
        check_record(r, SITE, AGENT)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from([*sorted(GOOD), "source", "operator", "clock_synced", "site", "x"]),
        JSON,
        max_size=6,
    )
)
def test_any_record_passes_only_if_every_field_is_in_range(change: dict[str, Any]) -> None:
    record = {**GOOD, **change}
    try:
        check_record(record, SITE, AGENT)
    except MessageError:
        return
    # what passes is storable: compact JSON, valid UTF-8, a 64-bit seq, a dict `data`
    json.dumps(record, ensure_ascii=False, allow_nan=False).encode()
    assert 1 <= record["seq"] <= MAX_SEQ and isinstance(record["data"], dict)


def test_load_json_takes_str_and_refuses_other_types() -> None:
    assert load_json('{"a": 1}') == {"a": 1}
    with pytest.raises(RecordError, match="not bytes"):
        load_json(12)  # type: ignore[arg-type]


def test_data_over_the_cap_is_refused_even_when_written_small() -> None:
    """`1e15` is 4 bytes on the wire and 18 once stored: the cap is on what is stored."""
    many = [1e15] * (MAX_DATA_BYTES // 18 + 1)
    payload = _env([{**GOOD, "data": {"n": many}}]).replace(b"1000000000000000.0", b"1e15")
    assert len(payload) < MAX_DATA_BYTES
    [refused] = parse_records(payload, SITE, AGENT).refused
    assert "over the" in refused.reason
