"""Test tools for madoguchi, public so that a deployment can test itself (as structlog
ships `structlog.testing`): fakes that stand at the driver seams, and a harness of real
parts on loopback (mosquitto, the registry, an agent process, a pty as a scanner's
serial port) written once for the tests, the benchmarks and `madoguchi demo`.

Importing this module needs only the standard library and the agent's own
dependencies; pytest is never imported here. Only the demo (agent/cli/demo.py) imports
it; no wing does.

Fakes: each stands at one seam and is declared against the same Protocol as the
real implementation, and mypy --strict checks both, so a fake cannot drift from
the device it stands for without the type check failing.
tests/drivers/test_capabilities.py compares their signatures at run time, and
tests/drivers/test_fakes.py checks that each behaves like the real thing (the
card reader fake against the real driver on an emulated card).

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
import contextlib
import dataclasses
import errno
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

import aiomqtt

from agent.central.registry import Registry, Stored
from agent.config import Config, DeviceConfig, load_config
from agent.contract.records import Read, ReadFault
from agent.drivers.base import Driver
from agent.drivers.camera import Frame, FrameSource, Still, encode_jpeg
from agent.drivers.capabilities import CardInfoProvider, PhotoCamera
from agent.drivers.card import MIN_TRIES, CardInfo
from agent.drivers.hid import Backend, HotplugWatch, InputDeviceLike
from agent.errors import CardError, DeviceUnavailable, HarnessError, PinRefused
from agent.keymap import KEYS, KeyEvent
from agent.station.app import StationApp
from agent.station.trial_clock import Clocks
from agent.station.uplink import Resolver

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

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


class FakeClocks:
    """The clocks of a trial (agent/station/trial_clock.py) that the test moves: `advance`
    lets time pass on both, `step_wall` is NTP stepping the wall clock alone, `reboot`
    starts a new boot (CLOCK_BOOTTIME from 0, a new boot id)."""

    def __init__(self, wall: float = 1_000_000.0) -> None:
        self.now = wall
        self.since_boot = 100.0
        self.boot = "boot-1"

    def wall(self) -> float:
        return self.now

    def boottime(self) -> float:
        return self.since_boot

    def boot_id(self) -> str | None:
        return self.boot

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.since_boot += seconds

    def step_wall(self, seconds: float) -> None:
        self.now += seconds

    def reboot(self, wall_step: float = 0.0) -> None:
        self.boot = f"boot-{int(self.boot.split('-')[1]) + 1}"
        self.since_boot = 5.0
        self.now += wall_step


#: each fake against the Protocol of the real implementation: mypy --strict fails on a drift
_card_reader: type[CardInfoProvider] = FakeCardReader
_photo_camera: type[PhotoCamera] = FakePhotoCamera
_frame_source: type[FrameSource] = FakeCamera
_input_device: type[InputDeviceLike] = FakeInputDevice
_backend: type[Backend] = FakeBackend
_watch: type[HotplugWatch] = FakeWatch
_clocks: type[Clocks] = FakeClocks

#: seam -> (Protocol, fake), for tests/drivers/test_capabilities.py
FAKES: dict[str, tuple[type[Any], type[Any]]] = {
    "card reader": (CardInfoProvider, FakeCardReader),
    "photo camera": (PhotoCamera, FakePhotoCamera),
    "frame source": (FrameSource, FakeCamera),
    "input device": (InputDeviceLike, FakeInputDevice),
    "evdev backend": (Backend, FakeBackend),
    "hotplug watch": (HotplugWatch, FakeWatch),
    "trial clocks": (Clocks, FakeClocks),
}


# -- harness ------------------------------------------------------------------------------
# Real parts on loopback. Readiness is an event wherever one exists: mosquitto's
# sd_notify READY=1 on a socket of ours, a process's exit on its pidfd, a log line as
# our own thread hands it over, a pty byte through select() or the event loop.

LOOPBACK = "127.0.0.1"


_PICK = random.SystemRandom()  # not `random`'s global state, which hypothesis seeds


def _below_ephemeral() -> tuple[int, int]:
    """The ports from 10000 to just below the kernel's ephemeral range: a connection's
    local port is taken from that range, so one made between the pick and the server's
    bind can hold a port picked there (a RabbitMQ node failed to boot that way)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return 10000, low - 1


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now, below the ephemeral range where the
    kernel has one (else its own pick)."""
    first, last = _below_ephemeral()
    for _ in range(200 if last - first >= 1000 else 0):
        port = _PICK.randint(first, last)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    """The mosquitto executable (Debian installs it in /usr/sbin, often not on PATH)."""
    for c in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if c and os.access(c, os.X_OK):
            return c
    raise HarnessError("mosquitto is not installed: run `make setup` (apt install mosquitto)")


class NotifySocket:
    """A `$NOTIFY_SOCKET` of our own, as systemd holds it, to hear a daemon's READY=1.

    In the abstract namespace: a daemon that dropped its privileges (mosquitto
    started as root becomes the mosquitto user) can still reach it.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"madoguchi-harness-{uuid.uuid4().hex}"
        self.sock.bind(b"\0" + name.encode())
        self.address = "@" + name

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "NOTIFY_SOCKET": self.address}

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> bool:
        """True on READY=1; False if the process exited first or the time ran out."""
        pidfd = os.pidfd_open(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([self.sock.fileno(), pidfd], [], [], remaining)
                if self.sock.fileno() in readable:
                    if b"READY=1" in self.sock.recv(4096).split(b"\n"):
                        return True
                elif pidfd in readable:
                    return False
            return False
        finally:
            os.close(pidfd)

    def close(self) -> None:
        self.sock.close()


def start_mosquitto(
    conf: Path,
    port: int,
    log: Path | None = None,
    *,
    own_session: bool = False,
    stdout: int | IO[bytes] = subprocess.DEVNULL,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """`mosquitto -c conf`, returned once it listens; HarnessError (with what mosquitto
    said, and its log file if given) if it exits or never gets ready.

    Debian's mosquitto is built with systemd support and sends READY=1 after opening its
    listeners; a build without it is accepted if the port answers once the wait is over.
    `own_session` keeps a terminal's Ctrl-C away from it (the demo stops it last).
    """
    notify = NotifySocket()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)],
            stdout=stdout,
            stderr=err,
            env=notify.env(),
            start_new_session=own_session,
        )
        try:
            ready = notify.wait_ready(proc, timeout)
        finally:
            notify.close()
        if ready or (proc.poll() is None and _listens(port)):
            return proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            raise HarnessError(f"mosquitto did not listen on {LOOPBACK}:{port}")
        err.seek(0)
        said = err.read().decode(errors="replace")
    text = log.read_text(errors="replace") if log is not None and log.exists() else ""
    raise HarnessError(f"mosquitto exited {proc.returncode}: {said}{text}")


