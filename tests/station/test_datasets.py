"""The station's dataset store and verdicts (agent/station/datasets.py), fed the messages
the central side builds (agent/central/datasets.py): apply, survive a restart, refuse
tampered / wrong-key / older / expired versions while the held one keeps serving."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import public_hex, signed_messages
from agent.interpret import interpret
from agent.station.datasets import DatasetReceiver, DatasetStore

P = "madoguchi/v1"
KEY = Ed25519PrivateKey.generate()
TICKET = "111122410000012345"  # dose 1, municipality 112241, ticket 0000012345
USED = {
    "municipality_code": "112241",
    "ticket_number": "0000012345",
    "dose": "1",
    "site": "goka-hall",
    "agent": "station-01",
    "at": "2026-12-02T01:02:03.000Z",
}
LOT = {"gtin": "04912345123459", "lot": "AB", "reason": "contamination (MHLW recall 2026-12)"}
GS1 = "01049123451234591725123110AB"


def receiver(
    tmp: Path, *, key: Ed25519PrivateKey = KEY, max_age_s: float = 3600, site: str | None = None
) -> DatasetReceiver:
    store = DatasetStore(tmp / "datasets.db")
    store.open()
    r = DatasetReceiver(store, bytes.fromhex(public_hex(key)), P, max_age_s=max_age_s, site=site)
    r.load()
    return r


async def feed(r: DatasetReceiver, messages: list[tuple[str, bytes]]) -> None:
    for topic, payload in messages:
        assert await r.handle(topic, payload)


def msgs(kind: str, version: int, rows: list[dict[str, Any]], **kw: Any) -> list[tuple[str, bytes]]:
    return signed_messages(KEY, P, kind, version, rows, **kw)


async def test_a_used_ticket_and_a_recalled_lot_decide_the_verdict(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    assert r.verdict(interpret(TICKET)) is None  # nothing held: no verdict, not "not used"
    await feed(r, msgs("used_tickets", 5, [USED]))
    await feed(r, msgs("recalled_lots", 9, [LOT], chunk_bytes=16))  # many chunks
    v = r.verdict(interpret(TICKET))
    assert v == {
        "verdict": "already_used",
        "site": "goka-hall",
        "agent": "station-01",
        "at": USED["at"],
        "dataset": "used_tickets",
        "version": 5,
        "stale": False,
    }
    other = r.verdict(interpret("111122410000012346"))
    assert other is not None and other["verdict"] == "not_used"
    number_only = r.verdict(interpret("A0000012345B"))
    assert number_only is not None and number_only["verdict"] == "already_used"
    lot = r.verdict(interpret(GS1, symbology="]C1"))
    assert lot is not None
    assert (lot["verdict"], lot["reason"], lot["version"]) == ("recalled", LOT["reason"], 9)
    assert r.describe()["held"]["recalled_lots"]["rows"] == 1


async def test_chunks_before_their_manifest_are_kept(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    m = msgs("recalled_lots", 3, [LOT], chunk_bytes=10)
    await feed(r, [*m[:-1][::-1], m[-1]])  # reversed chunks, manifest last
    assert r.held["recalled_lots"].version == 3


async def test_a_version_survives_a_restart_and_serves_offline(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    await feed(r, msgs("used_tickets", 2, [USED]))
    r.store.close()
    again = receiver(tmp_path)  # no broker, no messages: what is on disk decides
    v = again.verdict(interpret(TICKET))
    assert v is not None and (v["verdict"], v["version"]) == ("already_used", 2)


@pytest.mark.parametrize("fault", ["tampered", "wrong_key", "older", "same_newer_body", "expired"])
async def test_bad_versions_are_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = receiver(tmp_path)
    await feed(r, msgs("used_tickets", 10, [USED]))
    empty: list[dict[str, Any]] = []
    if fault == "tampered":
        bad = msgs("used_tickets", 11, [{**USED, "site": "goka-hall"}])
        bad[0] = (bad[0][0], bad[0][1].replace(b"goka", b"goke"))  # one byte, same size
    elif fault == "wrong_key":
        bad = signed_messages(Ed25519PrivateKey.generate(), P, "used_tickets", 11, empty)
    elif fault == "older":
        bad = msgs("used_tickets", 9, empty)
    elif fault == "same_newer_body":  # a manifest edited to claim a higher version
        bad = msgs("used_tickets", 11, empty)
        m = json.loads(bad[-1][1])
        m["version"] = 12
        bad[-1] = (bad[-1][0].replace("/11/", "/12/"), json.dumps(m).encode())
    else:
        bad = msgs("used_tickets", 11, empty, expires_at="2020-01-01T00:00:00Z")
    with caplog.at_level(logging.WARNING, "agent.station.datasets"):
        await feed(r, bad)
    assert r.held["used_tickets"].version == 10
    refused = r.describe()["refused"]["used_tickets"]
    reason = {
        "tampered": "sha256",
        "wrong_key": "signature",
        "older": "not newer",
        "same_newer_body": "signature",
        "expired": "expired",
    }[fault]
    assert reason in refused["reason"]
    lines = [rec for rec in caplog.records if "refused" in rec.getMessage()]
    assert len(lines) == 1 and "keeping v10" in lines[0].getMessage()
    assert USED["ticket_number"] not in caplog.text
    v = r.verdict(interpret(TICKET))
    assert v is not None and v["verdict"] == "already_used"


async def test_a_held_version_past_its_age_is_stale_but_still_decides(tmp_path: Path) -> None:
    r = receiver(tmp_path, max_age_s=60)
    await feed(r, msgs("used_tickets", 4, [USED]))
    v = r.verdict(interpret(TICKET), now=time.time() + 120)
    assert v is not None and v["verdict"] == "already_used" and v["stale"] is True
    assert r.describe(now=time.time() + 120)["held"]["used_tickets"]["stale"] is True


async def test_hostile_bytes_on_dataset_topics_never_raise(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    for topic in (
        f"{P}/_datasets/fleet/used_tickets/manifest",
        f"{P}/_datasets/fleet/used_tickets/5/0",
    ):
        for payload in (b"\xff\xfe", b"{}", b"[1,2]", b"null", b"x" * 10_000):
            assert await r.handle(topic, payload)
    assert not r.held
    assert not await r.handle(f"{P}/site/agent/ack", b"{}")


_KILL_CHILD = """
import asyncio, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from agent.central.datasets import public_hex, signed_messages
from agent.station.datasets import DatasetReceiver, DatasetStore
key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sys.argv[2]))
store = DatasetStore(Path(sys.argv[1]) / "datasets.db"); store.open()
r = DatasetReceiver(store, bytes.fromhex(public_hex(key)), "madoguchi/v1", max_age_s=3600)
r.load()
rows = [{"municipality_code": "112241", "ticket_number": f"{i:010d}", "dose": "2",
         "site": "s", "agent": "a", "at": "2026-12-02T00:00:00Z"} for i in range(300_000)]
