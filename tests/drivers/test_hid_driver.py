"""The HID driver against a fake evdev device: find, grab, read, unplug, replug, two at once."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.contract.records import Read, ReadFault
from agent.drivers import create_driver
from agent.drivers.hid import HidDriver
from agent.errors import DeviceError, DeviceUnavailable
from agent.keymap import KEYS, type_text
from agent.testing import FakeBackend, FakeInputDevice, FakeWatch
from tests.support.hid import hid_config

GS = "\x1d"


def driver(backend: FakeBackend, **cfg: object) -> HidDriver:
    return HidDriver(hid_config(**cfg), backend=backend, hotplug=None)


async def take(reads: AsyncIterator[Read | ReadFault], n: int) -> list[Read | ReadFault]:
    out = []
    async for event in reads:
        out.append(event)
        if len(out) == n:
            break
    return out


def texts(events: list[Read | ReadFault]) -> list[str]:
    return [e.data["text"] if isinstance(e, Read) else f"FAULT {e.reason}" for e in events]


async def test_reads_scans_grabbed_with_one_read_loop() -> None:
    dev = FakeInputDevice("/dev/input/event7")
    backend = FakeBackend(dev)
    drv = driver(backend)
    async with drv:
        assert dev.grabbed  # nothing reaches the kiosk while the agent reads
        dev.push(type_text("111122410000012345", "us"))
        dev.push(type_text("0104912345678904" + "10AB" + GS + "21X", "us", start=1_700_000_001))
        got = await take(drv.reads(), 2)
        assert texts(got) == ["111122410000012345", "010491234567890410AB\x1d21X"]
        first = got[0]
        assert isinstance(first, Read)
        assert first.device == "counter-scanner" and first.kind == "barcode"
        assert first.captured_at.timestamp() == pytest.approx(1_700_000_000.076)
        await drv.feedback(first, accepted=True)  # no back channel: must simply not fail
    assert not dev.grabbed and dev.closed
    assert dev.read_loops == 1


async def test_idle_timeout_faults_and_keeps_the_pending_read() -> None:
    dev = FakeInputDevice("/dev/input/event3")
    drv = driver(FakeBackend(dev), idle_timeout_ms=50)
    async with drv:
        reads = drv.reads()
        dev.push(type_text("12345", "us", terminator=None))
        [fault] = await take(reads, 1)  # silence after "12345": cut off
        assert isinstance(fault, ReadFault) and "scan cut off" in fault.reason
        dev.push(type_text("4901234567894", "us", start=1_700_000_005))
        [scan] = await take(reads, 1)
        assert texts([scan]) == ["4901234567894"]  # no event lost to the timeout
        await reads.aclose()
    assert dev.read_loops == 1


async def test_unplug_mid_read() -> None:
    dev = FakeInputDevice("/dev/input/event4")
    backend = FakeBackend(dev)
    drv = driver(backend)
    got: list[Read | ReadFault] = []
    async with drv:
        dev.push(type_text("4901234567894", "us"))
        dev.push(type_text("49012", "us", start=1_700_000_003, terminator=None))
        backend.unplug(dev.path)
        with pytest.raises(DeviceUnavailable, match="unplugged"):
            async for event in drv.reads():
                got.append(event)
    assert texts(got)[0] == "4901234567894"
    assert isinstance(got[1], ReadFault) and "went away mid-scan" in got[1].reason
    assert len(got) == 2
    assert dev.closed


async def test_replug_recovers_like_the_supervisor_loop() -> None:
    """Unplug, open fails while it is away, plug again: a new driver reads it."""
    first = FakeInputDevice("/dev/input/event5", uniq="A100")
    backend = FakeBackend(first)
    cfg = {"serial": "A100"}
    drv = driver(backend, **cfg)
    async with drv:
        first.push(type_text("1111", "us"))
        backend.unplug(first.path)
        with pytest.raises(DeviceUnavailable):
            async for _ in drv.reads():
                pass
    with pytest.raises(DeviceUnavailable, match="no input device matches"):
        await driver(backend, **cfg).open()
    again = FakeInputDevice("/dev/input/event9", uniq="A100")  # new node number after replug
    backend.plug(again)
    drv2 = driver(backend, **cfg)
    async with drv2:
        assert again.grabbed
        again.push(type_text("2222", "us"))
        assert texts(await take(drv2.reads(), 1)) == ["2222"]


async def test_replug_seen_at_once_with_a_udev_watch() -> None:
    backend = FakeBackend()
    added = asyncio.Event()
    watch = FakeWatch(added)
    drv = HidDriver(hid_config(hotplug_wait_s=30), backend=backend, hotplug=lambda: watch)
    opening = asyncio.create_task(drv.open())
    await asyncio.sleep(0)
    assert not opening.done()  # waiting for udev, not failing
    dev = FakeInputDevice("/dev/input/event2")
    backend.plug(dev)
    added.set()
    await opening
    assert dev.grabbed and watch.waited == 1
    await drv.close()
    # no udev "add" within hotplug_wait_s: missing, for the supervisor to retry
    lonely = HidDriver(
        hid_config(hotplug_wait_s=0.01),
        backend=FakeBackend(),
        hotplug=lambda: FakeWatch(asyncio.Event()),
    )
    with pytest.raises(DeviceUnavailable):
        await lonely.open()


async def test_two_scanners_at_once_have_independent_shift_state() -> None:
    a = FakeInputDevice("/dev/input/event10", uniq="AAA")
    b = FakeInputDevice("/dev/input/event11", uniq="BBB")
    backend = FakeBackend(a, b)
    da = HidDriver(hid_config(name="left", serial="AAA"), backend=backend, hotplug=None)
    db = HidDriver(
        hid_config(name="right", serial="BBB", layout="jp106"), backend=backend, hotplug=None
    )
    ea = type_text("ABC@DEF", "us", hold_shift=True)  # shift held through the whole scan
    eb = type_text('abc"def', "jp106", hold_shift=False)  # its own shift, for '"' only
    async with da, db:
        # interleave: a's shift goes down, then b types, then a continues
        for i in range(max(len(ea), len(eb))):
            if i < len(ea):
                a.push([ea[i]])
            if i < len(eb):
                b.push([eb[i]])
        async with asyncio.TaskGroup() as tg:
            ta = tg.create_task(take(da.reads(), 1))
            tb = tg.create_task(take(db.reads(), 1))
    assert texts(ta.result()) == ["ABC@DEF"]
    assert texts(tb.result()) == ['abc"def']
    assert ta.result()[0].device == "left" and tb.result()[0].device == "right"
    assert KEYS["KEY_LEFTSHIFT"] in {e.code for e in ea}


async def test_finding_the_scanner() -> None:
    composite = FakeInputDevice("/dev/input/event20", keys=[KEYS["KEY_ENTER"]])  # consumer ctl
    kbd = FakeInputDevice("/dev/input/event21", name="Symbol Bar Code Scanner", uniq="S1")
    other = FakeInputDevice("/dev/input/event22", name="USB Keyboard", vendor=0x413C, product=1)
    backend = FakeBackend(composite, kbd, other)
    for cfg in (
        {},
        {"serial": "S1"},
        {"vendor_id": None, "product_id": None, "name_pattern": "*Bar Code*"},
        {"vendor_id": None, "product_id": None, "path": "/dev/input/event21"},
    ):
        drv = driver(backend, **cfg)
        await drv.open()
        assert drv._device is kbd
        await drv.close()
    with pytest.raises(DeviceUnavailable, match="usb 05e0:1200, serial"):
        await driver(backend, serial="nope").open()
    twin = FakeInputDevice("/dev/input/event23", uniq="S2")
    backend.plug(twin)
    with pytest.raises(DeviceError, match="2 keyboard devices match"):
        await driver(backend).open()
    assert not kbd.grabbed and not twin.grabbed


async def test_grab_refused_is_an_error_not_a_leak() -> None:
    dev = FakeInputDevice("/dev/input/event30", grab_error=errno.EBUSY)
    with pytest.raises(DeviceError, match="grabbed by another program") as info:
        await driver(FakeBackend(dev)).open()
    assert not isinstance(info.value, DeviceUnavailable)
    assert dev.closed


async def test_caps_lock_led_at_open() -> None:
    dev = FakeInputDevice("/dev/input/event31", leds_on=[1])  # LED_CAPSL already on
    drv = driver(FakeBackend(dev))
    async with drv:
        dev.push(type_text("abc", "us"))
        assert texts(await take(drv.reads(), 1)) == ["ABC"]


def test_config_profiles_and_registry(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        """
[agent]
site = "toda-city-hall-1f"
name = "station-03"
[mqtt]
host = "127.0.0.1"
[[devices]]
name = "ticket-scanner"
profile = "zebra-symbol-hid"
layout = "jp106"
[[devices]]
name = "desk-2"
profile = "generic-hid-scanner-jp106"
path = "/dev/input/by-id/usb-OPTICON-event-kbd"
""",
        encoding="utf-8",
    )
    config = load_config(tmp_path / "agent.toml")
    zebra, generic = config.devices
    assert zebra.driver == "hid" and generic.driver == "hid"
    assert (zebra.vendor_id, zebra.product_id, zebra.layout) == (0x05E0, 0x1200, "jp106")
    assert generic.path == "/dev/input/by-id/usb-OPTICON-event-kbd"
    assert isinstance(create_driver(zebra), HidDriver)


@pytest.mark.parametrize(
    "profile",
    [
        p.stem
        for p in (Path(__file__).resolve().parents[2] / "device_profiles").glob("*.toml")
        if "hid" in p.stem
    ],
)
def test_every_hid_profile_validates(tmp_path: Path, profile: str) -> None:
    (tmp_path / "agent.toml").write_text(
        f"""
