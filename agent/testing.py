"""Test doubles for madoguchi's seams, shipped with the package (as `structlog.testing` is).

For the project's own tests and benchmarks, and for anyone writing tests
against a station: each fake stands at one seam and is declared against the
same Protocol as the real implementation, and mypy --strict checks both
(`agent/testing.py` is under `mypy agent`), so a fake cannot drift from the
device it stands for without the type check failing.
tests/drivers/test_capabilities.py compares their signatures at run time, and
tests/drivers/test_fakes.py checks that each fake behaves like the real thing
(the card reader fake against the real driver on an emulated card).

Nothing in `agent/` imports this module.

- `FakeCardReader`: a card reader driver with a My Number card in it
  (`CardInfoProvider`), keeping the PIN rules of the real PC/SC driver.
- `FakePhotoCamera`: a camera driver that takes stills on demand (`PhotoCamera`).
- `FakeCamera`: a frame source playing a list of frames (`FrameSource`), for
  the real camera driver's capture thread and decoder.
- `FakeInputDevice`, `FakeBackend`, `FakeWatch`: python-evdev and udev as the
  HID driver uses them (`InputDeviceLike`, `Backend`, `HotplugWatch`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.contract.records import Read, ReadFault
from agent.drivers.base import Driver
from agent.drivers.camera import Frame, FrameSource, Still, encode_jpeg
from agent.drivers.capabilities import CardInfoProvider, PhotoCamera
from agent.drivers.card import MIN_TRIES, CardInfo
from agent.drivers.hid import Backend, HotplugWatch, InputDeviceLike
from agent.errors import CardError, DeviceUnavailable, PinRefused
from agent.keymap import KEYS, KeyEvent

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from agent.config import DeviceConfig

# -- fakes ------------------------------------------------------------------------------

# card reader (agent/drivers/pcsc.py)

_NO_READS: tuple[Read | ReadFault, ...] = ()

#: the PIN of the fake reader's card
FAKE_CARD_PIN = "4821"
#: what the fake card's 入力補助AP holds, as the real parser gives it (ISO dates, ISO 5218 words)
FAKE_CARD = CardInfo(
    name="窓口 花子",
    address="埼玉県戸田市上戸田1-18-1",
    birth_date="1980-04-01",
    sex="female",
    tries_left=3,
)


class FakeCardReader(Driver):
    """A reader with a My Number card in it: 3 PIN tries, the counter really counts.

    The rules and answers of the real driver (agent/drivers/card.py): a PIN that
    is not 4 digits is refused before the card is asked; the counter is read
    without spending a try; fewer than 2 tries left is refused without VERIFY;
    VERIFY once, never retry; the right PIN resets the counter to 3. It yields
    no reads (no card insertions) and stores no `card_info` record.
    """

    def __init__(
        self, config: DeviceConfig, *, pin: str = FAKE_CARD_PIN, card: CardInfo = FAKE_CARD
    ) -> None:
        super().__init__(config)
        self.pin = pin
        self.card = card
        self.tries_left = 3
        self.verify_calls = 0
        self.card_present = True
        self._gone = asyncio.Event()
        self._gone.set()  # not open yet

    async def open(self) -> None:
        self._gone.clear()

    async def close(self) -> None:
        self._gone.set()

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        await self._gone.wait()
        for read in _NO_READS:  # an async generator that yields nothing until closed
            yield read

    async def read_card_info(self, pin: str) -> CardInfo:
        if self._gone.is_set():
            raise CardError(self.name, "the reader is not open")
        if not self.card_present:
            raise CardError(self.name, "no card: no card in the reader")
        if len(pin) != 4 or not pin.isdigit():
            raise PinRefused(self.name, "the PIN must be 4 digits; the card was not asked", None)
        if self.tries_left == 0:
            raise PinRefused(self.name, "the card's PIN is locked", 0)
        if self.tries_left < MIN_TRIES:
            raise PinRefused(self.name, "too few tries left: not tried", self.tries_left)
        self.verify_calls += 1
        await asyncio.sleep(0)  # the card answers later, as a real one does
        if pin != self.pin:
            self.tries_left -= 1
            raise PinRefused(self.name, "wrong PIN; not retried", self.tries_left)
        self.tries_left = 3
        return dataclasses.replace(self.card, tries_left=3)


# photo camera (a driver with agent/drivers/camera.py's `capture_photo`)


class FakePhotoCamera(Driver):
    """A camera that takes a (tiny, JPEG-framed) still on demand; picamera2 cannot exist here."""

    def __init__(self, config: DeviceConfig) -> None:
        super().__init__(config)
        self.captures = 0
        self._gone = asyncio.Event()
        self._gone.set()  # not open yet

    async def open(self) -> None:
        self._gone.clear()

    async def close(self) -> None:
        self._gone.set()

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        await self._gone.wait()
        for read in _NO_READS:  # an async generator that yields nothing until closed
            yield read

    async def capture_photo(self) -> Still:
        if self._gone.is_set():
            raise DeviceUnavailable(self.name, "camera is not streaming")
        self.captures += 1
        return Still(b"\xff\xd8\xff\xe0" + bytes(self.captures) + b"\xff\xd9", 1280, 960)


# frame source (agent/drivers/camera.py's `FrameSource`)


def counter_top(seed: int = 0, width: int = 640, height: int = 480) -> NDArray[np.uint8]:
    """A counter top seen by the camera: mid grey with soft shading and a little texture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    shade = 150 + 30 * np.sin(xx / 90.0) * np.cos(yy / 120.0)
    image: NDArray[np.uint8] = np.clip(shade + rng.normal(0, 3, (height, width)), 0, 255).astype(
        np.uint8
    )
    return image


