"""The outbox: the only owner of SQLite and the only truth about delivery.

Every read becomes a row here before the operator hears an ACK. Records move
pending -> sent (the broker's PUBACK) -> confirmed (the registry's ack), and
are purged `retention_days` after confirmation. Only "confirmed" is written to the row;
"sent" is kept in memory (agent/station/sent_ranges.py): it only times resends and is
discarded at every connect. WAL with synchronous=FULL: a
commit that returned survives kill -9 and power loss.

All SQLite work runs in one dedicated thread. Concurrent `append()` calls
that arrive while a commit is in progress are committed together in the next
transaction (group commit): one fsync for many records.

A damaged database is never abandoned: it is moved aside and its readable
unconfirmed rows are copied into a fresh one (agent/station/salvage.py); what
could not be read goes out as `lost_range` records. `last_seq` and `session`
are also bounded by a side file (agent/station/counters.py), so even a garbage or
missing database never reuses a seq. A full disk is a state (`disk_full`), not
a crash: appends are refused, bookkeeping is retried with backoff. After a crash
the start-up `quick_check` runs after READY, in the background; records are handed
out for sending only once it has passed or its salvage is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from agent._aio import Backoff
from agent.contract.blobs import PHOTO_KIND
from agent.contract.records import Read, Record, iso_ms, uuid7
from agent.errors import OutboxDiskFull, OutboxError, OutboxFull
from agent.station import counters
from agent.station.salvage import COLUMNS, Salvaged, salvage
from agent.station.sealing import Sealer
from agent.station.sent_ranges import SentRanges, runs

if TYPE_CHECKING:  # cryptography is loaded only where personal data is stored
    from agent.personal_seal import PersonalSealer

log = logging.getLogger(__name__)
T = TypeVar("T")

_TO_REGISTRY = "sealed_to_registry"
"""At rest, a personal part already sealed to the registry is `{_TO_REGISTRY: envelope}`
(under the outbox key too); a card's personal part never has that single key."""

PENDING, SENT, CONFIRMED = 0, 1, 2
"""Row states. SENT (1) was written by earlier releases and is read as pending now: "sent"
lives in `Outbox._sent` (issue #18)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    captured_at  TEXT NOT NULL,
    device       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    source       TEXT NOT NULL,
    operator     TEXT,
    clock_synced INTEGER,
    data         TEXT NOT NULL,
    sealed       BLOB,
    bytes        INTEGER NOT NULL,
    state        INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    sent_at      REAL,
    confirmed_at REAL
);
CREATE INDEX IF NOT EXISTS records_unconfirmed ON records(seq) WHERE state < 2;
DROP INDEX IF EXISTS records_sent;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# records_sent (sent_at WHERE state = 1) was the index of the "sent" rows; an older release
# rolled back to creates it again


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What telemetry, status and `madoguchi outbox stats` show."""

    pending: int
    sent: int
    unconfirmed: int
    confirmed: int
    oldest_unconfirmed_age_s: float | None
    db_bytes: int
    max_bytes: int
    last_seq: int
    session: int
    recovered_from: str | None
    disk_full: bool = False
    salvaged: int = 0
    """unconfirmed rows copied out of damaged databases into this one"""
    lost_seqs: int = 0
    """seqs that could not be read from a damaged database (sent as `lost_range` records)"""
    lost_ranges: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the outbox connection's page cache, KiB
CACHE_KIB = 512


@dataclass(slots=True)
class Outgoing:
    """A record as the uplink sends it: its seq, id and wire JSON (UTF-8), and the whole
    `Record` only for the kinds that need more than the bytes (see `next_wire_batch`).
    Not frozen: a frozen dataclass costs 1.4 µs more to build, per record drained."""

    seq: int
    id: str
    wire: bytes
    record: Record | None = None


_KINDS_WITH_RECORD = frozenset({PHOTO_KIND})
"""Kinds whose sent records the uplink hands on (agent/station/blobs.py PHOTO_KIND)."""

# The wire form of `Record.wire_json()` built by SQLite from the stored columns: `data` is
# spliced in as the text the outbox stored (compact JSON), the strings quoted by json_quote.
_WIRE_SQL = (
    "CAST('{\"id\":' || json_quote(id) || ',\"seq\":' || seq"
    " || ',\"captured_at\":' || json_quote(captured_at)"
    " || ',\"device\":' || json_quote(device)"
    " || ',\"kind\":' || json_quote(kind)"
    " || ',\"source\":' || json_quote(source)"
    " || CASE WHEN operator IS NULL THEN '' ELSE ',\"operator\":' || json_quote(operator) END"
    " || CASE clock_synced WHEN 1 THEN ',\"clock_synced\":true'"
    " WHEN 0 THEN ',\"clock_synced\":false' ELSE '' END"
    " || ',\"data\":' || data || '}' AS BLOB)"
)
_OUTGOING_COLUMNS = (
    "seq, id, sealed IS NOT NULL OR kind IN ("
    + ",".join("'" + k.replace("'", "''") + "'" for k in sorted(_KINDS_WITH_RECORD))
    + f"), {_WIRE_SQL}"
)
"""`next_wire_batch`'s columns: seq, id, whether the whole `Record` is needed, the wire."""

_RECORD_COLUMNS = "id, seq, captured_at, device, kind, source, data, sealed, operator, clock_synced"
"""The columns of a `Record`, in `Outbox._record`'s order."""


@dataclass(slots=True)
class _Pending:
    read: Read
    operator: str | None
    future: asyncio.Future[Record]


