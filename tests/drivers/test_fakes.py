"""The fakes of agent/testing.py behave like what they stand for.

A fake that answers differently from the device makes every test built on it
prove the wrong thing. The card reader fake is run through the same PIN
sequences as the real PC/SC driver on an emulated My Number card on a real
pcscd, and must give the same answers; the others are held to the behaviour of
the library they replace (python-evdev, udev, a camera's frame clock).
"""

from __future__ import annotations

import asyncio
import errno
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.config import PcscDevice
from agent.contract.records import Read, ReadFault
from agent.drivers.card import CardInfo
from agent.drivers.pcsc import PcscDriver
from agent.errors import CardError, DeviceUnavailable, PinRefused
from agent.keymap import type_text
from agent.testing import (
    FAKE_CARD,
    FAKE_CARD_PIN,
    FakeBackend,
    FakeCamera,
    FakeCardReader,
    FakeEvent,
    FakeInputDevice,
    FakePhotoCamera,
    FakeWatch,
    counter_top,
)
from tests.support.pcsc import (
    TEST_ADDRESS,
    TEST_NAME,
    TEST_PIN,
    MyNumberCard,
    PcscStack,
    pcsc_stack,
)

#: what the emulated card's 入力補助AP holds, as the real driver reads it
EMULATED = CardInfo(
    name=TEST_NAME, address=TEST_ADDRESS, birth_date="1985-04-12", sex="female", tries_left=3
)


def reader_config(name: str = "card-reader", reader: str = "*") -> PcscDevice:
    return PcscDevice(name=name, profile="test", driver="pcsc", reader=reader)  # type: ignore[arg-type]


Outcome = tuple[str, object]


async def attempt(driver: FakeCardReader | PcscDriver, pin: str) -> Outcome:
    """One PIN read, reduced to what the kiosk would answer."""
    try:
        info = await driver.read_card_info(pin)
    except PinRefused as e:
        return ("pin_refused", e.tries_left)
    except CardError:
        return ("card_error", None)
    return ("info", (info.personal(), info.tries_left))


# -- the card reader ----------------------------------------------------------------------


async def test_fake_reader_keeps_the_pin_rules() -> None:
    reader = FakeCardReader(reader_config())
    async with reader:
        assert await attempt(reader, "12a4") == ("pin_refused", None)  # card not asked
        assert reader.verify_calls == 0
        assert await attempt(reader, "0000") == ("pin_refused", 2)
        assert await attempt(reader, FAKE_CARD_PIN) == ("info", (FAKE_CARD.personal(), 3))
        assert reader.tries_left == 3  # the right PIN resets the counter
        assert await attempt(reader, "0000") == ("pin_refused", 2)
        assert await attempt(reader, "0001") == ("pin_refused", 1)
        calls = reader.verify_calls
        assert await attempt(reader, FAKE_CARD_PIN) == ("pin_refused", 1)  # not tried
        assert reader.verify_calls == calls
        reader.tries_left = 0
        assert await attempt(reader, FAKE_CARD_PIN) == ("pin_refused", 0)
        reader.card_present = False
        assert await attempt(reader, FAKE_CARD_PIN) == ("card_error", None)
    with pytest.raises(CardError, match="not open"):
        await reader.read_card_info(FAKE_CARD_PIN)


async def test_fake_reader_hides_the_card_in_its_repr() -> None:
    info = await _open_and_read(FakeCardReader(reader_config()), FAKE_CARD_PIN)
    assert FAKE_CARD.name not in repr(info) and FAKE_CARD.address not in repr(info)
    assert info.attributes() == {
        "name": FAKE_CARD.name,
        "address": FAKE_CARD.address,
        "birth_date": "1980-04-01",  # as the real parser gives it, not the card's YYYYMMDD
        "sex": "female",  # ISO 5218 "2" in words, as the real parser gives it
    }


async def _open_and_read(reader: FakeCardReader, pin: str) -> CardInfo:
    async with reader:
        return await reader.read_card_info(pin)


pcscd = pytest.mark.pcscd

#: PIN sequences a resident can type, each on a fresh card with this many tries
SEQUENCES = {
    "right first": (3, [TEST_PIN, TEST_PIN]),
    "wrong, then right": (3, ["0000", TEST_PIN]),
    "wrong twice, then refused": (3, ["0000", "0001", TEST_PIN, TEST_PIN]),
    "not four digits": (3, ["12a4", "123", TEST_PIN]),
    "one try left": (1, [TEST_PIN]),
    "locked": (0, [TEST_PIN]),
    "two tries: one wrong, then refused": (2, ["0000", "0000", TEST_PIN]),
}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path) as st:
        yield st


@pytest.fixture
async def real_reader(stack: PcscStack) -> AsyncIterator[PcscDriver]:
    async with PcscDriver(reader_config(reader=stack.reader)) as d:
        yield d


async def next_read(driver: PcscDriver) -> Read | ReadFault:
    return await asyncio.wait_for(anext(driver.reads()), 15)


@pcscd
@pytest.mark.parametrize("case", sorted(SEQUENCES))
async def test_fake_reader_answers_as_the_real_driver_on_an_emulated_card(
    stack: PcscStack, real_reader: PcscDriver, case: str
) -> None:
    tries, pins = SEQUENCES[case]
    card = MyNumberCard(tries=tries)
    stack.slot.insert(card)
    await next_read(real_reader)  # the insertion record
    real = [await attempt(real_reader, pin) for pin in pins]

    fake = FakeCardReader(reader_config(), pin=TEST_PIN, card=EMULATED)
    fake.tries_left = tries
    async with fake:
        faked = [await attempt(fake, pin) for pin in pins]

    assert faked == real
    assert fake.verify_calls == card.verify_count  # the same PINs reached the card
    assert fake.tries_left == card.support_tries