class FakeCamera:
    """A camera that plays a list of frames, to the real capture thread, decoder and driver.

    Frames are handed out at `frame_dt` seconds apart in camera time (the
    timestamps the driver sees) and paced at the same rate in real time, so the
    capture thread, the one-frame slot and the decoder run as with a camera.
    After the script it keeps showing `idle` (an empty counter top) until
    closed, or with `end_with_unplug` reports the camera gone.
    """

    def __init__(
        self,
        frames: Sequence[NDArray[np.uint8]] = (),
        *,
        frame_dt: float = 0.05,
        still: NDArray[np.uint8] | None = None,
        jpeg_quality: int = 90,
        end_with_unplug: bool = False,
    ) -> None:
        self.frames = list(frames)
        self.frame_dt = frame_dt
        self.still = still
        self.jpeg_quality = jpeg_quality
        self.end_with_unplug = end_with_unplug
        self.idle = counter_top(99)
        self.served = 0
        self.stills_taken = 0
        self.opened = threading.Event()
        self.script_done = threading.Event()
        self.closed = threading.Event()
        self.thread_names: set[str] = set()
        self._t0 = 0.0
        self._next_real = 0.0

    def open(self) -> None:
        self.thread_names.add(threading.current_thread().name)
        self.closed.clear()
        self._t0 = time.monotonic()
        self._next_real = time.monotonic()
        self.opened.set()

    def close(self) -> None:
        self.thread_names.add(threading.current_thread().name)
        self.closed.set()

    def next_frame(self, timeout: float) -> Frame | None:
        self.thread_names.add(threading.current_thread().name)
        # pacing like a sensor's frame clock; returns early when closed
        wait = self._next_real - time.monotonic()
        if wait > 0 and self.closed.wait(wait):
            return None
        self._next_real = max(self._next_real + self.frame_dt, time.monotonic() - self.frame_dt)
        i = self.served
        if i >= len(self.frames):
            self.script_done.set()
            if self.end_with_unplug:
                raise DeviceUnavailable("fake-camera", "unplugged")
            image = self.idle
        else:
            image = self.frames[i]
        self.served += 1
        return Frame(image, self._t0 + i * self.frame_dt)

    def capture_still(self) -> Still:
        self.thread_names.add(threading.current_thread().name)
        if self.still is None:
            raise DeviceUnavailable("fake-camera", "this fake camera has no still")
        self.stills_taken += 1
        return encode_jpeg(self.still, self.jpeg_quality)


# input devices (agent/drivers/hid.py's python-evdev and udev boundary)

UNPLUG = object()
KEYBOARD_KEYS = sorted(set(KEYS.values()))


@dataclass(frozen=True)
class FakeEvent:
    """An evdev InputEvent: sec/usec, type, code, value, timestamp()."""

    sec: int
    usec: int
    type: int
    code: int
    value: int

    def timestamp(self) -> float:
        return self.sec + self.usec / 1e6


def to_fake(events: Iterable[KeyEvent]) -> list[FakeEvent]:
    out = []
    for ev in events:
        sec, usec = divmod(round(ev.time * 1e6), 1_000_000)
        out.append(FakeEvent(sec, usec, ev.type, ev.code, ev.value))
    return out