async def main():
    for t, p in signed_messages(key, "madoguchi/v1", "used_tickets", 99, rows):
        await r.handle(t, p)
print("applied", flush=True)
asyncio.run(main())
"""


async def test_kill_9_while_a_big_version_is_applied_leaves_the_old_one(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    r = receiver(tmp_path)
    await feed(r, msgs("used_tickets", 10, [USED]))
    r.store.close()
    raw = KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(tmp_path), raw.hex()],
        stdout=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=Path(__file__).resolve().parents[2],
    )
    wal = tmp_path / "datasets.db-wal"
    deadline = time.monotonic() + 60
    start = wal.stat().st_size if wal.exists() else 0
    while time.monotonic() < deadline and child.poll() is None:  # the apply has begun writing
        if wal.exists() and wal.stat().st_size > start + 1_000_000:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the child finished before it could be killed"
    child.kill()
    child.wait()
    again = receiver(tmp_path)
    assert again.held["used_tickets"].version == 10
    v = again.verdict(interpret(TICKET))
    assert v is not None and v["verdict"] == "already_used"
    count = again.store.db.execute("SELECT count(*) FROM used_tickets").fetchone()[0]
    assert count == 1


@pytest.mark.parametrize("full", ["spool", "database"])
async def test_a_full_disk_refuses_the_new_version_and_keeps_the_old(
    tmp_path: Path, full: str, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        r = receiver(small)
        if full == "database":  # the chunks fit elsewhere, the SQLite file does not
            r.spool = tmp_path / "spool"
        await feed(r, msgs("used_tickets", 1, [USED]))
        big = [{**USED, "ticket_number": f"{i:010d}"} for i in range(40_000)]  # ~4 MB of rows
        with caplog.at_level(logging.WARNING, "agent.station.datasets"):
            await feed(r, msgs("used_tickets", 2, big))
        assert len(caplog.records) == 1, [rec.getMessage() for rec in caplog.records]
        reason = r.refused["used_tickets"]["reason"]
        assert ("not stored" if full == "database" else "chunk not kept") in reason
        assert not list(r.spool.rglob("*/*/*")), "the refused version's chunks are left"
        assert r.held["used_tickets"].version == 1
        v = r.verdict(interpret(TICKET))
        assert v is not None and (v["verdict"], v["version"]) == ("already_used", 1)
        r.store.close()
        again = receiver(small)  # and the file is still good after the failed write
        assert again.held["used_tickets"].version == 1
        again.store.close()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_an_unknown_kind_is_ignored_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = receiver(tmp_path)
    m = msgs("recalled_lots", 3, [LOT])
    renamed = [(t.replace("/recalled_lots/", "/queue_tickets/"), p) for t, p in m]
    with caplog.at_level(logging.WARNING, "agent.station.datasets"):
        await feed(r, renamed)
        await feed(r, renamed)
    assert not r.held and not r.refused
    assert [rec.getMessage() for rec in caplog.records] == [
        "dataset queue_tickets ignored: not a kind this station knows"
    ]


def test_the_kiosk_shows_what_the_city_knows_first() -> None:
    from agent.station.kiosk.events import event_body

    fact = {"verdict": "already_used", "dataset": "used_tickets", "version": 5, "stale": True}
    body = event_body("read_accepted", {"interpretation": interpret(TICKET), "verdict": fact})
    assert (body["verdict"], body["reference"]) == ("already_used", fact)
    clear = {**fact, "verdict": "not_used"}
    body = event_body("read_accepted", {"interpretation": interpret(TICKET), "verdict": clear})
    assert (body["verdict"], body["reference"]) == ("ok", clear)
    lot = {"verdict": "recalled", "reason": "r", "dataset": "recalled_lots", "version": 1}
    expired = interpret("01049123451234591720010110AB", symbology="]C1")
    assert event_body("read_accepted", {"interpretation": expired, "verdict": lot})["verdict"] == (
        "recalled"
    )


async def test_a_damaged_datasets_file_is_moved_aside_and_the_station_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = receiver(tmp_path)
    await feed(r, msgs("used_tickets", 3, [USED]))
    r.store.close()
    db = tmp_path / "datasets.db"
    raw = bytearray(db.read_bytes())
    raw[100:4096] = os.urandom(3996)  # the header's tail and the first page: garbage
    db.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, "agent.station.datasets"):
        again = receiver(tmp_path)
    assert not again.held
    assert any("damaged" in rec.getMessage() for rec in caplog.records)
    assert list(tmp_path.glob("datasets.db.damaged-*"))
    await feed(again, msgs("used_tickets", 4, [USED]))  # and the next version applies
    assert again.held["used_tickets"].version == 4


# -- reservations, staff, site scope (issue #20, second slice) ---------------------------

SLOT = {
    "id": "R-2026-000123",
    "id_type": "qr",
    "slot_start": "2026-12-02T01:30:00Z",
    "slot_end": "2026-12-02T01:45:00Z",
    "purpose": "vaccination dose 1",
}
TICKET_SLOT = {**SLOT, "id": "0000012345", "id_type": "ticket_number", "purpose": "dose 2"}


def at(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


async def test_a_reservation_is_reserved_on_time_early_or_late_else_none(tmp_path: Path) -> None:
    r = receiver(tmp_path, max_age_s=10**9)
    qr = {"text": SLOT["id"], "interpretation": {"type": "text", "fields": {}}}
    assert r.reservation(qr) is None  # nothing held: no verdict
    await feed(r, msgs("reservations", 4, [SLOT, TICKET_SLOT]))
    v = r.reservation(qr, now=at("2026-12-02T01:35:00Z"))
    assert v == {
        "verdict": "reserved",
        "slot_start": SLOT["slot_start"],
        "slot_end": SLOT["slot_end"],
        "purpose": SLOT["purpose"],
        "timing": "on_time",
        "dataset": "reservations",
        "version": 4,
        "stale": False,
    }
    early = r.reservation(qr, now=at("2026-12-02T01:00:00Z"))
    late = r.reservation(qr, now=at("2026-12-02T02:00:00Z"))
    assert early is not None and early["timing"] == "early"
    assert late is not None and late["timing"] == "late"
    ticket = r.reservation({"text": TICKET, "interpretation": interpret(TICKET)})
    assert ticket is not None and (ticket["verdict"], ticket["purpose"]) == ("reserved", "dose 2")
    card = {"uid": "aa", "auth_cert": {"serial": "0000012345"}}
    assert (r.reservation(card) or {}).get("verdict") == "reserved"
    unknown = r.reservation({"text": "R-2026-999999"})
    assert unknown is not None and unknown["verdict"] == "no_reservation"
    goods = {"text": GS1, "interpretation": interpret(GS1, symbology="]C1")}
    assert r.reservation(goods) is None  # a vaccine box is nobody's reservation


async def test_staff_maps_badges_case_blind_and_the_hand_map_is_the_fallback(
    tmp_path: Path,
) -> None:
    from agent.station.operators import OperatorSessions

    r = receiver(tmp_path)
    assert r.staff("01010601cb095703") is None
    await feed(r, msgs("staff", 2, [{"uid": "01010601CB095703", "operator": "staff-014"}]))
    assert r.staff("01010601cb095703") == "staff-014"
    sessions = OperatorSessions({"aa": "staff-002", "01010601cb095703": "old-id"}, 60)
    assert sessions.tap("01010601CB095703", 0, r.staff) == ("start", "staff-014")
    assert sessions.tap("AA", 1, r.staff) == ("start", "staff-002")  # not in the dataset
    assert sessions.tap("bb", 2, r.staff) is None


async def test_a_site_dataset_applies_only_at_its_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = receiver(tmp_path / "a", site="toda-1f")
    b = receiver(tmp_path / "b", site="goka-2f")
    for_a = msgs("reservations", 6, [SLOT], site="toda-1f")
    assert all("/_datasets/site/toda-1f/reservations/" in t for t, _ in for_a)
    await feed(a, for_a)
    await feed(b, for_a)  # a wide subscription: ignored by topic
    assert a.held["reservations"].version == 6 and "reservations" not in b.held
    # the same signed manifest replayed on site B's topics: refused by its signed site
    replay = [(t.replace("/site/toda-1f/", "/site/goka-2f/"), p) for t, p in for_a]
    with caplog.at_level(logging.WARNING, "agent.station.datasets"):
        await feed(b, replay)
    assert "reservations" not in b.held
    assert "is for site 'toda-1f'" in b.refused["reservations"]["reason"]
