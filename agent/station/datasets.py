"""Reference datasets on the station: verified, stored, used for verdicts (docs/CONTRACT.md).

`DatasetStore` keeps each dataset kind in its own SQLite file beside the outbox
(`datasets.db`, WAL, never the outbox's): a new version replaces the old one in
one transaction, so a reader sees the old version or the new one, never a mix,
and a kill -9 mid-apply leaves the old one. Look-ups are indexed SQLite queries,
not a Python dict, so a city-sized `used_tickets` costs disk, not RSS.

`DatasetReceiver` takes the retained dataset messages from the uplink: a manifest
is checked (shape, Ed25519 signature against the pinned key, version newer than
held, not expired) before any chunk of it is kept; the body is applied only when
every chunk is there and it hashes to the signed sha256. A refusal is one log
line and a `refused` entry in status; the version held keeps serving.

`verdict()` is the pure-ish rule step: (interpretation, held datasets, now) -> the
`data.verdict` fact a record carries, with the dataset kind and version that
decided and whether it was stale (past its expiry or older than `max_age_s`).
Offline it keeps deciding from what is stored. Ticket numbers are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.contract.datasets import (
    CHUNK_BYTES,
    KINDS,
    MAX_BODY_BYTES,
    Manifest,
    iter_rows,
    parse_manifest,
    parse_topic,
)
from agent.contract.messages import MessageError
from agent.errors import DatasetRefused, DatasetStoreError

if TYPE_CHECKING:  # cryptography (9 MB of RSS) is loaded by the first manifest, not at start
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

#: chunk buffers of versions not yet complete, per kind (older ones are dropped)
MAX_PENDING_VERSIONS = 2
#: versions whose chunks came before their manifest, per kind (a chain of deltas)
MAX_UNANNOUNCED_VERSIONS = 16
#: deltas waiting for the version they apply to, per kind
MAX_PENDING_DELTAS = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    kind TEXT PRIMARY KEY, version INTEGER NOT NULL, issued_at TEXT NOT NULL,
    expires_at TEXT, sha256 TEXT NOT NULL, rows INTEGER NOT NULL, applied_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS used_tickets (
    municipality_code TEXT NOT NULL, ticket_number TEXT NOT NULL, dose TEXT NOT NULL,
    site TEXT NOT NULL, agent TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (ticket_number, municipality_code, dose)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recalled_lots (
    gtin TEXT NOT NULL, lot TEXT NOT NULL, reason TEXT NOT NULL,
    expiry_from TEXT, expiry_to TEXT, PRIMARY KEY (gtin, lot, reason)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jpki_anchors (
    sha256 TEXT PRIMARY KEY, name TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT NOT NULL, id_type TEXT, slot_start TEXT NOT NULL, slot_end TEXT NOT NULL,
    purpose TEXT NOT NULL, PRIMARY KEY (id, slot_start, purpose)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staff (
    uid TEXT PRIMARY KEY, operator TEXT NOT NULL
) WITHOUT ROWID;
"""

_COLUMNS: dict[str, tuple[str, ...]] = {
    "used_tickets": ("municipality_code", "ticket_number", "dose", "site", "agent", "at"),
    "recalled_lots": ("gtin", "lot", "reason", "expiry_from", "expiry_to"),
    "jpki_anchors": ("sha256", "name"),
    "reservations": ("id", "id_type", "slot_start", "slot_end", "purpose"),
    "staff": ("uid", "operator"),
}


