"""Backlog drain over a WAN round trip: one message in flight against a window (#18, point 5).

    .venv/bin/python bench/bench_wan.py [--records 20000] [--delay-ms 25] [--windows 1,4,8]

A real agent process drains a pre-filled outbox to the reference registry (in this
process) through `LatencyLink` (agent/testing.py): every chunk is delayed `delay-ms`
each way, a 2 x delay round trip. This kernel has no netem (CONFIG_NET_SCH_NETEM is
off), so there is no packet loss here, only delay. Each window size drains the same
copy of the backlog; the rate is records stored by the registry per second, from the
first record stored to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import fill, serial_device  # noqa: E402

from agent.testing import (  # noqa: E402
    AgentProcess,
    Broker,
    LatencyLink,
    Pty,
    running_registry,
    write_config,
)


async def one(broker: Broker, work: Path, seed: Path, n: int, delay: float, window: int) -> float:
    name = f"wan{window}"
    pty = Pty(work / f"tty-{name}")
    times: list[float] = []
    async with (
        LatencyLink(broker.port, delay) as link,
        running_registry(
            broker.port,
            work / f"registry-{name}.db",
            on_stored=lambda s: times.append(time.perf_counter()) if s.new else None,
        ) as reg,
    ):
        cfg = write_config(
            work,
            link.port,
            devices=serial_device(pty.link),
            site="bench-site",
            name=name,
            data_dir=work / name,
            telemetry_interval_s=None,
            mqtt=f"backoff_max_s = 2\ninflight_messages = {window}",
            outbox="resend_after_s = 600",
        )
        (work / name).mkdir()
        shutil.copy(seed, work / name / "outbox.db")
        agent = AgentProcess(cfg, work / f"{name}.log")
        agent.start()
        try:
            await reg.wait_for(n, timeout=600)
        finally:
            agent.close()
            pty.close()
    return (n - 1) / (times[-1] - times[0])


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--delay-ms", type=float, default=25.0)
    ap.add_argument("--windows", default="1,4,8")
    args = ap.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    with tempfile.TemporaryDirectory(prefix="madoguchi-wan-") as tmp:
        work = Path(tmp)
        seed = work / "seed.db"
        await fill(seed, args.records)
        (work / "broker").mkdir()
        broker = Broker(work / "broker")
        broker.start()
        try:
            rates = {
                w: await one(broker, work, seed, args.records, args.delay_ms / 1000, w)
                for w in windows
            }
        finally:
            broker.stop()
    print(
        f"WAN drain, {args.records} records, {args.delay_ms:.0f} ms each way "
        f"({2 * args.delay_ms:.0f} ms RTT), batch 500, {platform.machine()} "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    for w, r in rates.items():
        print(f"  inflight_messages = {w}: {r:,.0f} records/s ({r / rates[windows[0]]:.1f}x)")


if __name__ == "__main__":
    asyncio.run(main())
