"""Backlog drain over a WAN round trip: one message in flight against a window (#18, point 5).

    .venv/bin/python bench/bench_wan.py [--records 20000] [--delay-ms 25] [--windows 1,8,16,32,auto]
                                        [--loss 0,1]

A real agent process drains a pre-filled outbox to the reference registry (in this
process) through `LatencyLink` (agent/testing.py): every chunk is delayed `delay-ms`
each way, a 2 x delay round trip. This kernel has no netem (CONFIG_NET_SCH_NETEM is
off), so loss is LatencyLink's model of it (`--loss` percent per 1448-byte segment:
a chunk with a lost segment is held one 200 ms retransmission timeout plus the round
trip, everything behind it waiting). Each window size drains the same
copy of the backlog; the rate is records stored by the registry per second, from the
first record stored to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from agent.central.registry import tune_gc  # noqa: E402
from agent.config_types import MqttSection  # noqa: E402
from agent.testing import (  # noqa: E402
    AgentProcess,
    Broker,
    LatencyLink,
    Pty,
    running_registry,
    write_config,
)

SEED = 7  # the same loss draws for every window


def window_lines(window: int | None) -> str:
    """[mqtt] lines for a fixed window of `window` messages; None: the default (adaptive)."""
    if window is None:
        return ""
    return f"\ninflight_messages = {window}\ninflight_messages_max = {window}"


async def one(
    broker: Broker, work: Path, seed: Path, n: int, delay: float, window: int | None, loss: float
) -> tuple[float, int]:
    name = f"wan{window or 'auto'}-loss{round(loss * 10000)}"
    pty = Pty(work / f"tty-{name}")
    times: list[float] = []
    async with (
        LatencyLink(broker.port, delay, loss=loss, seed=SEED) as link,
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
            mqtt="backoff_max_s = 2" + window_lines(window),
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
        stored = reg.new
        assert len({r["id"] for r in stored}) == len(stored) == n, f"{len(stored)} of {n} stored"
        seqs = [r["seq"] for r in stored]
        assert seqs == sorted(seqs), "records stored out of seq order"
        return (n - 1) / (times[-1] - times[0]), link.lost_segments


def label(window: int | None) -> str:
    if window is not None:
        return f"fixed window {window}"
    d = MqttSection()
    return f"default window ({d.inflight_messages}, up to {d.inflight_messages_max})"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--delay-ms", type=float, default=25.0)
    ap.add_argument(
        "--windows",
        default="1,8,16,32,auto",
        help="fixed windows (inflight_messages = inflight_messages_max = N) and 'auto', the "
        "default configuration (8, growing to 32 while PUBACKs are slow)",
    )
    ap.add_argument("--loss", default="0,1", help="segment loss in percent, each a run")
    ap.add_argument("--json", type=Path, default=None, help="write every row here too")
    args = ap.parse_args()
    windows = [None if w == "auto" else int(w) for w in args.windows.split(",")]
    losses = [float(x) / 100 for x in args.loss.split(",")]
    with tempfile.TemporaryDirectory(prefix="madoguchi-wan-") as tmp:
        work = Path(tmp)
        seed = work / "seed.db"
        await fill(seed, args.records)
        (work / "broker").mkdir()
        broker = Broker(work / "broker")
        broker.start()
        try:
            rates = {
                (w, loss): await one(
                    broker, work, seed, args.records, args.delay_ms / 1000, w, loss
                )
                for loss in losses
                for w in windows
            }
        finally:
            broker.stop()
    print(
        f"WAN drain, {args.records} records, {args.delay_ms:.0f} ms each way "
        f"({2 * args.delay_ms:.0f} ms RTT), batch 500, {platform.machine()} "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    for (w, loss), (r, lost) in rates.items():
        base = rates[(windows[0], loss)][0]
        print(
            f"  loss {100 * loss:g} %, {label(w)}: {r:,.0f} records/s "
            f"({r / base:.1f}x; {lost} segments lost, each held 200 ms + RTT)"
        )
    if args.json is not None:
        rows = [
            {
                "loss": loss,
                "inflight_messages": w or "auto",
                "records_per_s": r,
                "segments_lost": lost,
                "records": args.records,
                "delay_ms": args.delay_ms,
            }
            for (w, loss), (r, lost) in rates.items()
        ]
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    tune_gc()  # the registry hosted here runs as `madoguchi registry` does
    asyncio.run(main())
