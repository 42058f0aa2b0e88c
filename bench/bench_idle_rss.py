"""Idle RSS of a running agent with every driver family configured, devices absent
(issue #18, point 3).

    .venv/bin/python bench/bench_idle_rss.py [--rounds 3] [--root DIR]

The devices of `bench/run.py`'s footprint (a serial scanner on a pty, a HID scanner,
a PC/SC reader and a camera whose device nodes do not exist), a broker, no registry.
RSS (VmRSS) 6 s after start, and the hardware libraries with native code that are
mapped into the process. `--root` runs another checkout's code: the "before" figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import core_bench as core  # noqa: E402
from run import config, serial_device  # noqa: E402

from agent.testing import AgentProcess, Broker, Pty  # noqa: E402

DEVICES = (
    '\n[[devices]]\nname = "hid-scanner"\nprofile = "generic-hid-scanner-us"\n'
    'path = "/dev/input/by-id/usb-none-event-kbd"\nhotplug_wait_s = 60\n'
    '\n[[devices]]\nname = "card-reader"\nprofile = "generic-pcsc-reader"\n'
    'reader = "Bench Reader *"\n'
    '\n[[devices]]\nname = "camera"\nprofile = "generic-uvc-webcam"\n'
    'device = "/dev/video-bench-none"\n'
)


async def one(broker: Broker, workdir: Path, root: Path, i: int) -> dict[str, object]:
    name = f"idle{i}"
    pty = Pty(workdir / f"tty-{name}")
    cfg = config(workdir, broker.port, name, serial_device(pty.link) + DEVICES)
    agent = AgentProcess(cfg, workdir / f"{name}.log", cwd=root)
    agent.start()
    try:
        await asyncio.sleep(6)
        agent.check_running()
        rss = core.proc_rss(agent.pid)
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
    finally:
        agent.stop()
        pty.close()
    libs = [lib for lib in ("serial", "evdev", "smartcard", "zxingcpp", "numpy") if lib in maps]
    return {"rss_mb": rss / 1e6, "native_libs": libs}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}"
    )
    print(f"agent code: {args.root}")
    core.compile_code(args.root)
    with tempfile.TemporaryDirectory(prefix="bench-idle-", dir=os.environ.get("BENCH_DIR")) as d:
        workdir = Path(d)
        (workdir / "broker").mkdir()
        broker = Broker(workdir / "broker")
        broker.start()
        try:
            res = []
            for i in range(args.rounds):
                res.append(await one(broker, workdir, args.root, i))
                print(f"round {i}: {res[-1]}", flush=True)
                time.sleep(0.2)
        finally:
            broker.stop()
    vals = [float(r["rss_mb"]) for r in res]  # type: ignore[arg-type]
    print(
        f"idle RSS: median {statistics.median(vals):.1f} MB"
        f" (min {min(vals):.1f}, max {max(vals):.1f})"
    )


if __name__ == "__main__":
    asyncio.run(main())
