"""The reference registry consumer: the other half of the contract.

Subscribes to every agent's `records`, stores each record once (its `id` is
the key), commits, and only then publishes the ack. A duplicate (a re-send) is
acked again but stored once. Gaps in an agent's `seq` are kept in the database;
a gap still open after `gap_timeout_s` is an alert.

Storage is behind `RecordStore` (a small Protocol) with two backends: SQLite
(`SqliteStore`, a file path) and PostgreSQL (`agent.central.store_pg.PostgresStore`,
a `postgresql://` DSN). The MQTT loop (`Registry`) is written once for both.

Several consumers can share the load with an MQTT 5 shared subscription
(`$share/GROUP/...`). A consumer killed after the broker handed it a message
but before its commit loses that message on the wire; it was never acked, so
the agent re-sends it after `resend_after_s` and a live consumer stores it.
That is why the ack must never go out before the commit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent._aio import NO_DELAY, Backoff
from agent.central.blobs import BlobAssembler, BlobError, BlobState
from agent.contract.records import SCHEMA
from agent.errors import MadoguchiError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryStoreError(MadoguchiError):
    """The registry database failed; nothing of the transaction was committed."""


class BlobMismatch(MadoguchiError):
    """A blob's bytes do not hash to the sha256 it was announced with."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One record as the registry stored it (new) or had already (duplicate)."""

    site: str
    agent: str
    record: dict[str, Any]
    new: bool


@dataclass(frozen=True, slots=True)
class Batch:
    """The valid records of one `records` message."""

    site: str
    agent: str
    records: list[dict[str, Any]]


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


OnStored = Callable[[Stored], None]
OnAlert = Callable[[Gap], None]


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


def check_record(r: Any) -> dict[str, Any]:
    """The record if it has what the registry keys on; ValueError otherwise."""
    if not isinstance(r, dict):
        raise ValueError("record is not an object")
    if not isinstance(r.get("id"), str) or not r["id"]:
        raise ValueError("record without a string id")
    if not isinstance(r.get("seq"), int) or isinstance(r["seq"], bool) or r["seq"] < 1:
        raise ValueError("record without a positive integer seq")
    for key in ("captured_at", "device", "kind"):
        if not isinstance(r.get(key), str):
            raise ValueError(f"record without a string {key}")
    return r


def group_batches(batches: Sequence[Batch]) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """Records per agent, agents sorted: the lock order that keeps consumers deadlock-free."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for b in batches:
        groups.setdefault((b.site, b.agent), []).extend(b.records)
    return sorted(groups.items())


# -- SQLite -----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id          TEXT PRIMARY KEY,
    site        TEXT NOT NULL,
    agent       TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    device      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    source      TEXT NOT NULL,
    body        TEXT NOT NULL,
    stored_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_agent_seq ON records(site, agent, seq);
CREATE INDEX IF NOT EXISTS records_stored_at ON records(stored_at);
CREATE TABLE IF NOT EXISTS gaps (
    site TEXT NOT NULL, agent TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    opened_at REAL NOT NULL, alerted_at REAL, PRIMARY KEY (site, agent, first)
);
CREATE TABLE IF NOT EXISTS agents (
    site TEXT NOT NULL, agent TEXT NOT NULL, max_seq INTEGER NOT NULL,
    records INTEGER NOT NULL DEFAULT 0, last_stored_at REAL, clock_synced INTEGER,
    PRIMARY KEY (site, agent)
);
CREATE TABLE IF NOT EXISTS blobs (
    record_id TEXT NOT NULL, name TEXT NOT NULL, site TEXT NOT NULL, agent TEXT NOT NULL,
    content_type TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    data BLOB NOT NULL, stored_at REAL NOT NULL, PRIMARY KEY (record_id, name)
);
"""


