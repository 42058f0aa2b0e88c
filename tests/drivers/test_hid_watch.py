"""`madoguchi hid-watch DEVICE`: a live scanner decoded like evtest, read-only.

There is no /dev/uinput here: the device is the fake at the python-evdev boundary
(agent.testing.FakeInputDevice), fed the events of real evtest captures.
"""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest

from agent.cli.hidwatch import watch
from agent.cli.main import main
from agent.keymap import EV_KEY, Decoder, parse_evtest
from agent.testing import FakeBackend, FakeInputDevice

DATA = Path(__file__).resolve().parents[1] / "data" / "hid"


def capture(name: str) -> list:  # type: ignore[type-arg]
    return list(parse_evtest((DATA / name).read_text().splitlines()))


async def run_watch(
    dev: FakeInputDevice, *, events: bool = False, layout: str = "us"
) -> tuple[int, str, FakeInputDevice]:
    out = io.StringIO()
    rc = await asyncio.wait_for(
        watch(dev.path, Decoder(layout), FakeBackend(dev), out, events=events), 10
    )
    return rc, out.getvalue(), dev


async def test_scans_from_a_real_capture_are_decoded_and_the_device_is_not_grabbed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dev = FakeInputDevice("/dev/input/event7", name="Zebra DS2208")
    dev.push(capture("us-zebra-ds2208.txt"))
    dev.unplug()
    rc, out, dev = await run_watch(dev)
    lines = out.splitlines()
    assert lines[0].startswith("/dev/input/event7: Zebra DS2208 (usb 05e0:1200), not grabbed")
    scans = [x.split()[1] for x in lines if x.startswith("scan ")]
    assert scans[0] == "111122410000012345"
    assert scans[1] == "]C101049123456789041726123110LOT-A1<1d>21SN42"
    assert scans[-1] == "4901234567894"
    assert not dev.grabbed and dev.closed
    assert rc == 1  # it went away
    assert "device went away (unplugged)" in capsys.readouterr().err


async def test_a_scan_cut_off_is_a_fault_and_events_are_shown() -> None:
    dev = FakeInputDevice("/dev/input/event3")
    events = capture("us-cutoff.txt")
    dev.push(events)
    dev.unplug()
    rc, out, _ = await run_watch(dev, events=True)
    assert rc == 1
    assert "FAULT  no terminator within idle_timeout_ms=500" in out
    keys = [x for x in out.splitlines() if x.startswith("  ")]
    assert len(keys) == sum(1 for e in events if e.type == EV_KEY)
    assert all(re.fullmatch(r"  \d+\.\d{6} KEY_\w+ (down|up|repeat)", x) for x in keys), keys


async def test_an_idle_scanner_mid_scan_faults_without_more_events() -> None:
    dev = FakeInputDevice("/dev/input/event4")
    partial = [e for e in capture("us-zebra-ds2208.txt")][:20]  # a few keys, no Enter
    dev.push(partial)
    task = asyncio.ensure_future(run_watch(dev))
    await asyncio.sleep(1.0)  # longer than idle_timeout_ms=500
    dev.unplug()
    rc, out, _ = await task
    assert "FAULT  no terminator" in out and rc == 1


async def test_not_a_keyboard_and_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    mouse = FakeInputDevice("/dev/input/event9", name="Mouse", keys=[])
    mouse.capabilities = lambda: {0: [0], 2: [0, 1]}  # type: ignore[method-assign]
    rc, _, _ = await run_watch(mouse)
    assert rc == 1 and "sends no key events" in capsys.readouterr().err
    out = io.StringIO()
    rc = await watch("/dev/input/event99", Decoder("us"), FakeBackend(), out)
    assert rc == 1
    assert capsys.readouterr().err.strip() == (
        "hid-watch: /dev/input/event99: No such file or directory"
    )


def test_the_command_on_a_missing_device_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("evdev")
    assert main(["hid-watch", "/dev/input/no-such-event"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/dev/input/no-such-event" in err
    assert "Traceback" not in err
