"""What the registry stores and the one interface both database backends offer.

`RecordStore` is the Protocol the MQTT loop (agent/central/registry.py) and
the dashboard are written against; `SqliteStore` (agent/central/store_sqlite.py)
and `PostgresStore` (agent/central/store_pg.py) implement it, and
`agent.central.stores.open_store` picks one. The pure helpers below hold the
bookkeeping both backends share (gaps, lock order, blob hashes), so the two
cannot drift apart. Backends depend on this module, never on the MQTT loop.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.contract.validate import LOST_RANGE, lost_range
from agent.errors import BlobMismatch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Stored:
    """One record as the registry stored it (new) or had already (duplicate).

    Not frozen: one is built for every record stored, and a frozen dataclass costs
    1.8 µs to build where this costs 0.4 (issue #18). Treat it as read-only."""

    site: str
    agent: str
    record: dict[str, Any]
    new: bool
    conflict: bool = False
    """A known id with other content: kept in `conflicts`, the first content stays."""


@dataclass(frozen=True, slots=True)
class Batch:
    """The valid records of one `records` message."""

    site: str
    agent: str
    records: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message (or one record of it) the registry refused: never stored, never acked.

    `payload` is the start of the bytes only (`DEAD_LETTER_PAYLOAD_BYTES`); `site` and
    `agent` are the topic's, empty when the topic itself was not the contract's.
    """

    topic: str
    reason: str
    payload: bytes
    at: float
    site: str = ""
    agent: str = ""


@dataclass(frozen=True, slots=True)
class Conflict:
    """A second record with a known id and different content (the first one stays)."""

    record_id: str
    site: str
    agent: str
    first_site: str
    first_agent: str
    body: str
    at: float


@dataclass(frozen=True, slots=True)
class Problems:
    """What the dashboard shows of refused and conflicting records: counts, the latest."""

    dead_letters: int
    conflicts: int
    recent_dead_letters: list[DeadLetter] = field(default_factory=list)
    recent_conflicts: list[Conflict] = field(default_factory=list)


#: the dead-letter table keeps this many rows (the oldest go first)
DEAD_LETTER_ROWS = 10_000
#: bytes of a refused payload kept in the dead-letter table
DEAD_LETTER_PAYLOAD_BYTES = 1024
#: conflicting contents kept per record id
CONFLICTS_PER_ID = 16


def canonical(record: dict[str, Any]) -> str:
    """A record's content as one text, to tell a duplicate from a conflict."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def same_content(stored_body: str, record: dict[str, Any]) -> bool:
    """Whether a stored body (JSON text) is the record: a re-send, not a conflict."""
    try:
        return canonical(json.loads(stored_body)) == canonical(record)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, order=True)
class Gap:
    """Seqs `first..last` of an agent never seen since `opened_at` (Unix seconds)."""

    site: str
    agent: str
    first: int
    last: int
    opened_at: float


@dataclass(frozen=True, slots=True)
class AgentSummary:
    """What the registry knows of one agent, for the dashboard."""

    site: str
    agent: str
    max_seq: int
    records: int
    last_stored_at: float | None
    clock_synced: bool | None
    per_minute: list[int] = field(default_factory=list)


class RecordStore(Protocol):
    """What the MQTT loop and the dashboard need of a registry database.

    `store()` returns only after its one transaction has committed: whatever
    it returns may be acked. It raises `RegistryStoreError` when nothing was
    committed (then nothing may be acked).
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def store(self, batches: Sequence[Batch]) -> list[Stored]: ...

    async def open_gaps(self) -> list[Gap]: ...

    async def overdue_gaps(self, older_than_s: float) -> list[Gap]:
        """Gaps open longer than `older_than_s` not alerted yet; marks them alerted."""
        ...

    async def count(self) -> int: ...

    async def agents(self, minutes: int = 30) -> list[AgentSummary]:
        """Per agent: counts, last store time, and records stored per minute (oldest first)."""
        ...

    async def store_blob(
        self,
        *,
        record_id: str,
        site: str,
        agent: str,
        name: str,
        content_type: str,
        sha256: str,
        data: bytes,
    ) -> bool:
        """Store a blob (a photo) of a record once; see `verify_blob`.

        Idempotent on (record_id, name): True if stored now, False if it was
        already there with the same hash. Raises `BlobMismatch` if `data` does
        not hash to `sha256` (hex), or if (record_id, name) is already stored
        with a different hash. Commits before returning: ack the blob after.
        """
        ...

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Keep refused messages (bounded to `DEAD_LETTER_ROWS`, oldest dropped)."""
        ...

    async def problems(self, recent: int = 20) -> Problems:
        """Counts of dead letters and conflicts, and the latest `recent` of each."""
        ...


