"""HID test helpers: recorded captures, device configs, evtest headers.

The fakes at the python-evdev boundary (no /dev/uinput on CI) are in
agent/testing.py: `FakeInputDevice`, `FakeBackend`, `FakeWatch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.config import HidDevice
from agent.config_schema import validate_device
from agent.keymap import KEYS

DATA = Path(__file__).resolve().parents[1] / "data" / "hid"


def hid_config(**overrides: Any) -> HidDevice:
    base: dict[str, Any] = {
        "name": "counter-scanner",
        "profile": "generic-hid-scanner-us",
        "driver": "hid",
        "vendor_id": 0x05E0,
        "product_id": 0x1200,
    }
    return validate_device({**base, **overrides}, HidDevice)


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
