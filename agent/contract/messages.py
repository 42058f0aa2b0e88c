"""The small control messages of the contract: acks, commands and their results.

Each shape is built and parsed here and nowhere else (docs/CONTRACT.md). A
parser takes the raw payload (bytes or text, from anyone on the broker) and
either returns the message or raises `MessageError` with a short reason; it
never raises anything else, whatever the bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: what a station accepts in one control message (acks, commands): larger is refused
MAX_CONTROL_BYTES = 1_048_576
#: a record id in an ack: a UUID's text, with room for what older agents sent
MAX_ID_CHARS = 64


class MessageError(ValueError):
    """A control message that is not what the contract says; the reason is safe to log."""


def _encode(obj: Any) -> str:
    """JSON as every sender has always written it (`json.dumps` defaults): the wire bytes stay."""
    return json.dumps(obj, default=str)


def load_object(payload: bytes | bytearray | str, limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """A JSON object from a payload; `MessageError` for anything else (size, depth, encoding)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes | bytearray):
        raise MessageError(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > limit:
        raise MessageError(f"payload of {len(payload)} bytes is over the {limit}-byte cap")
    try:
        body = json.loads(payload)
    except RecursionError:
        raise MessageError("JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"not JSON: {str(e)[:80]}") from None
    if not isinstance(body, dict):
        raise MessageError(f"JSON {type(body).__name__}, not an object")
    return body


# -- ack: registry -> station ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """`{"ids": [...]}`: the registry holds these records (or their conflict) for good."""

    ids: list[str]

    def encode(self) -> bytes:
        return _encode({"ids": list(dict.fromkeys(self.ids))}).encode()


def parse_ack(payload: bytes | bytearray | str, limit: int = MAX_CONTROL_BYTES) -> Ack:
    body = load_object(payload, limit)
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise MessageError("ids must be a list of strings")
    for i in ids:
        if not isinstance(i, str) or not 0 < len(i) <= MAX_ID_CHARS:
            raise MessageError("ids must be a list of strings")
    return Ack(ids)


# -- commands: dashboard -> station, and the result back ------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """`cmd/{name}`: a request with an optional `request_id` and arguments."""

    name: str
    request_id: str | int | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = {**self.args}
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return _encode(body).encode()


def parse_command(
    name: str, payload: bytes | bytearray | str, limit: int = MAX_CONTROL_BYTES
) -> Command:
    """An empty payload is a command with no arguments."""
    body = {} if not payload else load_object(payload, limit)
    request_id = body.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str | int) or isinstance(request_id, bool)
    ):
        raise MessageError("request_id must be a string")
    return Command(name, request_id, body)


def command_result(request_id: str | int | None, result: dict[str, Any]) -> bytes:
    """`cmd/{name}/result`: `{"request_id", "ok", ...}` as the station answers."""
    return _encode({"request_id": request_id, **result}).encode()
