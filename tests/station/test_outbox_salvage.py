"""Salvage, the counters side file, disk full and the repeat window across restarts
(issue #15, points 1, 2, 3 and 8), on the real Outbox and real files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract.records import Read, Record
from agent.contract.validate import check_record, lost_range
from agent.errors import OutboxDiskFull
from agent.station import counters
from agent.station.outbox import Outbox, read_stats
from agent.station.salvage import salvage

PAGE = 4096


def scan(text: str, device: str = "ticket-scanner") -> Read:
    return Read(device=device, kind="barcode", data={"text": text})


def overwrite_pages(db: Path, pages: list[int], fill: bytes = b"\xa5") -> None:
    """What a failing SD card does: whole pages of the file replaced by junk."""
    with open(db, "r+b") as f:
        for p in pages:
            f.seek(p * PAGE)
            f.write(fill * PAGE)
        f.flush()
        os.fsync(f.fileno())


async def drain(ob: Outbox) -> list[Record]:
    """Every unconfirmed record, as the uplink would send them."""
    return await ob.next_batch(1_000_000, 0)


def covered(records: list[Record]) -> tuple[dict[int, str], set[int]]:
    """(seq -> text of the scans, seqs named by lost_range records)."""
    texts = {r.seq: r.data["text"] for r in records if r.kind == "barcode"}
    lost: set[int] = set()
    for r in records:
        if r.kind == "lost_range":
            first, last = lost_range(check_record(r.wire()))
            lost |= set(range(first, last + 1))
    return texts, lost


async def test_pages_overwritten_under_a_backlog_rows_salvaged_rest_reported(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(f"T{i:05d}" + "x" * 60)) for i in range(1200)]
        await ob.confirm([r.id for r in recs[:200]])  # these reached the registry
        await ob._run(lambda: ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    pages = db.stat().st_size // PAGE
    assert pages > 30
    damaged = [*list(range(pages * 6 // 10, pages * 7 // 10)), pages - 3]
    overwrite_pages(db, damaged)
    async with Outbox(db) as ob:
        assert ob.recovered_from is not None and ob.recovered_from.exists()  # never deleted
        out = await drain(ob)
        texts, lost = covered(out)
        stats = await ob.stats()
    by_seq = {r.seq: r for r in recs}
    # every unconfirmed seq is either delivered with its own id and text, or reported lost
    # (meta.last_seq was readable: the seqs reserved past it were never used, not lost)
    assert set(texts) | lost == set(range(201, 1201))
    assert not set(texts) & lost
    for r in out:
        if r.kind == "barcode":
            assert r.id == by_seq[r.seq].id and r.data == by_seq[r.seq].data
    assert 0 < len(lost) < 400, "a few damaged pages cost the rows on them, not the backlog"
    assert len(texts) > 600
    assert stats.salvaged == len(texts)
    assert stats.lost_seqs == len(lost)
    assert stats.lost_ranges == sum(1 for r in out if r.kind == "lost_range")
    # the lost_range records come after every seq ever handed out
    assert min(r.seq for r in out if r.kind == "lost_range") == 1201
    cli = read_stats(db)
    assert (cli["lost_seqs"], cli["salvaged"]) == (len(lost), len(texts))
    assert cli["moved_aside"] == [ob.recovered_from.name]


async def test_salvaged_rows_survive_the_next_restart_and_confirm(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(f"S{i}")) for i in range(300)]
    overwrite_pages(db, [3])
    async with Outbox(db) as ob:
        out = await drain(ob)
        assert await ob.confirm([r.id for r in out]) == len(out)
    async with Outbox(db) as ob:
        assert ob.recovered_from is None  # the fresh database is sound
        assert await drain(ob) == []
        assert (await ob.append(scan("next"))).seq == max(r.seq for r in out) + 1
    assert {r.id for r in out if r.kind == "barcode"} <= {r.id for r in recs}


async def test_garbage_file_at_start_seq_and_session_continue(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        for _ in range(3):
            await ob.bump_session()
        recs = [await ob.append(scan(f"G{i}")) for i in range(200)]
        await ob.confirm([r.id for r in recs[:150]])
        await ob.append(scan("last"))  # writes unconfirmed_from = 151 to the side file
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)
    reserved = counters.load(counters.side_path(db)).seq_reserved
    assert 201 <= reserved <= 201 + counters.RESERVE
    db.write_bytes(b"\x00garbage\xff" * 10_000)
    async with Outbox(db) as ob:
        assert ob.recovered_from is not None
        assert ob.recovered_from.read_bytes().startswith(b"\x00garbage")
        assert await ob.bump_session() == 4  # never lowered
        nxt = await ob.append(scan("after"))
        out = await drain(ob)
    _, lost = covered(out)
    # 1..201 were used; the side file reserved up to `reserved`; nothing below its
    # unconfirmed_from (151, written at the clean stop) is reported
    assert lost == set(range(151, reserved + 1))
    assert nxt.seq == reserved + 2  # the lost_range record, then the scan: no seq reused


async def test_missing_database_seq_continues_and_loss_is_reported(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        await ob.bump_session()
        for i in range(10):
            await ob.append(scan(f"M{i}"))
    for suffix in ("", "-wal", "-shm", ".clean"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)
    async with Outbox(db) as ob:
        assert await ob.bump_session() == 2
        out = await drain(ob)
        reserved = 1 + counters.RESERVE  # what the first commit reserved
        assert [(r.kind, r.seq) for r in out] == [("lost_range", reserved + 1)]
        assert (out[0].data["first_seq"], out[0].data["last_seq"]) == (1, reserved)
        assert (await ob.append(scan("x"))).seq == reserved + 2


async def test_side_file_reserves_ahead_of_every_commit(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    side = counters.side_path(db)
    R = counters.RESERVE
    async with Outbox(db) as ob:
        assert counters.load(side) == counters.Counters(0, 0, 0)
        await ob.bump_session()
        r = await ob.append(scan("a"))
        assert counters.load(side) == counters.Counters(1 + R, 1, 1)
        await ob.confirm([r.id])
        for i in range(R):
            last = await ob.append(scan(f"b{i}"))
            assert counters.load(side).seq_reserved >= last.seq  # never behind a used seq
        assert last.seq == 1 + R
        assert counters.load(side) == counters.Counters(1 + R, 1, 1)  # one write for R scans
        last = await ob.append(scan("c"))
        assert counters.load(side) == counters.Counters(last.seq + R, 1, 2)
    assert counters.load(side).unconfirmed_from == 2
    async with Outbox(db) as ob:  # a sound database is the authority: no gap
        assert (await ob.append(scan("d"))).seq == R + 3
    assert oct(side.stat().st_mode & 0o777) == "0o600"
    assert not side.with_name(side.name + ".tmp").exists()


def test_side_file_garbage_or_hostile_is_zeros(tmp_path: Path) -> None:
    side = tmp_path / "outbox.db.counters"
    for junk in (b"", b"{", b"[" * 100_000, b'{"session": -1}', b'{"session": true}', b"\xff"):
        side.write_bytes(junk)
        assert counters.load(side) == counters.Counters()
    side.write_bytes(b'{"seq_reserved": 7, "session": 3}')
    assert counters.load(side) == counters.Counters(7, 3, 0)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_side_file_parser_never_raises(tmp_path: Path, raw: bytes) -> None:
    side = tmp_path / "fuzz.counters"
    side.write_bytes(raw)
    c = counters.load(side)
    assert min(c.seq_reserved, c.session, c.unconfirmed_from) >= 0


def _make_db(path: Path, n: int) -> None:
    async def fill() -> None:
        async with Outbox(path) as ob:
            for i in range(n):
                await ob.append(scan(f"H{i}" + "y" * 100))
            await ob._run(lambda: ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))

    asyncio.run(fill())


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("salvage") / "template.db"
    _make_db(path, 400)
    return path


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32), hits=st.integers(1, 40))
def test_salvage_of_hostile_bytes_never_raises_and_accounts_for_every_seq(
    template: Path, tmp_path: Path, seed: int, hits: int
) -> None:
    """Random byte ranges overwritten anywhere (headers, interior pages, cells): the walk
    never raises, every row it returns is a row that was stored, and every seq from
    `unconfirmed_from` on is either returned or reported lost."""
    rng = random.Random(seed)
    raw = bytearray(template.read_bytes())
    for _ in range(hits):
        at = rng.randrange(len(raw))
        raw[at : at + rng.randrange(1, 600)] = rng.randbytes(rng.randrange(1, 600))
    target = tmp_path / f"broken-{seed}-{hits}.db"
    target.write_bytes(bytes(raw))
    got = salvage(target, known_last_seq=400, unconfirmed_from=1)
    seqs = {r[0] for r in got.rows}
    lost = {s for a, b in got.lost for s in range(a, b + 1)}
    assert not seqs & lost
    assert seqs | lost >= set(range(1, 401))
    for r in got.rows:
        assert 1 <= r[0] <= max(400, got.last_seq)


async def test_periodic_integrity_check_finds_damage_without_stalling_scans(
    tmp_path: Path,
) -> None:
    db = tmp_path / "outbox.db"
    async with Outbox(db, integrity_check_interval_s=0.05) as ob:
        recs = [await ob.append(scan(f"P{i}")) for i in range(300)]
        await ob._run(lambda: ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        pages = db.stat().st_size // PAGE
        overwrite_pages(db, [pages * 6 // 10, pages * 6 // 10 + 1])
        # the writer's page cache still holds the good pages: only the check can tell
        for _ in range(200):
            if ob.recovered_from is not None:
                break
            await ob.append(scan("during"))
            await asyncio.sleep(0.01)
        assert ob.recovered_from is not None
        assert ob.integrity_checks >= 1
        after = await ob.append(scan("after"))
        texts, lost = covered(await drain(ob))
        [alert] = ob.take_alerts()  # for the next telemetry
        assert alert["type"] == "outbox_recovered" and alert["lost_seqs"] == len(lost)
        assert alert["moved_aside"] == str(ob.recovered_from)
        assert ob.take_alerts() == []
    assert after.seq == max(texts) and after.seq > recs[-1].seq
    assert lost, "the overwritten pages held rows"
    assert set(range(1, 301)) <= set(texts) | lost


async def test_find_repeat_is_the_window_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    now = [1000.0]
    async with Outbox(db, clock=lambda: now[0]) as ob:
        await ob.append(scan("ABC"))
        await ob.append(scan("XYZ", device="other"))
    async with Outbox(db, clock=lambda: now[0]) as ob:
        assert await ob.find_repeat("ticket-scanner", "ABC", 2.0)
        assert not await ob.find_repeat("ticket-scanner", "ABD", 2.0)
        assert not await ob.find_repeat("other", "ABC", 2.0)
        now[0] += 2.5
        assert not await ob.find_repeat("ticket-scanner", "ABC", 2.0)


# -- disk full on a real small tmpfs ---------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_up(mnt: Path) -> Path:
    """Take every free block; the returned file gives them back when deleted."""
    ballast = mnt / "ballast"
    with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return ballast


async def test_disk_full_refuses_appends_retries_bookkeeping_and_recovers(small_fs: Path) -> None:
    db = small_fs / "outbox.db"
    async with Outbox(db) as ob:
        stored = [await ob.append(scan(f"D{i}")) for i in range(20)]
        ballast = fill_up(small_fs)
        refused = 0
        for i in range(30):  # WAL pages already allocated may take a few more
            try:
                await ob.append(scan(f"F{i}" + "z" * 3000))
            except OutboxDiskFull:
                refused += 1
        assert refused > 0
        assert ob.disk_full and (await ob.stats()).disk_full
        # bookkeeping waits for space instead of failing
        confirm = asyncio.create_task(ob.confirm([r.id for r in stored]))
        await asyncio.sleep(0.5)
        session = await ob.bump_session()  # from memory, never fails
        ballast.unlink()
        assert await asyncio.wait_for(confirm, 30) == 20
        after = await ob.append(scan("after"))
        assert not ob.disk_full
        assert await ob.bump_session() == session + 1
        texts = {r.data["text"] for r in await drain(ob)}
    # nothing half stored: a refused text is nowhere, seqs gap-free
    assert "after" in texts
    db2 = sqlite3.connect(db)
    seqs = [s for (s,) in db2.execute("SELECT seq FROM records ORDER BY seq")]
    db2.close()
    assert seqs == list(range(1, after.seq + 1))


async def test_root_page_overwritten_rows_read_from_their_leaf_pages(tmp_path: Path) -> None:
    """A damaged root or interior page hides every intact leaf from SQLite's queries;
    the salvage reads the leaves themselves."""
    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(f"L{i:05d}" + "q" * 100)) for i in range(1200)]
        await ob._run(lambda: ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    con = sqlite3.connect(db)
    [(root,)] = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'")
    con.close()
    overwrite_pages(db, [root - 1])  # page numbers start at 1
    async with Outbox(db) as ob:
        out = await drain(ob)
        stats = await ob.stats()
    texts, lost = covered(out)
    by_seq = {r.seq: r for r in recs}
    assert set(texts) | lost == set(range(1, 1201))
    assert len(texts) == 1200, "only an interior page was hit: every row is on a leaf"
    assert all(texts[s] == by_seq[s].data["text"] for s in texts)
    assert all(r.id == by_seq[r.seq].id for r in out if r.kind == "barcode")
    assert stats.salvaged == 1200


def _page(head: bytes, tail: bytes) -> bytes:
    """A 4096-byte table-leaf page: hostile header and cell pointers, hostile cells at the end."""
    return (b"\x0d" + head)[: 4096 - len(tail)].ljust(4096 - len(tail), b"\0") + tail


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pages=st.lists(
        st.builds(_page, st.binary(max_size=300), st.binary(max_size=600)), min_size=1, max_size=3
    )
)
def test_leaf_page_reader_survives_any_bytes(tmp_path: Path, pages: list[bytes]) -> None:
    """Hostile pages with the leaf type byte, so their cells get parsed: the reader
    returns only rows that pass the same checks as the walk's, and never raises."""
    from agent.station.salvage import _leaf_rows, _row_ok

    target = tmp_path / "hostile.db"
    target.write_bytes(b"".join(pages))
    rows = _leaf_rows(target, set(range(0, 1 << 16)))
    assert all(_row_ok(r) for r in rows)


