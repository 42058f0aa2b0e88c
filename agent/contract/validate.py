"""Record validation: what a registry checks before it stores a record.

In the contract so that every consumer of `records` (the reference registry,
tests, a city's own consumer written against docs/CONTRACT.md) refuses the
same records for the same reasons. Standard library only.

Every field is checked for type and range, and every size is bounded, so that
what passes can be stored by either backend (SQLite, PostgreSQL) without an
error: one hostile record must never fail a commit that holds other stations'
records. Whatever the bytes, the parsers here raise `RecordError` (a
`MessageError`, so a `ValueError`) and nothing else: no RecursionError,
OverflowError or UnicodeError escapes. Reasons are safe to log (they never
quote the record's contents).

A consumer with a faster JSON passes it as `codec` (`JsonCodec`; `ShapedCodec` to
check a message's shape in compiled code too): it only shortens the work, the
verdicts are those of the standard library alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from agent.contract.messages import MessageError
from agent.contract.records import SCHEMA
from agent.contract.topics import NAME

#: the largest `records` message a registry reads (the station's batch_max_bytes is <= 256 kB;
#: a single record over it is still sent alone)
MAX_ENVELOPE_BYTES = 1_048_576
#: records in one message (the station's batch_max_records is <= 10,000)
MAX_RECORDS = 10_000
#: a record's `data`, as compact JSON
MAX_DATA_BYTES = 262_144
#: nesting of `data` (objects and arrays)
MAX_DEPTH = 32
#: `device`, `kind`, `source`: short names
MAX_NAME_CHARS = 64
#: `operator`: a staff badge's id
MAX_OPERATOR_CHARS = 128
#: a site or agent name (one topic level)
MAX_SITE_CHARS = 128
#: the largest seq: SQLite INTEGER and PostgreSQL bigint are signed 64-bit
MAX_SEQ = 2**63 - 1

#: the canonical text of a UUID, as `str(uuid.UUID)` writes it
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: fields a record may carry beyond those of madoguchi.records/1 (docs/CONTRACT.md: fields
#: are only added, and a consumer ignores those it does not know; they are bounded as `data`)
MAX_EXTRA_FIELDS = 16
#: the fields of a record in schema madoguchi.records/1
_FIELDS = frozenset(
    {
        "id",
        "seq",
        "captured_at",
        "device",
        "kind",
        "source",
        "data",
        "operator",
        "clock_synced",
        "site",
        "agent",
    }
)


#: the smallest message a `ShapedCodec` checks: below about four records (a live scan's
#: message holds one) its work per message, a second decoding and a search per field,
#: costs more than the long way record by record (23 against 18 µs for one record, 12
#: against 13 for five, 9 against 15 per record for 500)
SHAPED_MIN_BYTES = 1024


class RecordError(MessageError):
    """A `records` message or one of its records that the contract refuses; safe to log."""


@dataclass(frozen=True, slots=True)
class Refused:
    """One record of a message that failed: its position and why."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Envelope:
    """A `records` message: the records that passed, and those that did not."""

    site: str
    agent: str
    records: list[dict[str, Any]]
    refused: list[Refused]


class JsonCodec(Protocol):
    """A faster JSON than the standard library's, for a consumer's hot path (the
    registry's is msgspec: agent/central/fastjson.py). Only a shortcut: whatever it
    refuses, the standard library decides (and words the reason), so a record passes or
    fails here for the same reasons with or without one."""

    def decode(self, payload: bytes) -> Any:
        """The value; `ValueError` for any text it will not decode. It must refuse a
        lone surrogate, invalid UTF-8, NaN, Infinity and a number out of float range
        (the standard library then decides), so that what it returns holds only
        valid Unicode and finite numbers: `check_record` does not look for those
        again in what it decoded."""
        ...

    def encoded_size(self, value: Any) -> int:
        """Compact UTF-8 JSON bytes of `value`, at least 0.8 of the standard library's
        (`separators=(",", ":")`, `ensure_ascii=False`): under 0.8 of the cap, the
        standard library's weight is under the cap too."""
        ...


