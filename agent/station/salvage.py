"""Salvage: every readable unconfirmed row out of a damaged outbox database.

The outbox moves a damaged file aside (it is never deleted) and calls
`salvage()` on the copy. This is our own walk by rowid (`seq` is the rowid):
range scans while the b-tree answers, and where a statement fails
(SQLITE_CORRUPT, NOTADB, a row whose columns do not decode) seq-by-seq point
lookups, so one overwritten page costs only the rows on it. Nothing here
raises: what cannot be read is reported as lost seq ranges, which the outbox
publishes as `lost_range` records (docs/CONTRACT.md "lost-range record").

No row's content is ever logged: rows hold barcode texts and sealed personal data.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the columns copied into the fresh database, in this order
COLUMNS = (
    "seq, id, captured_at, device, kind, source, operator, clock_synced, data, sealed,"
    " bytes, state, created_at, sent_at, confirmed_at"
)
_CHUNK = 500
#: what reading a damaged file can raise: SQLite's errors, and text that is not UTF-8
_BAD = (sqlite3.Error, ValueError, OverflowError)


@dataclass(slots=True)
class Salvaged:
    """What a walk got out of a damaged database."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)
    """Seq ranges (first, last) that may have held unconfirmed records and could not be read."""
    last_seq: int = 0
    session: int = 0
    unreadable: int = 0

    @property
    def lost_count(self) -> int:
        return sum(b - a + 1 for a, b in self.lost)


def _row_ok(row: tuple[Any, ...]) -> bool:
    """A row the fresh database and the uplink can use: types right, data is JSON."""
    seq, rid, captured, device, kind, source = row[:6]
    if not (isinstance(seq, int) and seq > 0 and isinstance(rid, str) and rid):
        return False
    if not all(isinstance(v, str) for v in (captured, device, kind, source)):
        return False
    if not isinstance(row[8], str) or not isinstance(row[10], int):
        return False
    if not isinstance(row[11], int) or not isinstance(row[12], (int, float)):
        return False
    try:
        json.loads(row[8])
    except (ValueError, RecursionError):
        return False
    return True


def _meta(db: sqlite3.Connection, key: str) -> int:
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    except _BAD:
        return 0
    return int(row[0]) if row is not None and isinstance(row[0], int) else 0


def salvage(path: Path, *, known_last_seq: int = 0, unconfirmed_from: int = 0) -> Salvaged:
    """Walk `path` (a moved-aside outbox) for its unconfirmed rows.

    `known_last_seq` (the running outbox's, or at start the side file's reservation)
    bounds the walk when the file's own `meta.last_seq` cannot be read;
    `unconfirmed_from` is the lowest seq that may be unconfirmed (seqs below it had
    been confirmed: not lost).
    """
    out = Salvaged(last_seq=known_last_seq)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        log.error("salvage %s: cannot open (%s)", path, e)
        _lose(out, max(1, unconfirmed_from), known_last_seq)
        return out
    try:
        # `meta.last_seq` commits with the rows: when it can be read it is exact, and the
        # seqs reserved past it (`known_last_seq` at start) were never handed out
        meta_last = _meta(db, "last_seq")
        if meta_last:
            out.last_seq = meta_last
        out.session = _meta(db, "session")
        _walk(db, out, max(1, unconfirmed_from), bounded=unconfirmed_from > 0)
    finally:
        db.close()
    log.warning(
        "salvage %s: %d unconfirmed row(s) readable, %d seq(s) lost in %d range(s), up to seq %d",
        path,
        len(out.rows),
        out.lost_count,
        len(out.lost),
        out.last_seq,
    )
    return out


def _walk(db: sqlite3.Connection, out: Salvaged, start: int, bounded: bool) -> None:
    """Range scans while they answer, seq-by-seq lookups where they do not."""
    seen: set[int] = set()  # seqs whose row was read, in any state
    unreadable: list[int] = []
    cur = start - 1  # every seq <= cur is decided

    def take(row: tuple[Any, ...]) -> None:
        seen.add(row[0])
        out.last_seq = max(out.last_seq, row[0])
        if row[11] < 2:
            out.rows.append(row)

    while True:
        try:
            rows: list[tuple[Any, ...]] | None = db.execute(
                f"SELECT {COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (cur, _CHUNK),
            ).fetchall()
        except _BAD:
            rows = None
        if rows is not None and all(_row_ok(r) for r in rows):
            for r in rows:
                take(r)
            if len(rows) < _CHUNK:
                break
            cur = rows[-1][0]
            continue
        found = False
        for seq in range(cur + 1, cur + _CHUNK + 1):
            try:
                row = db.execute(f"SELECT {COLUMNS} FROM records WHERE seq = ?", (seq,)).fetchone()
            except _BAD:
                unreadable.append(seq)
                continue
            if row is None:
                continue  # never there, purged after confirmation, or lost with its page
            if not _row_ok(row):
                unreadable.append(seq)
                continue
            found = True
            take(row)
        cur += _CHUNK
        if cur >= out.last_seq and not found:
            break  # past everything the file or the side file knows of
    out.unreadable = len(unreadable)
    if bounded:
        # from the lowest possibly unconfirmed seq on, every seq not read is lost, whether
        # its page failed or the b-tree silently no longer leads to it
        missing = [s for s in range(start, out.last_seq + 1) if s not in seen]
    else:
        missing = sorted(s for s in unreadable if s <= out.last_seq)
    _ranges(out, missing)


def _ranges(out: Salvaged, seqs: list[int]) -> None:
    for s in seqs:
        if out.lost and out.lost[-1][1] == s - 1:
            out.lost[-1] = (out.lost[-1][0], s)
        else:
            out.lost.append((s, s))


def _lose(out: Salvaged, first: int, last: int) -> None:
    if last >= first:
        out.lost.append((first, last))