[agent]
site = "s"
name = "a"
[mqtt]
host = "127.0.0.1"
[[devices]]
name = "d"
profile = "{profile}"
path = "/dev/input/by-id/usb-x-event-kbd"
""",
        encoding="utf-8",
    )
    [dev] = load_config(tmp_path / "agent.toml").devices
    assert dev.driver == "hid"


async def test_station_stores_scans_and_recovers_from_replug(tmp_path: Path) -> None:
    """Fake evdev -> HidDriver -> real supervisor -> real SQLite outbox (no broker needed)."""
    from agent.station.app import StationApp

    (tmp_path / "agent.toml").write_text(
        """
[agent]
site = "toda-city-hall-1f"
name = "station-03"
data_dir = "data"
[mqtt]
host = "127.0.0.1"
port = 9
backoff_max_s = 0.5
[[devices]]
name = "ticket-scanner"
profile = "generic-hid-scanner-jp106"
path = "/dev/input/by-id/usb-OPTICON-event-kbd"
repeat_window_s = 0
""",
        encoding="utf-8",
    )
    config = load_config(tmp_path / "agent.toml")
    path = "/dev/input/by-id/usb-OPTICON-event-kbd"
    first = FakeInputDevice(path)
    backend = FakeBackend(first)
    station = StationApp(
        config, driver_factory=lambda dev: HidDriver(dev, backend=backend, hotplug=None)
    )
    seen: asyncio.Queue[tuple[str, dict[str, object]]] = asyncio.Queue()
    station.subscribe(lambda kind, body: seen.put_nowait((kind, body)))

    async def next_event(kind: str, **match: object) -> dict[str, object]:
        while True:
            k, body = await seen.get()
            if k == kind and all(body.get(key) == v for key, v in match.items()):
                return body

    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(station.run(stop))
        await next_event("device_state", state="connected")
        first.push(type_text("111122410000012345", "jp106"))
        one = await next_event("read_accepted")
        backend.unplug(path)
        await next_event("device_state", state="disconnected")
        second = FakeInputDevice(path)
        backend.plug(second)
        await next_event("device_state", state="connected")
        second.push(type_text("]C10104912345678904" + "10AB@1" + GS + "21X", "jp106"))
        two = await next_event("read_accepted")
        stop.set()
    assert (one["seq"], two["seq"]) == (1, 2)
    assert second.grabbed is False and second.closed
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "outbox.db")
    rows = [r[0] for r in db.execute("SELECT data FROM records ORDER BY seq")]
    assert '"111122410000012345"' in rows[0]
    assert "10AB@1\\u001d21X" in rows[1] or "10AB@1\x1d21X" in rows[1]


async def test_real_evdev_and_udev_on_a_host_without_the_scanner() -> None:
    """python-evdev and pyudev themselves: nothing matches here, so it is 'missing'."""
    pytest.importorskip("evdev")
    drv = HidDriver(hid_config(serial="not-on-this-host", hotplug_wait_s=0.05))
    with pytest.raises(DeviceUnavailable, match="usb 05e0:1200"):
        await drv.open()
    await drv.close()


async def test_udev_watch_starts_waits_and_closes() -> None:
    pytest.importorskip("pyudev")
    from agent.drivers.hid import UdevWatch

    watch = UdevWatch.start()
    if watch is None:
        pytest.skip("no udev netlink socket on this host")
    assert await watch.wait(0.05) is False  # nobody plugged anything in
    watch.close()


def test_hid_config_errors_name_the_entry(tmp_path: Path) -> None:
    from agent.errors import ConfigError

    p = tmp_path / "agent.toml"
    p.write_text(
        """
