"""Fakes at the python-evdev boundary (no /dev/uinput on CI) and capture helpers.

`FakeInputDevice` behaves like `evdev.InputDevice` as far as the HID driver uses
it: one `async_read_loop()` iterator that yields the events a test pushes, and
raises `OSError(ENODEV)` when the test "unplugs" it, as evdev does.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import HidDevice
from agent.keymap import KEYS, KeyEvent

DATA = Path(__file__).resolve().parents[1] / "data" / "hid"

UNPLUG = object()


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
    bustype: int = 3
    vendor: int = 0
    product: int = 0
    version: int = 0x110


KEYBOARD_KEYS = sorted(set(KEYS.values()))


@dataclass
class FakeInputDevice:
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


def hid_config(**overrides: Any) -> HidDevice:
    base: dict[str, Any] = {
        "name": "counter-scanner",
        "profile": "generic-hid-scanner-us",
        "driver": "hid",
        "vendor_id": 0x05E0,
        "product_id": 0x1200,
    }
    return HidDevice.model_validate({**base, **overrides})


EVTEST_HEADER = """\
Input driver version is 1.0.1
Input device ID: bus 0x3 vendor 0x{vendor:x} product 0x{product:x} version 0x110
Input device name: "{name}"
Supported events:
  Event type 0 (EV_SYN)
  Event type 1 (EV_KEY)
{keys}
  Event type 4 (EV_MSC)
    Event code 4 (MSC_SCAN)
  Event type 17 (EV_LED)
    Event code 0 (LED_NUML) state 0
    Event code 1 (LED_CAPSL) state 0
    Event code 2 (LED_SCROLLL) state 0
    Event code 3 (LED_COMPOSE) state 0
    Event code 4 (LED_KANA) state 0
Key repeat handling:
  Repeat type 20 (EV_REP)
    Repeat code 0 (REP_DELAY)
      Value    250
    Repeat code 1 (REP_PERIOD)
      Value     33
Properties:
Testing ... (interrupt to exit)
"""


def evtest_header(name: str, vendor: int, product: int) -> str:
    names = {code: n for n, code in KEYS.items()}
    keys = "\n".join(f"    Event code {c} ({names[c]})" for c in sorted(names))
    return EVTEST_HEADER.format(name=name, vendor=vendor, product=product, keys=keys)