def verify_blob(sha256: str, data: bytes) -> str:
    """The lower-case hex digest, or `BlobMismatch` if it is not `sha256`."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.lower():
        raise BlobMismatch(f"blob hash mismatch: announced {sha256}, got {digest}")
    return digest


def plan_gaps(
    gaps: list[tuple[int, int, float]], max_seq: int, new_seqs: Iterable[int], now: float
) -> tuple[list[tuple[int, int, float]], int]:
    """The agent's open gaps and highest seq after storing `new_seqs`.

    A seq above the highest seen opens a gap below it; a seq inside a gap
    closes that seq (splitting the gap, keeping its `opened_at`). Pure, so both
    backends keep the same bookkeeping. Gaps are disjoint and kept sorted, so a
    seq finds its gap by bisection: thousands of open gaps (records arriving far
    out of order) stay cheap.
    """
    out = sorted(gaps)
    for seq in sorted(set(new_seqs)):
        if seq > max_seq:
            if seq > max_seq + 1:
                out.append((max_seq + 1, seq - 1, now))
            max_seq = seq
            continue
        i = bisect.bisect_right(out, (seq, math.inf, math.inf)) - 1
        if i >= 0:
            first, last, opened = out[i]
            if first <= seq <= last:
                parts = [(a, b, opened) for a, b in ((first, seq - 1), (seq + 1, last)) if a <= b]
                out[i : i + 1] = parts
    return out, max_seq


def _containing(spans: list[tuple[int, int]], a: int, b: int) -> int | None:
    """Index of the span of sorted, disjoint `spans` that holds [a, b], if one does."""
    i = bisect.bisect_right(spans, (a, math.inf)) - 1
    if i >= 0 and spans[i][0] <= a and b <= spans[i][1]:
        return i
    return None


def group_batches(batches: Sequence[Batch]) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """Records per agent, agents sorted: the lock order that keeps consumers deadlock-free."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for b in batches:
        groups.setdefault((b.site, b.agent), []).extend(b.records)
    return sorted(groups.items())


def log_gap_changes(
    site: str, agent: str, old: list[tuple[int, int, float]], new: list[tuple[int, int, float]]
) -> None:
    """Log seq ranges only (never record contents)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    before = sorted((a, b) for a, b, _ in old)
    filled = sum(b - a + 1 for a, b in before)
    for a, b, _ in new:
        if _containing(before, a, b) is None:
            # normal for a moment with shared consumers; the overdue check alerts
            log.debug("seq gap opened: %s/%s missing %d..%d", site, agent, a, b)
        else:
            filled -= b - a + 1
    if filled > 0:
        log.debug("seq gap filled: %s/%s %d seq(s), %d gap(s) open", site, agent, filled, len(new))


def carry_alerted(
    old: dict[tuple[int, int], float | None], gaps: list[tuple[int, int, float]]
) -> list[tuple[int, int, float, float | None]]:
    """Fragments of an alerted gap stay alerted (one alert per gap, not per split)."""
    spans = sorted(old)
    out = []
    for a, b, t in gaps:
        i = _containing(spans, a, b)
        out.append((a, b, t, None if i is None else old[spans[i]]))
    return out


# -- the sealed personal part (agent/personal_seal.py, docs/CONTRACT.md) ------------------


@dataclass(frozen=True, slots=True)
class SealedPersonal:
    """A record's personal part as the registry keeps it: ciphertext only."""

    record_id: str
    site: str
    agent: str
    captured_at: str
    envelope: dict[str, Any]
    stored_at: float
    handed_off_at: float | None


@dataclass(frozen=True, slots=True)
class PersonalAccess:
    """One line of the access log: who did what to which records, when (never the data)."""

    at: float
    who: str
    action: str
    record_ids: list[str]
    detail: str


def carries_personal(record: dict[str, Any]) -> bool:
    """Whether the record's `data` holds a personal part, sealed or in the clear."""
    data = record.get("data")
    return isinstance(data, dict) and ("personal" in data or "personal_sealed" in data)


def split_personal(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The record body to store, and its sealed personal part (kept apart, purged later).

    A plain `data["personal"]` (a station without `outbox.registry_public_key`) is
    dropped: the registry database never holds personal data in the clear.
    """
    if not carries_personal(record):
        return record, None
    data = record["data"]
    envelope = data.get("personal_sealed")
    rest = {k: v for k, v in data.items() if k not in ("personal", "personal_sealed")}
    return {**record, "data": rest}, envelope if isinstance(envelope, dict) else None


class PersonalStore(Protocol):
    """What the back-office hand-off and the retention purge need of a registry database.

    Both backends implement it beside `RecordStore`. Every method that touches sealed
    parts writes a `PersonalAccess` line in the same transaction.
    """

    async def personal_pending(self, *, include_handed_off: bool = False) -> list[SealedPersonal]:
        """Sealed parts still kept, oldest first (those not handed off yet by default)."""
        ...

    async def mark_handed_off(self, record_ids: Sequence[str], who: str, detail: str) -> None:
        """Mark the records handed off and log who took them; one commit."""
        ...

    async def purge_personal(
        self, older_than_s: float, *, who: str, handed_off: bool = False
    ) -> list[str]:
        """Delete sealed parts stored more than `older_than_s` ago (and, with
        `handed_off`, every one handed off); the ids purged, logged."""
        ...

    async def personal_access(self) -> list[PersonalAccess]: ...


def accounted_for(record: dict[str, Any]) -> list[int]:
    """The seqs a `lost_range` record names (docs/CONTRACT.md "lost-range record"): the
    station says they are gone, so they close a gap as arriving seqs do, and the alert
    is the lost range's own, raised at once, not a gap's after `gap_timeout_s`."""
    if record.get("kind") != LOST_RANGE:
        return []
    try:
        first, last = lost_range(record)
    except ValueError:
        return []
    return list(range(first, last + 1))
