"""What the periodic integrity check and the counters side file cost a scan (issue #15).

    .venv/bin/python bench/bench_integrity.py

One outbox pre-filled with a backlog (so that `PRAGMA quick_check` has pages to
read), then sequential durable appends, as one device makes them, timed from
`append()` to its return. In the same run, alternating rounds of: the check off;
the check running back to back (every 10 ms, far more often than the default
600 s: the worst case); and, for what the seq reservation of the counters side
file saves, appends with it written (two fsyncs) before every commit. Medians and
p99 over all rounds of a mode, after one warm-up round that is not counted.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from agent.contract.records import Read
from agent.station import counters
from agent.station.outbox import Outbox

BACKLOG = 100_000
APPENDS = 500
ROUNDS = 6


def scan(i: int) -> Read:
    return Read(device="ticket-scanner", kind="barcode", data={"text": f"1111224100{i:08d}"})


async def fill(path: Path) -> None:
    async with Outbox(path) as ob:
        # group commit: many devices at once fill quickly
        for start in range(0, BACKLOG, 1000):
            await asyncio.gather(*(ob.append(scan(i)) for i in range(start, start + 1000)))


async def measure(path: Path, mode: str) -> tuple[list[float], int, float]:
    interval = 0.01 if mode == "check" else None
    async with Outbox(path, integrity_check_interval_s=interval) as ob:
        counters.RESERVE = 0 if mode == "side-per-scan" else 64
        if mode == "check":
            await asyncio.sleep(0.05)  # the first check is under way
        lat = []
        t_end = 0.0
        checks0 = ob.integrity_checks
        t0 = time.perf_counter()
        for i in range(APPENDS):
            t = time.perf_counter()
            await ob.append(scan(i))
            lat.append(time.perf_counter() - t)
        t_end = time.perf_counter() - t0
        return lat, ob.integrity_checks - checks0, t_end


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def main() -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(
        prefix="bench-integrity-", dir=os.environ.get("BENCH_DIR")
    ) as d:
        path = Path(d) / "outbox.db"
        await fill(path)
        size = sum(
            os.stat(str(path) + s).st_size for s in ("", "-wal") if os.path.exists(str(path) + s)
        )
        t = time.perf_counter()
        import sqlite3

        con = sqlite3.connect(path)
        con.execute("PRAGMA quick_check").fetchall()
        con.close()
        qc = time.perf_counter() - t
        print(f"backlog {BACKLOG} records, {size / 1e6:.1f} MB; one quick_check {qc * 1000:.0f} ms")
        modes = ["off", "check", "side-per-scan"]
        results: dict[str, list[float]] = {m: [] for m in modes}
        checks: dict[str, int] = dict.fromkeys(modes, 0)
        await measure(path, "off")  # warm-up: the fill's WAL checkpoints, the page cache
        for _ in range(ROUNDS):
            for m in modes:
                lat, n, _ = await measure(path, m)
                results[m] += lat
                checks[m] += n
        for m in modes:
            lat = results[m]
            print(
                f"{m:>13}: append median {statistics.median(lat) * 1000:.2f} ms, "
                f"p99 {p(lat, 0.99) * 1000:.2f} ms, max {max(lat) * 1000:.2f} ms "
                f"({len(lat)} appends, {checks[m]} integrity checks during them)"
            )


if __name__ == "__main__":
    asyncio.run(main())