async def test_a_salvage_cut_short_by_a_crash_is_redone_or_finished(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    fresh = tmp_path / "outbox.db.salvage"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(f"C{i}")) for i in range(50)]
    # killed while filling: a partial fresh file beside the damaged one still in place
    fresh.write_bytes(b"partial")
    overwrite_pages(db, [3])
    async with Outbox(db) as ob:
        assert ob.recovered_from is not None
        texts, lost = covered(await drain(ob))
    assert not fresh.exists()
    assert set(texts) | lost == {r.seq for r in recs}
    # killed between the two renames: the damaged file is aside, the fresh one complete
    os.replace(db, fresh)
    for suffix in ("-wal", "-shm", ".clean"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)
    async with Outbox(db) as ob:
        assert ob.recovered_from is None
        again, lost_again = covered(await drain(ob))
    assert (again, lost_again) == (texts, lost)
    assert not fresh.exists()


async def test_damage_found_after_ready_salvages_the_scans_taken_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash the start-up check runs in the background (issue #18): scans are
    taken before it answers, nothing is sent before it, and when it finds damage the
    salvage carries the scans taken meanwhile with the rest."""
    import threading

    from agent.station import outbox as outbox_mod

    db = tmp_path / "outbox.db"
    async with Outbox(db) as ob:
        recs = [await ob.append(scan(f"B{i:04d}" + "y" * 80)) for i in range(800)]
        await ob._run(lambda: ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    (tmp_path / "outbox.db.clean").unlink()  # as after kill -9: no clean-close mark
    # table leaf pages only: what opening reads (meta, indexes) is intact, so only
    # the check can tell
    con = sqlite3.connect(db)
    leaves = [
        p - 1  # dbstat counts pages from 1
        for (p,) in con.execute(
            "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf' ORDER BY pageno"
        )
    ]
    con.close()
    overwrite_pages(db, leaves[len(leaves) // 3 : len(leaves) // 3 + 3])
    gate = threading.Event()
    real = outbox_mod._quick_check
    calls: list[str | None] = []

    def held_check(path: Path) -> str | None:
        gate.wait(10)  # the check answers only once the scans below are stored
        calls.append(real(path))
        return calls[-1]

    monkeypatch.setattr(outbox_mod, "_quick_check", held_check)
    async with Outbox(db) as ob:
        assert ob.recovered_from is None, "opened without reading every page"
        meanwhile = [await ob.append(scan(f"M{i}")) for i in range(20)]
        sending = asyncio.create_task(drain(ob))
        await asyncio.sleep(0.1)
        assert not sending.done(), "nothing is handed out for sending before the check"
        gate.set()
        out = await sending
        assert calls and calls[0] is not None, "the check found the damage"
        assert ob.recovered_from is not None and ob.recovered_from.exists()
        texts, lost = covered(out)
    assert meanwhile[0].seq > recs[-1].seq
    by_seq = {r.seq: r for r in [*recs, *meanwhile]}
    for seq, text in texts.items():
        assert by_seq[seq].data["text"] == text
    assert {m.seq for m in meanwhile} <= set(texts), "every scan taken meanwhile is salvaged"
    assert set(texts) | lost >= set(range(1, meanwhile[-1].seq + 1))
    assert lost and not set(texts) & lost
