"""USB keyboard-wedge (HID) scanners, read through evdev and grabbed exclusively.

The scanner is found by `/dev/input/by-id/...` path, by USB vendor/product (and
serial, evdev's `uniq`), or by a pattern on its name, then `grab()`bed so no scan
ever reaches the kiosk's focused text field. Its key events go through a
`agent.keymap.Decoder` set to the layout the scanner itself is set to.

One `async_read_loop()` iterator per open device, and one pending `__anext__`
kept across idle timeouts: cancelling it, or making a new iterator, drops the
events evdev already read. Unplugging raises ENODEV from the read: a scan in
progress becomes a fault and `DeviceUnavailable` goes to the supervisor, which
builds a new driver and opens again with backoff. With pyudev installed, `open()`
of a missing scanner waits up to `hotplug_wait_s` for a udev "add" on the input
subsystem, so a replug is picked up at once rather than at the next retry.
Stopping is by cancelling the task (evdev's `close()` does not end the loop).

HID scanners have no back channel: `feedback()` sends nothing; operator feedback
is the kiosk event the supervisor emits after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import glob
import importlib.util
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent.contract.records import Read, ReadFault
from agent.drivers.base import Driver
from agent.errors import DeviceError, DeviceUnavailable, DriverMissing
from agent.keymap import (
    KEYS,
    LED_CAPSL,
    SYN_DROPPED,
    Decoder,
    Fault,
    KeyEvent,
    Scan,
)

if TYPE_CHECKING:
    from agent.config import HidDevice

log = logging.getLogger(__name__)

#: errno values that mean "the device is gone", not "the device is broken"
_GONE = {errno.ENODEV, errno.ENXIO, errno.ENOENT, errno.EBADF}


# -- the library boundary: what the driver uses of python-evdev -----------------------


class InputDeviceLike(Protocol):
    """The part of `evdev.InputDevice` the driver uses (tests pass a fake)."""

    path: str
    name: str
    uniq: str

    @property
    def info(self) -> Any:  # .vendor, .product; read only (the driver never sets it)
        ...

    def capabilities(self) -> dict[int, list[Any]]: ...
    def grab(self) -> None: ...
    def ungrab(self) -> None: ...
    def close(self) -> None: ...
    def leds(self) -> list[int]: ...
    def active_keys(self) -> list[int]: ...
    def async_read_loop(self) -> AsyncIterator[Any]: ...


class Backend(Protocol):
    """Lists and opens input devices: python-evdev, or a fake in tests."""

    def list_devices(self) -> list[str]: ...
    def open(self, path: str) -> InputDeviceLike: ...


class EvdevBackend:
    """python-evdev itself, imported only when there is an input device to open: a
    station whose scanner is unplugged does not carry it (issue #18, idle RSS)."""

    def __init__(self) -> None:
        if not _installed("evdev"):
            raise ImportError("python-evdev is not installed")
        self._evdev: Any = None

    def _lib(self) -> Any:
        if self._evdev is None:
            import evdev

            self._evdev = evdev
        return self._evdev

    def list_devices(self) -> list[str]:
        if not glob.glob("/dev/input/event*"):  # where evdev would look
            return []
        return list(self._lib().list_devices())

    def open(self, path: str) -> InputDeviceLike:
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        device: Any = self._lib().InputDevice(path)  # its path is typed str | bytes
        return device  # type: ignore[no-any-return]


def _installed(name: str) -> bool:
    """Whether `import name` would find it, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class HotplugWatch(Protocol):
    """Tells when an input device was added (udev), so a replug is seen at once."""

    async def wait(self, seconds: float) -> bool: ...
    def close(self) -> None: ...


class UdevWatch:
    """pyudev netlink monitor on the input subsystem, read through the event loop."""

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor
        self._added = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(monitor.fileno(), self._ready)

    @classmethod
    def start(cls) -> UdevWatch | None:
        """A watch, or None where pyudev or udev's netlink socket is not available."""
        try:
            import pyudev
        except ImportError:
            return None
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by("input")
            monitor.start()
        except Exception as e:  # no udev here (containers): fall back to the retry
            log.debug("no udev monitor: %s", e)
            return None
        return cls(monitor)

    def _ready(self) -> None:
        while True:
            try:
                dev = self._monitor.poll(timeout=0)
            except Exception:
                return
            if dev is None:
                return
            node = dev.device_node or ""
            if dev.action == "add" and node.startswith("/dev/input/event"):
                self._added.set()

    async def wait(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._added.wait(), seconds)
        return self._added.is_set()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._monitor.fileno())