class ShapedCodec(JsonCodec, Protocol):
    """A `JsonCodec` that also checks a whole `records` message against the types and
    bounds of its records in compiled code (msgspec's typed decoding:
    agent/central/fastjson.py), so that what is left to check in Python per record is a
    few lines, and what can be checked a message at a time is (issue #18: the checks
    per record were most of the registry's CPU). Only a shortcut as well: a message it
    does not vouch for takes the long way, and gets the same verdict there."""

    def decode_shaped(self, payload: bytes) -> tuple[Any, DataTexts] | None:
        """(`decode(payload)`, the text each record's `data` arrived as: `DataTexts`),
        or None unless `payload` is an object whose `records` is a list of at most
        `MAX_RECORDS` objects, each with only the fields of the schema, where `id` is a
        string of 36 characters; `seq` an integer 1..`MAX_SEQ` (not a boolean, not a
        float); `captured_at` a string of 1-40 characters; `device` and `kind` strings
        of 1-`MAX_NAME_CHARS`; `source` absent, null or such a string; `operator` absent,
        null or a string of 1-`MAX_OPERATOR_CHARS`; `clock_synced` absent, null or a
        boolean; `site` and `agent` absent, null or strings of 1-`MAX_SITE_CHARS`;
        `data` present. Of a key given twice, the last counts, in that check as in the
        value."""
        ...


@dataclass(frozen=True, slots=True)
class DataTexts:
    """Each record's `data` as the JSON text it arrived as, for the checks `_shaped` makes
    on the text of a whole message at once (a search over one string instead of one per
    record: issue #18). JSON text holds no NUL byte, so the texts are joined by one; a
    `joined` that holds more NULs than `count - 1` is not trusted (the long way decides)."""

    joined: bytes
    """the texts in record order, each after a NUL but the first"""
    count: int
    """how many texts (records)"""
    longest: int
    """the longest text's length in bytes"""


def _no_constant(name: str) -> Any:
    raise RecordError(f"JSON {name} is not a number")


def load_json(
    payload: bytes | bytearray | str,
    limit: int = MAX_ENVELOPE_BYTES,
    *,
    codec: JsonCodec | None = None,
) -> Any:
    """JSON from a payload from anyone; `RecordError` for size, depth, encoding, NaN.
    `codec` decodes first; what it refuses is decided by the standard library."""
    return _load_json(payload, limit, codec)[0]