def _normal(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """Badge UIDs are stored lower case: the reader may report either."""
    if kind == "staff":
        return {**row, "uid": str(row["uid"]).lower()}
    return row


@dataclass(frozen=True, slots=True)
class Held:
    """The version of one kind the station holds."""

    kind: str
    version: int
    issued_at: str
    expires_at: str | None
    sha256: str
    rows: int
    applied_at: float

    def age_s(self, now: float) -> float:
        return max(0.0, now - _epoch(self.issued_at))

    def stale(self, now: float, max_age_s: float) -> bool:
        expired = self.expires_at is not None and now > _epoch(self.expires_at)
        return expired or self.age_s(now) > max_age_s


def _epoch(iso: str) -> float:
    t = datetime.fromisoformat(iso)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


class DatasetStore:
    """`datasets.db`: one transaction per version applied. Open with `open()`/`close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise DatasetStoreError(f"{self.path}: {e}") from e
        return db

    def open(self) -> None:
        """Open, or move a damaged file aside and start empty: reference data come again
        from the broker (retained), and a station must record without them."""
        try:
            self._db = self._connect()
            if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise DatasetStoreError(f"{self.path}: quick_check failed")
            self._db.execute("SELECT count(*) FROM datasets").fetchone()
        except (DatasetStoreError, sqlite3.DatabaseError) as e:
            if self._db is not None:
                self._db.close()
                self._db = None
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = self.path.with_name(self.path.name + suffix)
                if src.exists():
                    src.rename(aside.with_name(aside.name + suffix))
            log.error(
                "%s is damaged (%s): moved to %s, starting with no datasets", self.path, e, aside
            )
            self._db = self._connect()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() first"
        return self._db

    def held(self) -> dict[str, Held]:
        try:
            rows = self.db.execute(
                "SELECT kind, version, issued_at, expires_at, sha256, rows, applied_at"
                " FROM datasets"
            ).fetchall()
        except sqlite3.Error as e:
            raise DatasetStoreError(f"{self.path}: {e}") from e
        return {r[0]: Held(*r) for r in rows}

    @contextlib.contextmanager
    def _writing(self, kind: str, *, checkpoint: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction on a connection of its own (a worker thread, while the
        loop keeps reading the old version): committed when the block ends, rolled back
        on any exception; SQLite's errors become DatasetStoreError. `checkpoint`: fold the
        WAL into the file after the commit (a whole new version: now, not at some reader)."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
            if checkpoint:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise DatasetStoreError(f"{self.path}: {kind}: {e}") from e
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @staticmethod
    def _insert(db: sqlite3.Connection, manifest: Manifest, rows: Iterable[dict[str, Any]]) -> int:
        """The rows into the kind's table (a row already there is kept); how many were new."""
        cols = _COLUMNS[manifest.kind]
        before = db.total_changes
        db.executemany(
            f"INSERT OR IGNORE INTO {manifest.kind} ({', '.join(cols)})"
            f" VALUES ({', '.join('?' * len(cols))})",
            ([_normal(manifest.kind, r).get(c) for c in cols] for r in rows),
        )
        return db.total_changes - before

    @staticmethod
    def _held_now(db: sqlite3.Connection, manifest: Manifest, rows: int) -> None:
        db.execute(
            "INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                manifest.kind,
                manifest.version,
                manifest.issued_at,
                manifest.expires_at,
                manifest.sha256,
                rows,
                time.time(),
            ),
        )

    def apply(self, manifest: Manifest, rows: Iterable[dict[str, Any]]) -> None:
        """Replace `manifest.kind` by this version, all or nothing.
        `rows` may be a generator that raises (a bad line): then nothing changes."""
        with self._writing(manifest.kind, checkpoint=True) as db:
            held = db.execute(
                "SELECT version FROM datasets WHERE kind = ?", (manifest.kind,)
            ).fetchone()
            if held is not None and held[0] >= manifest.version:
                raise DatasetRefused(
                    manifest.kind, f"version {manifest.version} is not newer than {held[0]}"
                )
            db.execute(f"DELETE FROM {manifest.kind}")
            self._insert(db, manifest, rows)
            self._held_now(db, manifest, manifest.rows)

    def apply_delta(self, manifest: Manifest, rows: Iterable[dict[str, Any]]) -> None:
        """Add a delta's rows to the version it names (`manifest.base`), all or nothing:
        the held version must be exactly the base, else DatasetRefused and nothing
        changes; `rows` may raise (a bad line) and then nothing changes either."""
        with self._writing(manifest.kind) as db:
            held = db.execute(
                "SELECT version, rows FROM datasets WHERE kind = ?", (manifest.kind,)
            ).fetchone()
            if held is None or held[0] != manifest.base:
                at = "none" if held is None else f"v{held[0]}"
                raise DatasetRefused(
                    manifest.kind, f"delta v{manifest.version} is for v{manifest.base}, held {at}"
                )
            added = self._insert(db, manifest, rows)
            self._held_now(db, manifest, held[1] + added)

    # -- look-ups (the loop's connection: WAL readers see the last committed version) --

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: the version and the rows it reports are the same version,
        even while a worker thread commits the next one (WAL readers see one snapshot)."""
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def held_kind(self, kind: str) -> Held | None:
        row = self.db.execute(
            "SELECT kind, version, issued_at, expires_at, sha256, rows, applied_at"
            " FROM datasets WHERE kind = ?",
            (kind,),
        ).fetchone()
        return None if row is None else Held(*row)

    def used_ticket(self, municipality: str | None, number: str, dose: str | None) -> Any:
        if municipality is None:
            q = "SELECT site, agent, at FROM used_tickets WHERE ticket_number = ? LIMIT 1"
            return self.db.execute(q, (number,)).fetchone()
        q = (
            "SELECT site, agent, at FROM used_tickets"
            " WHERE ticket_number = ? AND municipality_code = ? AND dose = ?"
        )
        return self.db.execute(q, (number, municipality, dose)).fetchone()

    def recalled(self, gtin: str, lot: str, expiry: str | None) -> str | None:
        rows = self.db.execute(
            "SELECT reason, expiry_from, expiry_to FROM recalled_lots WHERE gtin = ? AND lot = ?",
            (gtin, lot),
        ).fetchall()
        for reason, low, high in rows:
            after_low = low is None or (expiry is not None and expiry >= low)
            before_high = high is None or (expiry is not None and expiry <= high)
            if expiry is None or (after_low and before_high):
                return str(reason)
        return None

    def reservation(self, ids: Iterable[str]) -> Any:
        """The first reservation (slot_start, slot_end, purpose, id_type) of any of `ids`,
        the earliest slot first."""
        keys = list(dict.fromkeys(ids))
        if not keys:
            return None
        q = (
            "SELECT slot_start, slot_end, purpose, id_type FROM reservations"
            f" WHERE id IN ({', '.join('?' * len(keys))}) ORDER BY slot_start LIMIT 1"
        )
        return self.db.execute(q, keys).fetchone()

    def staff(self, uid: str) -> str | None:
        """The operator id of a staff badge, if the `staff` dataset names it."""
        row = self.db.execute("SELECT operator FROM staff WHERE uid = ?", (uid.lower(),)).fetchone()
        return None if row is None else str(row[0])

    def anchors(self) -> dict[str, str]:
        """The pinned JPKI CA fingerprints (sha256 hex -> name), for the card check."""
        return dict(self.db.execute("SELECT sha256, name FROM jpki_anchors").fetchall())


class DatasetReceiver:
    """Takes the retained dataset messages (through the uplink) and applies verified versions."""

    def __init__(
        self,
        store: DatasetStore,
        public_key: bytes,
        prefix: str,
        *,
        max_age_s: float,
        spool: Path | None = None,
        site: str | None = None,
        agent: str | None = None,
    ) -> None:
        self.store = store
        #: the station's site (and name): a version scoped to another site or station is
        #: refused
        self.site = site
        self.agent = agent
        # chunks wait on disk, not in memory: a million rows cost a chunk of RSS, not 140 MB
        self.spool = spool or store.path.with_name("datasets-incoming")
        self.prefix = prefix
        self.max_age_s = max_age_s
        if len(public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self._public_key = public_key
        self._key: Ed25519PublicKey | None = None
        self._held: dict[str, Held] = {}
        self._pending: dict[str, dict[int, Manifest]] = {}  # kind -> version -> manifest
        self._deltas: dict[str, dict[int, Manifest]] = {}  # kind -> delta version -> manifest
        self._chunks: dict[tuple[str, int], dict[int, int]] = {}  # -> index -> size on disk
        self.refused: dict[str, dict[str, Any]] = {}  # kind -> last refusal
        self._unknown: set[str] = set()
        self._dead: list[tuple[str, int]] = []  # versions refused on their chunks
        self.applied = asyncio.Event()  # set at every version applied (tests, kiosk)
        self._anchors: frozenset[str] = frozenset()

    def load(self) -> None:
        """What is stored; chunks left from before a restart are dropped (they are retained
        on the broker and come again)."""
        self._held = self.store.held()
        self._anchors = frozenset(self.store.anchors())
        _rmtree(self.spool)

    def jpki_anchors(self) -> frozenset[str]:
        """The `jpki_anchors` held now (sha256 hex), for the card readers' chain check.
        Safe from a reader's thread: a new version swaps the whole set."""
        return self._anchors

    def _dir(self, kind: str, version: int) -> Path:
        return self.spool / kind / str(version)

    def _give_up(self, kind: str, version: int) -> None:
        """A version refused on its chunks: its other chunks and its manifest, which keep
        coming, are ignored (one refusal line, not one per chunk)."""
        self._drop(kind, version)
        self._pending.get(kind, {}).pop(version, None)
        self._dead.append((kind, version))
        del self._dead[:-16]

    def _drop(self, kind: str, version: int) -> None:
        self._chunks.pop((kind, version), None)
        _rmtree(self._dir(kind, version))

    @property
    def held(self) -> dict[str, Held]:
        return dict(self._held)

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """Each kind held: version, age, stale; and the last refusal per kind."""
        now = time.time() if now is None else now
        return {
            "held": {
                k: {
                    "version": h.version,
                    "rows": h.rows,
                    "issued_at": h.issued_at,
                    "expires_at": h.expires_at,
                    "age_s": round(h.age_s(now), 1),
                    "stale": h.stale(now, self.max_age_s),
                }
                for k, h in self._held.items()
            },
            "refused": dict(self.refused),
        }

    def _refuse(self, kind: str, version: int | None, reason: str) -> None:
        self.refused[kind] = {"version": version, "reason": reason, "at": time.time()}
        held = self._held.get(kind)
        keep = f"keeping v{held.version}" if held else "none held"
        log.warning("dataset %s v%s refused: %s (%s)", kind, version, reason, keep)

    async def handle(self, topic: str, payload: Any) -> bool:
        """One message; True when it was a dataset topic (handled or refused)."""
        t = parse_topic(self.prefix, topic)
        if t is None:
            return False
        if not isinstance(payload, bytes | bytearray) or not payload:
            return True  # a retained message cleared by the publisher
        if t.kind not in KINDS:  # a kind of a later version: nothing here could use it
            if t.version is None and t.kind not in self._unknown:
                self._unknown.add(t.kind)
                log.warning("dataset %s ignored: not a kind this station knows", t.kind[:64])
            return True
        if (t.site is not None and t.site != self.site) or (
            t.agent is not None and t.agent != self.agent
        ):
            return True  # another site's or station's data (a wide subscription)
        if t.delta:
            assert t.version is not None
            self._delta_manifest(t.kind, t.version, bytes(payload))
        elif t.version is None:
            self._manifest(t.kind, bytes(payload))
        else:
            assert t.index is not None
            self._chunk(t.kind, t.version, t.index, bytes(payload))
        await self._complete(t.kind)
        return True

    def _manifest(self, kind: str, payload: bytes) -> None:
        try:
            m = parse_manifest(payload)
        except MessageError as e:
            self._refuse(kind, None, str(e))
            return
        if (kind, m.version) in self._dead:
            return
        try:
            if m.base is not None:
                raise DatasetRefused(kind, "a delta's manifest on the full version's topic")
            if not self._verify(kind, m):
                return  # the version held, seen again (a retained manifest at reconnect)
        except DatasetRefused as e:
            self._refuse(kind, m.version, e.reason)
            return
        pending = self._pending.setdefault(kind, {})
        pending[m.version] = m
        for old in sorted(pending)[:-MAX_PENDING_VERSIONS]:
            del pending[old]
            self._drop(kind, old)

    def _delta_manifest(self, kind: str, version: int, payload: bytes) -> None:
        """A delta: kept until the version it applies to is held (deltas of a chain may
        come in any order after a reconnect); one already absorbed is ignored."""
        try:
            m = parse_manifest(payload)
        except MessageError as e:
            self._refuse(kind, version, str(e))
            return
        if (kind, m.version) in self._dead:
            return
        try:
            if m.base is None or m.version != version:
                raise DatasetRefused(kind, "delta topic without a delta manifest of its version")
            if not self._verify(kind, m, delta=True):
                return
        except DatasetRefused as e:
            self._refuse(kind, m.version, e.reason)
            return
        deltas = self._deltas.setdefault(kind, {})
        deltas[m.version] = m
        for old in sorted(deltas)[:-MAX_PENDING_DELTAS]:
            del deltas[old]
            self._drop(kind, old)

    def _verify(self, kind: str, m: Manifest, *, delta: bool = False) -> bool:
        """True: a new version to collect; False: the one held; DatasetRefused: neither."""
        if m.kind != kind:
            raise DatasetRefused(kind, f"manifest names kind {m.kind!r}")
        if m.site is not None and m.site != self.site:
            raise DatasetRefused(kind, f"manifest is for site {m.site!r}, not this one")
        if m.agent is not None and m.agent != self.agent:
            raise DatasetRefused(kind, f"manifest is for station {m.agent!r}, not this one")
        from cryptography.exceptions import InvalidSignature

        if self._key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            self._key = Ed25519PublicKey.from_public_bytes(self._public_key)
        try:
            self._key.verify(m.signature, m.signed)
        except InvalidSignature:
            raise DatasetRefused(kind, "signature does not verify with the pinned key") from None
        held = self._held.get(kind)
        if delta and held is not None and m.version <= held.version:
            return False  # absorbed already (applied, or in a newer full version)
        if held is not None and m.version <= held.version:
            if m.version == held.version and m.sha256 == held.sha256:
                return False
            raise DatasetRefused(kind, f"version {m.version} is not newer than v{held.version}")
        if m.expires_at is not None and time.time() > _epoch(m.expires_at):
            raise DatasetRefused(kind, f"expired at {m.expires_at}")
        return True

    def _chunk(self, kind: str, version: int, index: int, data: bytes) -> None:
        held = self._held.get(kind)
        if (held is not None and version <= held.version) or (kind, version) in self._dead:
            return
        m = self._pending.get(kind, {}).get(version) or self._deltas.get(kind, {}).get(version)
        if m is not None and index >= m.chunks:
            self._refuse(kind, version, f"chunk {index} of {m.chunks}")
            return
        chunks = self._chunks.setdefault((kind, version), {})
        buffered = sum(sum(cs.values()) for cs in self._chunks.values())
        if len(data) > CHUNK_BYTES * 4 or buffered + len(data) > MAX_BODY_BYTES:
            self._refuse(kind, version, "chunks over the buffer cap: dropped")
            self._give_up(kind, version)
            return
        try:
            self._dir(kind, version).mkdir(parents=True, exist_ok=True)
            (self._dir(kind, version) / str(index)).write_bytes(data)
        except OSError as e:  # ENOSPC among them: the version held keeps serving
            self._refuse(kind, version, f"chunk not kept in {self.spool}: {e.strerror}")
            self._give_up(kind, version)
            return
        chunks[index] = len(data)
        if m is None:  # before its manifest: keep a bounded number of versions
            known = set(self._pending.get(kind, {})) | set(self._deltas.get(kind, {}))
            waiting = sorted(v for k, v in self._chunks if k == kind and v not in known)
            for old in waiting[:-MAX_UNANNOUNCED_VERSIONS]:
                self._drop(kind, old)

    async def _complete(self, kind: str) -> None:
        """Apply the newest complete full version, then every delta that chains on."""
        await self._complete_full(kind)
        await self._complete_deltas(kind)

    async def _complete_deltas(self, kind: str) -> None:
        deltas = self._deltas.get(kind, {})
        while deltas:
            held = self._held.get(kind)
            if held is None:
                return
            for old in [v for v in deltas if v <= held.version]:
                del deltas[old]
                self._drop(kind, old)
            m = next((d for d in deltas.values() if d.base == held.version), None)
            if m is None:
                return
            chunks = self._chunks.get((kind, m.version), {})
            if any(i not in chunks for i in range(_needed(m))):
                return
            del deltas[m.version]
            files = [self._dir(kind, m.version) / str(i) for i in range(_needed(m))]
            try:
                await asyncio.to_thread(self._assemble, m, files)
            except OSError as e:
                self._refuse(kind, m.version, f"chunks not readable in {self.spool}: {e.strerror}")
                self._give_up(kind, m.version)
                return
            except MessageError as e:
                self._refuse(kind, m.version, str(e))
                self._give_up(kind, m.version)
                return
            except DatasetRefused as e:
                self._refuse(kind, m.version, e.reason)
                self._give_up(kind, m.version)
                return
            except DatasetStoreError as e:
                self._refuse(kind, m.version, f"not stored: {e}")
                self._give_up(kind, m.version)
                return
            finally:
                self._drop(kind, m.version)
            self._held = self.store.held()
            if kind == "jpki_anchors":
                self._anchors = frozenset(self.store.anchors())
            self.refused.pop(kind, None)
            log.info(
                "dataset %s delta v%d on v%d applied (%d rows)",
                kind,
                m.version,
                held.version,
                m.rows,
            )
            self.applied.set()
            self.applied.clear()

    async def _complete_full(self, kind: str) -> None:
        pending = self._pending.get(kind, {})
        for version in sorted(pending, reverse=True):  # the newest complete one wins
            m = pending[version]
            chunks = self._chunks.get((kind, version), {})
            if any(i not in chunks for i in range(_needed(m))):
                continue
            files = [self._dir(kind, version) / str(i) for i in range(_needed(m))]
            for v in [v for v in pending if v < version]:
                del pending[v]
                self._drop(kind, v)
            del pending[version]
            try:
                await asyncio.to_thread(self._assemble, m, files)
            except OSError as e:
                self._refuse(kind, version, f"chunks not readable in {self.spool}: {e.strerror}")
                return
            except MessageError as e:
                self._refuse(kind, version, str(e))
                return
            except DatasetRefused as e:
                self._refuse(kind, version, e.reason)
                return
            except DatasetStoreError as e:
                self._refuse(kind, version, f"not stored: {e}")
                return
            finally:
                self._drop(kind, version)
            self._held = self.store.held()
            if kind == "jpki_anchors":
                self._anchors = frozenset(self.store.anchors())
            self.refused.pop(kind, None)
            log.info("dataset %s v%d applied (%d rows)", kind, version, m.rows)
            self.applied.set()
            self.applied.clear()
            return

    def _assemble(self, m: Manifest, files: list[Path]) -> None:
        """Check the body's sha256, then store its rows line by line (a worker thread)."""
        digest = hashlib.sha256()
        size = 0
        for f in files:
            data = f.read_bytes()
            digest.update(data)
            size += len(data)
        if size != m.size or digest.hexdigest() != m.sha256:
            raise MessageError(f"{m.kind} v{m.version}: body does not match its sha256")
        apply = self.store.apply if m.base is None else self.store.apply_delta
        apply(m, iter_rows(m, (f.read_bytes() for f in files)))

    # -- verdicts ------------------------------------------------------------------------

    def staff(self, uid: str) -> str | None:
        """The operator of a badge from the `staff` dataset (None: not held, or not in it)."""
        if "staff" not in self._held:
            return None
        try:
            return self.store.staff(uid)
        except sqlite3.Error as e:
            log.error("dataset look-up failed in %s: %s", self.store.path, e)
            return None

    def unknown_staff(self, now: float | None = None) -> dict[str, Any] | None:
        """The `data.verdict` of a badge tap that no staff list names (the `staff` dataset
        held, the hand-edited map without it either), or None when `staff` is not held."""
        h = self._held.get("staff")
        if h is None:
            return None
        now = time.time() if now is None else now
        return {
            "verdict": "unknown_staff",
            "dataset": "staff",
            "version": h.version,
            "stale": h.stale(now, self.max_age_s),
        }

    def reservation(
        self, read_data: dict[str, Any], now: float | None = None
    ) -> dict[str, Any] | None:
        """The `data.reservation` of a read, or None (no `reservations` held, or nothing
        in the read that could identify a reservation)."""
        now = time.time() if now is None else now
        try:
            return _reservation(self.store, read_data, now, self.max_age_s)
        except sqlite3.Error as e:
            log.error("dataset look-up failed in %s: %s", self.store.path, e)
            return None

    def verdict(
        self, interpretation: dict[str, Any] | None, now: float | None = None
    ) -> dict[str, Any] | None:
        """The `data.verdict` of a read, or None when no dataset speaks to it."""
        if not interpretation:
            return None
        now = time.time() if now is None else now
        try:
            return _decide(self.store, interpretation, now, self.max_age_s)
        except sqlite3.Error as e:  # a verdict never stops a record being stored
            log.error("dataset look-up failed in %s: %s", self.store.path, e)
            return None


