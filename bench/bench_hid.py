"""HID scanner path figures: decoder and evtest parsing throughput, driver latency.

Run: PYTHONPATH=. python bench/bench_hid.py   (no hardware: a fake evdev device
feeds the real driver, as in tests/drivers/test_hid_driver.py)
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support

from agent.drivers.hid import HidDriver  # noqa: E402
from agent.keymap import (  # noqa: E402
    Decoder,
    Scan,
    decode,
    format_evtest,
    parse_evtest,
    type_text,
)
from agent.testing import FakeBackend, FakeInputDevice  # noqa: E402
from tests.support.hid import hid_config  # noqa: E402

GS1 = "]C101049123456789041726123110LOT-A1\x1d21SN42"  # 42 chars, shift and GS


def bench_decoder(layout: str, scans: int) -> None:
    one = type_text(GS1, layout)
    events = []
    for i in range(scans):
        shift = i * 0.2
        events += [type(e)(e.time + shift, e.type, e.code, e.value) for e in one]
    t0 = time.perf_counter()
    got = sum(1 for r in decode(events, Decoder(layout)) if isinstance(r, Scan))
    dt = time.perf_counter() - t0
    assert got == scans
    print(
        f"decoder {layout:5}: {scans} scans of {len(GS1)} chars, {len(events)} events in "
        f"{dt:.2f} s = {len(events) / dt:,.0f} events/s, {dt / scans * 1e6:.0f} us/scan"
    )


def bench_parse(scans: int) -> None:
    text = format_evtest(
        [e for i in range(scans) for e in type_text(GS1, "us", start=1_700_000_000 + i)]
    )
    lines = text.splitlines()
    t0 = time.perf_counter()
    n = sum(1 for _ in parse_evtest(lines))
    dt = time.perf_counter() - t0
    rate = n / dt
    print(f"evtest parse: {len(lines):,} lines -> {n:,} events in {dt:.2f} s = {rate:,.0f} lines/s")


async def bench_driver(scans: int) -> None:
    dev = FakeInputDevice("/dev/input/event0")
    drv = HidDriver(hid_config(), backend=FakeBackend(dev), hotplug=None)
    one = type_text(GS1, "us")
    lat, whole = [], []
    async with drv:
        reads = drv.reads()
        for _ in range(scans):
            dev.push(one[:-6])  # all but the terminator's press and release
            pending = asyncio.ensure_future(anext(reads))
            await dev.queue.join()  # the driver took every key of the scan
            for _ in range(3):
                await asyncio.sleep(0)
            t0 = time.perf_counter()
            dev.push(one[-6:])
            event = await pending
            lat.append(time.perf_counter() - t0)
            assert event.data["text"] == GS1  # type: ignore[union-attr]
        for _ in range(scans):
            t0 = time.perf_counter()
            dev.push(one)
            event = await anext(reads)
            whole.append(time.perf_counter() - t0)
        await reads.aclose()
    lat.sort()
    print(
        f"driver: terminator event -> Read, {scans} scans: median "
        f"{statistics.median(lat) * 1e6:.0f} us, p99 {lat[int(len(lat) * 0.99)] * 1e6:.0f} us"
    )
    whole.sort()
    print(
        f"driver: whole scan ({len(one)} events, fake device) -> Read: median "
        f"{statistics.median(whole) * 1e3:.2f} ms, p99 {whole[int(len(whole) * 0.99)] * 1e3:.2f} ms"
    )


def main() -> None:
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpu(s), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
    bench_decoder("us", 5000)
    bench_decoder("jp106", 5000)
    bench_parse(1000)
    asyncio.run(bench_driver(2000))


if __name__ == "__main__":
    main()