# -- the driver ------------------------------------------------------------------


class HidDriver(Driver):
    """A keyboard-mode scanner, grabbed so that its keys reach nobody else."""

    config: HidDevice

    def __init__(
        self,
        config: HidDevice,
        *,
        backend: Backend | None = None,
        hotplug: Callable[[], HotplugWatch | None] | None = UdevWatch.start,
    ) -> None:
        super().__init__(config)
        self._backend = backend
        self._hotplug = hotplug
        self._device: InputDeviceLike | None = None
        self._events: AsyncIterator[Any] | None = None
        self._next: asyncio.Future[Any] | None = None
        self.decoder: Decoder | None = None

    # -- opening ---------------------------------------------------------------------

    def _load_backend(self) -> Backend:
        if self._backend is not None:
            return self._backend
        try:
            return EvdevBackend()
        except ImportError:
            raise DriverMissing(
                self.name, "python-evdev is not installed (pip install 'madoguchi[hid]')"
            ) from None

    def criteria(self) -> str:
        """How this scanner is looked for, for messages."""
        cfg = self.config
        parts = []
        if cfg.path:
            parts.append(cfg.path)
        if cfg.vendor_id is not None:
            ids = f"{cfg.vendor_id:04x}"
            if cfg.product_id is not None:
                ids += f":{cfg.product_id:04x}"
            parts.append(f"usb {ids}")
        if cfg.serial:
            parts.append("serial (configured)")
        if cfg.name_pattern:
            parts.append(f"name '{cfg.name_pattern}'")
        return ", ".join(parts)

    def _matches(self, dev: InputDeviceLike) -> bool:
        cfg = self.config
        info = dev.info
        if cfg.vendor_id is not None and info.vendor != cfg.vendor_id:
            return False
        if cfg.product_id is not None and info.product != cfg.product_id:
            return False
        if cfg.serial is not None and (dev.uniq or "") != cfg.serial:
            return False
        if cfg.name_pattern is not None and not fnmatch.fnmatchcase(dev.name, cfg.name_pattern):
            return False
        keys = set(dev.capabilities().get(1, []))  # EV_KEY
        # a composite scanner also has consumer/system-control nodes: take the keyboard
        return KEYS["KEY_ENTER"] in keys and KEYS["KEY_A"] in keys

    def _find(self, backend: Backend) -> InputDeviceLike | None:
        cfg = self.config
        paths = [cfg.path] if cfg.path else backend.list_devices()
        found: list[InputDeviceLike] = []
        denied = 0
        for path in paths:
            try:
                dev = backend.open(path)
            except PermissionError:
                denied += 1
                continue
            except OSError as e:
                if cfg.path and e.errno not in _GONE:
                    raise DeviceError(self.name, f"cannot open {path}: {_why(e)}") from None
                continue
            if self._matches(dev):
                found.append(dev)
            else:
                _quietly(dev.close)
        if len(found) > 1:
            for dev in found:
                _quietly(dev.close)
            raise DeviceError(
                self.name,
                f"{len(found)} keyboard devices match {self.criteria()}: "
                "add serial, or use a /dev/input/by-id path",
            )
        if not found and denied:
            raise DeviceUnavailable(
                self.name,
                f"no readable device matches {self.criteria()}; {denied} input device(s) "
                "refused access (is the agent's user in the 'input' group / udev rule?)",
            )
        return found[0] if found else None

    async def open(self) -> None:
        backend = self._load_backend()
        watch = self._hotplug() if self._hotplug is not None else None
        try:
            dev = self._find(backend)
            wait_s = self.config.hotplug_wait_s
            if dev is None and watch is not None and wait_s > 0 and await watch.wait(wait_s):
                dev = self._find(backend)
        finally:
            if watch is not None:
                watch.close()
        if dev is None:
            raise DeviceUnavailable(self.name, f"no input device matches {self.criteria()}")
        try:
            dev.grab()
        except OSError as e:
            _quietly(dev.close)
            if e.errno == errno.EBUSY:
                raise DeviceError(
                    self.name, f"{dev.path} is grabbed by another program: scans would leak"
                ) from None
            if e.errno in _GONE:
                raise DeviceUnavailable(self.name, f"{dev.path}: {_why(e)}") from None
            raise DeviceError(self.name, f"cannot grab {dev.path}: {_why(e)}") from None
        cfg = self.config
        decoder = Decoder(
            cfg.layout,
            terminators=cfg.terminators,
            gs_keys=cfg.gs_keys,
            idle_timeout_ms=cfg.idle_timeout_ms,
            min_key_rate=cfg.min_key_rate,
            alt_codes=cfg.alt_codes,
            max_length=cfg.max_length,
        )
        with contextlib.suppress(OSError):
            decoder.caps_lock = LED_CAPSL in dev.leds()
            decoder.sync_keys(dev.active_keys())
        self.decoder = decoder
        self._device = dev
        self._events = dev.async_read_loop()
        log.info(
            "%s: reading %s (%s), grabbed, layout %s", self.name, dev.path, dev.name, cfg.layout
        )

    async def close(self) -> None:
        dev, self._device, self._events = self._device, None, None
        if self._next is not None:
            self._next.cancel()  # a reader that was left without being closed
            self._next = None
        if dev is not None:
            _quietly(dev.ungrab)  # gone already after an unplug
            _quietly(dev.close)

    # -- reading ---------------------------------------------------------------------

    async def reads(self) -> AsyncIterator[Read | ReadFault]:
        events, decoder, dev = self._events, self.decoder, self._device
        if events is None or decoder is None or dev is None:
            raise DeviceUnavailable(self.name, "not open")
        loop = asyncio.get_running_loop()
        idle = decoder.idle_timeout_s
        last_key = loop.time()
        nxt: asyncio.Future[Any] | None = None
        try:
            while True:
                if nxt is None:
                    nxt = self._next = asyncio.ensure_future(anext(events))
                if not nxt.done():  # evdev hands out a read batch's events already done
                    timeout = max(0.0, last_key + idle - loop.time()) if decoder.pending else None
                    await asyncio.wait({nxt}, timeout=timeout)
                if not nxt.done():  # the scanner stopped mid-scan: keep `nxt`, it holds our place
                    fault = decoder.expire()
                    if fault is not None:
                        yield self._event(fault)
                    continue
                fut, nxt, self._next = nxt, None, None
                try:
                    ev = fut.result()
                except StopAsyncIteration:
                    raise DeviceUnavailable(self.name, "event stream ended") from None
                except OSError as e:
                    fault = decoder.finish()
                    if fault is not None:
                        yield self._event(Fault(f"device went away mid-scan: {fault.reason}"))
                    if e.errno in _GONE:
                        raise DeviceUnavailable(self.name, f"{dev.path}: unplugged") from None
                    raise DeviceError(self.name, f"{dev.path}: {_why(e)}") from None
                key = KeyEvent(ev.timestamp(), ev.type, ev.code, ev.value)
                if key.type == 0 and key.code == SYN_DROPPED:
                    with contextlib.suppress(OSError):
                        decoder.sync_keys(dev.active_keys())
                for result in decoder.feed(key):
                    yield self._event(result)
                if key.type == 1:
                    last_key = loop.time()
        finally:
            if nxt is not None:
                nxt.cancel()

    def _event(self, result: Scan | Fault) -> Read | ReadFault:
        if isinstance(result, Fault):
            return ReadFault(self.name, result.reason)
        return Read(
            device=self.name,
            kind="barcode",
            data={"text": result.text},
            captured_at=datetime.fromtimestamp(result.ended, UTC),
        )

    async def feedback(
        self, event: Read | ReadFault, accepted: bool, *, alarm: bool = False
    ) -> None:
        """No back channel on a keyboard-mode scanner: the kiosk event is the feedback.

        The supervisor emits `read_accepted` / `read_rejected` to its listeners after
        the commit; the local API turns those into the kiosk's OK / rescan message.
        """


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception as e:
        log.debug("ignored: %s", e)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)} {e.strerror or ''}".strip()
    return str(e) or type(e).__name__
