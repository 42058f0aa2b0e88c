"""The reference registry consumer: the other half of the contract.

Subscribes to every agent's `records` with a persistent session, stores each
record once (its `id` is the key) in SQLite, commits, and only then publishes
the ack. A duplicate (a re-send) is acked again but stored once. Gaps in an
agent's `seq` are reported when they open and when they close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt

from agent.records import SCHEMA
from agent.registry_blobs import BlobAssembler, BlobError, BlobState
from agent.uplink import Backoff

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS gaps (
    site TEXT NOT NULL, agent TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    opened_at REAL NOT NULL, PRIMARY KEY (site, agent, first)
);
CREATE TABLE IF NOT EXISTS agents (
    site TEXT NOT NULL, agent TEXT NOT NULL, max_seq INTEGER NOT NULL,
    PRIMARY KEY (site, agent)
);
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """One record as the registry stored it (new) or had already (duplicate)."""

    site: str
    agent: str
    record: dict[str, Any]
    new: bool


OnStored = Callable[[Stored], None]


class RegistryStore:
    """SQLite storage of the reference registry; used from one thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
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
        db = self.db
        now = time.time()
        out = []
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT max_seq FROM agents WHERE site = ? AND agent = ?", (site, agent)
            ).fetchone()
            max_seq = 0 if row is None else int(row[0])
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
                if not new:
                    continue
                seq = int(r["seq"])
                if seq > max_seq + 1:
                    db.execute(
                        "INSERT OR IGNORE INTO gaps VALUES (?,?,?,?,?)",
                        (site, agent, max_seq + 1, seq - 1, now),
                    )
                    log.warning(
                        "seq gap opened: %s/%s missing %d..%d", site, agent, max_seq + 1, seq - 1
                    )
                elif seq <= max_seq:
                    self._fill_gap(site, agent, seq)
                max_seq = max(max_seq, seq)
            db.execute(
                "INSERT INTO agents VALUES (?,?,?) ON CONFLICT(site, agent)"
                " DO UPDATE SET max_seq = excluded.max_seq",
                (site, agent, max_seq),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _fill_gap(self, site: str, agent: str, seq: int) -> None:
        row = self.db.execute(
            "SELECT first, last, opened_at FROM gaps WHERE site = ? AND agent = ?"
            " AND first <= ? AND last >= ?",
            (site, agent, seq, seq),
        ).fetchone()
        if row is None:
            return
        first, last, opened = row
        self.db.execute(
            "DELETE FROM gaps WHERE site = ? AND agent = ? AND first = ?", (site, agent, first)
        )
        for a, b in ((first, seq - 1), (seq + 1, last)):
            if a <= b:
                self.db.execute("INSERT INTO gaps VALUES (?,?,?,?,?)", (site, agent, a, b, opened))
        if first == last:
            log.info("seq gap closed: %s/%s %d", site, agent, seq)

    def gaps(self) -> list[tuple[str, str, int, int]]:
        return [
            tuple(r)
            for r in self.db.execute(
                "SELECT site, agent, first, last FROM gaps ORDER BY site, agent, first"
            )
        ]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM records").fetchone()[0])


class Registry:
    """`madoguchi registry`: store idempotently, then ack. Open with `async with`."""

    def __init__(
        self,
        host: str,
        port: int,
        db_path: Path,
        *,
        topic_prefix: str = "madoguchi/v1",
        client_id: str = "madoguchi-registry",
        on_stored: OnStored | None = None,
        tls_context: Any = None,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = topic_prefix
        self.client_id = client_id
        self.on_stored = on_stored
        self.tls_context = tls_context
        self.store = RegistryStore(db_path)
        self.connected = asyncio.Event()
        self.stored_new = 0
        self.duplicates = 0
        self._executor: ThreadPoolExecutor | None = None
        # photos: blobs beside the database; a photo record is acked once its blob is in
        self.blobs = BlobAssembler(db_path.with_name(db_path.stem + "-blobs"))
        self.blob_requests: list[tuple[str, list[int]]] = []
        self._photos_waiting: dict[str, tuple[str, str]] = {}  # record id -> (site, agent)

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=True)

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff."""
        backoff = Backoff(cap=10.0)
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.client_id,
                    clean_session=False,
                    tls_context=self.tls_context,
                    keepalive=30,
                ) as client:
                    await client.subscribe(f"{self.prefix}/+/+/records", qos=1)
                    await client.subscribe(f"{self.prefix}/+/+/blobs/+/+", qos=1)
                    backoff.reset()
                    self.connected.set()
                    log.info(
                        "registry consuming %s/+/+/records on %s:%d",
                        self.prefix,
                        self.host,
                        self.port,
                    )
                    async for message in client.messages:
                        if message.topic.value.endswith("/records"):
                            await self._handle(client, message)
                        else:
                            await self._handle_blob(client, message)
            except aiomqtt.MqttError as e:
                self.connected.clear()
                delay = backoff.next()
                log.warning(
                    "registry: broker %s:%d: %s; retry in %.1f s", self.host, self.port, e, delay
                )
                await asyncio.sleep(delay)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        levels = message.topic.value.split("/")
        try:
            body = json.loads(message.payload)
            if body.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {body.get('schema')!r}")
            site, agent = body["site"], body["agent"]
            if levels[-3:-1] != [site, agent]:
                raise ValueError("envelope site/agent differ from the topic")
            records = body["records"]
            if not isinstance(records, list):
                raise ValueError("records must be a list")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("registry: dropped a malformed message on %s: %s", message.topic.value, e)
            return
        assert self._executor is not None
        try:
            stored = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.store.store, site, agent, records
            )
        except (KeyError, ValueError, TypeError) as e:
            log.warning("registry: bad record from %s/%s: %s", site, agent, e)
            return
        for s in stored:
            if s.new:
                self.stored_new += 1
            else:
                self.duplicates += 1
            if self.on_stored is not None:
                self.on_stored(s)
        ids = [s.record["id"] for s in stored if await self._blob_ready(site, agent, s.record)]
        if ids:
            ack = json.dumps({"ids": ids})
            await client.publish(f"{self.prefix}/{site}/{agent}/ack", ack, qos=1)

    # -- blobs (photos): docs/CONTRACT.md "Blobs", agent/registry_blobs.py -------------

    async def _blob_ready(self, site: str, agent: str, record: dict[str, Any]) -> bool:
        """A photo record is acked only when its blob is complete and verified."""
        if record.get("kind") != "photo":
            return True
        sha = record.get("data", {}).get("sha256")
        assert self._executor is not None
        done = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.blobs.is_complete, site, agent, record["id"], str(sha)
        )
        if not done:
            self._photos_waiting[record["id"]] = (site, agent)
        return bool(done)

    async def _handle_blob(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        levels = message.topic.value.split("/")
        if len(levels) < 5 or levels[-3] != "blobs" or levels[-1] == "missing":
            return  # our own requests come back on the wildcard subscription
        site, agent, rid, leaf = levels[-5], levels[-4], levels[-2], levels[-1]
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        try:
            if leaf == "manifest":
                body = json.loads(message.payload)
                state: BlobState = await loop.run_in_executor(
                    self._executor, self.blobs.manifest, site, agent, rid, body
                )
            else:
                payload = message.payload
                if not isinstance(payload, bytes | bytearray) or not leaf.isdigit():
                    raise BlobError(f"not a chunk: {leaf[:20]!r}")
                state = await loop.run_in_executor(
                    self._executor, self.blobs.chunk, site, agent, rid, int(leaf), bytes(payload)
                )
        except (BlobError, ValueError, OSError) as e:
            log.warning("registry: dropped a blob message on %s: %s", message.topic.value, e)
            return
        base = f"{self.prefix}/{site}/{agent}"
        if state.missing:
            self.blob_requests.append((rid, state.missing))
            body = json.dumps({"sha256": state.sha256, "missing": state.missing})
            await client.publish(f"{base}/blobs/{rid}/missing", body, qos=1)
        if state.complete and self._photos_waiting.pop(rid, None) is not None:
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
    db: Path,
    prefix: str,
    client_id: str,
    stop: asyncio.Event,
    tls_context: Any = None,
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
        on_stored=printer,
        tls_context=tls_context,
    ) as registry:
        task = asyncio.create_task(registry.run(), name="registry")
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
