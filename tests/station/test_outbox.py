"""The outbox: durable, ordered, gap-free, bounded, self-healing, sealed."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import uuid
from pathlib import Path

import pytest

from agent.contract.records import Read, envelope
from agent.errors import OutboxError, OutboxFull
from agent.station.outbox import Outbox, read_stats
from agent.station.sealing import Sealer


def scan(text: str, device: str = "ticket-scanner") -> Read:
    return Read(device=device, kind="barcode", data={"text": text})


async def test_seq_is_gap_free_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(f"A{i}")) for i in range(5)]
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5]
    ids = {r.id for r in recs}
    assert len(ids) == 5
    assert all(uuid.UUID(i).version == 7 for i in ids)
    async with Outbox(db) as ob:
        more = [await ob.append(scan(f"B{i}")) for i in range(3)]
        assert [r.seq for r in more] == [6, 7, 8]
        # confirmed and purged records never give their seq back
        await ob.confirm([r.id for r in recs + more])
        assert await ob.purge(retention_days=0) == 8
    async with Outbox(db) as ob:
        assert (await ob.append(scan("C"))).seq == 9


async def test_concurrent_appends_share_a_commit(tmp_path: Path) -> None:
    commits: list[int] = []

    class Counting(Outbox):
        def _commit(self, batch):  # type: ignore[no-untyped-def]
            commits.append(len(batch))
            return super()._commit(batch)

    async with Counting(tmp_path / "o.db") as ob:
        recs = await asyncio.gather(*(ob.append(scan(f"X{i}", f"dev{i % 8}")) for i in range(200)))
    assert sorted(r.seq for r in recs) == list(range(1, 201))
    assert sum(commits) == 200
    assert len(commits) < 200 / 4, commits  # many records per fsync


async def test_states_batches_and_resend(tmp_path: Path) -> None:
    now = [1000.0]
    async with Outbox(tmp_path / "o.db", clock=lambda: now[0]) as ob:
        recs = [await ob.append(scan(str(i))) for i in range(10)]
        batch = await ob.next_batch(4, resend_after_s=30)
        assert [r.seq for r in batch] == [1, 2, 3, 4]
        await ob.mark_sent(r.seq for r in batch)
        assert [r.seq for r in await ob.next_batch(100, 30)] == [5, 6, 7, 8, 9, 10]
        await ob.mark_sent(range(5, 11))
        assert await ob.next_batch(100, 30) == []
        assert await ob.next_resend_at(30) == 1030.0
        assert await ob.confirm([recs[0].id, recs[1].id, "not-an-id"]) == 2
        assert await ob.confirm([recs[0].id]) == 0  # a second ack changes nothing
        now[0] = 1031.0
        again = await ob.next_batch(100, 30)
        assert [r.seq for r in again] == [3, 4, 5, 6, 7, 8, 9, 10]
        assert again[0].id == recs[2].id  # a re-send carries the same id
        assert await ob.reset_sent() == 8
        stats = await ob.stats()
        assert (stats.pending, stats.sent, stats.unconfirmed, stats.confirmed) == (8, 0, 8, 2)
        assert stats.last_seq == 10


async def test_full_outbox_refuses_new_and_keeps_old(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    async with Outbox(db, max_bytes=200_000) as ob:
        stored = 0
        with pytest.raises(OutboxFull):
            for i in range(100_000):
                await ob.append(scan(f"{i:0>500}"))
                stored += 1
        assert stored > 50
        with pytest.raises(OutboxFull):
            await ob.append(scan("one more"))
        assert (await ob.stats()).unconfirmed == stored
        batch = await ob.next_batch(100_000, 30)
        assert [r.seq for r in batch] == list(range(1, stored + 1))
        # once the registry confirms and retention passes, there is room again
        await ob.confirm([r.id for r in batch])
        await ob.purge(retention_days=0)
        assert (await ob.append(scan("after purge"))).seq == stored + 1


async def test_corrupt_database_is_moved_aside_and_seq_continues(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        for i in range(3):
            await ob.append(scan(str(i)))
    # damage a page in the middle of the records table, keep the header readable
    raw = bytearray(db.read_bytes())
    for off in range(4096 * 2, min(len(raw), 4096 * 3)):
        raw[off] = 0xA5
    db.write_bytes(bytes(raw))
    async with Outbox(db) as ob:
        assert ob.recovered_from is not None
        assert ob.recovered_from.exists()
        assert ob.recovered_from.name.startswith("outbox.db.corrupt-")
        rec = await ob.append(scan("after"))
        assert rec.seq >= 4  # not reused, when the counter could be salvaged
        assert (await ob.stats()).recovered_from == str(ob.recovered_from)


def quick_check_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "agent.station.outbox" and "quick_check" in r.getMessage()
    ]


async def test_clean_close_lets_the_next_start_skip_quick_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="agent.station.outbox")
    db = tmp_path / "outbox.db"
    mark = tmp_path / "outbox.db.clean"
    async with Outbox(db) as ob:
        await ob.append(scan("1"))
        assert not mark.exists()  # a crash from here on leaves no mark
    assert mark.exists()
    assert "new database, quick_check skipped" in quick_check_logs(caplog)[-1]
    async with Outbox(db) as ob:
        assert not mark.exists()
        assert "quick_check skipped" in quick_check_logs(caplog)[-1]
        assert (await ob.append(scan("2"))).seq == 2
    # a start that never closed (killed, power cut) leaves no mark: checked in full
    mark.unlink()
    async with Outbox(db) as ob:
        await ob.integrity_checked()  # in the background, after READY (issue #18)
        assert "quick_check ok" in quick_check_logs(caplog)[-1]


async def test_a_file_changed_after_a_clean_close_is_checked_even_with_its_times_restored(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        for i in range(3):
            await ob.append(scan(str(i)))
    before = db.stat()
    raw = bytearray(db.read_bytes())
    raw[4096 * 2 : 4096 * 3] = b"\xa5" * 4096
    db.write_bytes(bytes(raw))
    os.utime(db, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime still moves
    async with Outbox(db) as ob:
        assert ob.recovered_from is not None
        assert (await ob.append(scan("after"))).seq == 4


async def test_corruption_found_while_running_moves_aside_and_keeps_taking_scans(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        first = [await ob.append(scan(f"A{i}")) for i in range(200)]
        # the storage goes bad under the running agent: every page after the schema
        await ob._run(lambda: ob.db.execute("PRAGMA cache_size=1"))
        await ob._run(lambda: ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        raw = bytearray(db.read_bytes())
        raw[4096:] = b"\xa5" * (len(raw) - 4096)
        db.write_bytes(bytes(raw))
        rec = await ob.append(scan("after"))
        # never reused; seq 201 says that 1..200 could not be read (salvage found none)
        assert rec.seq == first[-1].seq + 2
        assert ob.recovered_from is not None
        assert ob.recovered_from.name.startswith("outbox.db.corrupt-")
        stats = await ob.stats()
        assert stats.recovered_from == str(ob.recovered_from)
        assert stats.unconfirmed == 2
        assert (stats.lost_seqs, stats.lost_ranges) == (200, 1)
        lost, again = await ob.next_batch(10, 30)
        assert (lost.kind, lost.seq, lost.data["first_seq"], lost.data["last_seq"]) == (
            "lost_range",
            201,
            1,
            200,
        )
        assert again.id == rec.id
    async with Outbox(db) as ob:
        assert (await ob.append(scan("next start"))).seq == rec.seq + 1


async def test_garbage_file_is_moved_aside(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    db.write_bytes(b"this is not a database" * 500)
    async with Outbox(db) as ob:
        assert ob.recovered_from is not None
        assert ob.recovered_from.read_bytes().startswith(b"this is not a database")
        assert (await ob.append(scan("x"))).seq == 1


async def test_personal_data_sealed_and_purged_on_confirm(tmp_path: Path) -> None:
    key = tmp_path / "data.key"
    Sealer.create_key_file(key)
    db = tmp_path / "o.db"
    secret = {"name": "試験 太郎", "my_number": "123456789018"}
    async with Outbox(db, sealer=Sealer.from_file(key)) as ob:
        rec = await ob.append(
            Read(device="card", kind="card", data={"card_type": "mynumber"}, personal=secret)
        )
        assert rec.wire()["data"]["personal"] == secret
        [again] = await ob.next_batch(10, 30)
        assert again.personal == secret
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("o.db*"))
    assert "試験 太郎".encode() not in blob
    assert b"123456789018" not in blob
    async with Outbox(db, sealer=Sealer.from_file(key)) as ob:
        await ob.confirm([rec.id])
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT sealed FROM records").fetchone() == (None,)
    conn.close()


async def test_personal_data_without_a_key_is_refused(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as ob:
        with pytest.raises(OutboxError, match="key_file"):
            await ob.append(Read(device="card", kind="card", data={}, personal={"n": "x"}))
        assert (await ob.stats()).unconfirmed == 0


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    Sealer.create_key_file(key)
    key.chmod(0o644)
    with pytest.raises(Exception, match="readable by others"):
        Sealer.from_file(key)


async def test_read_stats_while_open(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    async with Outbox(db) as ob:
        await ob.append(scan("1"))
        await ob.bump_session()
        s = read_stats(db)
        assert (s["unconfirmed"], s["last_seq"], s["session"]) == (1, 1, 1)
    with pytest.raises(OutboxError, match="no outbox database"):
        read_stats(tmp_path / "missing.db")


async def test_retention_purges_only_confirmed_records_past_the_window(tmp_path: Path) -> None:
    now = [1_000_000.0]
    day = 86400.0
    async with Outbox(tmp_path / "o.db", clock=lambda: now[0]) as ob:
        old = [await ob.append(scan(f"old{i}")) for i in range(3)]
        kept = await ob.append(scan("never confirmed"))
        await ob.confirm([r.id for r in old[:2]])  # confirmed on day 0
        now[0] += 3 * day
        recent = await ob.append(scan("recent"))
        await ob.confirm([recent.id])  # confirmed on day 3
        assert await ob.purge(retention_days=7) == 0  # nothing is 7 days old yet
        now[0] += 4.5 * day
        assert await ob.purge(retention_days=7) == 2  # the two confirmed on day 0
        stats = await ob.stats()
        assert stats.confirmed == 1 and stats.unconfirmed == 2  # recent; old[2] and kept
        now[0] += 365 * day
        assert await ob.purge(retention_days=7) == 1  # recent, at last
        batch = await ob.next_batch(10, resend_after_s=0)
        assert {r.id for r in batch} == {old[2].id, kept.id}  # unconfirmed: never purged


async def test_stats_and_resend_time_never_scan_the_confirmed_history(tmp_path: Path) -> None:
    """Stats run before READY and every few seconds on the commit thread; with a week of
    confirmed records (or a million queued) a full-table scan there delays every ACK."""
    now = [1000.0]
    db = tmp_path / "o.db"
    async with Outbox(db, clock=lambda: now[0]) as ob:
        recs = [await ob.append(scan(str(i))) for i in range(6)]
        await ob.confirm([recs[0].id, recs[1].id])
        now[0] = 1010.0
        await ob.mark_sent([3])
        st = await ob.stats()
        assert (st.pending, st.sent, st.unconfirmed, st.confirmed) == (3, 1, 4, 2)
        assert st.oldest_unconfirmed_age_s == 10.0
        assert await ob.next_resend_at(30) == 1040.0
    plain = sqlite3.connect(db)
    try:
        for query in (
            "SELECT count(*) FROM records WHERE state < 2",
            "SELECT count(*) FROM records WHERE state < 2 AND seq BETWEEN 3 AND 900",
            "SELECT seq FROM records WHERE state < 2 AND seq > 3 AND seq < 9 ORDER BY seq LIMIT 5",
            "SELECT seq FROM records WHERE state < 2 AND seq > 3 ORDER BY seq LIMIT 5",
            "SELECT created_at FROM records WHERE state < 2 ORDER BY seq LIMIT 1",
        ):
            plan = " ".join(str(row[3]) for row in plain.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert "INDEX" in plan, (query, plan)
    finally:
        plain.close()


async def test_wire_json_reuses_the_stored_text_and_says_what_wire_says(tmp_path: Path) -> None:
    read = Read(
        device="ticket-scanner",
        kind="barcode",
        data={"text": "接種券 12345", "interpretation": {"type": "text", "valid": True}},
        clock_synced=True,
    )
    async with Outbox(tmp_path / "o.db") as ob:
        live = await ob.append(read, operator="counter-3")
        [stored] = await ob.next_batch(10, 30)
        for rec in (live, stored):
            assert rec.data_json is not None
            assert json.loads(rec.wire_json()) == rec.wire()
        body = json.loads(envelope("site-a", "agent-1", [live, stored]))
        assert body["records"] == [live.wire(), stored.wire()]
        assert (body["site"], body["agent"]) == ("site-a", "agent-1")


async def test_delivery_bookkeeping_leaves_scans_fully_synchronous(tmp_path: Path) -> None:
    """sent/confirmed commit without an fsync; the next scan's commit must fsync again."""
    async with Outbox(tmp_path / "o.db") as ob:
        rec = await ob.append(scan("1"))
        await ob.mark_sent([rec.seq])
        await ob.confirm([rec.id])
        await ob.reset_sent()
        sync = await ob._run(lambda: ob.db.execute("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
        assert (await ob.stats()).confirmed == 1


async def test_rows_an_earlier_release_marked_sent_are_pending_and_its_index_is_dropped(
    tmp_path: Path,
) -> None:
    """Releases before 980a678 wrote "sent" into the rows (state 1, sent_at) with an index
    on them; this one keeps it in memory. Such a file, opened here, has every unconfirmed
    record due for sending, counted pending, and the index is gone."""
    db = tmp_path / "o.db"
    now = [1000.0]
    async with Outbox(db, clock=lambda: now[0]) as ob:
        recs = [await ob.append(scan(str(i))) for i in range(5)]
        await ob.confirm([recs[0].id])
    plain = sqlite3.connect(db, isolation_level=None)
    try:
        plain.execute("CREATE INDEX records_sent ON records(sent_at) WHERE state = 1")
        plain.execute("UPDATE records SET state = 1, sent_at = 999.0 WHERE seq IN (2, 3)")
    finally:
        plain.close()
    async with Outbox(db, clock=lambda: now[0]) as ob:
        st = await ob.stats()
        assert (st.pending, st.sent, st.unconfirmed, st.confirmed) == (4, 0, 4, 1)
        assert [o.seq for o in await ob.next_wire_batch(10, 30)] == [2, 3, 4, 5]
        assert await ob.next_resend_at(30) is None
        await ob.mark_sent([2, 3])
        st = await ob.stats()
        assert (st.pending, st.sent) == (2, 2)
        assert await ob.confirm([recs[1].id, recs[2].id]) == 2
        st = await ob.stats()
        assert (st.pending, st.sent, st.confirmed) == (2, 0, 3)
        indexes = await ob._run(
            lambda: [
                r[0] for r in ob.db.execute("SELECT name FROM sqlite_master WHERE type='index'")
            ]
        )
        assert "records_sent" not in indexes and "records_unconfirmed" in indexes


async def test_marking_sent_and_the_reset_write_nothing(tmp_path: Path) -> None:
    """At a PUBACK and at every connect: no transaction, no page written (issue #18)."""
    db = tmp_path / "o.db"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(str(i))) for i in range(50)]
        changes = await ob._run(lambda: ob.db.total_changes)
        wal = (tmp_path / "o.db-wal").stat().st_size
        await ob.mark_sent(r.seq for r in recs)
        assert (await ob.stats()).sent == 50
        assert await ob.reset_sent() == 50
        assert await ob._run(lambda: ob.db.total_changes) == changes
        assert (tmp_path / "o.db-wal").stat().st_size == wal
        st = await ob.stats()
        assert (st.pending, st.sent) == (50, 0)
