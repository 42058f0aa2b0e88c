"""Sealed personal parts in the registry stores (SQLite and PostgreSQL alike): kept apart
from the record body, handed off with an access log, purged; on SQLite the ciphertext is
gone from the file bytes (WAL included) after the purge."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent.central.personal import export_personal, purge_personal
from agent.central.store import Batch, PersonalStore, RecordStore
from agent.central.store_pg import PostgresStore
from agent.central.store_sqlite import SqliteStore
from agent.personal_seal import PersonalSealer, generate_keypair
from tests.support.central import PgCluster, record

SITE, AGENT = "toda-city-hall-1f", "station-03"
PERSONAL = {"name": "試験 花子", "address": "埼玉県戸田市上戸田1-18-1", "my_number": "123456789018"}


class Both(RecordStore, PersonalStore):
    """Both protocols, for the type checker: each backend implements both."""


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Both]:
    if request.param == "sqlite":
        s: Any = SqliteStore(tmp_path / "registry.db")
    else:
        s = PostgresStore(request.getfixturevalue("pg_dsn"))
    await s.open()
    yield cast(Both, s)
    await s.close()


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[PersonalSealer, Path]:
    generate_keypair(tmp_path / "reg.key", tmp_path / "reg.pub")
    return PersonalSealer.from_file(tmp_path / "reg.pub"), tmp_path / "reg.key"


def card_record(seq: int, sealer: PersonalSealer) -> dict[str, Any]:
    r = record(seq)
    r["kind"] = "card_info"
    r["data"] = {"card_type": "mynumber", "personal_sealed": sealer.seal(r["id"], PERSONAL)}
    return r


async def test_kept_apart_from_the_body_and_stored_once(
    store: Both, keypair: tuple[PersonalSealer, Path]
) -> None:
    sealer, _ = keypair
    r = card_record(1, sealer)
    clear = record(2)
    clear["data"]["personal"] = PERSONAL  # a station without registry_public_key
    [a, b] = await store.store([Batch(SITE, AGENT, [r, clear])])
    assert "personal_sealed" not in a.record["data"] and a.record["data"]["card_type"]
    assert "personal" not in b.record["data"]  # never stored in the clear
    await store.store([Batch(SITE, AGENT, [r])])  # a re-send: still one sealed part
    [p] = await store.personal_pending()
    assert (p.record_id, p.site, p.agent) == (r["id"], SITE, AGENT)
    assert p.envelope == r["data"]["personal_sealed"]
    assert p.handed_off_at is None


async def test_hand_off_marks_and_logs_and_purge_removes(
    store: Both, keypair: tuple[PersonalSealer, Path]
) -> None:
    sealer, _ = keypair
    recs = [card_record(i, sealer) for i in (1, 2, 3)]
    await store.store([Batch(SITE, AGENT, recs)])
    await store.mark_handed_off([recs[0]["id"]], "clerk@backoffice", "to out.jsonl")
    pending = sorted(p.record_id for p in await store.personal_pending())
    assert pending == sorted(r["id"] for r in recs[1:])
    assert len(await store.personal_pending(include_handed_off=True)) == 3
    assert await store.purge_personal(3600.0, who="test") == []  # all young
    assert await store.purge_personal(3600.0, who="test", handed_off=True) == [recs[0]["id"]]
    purged = await store.purge_personal(0.0, who="retention")
    assert purged == sorted(r["id"] for r in recs[1:])
    assert await store.personal_pending(include_handed_off=True) == []
    assert await store.count() == 3  # the records themselves stay
    log = await store.personal_access()
    assert [(x.who, x.action, x.record_ids) for x in log] == [
        ("clerk@backoffice", "export", [recs[0]["id"]]),
        ("test", "purge", [recs[0]["id"]]),
        ("retention", "purge", sorted(r["id"] for r in recs[1:])),
    ]
    assert all("花子" not in x.detail for x in log)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_export_personal_opens_writes_0600_and_marks(
    backend: str,
    tmp_path: Path,
    keypair: tuple[PersonalSealer, Path],
    request: pytest.FixtureRequest,
) -> None:
    sealer, key = keypair
    db: str | Path = (
        tmp_path / "registry.db" if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    )
    s: Any = SqliteStore(Path(db)) if backend == "sqlite" else PostgresStore(str(db))
    await s.open()
    good = card_record(1, sealer)
    bad = card_record(2, sealer)
    ct = bytearray(base64.b64decode(bad["data"]["personal_sealed"]["ct"]))
    ct[0] ^= 1
    bad["data"]["personal_sealed"]["ct"] = base64.b64encode(bytes(ct)).decode()
    await s.store([Batch(SITE, AGENT, [good, bad])])
    await s.close()

    out = tmp_path / "handoff.jsonl"
    n, failed = await export_personal(db, key, out, who="clerk@backoffice")
    assert n == 1
    assert failed == [
        f"record {bad['id']}: personal part does not open "
        "(tampered, or sealed for another record or key)"
    ]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    [line] = out.read_text().splitlines()
    assert json.loads(line) == {
        "id": good["id"],
        "site": SITE,
        "agent": AGENT,
        "captured_at": good["captured_at"],
        "personal": PERSONAL,
    }
    with pytest.raises(FileExistsError):  # never overwrites a hand-off file
        await export_personal(db, key, out, who="clerk@backoffice")
    n2, _ = await export_personal(db, key, tmp_path / "second.jsonl", who="clerk@backoffice")
    assert n2 == 0  # the good one is handed off; the bad one still fails
    ids = await purge_personal(db, 0.0, who="clerk@backoffice")
    assert ids == sorted([good["id"], bad["id"]])


def sqlite_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


async def test_sqlite_purge_leaves_no_ciphertext_in_the_file_or_the_wal(
    tmp_path: Path, keypair: tuple[PersonalSealer, Path]
) -> None:
    sealer, _ = keypair
    db = tmp_path / "registry.db"
    s = SqliteStore(db)
    await s.open()
    recs = [card_record(i, sealer) for i in range(1, 21)]
    await s.store([Batch(SITE, AGENT, recs)])
    needles = [r["data"]["personal_sealed"]["ct"].encode() for r in recs]
    needles += [r["data"]["personal_sealed"]["epk"].encode() for r in recs]
    raw = sqlite_bytes(db)
    assert all(n in raw for n in needles)  # the check can see them
    await s.purge_personal(0.0, who="test")
    raw = sqlite_bytes(db)
    assert [n for n in needles if n in raw] == []
    assert (tmp_path / "registry.db-wal").stat().st_size == 0  # truncated
    await s.close()


def test_cli_keygen_export_purge_and_plain_registry_parsing(
    tmp_path: Path, keypair: tuple[PersonalSealer, Path]
) -> None:
    import asyncio

    sealer, _ = keypair
    db = tmp_path / "registry.db"

    async def fill() -> str:
        s = SqliteStore(db)
        await s.open()
        r = card_record(1, sealer)
        await s.store([Batch(SITE, AGENT, [r])])
        await s.close()
        return str(r["id"])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(
            [sys.executable, "-m", "agent", "registry", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )

    done = cli(
        "keygen", "--private", str(tmp_path / "k2.key"), "--public", str(tmp_path / "k2.pub")
    )
    assert done.returncode == 0, done.stderr
    again = cli("keygen", "--private", str(tmp_path / "k2.key"), "--public", str(tmp_path / "x"))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    rid = asyncio.run(fill())
    out = tmp_path / "out.jsonl"
    done = cli(
        "export-personal",
        "--db",
        str(db),
        "--key",
        str(tmp_path / "reg.key"),
        "--out",
        str(out),
        "--who",
        "clerk",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["personal"] == PERSONAL
    assert PERSONAL["name"] not in done.stderr + done.stdout
    done = cli("purge-personal", "--db", str(db), "--older-than-hours", "0")
    assert done.returncode == 0, done.stderr
    assert "1 record(s)" in done.stderr
    # the plain `madoguchi registry` still wants --db, and says so
    done = cli("--port", "1")
    assert done.returncode == 2 and "--db" in done.stderr
    help_text = cli("--help").stdout
    assert "export-personal" in help_text and "--personal-retention-hours" in help_text
    assert rid


def test_pg_cluster_fixture_is_the_shared_one(pg_cluster: PgCluster) -> None:
    """The PostgreSQL parametrisations above use the session cluster of tests/conftest.py."""
    assert pg_cluster.dsn().startswith("postgresql://")


async def test_a_full_disk_leaves_no_half_file_and_nothing_marked(
    tmp_path: Path, keypair: tuple[PersonalSealer, Path]
) -> None:
    """ENOSPC on the hand-off file: no file left, no record marked, no access logged."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    sealer, key = keypair
    db = tmp_path / "registry.db"
    s = SqliteStore(db)
    await s.open()
    await s.store([Batch(SITE, AGENT, [card_record(i, sealer) for i in range(1, 101)])])
    await s.close()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(OSError) as err:
            await export_personal(db, key, small / "out.jsonl", who="clerk")
        assert err.value.errno == 28  # ENOSPC
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    s = SqliteStore(db)
    await s.open()
    assert len(await s.personal_pending()) == 100
    assert await s.personal_access() == []
    await s.close()
    n, failed = await export_personal(db, key, tmp_path / "out.jsonl", who="clerk")
    assert (n, failed) == (100, [])
