"""`madoguchi card-info --wait`: every insertion and removal until Ctrl-C, like pcsc_scan.

Against a real pcscd with vsmartcard's vpcd reader (tests/support/pcsc.py); the command
runs as a real process and is stopped with SIGINT as a technician's Ctrl-C would.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pcsc import FelicaBadge, MyNumberCard, PcscStack, pcsc_stack

pytestmark = pytest.mark.pcscd
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PcscStack]:
    with pcsc_stack(tmp_path) as st:
        yield st


@pytest.fixture(autouse=True)
def terminal_sigint() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it. A suite started in the background (`make test &`)
    runs with SIGINT ignored, its children inherit that, and the command would never see
    the Ctrl-C; a handler here is reset to the default in each child at exec."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class Lines:
    """stdout of a process, one line at a time, with a deadline (no fixed sleeps)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def next(self, timeout: float = 15) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no line in time"
        line = self.proc.stdout.readline()
        assert line, f"ended early: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return line.rstrip("\n")


def wait_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "card-info", "--wait", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=ROOT,
        env=os.environ.copy(),
    )


def test_every_insertion_and_removal_until_ctrl_c(stack: PcscStack) -> None:
    proc = wait_cli("--reader", stack.reader, "--json")
    try:
        out = Lines(proc)
        assert json.loads(out.next()) | {"time": ""} == {
            "event": "reader_added",
            "reader": stack.reader,
            "time": "",
        }
        stack.slot.insert(MyNumberCard(serial=0xABCDEF))
        inserted = json.loads(out.next())
        assert inserted["event"] == "inserted"
        assert inserted["card"]["card_type"] == "mynumber"
        assert inserted["card"]["auth_cert"]["serial"] == "abcdef"
        stack.slot.remove()
        assert json.loads(out.next())["event"] == "removed"
        stack.slot.insert(FelicaBadge(bytes.fromhex("0101060100000001")))
        again = json.loads(out.next())
        assert (again["event"], again["card"]["card_type"]) == ("inserted", "felica")
        stack.slot.remove()
        assert json.loads(out.next())["event"] == "removed"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_human_lines_and_a_card_present_at_start(stack: PcscStack) -> None:
    stack.slot.insert(MyNumberCard(), wait=True)
    proc = wait_cli("--reader", "Virtual*")
    try:
        out = Lines(proc)
        assert out.next().startswith("waiting for cards in readers matching 'Virtual*'")
        lines = [out.next() for _ in range(3)]  # both vpcd readers, then the card
        assert sum("reader present" in x for x in lines) == 2
        assert any(f"{stack.reader}: card inserted: mynumber, ATR " in x for x in lines), lines
        t0 = time.monotonic()
        stack.slot.remove()
        assert out.next().endswith(f"{stack.reader}: card removed")
        assert time.monotonic() - t0 < 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pcscd_gone_is_one_line(stack: PcscStack) -> None:
    proc = wait_cli("--reader", stack.reader)
    try:
        out = Lines(proc)
        out.next()
        out.next()
        stack.pcscd.kill()
        assert proc.wait(timeout=20) == 2
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "pcscd" in err and err.count("\n") == 1 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