[agent]
site = "s"
name = "a"
[mqtt]
host = "127.0.0.1"
[[devices]]
name = "nowhere"
profile = "generic-hid-scanner-us"
[[devices]]
name = "bad-keys"
profile = "generic-hid-scanner-jp106"
path = "/dev/input/event3"
terminators = ["KEY_RETURN"]
gs_keys = ["ctrl+¥"]
layout = "dvorak"
[[devices]]
name = "half-ids"
profile = "generic-hid-scanner-us"
product_id = 0x1200
""",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    problems = e.value.problems
    assert any(
        x.startswith(f'{p}: devices["nowhere"].name_pattern: ')
        and "no way to find the scanner" in x
        for x in problems
    )
    terminators = f'{p}: devices["bad-keys"].terminators: '
    assert any(x.startswith(terminators) and "KEY_RETURN" in x for x in problems)
    assert any(x.startswith(f'{p}: devices["bad-keys"].layout: ') for x in problems)
    assert any(
        x.startswith(f'{p}: devices["half-ids"].product_id: ') and "vendor_id" in x
        for x in problems
    )


async def test_cancelling_the_task_stops_reading_and_releases_the_grab() -> None:
    dev = FakeInputDevice("/dev/input/event40")
    drv = driver(FakeBackend(dev))
    started = asyncio.Event()

    async def device_task() -> None:
        async with drv:
            started.set()
            async for _ in drv.reads():
                pass

    task = asyncio.create_task(device_task())
    await started.wait()
    dev.push(type_text("123", "us", terminator=None))  # stopped mid-scan, as on shutdown
    await dev.queue.join()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dev.grabbed and dev.closed
    assert drv._next is None or drv._next.cancelled()


async def test_without_python_evdev_the_driver_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from agent.errors import DriverMissing

    monkeypatch.setitem(sys.modules, "evdev", None)  # import evdev -> ImportError
    with pytest.raises(DriverMissing, match=r"madoguchi\[hid\]"):
        await HidDriver(hid_config(), hotplug=None).open()