def _needed(m: Manifest) -> int:
    """The chunks a version needs: none for an empty body (its one chunk would be an
    empty retained payload, which MQTT takes for "clear" and never delivers)."""
    return 0 if m.size == 0 else m.chunks


def _decide(
    store: DatasetStore, interp: dict[str, Any], now: float, max_age_s: float
) -> dict[str, Any] | None:
    kind = interp.get("type")
    fields = interp.get("fields") or {}
    if kind in ("vaccination_ticket", "vaccination_ticket_number") and interp.get("valid", True):
        number = fields.get("ticket_number")
        if not isinstance(number, str):
            return None
        with store.snapshot():
            return _used(store, store.held_kind("used_tickets"), kind, fields, now, max_age_s)
    if kind == "gs1":
        gtin, lot = fields.get("gtin"), fields.get("lot")
        if not isinstance(gtin, str) or not isinstance(lot, str):
            return None
        with store.snapshot():
            return _recalled(store, store.held_kind("recalled_lots"), fields, now, max_age_s)
    return None


def _used(
    store: DatasetStore,
    h: Held | None,
    kind: str,
    fields: dict[str, Any],
    now: float,
    max_age_s: float,
) -> dict[str, Any] | None:
    if h is None:
        return None
    number = fields["ticket_number"]
    base = {"dataset": "used_tickets", "version": h.version, "stale": h.stale(now, max_age_s)}
    full = kind == "vaccination_ticket"
    hit = store.used_ticket(
        fields.get("municipality_code") if full else None,
        number,
        fields.get("round_code") if full else None,
    )
    if hit is None:
        return {"verdict": "not_used", **base}
    return {"verdict": "already_used", "site": hit[0], "agent": hit[1], "at": hit[2], **base}