class RegistryStore:
    """SQLite storage of the reference registry; used from one thread only.

    Several processes may share one file (WAL, `BEGIN IMMEDIATE`, a busy
    timeout): each transaction is serialised by SQLite's write lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "registry store not open"
        return self._db

    def store(self, site: str, agent: str, records: list[dict[str, Any]]) -> list[Stored]:
        """Insert what is new, update gap bookkeeping, commit. Returns per record."""
        return self.store_many([Batch(site, agent, records)])

    def store_many(self, batches: Sequence[Batch]) -> list[Stored]:
        """All batches in one transaction (a batched commit); returns after COMMIT."""
        db = self.db
        now = time.time()
        out: list[Stored] = []
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise RegistryStoreError(f"{self.path}: {e}") from e
        try:
            for (site, agent), records in group_batches(batches):
                out.extend(self._store_agent(site, agent, records, now))
            db.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise RegistryStoreError(f"{self.path}: {e}") from e
            raise
        return out

    def _store_agent(
        self, site: str, agent: str, records: list[dict[str, Any]], now: float
    ) -> list[Stored]:
        db = self.db
        row = db.execute(
            "SELECT max_seq FROM agents WHERE site = ? AND agent = ?", (site, agent)
        ).fetchone()
        max_seq = 0 if row is None else int(row[0])
        out = []
        new_seqs = []
        clock: int | None = None
        for r in records:
            cur = db.execute(
                "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    r["id"],
                    site,
                    agent,
                    int(r["seq"]),
                    r["captured_at"],
                    r["device"],
                    r["kind"],
                    r.get("source", "device"),
                    json.dumps(r, ensure_ascii=False),
                    now,
                ),
            )
            new = cur.rowcount == 1
            out.append(Stored(site, agent, r, new))
            if new:
                new_seqs.append(int(r["seq"]))
                if isinstance(r.get("clock_synced"), bool):
                    clock = int(r["clock_synced"])
        if not new_seqs:
            return out
        # only the gaps these seqs can fall in (gaps are disjoint): two index ranges
        # on the primary key, so a commit costs what it touches, however many are open
        lo, hi = min(new_seqs), max(new_seqs)
        rows = db.execute(
            "SELECT first, last, opened_at, alerted_at FROM gaps WHERE site = ? AND agent = ?"
            " AND first BETWEEN coalesce((SELECT max(first) FROM gaps WHERE site = ?"
            " AND agent = ? AND first <= ?), ?) AND ? ORDER BY first",
            (site, agent, site, agent, lo, lo, hi),
        ).fetchall()
        old = [(int(a), int(b), float(t)) for a, b, t, _ in rows]
        gaps, max_seq = plan_gaps(old, max_seq, new_seqs, now)
        if gaps != old:
            _log_gap_changes(site, agent, old, gaps)
            alerted = {(int(a), int(b)): al for a, b, _, al in rows}
            kept = {(a, b) for a, b, _ in gaps}
            db.executemany(
                "DELETE FROM gaps WHERE site = ? AND agent = ? AND first = ? AND last = ?",
                [(site, agent, a, b) for a, b in alerted if (a, b) not in kept],
            )
            db.executemany(
                "INSERT INTO gaps VALUES (?,?,?,?,?,?)",
                [(site, agent, *g) for g in carry_alerted(alerted, gaps) if g[:2] not in alerted],
            )
        db.execute(
            "INSERT INTO agents (site, agent, max_seq, records, last_stored_at, clock_synced)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT(site, agent) DO UPDATE SET"
            " max_seq = excluded.max_seq, records = records + excluded.records,"
            " last_stored_at = excluded.last_stored_at,"
            " clock_synced = coalesce(excluded.clock_synced, clock_synced)",
            (site, agent, max_seq, len(new_seqs), now, clock),
        )
        return out

    def gaps(self) -> list[tuple[str, str, int, int]]:
        return [
            (str(s), str(a), int(f), int(la))
            for s, a, f, la in self.db.execute(
                "SELECT site, agent, first, last FROM gaps ORDER BY site, agent, first"
            )
        ]

    def open_gaps(self) -> list[Gap]:
        return [
            Gap(s, a, int(f), int(la), float(t))
            for s, a, f, la, t in self.db.execute(
                "SELECT site, agent, first, last, opened_at FROM gaps ORDER BY site, agent, first"
            )
        ]

    def overdue_gaps(self, older_than_s: float) -> list[Gap]:
        db = self.db
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                "UPDATE gaps SET alerted_at = ? WHERE alerted_at IS NULL AND opened_at <= ?"
                " RETURNING site, agent, first, last, opened_at",
                (now, now - older_than_s),
            ).fetchall()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return sorted(Gap(s, a, int(f), int(la), float(t)) for s, a, f, la, t in rows)

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM records").fetchone()[0])

    def agents(self, minutes: int = 30) -> list[AgentSummary]:
        now = time.time()
        start = (int(now // 60) - minutes + 1) * 60
        buckets: dict[tuple[str, str], list[int]] = {}
        for s, a, minute, n in self.db.execute(
            "SELECT site, agent, CAST(stored_at / 60 AS INTEGER), count(*) FROM records"
            " WHERE stored_at >= ? GROUP BY 1, 2, 3",
            (start,),
        ):
            b = buckets.setdefault((s, a), [0] * minutes)
            idx = int(minute) - start // 60
            if 0 <= idx < minutes:
                b[idx] = int(n)
        return [
            AgentSummary(
                s,
                a,
                int(m),
                int(n),
                None if t is None else float(t),
                None if c is None else bool(c),
                buckets.get((s, a), [0] * minutes),
            )
            for s, a, m, n, t, c in self.db.execute(
                "SELECT site, agent, max_seq, records, last_stored_at, clock_synced FROM agents"
                " ORDER BY site, agent"
            )
        ]

    def store_blob(
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
        digest = verify_blob(sha256, data)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT sha256 FROM blobs WHERE record_id = ? AND name = ?", (record_id, name)
            ).fetchone()
            if row is not None:
                db.execute("ROLLBACK")
                if row[0] != digest:
                    raise BlobMismatch(f"blob {record_id}/{name} already stored with another hash")
                return False
            db.execute(
                "INSERT INTO blobs VALUES (?,?,?,?,?,?,?,?,?)",
                (record_id, name, site, agent, content_type, digest, len(data), data, time.time()),
            )
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise RegistryStoreError(f"{self.path}: {e}") from e
        return True


class SqliteStore:
    """`RecordStore` on SQLite: `RegistryStore` on one dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sync = RegistryStore(path)
        self._executor: ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._executor is not None, "registry store not open"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        await self._run(self.sync.open)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self.sync.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def store(self, batches: Sequence[Batch]) -> list[Stored]:
        return await self._run(self.sync.store_many, batches)

    async def open_gaps(self) -> list[Gap]:
        return await self._run(self.sync.open_gaps)

    async def overdue_gaps(self, older_than_s: float) -> list[Gap]:
        return await self._run(self.sync.overdue_gaps, older_than_s)

    async def count(self) -> int:
        return await self._run(self.sync.count)

    async def agents(self, minutes: int = 30) -> list[AgentSummary]:
        return await self._run(self.sync.agents, minutes)

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
        return await self._run(
            self.sync.store_blob,
            record_id=record_id,
            site=site,
            agent=agent,
            name=name,
            content_type=content_type,
            sha256=sha256,
            data=data,
        )


