"""The personal-data grep (issue #16, point 7): a My Number card read with its PIN on a
station with `store_card_info` and `read_my_number`, through a real mosquitto, into the
reference registry (SQLite and PostgreSQL), watched by the dashboard.

The card's name, address, birth date, My Number and PIN are then searched in every
payload the broker carried (a `#` subscriber), the registry database's bytes (SQLite
file + WAL + shm; PostgreSQL's whole data directory), the agent's and the registry's
logs, the registry console lines, mosquitto's log and the dashboard API. They are found
nowhere but in the `madoguchi registry export-personal` output; after the retention the
sealed part is gone from the database too (its ciphertext from the SQLite bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.central.dashboard import Dashboard
from agent.central.registry import describe_record
from agent.central.store import Stored
from agent.config import load_config
from agent.personal_seal import generate_keypair
from agent.station.app import StationApp
from agent.station.sealing import Sealer
from agent.testing import Broker, free_port, running_registry, write_config
from tests.support.central import DESK_TOKEN, PgCluster, desk_guard, running_dashboard
from tests.support.pcsc import (
    TEST_ADDRESS,
    TEST_BIRTH,
    TEST_MY_NUMBER,
    TEST_NAME,
    TEST_PIN,
    MyNumberCard,
    pcsc_stack,
)
from tests.support.secrets import pin_in as pin_token_in

pytestmark = [pytest.mark.broker, pytest.mark.pcscd, pytest.mark.usefixtures("contract_spy")]

BIRTH_ISO = f"{TEST_BIRTH[:4]}-{TEST_BIRTH[4:6]}-{TEST_BIRTH[6:]}"
SECRETS = {
    "name": TEST_NAME,
    "address": TEST_ADDRESS,
    "birth date": BIRTH_ISO,
    "birth date (card form)": TEST_BIRTH,
    "My Number": TEST_MY_NUMBER,
}
ROOT = Path(__file__).resolve().parents[2]


def forms(s: str) -> list[bytes]:
    """A secret as UTF-8, as JSON with \\u escapes, as UTF-16: however it might be written."""
    return list(
        {s.encode(), json.dumps(s)[1:-1].encode(), s.encode("utf-16-le"), s.encode("utf-16-be")}
    )


def pin_in(text: bytes) -> bool:
    """The 4-digit PIN as a value of its own (not inside a longer number or base64)."""
    return pin_token_in(TEST_PIN, text)


def leaks(where: str, blob: bytes) -> list[str]:
    found = [f"{name} in {where}" for name, s in SECRETS.items() for f in forms(s) if f in blob]
    if pin_in(blob):
        found.append(f"PIN in {where}")
    return sorted(set(found))


def http_get(url: str) -> bytes:
    """As the desk's browser does: with the desk's token."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {DESK_TOKEN}"})
    with urllib.request.urlopen(req, timeout=20) as res:
        body: bytes = res.read()
        return body


async def sniff(port: int, into: list[tuple[str, bytes]], ready: asyncio.Event) -> None:
    """Every message on every topic, retained ones included."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="test-sniffer") as client:
        await client.subscribe("#", qos=1)
        ready.set()
        async for m in client.messages:
            raw = (
                m.payload if isinstance(m.payload, (bytes, bytearray)) else str(m.payload).encode()
            )
            into.append((m.topic.value, bytes(raw)))


@contextlib.asynccontextmanager
async def sniffing(port: int) -> AsyncIterator[list[tuple[str, bytes]]]:
    seen: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    task = asyncio.create_task(sniff(port, seen, ready), name="test-sniffer")
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def db_bytes(db: str | Path, pg: PgCluster | None) -> bytes:
    if pg is None:
        path = Path(db)
        return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))
    import psycopg

    with psycopg.connect(str(db), autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # everything written to the table files, not only WAL
    out = []
    for p in pg.data.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError):
                out.append(p.read_bytes())
    return b"".join(out)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "agent", "registry", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_personal_data_is_found_only_in_the_hand_off(
    backend: str,
    broker: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.DEBUG)
    pg: PgCluster | None = None
    db: str | Path = tmp_path / "registry.db"
    if backend == "postgresql":
        db = request.getfixturevalue("pg_dsn")
        pg = request.getfixturevalue("pg_cluster")
    outbox_key = tmp_path / "outbox.key"
    Sealer.create_key_file(outbox_key)
    generate_keypair(tmp_path / "registry.key", tmp_path / "registry.pub")
    console: list[str] = []

    def printed(s: Stored) -> None:  # what `madoguchi registry` prints per record
        console.append(f"stored {s.site}/{s.agent} {describe_record(s.record)}")

    with pcsc_stack(tmp_path / "pcsc") as st:
        cfg = load_config(
            write_config(
                tmp_path,
                broker.port,
                outbox=f'key_file = "{outbox_key}"\n'
                f'registry_public_key = "{tmp_path / "registry.pub"}"',
                devices=f"""
