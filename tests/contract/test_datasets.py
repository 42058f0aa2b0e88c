"""The dataset wire format (agent/contract/datasets.py): shapes, canonical bytes, parsers
that raise only MessageError whatever the bytes."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract import datasets as ds
from agent.contract.messages import MessageError

ROW = {"gtin": "04912345123459", "lot": "AB12", "reason": "contamination"}


def manifest(
    rows_: list[dict[str, str]], over: dict[str, object] | None = None
) -> tuple[dict[str, object], bytes]:
    rows = rows_
    body = ds.canonical_body(rows)
    m = ds.build_manifest("recalled_lots", 7, body, len(rows), issued_at="2026-12-02T04:00:00Z")
    m["signature"] = base64.b64encode(b"\0" * 64).decode()
    m.update(over or {})
    return m, body


def test_canonical_bytes_do_not_depend_on_key_order() -> None:
    a = ds.canonical([{"b": 1, "a": "ä"}])
    b = ds.canonical([{"a": "ä", "b": 1}])
    assert a == b == '[{"a":"ä","b":1}]'.encode()


def test_signed_bytes_leave_out_only_the_signature() -> None:
    m, _ = manifest([ROW])
    signed = json.loads(ds.signed_bytes(m))
    assert "signature" not in signed
    assert signed["version"] == 7 and signed["sha256"] == m["sha256"]


def test_manifest_and_body_round_trip() -> None:
    m, body = manifest([ROW])
    parsed = ds.parse_manifest(json.dumps(m).encode())
    assert (parsed.kind, parsed.version, parsed.rows, parsed.chunks) == ("recalled_lots", 7, 1, 1)
    assert ds.parse_body(parsed, body) == [ROW]


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"schema": "x"}, "schema"),
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"scope": "site"}, "scope"),
        ({"sha256": "A" * 64}, "sha256"),
        ({"chunks": 2}, "chunks"),
        ({"signature": "!!"}, "signature"),
        ({"signature": base64.b64encode(b"x" * 10).decode()}, "64 bytes"),
        ({"issued_at": "yesterday"}, "issued_at"),
    ],
)
def test_bad_manifests_are_refused_with_their_reason(over: dict[str, object], reason: str) -> None:
    m, _ = manifest([ROW], over)
    with pytest.raises(MessageError, match=reason):
        ds.parse_manifest(json.dumps(m).encode())


def test_a_tampered_body_does_not_match_its_manifest() -> None:
    m, body = manifest([ROW])
    parsed = ds.parse_manifest(json.dumps(m).encode())
    with pytest.raises(MessageError, match="sha256"):
        ds.parse_body(parsed, body.replace(b"AB12", b"AB13"))


def test_every_row_problem_is_reported_at_once_without_values() -> None:
    rows = [
        ROW,
        {"gtin": "123", "lot": "L"},
        {"gtin": "04912345123459", "lot": "x", "reason": "r", "z": 1},
    ]
    problems = ds.check_rows("recalled_lots", rows)
    assert problems == [
        "row 2: gtin: not a valid value",
        "row 2: reason: missing",
        "row 3: unknown field 'z'",
    ]
    assert ds.check_rows("nope", []) == ["unknown dataset kind 'nope'"]


def test_topics_round_trip_and_foreign_topics_are_none() -> None:
    p = "madoguchi/v1"
    assert ds.parse_topic(p, ds.manifest_topic(p, "used_tickets")) == ds.DatasetTopic(
        "used_tickets", "fleet", None, None
    )
    assert ds.parse_topic(
        p, ds.chunk_topic(p, "used_tickets", 1796186607755, 3)
    ) == ds.DatasetTopic("used_tickets", "fleet", 1796186607755, 3)
    for t in (
        f"{p}/site/agent/records",
        f"{p}/_datasets/fleet/x/01/2",
        f"{p}/_datasets/moon/x/manifest",
    ):
        assert ds.parse_topic(p, t) is None


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=200).map(str.encode)))
def test_parse_manifest_raises_only_message_error(payload: bytes) -> None:
    with contextlib.suppress(MessageError):
        ds.parse_manifest(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(manifest([ROW])[0])), json_values, max_size=6))
def test_parse_manifest_on_hostile_fields(over: dict[str, object]) -> None:
    m, _ = manifest([ROW], over)
    with contextlib.suppress(MessageError):
        ds.parse_manifest(json.dumps(m).encode())


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(ds.KINDS)), st.binary(max_size=300) | json_values.map(ds.canonical))
def test_parse_body_raises_only_message_error(kind: str, body: bytes) -> None:
    m = ds.build_manifest(kind, 1, body, 1, issued_at="2026-12-02T04:00:00Z")
    m["signature"] = base64.b64encode(b"\0" * 64).decode()
    parsed = ds.parse_manifest(json.dumps(m).encode())
    try:
        rows = ds.parse_body(parsed, body)
    except MessageError:
        return
    assert ds.check_rows(kind, rows) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=8), st.integers(0, 5))
def test_rows_in_pieces_are_the_rows_whole(cuts: list[int], n: int) -> None:
    """Chunks cut anywhere (inside a row, on a newline) give the same rows, one line at
    a time: what the station's streaming load relies on."""
    rows = [{**ROW, "lot": f"L{i}"} for i in range(n)]
    m, body = manifest(rows)
    parsed = ds.parse_manifest(json.dumps(m).encode())
    bounds = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    assert list(ds.iter_rows(parsed, pieces)) == ds.parse_body(parsed, body) == rows


