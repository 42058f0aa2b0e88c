"""What flows through the agent: reads from drivers, and records in the outbox.

A driver yields a `Read` (or a `ReadFault`); the supervisor interprets it and
hands it to the outbox, which turns it into a `Record` by giving it an `id`
(UUIDv7) and a `seq` at the commit. `envelope()` is the wire form of the
contract (docs/CONTRACT.md).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA = "madoguchi.records/1"


def uuid7(unix_ms: int | None = None) -> uuid.UUID:
    """RFC 9562 UUIDv7: 48-bit Unix milliseconds, then random bits."""
    ms = int(time.time() * 1000) if unix_ms is None else unix_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return uuid.UUID(int=value)


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_ms(ts: datetime) -> str:
    """`2026-11-22T06:34:50.123Z`, the contract's timestamp form."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Read:
    """One thing a device read, before it is stored.

    `data` goes on the wire as the record's `data`. `personal` holds personal
    data (names, My Number, photos' metadata ...) that the outbox encrypts at
    rest and purges once confirmed; it is merged into `data["personal"]` on the
    wire only. `token` lets the driver match the feedback to its read.
    """

    device: str
    kind: str
    data: dict[str, Any]
    captured_at: datetime = field(default_factory=utc_now)
    source: str = "device"
    personal: dict[str, Any] | None = None
    token: Any = None
    clock_synced: bool | None = None


@dataclass(frozen=True, slots=True)
class ReadFault:
    """A read that could not become a record (garbage, overlong line, card pulled out)."""

    device: str
    reason: str
    token: Any = None


@dataclass(frozen=True, slots=True)
class Record:
    """A read after the commit: durable, with its id and seq."""

    id: str
    seq: int
    captured_at: str
    device: str
    kind: str
    source: str
    data: dict[str, Any]
    personal: dict[str, Any] | None = None
    operator: str | None = None
    clock_synced: bool | None = None
    data_json: str | None = field(default=None, compare=False, repr=False)
    """`data` as the outbox stored it (compact JSON): the wire form reuses it as is."""
    personal_sealed: dict[str, Any] | None = field(default=None, repr=False)
    """The personal part sealed to the registry's key (agent/personal_seal.py): sent as
    `data["personal_sealed"]` instead of `data["personal"]` in the clear."""

    def wire(self) -> dict[str, Any]:
        data = self.data if self.personal is None else {**self.data, "personal": self.personal}
        if self.personal_sealed is not None:
            data = {**self.data, "personal_sealed": self.personal_sealed}
        out: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "captured_at": self.captured_at,
            "device": self.device,
            "kind": self.kind,
            "source": self.source,
            "data": data,
        }
        if self.operator is not None:
            out["operator"] = self.operator
        if self.clock_synced is not None:
            out["clock_synced"] = self.clock_synced
        return out

    def wire_json(self) -> str:
        """`wire()` as compact JSON; `data` spliced in from the outbox's own text when it
        has it (the drain of a backlog spends most of its time encoding otherwise)."""
        if self.data_json is None or self.personal is not None or self.personal_sealed is not None:
            return _compact(self.wire())
        head = self.wire()
        del head["data"]
        return f'{_compact(head)[:-1]},"data":{self.data_json}}}'


def _compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def envelope(site: str, agent: str, records: list[Record]) -> bytes:
    """The `records` message of the contract, compact JSON in seq order."""
    return envelope_of(site, agent, [r.wire_json().encode() for r in records])


def envelope_of(site: str, agent: str, records_json: list[bytes]) -> bytes:
    """The `records` message from records already encoded (`Record.wire_json()`, UTF-8)."""
    head = _compact({"schema": SCHEMA, "site": site, "agent": agent}).encode()
    return b"".join((head[:-1], b',"records":[', b",".join(records_json), b"]}"))
