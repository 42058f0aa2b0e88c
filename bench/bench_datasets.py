"""What a city-sized `used_tickets` costs a station (issue #20, point 6).

    .venv/bin/python bench/bench_datasets.py [N]

N tickets (default 1,000,000) signed by the central side's code, then fed to a
`DatasetReceiver` as the chunk and manifest messages the station gets: load time
(first message to applied, verify + parse + one SQLite transaction), bytes per
entry of datasets.db, the RSS the process keeps after the load, and the verdict
cost per scan (hit and miss), median of many. One process, this machine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.central.datasets import public_hex, signed_messages
from agent.interpret import interpret
from agent.station.datasets import DatasetReceiver, DatasetStore
from agent.station.uplink import rss_bytes

P = "madoguchi/v1"


def rows(n: int) -> list[dict[str, str]]:
    return [
        {
            "municipality_code": "112241",
            "ticket_number": f"{i:010d}",
            "dose": str(1 + i % 3),
            "site": f"site-{i % 40}",
            "agent": f"station-{i % 7:02d}",
            "at": "2026-12-02T04:00:00.000Z",
        }
        for i in range(n)
    ]


async def main(n: int) -> dict[str, float]:
    key = Ed25519PrivateKey.generate()
    messages = signed_messages(key, P, "used_tickets", 1, rows(n))
    body_bytes = sum(len(p) for _, p in messages[:-1])
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(Path(tmp) / "datasets.db")
        store.open()
        r = DatasetReceiver(store, bytes.fromhex(public_hex(key)), P, max_age_s=86_400)
        r.load()
        rss_before = rss_bytes()
        t0 = time.perf_counter()
        for topic, payload in messages:
            await r.handle(topic, payload)
        load_s = time.perf_counter() - t0
        assert r.held["used_tickets"].rows == n
        del messages
        gc.collect()
        rss_after = rss_bytes()
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        hit = interpret(f"1{1 + 5 % 3}112241{5:010d}")
        miss = interpret("111122419999999999")
        times: dict[str, list[float]] = {"hit": [], "miss": []}
        for _ in range(20):
            for name, interp in (("hit", hit), ("miss", miss)):
                t = time.perf_counter()
                for _ in range(1000):
                    r.verdict(interp)
                times[name].append((time.perf_counter() - t) / 1000 * 1e6)
        assert r.verdict(hit)["verdict"] == "already_used"  # type: ignore[index]
        return {
            "tickets": n,
            "load_s": round(load_s, 2),
            "bytes_per_entry": round(size / n, 1),
            "rss_after_load_mb": round(rss_after / 1e6, 1),
            "rss_growth_during_load_mb": round((rss_after - rss_before) / 1e6, 1),
            "body_mb": round(body_bytes / 1e6, 1),
            "verdict_hit_us": round(statistics.median(times["hit"]), 1),
            "verdict_miss_us": round(statistics.median(times["miss"]), 1),
        }


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(json.dumps(asyncio.run(main(count))))