def _recalled(
    store: DatasetStore, h: Held | None, fields: dict[str, Any], now: float, max_age_s: float
) -> dict[str, Any] | None:
    if h is None:
        return None
    gtin, lot = fields["gtin"], fields["lot"]
    base = {"dataset": "recalled_lots", "version": h.version, "stale": h.stale(now, max_age_s)}
    expiry = fields.get("expiry")
    reason = store.recalled(gtin, lot, expiry if isinstance(expiry, str) else None)
    if reason is None:
        return {"verdict": "not_recalled", **base}
    return {"verdict": "recalled", "reason": reason, **base}


#: interpretations that are goods, not people: they never identify a reservation
_NOT_IDENTIFIERS = frozenset({"gs1", "jan", "ean", "isbn", "issn", "upc"})


def reservation_ids(read_data: dict[str, Any]) -> list[str]:
    """What in a read could be a reservation's `id`: a ticket number, the scanned text
    (reservation QR payload, form ID), a card's auth-cert serial."""
    ids: list[str] = []
    interp = read_data.get("interpretation")
    if isinstance(interp, dict):
        if interp.get("type") in _NOT_IDENTIFIERS:
            return []
        fields = interp.get("fields") or {}
        for key in ("ticket_number", "form_id"):
            v = fields.get(key) if isinstance(fields, dict) else None
            if isinstance(v, str):
                ids.append(v)
    text = read_data.get("text")
    if isinstance(text, str) and 0 < len(text) <= 200:
        ids.append(text)
    cert = read_data.get("auth_cert")
    serial = cert.get("serial") if isinstance(cert, dict) else None
    if isinstance(serial, str):  # hex, lower case (agent/drivers/card.py)
        ids.append(serial.lower())
    return ids


def _reservation(
    store: DatasetStore, read_data: dict[str, Any], now: float, max_age_s: float
) -> dict[str, Any] | None:
    ids = reservation_ids(read_data)
    if not ids:
        return None
    with store.snapshot():
        h = store.held_kind("reservations")
        if h is None:
            return None
        hit = store.reservation(ids)
    base = {"dataset": "reservations", "version": h.version, "stale": h.stale(now, max_age_s)}
    if hit is None:
        return {"verdict": "no_reservation", **base}
    start, end, purpose, _ = hit
    timing = "early" if now < _epoch(start) else "late" if now > _epoch(end) else "on_time"
    return {
        "verdict": "reserved",
        "slot_start": start,
        "slot_end": end,
        "purpose": purpose,
        "timing": timing,
        **base,
    }


def _rmtree(path: Path) -> None:
    """shutil.rmtree(ignore_errors=True), shutil loaded only when there is something to
    remove: a station without datasets does not carry it (0.7 MB with bz2, lzma)."""
    if path.exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
