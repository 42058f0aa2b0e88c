"""Regenerate the evtest captures in this directory (run from the repository root).

They are synthesized, not recorded from hardware: the key events a scanner set to
the given layout sends, shaped as usbhid reports them (MSC_SCAN + EV_KEY per changed
key, SYN_REPORT per HID report) and printed exactly as `evtest` prints them.
The tests assert literal expected texts, not this generator's input.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # tests.support

from agent.keymap import (
    EV_KEY,
    EV_MSC,
    EV_SYN,
    HID_USAGE,
    KEYS,
    KeyEvent,
    format_evtest,
    type_text,
)
from tests.support.hid import evtest_header

HERE = Path(__file__).parent
GS = "\x1d"
SCANS = [
    "111122410000012345",
    "]C101049123456789041726123110LOT-A1" + GS + "21SN42",
    "A-1/b_2:c@d[e]f\\g'h\"i=j+k&l*m(n)o!p#q$r%s^t~u`v|w{x}y<z>?,.;",
    "4901234567894",
]


def scans(layout: str, start: float, texts: list[str], gap: float = 0.8) -> list[KeyEvent]:
    events: list[KeyEvent] = []
    t = start
    for i, text in enumerate(texts):
        evs = type_text(text, layout, start=t, hold_shift=i % 2 == 0)
        events += evs
        t = evs[-1].time + gap
    return events


def press(t: float, code: int, value: int) -> list[KeyEvent]:
    return [
        KeyEvent(t, EV_MSC, 4, 0x70000 | HID_USAGE.get(code, 0)),
        KeyEvent(t, EV_KEY, code, value),
        KeyEvent(t, EV_SYN, 0, 0),
    ]


def tap(t: float, name: str, step: float = 0.002) -> tuple[list[KeyEvent], float]:
    code = KEYS[name]
    return press(t, code, 1) + press(t + step, code, 0), t + 2 * step


def numpad_capture(start: float) -> list[KeyEvent]:
    """Numpad digits, then a GS1 code whose GS is Alt+0029 (Alt held, numpad 0 0 2 9)."""
    events: list[KeyEvent] = []
    t = start
    for name in [f"KEY_KP{d}" for d in "4901234567894"] + ["KEY_KPENTER"]:
        evs, t = tap(t, name)
        events += evs
    t += 0.9
    for d in "0104912345678904":
        evs, t = tap(t, f"KEY_KP{d}")
        events += evs
    for name in ["KEY_1", "KEY_0", "KEY_A", "KEY_B"]:
        evs, t = tap(t, name)
        events += evs
    events += press(t, KEYS["KEY_LEFTALT"], 1)
    t += 0.002
    for d in "0029":
        evs, t = tap(t, f"KEY_KP{d}")
        events += evs
    events += press(t, KEYS["KEY_LEFTALT"], 0)
    t += 0.002
    for name in ["KEY_2", "KEY_1", "KEY_7", "KEY_KPENTER"]:
        evs, t = tap(t, name)
        events += evs
    return events


def write(name: str, header: str, events: list[KeyEvent]) -> None:
    (HERE / name).write_text(header + format_evtest(events), encoding="utf-8")


def main() -> None:
    t0 = 1_763_795_000.0
    write(
        "us-zebra-ds2208.txt",
        evtest_header("Symbol Technologies, Inc, 2008 Symbol Bar Code Scanner", 0x5E0, 0x1200),
        scans("us", t0, SCANS),
    )
    write(
        "jp106-opticon.txt",
        evtest_header("OPTICON USB Keyboard", 0x65A, 0x0001),
        scans("jp106", t0 + 100, SCANS),
    )
    # a scan cut off (no terminator, then 3 s of silence), a good one, and one cut off by EOF
    cut = type_text("12345", "us", start=t0 + 200, terminator=None)
    good = type_text("4901234567894", "us", start=cut[-1].time + 3.0)
    tail = type_text("9876", "us", start=good[-1].time + 1.0, terminator=None)
    write(
        "us-cutoff.txt", evtest_header("Generic Barcode Scanner", 0x1234, 0x5678), cut + good + tail
    )
    # a person typing "hello" at 150 ms per report, then a real scan
    human = type_text("hello", "us", start=t0 + 300, report_interval=0.15)
    scan = type_text("4901234567894", "us", start=human[-1].time + 2.0)
    write("us-human-typing.txt", evtest_header("USB Keyboard", 0x413C, 0x2107), human + scan)
    write(
        "numpad-altcode.txt",
        evtest_header("Datalogic Gryphon", 0x5F9, 0x2206),
        numpad_capture(t0 + 400),
    )


if __name__ == "__main__":
    main()
