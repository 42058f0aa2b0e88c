"""The registry's msgspec JSON (agent/central/fastjson.py) is only a shortcut: every
message gets the same verdict, the same reasons and the same values as with the
standard library alone, and a stored body reads back as the record it was."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.central.fastjson import CODEC, record_text
from agent.contract.validate import (
    MAX_DATA_BYTES,
    MAX_DEPTH,
    JsonCodec,
    RecordError,
    check_record,
    load_json,
    parse_records,
)

SITE, AGENT = "toda-city-hall-1f", "station-03"

pytestmark = pytest.mark.skipif(CODEC is None, reason="msgspec is not installed")


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def verdict(payload: bytes, codec: JsonCodec | None) -> tuple[str, Any]:
    try:
        env = parse_records(payload, SITE, AGENT, codec=codec)
    except RecordError as e:
        return ("refused", str(e))
    return ("parsed", (env.records, [(r.index, r.reason) for r in env.refused]))


def assert_same_verdict(a: tuple[str, Any], b: tuple[str, Any]) -> None:
    """Two `verdict`s alike: refused for the same reason, or the same records kept (values
    and types, `same`) and the same refused."""
    assert a[0] == b[0]
    if a[0] == "refused":
        assert a[1] == b[1]
    else:
        assert same(a[1][0], b[1][0]) and a[1][1] == b[1][1]


HOSTILE_TEXT = st.sampled_from(
    [
        "1e400",
        "-1e400",
        "NaN",
        "Infinity",
        "1e16",
        "1e-7",
        "-0.0",
        "-0",
        "0.1e-400",
        "9" * 4300,
        "9" * 4301,
        "1" * 400 + ".5",
        "18446744073709551616",
        "-9223372036854775809",
        '"\\ud800"',
        '"\\udc00\\ud800"',
        '"\\ud83d\\ude00"',
        '"a\\u0000b"',
        '"\x01"',
        '"\t"',
        '"\u2028"',
        "[" * 600 + "]" * 600,
        '{"a":1,"a":2.5}',
        "true",
        "null",
        '"4901234567894"',
    ]
)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
GOOD = {
    "id": "0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e",
    "seq": 1,
    "captured_at": "2024-07-01T09:00:00.000+09:00",
    "device": "scanner",
    "kind": "barcode",
}


def _record_text(fields: dict[str, str], data_items: list[tuple[str, str]]) -> str:
    """A record written by hand, so that values JSON cannot produce (NaN, lone
    surrogates, duplicate keys, 1e400) reach the parser as raw text."""
    head = {**GOOD}
    parts = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in head.items() if k not in fields]
    parts += [f"{json.dumps(k)}:{v}" for k, v in fields.items()]
    data = ",".join(f"{json.dumps(k)}:{v}" for k, v in data_items)
    return "{" + ",".join([*parts, '"data":{' + data + "}"]) + "}"


RECORD = st.builds(
    _record_text,
    st.dictionaries(
        st.sampled_from(["seq", "device", "kind", "id", "x"]), HOSTILE_TEXT, max_size=2
    ),
    st.lists(st.tuples(st.sampled_from(["text", "n", "x"]), HOSTILE_TEXT), max_size=4),
)


def _envelope(records: list[str]) -> bytes:
    head = f'{{"schema":"madoguchi.records/1","site":"{SITE}","agent":"{AGENT}","records":['
    return (head + ",".join(records) + "]}").encode("utf-8", "surrogatepass")


PAYLOAD = (
    st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v, allow_nan=True).encode())
    | st.lists(RECORD, max_size=4).map(_envelope)
    | st.lists(
        JSON.map(lambda d: json.dumps({**GOOD, "data": {"v": d}}, allow_nan=True)), max_size=3
    ).map(_envelope)
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(PAYLOAD)
def test_every_message_gets_the_same_verdict_and_values_with_msgspec(payload: bytes) -> None:
    assert_same_verdict(verdict(payload, None), verdict(payload, CODEC))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"x": NaN}', "not a number"),
        ('{"x": 1e400}', None),  # decoded as inf by json: refused where data is checked
        ('"\\ud800"', None),
        ("9" * 5000, "not JSON"),
        ("[" * 100_000, "nested too deeply"),
        ('"\xff"', None),
    ],
)
def test_what_msgspec_refuses_is_decided_by_the_standard_library(
    text: str, reason: str | None
) -> None:
    raw = text.encode("utf-8", "surrogateescape") if "\xff" not in text else b'"\xff"'
    try:
        expected: Any = ("value", load_json(raw))
    except RecordError as e:
        expected = ("refused", str(e))
    try:
        got: Any = ("value", load_json(raw, codec=CODEC))
    except RecordError as e:
        got = ("refused", str(e))
    assert got[0] == expected[0]
    assert same(got[1], expected[1]) if got[0] == "value" else got[1] == expected[1]
    if reason is not None:
        assert got[0] == "refused" and reason in got[1]


FINITE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)  # what `data` may hold
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text().filter(str.isprintable), FINITE, max_size=6))
def test_the_codec_weighs_data_within_the_bound_the_contract_relies_on(
    data: dict[str, Any],
) -> None:
    assert CODEC is not None
    stdlib = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    # at least 0.8: what the contract relies on to skip weighing with json (longer is
    # allowed: msgspec writes 1e-05 as 0.00001, and such data is weighed again)
    assert CODEC.encoded_size(data) >= 0.8 * stdlib


def test_the_worst_case_for_the_bound_is_exactly_four_fifths() -> None:
    """`1e+16` (json) against `1e16` (msgspec): the shortest data, all such numbers."""
    assert CODEC is not None
    data = {"": [1e16] * 1000}
    stdlib = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    assert 0.8 * stdlib <= CODEC.encoded_size(data) < stdlib


def test_data_just_over_the_cap_is_refused_with_the_codec_too() -> None:
    """Data the codec weighs under the cap but json over it: weighed again by json."""
    many = [1e16] * (MAX_DATA_BYTES // 6)
    record = {**GOOD, "data": {"n": many}}
    assert CODEC is not None
    assert CODEC.encoded_size(record["data"]) <= MAX_DATA_BYTES
    with pytest.raises(RecordError, match="over the"):
        check_record(record, codec=CODEC)
    with pytest.raises(RecordError, match="over the"):
        check_record(record)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["text", "n", "x", "interpretation"]), FINITE, max_size=4))
def test_a_stored_body_reads_back_as_the_record(data: dict[str, Any]) -> None:
    record = check_record({**GOOD, "data": data}, codec=CODEC)
    text = record_text(record)
    assert same(json.loads(text), record)
    assert same(json.loads(text), json.loads(json.dumps(record, ensure_ascii=False)))


def _nested(kind: str, depth: int) -> Any:
    """`data` whose innermost container is at `depth` (`data` itself is at 1)."""
    inner: Any = {} if kind == "dict" else []
    for _ in range(depth - 2):
        inner = {"k": inner} if kind == "dict" else [inner]
    return {"v": inner}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_nested("dict", MAX_DEPTH), None),
        (_nested("list", MAX_DEPTH), None),
        (_nested("dict", MAX_DEPTH + 1), "nested deeper"),
        (_nested("list", MAX_DEPTH + 1), "nested deeper"),
        ({"n": 2**63 - 1, "m": [-(2**63)]}, None),
        ({"n": 2**63}, "outside 64 bits"),
        ({"n": [{"m": -(2**63) - 1}]}, "outside 64 bits"),
        ({"n": 2**64}, "outside 64 bits"),
        ({"t": "東京", "f": -0.0, "b": True, "z": None, "l": [1.5, "x", [], {}]}, None),
    ],
)
def test_what_the_codec_does_not_vouch_for_is_still_checked(
    data: dict[str, Any], reason: str | None
) -> None:
    """A record the codec decoded skips the Unicode and number checks it vouches for
    (validate._sound): nesting and 64-bit integers get the same verdict and reason."""
    payload = _envelope([json.dumps({**GOOD, "data": data})])
    slow, fast = verdict(payload, None), verdict(payload, CODEC)
    assert slow == fast
    refused = fast[1][1] if fast[0] == "parsed" else [(0, fast[1])]
    if reason is None:
        assert refused == []
    else:
        assert len(refused) == 1 and reason in refused[0][1]