def _load_json(
    payload: bytes | bytearray | str, limit: int, codec: JsonCodec | None
) -> tuple[Any, bool]:
    """`load_json`, and whether `codec` decoded it (its strings and numbers are sound)."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes | bytearray):
        raise RecordError(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > limit:
        raise RecordError(f"payload of {len(payload)} bytes is over the {limit}-byte cap")
    if codec is not None:
        try:
            return codec.decode(bytes(payload)), True
        except (ValueError, RecursionError):
            pass  # NaN, a lone surrogate, bad UTF-8, ...: the standard library says why
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_no_constant), False
    except RecursionError:
        raise RecordError("JSON nested too deeply") from None
    except RecordError:
        raise
    except ValueError as e:  # also the int digit limit (ValueError, not OverflowError)
        raise RecordError(f"not JSON: {str(e)[:80]}") from None


def _string(
    r: dict[str, Any], key: str, most: int, *, optional: bool = False, decoded: bool = False
) -> None:
    v = r.get(key)
    if v is None and optional:
        return
    if not isinstance(v, str) or not v:
        raise RecordError(f"record without a string {key}")
    if len(v) > most:
        raise RecordError(f"record {key} longer than {most} characters")
    if _CONTROL.search(v):
        raise RecordError(f"record {key} holds control characters")
    if not decoded:
        _unicode(v, key)


def _unicode(v: str, where: str) -> None:
    if v.isascii():
        return
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(f"record {where} is not valid Unicode (a lone surrogate)") from None


def _sound(node: dict[str, Any] | list[Any], depth: int) -> bool:
    """What `_check_data` still checks in a container a `JsonCodec` decoded (its strings
    and numbers are sound): nesting and 64-bit integers. False for anything else, which
    is then checked the long way (and worded there)."""
    if depth > MAX_DEPTH:
        return False
    values: Iterable[Any] = node.values() if type(node) is dict else node
    for v in values:
        t: type[Any] = type(v)
        if t is str or t is bool or t is float or v is None:
            continue
        if t is int:
            if -MAX_SEQ - 1 <= v <= MAX_SEQ:
                continue
            return False
        if (t is dict or t is list) and _sound(v, depth + 1):
            continue
        return False
    return True


def _check_data(
    data: Any,
    measure: bool = True,
    size: Callable[[Any], int] | None = None,
    *,
    decoded: bool = False,
) -> None:
    """An object, not too deep, finite numbers, valid Unicode, not too big (iterative).
    `decoded`: a `JsonCodec` decoded it, so only nesting and integers are looked at
    first (`_sound`), and the long way only if they fail."""
    if not isinstance(data, dict):
        raise RecordError("record data is not an object")
    if not (decoded and _sound(data, 1)):
        _walk(data)
    if not measure:
        return
    if size is not None and size(data) * 5 <= MAX_DATA_BYTES * 4:
        return  # the standard library's size is at most 1.25x the codec's (JsonCodec)
    n = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    if n > MAX_DATA_BYTES:
        raise RecordError(f"record data of {n} bytes is over the {MAX_DATA_BYTES}-byte cap")


def _walk(data: dict[str, Any]) -> None:
    """The long way: every node's type, nesting, Unicode and finite numbers."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_DEPTH:
                raise RecordError(f"record data nested deeper than {MAX_DEPTH}")
            for k, v in node.items():
                if not isinstance(k, str):
                    raise RecordError("record data has a key that is not a string")
                _unicode(k, "data")
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > MAX_DEPTH:
                raise RecordError(f"record data nested deeper than {MAX_DEPTH}")
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            _unicode(node, "data")
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if not -MAX_SEQ - 1 <= node <= MAX_SEQ:
                raise RecordError("record data holds an integer outside 64 bits")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise RecordError("record data holds a number that is not finite")
        else:
            raise RecordError(f"record data holds a {type(node).__name__}")