def stop_mosquitto(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM until it exits; its exit code. mosquitto 2.0 sends READY=1 just before it
    sets its `run` flag, so a SIGTERM right after READY=1 is lost: it is sent again."""
    deadline = time.monotonic() + timeout
    while True:
        proc.terminate()
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                raise HarnessError("mosquitto did not stop on SIGTERM") from None


def _listens(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


class Broker:
    """A real mosquitto on a free loopback port; `stop()`/`kill()` and `start()` again on
    the same port. Anonymous, TCP_NODELAY; persistence and a full log in `directory`
    unless told otherwise; `settings` are appended to the config as they are."""

    def __init__(
        self,
        directory: Path,
        *,
        persistence: bool = True,
        log: bool = True,
        settings: str = "max_queued_messages 1000000\n",  # as provisioning/broker/madoguchi.conf
        own_session: bool = False,
    ) -> None:
        self.workdir = directory
        self.port = free_port()
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        lines = [f"listener {self.port} {LOOPBACK}", "allow_anonymous true"]
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/"]
        else:
            lines += ["persistence false"]
        lines += [f"log_dest file {self.log}", "log_type all"] if log else ["log_dest none"]
        lines += ["set_tcp_nodelay true"]
        self.conf.write_text("\n".join(lines) + "\n" + settings)

    def start(self) -> None:
        self.proc = start_mosquitto(self.conf, self.port, self.log, own_session=self.own_session)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_mosquitto(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


class Pty:
    """A pseudo-terminal as a scanner's serial port: the agent opens `link`, the caller
    holds the scanner's side (writes scans, reads the ACK / NAK bytes)."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.device = os.ttyname(self.slave)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.device)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def scan(self, text: str, terminator: bytes = b"\r") -> None:
        self.write(text.encode() + terminator)

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """Up to n bytes written back by the agent, waiting at most `timeout` for them."""
        out = b""
        deadline = time.monotonic() + timeout
        while len(out) < n and (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.master], [], [], remaining)
            if not readable:
                break
            with contextlib.suppress(BlockingIOError):
                out += os.read(self.master, n - len(out))
        return out

    async def aread(self, n: int, timeout: float = 10.0) -> bytes:  # noqa: ASYNC109
        """As `read`, woken by the event loop (no thread, no sleeping)."""
        loop = asyncio.get_running_loop()
        out = bytearray()
        done = loop.create_future()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                out.extend(os.read(self.master, n - len(out)))
            if len(out) >= n and not done.done():
                done.set_result(None)

        loop.add_reader(self.master, readable)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done, timeout)
        finally:
            loop.remove_reader(self.master)
        return bytes(out)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()


