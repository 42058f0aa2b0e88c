"""What a city-sized `used_tickets` costs a station (issue #20, point 6).

    .venv/bin/python bench/bench_datasets.py [N]

N tickets (default 1,000,000) signed by the central side's code in this process,
then fed, in a fresh process, to a `DatasetReceiver` as the chunk and manifest
messages the station gets (read one at a time from a file): load time
(first message to applied, verify + parse + one SQLite transaction), bytes per
entry of datasets.db, the station process's RSS before and at its peak, and the verdict
cost per scan (hit and miss), median of many; then one `used_tickets` delta of
DELTA new tickets on top (what the registry sends per commit), first message to
applied. One process, this machine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import public_hex, signed_messages
from agent.interpret import interpret
from agent.station.datasets import DatasetReceiver, DatasetStore
from agent.station.uplink import rss_bytes

P = "madoguchi/v1"
DELTA = 100


def rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "municipality_code": "112241",
            "ticket_number": f"{i:010d}",
            "dose": str(1 + i % 3),
            "site": f"site-{i % 40}",
            "agent": f"station-{i % 7:02d}",
            "at": "2026-12-02T04:00:00.000Z",
        }
        for i in range(start, start + n)
    ]


def central(n: int, out: Path) -> tuple[str, int]:
    """The central side's part: sign N tickets; the messages go to `out`, length-prefixed."""
    key = Ed25519PrivateKey.generate()
    messages = signed_messages(key, P, "used_tickets", 1, rows(n))
    delta = signed_messages(key, P, "used_tickets", 2, rows(DELTA, n), base=1)
    for path, msgs in ((out, messages), (out.with_suffix(".delta"), delta)):
        with path.open("wb") as f:
            for topic, payload in msgs:
                t = topic.encode()
                f.write(struct.pack(">II", len(t), len(payload)) + t + payload)
    return public_hex(key), sum(len(p) for _, p in messages[:-1])


def _high_water() -> int:
    """VmHWM: this process's peak RSS since exec (ru_maxrss would count the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _messages(path: Path) -> Iterator[tuple[str, bytes]]:
    with path.open("rb") as f:
        while head := f.read(8):
            lt, lp = struct.unpack(">II", head)
            yield f.read(lt).decode(), f.read(lp)


async def station(n: int, pub: str, path: Path, tmp: Path) -> dict[str, float]:
    """The station's part, in a fresh process: RSS is the station's own."""
    store = DatasetStore(tmp / "datasets.db")
    store.open()
    r = DatasetReceiver(store, bytes.fromhex(pub), P, max_age_s=86_400)
    r.load()
    gc.collect()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    for topic, payload in _messages(path):
        await r.handle(topic, payload)
    load_s = time.perf_counter() - t0
    assert r.held["used_tickets"].rows == n
    peak = _high_water()
    size = (tmp / "datasets.db").stat().st_size
    hit = interpret(f"1{1 + 5 % 3}112241{5:010d}")
    miss = interpret("111122419999999999")
    times: dict[str, list[float]] = {"hit": [], "miss": []}
    for _ in range(20):
        for name, interp in (("hit", hit), ("miss", miss)):
            t = time.perf_counter()
            for _ in range(1000):
                r.verdict(interp)
            times[name].append((time.perf_counter() - t) / 1000 * 1e6)
    v = r.verdict(hit)
    assert v is not None and v["verdict"] == "already_used"
    t0 = time.perf_counter()
    for topic, payload in _messages(path.with_suffix(".delta")):
        await r.handle(topic, payload)
    delta_s = time.perf_counter() - t0
    assert (r.held["used_tickets"].version, r.held["used_tickets"].rows) == (2, n + DELTA)
    return {
        "tickets": n,
        "load_s": round(load_s, 2),
        "bytes_per_entry": round(size / n, 1),
        "rss_before_load_mb": round(rss_before / 1e6, 1),
        "rss_peak_mb": round(peak / 1e6, 1),
        "rss_growth_peak_mb": round((peak - rss_before) / 1e6, 1),
        "verdict_hit_us": round(statistics.median(times["hit"]), 1),
        "verdict_miss_us": round(statistics.median(times["miss"]), 1),
        f"delta_of_{DELTA}_apply_ms": round(delta_s * 1000, 1),
    }


def main(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        wire = Path(tmp) / "wire.bin"
        pub, body = central(n, wire)
        out = subprocess.run(
            [sys.executable, __file__, "--station", str(n), pub, str(wire), tmp],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return {**json.loads(out), "body_mb": round(body / 1e6, 1)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--station"]:
        n, pub, wire, tmp = sys.argv[2:6]
        print(json.dumps(asyncio.run(station(int(n), pub, Path(wire), Path(tmp)))))
    else:
        print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)))