@dataclass
class Info:
    """`InputDevice.info`: bus type, USB vendor and product, version."""

    bustype: int = 3
    vendor: int = 0
    product: int = 0
    version: int = 0x110


@dataclass
class FakeInputDevice:
    """Like `evdev.InputDevice` as far as the HID driver uses it: one `async_read_loop()`
    iterator that yields the events a test pushes, and raises `OSError(ENODEV)` when the
    test "unplugs" it, as evdev does; grab / ungrab fail as the kernel's EVIOCGRAB does."""

    path: str
    name: str = "Fake Bar Code Scanner"
    vendor: int = 0x05E0
    product: int = 0x1200
    uniq: str = ""
    keys: list[int] = field(default_factory=lambda: list(KEYBOARD_KEYS))
    leds_on: list[int] = field(default_factory=list)
    grab_error: int | None = None
    grabbed: bool = False
    closed: bool = False
    read_loops: int = 0
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    @property
    def info(self) -> Info:
        return Info(vendor=self.vendor, product=self.product)

    def capabilities(self) -> dict[int, list[Any]]:
        return {0: [0, 1, 4, 17], 1: list(self.keys), 4: [4], 17: [0, 1, 2]}

    def grab(self) -> None:
        if self.grab_error is not None:
            raise OSError(self.grab_error, "Device or resource busy")
        if self.grabbed:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.grabbed = True

    def ungrab(self) -> None:
        if not self.grabbed:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.grabbed = False

    def close(self) -> None:
        self.closed = True

    def leds(self) -> list[int]:
        return list(self.leds_on)

    def active_keys(self) -> list[int]:
        return []

    def push(self, events: Iterable[KeyEvent | FakeEvent]) -> None:
        for ev in events:
            self.queue.put_nowait(to_fake([ev])[0] if isinstance(ev, KeyEvent) else ev)

    def unplug(self) -> None:
        self.queue.put_nowait(UNPLUG)

    def async_read_loop(self) -> AsyncIterator[FakeEvent]:
        self.read_loops += 1
        return self._loop()

    async def _loop(self) -> AsyncIterator[FakeEvent]:
        while True:
            item = await self.queue.get()
            self.queue.task_done()
            if item is UNPLUG:
                raise OSError(errno.ENODEV, "No such device")
            yield item


class FakeBackend:
    """The input devices present: plug() and unplug() change what is listed."""

    def __init__(self, *devices: FakeInputDevice) -> None:
        self.devices: dict[str, FakeInputDevice] = {d.path: d for d in devices}
        self.opened: list[str] = []

    def plug(self, dev: FakeInputDevice) -> None:
        self.devices[dev.path] = dev

    def unplug(self, path: str) -> None:
        dev = self.devices.pop(path)
        dev.unplug()

    def list_devices(self) -> list[str]:
        return sorted(self.devices)

    def open(self, path: str) -> FakeInputDevice:
        dev = self.devices.get(path)
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        self.opened.append(path)
        return dev


class FakeWatch:
    """A udev watch whose "add" the test fires."""

    def __init__(self, added: asyncio.Event) -> None:
        self.added = added
        self.waited = 0

    async def wait(self, seconds: float) -> bool:
        self.waited += 1
        try:
            await asyncio.wait_for(self.added.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        pass


#: each fake against the Protocol of the real implementation: mypy --strict fails on a drift
_card_reader: type[CardInfoProvider] = FakeCardReader
_photo_camera: type[PhotoCamera] = FakePhotoCamera
_frame_source: type[FrameSource] = FakeCamera
_input_device: type[InputDeviceLike] = FakeInputDevice
_backend: type[Backend] = FakeBackend
_watch: type[HotplugWatch] = FakeWatch

#: seam -> (Protocol, fake), for tests/drivers/test_capabilities.py
FAKES: dict[str, tuple[type[Any], type[Any]]] = {
    "card reader": (CardInfoProvider, FakeCardReader),
    "photo camera": (PhotoCamera, FakePhotoCamera),
    "frame source": (FrameSource, FakeCamera),
    "input device": (InputDeviceLike, FakeInputDevice),
    "evdev backend": (Backend, FakeBackend),
    "hotplug watch": (HotplugWatch, FakeWatch),
}

# -- harness (see below)