class Outbox:
    """Durable, ordered store of records. Open with `async with Outbox(...)`."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 2_000_000_000,
        sealer: Sealer | None = None,
        clock: Callable[[], float] = time.time,
        integrity_check_interval_s: float | None = None,
        personal_sealer: PersonalSealer | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.integrity_check_interval_s = integrity_check_interval_s
        self.recovered_from: Path | None = None
        #: the last write failed for want of space; cleared by the next write that succeeds
        self.disk_full = False
        self.integrity_checks = 0
        self._counters_path = counters.side_path(path)
        self._unconfirmed_from = 0
        self._reserved = 0  # counters.Counters.seq_reserved as last written
        self._starting = False
        self._salvaged = self._lost_seqs = self._lost_ranges = 0
        self._checker: asyncio.Task[None] | None = None
        # after a crash the start-up quick_check runs after READY, in the background;
        # nothing is handed out for sending until it has passed (or salvaged the file)
        self._check_at_start = False
        self._checked = asyncio.Event()
        self._start_check: asyncio.Task[None] | None = None
        self._alerts: list[dict[str, Any]] = []
        self._sealer = sealer
        # seals `personal` to the registry's key once, at the commit (the record id is
        # its associated data): every re-send carries the same ciphertext
        self._personal_sealer = personal_sealer
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self._last_seq = 0
        self._session = 0
        self._page_size = 4096
        # rows by state, kept as rows change state (rebuilt once per connection): stats()
        # runs on the committing thread and must not count a million rows (issue #18)
        self._n_pending = self._n_sent = self._n_confirmed = 0
        # seqs taken by the broker and when; `_n_sent` counts the unconfirmed rows inside
        self._sent = SentRanges()

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        self._committer = asyncio.create_task(self._commit_loop(), name="outbox-committer")
        if self._check_at_start:
            self._start_check = asyncio.create_task(
                self._check_at_start_task(), name="outbox-start-check"
            )
        else:
            self._checked.set()
        if self.integrity_check_interval_s:
            self._checker = asyncio.create_task(self._check_loop(), name="outbox-integrity")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
        for task in (self._start_check, self._checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._committer is not None:
            await asyncio.shield(self._committer)
        await self._run(self._close)
        assert self._executor is not None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise OutboxError(f"{self.path}: outbox is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the outbox thread. A database found corrupt while running is moved
        aside and salvaged, as at start, and `fn` runs again in the fresh one; every
        SQLite error leaves as an `OutboxError` (`OutboxDiskFull` for want of space)."""
        try:
            try:
                result = self._translated(fn, *args)
            except OutboxError as e:
                if self._db is None or not _is_corruption(e.__cause__):
                    raise
                self._recover(f"found corrupt while running: {e.__cause__}")
                result = self._translated(fn, *args)
        except OutboxDiskFull:
            if not self.disk_full:
                log.error("outbox %s: DISK FULL: scans are refused until space returns", self.path)
            self.disk_full = True
            raise
        if self.disk_full and fn in (self._commit, self._bump_session_db):
            log.warning("outbox %s: disk space is back, storing scans again", self.path)
            self.disk_full = False
        return result

    def _translated(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as e:
            raise _translate(e, f"{self.path}: {getattr(fn, '__name__', '?').strip('_')}") from e
        except UnicodeDecodeError as e:  # a damaged page that still parses as a row
            raise OutboxError(f"{self.path}: undecodable text in a row: {e}") from e
        except OutboxDiskFull:
            raise
        except OutboxError as e:
            cause = e.__cause__
            io = isinstance(cause, sqlite3.Error) and _code(cause) == _SQLITE_IOERR
            if io and _space_low(self.path):
                raise OutboxDiskFull(f"{self.path}: disk full ({cause})") from cause
            raise

    def _recover(self, reason: str) -> None:
        """Close the damaged database, move it aside with salvage, continue in a fresh one."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._move_aside(reason)
        self._db = self._connect()
        self._reserved = max(self._reserved, self._last_seq)
        self._write_counters()

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(f"{self.path.parent}: cannot create data directory: {e}") from e
        side = counters.load(self._counters_path)
        self._reserved = side.seq_reserved
        self._session = max(self._session, side.session)
        self._unconfirmed_from = side.unconfirmed_from
        self._starting = True
        try:
            self._open_db(side)
        finally:
            self._starting = False
        self._reserved = max(self._reserved, self._last_seq)
        self._write_counters()

    def _open_db(self, side: counters.Counters) -> None:
        fresh = _salvage_path(self.path)
        if fresh.exists():
            if self.path.exists():
                _unlink_db(fresh)  # a salvage cut short: the damaged file is still in place
            else:
                # cut short between moving the damaged file aside and this rename
                log.warning("outbox %s: finishing an interrupted salvage", self.path)
                os.replace(fresh, self.path)
                _fsync_dir(self.path.parent)
        existed = self.path.exists()
        clean = _take_clean_mark(self.path)
        # quick_check reads every page (60 % of READY with 1M queued, issue #18): it
        # runs after READY, before the first send (`integrity_checked`)
        self._check_at_start = existed and not clean
        if not existed:
            log.info("outbox %s: new database, quick_check skipped", self.path)
        elif clean:
            log.info(
                "outbox %s: closed cleanly and unchanged since, quick_check skipped", self.path
            )
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as e:
            if not (_is_corruption(e) or _code(e) == 0):  # locked, full, I/O: not damage
                raise _translate(e, f"{self.path}: cannot open the outbox") from e
            self._move_aside(str(e))
            self._check_at_start = False
            self._db = self._connect()
        if not existed and side.seq_reserved and self.recovered_from is None:
            # the database is gone but the side file says records were stored
            first = max(1, side.unconfirmed_from)
            self._last_seq = max(self._last_seq, side.seq_reserved)
            log.error(
                "outbox %s is missing; the counters say seq %d..%d may not have been "
                "confirmed: reported as lost",
                self.path,
                first,
                side.seq_reserved,
            )
            self._insert_lost(self._db, [(first, side.seq_reserved)], "database missing", None)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.DatabaseError(f"cannot switch to WAL (journal_mode={mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            # 512 KiB of page cache, not SQLite's 2 MiB: a batch (500 records, ~200 kB of
            # pages) is read, marked sent and confirmed while its pages are still cached,
            # and a Pi's memory is kept for the rest (RSS while draining, issue #18)
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.executescript(_SCHEMA)
            self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
            row = db.execute(
                "SELECT max(coalesce((SELECT value FROM meta WHERE key='last_seq'), 0),"
                " coalesce((SELECT max(seq) FROM records), 0))"
            ).fetchone()
            self._last_seq = max(self._last_seq, int(row[0]))
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            self._session = max(self._session, int(meta.get("session", 0)))
            self._salvaged = int(meta.get("salvaged", 0))
            self._lost_seqs = int(meta.get("lost_seqs", 0))
            self._lost_ranges = int(meta.get("lost_ranges", 0))
            self._count_states(db)
        except BaseException:
            db.close()
            raise
        return db

    def _count_states(self, db: sqlite3.Connection) -> None:
        """The state counters from the rows: once per connection, never per status call.
        A new connection has nothing sent (a fresh database is all pending)."""
        total = db.execute("SELECT count(*) FROM records").fetchone()[0]
        unconfirmed = db.execute("SELECT count(*) FROM records WHERE state < 2").fetchone()[0]
        self._sent.clear()
        self._n_pending, self._n_sent = unconfirmed, 0
        self._n_confirmed = total - unconfirmed

    def _move_aside(self, reason: str) -> None:
        """Keep a broken database for forensics (never deleted), copy its readable
        unconfirmed rows into a fresh one, report the seqs that could not be read.

        Crash-safe in this order: the fresh database is filled and committed under
        `outbox.db.salvage` while the damaged file is still in place; then the damaged
        file is renamed aside and the fresh one into place. A crash before the first
        rename salvages again at the next start; between the two, `_open` finishes it.
        """
        salvaged_seq, session = _salvage_counters(self.path)
        self._last_seq = max(self._last_seq, salvaged_seq)  # at run time we know it already
        self._session = max(session, self._session)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        fresh = _salvage_path(self.path)
        _unlink_db(fresh)  # a partial one from a crash during an earlier salvage
        # running, we know the last seq handed out; at start only the reservation bounds it
        known = max(self._last_seq, self._reserved) if self._starting else self._last_seq
        got = self._fill_fresh(fresh, target, known)
        log.error(
            "outbox %s could not be used (%s): moved aside to %s; %d unconfirmed record(s) "
            "salvaged, %d seq(s) lost in %d range(s); continuing in a fresh database from seq %d",
            self.path,
            reason,
            target,
            got.count,
            got.lost_count,
            len(got.lost),
            self._last_seq + 1,
        )
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        os.replace(fresh, self.path)
        _fsync_dir(self.path.parent)
        self.recovered_from = target
        self._alerts.append(
            {
                "type": "outbox_recovered",
                "moved_aside": str(target),
                "salvaged": got.count,
                "lost_seqs": got.lost_count,
            }
        )

    def _fill_fresh(self, fresh: Path, target: Path, known_last_seq: int) -> Salvaged:
        """The fresh database at `fresh`: schema, counters, the salvaged rows (to be sent
        again) and one `lost_range` record per range, in one durable transaction, with a
        rollback journal (no WAL left beside it when it is renamed into place)."""
        db = sqlite3.connect(fresh, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("BEGIN IMMEDIATE")

            def sink(rows: list[tuple[Any, ...]]) -> None:
                db.executemany(
                    f"INSERT OR IGNORE INTO records ({COLUMNS}) VALUES ({','.join('?' * 15)})",
                    [(*r[:11], PENDING, r[12], None, None) for r in rows],
                )

            got = salvage(
                self.path,
                known_last_seq=known_last_seq,
                unconfirmed_from=self._unconfirmed_from,
                sink=sink,
            )
            self._last_seq = max(self._last_seq, got.last_seq)
            self._session = max(self._session, got.session)
            self._salvaged += got.count
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    ("last_seq", self._last_seq),
                    ("session", self._session),
                    ("salvaged", self._salvaged),
                ],
            )
            self._insert_lost(db, got.lost, "unreadable", target, transaction=False)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            raise _translate(e, f"{fresh}: cannot fill the fresh database") from e
        finally:
            db.close()
        return got

    def _insert_lost(
        self,
        db: sqlite3.Connection,
        ranges: list[tuple[int, int]],
        reason: str,
        moved_aside: Path | None,
        *,
        transaction: bool = True,
    ) -> None:
        """One `lost_range` record per range (docs/CONTRACT.md "lost-range record")."""
        if not ranges:
            return
        now = self._clock()
        captured = iso_ms(datetime.fromtimestamp(now, UTC))
        rows = []
        for first, last in ranges:
            self._last_seq += 1
            data = json.dumps(
                {
                    "first_seq": first,
                    "last_seq": last,
                    "count": last - first + 1,
                    "reason": reason,
                    "moved_aside": None if moved_aside is None else moved_aside.name,
                },
                separators=(",", ":"),
            )
            rows.append(
                (
                    self._last_seq,
                    str(uuid7(int(now * 1000))),
                    captured,
                    "outbox",
                    "lost_range",
                    "agent",
                    None,
                    None,
                    data,
                    None,
                    len(data) + 200,
                    now,
                )
            )
            self._lost_seqs += last - first + 1
        self._lost_ranges += len(ranges)
        if transaction:
            db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO records (seq, id, captured_at, device, kind, source, operator,"
            " clock_synced, data, sealed, bytes, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                ("last_seq", self._last_seq),
                ("lost_seqs", self._lost_seqs),
                ("lost_ranges", self._lost_ranges),
            ],
        )
        if transaction:
            db.execute("COMMIT")
        if db is self._db:  # a fresh database is counted when it is connected
            self._n_pending += len(rows)

    def _write_counters(self, *, strict: bool = False) -> None:
        """The side file. `strict` (a new seq reservation) raises on failure, so the
        commit that needed it is refused; otherwise a failure is logged: the database
        still holds the same counters."""
        try:
            counters.store(
                self._counters_path,
                counters.Counters(self._reserved, self._session, self._unconfirmed_from),
            )
        except OutboxError as e:
            if strict:
                raise
            log.warning("outbox %s: %s (the database still holds them)", self.path, e)

    def _close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                low = self._db.execute("SELECT min(seq) FROM records WHERE state < 2").fetchone()
                self._unconfirmed_from = int(low[0] or self._last_seq + 1)
                self._write_counters()
            self._db.close()
            self._db = None
            if self._checked.is_set():  # never vouch for a file whose check did not finish
                _leave_clean_mark(self.path)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"{self.path}: outbox is not open")
        return self._db

    # -- appending (group commit) ---------------------------------------------

    async def append(self, read: Read, *, operator: str | None = None) -> Record:
        """Store a read durably; return its record once the commit is on disk.

        Raises `OutboxFull` when `max_bytes` is reached, `OutboxError` when the
        commit failed. Either way the read was not stored: the operator gets a NAK.
        """
        if self._closing:
            raise OutboxError(f"{self.path}: outbox is closing")
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(read, operator, fut))
        self._wake.set()
        return await asyncio.shield(fut)

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                try:
                    results = await self._run(self._commit, batch)
                except Exception as e:  # the whole transaction failed
                    err = e if isinstance(e, OutboxError) else OutboxError(f"{self.path}: {e}")
                    results = [err] * len(batch)
                for item, result in zip(batch, results, strict=True):
                    if item.future.done():
                        continue
                    if isinstance(result, Exception):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result)
            if self._closing and not self._queue:
                return

    def _commit(self, batch: list[_Pending]) -> list[Record | Exception]:
        db = self.db
        now = self._clock()
        used = self._used_bytes()
        results: list[Record | Exception] = []
        rows = []
        seq = self._last_seq
        for item in batch:
            read = item.read
            data = json.dumps(read.data, ensure_ascii=False, separators=(",", ":"))
            sealed: bytes | None = None
            if read.personal is not None and self._sealer is None:
                results.append(
                    OutboxError(
                        f"{read.device}: read carries personal data but no "
                        "outbox.key_file is configured to encrypt it"
                    )
                )
                continue
            size = len(data) + 200 + (0 if read.personal is None else 1024)
            if used + size > self.max_bytes:
                results.append(
                    OutboxFull(f"{self.path}: outbox full ({used} of {self.max_bytes} bytes)")
                )
                continue
            used += size
            seq += 1
            rid = str(uuid7(int(now * 1000)))
            to_registry: dict[str, Any] | None = None
            if read.personal is not None and self._sealer is not None:
                at_rest: Any = read.personal
                if self._personal_sealer is not None:
                    to_registry = self._personal_sealer.seal(rid, read.personal)
                    at_rest = {_TO_REGISTRY: to_registry}
                plain = json.dumps(at_rest, ensure_ascii=False).encode()
                sealed = self._sealer.seal(plain, aad=rid.encode())
            captured = iso_ms(read.captured_at)
            rows.append(
                (
                    seq,
                    rid,
                    captured,
                    read.device,
                    read.kind,
                    read.source,
                    item.operator,
                    read.clock_synced,
                    data,
                    sealed,
                    size,
                    now,
                )
            )
            results.append(
                Record(
                    rid,
                    seq,
                    captured,
                    read.device,
                    read.kind,
                    read.source,
                    read.data,
                    read.personal if to_registry is None else None,
                    item.operator,
                    read.clock_synced,
                    data_json=data,
                    personal_sealed=to_registry,
                )
            )
        if not rows:
            return results
        if seq > self._reserved:  # durable before any seq above the old reservation is used
            low = db.execute("SELECT min(seq) FROM records WHERE state < 2").fetchone()[0]
            self._unconfirmed_from = int(low or self._last_seq + 1)
            before = self._reserved
            self._reserved = seq + counters.RESERVE
            try:
                self._write_counters(strict=True)
            except OutboxError:
                self._reserved = before
                raise
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO records (seq, id, captured_at, device, kind, source, operator,"
                " clock_synced, data, sealed, bytes, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (seq,))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise _translate(e, f"{self.path}: commit failed") from e
        self._last_seq = seq
        self._n_pending += len(rows)
        return results

    def _used_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * self._page_size)

    # -- delivery state ---------------------------------------------------------

    async def next_batch(self, max_records: int, resend_after_s: float) -> list[Record]:
        """Unconfirmed records due for (re)sending, in seq order."""
        await self.integrity_checked()
        return await self._run(self._next_batch, max_records, resend_after_s)

    def _next_batch(self, max_records: int, resend_after_s: float) -> list[Record]:
        rows = self._due(_RECORD_COLUMNS, max_records, resend_after_s, 0)
        return [self._record(row) for row in rows]

    def _due(
        self, columns: str, max_records: int, resend_after_s: float, after_seq: int
    ) -> list[tuple[Any, ...]]:
        """The unconfirmed rows above `after_seq` that are not sent, or were sent more than
        `resend_after_s` ago, in seq order: the gaps between the sent ranges not yet due,
        each read from the unconfirmed index (while draining, one read above the last)."""
        due = self._clock() - resend_after_s
        db, low = self.db, after_seq
        out: list[tuple[Any, ...]] = []
        for first, last in self._sent.not_due(after_seq, due):
            if first > low + 1:
                out += db.execute(
                    f"SELECT {columns} FROM records WHERE state < 2 AND seq > ? AND seq < ?"
                    " ORDER BY seq LIMIT ?",
                    (low, first, max_records - len(out)),
                ).fetchall()
                if len(out) >= max_records:
                    return out
            low = max(low, last)
        out += db.execute(
            f"SELECT {columns} FROM records WHERE state < 2 AND seq > ? ORDER BY seq LIMIT ?",
            (low, max_records - len(out)),
        ).fetchall()
        return out

    async def next_wire_batch(
        self, max_records: int, resend_after_s: float, after_seq: int = 0
    ) -> list[Outgoing]:
        """`next_batch` for the uplink: each record's wire JSON built by SQLite from the
        stored text (`data` is never parsed); a full `Record` only where the uplink needs
        one besides the bytes (photos, for their blobs) or the personal part must be opened.
        `after_seq`: only records above it (those up to it are in flight, not yet sent)."""
        await self.integrity_checked()
        return await self._run(self._next_wire_batch, max_records, resend_after_s, after_seq)

    def _next_wire_batch(
        self, max_records: int, resend_after_s: float, after_seq: int = 0
    ) -> list[Outgoing]:
        rows = self._due(_OUTGOING_COLUMNS, max_records, resend_after_s, after_seq)
        # one comprehension, no branch per row: this runs for every record drained
        out = [Outgoing(seq, rid, wire) for seq, rid, whole, wire in rows]
        for i, (seq, _, whole, _) in enumerate(rows):
            if whole:
                record = self._record_at(seq)
                out[i] = Outgoing(seq, record.id, record.wire_json().encode(), record)
        return out

    def _record_at(self, seq: int) -> Record:
        row = self.db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE seq = ?", (seq,)
        ).fetchone()
        return self._record(row)

    def _record(self, row: tuple[Any, ...]) -> Record:
        rid, seq, captured, device, kind, source, data, sealed, operator, synced = row
        personal = None
        if sealed is not None:
            if self._sealer is None:
                raise OutboxError(
                    f"{self.path}: record {seq} holds encrypted personal data but no "
                    "outbox.key_file is configured"
                )
            personal = json.loads(self._sealer.open(sealed, aad=rid.encode()))
        to_registry = None
        if isinstance(personal, dict) and list(personal) == [_TO_REGISTRY]:
            to_registry, personal = personal[_TO_REGISTRY], None
        return Record(
            rid,
            seq,
            captured,
            device,
            kind,
            source,
            json.loads(data),
            personal,
            operator,
            None if synced is None else bool(synced),
            data_json=data,
            personal_sealed=to_registry,
        )

    async def _bookkeeping(self, fn: Callable[..., T], *args: Any) -> T:
        """A delivery-state write, retried with backoff while the disk is full: the
        station stays up and the write lands when space returns (cancel to give up)."""
        backoff = Backoff(first=0.2, cap=5.0)
        while True:
            try:
                return await self._run(fn, *args)
            except OutboxDiskFull:
                await asyncio.sleep(backoff.next())

    async def mark_sent(self, seqs: Iterable[int]) -> None:
        await self._bookkeeping(self._mark_sent, list(seqs))

    def _mark_sent(self, seqs: list[int]) -> None:
        """In memory (`_sent`), no write: the seqs taken by the broker, one range per run.
        Only the unconfirmed rows that were not already sent are counted as moving; a seq
        above the last one stored is ignored (it would count as sent when stored)."""
        ordered = sorted(set(seqs))
        del ordered[bisect_right(ordered, self._last_seq) :]
        if not ordered:
            return
        now = self._clock()
        moved = 0
        for first, last in runs(ordered):
            for a, b in self._sent.set(first, last, now):
                moved += self._unconfirmed_between(a, b)
        self._n_pending -= moved
        self._n_sent += moved

    def _unconfirmed_between(self, first: int, last: int) -> int:
        """Unconfirmed rows with seq in `[first, last]`, from the unconfirmed index."""
        row = self.db.execute(
            "SELECT count(*) FROM records WHERE state < 2 AND seq BETWEEN ? AND ?", (first, last)
        ).fetchone()
        return int(row[0])

    async def confirm(self, ids: Iterable[str]) -> int:
        """Mark records confirmed by the registry; drop their personal data now."""
        return await self._bookkeeping(self._confirm, list(ids))

    def _confirm(self, ids: list[str]) -> int:
        """By seq range when the ids are exactly the rows of one seq run (an ack of one
        message: two index lookups and a read of the run's ids instead of one unique-index
        lookup per id), by id otherwise (`_confirm_by_ids`, the same result)."""
        run = self._run_of_ids(ids)
        if run is None:
            return self._confirm_by_ids(ids)
        now = self._clock()
        db = self.db
        # how many of the rows confirmed now were sent: all of them when the run is
        # covered by sent ranges (an ack of a message, the usual case), none when it is
        # not covered at all, else counted in each covered part before the update
        parts = self._sent.covering(*run)
        covered = sum(b - a + 1 for a, b in parts)
        whole = run[1] - run[0] + 1
        from_sent = 0
        if 0 < covered < whole:
            from_sent = sum(self._unconfirmed_between(a, b) for a, b in parts)
        with _transaction(db, durable=False):
            n = db.execute(
                "UPDATE records SET state = 2, confirmed_at = ?, sealed = NULL"
                " WHERE seq BETWEEN ? AND ? AND state < 2",
                (now, *run),
            ).rowcount
        self._count_confirmed(n, n if covered == whole else from_sent)
        self._sent.cut(*run)
        return n

    def _run_of_ids(self, ids: list[str]) -> tuple[int, int] | None:
        """(first, last) seq if `ids` are the ids of every row from first to last."""
        if not ids:
            return None
        db = self.db
        ends = [
            db.execute("SELECT seq FROM records WHERE id = ?", (ids[i],)).fetchone()
            for i in (0, -1)
        ]
        if ends[0] is None or ends[1] is None:
            return None
        first, last = sorted((int(ends[0][0]), int(ends[1][0])))
        if last - first + 1 != len(ids):
            return None
        stored = db.execute(
            "SELECT id FROM records WHERE seq BETWEEN ? AND ?", (first, last)
        ).fetchall()
        if len(stored) != len(ids) or {r[0] for r in stored} != set(ids):
            return None
        return first, last

    def _confirm_by_ids(self, ids: list[str]) -> int:
        now = self._clock()
        db = self.db
        sql = (
            "UPDATE records SET state = 2, confirmed_at = ?, sealed = NULL"
            " WHERE id = ? AND state < 2 RETURNING seq"
        )
        seqs: list[int] = []
        with _transaction(db, durable=False):
            for rid in dict.fromkeys(ids):
                seqs += [r[0] for r in db.execute(sql, (now, rid))]
        self._confirmed_seqs(seqs)
        return len(seqs)

    def _confirmed_seqs(self, seqs: list[int]) -> None:
        """The counters after these rows were confirmed (each was unconfirmed before)."""
        seqs.sort()
        self._count_confirmed(len(seqs), self._sent.count_in(seqs))

    def _count_confirmed(self, n: int, from_sent: int) -> None:
        """`n` unconfirmed rows were confirmed, `from_sent` of them inside a sent range."""
        self._n_sent -= from_sent
        self._n_pending -= n - from_sent
        self._n_confirmed += n

    async def unconfirmed_data(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """(id, data) of the records of `kind` not yet confirmed: e.g. the photos whose
        blobs must be kept (agent/station/blobs.py). `data` only, never the sealed personal part.
        Waits for the start-up check: before a salvage is done, records still in the
        moved-aside file would be missing here, and their blobs taken for garbage."""
        await self.integrity_checked()
        return await self._run(self._unconfirmed_data, kind)

    def _unconfirmed_data(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self.db.execute(
            "SELECT id, data FROM records WHERE state < 2 AND kind = ? ORDER BY seq", (kind,)
        ).fetchall()
        return [(rid, json.loads(data)) for rid, data in rows]

    async def reset_sent(self) -> int:
        """After a reconnect every unconfirmed record is sent again (nothing is written)."""
        return await self._run(self._reset_sent)

    def _reset_sent(self) -> int:
        n = self._n_sent
        self._sent.clear()
        self._n_sent = 0
        self._n_pending += n
        return n

    async def next_resend_at(self, resend_after_s: float) -> float | None:
        """Wall-clock time when the oldest sent-but-unconfirmed record is due again."""
        return await self._run(self._next_resend_at, resend_after_s)

    def _next_resend_at(self, resend_after_s: float) -> float | None:
        # a range whose rows were all confirmed (by ids, not by its run) is dropped here:
        # its time would wake the sender for nothing
        while (oldest := self._sent.oldest()) is not None:
            first, last, at = oldest
            if self._unconfirmed_between(first, last):
                return at + resend_after_s
            self._sent.cut(first, last)
        return None

    async def purge(self, retention_days: float) -> int:
        """Delete confirmed records older than the retention, in slices."""
        total = 0
        while True:
            try:
                n = await self._run(self._purge_slice, retention_days)
            except OutboxDiskFull:
                log.warning("outbox %s: purge postponed: disk full", self.path)
                return total
            total += n
            if n < 2000:
                return total

    def _purge_slice(self, retention_days: float) -> int:
        cutoff = self._clock() - retention_days * 86400
        with _transaction(self.db):
            n = self.db.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records"
                " WHERE state = 2 AND confirmed_at <= ? ORDER BY seq LIMIT 2000)",
                (cutoff,),
            ).rowcount
        self._n_confirmed -= n
        return n

    async def bump_session(self) -> int:
        """The status session counter, incremented and persisted before every connect.

        On a full disk the new session is used from memory (higher than every one
        persisted) and written with the next commit that succeeds: a full disk must
        not keep the uplink from connecting.
        """
        try:
            return await self._run(self._bump_session_db)
        except OutboxDiskFull:
            self._session += 1
            log.warning("outbox %s: session %d kept in memory: disk full", self.path, self._session)
            return self._session

    def _bump_session_db(self) -> int:
        with _transaction(self.db):
            row = self.db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
            self._session = max(self._session, 0 if row is None else int(row[0])) + 1
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('session', ?), ('last_seq', ?)",
                (self._session, self._last_seq),
            )
        self._write_counters()
        return self._session

    def take_alerts(self) -> list[dict[str, Any]]:
        """`outbox_recovered` alerts since the last call (at start or while running),
        for the next telemetry."""
        alerts, self._alerts = self._alerts, []
        return alerts

    async def find_repeat(self, device: str, text: str, within_s: float) -> bool:
        """True if the last record of `device` is the barcode `text`, committed less than
        `within_s` ago: the repeat window across a restart (a rescan of a read whose ACK
        never went out)."""
        return await self._run(self._find_repeat, device, text, within_s)

    def _find_repeat(self, device: str, text: str, within_s: float) -> bool:
        row = self.db.execute(
            "SELECT kind, data, created_at FROM records WHERE device = ? AND seq > ?"
            " ORDER BY seq DESC LIMIT 1",
            (device, self._last_seq - 10_000),
        ).fetchone()
        if row is None or row[0] != "barcode" or row[2] < self._clock() - within_s:
            return False
        try:
            data = json.loads(row[1])
        except ValueError:
            return False
        return isinstance(data, dict) and data.get("text") == text

    # -- the periodic integrity check ----------------------------------------------

    async def _check_loop(self) -> None:
        """`PRAGMA quick_check` every `integrity_check_interval_s` on a read connection of
        its own, in a thread of its own: WAL readers do not block the committer, so
        scans are not stalled. A failure moves the database aside with salvage."""
        assert self.integrity_check_interval_s
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-check") as pool:
            while True:
                await asyncio.sleep(self.integrity_check_interval_s)
                problem = await loop.run_in_executor(pool, _quick_check, self.path)
                self.integrity_checks += 1
                if problem is not None:
                    await self._run(self._recover_if_damaged, problem)

    def _recover_if_damaged(self, problem: str, what: str = "periodic integrity check") -> None:
        # on the outbox thread: the database may have been replaced meanwhile
        if _quick_check(self.path) is not None:
            self._recover(f"{what}: {problem}")

    async def integrity_checked(self) -> None:
        """Return once the start-up check has passed or its salvage is done: the uplink
        sends nothing before (scans are taken meanwhile and salvaged with the rest)."""
        await self._checked.wait()

    async def _check_at_start_task(self) -> None:
        """The start-up `quick_check` after a crash, on a read connection in a thread of
        its own, as the periodic check: appends go on meanwhile."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-start-check")
        try:
            t0 = time.perf_counter()
            problem = await loop.run_in_executor(pool, _quick_check, self.path)
            if problem is None:
                log.info("outbox %s: quick_check ok in %.2f s", self.path, time.perf_counter() - t0)
            else:
                log.error("outbox %s: start-up integrity check: %s", self.path, problem)
                await self._run(self._recover_if_damaged, problem, "start-up integrity check")
        except OutboxError as e:  # salvage failed (disk full...): damage found later is
            log.error("outbox %s: start-up integrity check: %s", self.path, e)  # still recovered
        finally:
            pool.shutdown(wait=False)
        self._checked.set()

    async def stats(self) -> OutboxStats:
        return await self._run(self._stats)

    def _stats(self) -> OutboxStats:
        """O(1): the counters, one seek of the unconfirmed index, one meta row, two stats."""
        db = self.db
        oldest = db.execute(
            "SELECT created_at FROM records WHERE state < 2 ORDER BY seq LIMIT 1"
        ).fetchone()
        session = db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
        return OutboxStats(
            pending=self._n_pending,
            sent=self._n_sent,
            unconfirmed=self._n_pending + self._n_sent,
            confirmed=self._n_confirmed,
            oldest_unconfirmed_age_s=(
                None if oldest is None else round(self._clock() - oldest[0], 3)
            ),
            session=0 if session is None else int(session[0]),
            db_bytes=_file_bytes(self.path),
            max_bytes=self.max_bytes,
            last_seq=self._last_seq,
            recovered_from=None if self.recovered_from is None else str(self.recovered_from),
            disk_full=self.disk_full,
            salvaged=self._salvaged,
            lost_seqs=self._lost_seqs,
            lost_ranges=self._lost_ranges,
        )


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK and an `OutboxError`.

    `durable=False` commits without an fsync (`synchronous=NORMAL`, still atomic and
    consistent): for delivery bookkeeping that a power cut may undo harmlessly, because
    an undone `confirmed` only means the record is sent again and the registry acks it
    again. The next durable commit (a scan) syncs it along. A live record costs one fsync
    on the Pi's flash, its append's. `sent` is not written at all (`Outbox._sent`).
    """

    def __init__(self, db: sqlite3.Connection, *, durable: bool = True) -> None:
        self.db = db
        self.durable = durable

    def __enter__(self) -> None:
        if not self.durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error as e:
                    exc = e
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, "outbox") from exc
        finally:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=FULL")


def _salvage_path(path: Path) -> Path:
    return Path(str(path) + ".salvage")


def _unlink_db(path: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(path) + suffix)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(str(path) + suffix).st_size
    return total


_CLEAN_SUFFIX = ".clean"
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 10, 11, 13, 26


def _code(e: BaseException) -> int:
    return int(getattr(e, "sqlite_errorcode", None) or 0) & 0xFF


def _translate(e: sqlite3.Error, what: str) -> OutboxError:
    """The outbox boundary: an SQLite error as one of the project's errors. An I/O error
    is a full disk when the filesystem says so (`_translated` checks with the path)."""
    if _code(e) == _SQLITE_FULL:
        return OutboxDiskFull(f"{what}: disk full ({e})")
    return OutboxError(f"{what}: {e}")


def _space_low(path: Path) -> bool:
    """Less than 1 MiB free beside the outbox: an I/O error there is ENOSPC."""
    with contextlib.suppress(OSError):
        st = os.statvfs(path.parent)  # shutil.disk_usage's figure; shutil costs 0.7 MB
        return st.f_bavail * st.f_frsize < 1 << 20
    return False


def _quick_check(path: Path) -> str | None:
    """None if `PRAGMA quick_check` says ok on a fresh read-only connection, else why not."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        return str(e) if _is_corruption(e) else None
    if rows and rows[0][0] == "ok":
        return None
    return f"quick_check: {rows[0][0] if rows else 'no answer'}"