@pcscd
async def test_fake_reader_without_a_card_answers_as_the_real_driver(
    stack: PcscStack, real_reader: PcscDriver
) -> None:
    stack.slot.insert(MyNumberCard())
    await next_read(real_reader)
    stack.slot.remove()
    fake = FakeCardReader(reader_config())
    fake.card_present = False
    async with fake:
        assert await attempt(fake, TEST_PIN) == await attempt(real_reader, TEST_PIN)


# -- the photo camera ---------------------------------------------------------------------


async def test_fake_photo_camera_takes_distinct_jpeg_stills_while_open() -> None:
    camera = FakePhotoCamera(reader_config("camera"))
    with pytest.raises(DeviceUnavailable):
        await camera.capture_photo()  # as the real driver before it streams
    async with camera:
        first, second = await camera.capture_photo(), await camera.capture_photo()
    assert first.data[:2] == b"\xff\xd8" and first.data[-2:] == b"\xff\xd9"  # SOI .. EOI
    assert first.sha256 != second.sha256
    assert (first.width, first.height, first.content_type) == (1280, 960, "image/jpeg")
    assert camera.captures == 2


# -- the frame source ---------------------------------------------------------------------


def test_fake_camera_plays_its_frames_on_a_frame_clock_then_idles() -> None:
    frames = [counter_top(i) for i in range(3)]
    camera = FakeCamera(frames, frame_dt=0.01)
    camera.open()
    got = [camera.next_frame(1.0) for _ in range(5)]
    camera.close()
    assert all(f is not None for f in got)
    images = [f.image for f in got if f is not None]
    stamps = [f.timestamp for f in got if f is not None]
    for have, want in zip(images, frames, strict=False):
        assert have is want
    assert all(np.array_equal(img, camera.idle) for img in images[3:])
    assert stamps == pytest.approx([stamps[0] + i * 0.01 for i in range(5)])  # camera time
    assert camera.script_done.is_set()
    assert camera.served == 5


def test_fake_camera_unplugs_after_its_script_when_told() -> None:
    camera = FakeCamera([counter_top()], frame_dt=0.01, end_with_unplug=True)
    camera.open()
    assert camera.next_frame(1.0) is not None
    with pytest.raises(DeviceUnavailable):
        camera.next_frame(1.0)


def test_fake_camera_still_is_a_real_jpeg_of_its_picture() -> None:
    picture = np.full((120, 160, 3), 200, dtype=np.uint8)
    camera = FakeCamera(still=picture)
    still = camera.capture_still()
    with Image.open(io.BytesIO(still.data)) as img:
        assert (img.format, img.size) == ("JPEG", (160, 120))
    assert (still.width, still.height) == (160, 120)
    with pytest.raises(DeviceUnavailable):
        FakeCamera().capture_still()  # no still configured: as a camera without one


# -- python-evdev and udev ----------------------------------------------------------------


def test_fake_input_device_grabs_as_the_kernel_does() -> None:
    dev = FakeInputDevice("/dev/input/event3")
    with pytest.raises(OSError) as err:
        dev.ungrab()  # not grabbed: EINVAL from the kernel
    assert err.value.errno == errno.EINVAL
    dev.grab()
    with pytest.raises(OSError) as err:
        dev.grab()  # already grabbed: EBUSY
    assert err.value.errno == errno.EBUSY
    dev.ungrab()
    busy = FakeInputDevice("/dev/input/event4", grab_error=errno.EBUSY)
    with pytest.raises(OSError):
        busy.grab()  # another process holds it
    assert not busy.grabbed
    assert (dev.info.vendor, dev.info.product) == (0x05E0, 0x1200)


async def test_fake_input_device_reads_what_is_pushed_then_fails_with_enodev() -> None:
    dev = FakeInputDevice("/dev/input/event3")
    events = type_text("12", "us")
    dev.push(events)
    dev.unplug()
    got: list[FakeEvent] = []
    with pytest.raises(OSError) as err:
        async for ev in dev.async_read_loop():
            got.append(ev)
    assert err.value.errno == errno.ENODEV
    assert [(e.type, e.code, e.value) for e in got] == [(e.type, e.code, e.value) for e in events]
    assert got[0].timestamp() == pytest.approx(events[0].time)


def test_fake_backend_lists_and_opens_what_is_plugged_in() -> None:
    a, b = FakeInputDevice("/dev/input/event5"), FakeInputDevice("/dev/input/event2")
    backend = FakeBackend(a)
    backend.plug(b)
    assert backend.list_devices() == ["/dev/input/event2", "/dev/input/event5"]
    assert backend.open("/dev/input/event5") is a
    backend.unplug("/dev/input/event5")
    assert backend.list_devices() == ["/dev/input/event2"]
    with pytest.raises(FileNotFoundError):
        backend.open("/dev/input/event5")  # as evdev.InputDevice on a node that is gone
    assert backend.opened == ["/dev/input/event5"]


async def test_fake_watch_says_whether_a_device_was_added() -> None:
    added = asyncio.Event()
    watch = FakeWatch(added)
    assert await watch.wait(0.01) is False
    added.set()
    assert await watch.wait(10) is True
    assert watch.waited == 2
