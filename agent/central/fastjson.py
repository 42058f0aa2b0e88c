"""JSON on the registry's hot path: msgspec when installed, else the standard library.

A registry draining backlogs spent a third of its CPU in `json`: decoding each
message, weighing each record's `data` and encoding each record's stored body
(issue #18). msgspec (the `central` extra) does each several times faster. It only
ever shortens the work, never changes a verdict: what it refuses to decode is
decoded, or refused with the usual reason, by the standard library
(`agent.contract.validate.JsonCodec`), and a stored body is read back as the same
values either way (msgspec writes `1e16` where `json` writes `1e+16`).
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from agent.contract.validate import DataTexts

__all__ = ["CODEC", "MsgspecCodec", "record_text"]


class MsgspecCodec:
    """`ShapedCodec` by msgspec (agent/contract/validate.py)."""

    def __init__(self) -> None:
        import msgspec

        from agent.central._shapes import EnvelopeShape

        self._decode = msgspec.json.Decoder().decode
        self._encode = msgspec.json.Encoder().encode
        self._shape = msgspec.json.Decoder(EnvelopeShape).decode

    def decode_shaped(self, payload: bytes) -> tuple[Any, DataTexts] | None:
        # two passes over the bytes, cheaper together than the Python checks they spare:
        # the typed one builds no dict (its structs are not even tracked by the garbage
        # collector), the plain one gives the values exactly as `decode`, keys in order
        try:
            shape = self._shape(payload)
            value = self._decode(payload)
        except (ValueError, RecursionError):
            return None  # not of the shape (or not JSON): the long way decides
        # each `Raw` joined as it is (a buffer): no bytes object per record
        raws = [r.data for r in shape.records]
        return value, DataTexts(b"\0".join(raws), len(raws), max(map(len, raws), default=0))

    def decode(self, payload: bytes) -> Any:
        # DecodeError and ValidationError (a number out of range) are ValueErrors
        return self._decode(payload)

    def encoded_size(self, value: Any) -> int:
        # msgspec writes `1e16` / `1e-7` where `json` writes `1e+16` / `1e-07`: one
        # character shorter at most per number of >= 4 (longer for `0.00001`, which
        # only makes the contract weigh it again)
        return len(self._encode(value))

    def text(self, value: Any) -> str:
        return self._encode(value).decode()


#: the registry's codec; None without msgspec (the standard library alone)
CODEC: MsgspecCodec | None = (
    MsgspecCodec() if importlib.util.find_spec("msgspec") is not None else None
)

_STDLIB = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def record_text(record: dict[str, Any]) -> str:
    """A validated record as the compact JSON text the registry stores as its body."""
    return CODEC.text(record) if CODEC is not None else _STDLIB(record)