def serial_scanner(
    port: Path | str,
    *,
    name: str = "ticket-scanner",
    host_ack: str | None = "\\u0006",
    host_nak: str | None = "\\u0015",
    extra: str = "",
) -> str:
    """A `[[devices]]` block for a generic serial scanner on `port` (TOML escapes as given)."""
    block = f"""
[[devices]]
name = "{name}"
profile = "generic-serial-scanner"
port = "{port}"
"""
    if host_ack is not None:
        block += f'host_ack = "{host_ack}"\n'
    if host_nak is not None:
        block += f'host_nak = "{host_nak}"\n'
    return block + extra


def write_config(
    directory: Path,
    port: int,
    *,
    devices: str | None = None,
    scanner: Path | None = None,
    outbox: str = "resend_after_s = 30",
    extra_agent: str = "",
    name: str = "station-03",
    site: str = "toda-city-hall-1f",
    telemetry_interval_s: float | None = 1,
    mqtt: str = "backoff_max_s = 1",
    path: Path | None = None,
    data_dir: Path | None = None,
) -> Path:
    """An agent.toml for a station on the loopback broker at `port`; returns its path
    (`directory/{name}.toml` unless `path` is given).

    `devices` is TOML as it is; without it, one serial scanner on `scanner` that ACKs
    and NAKs. Data go to `directory/data-{name}` unless `data_dir` is given.
    """
    if devices is None:
        if scanner is None:
            raise ValueError("write_config needs devices or a scanner")
        devices = serial_scanner(scanner)
    path = path or directory / f"{name}.toml"
    data_dir = data_dir or directory / ("data-" + name)
    telemetry = (
        "" if telemetry_interval_s is None else f"telemetry_interval_s = {telemetry_interval_s}"
    )
    path.write_text(f"""
[agent]
site = "{site}"
name = "{name}"
data_dir = "{data_dir}"
{telemetry}
{extra_agent}

[mqtt]
host = "{LOOPBACK}"
port = {port}
{mqtt}

[outbox]
{outbox}
{devices}
""")
    return path


