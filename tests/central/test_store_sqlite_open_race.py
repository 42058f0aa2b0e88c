"""Registry processes that open one new SQLite file at the same moment all start.

Switching a new file into WAL takes an exclusive lock that SQLite does not wait for
(no busy handler there): before `enable_wal`, one of four processes exited "database is
locked" in 23 of 60 rounds on this machine (`make bench`'s 4-consumer SQLite run).
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.central.store_sqlite import RegistryStore, enable_wal

_PROCESSES = 4


def _open(path: str, barrier: Any, errors: Any) -> None:
    barrier.wait()
    try:
        store = RegistryStore(Path(path))
        store.open()
        store.close()
        errors.put("")
    except Exception as e:  # reported to the test, which fails on it
        errors.put(f"{type(e).__name__}: {e}")


def test_processes_opening_one_new_file_together_all_open_it(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures = []
    for i in range(15):
        path = tmp_path / f"round-{i}" / "registry.db"
        barrier, errors = ctx.Barrier(_PROCESSES), ctx.Queue()
        procs = [
            ctx.Process(target=_open, args=(str(path), barrier, errors)) for _ in range(_PROCESSES)
        ]
        for p in procs:
            p.start()
        got = [errors.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        failures += [f"round {i}: {e}" for e in got if e]
        con = sqlite3.connect(path)
        try:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            con.close()
    assert failures == []


def test_a_lock_held_past_the_timeout_is_still_an_error(tmp_path: Path) -> None:
    """Waited for, not ignored: a file locked for good says so after the timeout."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        other = sqlite3.connect(path, isolation_level=None, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enable_wal(other, timeout_s=0.3)
        other.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