def is_dsn(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def open_store(db: str | Path) -> RecordStore:
    """A `postgresql://` DSN selects PostgreSQL; anything else is a SQLite file path."""
    if is_dsn(db):
        from agent.central.store_pg import PostgresStore

        return PostgresStore(str(db))
    return SqliteStore(Path(db))


def _log_gap_changes(
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


# -- the MQTT loop ------------------------------------------------------------------------


class Registry:
    """`madoguchi registry`: store idempotently, commit, then ack. Open with `async with`.

    `db` is a `RecordStore`, a SQLite path, or a `postgresql://` DSN.
    `shared` names an MQTT 5 shared-subscription group: every consumer of the
    group gets a share of the records (each message goes to one of them).
    """

    def __init__(
        self,
        host: str,
        port: int,
        db: RecordStore | Path | str,
        *,
        topic_prefix: str = "madoguchi/v1",
        client_id: str | None = None,
        shared: str | None = None,
        on_stored: OnStored | None = None,
        on_alert: OnAlert | None = None,
        tls_context: Any = None,
        batch_max_messages: int = 64,
        gap_timeout_s: float = 300.0,
        blob_dir: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = topic_prefix
        self.shared = shared
        if client_id is None:
            client_id = "madoguchi-registry"
            if shared is not None:  # every member of a group needs its own id
                client_id = f"madoguchi-registry-{shared}-{socket.gethostname()}-{os.getpid()}"
        self.client_id = client_id
        self.on_stored = on_stored
        self.on_alert = on_alert
        self.tls_context = tls_context
        self.batch_max_messages = batch_max_messages
        self.gap_timeout_s = gap_timeout_s
        self.store: RecordStore = db if not isinstance(db, (str, Path)) else open_store(db)
        self.connected = asyncio.Event()
        self.stored_new = 0
        self.duplicates = 0
        self.commits = 0
        self.store_failures = 0
        self.alerts: list[Gap] = []
        # photos: chunks put together in files, then stored once in the record store;
        # a photo record is acked only when its blob is stored
        if blob_dir is None:
            blob_dir = (
                Path(db).with_name(Path(db).stem + "-blobs")
                if isinstance(db, Path) or (isinstance(db, str) and "://" not in db)
                else Path("madoguchi-registry-blobs")
            )
        self.blobs = BlobAssembler(blob_dir)
        self.blob_requests: list[tuple[str, list[int]]] = []
        self._photos_waiting: dict[str, tuple[str, str]] = {}  # record id -> (site, agent)
        self._blob_executor: ThreadPoolExecutor | None = None

    def _shared(self, topic: str) -> str:
        return topic if self.shared is None else f"$share/{self.shared}/{topic}"

    @property
    def topic(self) -> str:
        return self._shared(f"{self.prefix}/+/+/records")

    @property
    def blob_topic(self) -> str:
        return self._shared(f"{self.prefix}/+/+/blobs/+/+")

    async def __aenter__(self) -> Self:
        self._blob_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-blobs")
        await self.store.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.store.close()
        finally:
            if self._blob_executor is not None:
                self._blob_executor.shutdown(wait=True)
                self._blob_executor = None

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.shared is None:
            # one consumer: a persistent session keeps records queued while it restarts
            props.SessionExpiryInterval = 7 * 24 * 3600
            clean_start: Any = False
        else:
            # a group member that dies must leave the group at once, not hold a queue
            # of records nobody will read: the agents' re-send covers what it had
            props.SessionExpiryInterval = 0
            clean_start = True
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=clean_start,
            properties=props,
            tls_context=self.tls_context,
            keepalive=30,
            # unbounded: paho has already PUBACKed what is queued here, so a bounded
            # queue would drop records the broker counts as delivered (agents re-send
            # them only after resend_after_s; other publishers never)
            max_inflight_messages=100,
            socket_options=NO_DELAY,
        )

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff."""
        backoff = Backoff(cap=10.0)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_gaps(), name="registry-gaps")
            while True:
                try:
                    async with self._client() as client:
                        await client.subscribe(self.topic, qos=1)
                        await client.subscribe(self.blob_topic, qos=1)
                        backoff.reset()
                        self.connected.set()
                        log.info("registry consuming %s on %s:%d", self.topic, self.host, self.port)
                        await self._consume(client)
                except aiomqtt.MqttError as e:
                    self.connected.clear()
                    delay = backoff.next()
                    log.warning(
                        "registry: broker %s:%d: %s; retry in %.1f s",
                        self.host,
                        self.port,
                        e,
                        delay,
                    )
                    await asyncio.sleep(delay)

    async def _consume(self, client: aiomqtt.Client) -> None:
        """Take what is queued (at most `batch_max_messages`), one commit, then the acks.

        Under load the queue holds many messages and a commit covers them all;
        when quiet, each message is committed on its own without waiting.
        """
        messages = client.messages
        async for first in messages:
            taken = [first]
            while len(messages) and len(taken) < self.batch_max_messages:
                taken.append(await anext(messages))
            records = []
            for m in taken:
                if m.topic.value.endswith("/records"):
                    records.append(m)
                else:
                    await self._handle_blob(client, m)
            batches = [b for b in (self._parse(m) for m in records) if b is not None]
            if not batches:
                continue
            try:
                stored = await self.store.store(batches)
            except RegistryStoreError as e:
                # nothing committed, nothing acked: the agents send it again
                self.store_failures += 1
                log.error("registry: store failed, %d message(s) not acked: %s", len(batches), e)
                continue
            self.commits += 1
            await self._ack(client, stored)

    async def _ack(self, client: aiomqtt.Client, stored: list[Stored]) -> None:
        ids: dict[tuple[str, str], list[str]] = {}
        for s in stored:
            if s.new:
                self.stored_new += 1
            else:
                self.duplicates += 1
            if self.on_stored is not None:
                self.on_stored(s)
            if await self._blob_ready(s):
                ids.setdefault((s.site, s.agent), []).append(s.record["id"])
        # one ack per agent, all in flight together: a broker far away costs one
        # round trip per commit, not one per agent
        await asyncio.gather(
            *(
                client.publish(
                    f"{self.prefix}/{site}/{agent}/ack",
                    json.dumps({"ids": list(dict.fromkeys(agent_ids))}),
                    qos=1,
                )
                for (site, agent), agent_ids in ids.items()
            )
        )

    def _parse(self, message: aiomqtt.Message) -> Batch | None:
        topic = message.topic.value
        levels = topic.split("/")
        try:
            body = json.loads(message.payload)
            if not isinstance(body, dict):
                raise ValueError("payload is not an object")
            if body.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {body.get('schema')!r}")
            site, agent = body["site"], body["agent"]
            if levels[-3:-1] != [site, agent]:
                raise ValueError("envelope site/agent differ from the topic")
            records = body["records"]
            if not isinstance(records, list):
                raise ValueError("records must be a list")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("registry: dropped a malformed message on %s: %s", topic, e)
            return None
        good = []
        for i, r in enumerate(records):
            try:
                good.append(check_record(r))
            except ValueError as e:  # never log the record: it may hold personal data
                log.warning("registry: %s/%s record %d not stored: %s", site, agent, i, e)
        return Batch(site, agent, good) if good else None

    async def _watch_gaps(self) -> None:
        """Raise an alert, once, for each gap open longer than `gap_timeout_s`."""
        every = min(5.0, max(0.2, self.gap_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            try:
                overdue = await self.store.overdue_gaps(self.gap_timeout_s)
            except RegistryStoreError as e:
                log.warning("registry: gap check failed: %s", e)
                continue
            for g in overdue:
                log.warning(
                    "ALERT seq gap open for more than %.0f s: %s/%s missing %d..%d",
                    self.gap_timeout_s,
                    g.site,
                    g.agent,
                    g.first,
                    g.last,
                )
                self.alerts.append(g)
                if self.on_alert is not None:
                    self.on_alert(g)

    # -- blobs (photos): docs/CONTRACT.md "Blobs", agent/registry_blobs.py -------------

    async def _in_blob_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._blob_executor is not None, "registry not open"
        return await asyncio.get_running_loop().run_in_executor(self._blob_executor, fn, *args)

    async def _blob_ready(self, stored: Stored) -> bool:
        """A photo record is acked only when its blob is complete, verified and stored."""
        record = stored.record
        if record.get("kind") != "photo":
            return True
        rid, sha = record["id"], str(record.get("data", {}).get("sha256"))
        done = await self._in_blob_thread(
            self.blobs.is_complete, stored.site, stored.agent, rid, sha
        )
        if done and await self._keep_blob(stored.site, stored.agent, rid):
            return True
        self._photos_waiting[rid] = (stored.site, stored.agent)
        return False

    async def _keep_blob(self, site: str, agent: str, rid: str) -> bool:
        """Put a finished blob into the record store (idempotent); False if that failed."""
        path = self.blobs.final_path(site, agent, rid)

        def load() -> tuple[dict[str, Any], bytes]:
            return json.loads(path.with_suffix(".json").read_text()), path.read_bytes()

        try:
            meta, data = await self._in_blob_thread(load)
            await self.store.store_blob(
                record_id=rid,
                site=site,
                agent=agent,
                name="photo",
                content_type=str(meta.get("content_type", "application/octet-stream")),
                sha256=str(meta["sha256"]),
                data=data,
            )
        except (OSError, ValueError, KeyError, RegistryStoreError, BlobMismatch) as e:
            log.error("registry: blob of record %s not stored: %s", rid, e)
            return False
        return True

    async def _handle_blob(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        levels = message.topic.value.split("/")
        if len(levels) < 5 or levels[-3] != "blobs" or levels[-1] == "missing":
            return  # our own requests come back on the wildcard subscription
        site, agent, rid, leaf = levels[-5], levels[-4], levels[-2], levels[-1]
        try:
            if leaf == "manifest":
                body = json.loads(message.payload)
                state: BlobState = await self._in_blob_thread(
                    self.blobs.manifest, site, agent, rid, body
                )
            else:
                payload = message.payload
                if not isinstance(payload, bytes | bytearray) or not leaf.isdigit():
                    raise BlobError(f"not a chunk: {leaf[:20]!r}")
                state = await self._in_blob_thread(
                    self.blobs.chunk, site, agent, rid, int(leaf), bytes(payload)
                )
        except (BlobError, ValueError, OSError) as e:
            log.warning("registry: dropped a blob message on %s: %s", message.topic.value, e)
            return
        base = f"{self.prefix}/{site}/{agent}"
        if state.missing:
            self.blob_requests.append((rid, state.missing))
            body = json.dumps({"sha256": state.sha256, "missing": state.missing})
            await client.publish(f"{base}/blobs/{rid}/missing", body, qos=1)
        if (
            state.complete
            and rid in self._photos_waiting
            and await self._keep_blob(site, agent, rid)
        ):
            self._photos_waiting.pop(rid, None)
            await client.publish(f"{base}/ack", json.dumps({"ids": [rid]}), qos=1)


def describe_record(record: dict[str, Any]) -> str:
    """One line for a console: never personal data, only what identifies the read."""
    data = record.get("data", {})
    interp = data.get("interpretation") or {}
    text = data.get("text")
    what = interp.get("type", record.get("kind"))
    verdict = "" if not interp else ("valid" if interp.get("valid") else "INVALID")
    problems = ",".join(interp.get("problems", []))
    shown = "" if text is None or record.get("kind") != "barcode" else repr(text)
    return " ".join(
        p
        for p in (
            f"seq={record.get('seq')}",
            str(record.get("device")),
            what or "",
            verdict,
            problems,
            shown,
        )
        if p
    )


async def run_registry(
    host: str,
    port: int,
    db: Path | str,
    prefix: str,
    client_id: str | None,
    stop: asyncio.Event,
    tls_context: Any = None,
    *,
    shared: str | None = None,
    gap_timeout_s: float = 300.0,
    batch_max_messages: int = 64,
    quiet: bool = False,
) -> None:
    """The `madoguchi registry` command body: print each stored record until stopped."""

    def printer(s: Stored) -> None:
        mark = "stored   " if s.new else "duplicate"
        print(f"{mark} {s.site}/{s.agent} {describe_record(s.record)}", flush=True)

    async with Registry(
        host,
        port,
        db,
        topic_prefix=prefix,
        client_id=client_id,
        shared=shared,
        on_stored=None if quiet else printer,
        tls_context=tls_context,
        gap_timeout_s=gap_timeout_s,
        batch_max_messages=batch_max_messages,
    ) as registry:
        task = asyncio.create_task(registry.run(), name="registry")
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
