"""The `jpki_anchors` dataset feeds the card readers' chain check (issues #20 and #21).

A running station whose PC/SC reader (real pcscd + vpcd, tests/support/pcsc.py) pins
only an unrelated CA in its config: the test card is `untrusted_chain` (chain
`untrusted_issuer`) until the central side publishes a signed `jpki_anchors` version
naming the test CA; the next insertion of the same card is `genuine`. A tampered
publication changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import public_hex, publish_dataset
from agent.drivers.pcsc import PcscDriver
from agent.testing import Broker, Pty, running_station, serial_scanner, write_config
from tests.support.pcsc import MyNumberCard, PcscStack, anchor_fingerprint, pcsc_stack

pytestmark = [pytest.mark.pcscd, pytest.mark.broker]

OTHER_CA = "ab" * 32  # a pinned anchor the test card does not chain to


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path / "pcsc") as st:
        yield st


class CardReads:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def __call__(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "read_accepted" and body.get("kind") == "card":
            self.queue.put_nowait(body)

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.queue.get(), 15)


@pytest.mark.timeout(90)
async def test_a_published_anchor_makes_the_card_valid(
    broker: Broker, pty_port: Pty, stack: PcscStack, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    devices = (
        serial_scanner(pty_port.link)
        + f"""
[[devices]]
name = "counter-reader"
profile = "generic-pcsc-reader"
reader = "{stack.reader}"
jpki_anchors = ["{OTHER_CA}"]

[datasets]
public_key = "{public_hex(key)}"
max_age_s = 3600
"""
    )
    cfg = write_config(tmp_path, broker.port, devices=devices)
    async with running_station(cfg) as s:
        reads = CardReads()
        s.station.subscribe(reads)
        data = s.station.station.datasets
        assert data is not None

        async with asyncio.timeout(10):
            while "counter-reader" not in s.station.station.running_drivers():
                await asyncio.sleep(0.05)
        reader = s.station.station.running_drivers()["counter-reader"]
        assert isinstance(reader, PcscDriver)
        reader.clock_synced = lambda: True  # this machine's clock may not say it is synced

        card = MyNumberCard()
        stack.slot.insert(card, wait=True)
        before = await reads.next()
        assert before["card_auth"] == "untrusted_chain", before
        stack.slot.remove()

        # a version signed with another key is refused and changes nothing
        await publish_dataset(
            "127.0.0.1",
            broker.port,
            "madoguchi/v1",
            Ed25519PrivateKey.generate(),
            "jpki_anchors",
            [{"sha256": anchor_fingerprint(), "name": "forged desk"}],
        )
        version = await publish_dataset(
            "127.0.0.1",
            broker.port,
            "madoguchi/v1",
            key,
            "jpki_anchors",
            [{"sha256": anchor_fingerprint(), "name": "test JPKI CA"}],
        )
        async with asyncio.timeout(10):
            while data.held.get("jpki_anchors") is None:
                await data.applied.wait()
        assert data.held["jpki_anchors"].version == version
        assert data.jpki_anchors() == {anchor_fingerprint()}

        stack.slot.insert(card, wait=True)
        after = await reads.next()
        assert after["card_auth"] == "genuine", after
        stack.slot.remove()