def _is_corruption(e: BaseException | None) -> bool:
    if isinstance(e, UnicodeDecodeError):
        return True
    if not isinstance(e, sqlite3.DatabaseError):
        return False
    return _code(e) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _fingerprint(path: Path) -> dict[str, int] | None:
    """What changes when anyone writes the file; None while a WAL or shm is beside it."""
    if any(Path(str(path) + s).exists() for s in ("-wal", "-shm")):
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _leave_clean_mark(path: Path) -> None:
    """After a clean close, note the file's fingerprint so the next start can skip quick_check.

    `quick_check` reads every page: 0.6 s for 1,000,000 records from the page cache
    here, many seconds from a Pi's SD card. A database nobody wrote after our clean
    close cannot have been torn by a crash; one anybody touched is checked in full.
    File times come from a clock that ticks every few ms, so we let it tick past the
    close before writing the mark: a later write then always moves mtime/ctime.
    """
    fp = _fingerprint(path)
    if fp is None:
        return
    wait_s = (fp["ctime_ns"] + 20_000_000 - time.time_ns()) / 1e9
    if wait_s > 0.02:  # the clock went back: do not trust the file times
        return
    if wait_s > 0:
        time.sleep(wait_s)
    mark = Path(str(path) + _CLEAN_SUFFIX)
    tmp = mark.with_name(mark.name + ".tmp")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            json.dump(fp, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mark)
    except OSError as e:
        log.warning("outbox %s: cannot write %s (%s): next start checks in full", path, mark, e)


