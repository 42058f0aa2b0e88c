"""The registry's record stores, through the `RecordStore` protocol: SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.central.store import Batch, RecordStore, plan_gaps
from agent.central.store_pg import PostgresStore
from agent.central.store_sqlite import RegistryStore, SqliteStore
from agent.central.stores import open_store
from agent.errors import BlobMismatch, RegistryStoreError
from tests.support.central import PgCluster, record

SITE, AGENT = "toda-city-hall-1f", "station-03"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RecordStore]:
    if request.param == "sqlite":
        s: RecordStore = SqliteStore(tmp_path / "registry.db")
    else:
        s = PostgresStore(request.getfixturevalue("pg_dsn"))
    await s.open()
    yield s
    await s.close()


def test_plan_gaps_opens_splits_and_closes() -> None:
    gaps, top = plan_gaps([], 0, [1, 2, 6], now=10.0)
    assert (gaps, top) == ([(3, 5, 10.0)], 6)
    gaps, top = plan_gaps(gaps, top, [4], now=20.0)
    assert gaps == [(3, 3, 10.0), (5, 5, 10.0)]  # a split keeps when the gap opened
    gaps, top = plan_gaps(gaps, top, [3, 5, 9], now=30.0)
    assert (gaps, top) == ([(7, 8, 30.0)], 9)
    assert plan_gaps(gaps, top, [7, 8], now=40.0) == ([], 9)


async def test_insert_is_idempotent_under_redelivery(store: RecordStore) -> None:
    recs = [record(i) for i in (1, 2, 3)]
    first = await store.store([Batch(SITE, AGENT, recs)])
    assert [s.new for s in first] == [True, True, True]
    # the same batch again, and a batch repeating one record twice in one commit
    again = await store.store([Batch(SITE, AGENT, recs), Batch(SITE, AGENT, [recs[0], recs[0]])])
    assert [s.new for s in again] == [False] * 5
    assert await store.count() == 3
    [summary] = await store.agents()
    assert (summary.max_seq, summary.records) == (3, 3)
    assert sum(summary.per_minute) == 3


async def test_gaps_are_kept_in_the_database_and_alert_once(store: RecordStore) -> None:
    await store.store([Batch(SITE, AGENT, [record(1), record(2), record(5)])])
    assert [(g.first, g.last) for g in await store.open_gaps()] == [(3, 4)]
    [overdue] = await store.overdue_gaps(0.0)
    assert (overdue.site, overdue.agent, overdue.first, overdue.last) == (SITE, AGENT, 3, 4)
    assert await store.overdue_gaps(0.0) == []  # alerted once, not at every check
    await store.store([Batch(SITE, AGENT, [record(3)])])
    assert [(g.first, g.last) for g in await store.open_gaps()] == [(4, 4)]
    assert await store.overdue_gaps(0.0) == []  # what is left of an alerted gap stays alerted
    await store.store([Batch(SITE, AGENT, [record(4)])])
    assert await store.open_gaps() == []
    assert await store.count() == 5


async def test_a_young_gap_is_not_overdue(store: RecordStore) -> None:
    await store.store([Batch(SITE, AGENT, [record(1), record(3)])])
    assert await store.overdue_gaps(3600.0) == []
    assert len(await store.open_gaps()) == 1


async def test_blobs_are_hash_verified_and_stored_once(store: RecordStore) -> None:
    data = bytes(range(256)) * 40
    digest = hashlib.sha256(data).hexdigest()
    kw: dict[str, Any] = {
        "record_id": "r-1",
        "site": SITE,
        "agent": AGENT,
        "name": "photo.jpg",
        "content_type": "image/jpeg",
    }
    assert await store.store_blob(**kw, sha256=digest, data=data) is True
    assert await store.store_blob(**kw, sha256=digest.upper(), data=data) is False
    with pytest.raises(BlobMismatch):
        await store.store_blob(**kw, sha256=digest, data=data[:-1])
    other = b"another photo"
    with pytest.raises(BlobMismatch):  # same name, other bytes: refused, first one kept
        await store.store_blob(**kw, sha256=hashlib.sha256(other).hexdigest(), data=other)


async def test_two_postgres_consumers_racing_on_the_same_records_store_once(
    pg_dsn: str, pg_cluster: PgCluster
) -> None:
    a, b = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        for round_ in range(20):
            recs = [record(round_ * 10 + i) for i in range(1, 11)]
            out_a, out_b = await asyncio.gather(
                a.store([Batch(SITE, AGENT, recs)]), b.store([Batch(SITE, AGENT, recs[::-1])])
            )
            news = [s.record["id"] for s in (*out_a, *out_b) if s.new]
            assert sorted(news) == sorted(r["id"] for r in recs)
    finally:
        await a.close()
        await b.close()
    rows = pg_cluster.query(pg_dsn, "SELECT count(*), count(DISTINCT id), max(seq) FROM records")
    assert rows == [(200, 200, 200)]
    assert pg_cluster.query(pg_dsn, "SELECT count(*) FROM gaps") == [(0,)]


async def test_postgres_records_have_no_seq_index_and_an_old_one_is_kept(
    pg_dsn: str, pg_cluster: PgCluster
) -> None:
    """A new PostgreSQL database indexes records by id and stored_at only (no query reads
    them by station and seq); one made before with `records_agent_seq` keeps it through
    every open, and stores as before."""
    indexes = "SELECT indexname FROM pg_indexes WHERE tablename = 'records' ORDER BY 1"
    st = PostgresStore(pg_dsn)
    await st.open()
    await st.close()
    assert pg_cluster.query(pg_dsn, indexes) == [("records_pkey",), ("records_stored_at",)]
    import psycopg

    with psycopg.connect(pg_dsn) as conn:  # as the schema of before made it
        conn.execute("CREATE INDEX records_agent_seq ON records (site, agent, seq)")
    st = PostgresStore(pg_dsn)
    await st.open()
    try:
        out = await st.store([Batch(SITE, AGENT, [record(1), record(2)])])
        assert [s.new for s in out] == [True, True]
    finally:
        await st.close()
    assert ("records_agent_seq",) in pg_cluster.query(pg_dsn, indexes)
    assert pg_cluster.query(pg_dsn, "SELECT seq FROM records ORDER BY seq") == [(1,), (2,)]


def test_open_store_picks_the_backend_by_dsn(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "r.db"), SqliteStore)
    assert isinstance(open_store(str(tmp_path / "r.db")), SqliteStore)
    assert isinstance(open_store("postgresql://u@/db?host=/tmp"), PostgresStore)
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)


@given(st.permutations(list(range(1, 120))), st.integers(min_value=1, max_value=17))
def test_gaps_are_exactly_the_missing_seqs_whatever_the_order(order: list[int], chunk: int) -> None:
    gaps: list[tuple[int, int, float]] = []
    top = 0
    seen: set[int] = set()
    for i in range(0, len(order), chunk):
        part = order[i : i + chunk]
        gaps, top = plan_gaps(gaps, top, part, now=float(i))
        seen.update(part)
        missing = {s for a, b, _ in gaps for s in range(a, b + 1)}
        assert missing == set(range(1, top + 1)) - seen
        assert gaps == sorted(gaps)
    assert gaps == [] and top == 119


def test_thousands_of_open_gaps_stay_cheap(tmp_path: Path) -> None:
    """Every other seq first (10,000 gaps), then the rest, one commit each: linear work."""
    store = RegistryStore(tmp_path / "registry.db")
    store.open()
    evens = [record(s) for s in range(2, 20_001, 2)]
    odds = [record(s) for s in range(1, 20_001, 2)]
    for i in range(0, len(evens), 50):
        store.store(SITE, AGENT, evens[i : i + 50])
    assert len(store.gaps()) == 10_000
    for r in odds:
        store.store(SITE, AGENT, [r])
    assert store.gaps() == []
    store.close()


# -- conflicts, dead letters, private files (issue #16) -----------------------------------


async def test_same_id_other_content_is_a_conflict_and_the_first_stays(
    store: RecordStore,
) -> None:
    from agent.central.store import canonical

    first = record(1)
    other = {**first, "data": {"text": "something else", "symbology": None}}
    [a] = await store.store([Batch(SITE, AGENT, [first])])
    assert (a.new, a.conflict) == (True, False)
    [dup, clash] = await store.store([Batch(SITE, AGENT, [dict(first), other])])
    assert (dup.new, dup.conflict) == (False, False)  # identical content: a plain duplicate
    assert (clash.new, clash.conflict) == (False, True)
    # the same id from another station is a conflict too, even with the same content
    [stolen] = await store.store([Batch(SITE, "station-99", [first])])
    assert stolen.conflict
    # a conflict inside one commit: the first of the commit is stored, the second kept apart
    fresh = record(2)
    [n, c] = await store.store([Batch(SITE, AGENT, [fresh, {**fresh, "seq": 3}])])
    assert (n.new, c.conflict) == (True, True)
    again = await store.store([Batch(SITE, AGENT, [other])])  # re-sent conflict: kept once
    assert again[0].conflict
    problems = await store.problems()
    assert problems.conflicts == 3
    assert await store.count() == 2
    kept = {(c.record_id, c.agent, c.first_agent, c.body) for c in problems.recent_conflicts}
    assert (first["id"], AGENT, AGENT, canonical(other)) in kept
    assert (first["id"], "station-99", AGENT, canonical(first)) in kept
    [summary] = [s for s in await store.agents() if s.agent == AGENT]
    assert summary.max_seq == 2  # the conflicting seq 3 opened no gap bookkeeping


async def test_dead_letters_are_kept_truncated_and_bounded(
    store: RecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.central.store_pg
    import agent.central.store_sqlite
    from agent.central.store import DEAD_LETTER_PAYLOAD_BYTES, DeadLetter

    for mod in (agent.central.store_sqlite, agent.central.store_pg):
        monkeypatch.setattr(mod, "DEAD_LETTER_ROWS", 5)
    topic = f"madoguchi/v1/{SITE}/{AGENT}/records"
    await store.dead_letter(
        [DeadLetter(topic, f"reason {i}", b"[" * 5000, float(i), SITE, AGENT) for i in range(8)]
    )
    await store.dead_letter([DeadLetter("bad\x00topic", "r", b"\xff", 9.0)])
    problems = await store.problems(recent=100)
    assert problems.dead_letters == 9  # counted, all of them
    assert len(problems.recent_dead_letters) == 5  # kept: the newest only
    newest = problems.recent_dead_letters[0]
    assert (newest.reason, newest.payload, newest.site) == ("r", b"\xff", "")
    assert all(len(d.payload) <= DEAD_LETTER_PAYLOAD_BYTES for d in problems.recent_dead_letters)
    assert [d.reason for d in problems.recent_dead_letters[1:]] == [
        f"reason {i}" for i in (7, 6, 5, 4)
    ]


def test_registry_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from agent.central.blobs import BlobAssembler

    old = os.umask(0o022)
    try:
        db = tmp_path / "central" / "registry.db"
        reg = RegistryStore(db)
        reg.open()
        reg.store(SITE, AGENT, [record(1)])
        files = [db, db.with_name("registry.db-wal"), db.with_name("registry.db-shm")]
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        reg.close()
        # a database an older registry left 0644 is made private at the next open
        os.chmod(db, 0o644)
        reg.open()
        reg.close()
        reopened = stat.S_IMODE(db.stat().st_mode)
        blobs = BlobAssembler(tmp_path / "blobs")
        rid = str(record(1)["id"])
        blobs.manifest(
            SITE,
            AGENT,
            rid,
            {
                "schema": "madoguchi.blob/1",
                "record_id": rid,
                "content_type": "image/jpeg",
                "bytes": 3,
                "chunk_bytes": 3,
                "chunks": 1,
                "sha256": hashlib.sha256(b"abc").hexdigest(),
            },
        )
        blobs.chunk(SITE, AGENT, rid, 0, b"abc")
    finally:
        os.umask(old)
    assert modes == {"registry.db": 0o600, "registry.db-wal": 0o600, "registry.db-shm": 0o600}
    assert reopened == 0o600
    dirs = [p for p in (tmp_path / "blobs").rglob("*") if p.is_dir()] + [tmp_path / "blobs"]
    assert len(dirs) >= 3
    assert {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in dirs} == {
        p.relative_to(tmp_path).as_posix(): 0o700 for p in dirs
    }
    assert blobs.final_path(SITE, AGENT, rid).read_bytes() == b"abc"


async def test_a_conflict_keeps_no_personal_part(store: RecordStore) -> None:
    """The conflicts table is compared and kept without `data.personal`: never in the clear."""
    first = {**record(1), "data": {"text": "a", "personal": {"name": "山田太郎"}}}
    second = {**first, "data": {"text": "b", "personal": {"name": "山田花子"}}}
    await store.store([Batch(SITE, AGENT, [first])])
    [dup] = await store.store([Batch(SITE, AGENT, [{**first, "data": {"text": "a"}}])])
    assert not dup.conflict  # the same record without the personal part: a duplicate
    [clash] = await store.store([Batch(SITE, AGENT, [second])])
    assert clash.conflict
    [kept] = (await store.problems()).recent_conflicts
    assert "山田" not in kept.body and "personal" not in kept.body


async def test_a_lost_range_record_closes_the_gap_it_names(store: RecordStore) -> None:
    """docs/CONTRACT.md "lost-range record": the seqs a station says are gone are
    accounted for (their alert is the lost range's own), the rest of a gap stays open."""
    await store.store([Batch(SITE, AGENT, [record(1), record(2), record(9)])])
    assert [(g.first, g.last) for g in await store.open_gaps()] == [(3, 8)]
    lost = {
        **record(10),
        "device": "outbox",
        "kind": "lost_range",
        "source": "agent",
        "data": {"first_seq": 3, "last_seq": 6, "count": 4, "reason": "unreadable"},
    }
    [stored] = await store.store([Batch(SITE, AGENT, [lost])])
    assert stored.new
    assert [(g.first, g.last) for g in await store.open_gaps()] == [(7, 8)]
    [summary] = await store.agents()
    assert (summary.max_seq, summary.records) == (10, 4)  # the lost seqs are not records


async def test_the_gap_watcher_and_store_share_the_connection_safely(
    pg_dsn: str, pg_cluster: PgCluster
) -> None:
    """The watcher's alert mark must not run inside a store transaction that then rolls
    back: the gap would be alerted twice. A second backend holds the agent row so that
    `store()` is parked inside its transaction when the watcher asks; the stored batch
    then fails on the server (a seq beyond bigint), rolling its transaction back."""
    import psycopg

    s = PostgresStore(pg_dsn)
    await s.open()
    blocker = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        await s.store([Batch(SITE, AGENT, [record(1), record(3)])])  # gap 2..2
        await blocker.execute("INSERT INTO agents (site, agent) VALUES (%s, 'parked')", (SITE,))
        storing = asyncio.create_task(
            s.store([Batch(SITE, "parked", [record(2**70)])]), name="store"
        )
        async with asyncio.timeout(10):
            while not pg_cluster.query(
                pg_dsn,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name LIKE 'madoguchi-registry-%%'",
            ):
                await asyncio.sleep(0.02)  # the store's backend is waiting on the row lock
        watching = asyncio.create_task(s.overdue_gaps(0.0), name="watcher")
        await asyncio.sleep(0.1)  # the watcher is queued behind the parked statement
        await blocker.rollback()
        with pytest.raises(RegistryStoreError):
            await storing
        alerted = await watching
        assert [(g.first, g.last) for g in alerted] == [(2, 2)]
        assert await s.overdue_gaps(0.0) == []  # the mark survived: alerted once
        assert pg_cluster.query(
            pg_dsn, "SELECT count(*) FROM gaps WHERE alerted_at IS NOT NULL"
        ) == [(1,)]
        assert await s.count() == 2  # the connection is usable after the rolled-back store
    finally:
        await blocker.close()
        await s.close()


def test_sqlite_counts_records_per_minute_without_an_index_on_stored_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard's per-minute counts come from record_minutes, one row per station and
    minute, kept MINUTES_KEPT minutes; a database made with the old index on
    records(stored_at) is counted into it and the index dropped at open."""
    import sqlite3

    import agent.central.store_sqlite as mod

    path = tmp_path / "registry.db"
    now = [1_800_000_000.0]
    monkeypatch.setattr(mod.time, "time", lambda: now[0])
    st = RegistryStore(path)
    st.open()
    two = record(2)
    st.store(SITE, AGENT, [record(1), two])
    st.store(SITE, "station-04", [record(1)])
    now[0] += 60
    st.store(SITE, AGENT, [record(3), two])  # sent again: a duplicate, not counted
    by_agent = {a.agent: a.per_minute for a in st.agents(minutes=5)}
    assert by_agent == {AGENT: [0, 0, 0, 2, 1], "station-04": [0, 0, 0, 1, 0]}
    # an old database: the index is back and record_minutes empty
    st.db.execute("CREATE INDEX records_stored_at ON records(stored_at)")
    st.db.execute("DELETE FROM record_minutes")
    st.close()
    st = RegistryStore(path)
    st.open()
    names = {n for (n,) in st.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "records_stored_at" not in names
    assert {a.agent: a.per_minute for a in st.agents(minutes=5)} == by_agent
    # pruned: a commit MINUTES_KEPT minutes later removes the rows before then
    now[0] += 60 * (mod.MINUTES_KEPT + 1)
    st.store(SITE, AGENT, [record(4)])
    minutes = st.db.execute("SELECT DISTINCT minute FROM record_minutes").fetchall()
    assert minutes == [(int(now[0] // 60),)]
    st.close()
    with sqlite3.connect(path) as db:  # what a store row costs: the table and one index
        indexes = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records'"
        ).fetchall()
    assert indexes == [("sqlite_autoindex_records_1",)]  # the primary key's alone


def test_a_database_made_before_keeps_its_seq_index(tmp_path: Path) -> None:
    """A registry database made with `records_agent_seq` (before issue #18's tenth
    round) opens as it is: the index is neither dropped nor needed, and records are
    stored, found again by id, and still indexed by station and seq."""
    import sqlite3

    import agent.central.store_sqlite as mod

    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(mod._SCHEMA)
        db.execute("CREATE INDEX records_agent_seq ON records(site, agent, seq)")
    db.close()
    st = RegistryStore(path)
    st.open()
    one, two = record(1), record(2)
    assert [s.new for s in st.store(SITE, AGENT, [one, two])] == [True, True]
    assert [s.new for s in st.store(SITE, AGENT, [two])] == [False]
    used = st.db.execute(
        "SELECT seq FROM records INDEXED BY records_agent_seq WHERE site = ? AND agent = ?"
        " ORDER BY seq",
        (SITE, AGENT),
    ).fetchall()
    assert used == [(1,), (2,)]
    st.close()