# -- reservations, staff, site scope (issue #20, second slice) ---------------------------

RESERVATION = {
    "id": "R-2026-000123",
    "id_type": "qr",
    "slot_start": "2026-12-02T01:30:00Z",
    "slot_end": "2026-12-02T01:45:00Z",
    "purpose": "vaccination dose 1",
}


def test_reservation_and_staff_rows_are_checked_by_field() -> None:
    assert ds.check_rows("reservations", [RESERVATION]) == []
    assert ds.check_rows("staff", [{"uid": "01010601CB095703", "operator": "staff-014"}]) == []
    bad = ds.check_rows(
        "reservations", [{**RESERVATION, "id_type": "passport", "slot_start": "10:30"}]
    )
    assert bad == ["row 1: id_type: not a valid value", "row 1: slot_start: not a valid value"]
    assert ds.check_rows("staff", [{"uid": "zz", "operator": "Staff 14"}]) == [
        "row 1: uid: not a valid value",
        "row 1: operator: not a valid value",
    ]


@settings(max_examples=50)
@given(
    st.dictionaries(
        st.sampled_from(["id", "id_type", "slot_start", "slot_end", "purpose", "uid", "x"]),
        st.one_of(st.text(max_size=30), st.integers(), st.none(), st.sampled_from(["qr"])),
    ),
    st.sampled_from(["reservations", "staff"]),
)
def test_new_row_schemas_never_raise_and_name_no_values(row: dict[str, object], kind: str) -> None:
    problems = ds.check_row(kind, row)
    body = ds.canonical_body([row])
    m = ds.parse_manifest(
        json.dumps(
            {
                **ds.build_manifest(kind, 1, body, 1, issued_at="2026-12-02T00:00:00Z"),
                "signature": base64.b64encode(b"\0" * 64).decode(),
            }
        ).encode()
    )
    if problems:
        with pytest.raises(MessageError):
            ds.parse_body(m, body)
    else:
        assert ds.parse_body(m, body) == [row]
    for p in problems:  # names fields, never the values it was given
        assert re.fullmatch(r"row: (unknown field '\w+'|\w+: (missing|not a valid value))", p), p


def test_a_site_scope_names_its_site_in_topics_and_signed_manifest() -> None:
    body = ds.canonical_body([RESERVATION])
    m = ds.build_manifest(
        "reservations", 9, body, 1, issued_at="2026-12-02T00:00:00Z", scope="site", site="toda-1f"
    )
    assert m["site"] == "toda-1f" and b'"site":"toda-1f"' in ds.signed_bytes(m)
    m["signature"] = base64.b64encode(b"\0" * 64).decode()
    parsed = ds.parse_manifest(json.dumps(m).encode())
    assert (parsed.scope, parsed.site) == ("site", "toda-1f")
    topic = ds.manifest_topic("p", "reservations", "site", "toda-1f")
    assert topic == "p/_datasets/site/toda-1f/reservations/manifest"
    assert ds.parse_topic("p", topic) == ds.DatasetTopic(
        "reservations", "site", None, None, "toda-1f"
    )
    chunk = ds.chunk_topic("p", "staff", 5, 2, "site", "goka-2f")
    assert ds.parse_topic("p", chunk) == ds.DatasetTopic("staff", "site", 5, 2, "goka-2f")
    assert ds.subscription("p", "site", "goka-2f") == "p/_datasets/site/goka-2f/#"
    for bad_topic in ("p/_datasets/site/Bad Site/staff/manifest", "p/_datasets/site/x/manifest"):
        assert ds.parse_topic("p", bad_topic) is None
    for over in ({"site": None}, {"site": "Bad Site"}, {"scope": "fleet"}):
        with pytest.raises(MessageError, match="site"):
            ds.parse_manifest(json.dumps({**m, **over}).encode())
    with pytest.raises(ValueError):
        ds.build_manifest("staff", 1, b"", 0, issued_at="2026-12-02T00:00:00Z", scope="site")