def _take_clean_mark(path: Path) -> bool:
    """True if the database is exactly as our last clean close left it. Consumes the mark."""
    mark = Path(str(path) + _CLEAN_SUFFIX)
    try:
        saved = json.loads(mark.read_text(encoding="ascii"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        saved = None
    try:
        mark.unlink()
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # a start that crashes must not find the mark again
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("outbox %s: cannot remove %s (%s): checking in full", path, mark, e)
        return False
    return saved is not None and saved == _fingerprint(path)


def _salvage_counters(path: Path) -> tuple[int, int]:
    """Best effort: read last_seq and session from a broken database, so seq is not reused."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, 0
    last_seq = session = 0
    try:
        for key in ("last_seq", "session"):
            try:
                row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error:
                continue
            if row is not None:
                if key == "last_seq":
                    last_seq = int(row[0])
                else:
                    session = int(row[0])
        try:
            row = db.execute("SELECT max(seq) FROM records").fetchone()
            last_seq = max(last_seq, int(row[0] or 0))
        except sqlite3.Error:
            pass
    finally:
        db.close()
    return last_seq, session


def _query_stats(db: sqlite3.Connection, now: float) -> dict[str, Any]:
    """Counts from the partial indexes, never a scan of every row: stats are taken before
    READY, at every birth and every few seconds on the thread that commits the scans, and
    the table holds up to `retention_days` of confirmed history (docs/PERFORMANCE.md)."""
    total = db.execute("SELECT count(*) FROM records").fetchone()[0]
    unconfirmed = db.execute("SELECT count(*) FROM records WHERE state < 2").fetchone()[0]
    # the lowest unconfirmed seq is the oldest record (commit order)
    oldest = db.execute(
        "SELECT created_at FROM records WHERE state < 2 ORDER BY seq LIMIT 1"
    ).fetchone()
    session = db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
    return {
        # "sent" is the running agent's memory (sent_ranges.py), not in the file
        "pending": unconfirmed,
        "sent": 0,
        "unconfirmed": unconfirmed,
        "confirmed": total - unconfirmed,
        "oldest_unconfirmed_age_s": None if oldest is None else round(now - oldest[0], 3),
        "session": 0 if session is None else int(session[0]),
    }


def read_stats(path: Path) -> dict[str, Any]:
    """`madoguchi outbox stats`: read-only, safe while the agent runs (WAL readers)."""
    if not path.exists():
        raise OutboxError(f"{path}: no outbox database here (has the agent run yet?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            stats = _query_stats(db, time.time())
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        finally:
            db.close()
    except sqlite3.Error as e:
        raise OutboxError(f"{path}: cannot read the outbox: {e}") from e
    side = counters.load(counters.side_path(path))
    moved = sorted(p.name for p in path.parent.glob(f"{path.name}.corrupt-*"))
    return {
        "path": str(path),
        **stats,
        "db_bytes": _file_bytes(path),
        "last_seq": int(meta.get("last_seq", 0)),
        "side_seq_reserved": side.seq_reserved,
        "side_session": side.session,
        "salvaged": int(meta.get("salvaged", 0)),
        "lost_seqs": int(meta.get("lost_seqs", 0)),
        "lost_ranges": int(meta.get("lost_ranges", 0)),
        "moved_aside": [m for m in moved if not m.endswith(("-wal", "-shm"))],
    }
