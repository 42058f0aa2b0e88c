"""The shape of a `records` message as msgspec types, for `MsgspecCodec.decode_shaped`.

Apart from fastjson.py because it imports msgspec at module level (the types are
classes): fastjson imports it only when msgspec is installed. What these types accept
is listed, as a promise, in `agent.contract.validate.ShapedCodec`; a record that does
not fit them is not refused for it, it only takes the long way.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Raw, Struct

from agent.contract.validate import (
    MAX_NAME_CHARS,
    MAX_OPERATOR_CHARS,
    MAX_RECORDS,
    MAX_SEQ,
    MAX_SITE_CHARS,
)

Id = Annotated[str, Meta(min_length=36, max_length=36)]
Seq = Annotated[int, Meta(ge=1, le=MAX_SEQ)]
When = Annotated[str, Meta(min_length=1, max_length=40)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Operator = Annotated[str, Meta(min_length=1, max_length=MAX_OPERATOR_CHARS)]
Site = Annotated[str, Meta(min_length=1, max_length=MAX_SITE_CHARS)]


class RecordShape(Struct, forbid_unknown_fields=True, gc=False):
    """One record: the fields of madoguchi.records/1 and no other (a record with a field
    the schema does not know takes the long way, where it is bounded like `data`). Only
    a check: the values are the plain decoding's, where an absent field and a null one
    stay apart (and a null site is refused, by `_shaped`)."""

    id: Id
    seq: Seq
    captured_at: When
    device: Name
    kind: Name
    data: Raw  # its text goes on to `_shaped`; its values are the plain decoding's
    source: Name | None = None
    operator: Operator | None = None
    clock_synced: bool | None = None
    site: Site | None = None
    agent: Site | None = None


class EnvelopeShape(Struct, gc=False):
    """The envelope: its other fields are checked on the plain decoding, as before."""

    records: Annotated[list[RecordShape], Meta(max_length=MAX_RECORDS)]
    schema: Any = None
    site: Any = None
    agent: Any = None