[[devices]]
name = "card-reader"
profile = "generic-pcsc-reader"
reader = "{st.reader}"
read_my_number = true
store_card_info = true
""",
            )
        )
        dash = Dashboard(
            "127.0.0.1",
            broker.port,
            db=db,
            http_port=free_port(),
            db_poll_s=0.2,
            guard=desk_guard(),
        )
        async with (
            sniffing(broker.port) as traffic,
            running_registry(
                broker.port, db, on_stored=printed, personal_retention_hours=None
            ) as registry,  # type: ignore[arg-type]
            running_dashboard(dash),
        ):
            station = StationApp(cfg)
            events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
            station.subscribe(lambda kind, body: events.put_nowait((kind, body)))

            async def event(name: str, /, **match: object) -> None:
                while True:
                    k, body = await asyncio.wait_for(events.get(), 20)
                    if k == name and all(body.get(x) == v for x, v in match.items()):
                        return

            stop = asyncio.Event()
            task = asyncio.create_task(station.run(stop), name="test-station")
            try:
                await event("device_state", state="connected")
                st.slot.insert(MyNumberCard(), wait=True)
                await event("read_accepted", kind="card")
                info = await station.read_card_info("card-reader", TEST_PIN)
                assert info.my_number == TEST_MY_NUMBER  # the profile asked for it
                stored = await registry.wait_for(2, timeout=20)
                assert sorted(r["kind"] for r in stored) == ["card", "card_info"]
                while (await station.outbox.stats()).unconfirmed:  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)  # acked: the outbox wiped its copy
                base = f"http://127.0.0.1:{dash.http_port}"
                api = await asyncio.to_thread(http_get, f"{base}/api/fleet")
                api += await asyncio.to_thread(http_get, f"{base}/")
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)

    [card_info] = [r for r in stored if r["kind"] == "card_info"]
    rid = card_info["id"]
    sealed = [json.loads(p) for t, p in traffic if t.endswith("/records")]
    envelopes = [
        r["data"]["personal_sealed"] for body in sealed for r in body["records"] if r["id"] == rid
    ]
    assert envelopes, "the card_info record crossed the broker"
    assert all(e == envelopes[0] for e in envelopes)  # re-sends carry the same ciphertext

    raw = db_bytes(db, pg)
    assert envelopes[0]["ct"].encode() in raw  # the search sees what the database holds
    logs = (
        "\n".join(
            f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
        ).encode()
        + caplog.text.encode()
    )
    assert b"card-reader" in logs and b"registry" in logs  # both sides' logging was captured
    found = leaks("broker traffic", b"\n".join(p for _, p in traffic))
    found += leaks("the registry database", raw)
    found += leaks("logs", logs)
    found += leaks("registry console", "\n".join(console).encode())
    found += leaks("mosquitto's log", broker.log.read_bytes() if broker.log.exists() else b"")
    found += leaks("dashboard API", api)
    assert found == []

    # the hand-off: the back office's private key opens it, into a new 0600 file
    out = tmp_path / "handoff.jsonl"
    done = cli(
        "export-personal",
        "--db",
        str(db),
        "--key",
        str(tmp_path / "registry.key"),
        "--out",
        str(out),
        "--who",
        "clerk@backoffice",
    )
    assert done.returncode == 0, done.stderr
    assert leaks("export-personal's own output", (done.stdout + done.stderr).encode()) == []
    handed = out.read_bytes()
    assert set(leaks("hand-off", handed)) == {
        f"{name} in hand-off" for name in ("name", "address", "birth date", "My Number")
    }  # everything read, never the PIN (the card form of the birth date is not kept)
    [row] = [json.loads(line) for line in handed.splitlines()]
    assert row["id"] == rid and row["personal"]["my_number"] == TEST_MY_NUMBER
    assert out.stat().st_mode & 0o777 == 0o600

    # the retention: a registry purges the sealed part; the ciphertext leaves the bytes
    async with running_registry(broker.port, db, personal_retention_hours=1e-6) as again:
        while again.registry.personal_purged == 0:
            await asyncio.sleep(0.05)
    raw = db_bytes(db, pg)
    if pg is None:
        assert envelopes[0]["ct"].encode() not in raw
        assert envelopes[0]["epk"].encode() not in raw
    else:  # PostgreSQL: the row is gone (VACUUM reclaims it; docs/central.md says what stays)
        assert pg.query(str(db), "SELECT count(*) FROM personal_sealed") == [(0,)]
    assert leaks("the registry database after purge", raw) == []
    access = (
        pg.query(str(db), "SELECT who, action, record_ids::text FROM personal_access ORDER BY at")
        if pg is not None
        else _sqlite_rows(Path(db), "SELECT who, action, record_ids FROM personal_access")
    )
    assert [(w, a, json.loads(i)) for w, a, i in access] == [
        ("clerk@backoffice", "export", [rid]),
        ("registry retention", "purge", [rid]),
    ]


def _sqlite_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as c:
        return c.execute(sql).fetchall()
