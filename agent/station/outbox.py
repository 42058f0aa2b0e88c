"""The outbox: the only owner of SQLite and the only truth about delivery.

Every read becomes a row here before the operator hears an ACK. Rows move
pending -> sent (the broker's PUBACK) -> confirmed (the registry's ack), and
are purged `retention_days` after confirmation. WAL with synchronous=FULL: a
commit that returned survives kill -9 and power loss.

All SQLite work runs in one dedicated thread. Concurrent `append()` calls
that arrive while a commit is in progress are committed together in the next
transaction (group commit): one fsync for many records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from agent.contract.records import Read, Record, iso_ms, uuid7
from agent.errors import OutboxError, OutboxFull
from agent.station.sealing import Sealer

if TYPE_CHECKING:  # cryptography is loaded only where personal data is stored
    from agent.personal_seal import PersonalSealer

log = logging.getLogger(__name__)
T = TypeVar("T")

_TO_REGISTRY = "sealed_to_registry"
"""At rest, a personal part already sealed to the registry is `{_TO_REGISTRY: envelope}`
(under the outbox key too); a card's personal part never has that single key."""

PENDING, SENT, CONFIRMED = 0, 1, 2

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
CREATE INDEX IF NOT EXISTS records_sent ON records(sent_at) WHERE state = 1;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        personal_sealer: PersonalSealer | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.recovered_from: Path | None = None
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

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        self._committer = asyncio.create_task(self._commit_loop(), name="outbox-committer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
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
        """Run `fn` on the outbox thread; a database found corrupt while running is moved
        aside and replaced, as at start, so the station keeps taking scans."""
        try:
            return fn(*args)
        except (sqlite3.DatabaseError, OutboxError) as e:
            cause = e if isinstance(e, sqlite3.DatabaseError) else e.__cause__
            if self._db is None or not _is_corruption(cause):
                raise
            self._db.close()
            self._db = None
            self._move_aside(f"found corrupt while running: {cause}")
            self._db = self._connect(check=False)
            if fn == self._commit:
                return fn(*args)  # the reads in hand go into the fresh database
            raise OutboxError(f"{self.path}: {cause}; continuing in a fresh database") from e

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutboxError(f"{self.path.parent}: cannot create data directory: {e}") from e
        clean = _take_clean_mark(self.path)
        try:
            self._db = self._connect(check=not clean)
        except sqlite3.DatabaseError as e:
            self._move_aside(str(e))
            self._db = self._connect(check=False)

    def _connect(self, *, check: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            if check:
                t0 = time.perf_counter()
                answer = db.execute("PRAGMA quick_check").fetchone()
                if answer is None or answer[0] != "ok":
                    raise sqlite3.DatabaseError(
                        f"quick_check: {answer[0] if answer else 'no answer'}"
                    )
                log.info("outbox %s: quick_check ok in %.2f s", self.path, time.perf_counter() - t0)
            else:
                log.info(
                    "outbox %s: closed cleanly and unchanged since, quick_check skipped", self.path
                )
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.DatabaseError(f"cannot switch to WAL (journal_mode={mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            db.executescript(_SCHEMA)
            self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
            row = db.execute(
                "SELECT max(coalesce((SELECT value FROM meta WHERE key='last_seq'), 0),"
                " coalesce((SELECT max(seq) FROM records), 0))"
            ).fetchone()
            self._last_seq = max(self._last_seq, int(row[0]))
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, reason: str) -> None:
        """Keep a broken database for forensics, carry its counters over, start fresh."""
        salvaged_seq, session = _salvage_counters(self.path)
        self._last_seq = max(self._last_seq, salvaged_seq)  # at run time we know it already
        session = max(session, self._session)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        self.recovered_from = target
        log.error(
            "outbox %s could not be used (%s): moved aside to %s; continuing in a fresh "
            "database from seq %d",
            self.path,
            reason,
            target,
            self._last_seq + 1,
        )
        if self._last_seq or session:
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                db.executescript(_SCHEMA)
                db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("last_seq", self._last_seq), ("session", session)],
                )
            finally:
                db.close()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
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
                db.execute("ROLLBACK")
            raise OutboxError(f"{self.path}: commit failed: {e}") from e
        self._last_seq = seq
        return results

    def _used_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * self._page_size)

    # -- delivery state ---------------------------------------------------------

    async def next_batch(self, max_records: int, resend_after_s: float) -> list[Record]:
        """Unconfirmed records due for (re)sending, in seq order."""
        return await self._run(self._next_batch, max_records, resend_after_s)

    def _next_batch(self, max_records: int, resend_after_s: float) -> list[Record]:
        due = self._clock() - resend_after_s
        rows = self.db.execute(
            "SELECT id, seq, captured_at, device, kind, source, data, sealed, operator,"
            " clock_synced"
            " FROM records WHERE state < 2 AND (state = 0 OR sent_at <= ?)"
            " ORDER BY seq LIMIT ?",
            (due, max_records),
        ).fetchall()
        return [self._record(row) for row in rows]

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

    async def mark_sent(self, seqs: Iterable[int]) -> None:
        await self._run(self._mark_sent, list(seqs))

    def _mark_sent(self, seqs: list[int]) -> None:
        now = self._clock()
        with _transaction(self.db, durable=False):
            self.db.executemany(
                "UPDATE records SET state = 1, sent_at = ? WHERE seq = ? AND state < 2",
                [(now, s) for s in seqs],
            )

    async def confirm(self, ids: Iterable[str]) -> int:
        """Mark records confirmed by the registry; drop their personal data now."""
        return await self._run(self._confirm, list(ids))

    def _confirm(self, ids: list[str]) -> int:
        now = self._clock()
        with _transaction(self.db, durable=False):
            cur = self.db.executemany(
                "UPDATE records SET state = 2, confirmed_at = ?, sealed = NULL"
                " WHERE id = ? AND state < 2",
                [(now, i) for i in ids],
            )
        return cur.rowcount

    async def unconfirmed_data(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """(id, data) of the records of `kind` not yet confirmed: e.g. the photos whose
        blobs must be kept (agent/station/blobs.py). `data` only, never the sealed personal part."""
        return await self._run(self._unconfirmed_data, kind)

    def _unconfirmed_data(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self.db.execute(
            "SELECT id, data FROM records WHERE state < 2 AND kind = ? ORDER BY seq", (kind,)
        ).fetchall()
        return [(rid, json.loads(data)) for rid, data in rows]

    async def reset_sent(self) -> int:
        """After a reconnect every unconfirmed record is sent again."""
        return await self._run(self._reset_sent)

    def _reset_sent(self) -> int:
        with _transaction(self.db, durable=False):
            return self.db.execute("UPDATE records SET state = 0 WHERE state = 1").rowcount

    async def next_resend_at(self, resend_after_s: float) -> float | None:
        """Wall-clock time when the oldest sent-but-unconfirmed record is due again."""
        return await self._run(self._next_resend_at, resend_after_s)

    def _next_resend_at(self, resend_after_s: float) -> float | None:
        row = self.db.execute("SELECT min(sent_at) FROM records WHERE state = 1").fetchone()
        return None if row[0] is None else float(row[0]) + resend_after_s

    async def purge(self, retention_days: float) -> int:
        """Delete confirmed records older than the retention, in slices."""
        total = 0
        while True:
            n = await self._run(self._purge_slice, retention_days)
            total += n
            if n < 2000:
                return total

    def _purge_slice(self, retention_days: float) -> int:
        cutoff = self._clock() - retention_days * 86400
        with _transaction(self.db):
            return self.db.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records"
                " WHERE state = 2 AND confirmed_at <= ? ORDER BY seq LIMIT 2000)",
                (cutoff,),
            ).rowcount

    async def bump_session(self) -> int:
        """The status session counter, incremented and persisted before every connect."""
        return await self._run(self._bump_session)

    def _bump_session(self) -> int:
        with _transaction(self.db):
            self.db.execute(
                "INSERT INTO meta VALUES ('session', 1)"
                " ON CONFLICT(key) DO UPDATE SET value = value + 1"
            )
            self._session = int(
                self.db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()[0]
            )
            return self._session

    async def stats(self) -> OutboxStats:
        return await self._run(self._stats)

    def _stats(self) -> OutboxStats:
        q = _query_stats(self.db, self._clock())
        return OutboxStats(
            **q,
            db_bytes=_file_bytes(self.path),
            max_bytes=self.max_bytes,
            last_seq=self._last_seq,
            recovered_from=None if self.recovered_from is None else str(self.recovered_from),
        )


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK and an `OutboxError`.

    `durable=False` commits without an fsync (`synchronous=NORMAL`, still atomic and
    consistent): for delivery bookkeeping that a power cut may undo harmlessly, because
    an undone `sent` or `confirmed` only means the record is sent again and the registry
    acks it again. The next durable commit (a scan) syncs it along. Without this a live
    record cost three fsyncs on the Pi's flash (append, sent, confirmed) instead of one.
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
                self.db.execute("COMMIT")
                return
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise OutboxError(f"outbox: {exc}") from exc
        finally:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=FULL")


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(str(path) + suffix).st_size
    return total


_CLEAN_SUFFIX = ".clean"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _is_corruption(e: BaseException | None) -> bool:
    if not isinstance(e, sqlite3.DatabaseError):
        return False
    code = getattr(e, "sqlite_errorcode", None) or 0
    return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


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
    sent = db.execute("SELECT count(*) FROM records WHERE state = 1").fetchone()[0]
    # the lowest unconfirmed seq is the oldest record (commit order)
    oldest = db.execute(
        "SELECT created_at FROM records WHERE state < 2 ORDER BY seq LIMIT 1"
    ).fetchone()
    session = db.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
    return {
        "pending": unconfirmed - sent,
        "sent": sent,
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
            row = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise OutboxError(f"{path}: cannot read the outbox: {e}") from e
    return {
        "path": str(path),
        **stats,
        "db_bytes": _file_bytes(path),
        "last_seq": 0 if row is None else int(row[0]),
    }
