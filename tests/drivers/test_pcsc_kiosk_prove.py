"""`POST /v1/cards/{reader}/prove` through the real PC/SC driver on vpcd's emulated cards.

A running station (real outbox, real mosquitto) whose `PcscDriver` has the test
anchor pinned and `prove_possession = true`: the genuine card is proven, a
forged one never sees the PIN, a card with 1 try left is refused without VERIFY,
a chip without the certificate's key fails, and the proof is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.drivers import jpki
from agent.station.kiosk.events import event_body
from agent.testing import Broker, Pty
from tests.support.kiosk import kiosk_config, running_kiosk
from tests.support.pcsc import (
    TEST_AUTH_PIN,
    MyNumberCard,
    PcscStack,
    UnknownIsoCard,
    anchor_fingerprint,
    pcsc_stack,
)
from tests.support.secrets import pin_in

pytestmark = [pytest.mark.pcscd, pytest.mark.broker]

READER = "counter-reader"
URL = f"/v1/cards/{READER}/prove"
VERIFY = bytes.fromhex("00200080")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path / "pcsc") as st:
        yield st


def config(tmp_path: Path, broker: Broker, pty: Pty, stack: PcscStack, prove: bool = True) -> Path:
    path, _ = kiosk_config(
        tmp_path,
        broker.port,
        pty.link,
        card_reader=False,
        extra_devices=f"""
[[devices]]
name = "{READER}"
profile = "generic-pcsc-reader"
reader = "{stack.reader}"
jpki_anchors = ["{anchor_fingerprint()}"]
prove_possession = {"true" if prove else "false"}
""",
    )
    return path


def pins_sent(card: MyNumberCard) -> list[bytes]:
    return [a for a in card.seen if a[:4] == VERIFY and len(a) > 4]


async def test_genuine_card_is_proven_and_the_proof_is_stored(
    broker: Broker,
    pty_port: Pty,
    stack: PcscStack,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    card = MyNumberCard(key="p384")
    stack.slot.insert(card, wait=True)
    path = config(tmp_path, broker, pty_port, stack)
    db = load_config(path).outbox_path
    async with running_kiosk(path) as k, k.client() as c:
        stored_kinds: asyncio.Queue[object] = asyncio.Queue()
        k.station.subscribe(
            lambda kind, body: (
                stored_kinds.put_nowait(body["kind"]) if kind == "read_accepted" else None
            )
        )
        r = await c.post(URL, headers=k.auth(), json={"pin": TEST_AUTH_PIN})
        assert r.status_code == 200, r.text
        body = r.json()
        synced = jpki.kernel_clock_synced() is True
        assert body["verdict"] == ("genuine" if synced else "clock_unsynced")
        assert (body["possession"], body["chain"]) == (
            "proven",
            "valid" if synced else "clock_unsynced",
        )
        assert body["generation"] == jpki.GEN_P384 and body["revocation"] == "not_checked"
        assert "signature" not in body and not pin_in(TEST_AUTH_PIN, r.text)
        while await asyncio.wait_for(stored_kinds.get(), 15) != "card_auth":
            pass  # the insertion's `card` record comes first; wait for the proof's commit
    assert len(pins_sent(card)) == 1
    stored = b"".join(f.read_bytes() for f in db.parent.iterdir() if f.is_file())
    assert b"card_auth" in stored and card.cert.hex().encode() in stored
    assert not pin_in(TEST_AUTH_PIN, stored)
    assert not pin_in(TEST_AUTH_PIN, caplog.text)


@pytest.mark.parametrize(
    ("card", "status", "verdict"),
    [
        (lambda: MyNumberCard(forged=True), 200, "untrusted_chain"),
        (lambda: MyNumberCard(wrong_key=True), 200, "possession_failed"),
        (lambda: UnknownIsoCard(), 200, "unsupported card generation"),
        (lambda: MyNumberCard(auth_tries=1), 403, None),
    ],
    ids=["forged", "wrong-key", "unknown", "one-try-left"],
)
async def test_cards_that_are_not_proven(
    broker: Broker,
    pty_port: Pty,
    stack: PcscStack,
    tmp_path: Path,
    card: object,
    status: int,
    verdict: str | None,
) -> None:
    c_ = card()  # type: ignore[operator]
    stack.slot.insert(c_, wait=True)
    async with running_kiosk(config(tmp_path, broker, pty_port, stack)) as k, k.client() as c:
        r = await c.post(URL, headers=k.auth(), json={"pin": TEST_AUTH_PIN})
        assert r.status_code == status, r.text
        body = r.json()
        if verdict is None:
            assert (body["error"], body["tries_left"]) == ("pin_refused", 1)
        else:
            assert body["verdict"] == verdict
    sent = [a for a in c_.seen if a[:4] == VERIFY and len(a) > 4]
    assert len(sent) == (1 if verdict == "possession_failed" else 0)


async def test_a_profile_without_prove_possession_refuses(
    broker: Broker, pty_port: Pty, stack: PcscStack, tmp_path: Path
) -> None:
    card = MyNumberCard()
    stack.slot.insert(card, wait=True)
    cfg = config(tmp_path, broker, pty_port, stack, prove=False)
    async with running_kiosk(cfg) as k, k.client() as c:
        r = await c.post(URL, headers=k.auth(), json={"pin": TEST_AUTH_PIN})
        assert r.status_code == 403 and r.json()["error"] == "not_enabled", r.text
        bad = await c.post(URL, headers=k.auth(), json={"pin": "12a4"})
        assert bad.status_code == 422
    assert pins_sent(card) == []


def test_a_card_that_is_not_genuine_is_an_alarm_on_the_page() -> None:
    def page(card_auth: str | None) -> str:
        body = {"device": READER, "kind": "card", "interpretation": None}
        if card_auth is not None:
            body["card_auth"] = card_auth
        return str(event_body("read_accepted", body)["verdict"])

    assert page(None) == page("genuine") == page("clock_unsynced") == "ok"
    for bad in ("untrusted_chain", "expired", "malformed", "possession_failed"):
        assert page(bad) == "card_not_genuine"


async def test_a_forged_card_insert_reaches_the_page_as_an_alarm(
    broker: Broker, pty_port: Pty, stack: PcscStack, tmp_path: Path
) -> None:
    async with running_kiosk(config(tmp_path, broker, pty_port, stack)) as k:
        seen: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        k.station.subscribe(
            lambda kind, body: (
                seen.put_nowait(event_body(kind, body)) if kind == "read_accepted" else None
            )
        )
        stack.slot.insert(MyNumberCard(forged=True), wait=True)
        event = await asyncio.wait_for(seen.get(), 15)
        assert (event["kind"], event["card_auth"], event["verdict"]) == (
            "card",
            "untrusted_chain",
            "card_not_genuine",
        )
