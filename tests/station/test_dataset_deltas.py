"""Deltas of `used_tickets` (issue #20): a delta names the version it applies to (signed);
a station applies a chain of them in order whatever order they come in, each all or
nothing, ignores the ones a full version absorbed, and refuses a tampered or unsigned
one while the version held keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import public_hex, signed_messages
from agent.contract.datasets import parse_manifest, parse_topic
from agent.contract.messages import MessageError
from agent.station.datasets import DatasetReceiver, DatasetStore

P = "madoguchi/v1"
KEY = Ed25519PrivateKey.generate()


def ticket(n: int) -> dict[str, Any]:
    return {
        "municipality_code": "112241",
        "ticket_number": f"{n:010d}",
        "dose": "1",
        "site": "goka-hall",
        "agent": "station-01",
        "at": "2026-12-02T01:02:03.000Z",
    }


def receiver(tmp: Path) -> DatasetReceiver:
    store = DatasetStore(tmp / "datasets.db")
    store.open()
    r = DatasetReceiver(store, bytes.fromhex(public_hex(KEY)), P, max_age_s=3600)
    r.load()
    return r


def delta(version: int, base: int, rows: list[dict[str, Any]], key: Any = KEY) -> list[Any]:
    return signed_messages(key, P, "used_tickets", version, rows, base=base)


async def feed(r: DatasetReceiver, messages: list[tuple[str, bytes]]) -> None:
    for topic, payload in messages:
        assert await r.handle(topic, payload)


def used(r: DatasetReceiver, n: int) -> bool:
    return r.store.used_ticket("112241", f"{n:010d}", "1") is not None


def test_a_delta_manifest_is_signed_with_its_base_on_its_own_topic() -> None:
    *chunks, (topic, manifest) = delta(12, 10, [ticket(1)])
    assert topic == f"{P}/_datasets/fleet/used_tickets/delta/12"
    t = parse_topic(P, topic)
    assert t is not None and (t.delta, t.version, t.index) == (True, 12, None)
    m = parse_manifest(manifest)
    assert (m.base, m.version) == (10, 12) and b'"base":10' in m.signed
    assert all(parse_topic(P, c) is not None for c, _ in chunks)
    with pytest.raises(MessageError, match="base"):
        parse_manifest(manifest.replace(b'"base": 10', b'"base": 12'))


async def test_a_chain_of_deltas_applies_in_order_whatever_order_it_comes_in(
    tmp_path: Path,
) -> None:
    r = receiver(tmp_path)
    await feed(r, signed_messages(KEY, P, "used_tickets", 10, [ticket(0)]))
    d11, d12, d13 = (
        delta(11, 10, [ticket(1)]),
        delta(12, 11, [ticket(2)]),
        delta(13, 12, [ticket(3), ticket(1)]),
    )
    # after a reconnect the retained deltas come in any order: the newest first here
    await feed(r, d13)
    await feed(r, d12[-1:])  # d12's manifest before its chunks
    assert r.held["used_tickets"].version == 10 and not used(r, 3)
    await feed(r, d11)  # chains 11, then 12 has its manifest but not its chunks yet
    assert r.held["used_tickets"].version == 11 and used(r, 1) and not used(r, 2)
    await feed(r, d12[:-1])  # d12's chunks: 12 and then 13 apply
    held = r.held["used_tickets"]
    assert (held.version, held.rows) == (13, 4)  # ticket 1 twice counts once
    assert all(used(r, n) for n in range(4))
    assert r.verdict(
        {"type": "vaccination_ticket", "valid": True,
         "fields": {"municipality_code": "112241", "ticket_number": "0000000003",
                    "round_code": "1"}}
    )["verdict"] == "already_used"  # fmt: skip
    # a delta seen again after it was applied (retained at reconnect): ignored silently
    await feed(r, d12)
    assert not r.refused and r.held["used_tickets"].version == 13
    # a full version compacts the chain; an old delta arriving late changes nothing
    await feed(r, signed_messages(KEY, P, "used_tickets", 20, [ticket(n) for n in range(5)]))
    await feed(r, d13)
    assert (r.held["used_tickets"].version, r.held["used_tickets"].rows) == (20, 5)
    assert not r.refused


async def test_a_bad_delta_is_refused_and_the_held_version_keeps_serving(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    await feed(r, signed_messages(KEY, P, "used_tickets", 10, [ticket(0)]))
    other = delta(11, 10, [ticket(1)], key=Ed25519PrivateKey.generate())
    await feed(r, other)
    assert "signature" in r.refused["used_tickets"]["reason"] and not used(r, 1)
    good = delta(12, 10, [ticket(2), ticket(3)])
    chunk_topic, body = good[0]
    tampered = body.replace(b"0000000003", b"0000000004")
    await feed(r, [(chunk_topic, tampered), good[-1]])
    assert "sha256" in r.refused["used_tickets"]["reason"]
    assert r.held["used_tickets"].version == 10 and not used(r, 2)  # all or nothing
    # a full manifest on a delta topic, a delta on the full topic: refused
    full = signed_messages(KEY, P, "used_tickets", 14, [])
    await feed(r, [(f"{P}/_datasets/fleet/used_tickets/delta/14", full[-1][1])])
    assert "delta topic without a delta manifest" in r.refused["used_tickets"]["reason"]
    d15 = delta(15, 10, [ticket(5)])
    await feed(r, [*d15[:-1], (f"{P}/_datasets/fleet/used_tickets/manifest", d15[-1][1])])
    assert "on the full version's topic" in r.refused["used_tickets"]["reason"]
    assert r.held["used_tickets"].version == 10 and used(r, 0) and not used(r, 5)
    # the next good delta on v10 still applies
    await feed(r, delta(16, 10, [ticket(6)]))
    assert r.held["used_tickets"].version == 16 and used(r, 6)


async def test_a_delta_with_a_bad_row_changes_nothing(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    await feed(r, signed_messages(KEY, P, "used_tickets", 10, [ticket(0)]))
    rows = [ticket(1), {**ticket(2), "dose": "xx"}]
    await feed(r, delta(11, 10, rows))  # signed as it is: the station checks every row
    assert "dose" in r.refused["used_tickets"]["reason"]
    assert r.held["used_tickets"].version == 10 and not used(r, 1)  # the good row neither
