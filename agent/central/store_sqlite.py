"""The registry's SQLite backend: one file, for a desk, a demo or a small town.

`RegistryStore` is the blocking store (one connection, one thread);
`SqliteStore` runs it on a dedicated thread and is the `RecordStore` the MQTT
loop uses. Several processes may share one file (WAL, `BEGIN IMMEDIATE`, a
busy timeout). Depends on agent/central/store.py only, never on the MQTT loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.central.fastjson import record_text
from agent.central.store import (
    CONFLICTS_PER_ID,
    DEAD_LETTER_PAYLOAD_BYTES,
    DEAD_LETTER_ROWS,
    AgentSummary,
    Batch,
    Conflict,
    DeadLetter,
    Gap,
    PersonalAccess,
    Problems,
    SealedPersonal,
    Stored,
    accounted_for,
    canonical,
    carry_alerted,
    group_batches,
    log_gap_changes,
    plan_gaps,
    same_content,
    split_personal,
    verify_blob,
)
from agent.contract.validate import LOST_RANGE
from agent.errors import BlobMismatch, RegistryStoreError

T = TypeVar("T")

log = logging.getLogger(__name__)

# No index on records(site, agent, seq): no query of the registry reads one, and it was
# a third B-tree for every record stored, 3 µs of the registry's 27 per record in a
# drain (issue #18). A database made before keeps its `records_agent_seq`; a desk that
# queries by station and seq creates it (docs/central.md).
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
CREATE TABLE IF NOT EXISTS record_minutes (
    minute INTEGER NOT NULL, site TEXT NOT NULL, agent TEXT NOT NULL,
    records INTEGER NOT NULL, PRIMARY KEY (minute, site, agent)
) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, topic TEXT NOT NULL,
    site TEXT NOT NULL, agent TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS conflicts (
    record_id TEXT NOT NULL, digest TEXT NOT NULL, site TEXT NOT NULL, agent TEXT NOT NULL,
    first_site TEXT NOT NULL, first_agent TEXT NOT NULL, body TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (record_id, digest)
);
CREATE INDEX IF NOT EXISTS conflicts_at ON conflicts(at);
CREATE TABLE IF NOT EXISTS personal_sealed (
    record_id TEXT PRIMARY KEY, site TEXT NOT NULL, agent TEXT NOT NULL,
    captured_at TEXT NOT NULL, envelope TEXT NOT NULL, stored_at REAL NOT NULL,
    handed_off_at REAL
);
CREATE INDEX IF NOT EXISTS personal_sealed_stored_at ON personal_sealed(stored_at);
CREATE TABLE IF NOT EXISTS personal_access (
    at REAL NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL, record_ids TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

#: records stored per station and minute are kept this long (the dashboard shows 30)
MINUTES_KEPT = 120

_UPSERT_MINUTE = (
    "INSERT INTO record_minutes VALUES (?,?,?,?) ON CONFLICT(minute, site, agent)"
    " DO UPDATE SET records = records + excluded.records"
)

#: the database and the files SQLite keeps beside it: personal data, owner only
_FILES = ("", "-wal", "-shm", "-journal")


# ON CONFLICT(id), not OR IGNORE: that also ignores a NOT NULL violation, and a record
# never stored would be acked as a duplicate
_INSERT_RECORD = "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING"
_UPSERT_AGENT = (
    "INSERT INTO agents (site, agent, max_seq, records, last_stored_at, clock_synced)"
    " VALUES (?,?,?,?,?,?) ON CONFLICT(site, agent) DO UPDATE SET"
    " max_seq = excluded.max_seq, records = records + excluded.records,"
    " last_stored_at = excluded.last_stored_at,"
    " clock_synced = coalesce(excluded.clock_synced, clock_synced)"
)


def _row(r: dict[str, Any], site: str, agent: str, now: float) -> tuple[Any, ...]:
    """A record as its `records` row (the body as stored: `record_text`)."""
    return (
        r["id"],
        site,
        agent,
        int(r["seq"]),
        r["captured_at"],
        r["device"],
        r["kind"],
        r.get("source") or "device",
        record_text(r),
        now,
    )


_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """`PRAGMA journal_mode=WAL`, waited for like any other lock (up to `timeout_s`).

    Switching a database into WAL takes an exclusive lock, and SQLite answers SQLITE_BUSY
    at once there, without calling the busy handler: four registry processes opening one
    new file together lost that race in a third of the tries, and the loser exited
    "database is locked" (`make bench`, 2026-12-07)."""
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as e:
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            if code not in (_SQLITE_BUSY, _SQLITE_LOCKED) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def _drop_stored_at_index(db: sqlite3.Connection) -> None:
    """A database made before record_minutes: count its recent records into it, then drop
    the index on records(stored_at) that counted them (one B-tree insert per record,
    a fifth of the store's CPU, issue #18)."""
    has = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'records_stored_at'"
    ).fetchone()
    if has is None:
        return
    log.info(
        "registry database: counting the last %d minutes into record_minutes and dropping "
        "the index records_stored_at (once; a large database takes a while)",
        MINUTES_KEPT,
    )
    since = (int(time.time() // 60) - MINUTES_KEPT) * 60
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "INSERT OR REPLACE INTO record_minutes SELECT CAST(stored_at / 60 AS INTEGER),"
            " site, agent, count(*) FROM records WHERE stored_at >= ? GROUP BY 1, 2, 3",
            (since,),
        )
        db.execute("DROP INDEX records_stored_at")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class RegistryStore:
    """SQLite storage of the reference registry; used from one thread only.

    Several processes may share one file (WAL, `BEGIN IMMEDIATE`, a busy
    timeout): each transaction is serialised by SQLite's write lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._minute = 0  # the minute record_minutes was last pruned in

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryStoreError(
                f"{self.path}: cannot create its directory: {e.strerror or e}"
            ) from e
        try:
            # 0600 before SQLite opens it: SQLite gives its -wal and -shm the same mode
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._private()
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            db.execute("PRAGMA busy_timeout=30000")
            enable_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            # deleted content is overwritten with zeros, not left in free pages: a purged
            # sealed personal part is gone from the file bytes (after a checkpoint, the WAL too)
            db.execute("PRAGMA secure_delete=ON")
            db.executescript(_SCHEMA)
            _drop_stored_at_index(db)
            self._private()
        except (OSError, sqlite3.Error) as e:
            raise RegistryStoreError(f"{self.path}: {e}") from e
        self._db = db

    def _private(self) -> None:
        """The database, its WAL and SHM 0600 (an older registry made them 0644)."""
        for suffix in _FILES:
            f = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                if f.stat().st_mode & 0o777 != 0o600:
                    os.chmod(f, 0o600)

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
            groups = [
                (site, agent, [split_personal(sent) for sent in records])
                for (site, agent), records in group_batches(batches)
            ]
            max_seqs = self._max_seqs([(site, agent) for site, agent, _ in groups])
            inserted = self._insert_all(groups, now)
            agents = []
            for site, agent, split in groups:
                new = None if inserted is None else {r["id"] for r, _ in split}
                stored, row = self._store_agent(
                    site, agent, split, now, max_seqs.get((site, agent), 0), new
                )
                out.extend(stored)
                if row is not None:
                    agents.append(row)
            db.executemany(_UPSERT_AGENT, agents)
            minute = int(now // 60)
            db.executemany(_UPSERT_MINUTE, [(minute, a[0], a[1], a[3]) for a in agents])
            if minute != self._minute:
                db.execute("DELETE FROM record_minutes WHERE minute < ?", (minute - MINUTES_KEPT,))
            db.execute("COMMIT")
            self._minute = minute
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error | ValueError | TypeError | OverflowError):
                # ValueError ...: what sqlite3 raises binding a value it cannot store
                raise RegistryStoreError(f"{self.path}: {type(e).__name__}: {e}") from e
            raise
        return out

    def _max_seqs(self, agents: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Each agent's highest stored seq, in one query per 400 agents (not one each)."""
        out: dict[tuple[str, str], int] = {}
        for i in range(0, len(agents), 400):
            part = agents[i : i + 400]
            values = ",".join(["(?,?)"] * len(part))
            for site, agent, max_seq in self.db.execute(
                f"SELECT site, agent, max_seq FROM agents WHERE (site, agent) IN (VALUES {values})",
                [v for pair in part for v in pair],
            ):
                out[(site, agent)] = int(max_seq)
        return out

    def _insert_all(
        self, groups: list[tuple[str, str, list[tuple[dict[str, Any], Any]]]], now: float
    ) -> bool | None:
        """Every record of the commit in one `executemany` (one-record messages from many
        stations: one call, not one per station). True if every one was new; None (and
        nothing inserted) if any was known, for `_insert_new` to sort out per station."""
        if len(groups) < 2:
            return None  # one station: `_insert_new` does the same in one call
        rows = [_row(r, site, agent, now) for site, agent, split in groups for r, _ in split]
        db = self.db
        db.execute("SAVEPOINT commit_all")
        if db.executemany(_INSERT_RECORD, rows).rowcount == len(rows):
            db.execute("RELEASE commit_all")
            return True
        db.execute("ROLLBACK TO commit_all")
        db.execute("RELEASE commit_all")
        return None

    def _store_agent(
        self,
        site: str,
        agent: str,
        split: list[tuple[dict[str, Any], Any]],
        now: float,
        max_seq: int,
        inserted: set[str] | None,
    ) -> tuple[list[Stored], tuple[Any, ...] | None]:
        """One station's records of the commit: what became of each, and its `agents` row
        (None if nothing was new). `inserted`: the ids already inserted, if known."""
        db = self.db
        if inserted is None:
            inserted = self._insert_new(site, agent, split, now)
        if len(inserted) == len(split):
            # every record new, each id once (the usual case): nothing to look up per record
            out = [Stored(site, agent, r, True) for r, _ in split]
            news = split
        else:
            out, news = [], []
            for r, sealed in split:
                new = r["id"] in inserted
                if new:
                    inserted.discard(r["id"])  # the same id twice in one message: once new
                    news.append((r, sealed))
                conflict = not new and self._conflict(site, agent, r, now)
                out.append(Stored(site, agent, r, new, conflict))
        new_seqs = [int(r["seq"]) for r, _ in news]
        sealed_rows = [
            (r["id"], site, agent, r["captured_at"], json.dumps(sealed), now)
            for r, sealed in news
            if sealed is not None
        ]
        if sealed_rows:
            db.executemany(
                "INSERT OR IGNORE INTO personal_sealed VALUES (?,?,?,?,?,?,NULL)", sealed_rows
            )
        # seqs named by lost_range records
        accounted = [s for r, _ in news if r["kind"] == LOST_RANGE for s in accounted_for(r)]
        clock: int | None = None  # the last new record's that says
        for r, _ in reversed(news):
            if isinstance(c := r.get("clock_synced"), bool):
                clock = int(c)
                break
        if not new_seqs:
            return out, None
        # only the gaps these seqs can fall in (gaps are disjoint): two index ranges
        # on the primary key, so a commit costs what it touches, however many are open;
        # none at all when every seq is above the highest stored (the usual case: a gap
        # lies below max_seq, and plan_gaps leaves the ones below untouched)
        seen = new_seqs + accounted
        lo, hi = min(seen), max(seen)
        rows = (
            []
            if lo > max_seq
            else db.execute(
                "SELECT first, last, opened_at, alerted_at FROM gaps WHERE site = ?"
                " AND agent = ? AND first BETWEEN coalesce((SELECT max(first) FROM gaps"
                " WHERE site = ? AND agent = ? AND first <= ?), ?) AND ? ORDER BY first",
                (site, agent, site, agent, lo, lo, hi),
            ).fetchall()
        )
        old = [(int(a), int(b), float(t)) for a, b, t, _ in rows]
        gaps, max_seq = plan_gaps(old, max_seq, seen, now)
        if gaps != old:
            log_gap_changes(site, agent, old, gaps)
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
        return out, (site, agent, max_seq, len(new_seqs), now, clock)

    def _insert_new(
        self, site: str, agent: str, split: list[tuple[dict[str, Any], Any]], now: float
    ) -> set[str]:
        """Insert the records, return the ids that were new. One `executemany` for the
        whole message (the common case, every record new); when some were known already
        (a re-send), that is undone to a savepoint and each record is inserted on its own
        to learn which (issue #18: one INSERT call per record was a quarter of the CPU)."""
        db = self.db
        rows = [_row(r, site, agent, now) for r, _ in split]
        db.execute("SAVEPOINT message")
        if db.executemany(_INSERT_RECORD, rows).rowcount == len(rows):
            db.execute("RELEASE message")
            return {row[0] for row in rows}
        db.execute("ROLLBACK TO message")
        db.execute("RELEASE message")
        return {row[0] for row in rows if db.execute(_INSERT_RECORD, row).rowcount == 1}

    def _conflict(self, site: str, agent: str, r: dict[str, Any], now: float) -> bool:
        """A known id: a duplicate if the content is the same, else kept as a conflict."""
        row = self.db.execute(
            "SELECT site, agent, body FROM records WHERE id = ?", (r["id"],)
        ).fetchone()
        if row is None or ((row[0], row[1]) == (site, agent) and same_content(row[2], r)):
            return False
        body = canonical(r)
        n = self.db.execute(
            "SELECT count(*) FROM conflicts WHERE record_id = ?", (r["id"],)
        ).fetchone()[0]
        if int(n) < CONFLICTS_PER_ID:
            self.db.execute(
                "INSERT OR IGNORE INTO conflicts VALUES (?,?,?,?,?,?,?,?)",
                (r["id"], _digest(body), site, agent, row[0], row[1], body, now),
            )
        return True

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Keep refused messages, the newest `DEAD_LETTER_ROWS`; one transaction."""
        if not letters:
            return
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO dead_letters (at, topic, site, agent, reason, payload)"
                    " VALUES (?,?,?,?,?,?)",
                    [
                        (
                            d.at,
                            d.topic,
                            d.site,
                            d.agent,
                            d.reason,
                            bytes(d.payload[:DEAD_LETTER_PAYLOAD_BYTES]),
                        )
                        for d in letters
                    ],
                )
                db.execute(
                    "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
                    (DEAD_LETTER_ROWS,),
                )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, ValueError) as e:
            raise RegistryStoreError(f"{self.path}: dead letters: {e}") from e

    def problems(self, recent: int = 20) -> Problems:
        db = self.db
        try:
            dead = int(db.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()[0])
            conflicts = int(db.execute("SELECT count(*) FROM conflicts").fetchone()[0])
            letters = [
                DeadLetter(str(t), str(r), bytes(p), float(at), str(s), str(a))
                for at, t, s, a, r, p in db.execute(
                    "SELECT at, topic, site, agent, reason, payload FROM dead_letters"
                    " ORDER BY id DESC LIMIT ?",
                    (recent,),
                )
            ]
            rows = [
                Conflict(str(i), str(s), str(a), str(fs), str(fa), str(b), float(at))
                for i, s, a, fs, fa, b, at in db.execute(
                    "SELECT record_id, site, agent, first_site, first_agent, body, at"
                    " FROM conflicts ORDER BY at DESC LIMIT ?",
                    (recent,),
                )
            ]
        except sqlite3.Error as e:
            raise RegistryStoreError(f"{self.path}: {e}") from e
        return Problems(dead, conflicts, letters, rows)

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
            "SELECT site, agent, minute, records FROM record_minutes WHERE minute >= ?",
            (start // 60,),
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

    # -- sealed personal parts ----------------------------------------------------------

    def personal_pending(self, *, include_handed_off: bool = False) -> list[SealedPersonal]:
        where = "" if include_handed_off else " WHERE handed_off_at IS NULL"
        try:
            rows = self.db.execute(
                "SELECT record_id, site, agent, captured_at, envelope, stored_at, handed_off_at"
                f" FROM personal_sealed{where} ORDER BY stored_at, record_id"
            ).fetchall()
        except sqlite3.Error as e:
            raise RegistryStoreError(f"{self.path}: {e}") from e
        return [
            SealedPersonal(str(i), str(s), str(a), str(c), json.loads(e), float(t), h)
            for i, s, a, c, e, t, h in rows
        ]

    def _log_access(self, who: str, action: str, ids: Sequence[str], detail: str) -> None:
        self.db.execute(
            "INSERT INTO personal_access VALUES (?,?,?,?,?)",
            (time.time(), who, action, json.dumps(list(ids)), detail),
        )

    def mark_handed_off(self, record_ids: Sequence[str], who: str, detail: str) -> None:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "UPDATE personal_sealed SET handed_off_at = ? WHERE record_id = ?",
                    [(time.time(), rid) for rid in record_ids],
                )
                self._log_access(who, "export", record_ids, detail)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise RegistryStoreError(f"{self.path}: {e}") from e

    def purge_personal(
        self, older_than_s: float, *, who: str, handed_off: bool = False
    ) -> list[str]:
        """Delete, log, commit, then checkpoint the WAL into the file and truncate it:
        with `secure_delete` the ciphertext is then gone from both files' bytes."""
        db = self.db
        cutoff = time.time() - older_than_s
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "DELETE FROM personal_sealed WHERE stored_at <= ?"
                    + (" OR handed_off_at IS NOT NULL" if handed_off else "")
                    + " RETURNING record_id",
                    (cutoff,),
                ).fetchall()
                ids = sorted(str(r[0]) for r in rows)
                if ids:
                    self._log_access(who, "purge", ids, f"older than {older_than_s:.0f} s")
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            if ids:
                busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:
                    log.warning(
                        "%s: personal data purged, but a reader kept the WAL from being "
                        "truncated; it is overwritten at the next checkpoint",
                        self.path,
                    )
        except sqlite3.Error as e:
            raise RegistryStoreError(f"{self.path}: {e}") from e
        return ids

    def personal_access(self) -> list[PersonalAccess]:
        return [
            PersonalAccess(float(t), str(w), str(a), json.loads(i), str(d))
            for t, w, a, i, d in self.db.execute(
                "SELECT at, who, action, record_ids, detail FROM personal_access ORDER BY rowid"
            )
        ]


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


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

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        await self._run(self.sync.dead_letter, letters)

    async def problems(self, recent: int = 20) -> Problems:
        return await self._run(self.sync.problems, recent)

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

    async def personal_pending(self, *, include_handed_off: bool = False) -> list[SealedPersonal]:
        return await self._run(self.sync.personal_pending, include_handed_off=include_handed_off)

    async def mark_handed_off(self, record_ids: Sequence[str], who: str, detail: str) -> None:
        await self._run(self.sync.mark_handed_off, record_ids, who, detail)

    async def purge_personal(
        self, older_than_s: float, *, who: str, handed_off: bool = False
    ) -> list[str]:
        return await self._run(
            self.sync.purge_personal, older_than_s, who=who, handed_off=handed_off
        )

    async def personal_access(self) -> list[PersonalAccess]:
        return await self._run(self.sync.personal_access)
