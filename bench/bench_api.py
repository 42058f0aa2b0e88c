"""Figures for the kiosk API on a real station (pty scanner, mosquitto, SQLite outbox).

    PYTHONPATH=. python bench/bench_api.py [--n 300]

Prints: manual entry round trip (POST -> commit on disk -> answer), scan on the
serial pty -> event at an SSE client, fan-out of one event to 20 SSE clients,
CPU used by an idle station with a page attached, and the memory the ASGI stack
adds to the process. Uses the harness (agent.testing) and the kiosk's test support.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support

from agent.testing import Broker, Pty  # noqa: E402
from tests.support.kiosk import kiosk_config, running_kiosk, sse  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def line(name: str, ms: list[float]) -> None:
    print(
        f"{name:<44} n={len(ms):<5} p50={statistics.median(ms):6.2f} ms  "
        f"p95={pct(ms, 95):6.2f} ms  p99={pct(ms, 99):6.2f} ms  max={max(ms):6.2f} ms"
    )


def rss_kb() -> int:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    return 0


def import_cost() -> str:
    code = (
        "import time,asyncio,json,logging,ssl,pydantic\n"
        "def rss():\n"
        "  return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
        "b=rss();t=time.perf_counter()\n"
        "import agent.station.station, agent.station.uplink, agent.station.outbox\n"
        "b=rss();t=time.perf_counter()\n"
        "import agent.station.kiosk.api\n"
        "print(rss()-b, round((time.perf_counter()-t)*1000))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout.split()
    mb = int(out[0]) / 1024
    return f"+{mb:.1f} MB RSS, {out[1]} ms to import agent.station.kiosk.api (starlette+uvicorn)"


async def bench(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        broker = Broker(tmp_path)
        broker.start()
        pty = Pty(tmp_path / "ttyBench")
        try:
            cfg, _ = kiosk_config(tmp_path, broker.port, pty.link, card_reader=False)
            text = cfg.read_text().replace("telemetry_interval_s = 1", "telemetry_interval_s = 30")
            cfg.write_text(text.replace("[api]", "[api]\nevent_buffer = 10000"))
            async with running_kiosk(cfg) as k, k.client() as c:
                # 0. an authenticated GET: the HTTP floor
                ms = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = await c.get("/v1/status", headers=k.auth())
                    ms.append((time.perf_counter() - t0) * 1000)
                line("GET /v1/status round trip", ms)

                # 1. manual entry, one at a time
                ms = []
                for i in range(n):
                    t0 = time.perf_counter()
                    r = await c.post(
                        "/v1/manual",
                        headers=k.auth(),
                        json={"device": "ticket-scanner", "text": f"manual-{i:06d}"},
                    )
                    ms.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 201, r.text
                line("manual entry round trip (durable)", ms)

                # 2. manual entry, 8 clients at once
                t0 = time.perf_counter()

                async def worker(w: int) -> None:
                    async with k.client() as cw:
                        for i in range(n // 8):
                            r = await cw.post(
                                "/v1/manual",
                                headers=k.auth(),
                                json={"device": "ticket-scanner", "text": f"w{w}-{i:06d}"},
                            )
                            assert r.status_code == 201

                await asyncio.gather(*(worker(w) for w in range(8)))
                dt = time.perf_counter() - t0
                print(f"{'manual entries/s, 8 concurrent clients':<44} {8 * (n // 8) / dt:8.0f}")

                # 3. scan on the pty -> event at the page
                ms = []
                async with sse(c, k.auth()) as events:
                    await events.next()
                    for i in range(n):
                        t0 = time.perf_counter()
                        pty.scan(f"scan-{i:06d}")
                        await events.until(lambda e: e["event"] == "read_accepted")
                        ms.append((time.perf_counter() - t0) * 1000)
                        await pty.aread(1)
                line("scan on pty -> SSE event (after the commit)", ms)

                # 4. fan-out to 20 pages
                clients = [k.client() for _ in range(20)]
                streams = []
                ms = []
                try:
                    for cl in clients:
                        cm = sse(cl, k.auth())
                        streams.append((cm, await cm.__aenter__()))
                    for _, s in streams:
                        await s.next()
                    for i in range(min(n, 100)):
                        t0 = time.perf_counter()
                        r = await c.post(
                            "/v1/manual",
                            headers=k.auth(),
                            json={"device": "ticket-scanner", "text": f"fan-{i:06d}"},
                        )
                        await asyncio.gather(
                            *(s.until(lambda e: e["event"] == "read_accepted") for _, s in streams)
                        )
                        ms.append((time.perf_counter() - t0) * 1000)
                finally:
                    for cm, _ in streams:
                        await cm.__aexit__(None, None, None)
                    for cl in clients:
                        await cl.aclose()
                line("manual entry -> event at all of 20 pages", ms)

                # 5. idle: one page attached, nothing happens
                async with sse(c, k.auth()) as events:
                    await events.next()
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    await asyncio.sleep(10)
                    cpu = time.process_time() - cpu0
                    wall = time.perf_counter() - wall0
                name = "idle station + API + 1 page, CPU"
                print(
                    f"{name:<44} {100 * cpu / wall:6.2f} % of one core "
                    f"({cpu * 1000:.0f} ms in {wall:.0f} s; the bench's own client included)"
                )
        finally:
            pty.close()
            broker.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'ASGI stack in the agent':<44} {import_cost()}")
    print(f"{'process RSS before the station':<44} {rss_kb() / 1024:.1f} MB")
    asyncio.run(bench(args.n))
    print(f"{'process RSS after (bench client included)':<44} {rss_kb() / 1024:.1f} MB")


if __name__ == "__main__":
    main()
