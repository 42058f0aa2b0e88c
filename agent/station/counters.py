"""The outbox's counters outside the database: a seq reservation and `session`.

A database that turns to garbage (a bad SD card, a torn write) takes its `meta`
table with it. Without a second copy the station would start again at seq 1 and
session 1: seqs reused under new ids, births the dashboard ignores. This file is
small and written with the same discipline as the database (write a temp file,
fsync it, rename it over, fsync the directory).

`seq_reserved` is an upper bound: no seq above it has been handed out. The outbox
writes it before a commit would pass it, `RESERVE` seqs ahead, so the two fsyncs
of the file are paid once per `RESERVE` scans, not per scan (bench/bench_integrity.py:
per scan they tripled the append latency). While the database is sound it is the
authority on `last_seq`; when it is garbage or missing the outbox continues after
`seq_reserved` and reports the seqs it cannot account for as lost (the unused
reserved ones among them), so no seq is ever reused and none goes missing silently.

`unconfirmed_from` (the lowest seq not yet confirmed when it was written) bounds
what a garbage database can have lost: seqs below it had reached the registry.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agent.errors import OutboxDiskFull, OutboxError

log = logging.getLogger(__name__)

SUFFIX = ".counters"
RESERVE = 64


@dataclass(frozen=True, slots=True)
class Counters:
    """What the side file holds; all zero when there is none (a first start)."""

    seq_reserved: int = 0
    session: int = 0
    unconfirmed_from: int = 0


def side_path(db_path: Path) -> Path:
    """`outbox.db.counters` beside the database."""
    return Path(str(db_path) + SUFFIX)


def load(path: Path) -> Counters:
    """The counters in `path`; zeros (and a warning) if it is missing or unreadable.

    Garbage here is not fatal: the database holds the same counters, and the
    outbox takes the larger of the two.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Counters()
    except OSError as e:
        log.warning("%s: cannot read the counters side file (%s); using the database's", path, e)
        return Counters()
    try:
        body = json.loads(raw.decode("ascii"))
        if not isinstance(body, dict):
            raise ValueError("not an object")
        values = [body.get(k, 0) for k in ("seq_reserved", "session", "unconfirmed_from")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError("counters are not non-negative integers")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        log.warning("%s: counters side file is damaged (%s); using the database's", path, e)
        return Counters()
    return Counters(*values)


def store(path: Path, counters: Counters) -> None:
    """Write `counters` durably: temp file, fsync, rename, fsync the directory.

    Raises `OutboxDiskFull` on ENOSPC, `OutboxError` on any other OS error; the
    previous file is intact either way.
    """
    tmp = path.with_name(path.name + ".tmp")
    body = json.dumps(
        {
            "seq_reserved": counters.seq_reserved,
            "session": counters.session,
            "unconfirmed_from": counters.unconfirmed_from,
        }
    ).encode("ascii")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutboxDiskFull(f"{path}: cannot write the counters: disk full") from e
        raise OutboxError(f"{path}: cannot write the counters: {e}") from e
