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
from agent.errors import BlobMismatch
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
