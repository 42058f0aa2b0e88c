"""Control messages: what is built parses back, the bytes are the ones stations and registries
have always exchanged, and a parser fed anything raises only `MessageError`."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract.messages import (
    MAX_ID_CHARS,
    Ack,
    Command,
    MessageError,
    command_result,
    parse_ack,
    parse_command,
)

ids = st.lists(st.text(min_size=1, max_size=MAX_ID_CHARS), max_size=20)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
request_ids = st.one_of(st.none(), st.text(max_size=40), st.integers())
args = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k != "request_id"), json_values, max_size=5
)


def test_wire_bytes_are_unchanged() -> None:
    """What the registry, the dashboard and the station sent before the contract held them."""
    assert Ack(["a", "b", "a"]).encode() == b'{"ids": ["a", "b"]}'
    assert Command("ping", "r-1").encode() == b'{"request_id": "r-1"}'
    assert Command("ping").encode() == b"{}"
    assert command_result("r-1", {"ok": True}) == b'{"request_id": "r-1", "ok": true}'
    ids_ = ["0190c8e4-7d3a-7b61-9c2e-5f0a4b3c2d1e", "窓口"]
    assert Ack(ids_).encode() == json.dumps({"ids": ids_}).encode()


@given(ids)
def test_ack_round_trips(values: list[str]) -> None:
    assert parse_ack(Ack(values).encode()) == Ack(list(dict.fromkeys(values)))


@given(st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True), request_ids, args)
def test_command_round_trips(name: str, request_id: str | int | None, arguments: Any) -> None:
    parsed = parse_command(name, Command(name, request_id, arguments).encode())
    assert (parsed.name, parsed.request_id) == (name, request_id)
    assert {k: v for k, v in parsed.args.items() if k != "request_id"} == arguments


def test_an_empty_command_has_no_arguments() -> None:
    assert parse_command("ping", b"") == Command("ping", None, {})


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 200_000,
        b'{"ids": ' + b"[" * 200_000,
        b"{" * 200_000,
        b"\xff\xfe\x00",
        b"[]",
        b'{"ids": "abc"}',
        b'{"ids": [1]}',
        b'{"ids": [""]}',
        b'{"ids": ["' + b"x" * (MAX_ID_CHARS + 1) + b'"]}',
        b'{"request_id": true}',
        b'{"request_id": [1]}',
        b" " * 1_048_577,
    ],
)
def test_bad_payloads_are_message_errors(payload: bytes) -> None:
    with pytest.raises(MessageError):
        parse_ack(payload)
    if b"request_id" in payload or b"ids" not in payload:
        with pytest.raises(MessageError):
            parse_command("ping", payload)


def _only_message_errors(parse: Any, payload: Any) -> None:
    with contextlib.suppress(MessageError):
        parse(payload)


@given(st.one_of(st.binary(), st.text(), json_values.map(json.dumps)))
def test_parse_ack_raises_only_message_error(payload: bytes | str) -> None:
    _only_message_errors(parse_ack, payload)


@given(st.one_of(st.binary(), st.text(), json_values.map(json.dumps)))
def test_parse_command_raises_only_message_error(payload: bytes | str) -> None:
    _only_message_errors(lambda p: parse_command("ping", p), payload)


def test_a_payload_that_is_not_bytes_is_a_message_error() -> None:
    with pytest.raises(MessageError):
        parse_ack(42)  # type: ignore[arg-type]
    with pytest.raises(MessageError):
        parse_command("ping", 42)  # type: ignore[arg-type]