def check_record(
    r: Any,
    site: str | None = None,
    agent: str | None = None,
    *,
    measure: bool = True,
    codec: JsonCodec | None = None,
    decoded: bool = False,
) -> dict[str, Any]:
    """The record if every field is what the contract says; `RecordError` otherwise.

    `site` and `agent` are the topic's: a record that names another station is refused.
    `measure=False` skips encoding `data` to weigh it, for a caller that knows the whole
    message is under `MAX_DATA_BYTES` already; `codec` weighs it faster (`JsonCodec`).
    `decoded=True` says `codec` decoded `r`: the Unicode and finite numbers it vouches
    for are not looked for again (the verdict is the same).
    """
    if not isinstance(r, dict):
        raise RecordError("record is not an object")
    extra = {} if _FIELDS.issuperset(r) else {k: v for k, v in r.items() if k not in _FIELDS}
    if len(extra) > MAX_EXTRA_FIELDS:
        raise RecordError(
            f"record has more than {MAX_EXTRA_FIELDS} fields the schema does not know"
        )
    rid = r.get("id")
    if not isinstance(rid, str) or not rid:
        raise RecordError("record without a string id")
    if not _UUID.fullmatch(rid):
        raise RecordError("record id is not a UUID in canonical form")
    seq = r.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise RecordError("record without a positive integer seq")
    if seq > MAX_SEQ:
        raise RecordError("record seq over 2^63-1")
    _string(r, "captured_at", 40, decoded=decoded)
    try:
        when = datetime.fromisoformat(r["captured_at"])
    except ValueError:
        raise RecordError("record captured_at is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise RecordError("record captured_at has no time zone")
    _string(r, "device", MAX_NAME_CHARS, decoded=decoded)
    _string(r, "kind", MAX_NAME_CHARS, decoded=decoded)
    _string(r, "source", MAX_NAME_CHARS, optional=True, decoded=decoded)
    _string(r, "operator", MAX_OPERATOR_CHARS, optional=True, decoded=decoded)
    if r.get("clock_synced") is not None and not isinstance(r["clock_synced"], bool):
        raise RecordError("record clock_synced is not a boolean")
    for key, topic_value in (("site", site), ("agent", agent)):
        if key in r and (topic_value is None or r[key] != topic_value):
            raise RecordError(f"record {key} differs from the topic's")
    if "data" not in r:
        raise RecordError("record without data")
    size = None if codec is None else codec.encoded_size
    _check_data(r["data"], measure, size, decoded=decoded)
    if extra:  # kept in the stored body: as bounded as `data`
        try:
            _check_data(extra, measure, size, decoded=decoded)
        except RecordError as e:
            raise RecordError(str(e).replace("record data", "record's unknown fields")) from None
    if r["kind"] == LOST_RANGE:
        lost_range(r)
    return r


def _name(v: Any, key: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_SITE_CHARS or not NAME.fullmatch(v):
        raise RecordError(f"envelope {key} is not a site/agent name")
    return v


def parse_records(
    payload: bytes | bytearray | str,
    site: str,
    agent: str,
    limit: int = MAX_ENVELOPE_BYTES,
    *,
    codec: JsonCodec | None = None,
) -> Envelope:
    """A `records` message from `{site}/{agent}/records`; `codec`: a faster JSON for the
    same verdicts (`JsonCodec`).

    `RecordError` if the message as a whole is refused (nothing in it can be
    trusted); otherwise the records that passed and, apart, those refused.
    """
    shaped = getattr(codec, "decode_shaped", None)  # a ShapedCodec
    if (
        shaped is not None
        and isinstance(payload, bytes | bytearray)
        and SHAPED_MIN_BYTES <= len(payload) <= limit
    ):
        got = shaped(bytes(payload))
        if got is not None:
            env = _shaped(got[0], got[1], site, agent)
            if env is not None:
                return env
    body, decoded = _load_json(payload, limit, codec)
    if not isinstance(body, dict):
        raise RecordError(f"JSON {type(body).__name__}, not an object")
    schema = body.get("schema")
    if schema != SCHEMA:
        shown = schema[:40] if isinstance(schema, str) else type(schema).__name__
        raise RecordError(f"unknown schema {shown!r}")
    if [_name(body.get("site"), "site"), _name(body.get("agent"), "agent")] != [site, agent]:
        raise RecordError("envelope site/agent differ from the topic")
    records = body.get("records")
    if not isinstance(records, list):
        raise RecordError("records must be a list")
    if len(records) > MAX_RECORDS:
        raise RecordError(f"{len(records)} records in one message, over {MAX_RECORDS}")
    good: list[dict[str, Any]] = []
    refused: list[Refused] = []
    # a small message cannot hold a big `data`: re-encoding grows a text at most 4.5 times
    # (`1e15` -> `1000000000000000.0`), so under a fifth of the cap there is nothing to weigh
    measure = len(payload) > MAX_DATA_BYTES // 5
    for i, r in enumerate(records):
        try:
            good.append(check_record(r, site, agent, measure=measure, codec=codec, decoded=decoded))
        except RecordError as e:
            refused.append(Refused(i, str(e)))
    return Envelope(site, agent, good, refused)


#: ids of 36 characters each, one after the other: one match for a whole message
_UUIDS = re.compile(r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})*")


#: every digit as 0, so that 19 digits in a row (an integer that may not fit 64 bits:
#: every one of 18 digits does) is found by a plain substring search, not a regex
_DIGITS_AS_0 = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19
#: of the joined texts, only the brackets (each `[` as `{`) and the NULs between texts:
#: a text with more than MAX_DEPTH brackets is then a run of more than MAX_DEPTH `{`
_BRACKETS_ONLY = (
    bytes.maketrans(b"[", b"{"),
    bytes(c for c in range(256) if c not in b"{[\0"),
)
_DEEP = b"{" * (MAX_DEPTH + 1)


def _shaped(body: Any, texts: DataTexts, site: str, agent: str) -> Envelope | None:
    """`parse_records` for a message whose shape a `ShapedCodec` vouched for: what the
    shape does not say, checked a message at a time where it can be. None as soon as
    anything fails: the long way then finds it and says why, record by record."""
    if type(body) is not dict or body.get("schema") != SCHEMA:
        return None
    try:
        if [_name(body.get("site"), "site"), _name(body.get("agent"), "agent")] != [site, agent]:
            return None
    except RecordError:
        return None
    records: list[dict[str, Any]] = body["records"]
    joined = texts.joined
    if len(records) != texts.count or joined.count(b"\0") != max(0, texts.count - 1):
        return None
    # every id is 36 characters (the shape): one match over them all tells each apart
    if not _UUIDS.fullmatch("".join([r["id"] for r in records])):
        return None
    when = [r["captured_at"] for r in records]
    if _CONTROL.search("".join(when)):
        return None
    for key in ("device", "kind"):
        if _CONTROL.search("".join([r[key] for r in records])):
            return None
    for key in ("source", "operator"):
        if _CONTROL.search("".join([r.get(key) or "" for r in records])):
            return None
    try:
        if None in [t.tzinfo for t in map(datetime.fromisoformat, when)]:
            return None
    except ValueError:
        return None
    datas = [r["data"] for r in records]
    # re-encoding grows a text at most 4.5 times (parse_records): under a fifth of the cap
    # as it arrived, there is nothing to weigh
    if texts.longest > MAX_DATA_BYTES // 5 or set(map(type, datas)) - {dict}:
        return None
    # nesting and 64-bit integers (`_sound`), from the text where it can tell: no deeper
    # than the brackets it holds, no integer longer than its longest digit run (brackets
    # and digits inside strings only make it look the long way); searched in all the texts
    # at once, then, if either is found, text by text
    if _LONG_DIGITS in joined.translate(_DIGITS_AS_0) or _DEEP in joined.translate(*_BRACKETS_ONLY):
        for data, text in zip(datas, joined.split(b"\0"), strict=True):
            deep = text.count(b"{") + text.count(b"[") > MAX_DEPTH
            if (deep or _LONG_DIGITS in text.translate(_DIGITS_AS_0)) and not _sound(data, 1):
                return None
    for r in records:
        if ("site" in r and r["site"] != site) or ("agent" in r and r["agent"] != agent):
            return None
        if r["kind"] == LOST_RANGE:
            try:
                lost_range(r)
            except RecordError:
                return None
    return Envelope(site, agent, records, [])


LOST_RANGE = "lost_range"
"""The record kind by which a station says which of its seqs could not be read from a
damaged outbox (docs/CONTRACT.md "lost-range record")."""


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def lost_range(r: dict[str, Any]) -> tuple[int, int]:
    """(first_seq, last_seq) of a `lost_range` record; `RecordError` if it is malformed.

    The range lies below the record's own seq: it reports seqs already handed out.
    """
    data = r.get("data")
    if not isinstance(data, dict):
        raise RecordError("lost_range record without a data object")
    first, last = data.get("first_seq"), data.get("last_seq")
    if not (isinstance(first, int) and isinstance(last, int) and _int(first) and _int(last)):
        raise RecordError("lost_range record without integer first_seq and last_seq")
    seq = r.get("seq")
    if not (isinstance(seq, int) and _int(seq) and 1 <= first <= last < seq):
        raise RecordError("lost_range record needs 1 <= first_seq <= last_seq < seq")
    return first, last
