"""Salvage: every readable unconfirmed row out of a damaged outbox database.

The outbox moves a damaged file aside (it is never deleted) and calls
`salvage()` on the copy. This is our own walk by rowid (`seq` is the rowid):
range scans while the b-tree answers, and where a statement fails
(SQLITE_CORRUPT, NOTADB, a row whose columns do not decode) seq-by-seq point
lookups, so one overwritten page costs only the rows on it; then, for the
seqs still missing, the table's leaf pages read straight from the file (a
damaged root or interior page hides intact leaves from every query). The
`sqlite3` CLI's `.recover` was tried first: the Debian 3.40.1 one stopped with
"SQL logic error" and returned nothing on a file of our tests (35 random pages
of 96 overwritten). Nothing here raises:
what cannot be read is reported as lost seq ranges, which the outbox
publishes as `lost_range` records (docs/CONTRACT.md "lost-range record").

No row's content is ever logged: rows hold barcode texts and sealed personal data.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
from collections.abc import Callable
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
    """The rows not yet handed to `sink` (all of them when there is no sink)."""
    count: int = 0
    """Unconfirmed rows salvaged in all."""
    sink: Callable[[list[tuple[Any, ...]]], None] | None = None
    lost: list[tuple[int, int]] = field(default_factory=list)
    """Seq ranges (first, last) that may have held unconfirmed records and could not be read."""
    last_seq: int = 0
    session: int = 0
    unreadable: int = 0

    def add(self, row: tuple[Any, ...]) -> None:
        self.count += 1
        self.rows.append(row)
        if self.sink is not None and len(self.rows) >= 2000:
            self.flush()

    def flush(self) -> None:
        if self.sink is not None and self.rows:
            self.sink(self.rows)
            self.rows = []

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


def salvage(
    path: Path,
    *,
    known_last_seq: int = 0,
    unconfirmed_from: int = 0,
    sink: Callable[[list[tuple[Any, ...]]], None] | None = None,
) -> Salvaged:
    """Walk `path` (a moved-aside outbox) for its unconfirmed rows.

    `known_last_seq` (the running outbox's, or at start the side file's reservation)
    bounds the walk when the file's own `meta.last_seq` cannot be read;
    `unconfirmed_from` is the lowest seq that may be unconfirmed (seqs below it had
    been confirmed: not lost). With `sink`, rows are handed over in chunks as they
    are read instead of being kept (a backlog may be larger than the Pi's memory).
    """
    out = Salvaged(last_seq=known_last_seq, sink=sink)
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
        missing = _walk(db, out, max(1, unconfirmed_from), bounded=unconfirmed_from > 0)
    finally:
        db.close()
    if missing:
        # what the b-tree no longer leads to may still lie on its leaf pages
        wanted = set(missing)
        for row in _leaf_rows(path, wanted):
            wanted.discard(row[0])
            if row[11] < 2:
                out.add(row)
        missing = sorted(wanted)
    out.flush()
    _ranges(out, missing)
    log.warning(
        "salvage %s: %d unconfirmed row(s) readable, %d seq(s) lost in %d range(s), up to seq %d",
        path,
        out.count,
        out.lost_count,
        len(out.lost),
        out.last_seq,
    )
    return out


def _walk(db: sqlite3.Connection, out: Salvaged, start: int, bounded: bool) -> list[int]:
    """Range scans while they answer, seq-by-seq lookups where they do not; the seqs
    that may have held an unconfirmed row and were not read."""
    seen: set[int] = set()  # seqs whose row was read, in any state
    unreadable: list[int] = []
    cur = start - 1  # every seq <= cur is decided

    def take(row: tuple[Any, ...]) -> None:
        seen.add(row[0])
        out.last_seq = max(out.last_seq, row[0])
        if row[11] < 2:
            out.add(row)

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
    return missing


# -- the leaf pages themselves (docs: sqlite.org/fileformat2.html) ---------------------

_RECORD_COLUMNS = 15  # the records table, seq (the rowid alias) first


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """SQLite's big-endian varint at `i`: (value, next index). IndexError past the end."""
    v = 0
    for k in range(8):
        b = buf[i + k]
        v = (v << 7) | (b & 0x7F)
        if b < 0x80:
            return v, i + k + 1
    return (v << 8) | buf[i + 8], i + 9


def _value(serial: int, body: bytes, j: int) -> tuple[Any, int]:
    """One column of a record: (value, next index). ValueError for what SQLite never writes."""
    if serial == 0:
        return None, j
    if 1 <= serial <= 6:
        n = (1, 2, 3, 4, 6, 8)[serial - 1]
        if j + n > len(body):
            raise ValueError("column past the payload")
        return int.from_bytes(body[j : j + n], "big", signed=True), j + n
    if serial == 7:
        if j + 8 > len(body):
            raise ValueError("column past the payload")
        return struct.unpack(">d", body[j : j + 8])[0], j + 8
    if serial in (8, 9):
        return serial - 8, j
    if serial < 12:
        raise ValueError("reserved serial type")
    n = (serial - 12) // 2
    if j + n > len(body):
        raise ValueError("column past the payload")
    raw = body[j : j + n]
    return (raw.decode("utf-8") if serial % 2 else bytes(raw)), j + n


def _leaf_rows(path: Path, wanted: set[int]) -> list[tuple[Any, ...]]:
    """Rows of the records table read straight from its leaf pages, for the seqs in
    `wanted`: a damaged interior or root page hides intact leaves from every query.
    Rows that spill to overflow pages are left out (a scan record never does)."""
    found: dict[int, tuple[Any, ...]] = {}
    try:
        with open(path, "rb") as f:  # page by page: the file may be gigabytes, the Pi's RAM is not
            header = f.read(100)
            page_size = 4096
            if header[:16] == b"SQLite format 3\x00" and len(header) == 100:
                ps = int.from_bytes(header[16:18], "big")
                page_size = 65536 if ps == 1 else ps
                if page_size < 512 or page_size & (page_size - 1):
                    page_size = 4096
            usable = page_size - (header[20] if len(header) > 20 else 0)
            f.seek(0)
            first = True
            while len(page := f.read(page_size)) == page_size:
                _leaf_page(page, 100 if first else 0, usable - 35, wanted, found)
                first = False
    except OSError:
        pass
    return [found[k] for k in sorted(found)]


def _leaf_page(
    page: bytes, head: int, max_local: int, wanted: set[int], found: dict[int, tuple[Any, ...]]
) -> None:
    """The wanted records rows on one page, if it is a table b-tree leaf."""
    if page[head] != 0x0D:
        return
    cells = int.from_bytes(page[head + 3 : head + 5], "big")
    for c in range(min(cells, len(page) // 4)):
        at = head + 8 + 2 * c
        try:
            off = int.from_bytes(page[at : at + 2], "big")
            size, i = _varint(page, off)
            rowid, i = _varint(page, i)
            if rowid not in wanted or size > max_local or i + size > len(page):
                continue
            row = _decode(page[i : i + size], rowid)
        except (IndexError, ValueError):
            continue
        if row is not None and _row_ok(row):
            found[rowid] = row


def _decode(body: bytes, rowid: int) -> tuple[Any, ...] | None:
    """A records row from its payload, or None if it is not one."""
    hsize, i = _varint(body, 0)
    if hsize > len(body):
        return None
    serials = []
    while i < hsize:
        t, i = _varint(body, i)
        serials.append(t)
    if len(serials) != _RECORD_COLUMNS or serials[0] != 0:
        return None
    values: list[Any] = [rowid]
    j = hsize
    for t in serials[1:]:
        v, j = _value(t, body, j)
        values.append(v)
    return tuple(values)


def _ranges(out: Salvaged, seqs: list[int]) -> None:
    for s in seqs:
        if out.lost and out.lost[-1][1] == s - 1:
            out.lost[-1] = (out.lost[-1][0], s)
        else:
            out.lost.append((s, s))


def _lose(out: Salvaged, first: int, last: int) -> None:
    if last >= first:
        out.lost.append((first, last))
