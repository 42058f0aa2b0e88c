"""The My Number travels only when the profile's `read_my_number` asks for it: the card
driver's PIN flow (the path a station takes, not the `card-info` CLI) against a real
pcscd with a vpcd My Number card."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import PcscDevice
from agent.contract.records import Read
from agent.drivers.pcsc import PcscDriver
from tests.support.pcsc import (
    SUPPORT_AID,
    TEST_MY_NUMBER,
    TEST_NAME,
    TEST_PIN,
    MyNumberCard,
    PcscStack,
    pcsc_stack,
)

pytestmark = pytest.mark.pcscd


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path) as st:
        yield st


async def card_info_read(stack: PcscStack, *, read_my_number: bool) -> tuple[Read, MyNumberCard]:
    dev = PcscDevice(
        name="card-reader",
        profile="test",
        driver="pcsc",
        reader=stack.reader,
        store_card_info=True,
        read_my_number=read_my_number,
    )  # type: ignore[call-arg]
    card = MyNumberCard()
    async with PcscDriver(dev) as driver:
        reads = driver.reads()
        stack.slot.insert(card)
        first = await asyncio.wait_for(anext(reads), 15)
        assert isinstance(first, Read) and first.kind == "card"
        info = await driver.read_card_info(TEST_PIN)
        assert info.name == TEST_NAME
        second = await asyncio.wait_for(anext(reads), 15)
    assert isinstance(second, Read) and second.kind == "card_info"
    assert second.personal is not None
    return second, card


async def test_without_read_my_number_the_record_has_no_my_number(stack: PcscStack) -> None:
    read, card = await card_info_read(stack, read_my_number=False)
    assert read.personal is not None and "my_number" not in read.personal
    assert read.personal["name"] == TEST_NAME
    assert TEST_MY_NUMBER not in repr(read.data)
    # the My Number EF (入力補助AP EF 0001) was never even read from the card
    assert not any(app == SUPPORT_AID and ef == 0x0001 for app, ef, _, _ in card.reads)


async def test_with_read_my_number_it_is_in_the_personal_part_only(stack: PcscStack) -> None:
    read, _ = await card_info_read(stack, read_my_number=True)
    assert read.personal is not None and read.personal["my_number"] == TEST_MY_NUMBER
    assert TEST_MY_NUMBER not in repr(read.data)
