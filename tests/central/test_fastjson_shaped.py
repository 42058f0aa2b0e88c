"""The shaped path (`MsgspecCodec.decode_shaped` + the contract's `_shaped`) is only a
shortcut: every message gets the verdict, the reasons and the values of the long way.

The records here sit at the edges of what the shape and the checks after it decide
(lengths at and over their caps, nulls against absent fields, a key given twice, 19 digits
in a row, nesting at 32 and 33, lost ranges, control characters), and each message is
parsed three ways: the standard library alone, msgspec the long way, and msgspec shaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.central.fastjson import CODEC
from agent.contract import validate
from agent.contract.records import Record, envelope, uuid7
from agent.contract.validate import parse_records
from tests.central.test_fastjson import AGENT, SITE, assert_same_verdict, same, verdict

pytestmark = pytest.mark.skipif(CODEC is None, reason="msgspec is not installed")


class LongWay:
    """msgspec without its shape: the path every message took before."""

    def __init__(self) -> None:
        assert CODEC is not None
        self.decode = CODEC.decode
        self.encoded_size = CODEC.encoded_size


@contextmanager
def shaped_at_any_size() -> Iterator[None]:
    """Small messages take the long way (`SHAPED_MIN_BYTES`): here every one is shaped."""
    with mock.patch.object(validate, "SHAPED_MIN_BYTES", 0):
        yield


UUID = "0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e"


def _depth(n: int) -> str:
    return "[" * (n - 1) + "]" * (n - 1)  # innermost container at n (data itself is 1)


FIELD_VALUES: dict[str, list[str]] = {
    "id": [
        json.dumps(UUID),
        json.dumps(UUID.upper()),
        json.dumps(UUID[:-1]),
        json.dumps(UUID[:-1] + "\n"),
        json.dumps(UUID[:-1] + "g"),
        json.dumps(UUID.replace("-", "x", 1)),
        "null",
        "36",
    ],
    "seq": ["1", "0", "-1", str(2**63 - 1), str(2**63), "1.0", "true", '"1"', "1e3"],
    "captured_at": [
        '"2024-07-01T09:00:00.000+09:00"',
        '"2024-07-01T09:00:00Z"',
        '"2024-07-01T09:00:00"',
        '"2024-13-01T09:00:00+09:00"',
        '"2024-07-01T09:00:00\\u0001+09:00"',
        json.dumps("2024-07-01T09:00:00.000000+09:00" + "0" * 8),  # 40 characters
        json.dumps("2024-07-01T09:00:00.000000+09:00" + "0" * 9),  # 41
        '""',
        "null",
    ],
    "device": ['"scanner"', '""', json.dumps("d" * 64), json.dumps("d" * 65), '"受付"', '"a\\tb"'],
    "kind": ['"barcode"', '"lost_range"', '"photo"', '"\\u007f"', "5"],
    "source": ['"device"', "null", '""', json.dumps("s" * 65), "false"],
    "operator": ['"badge-1"', "null", json.dumps("o" * 128), json.dumps("o" * 129), '"x\\ny"'],
    "clock_synced": ["true", "false", "null", "1", '"true"'],
    "site": [json.dumps(SITE), json.dumps(SITE + "x"), "null", '""'],
    "agent": [json.dumps(AGENT), json.dumps("other"), "null", '""'],
    "data": [
        '{"text":"4901234567894"}',
        '{"text":"1111224100000000011"}',  # 19 digits in a string: fine, looked at again
        '{"n":1234567890123456789}',  # 19 digits, in 64 bits
        f'{{"n":{2**63}}}',
        f'{{"n":{-(2**63)}}}',
        f'{{"n":{-(2**63) - 1}}}',
        '{"n":1e15}',
        '{"v":' + _depth(32) + "}",
        '{"v":' + _depth(33) + "}",
        '{"first_seq":1,"last_seq":1}',
        '{"first_seq":2,"last_seq":1}',
        '{"personal_sealed":{"v":1}}',
        "[]",
        '"text"',
        "null",
        '{"a":1,"a":"two"}',
    ],
    "x": ["1", '"extra"', _depth(33), str(2**63)],  # unknown fields: bounded as data
}
KEYS = list(FIELD_VALUES)


GOOD_FIELDS = {key: values[0] for key, values in FIELD_VALUES.items() if key != "x"}


@st.composite
def record_text(draw: st.DrawFn) -> str:
    """A good record written by hand, then up to two changes: a field set to a value at
    an edge, left out, or given twice (the first value then one at an edge)."""
    fields = [[key, value] for key, value in GOOD_FIELDS.items()]
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(KEYS))
        value = draw(st.sampled_from(FIELD_VALUES[key]))
        how = draw(st.sampled_from(["set", "set", "set", "drop", "twice"]))
        at = next((i for i, (k, _) in enumerate(fields) if k == key), None)
        if how == "drop" and at is not None:
            del fields[at]
        elif how == "set" and at is not None:
            fields[at][1] = value
        else:
            fields.append([key, value])
    order = draw(st.permutations(fields))
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in order) + "}"


def _envelope(records: list[str], site: str = SITE) -> bytes:
    head = f'{{"schema":"madoguchi.records/1","site":"{site}","agent":"{AGENT}","records":['
    return (head + ",".join(records) + "]}").encode("utf-8", "surrogatepass")


def _good(seq: int) -> str:
    return json.dumps(
        {
            "id": UUID[:-4] + f"{seq:04x}",
            "seq": seq,
            "captured_at": "2024-07-01T09:00:00.000+09:00",
            "device": "scanner",
            "kind": "barcode",
            "data": {"text": "4901234567894"},
        }
    )


MESSAGE = st.lists(record_text(), max_size=4).map(_envelope) | st.tuples(
    st.lists(record_text(), max_size=2), st.integers(1, 30)
).map(lambda t: _envelope([_good(s) for s in range(1, t[1])] + t[0]))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(MESSAGE)
def test_the_shaped_path_gives_every_message_the_verdict_and_values_of_the_long_way(
    payload: bytes,
) -> None:
    shaped = verdict(payload, CODEC)
    assert_same_verdict(verdict(payload, None), shaped)
    assert_same_verdict(verdict(payload, LongWay()), shaped)


def _station_message(n: int = 3) -> bytes:
    records = [
        Record(
            id=str(uuid7()),
            seq=s,
            captured_at="2026-12-07T13:00:00.123+09:00",
            device="ticket-scanner",
            kind="barcode",
            source="device",
            data={"text": f"1111224100000000{s:02d}", "interpretation": {"valid": True}},
            operator="badge-7" if s % 2 else None,
            clock_synced=bool(s % 3) if s % 5 else None,
        )
        for s in range(1, n + 1)
    ]
    return envelope(SITE, AGENT, records)


def test_what_a_station_sends_takes_the_shaped_path() -> None:
    """A field the wire gains that the shape does not know would send every message the
    long way, silently (the registry's CPU per record would double): this says so."""
    assert CODEC is not None
    payload = _station_message(20)
    got = CODEC.decode_shaped(payload)
    assert got is not None, "the station's records no longer fit agent/central/_shapes.py"
    env = validate._shaped(got[0], got[1], SITE, AGENT)
    assert env is not None and len(env.records) == 20
    assert same(env.records, parse_records(payload, SITE, AGENT).records)


def test_a_refused_record_sends_its_message_the_long_way_with_the_reason() -> None:
    bad = json.loads(_good(2))
    bad["captured_at"] = "2024-07-01T09:00:00"  # fits the shape; no time zone
    payload = _envelope([_good(1), json.dumps(bad), _good(3)])
    assert CODEC is not None and CODEC.decode_shaped(payload) is not None
    with shaped_at_any_size():
        env = parse_records(payload, SITE, AGENT, codec=CODEC)
    assert [r["seq"] for r in env.records] == [1, 3]
    assert [(r.index, r.reason) for r in env.refused] == [
        (1, "record captured_at has no time zone")
    ]


def test_big_data_is_weighed_the_long_way() -> None:
    """Over a fifth of the cap as it arrived, `data` is weighed: `1e15` grows 4.5 times
    (to `1000000000000000.0`), so 14,000 of them (70 kB) are over the 256 kB cap."""
    for n, refused in ((12_000, False), (14_000, True)):
        head = _good(1)[: -len('{"text": "4901234567894"}}')]
        text = head + '{"n":[' + ",".join(["1e15"] * n) + "]}}"
        payload = _envelope([text])
        assert verdict(payload, CODEC) == verdict(payload, None)
        kept, why = verdict(payload, CODEC)[1]
        assert (len(kept), len(why)) == ((0, 1) if refused else (1, 0))
        if refused:
            assert "over the 262144-byte cap" in why[0][1]


def test_a_small_message_takes_the_long_way() -> None:
    """One live scan: the shaped path would cost more than it saves."""
    payload = _station_message(1)
    assert len(payload) < validate.SHAPED_MIN_BYTES <= len(_station_message(5))
    with mock.patch.object(validate, "_shaped", side_effect=AssertionError("shaped")):
        assert len(parse_records(payload, SITE, AGENT, codec=CODEC).records) == 1
        with pytest.raises(AssertionError, match="shaped"):
            parse_records(_station_message(5), SITE, AGENT, codec=CODEC)


def test_a_station_record_is_stored_as_the_text_it_was_sent_as() -> None:
    """The stored body of a station's record is the text it sent, byte for byte."""
    from agent.central.fastjson import record_text as body

    payload = _station_message(5)
    sent = json.loads(payload)["records"]
    env = parse_records(payload, SITE, AGENT, codec=CODEC)
    assert [body(r) for r in env.records] == [
        json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in sent
    ]


def _with_data(seq: int, data: str) -> str:
    return _good(seq)[: -len('{"text": "4901234567894"}}')] + data + "}"


def _shaped_of(records: list[str]) -> validate.Envelope | None:
    assert CODEC is not None
    got = CODEC.decode_shaped(_envelope(records))
    assert got is not None
    return validate._shaped(got[0], got[1], SITE, AGENT)


def test_brackets_and_digits_are_counted_in_each_records_text_alone() -> None:
    """The text checks search all of a message's `data` texts at once: two records of 20
    brackets each are not one of 40, and digits do not run on from one text to the next."""
    twenty = '{"v":' + _depth(20) + "}"  # 2 * 19 + 1 brackets, 20 deep
    env = _shaped_of([_with_data(1, twenty), _with_data(2, twenty), _good(3)])
    assert env is not None and [r["seq"] for r in env.records] == [1, 2, 3]
    nine = '{"n":123456789}'  # nine digits at a text's end, ten at the next one's start
    env = _shaped_of([_with_data(1, nine), _with_data(2, '{"n":1234567890}')])
    assert env is not None and len(env.records) == 2


def test_one_deep_record_among_shallow_ones_is_found_and_decided_on_its_value() -> None:
    deep = '{"v":' + _depth(33) + "}"
    assert _shaped_of([_good(1), _with_data(2, deep), _good(3)]) is None
    # 40 brackets inside a string and 19 digits in a string: looked at again, and fine
    shallow = '{"s":"' + "[" * 40 + '","t":"1111224100000000011"}'
    env = _shaped_of([_good(1), _with_data(2, shallow), _good(3)])
    assert env is not None and env.records[1]["data"]["s"] == "[" * 40
    payload = _envelope([_good(1), _with_data(2, deep), _good(3)])
    with shaped_at_any_size():
        assert verdict(payload, CODEC) == verdict(payload, None)
    assert verdict(payload, None)[1][1] == [(1, "record data nested deeper than 32")]


def test_joined_texts_that_do_not_add_up_are_not_trusted() -> None:
    """A NUL in a text (JSON holds none) or a count that differs: the long way decides."""
    assert CODEC is not None
    body, texts = CODEC.decode_shaped(_envelope([_good(1), _good(2)])) or (None, None)
    assert texts is not None and texts.count == 2 and texts.joined.count(b"\0") == 1
    assert validate._shaped(body, texts, SITE, AGENT) is not None
    extra_nul = validate.DataTexts(texts.joined + b"\0", 2, texts.longest)
    assert validate._shaped(body, extra_nul, SITE, AGENT) is None
    one_short = validate.DataTexts(texts.joined, 1, texts.longest)
    assert validate._shaped(body, one_short, SITE, AGENT) is None


EDGES = [(key, value) for key, values in FIELD_VALUES.items() for value in values]


@pytest.mark.parametrize(("key", "value"), EDGES, ids=[f"{k}={v[:24]}" for k, v in EDGES])
def test_each_edge_among_good_records_gets_the_verdict_of_the_long_way(
    key: str, value: str
) -> None:
    """Each edge value once, in one record of a message big enough to be shaped: what the
    random messages above reach only by chance (2^63 in data, data that is a list)."""
    fields = {**GOOD_FIELDS, key: value}
    edge = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}"
    payload = _envelope([_good(s) for s in range(2, 10)] + [edge])
    assert len(payload) >= validate.SHAPED_MIN_BYTES
    assert_same_verdict(verdict(payload, None), verdict(payload, CODEC))


def test_texts_of_fewer_records_than_the_message_holds_are_not_trusted() -> None:
    assert CODEC is not None
    body, _ = CODEC.decode_shaped(_envelope([_good(1), _good(2)])) or (None, None)
    _, one = CODEC.decode_shaped(_envelope([_good(1)])) or (None, None)
    assert one is not None and one.count == 1
    assert validate._shaped(body, one, SITE, AGENT) is None
