"""The kiosk's PIN read through the real PC/SC driver, on an emulated card on a real pcscd.

No fake between the HTTP request and the card: `POST /v1/cards/{reader}/info`
on a running station (real outbox, real mosquitto) whose `PcscDriver` talks to
vpcd's emulated My Number card. This is the path that failed with a TypeError
on every real reader while the suite, built on a fake of the wrong shape,
stayed green (docs/kiosk.md, docs/pcsc.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.testing import Broker, Pty
from tests.support.kiosk import kiosk_config, running_kiosk
from tests.support.pcsc import (
    TEST_ADDRESS,
    TEST_NAME,
    TEST_PIN,
    MyNumberCard,
    PcscStack,
    pcsc_stack,
)
from tests.support.secrets import pin_in

pytestmark = [pytest.mark.pcscd, pytest.mark.broker]

READER = "counter-reader"  # not "card-reader": running_kiosk fakes that one
URL = f"/v1/cards/{READER}/info"
VERIFY = bytes.fromhex("00200080")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path / "pcsc") as st:
        yield st


def config(tmp_path: Path, broker: Broker, pty: Pty, stack: PcscStack) -> Path:
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
""",
    )
    return path


def pins_sent(card: MyNumberCard) -> list[bytes]:
    """The VERIFY APDUs that carried a PIN (the counter query has no data)."""
    return [apdu for apdu in card.seen if apdu[:4] == VERIFY and len(apdu) > 4]


async def test_the_pin_read_gives_the_four_attributes(
    broker: Broker,
    pty_port: Pty,
    stack: PcscStack,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    card = MyNumberCard()
    stack.slot.insert(card, wait=True)
    async with running_kiosk(config(tmp_path, broker, pty_port, stack)) as k, k.client() as c:
        status = (await c.get("/v1/status", headers=k.auth())).json()
        assert status["card_readers"] == [READER]
        r = await c.post(URL, headers=k.auth(), json={"pin": TEST_PIN})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "reader": READER,
            "info": {
                "name": TEST_NAME,
                "address": TEST_ADDRESS,
                "birth_date": "1985-04-12",
                "sex": "female",
            },
        }
        assert r.headers["cache-control"] == "no-store"
    assert len(pins_sent(card)) == 1 and card.support_tries == 3
    assert await asyncio.to_thread(card.forgot_pin.wait, 10)  # reset after the read
    for secret in (TEST_PIN, TEST_NAME, TEST_ADDRESS):
        assert secret not in caplog.text


async def test_a_wrong_pin_is_refused_once_with_the_tries_left(
    broker: Broker, pty_port: Pty, stack: PcscStack, tmp_path: Path
) -> None:
    card = MyNumberCard()
    stack.slot.insert(card, wait=True)
    async with running_kiosk(config(tmp_path, broker, pty_port, stack)) as k, k.client() as c:
        r = await c.post(URL, headers=k.auth(), json={"pin": "0000"})
        assert r.status_code == 403, r.text
        body = r.json()
        assert (body["error"], body["tries_left"], body["locked"]) == ("pin_refused", 2, False)
        assert "0000" not in r.text
    assert len(pins_sent(card)) == 1  # tried once, not retried on the resident's behalf
    assert card.support_tries == 2


async def test_a_card_with_one_try_left_is_never_sent_the_pin(
    broker: Broker, pty_port: Pty, stack: PcscStack, tmp_path: Path
) -> None:
    card = MyNumberCard(tries=1)
    stack.slot.insert(card, wait=True)
    db = load_config(config(tmp_path, broker, pty_port, stack)).outbox_path
    async with running_kiosk(config(tmp_path, broker, pty_port, stack)) as k, k.client() as c:
        r = await c.post(URL, headers=k.auth(), json={"pin": TEST_PIN})
        assert r.status_code == 403, r.text
        body = r.json()
        assert (body["error"], body["tries_left"], body["locked"]) == ("pin_refused", 1, False)
    assert pins_sent(card) == []
    assert VERIFY in card.seen  # the counter was asked, for free
    assert not any(TEST_PIN.encode() in apdu for apdu in card.seen)
    assert card.support_tries == 1
    for f in db.parent.iterdir():
        assert not pin_in(TEST_PIN, f.read_bytes())