class StaticResolver:
    """A `Resolver` (agent/station/uplink.py) from a table: a broker name with several
    addresses without touching /etc/hosts; names not in the table resolve to themselves.
    Records every lookup in `asked`."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return list(self.table.get(host, [host]))


def _a_resolver(r: StaticResolver) -> Resolver:
    return r  # mypy holds the fake to the uplink's Protocol


def with_brokers(config: Path, brokers: list[str], extra: str = "") -> Path:
    """A `write_config` file changed to `[mqtt] hosts = brokers` (and `extra` keys)."""
    text = config.read_text()
    start = text.index(f'host = "{LOOPBACK}"')
    end = text.index("\n", text.index("port = ", start))
    listed = ", ".join(f'"{b}"' for b in brokers)
    config.write_text(text[:start] + f"hosts = [{listed}]\n{extra}" + text[end + 1 :])
    return config


class RegistryProbe:
    """The reference registry in this process, with what it stored (`keep=False`: nothing
    kept, `stored` stays empty)."""

    def __init__(self, registry: Registry, *, keep: bool = True) -> None:
        self.registry = registry
        self.stored: list[Stored] = []
        self.changed = asyncio.Event()
        self.keep = keep

    def on_stored(self, s: Stored) -> None:
        if self.keep:
            self.stored.append(s)
        self.changed.set()

    @property
    def new(self) -> list[dict[str, Any]]:
        return [s.record for s in self.stored if s.new]

    async def wait_for(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:  # noqa: ASYNC109
        """The first n records new to the registry, once it has stored them."""
        if not self.keep:
            raise HarnessError("this probe keeps nothing (keep=False): count in on_stored")

        async def until() -> None:
            while len(self.new) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)
        return self.new


class LatencyLink:
    """A TCP link with a one-way delay, between a client and `target_port` on loopback:
    a WAN round trip where the kernel has no netem (CONFIG_NET_SCH_NETEM off here).
    Every chunk read is written to the other side `delay_s` later, in order. It counts
    client->server chunks and the most bytes in flight at once, so a test can see a
    window of messages on the link. `async with` listens on `port`.

    `loss` models packet loss as TCP shows it to the application (a relay cannot drop
    bytes: TCP would resend them): each chunk is cut into `mss`-byte segments, each lost
    with probability `loss`, and a chunk with a lost segment is held one retransmission
    timeout longer (`rto_s`, Linux's 200 ms minimum, plus the round trip), everything
    behind it waiting too (head-of-line blocking). Pessimistic: a real stack often
    recovers in one round trip by fast retransmit. `lost_segments` counts them."""

    def __init__(
        self,
        target_port: int,
        delay_s: float,
        *,
        host: str = LOOPBACK,
        loss: float = 0.0,
        rto_s: float = 0.2,
        mss: int = 1448,
        seed: int | None = None,
    ) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.host = host
        self.loss = loss
        self.rto_s = rto_s
        self.mss = mss
        self.lost_segments = 0
        self._random = random.Random(seed)
        self.port = 0
        self.bytes_up = 0  # client -> server bytes, in all
        self.in_flight_up = 0  # client -> server bytes read and not yet written on
        self.max_in_flight_up = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.create_task(self._pump(reader, up_w, up=True), name="link-up"),
            asyncio.create_task(self._pump(up_r, writer, up=False), name="link-down"),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in pumps:
                t.cancel()
                self._tasks.discard(t)
            writer.close()
            up_w.close()

    def _lost_delay(self, chunk: bytes) -> float:
        if not self.loss or not chunk:
            return 0.0
        segments = -(-len(chunk) // self.mss)
        lost = sum(self._random.random() < self.loss for _ in range(segments))
        self.lost_segments += lost
        return lost * (self.rto_s + 2 * self.delay_s)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if chunk == b"":
                    writer.write_eof()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(chunk)
                if up:
                    self.in_flight_up -= len(chunk)
                await writer.drain()

        sender = asyncio.create_task(deliver(), name="link-deliver")
        try:
            while True:
                chunk = await reader.read(65536)
                if up and chunk:
                    self.bytes_up += len(chunk)
                    self.in_flight_up += len(chunk)
                    self.max_in_flight_up = max(self.max_in_flight_up, self.in_flight_up)
                queue.put_nowait((loop.time() + self.delay_s + self._lost_delay(chunk), chunk))
                if not chunk:
                    break
            await sender
        finally:
            sender.cancel()


@contextlib.asynccontextmanager
async def running_registry(
    port: int,
    db: Path,
    *,
    host: str = LOOPBACK,
    on_stored: Callable[[Stored], object] | None = None,
    connect_timeout_s: float = 10.0,
    keep: bool = True,
    **options: Any,
) -> AsyncIterator[RegistryProbe]:
    """The reference registry running in this loop, yielded once it is connected;
    `on_stored` is called for each stored record as well as the probe. `options`
    go to `Registry` as they are (client_id, tls_context, ...).

    `keep=False` for a benchmark: a probe that keeps every record stored made a hosted
    registry cost 17.6 µs of this process's CPU per record drained instead of 10.1
    (memory and garbage collection), and the drain 43,000 records/s instead of 64,000."""
    probe: RegistryProbe

    def stored(s: Stored) -> None:
        probe.on_stored(s)
        if on_stored is not None:
            on_stored(s)

    reg = Registry(host, port, db, on_stored=stored, **options)
    probe = RegistryProbe(reg, keep=keep)
    async with reg:
        task = asyncio.create_task(reg.run(), name="harness-registry")
        try:
            connected = asyncio.create_task(reg.connected.wait())
            await asyncio.wait(
                {task, connected}, timeout=connect_timeout_s, return_when="FIRST_COMPLETED"
            )
            connected.cancel()
            if task.done():
                task.result()  # the registry's own error
                raise HarnessError("the registry stopped before it connected")
            if not reg.connected.is_set():
                raise HarnessError(f"the registry did not connect to {host}:{port}")
            yield probe
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RunningStation:
    """A station running in this loop (see `running_station`)."""

    def __init__(self, station: StationApp, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.station = station
        self.stop = stop
        self.task = task

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


@contextlib.asynccontextmanager
async def running_station(config: Config | Path) -> AsyncIterator[RunningStation]:
    """The station in this loop, yielded once it is ready and a device is connected."""
    cfg = load_config(config) if isinstance(config, Path) else config
    station = StationApp(cfg)
    connected = asyncio.Event()
    station.subscribe(
        lambda kind, body: (
            connected.set() if kind == "device_state" and body["state"] == "connected" else None
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop), name="harness-station")
    await asyncio.wait_for(station.ready.wait(), 10)
    if cfg.devices:
        await asyncio.wait_for(connected.wait(), 10)
    running = RunningStation(station, stop, task)
    try:
        yield running
    finally:
        if not task.done():
            await running.shutdown()


class LoggedProcess:
    """A child process whose stdout and stderr a thread of ours appends to `log`, so
    that waiting for a line is waiting for an event, not re-reading a file on a timer.
    Started again, it appends to the same log."""

    what = "process"

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._eof = True
        self._started_at = 0  # the log's length when this run started
        self._changed = threading.Condition()

    def start(self) -> None:
        self._started_at = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
        )
        assert self.proc.stdout is not None
        self._eof = False
        self._pump = threading.Thread(
            target=self._copy, args=(self.proc.stdout,), name=f"log-{self.what}", daemon=True
        )
        self._pump.start()

    def _copy(self, pipe: IO[bytes]) -> None:
        with pipe, self.log.open("ab") as out:
            while chunk := os.read(pipe.fileno(), 65536):
                out.write(chunk)
                out.flush()
                with self._changed:
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.what} not started"
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_connected(self, device: str = "ticket-scanner", timeout: float = 15.0) -> None:
        """Until this run's log says `device` is connected (its driver's open() has
        returned) as many times as the station loop has started in it (a configuration
        applied restarts the loop and reopens the port). A serial port's input is flushed
        inside open(), after the port is already held open: a scan typed before may never
        be read."""
        starts = self.text()[self._started_at :].count(" running with ")
        self.wait_log(f"{device}: connected", timeout=timeout, count=max(1, starts), this_run=True)

    def wait_log(
        self, needle: str, timeout: float = 15.0, count: int = 1, *, this_run: bool = False
    ) -> None:
        """Until the log holds `needle` `count` times (in this run only, if `this_run`);
        HarnessError with the log if the process exits first or the time runs out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                text = self.text()
                if (text[self._started_at :] if this_run else text).count(needle) >= count:
                    return
                if self._eof:
                    code = None if self.proc is None else self.proc.wait()
                    raise HarnessError(f"{self.what} exited {code}:\n{self.text()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"{self.what} never logged {needle!r} x{count}:\n{self.text()}"
                    )
                self._changed.wait(remaining)

    def check_running(self) -> None:
        """HarnessError with the end of the log if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            self._join()
            tail = self.text()[-2000:]
            raise HarnessError(
                f"{self.what} exited {self.proc.returncode}; end of {self.log}:\n{tail}"
            )

    def _join(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=10)

    def signal(self, sig: int) -> int:
        """Send `sig` and wait for the exit; the exit code (the log is complete then)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self._join()
        return code

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._join()

    def close(self) -> None:
        """SIGKILL if still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._join()


class AgentProcess(LoggedProcess):
    """`python -m agent run --config ...` as a real process (for kill -9 and signals)."""

    what = "agent"

    def __init__(
        self, config: Path, log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        super().__init__(
            [sys.executable, "-m", "agent", "run", "--config", str(config)], log, env=env, cwd=cwd
        )
        self.config = config


class RegistryProcess(LoggedProcess):
    """`python -m agent registry ...` as a real process, so that it can be killed -9."""

    what = "registry"

    def __init__(
        self, port: int, db: str | Path, log: Path, *extra: str, host: str = LOOPBACK
    ) -> None:
        argv = [sys.executable, "-m", "agent", "registry", "--host", host, "--port", str(port)]
        super().__init__([*argv, "--db", str(db), *extra], log)
        self.port = port
        self.db = db
        self.extra = list(extra)

    def wait_log(
        self, needle: str, timeout: float = 20.0, count: int = 1, *, this_run: bool = False
    ) -> None:
        super().wait_log(needle, timeout, count, this_run=this_run)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until this run has subscribed (it logs `registry consuming` then)."""
        self.wait_log("registry consuming", timeout, this_run=True)


async def mqtt_collect(port: int, topic: str, seconds: float) -> list[aiomqtt.Message]:
    """Subscribe and collect what arrives (including retained messages) for a while."""
    out: list[aiomqtt.Message] = []
    async with aiomqtt.Client(LOOPBACK, port) as client:
        await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for m in client.messages:
                out.append(m)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collect(), seconds)
    return out


def payload(m: aiomqtt.Message) -> Any:
    """A message's JSON body."""
    assert isinstance(m.payload, (bytes, bytearray, str))
    return json.loads(m.payload)
