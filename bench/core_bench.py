"""Core benchmarks (issue: outbox, uplink, serial driver), all on loopback, one run.

- scan -> host ACK and scan -> registry latency through a pty, p50/p99/p99.9
- backlog drain: a pre-filled outbox to the reference registry (acks included),
  against raw paho publishing the same records one per QoS 1 message
- idle RSS and CPU of the agent process

Prints a JSON document (and a Markdown table with --markdown).
Usage: python bench/core_bench.py [--scans 300] [--backlog 20000] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent.central.registry import Stored, tune_gc
from agent.contract.records import Read, envelope
from agent.station.outbox import Outbox, read_stats
from agent.testing import AgentProcess, Broker, Pty, running_registry, serial_scanner, write_config

ROOT = Path(__file__).resolve().parent.parent


def compile_code(root: Path) -> None:
    """Bytecode for the code under test, as `pip install` writes it for a wheel. Where
    PYTHONDONTWRITEBYTECODE is set (this machine's shells set it) a process would compile
    every changed module at each start: 2-3 MB of compiler memory in its RSS and the
    time in its READY, which no installed station pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "agent")], check=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def agent_config(workdir: Path, port: int, scanner: Path | None, name: str) -> Path:
    devices = "" if scanner is None else serial_scanner(scanner, host_nak=None)
    return write_config(
        workdir,
        port,
        devices=devices,
        site="bench-site",
        name=name,
        data_dir=workdir / name,
        extra_agent='log_level = "WARNING"',
        telemetry_interval_s=None,
        mqtt="",
        outbox="resend_after_s = 60",
    )


def start_agent(config: Path, log: Path) -> AgentProcess:
    agent = AgentProcess(config, log, cwd=ROOT)
    agent.start()
    return agent


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(port: int, workdir: Path, scans: int, rate: float) -> dict[str, Any]:
    pty = Pty(workdir / "ttyBench")
    stored_at: dict[str, float] = {}
    got = asyncio.Event()

    def on_stored(s: Stored) -> None:
        if s.new:
            stored_at[s.record["data"]["text"]] = time.perf_counter()
            if len(stored_at) >= scans:
                got.set()

    cfg = agent_config(workdir, port, pty.link, "latency")
    agent = start_agent(cfg, workdir / "latency.log")
    ack_lat: list[float] = []
    sent_at: dict[str, float] = {}
    async with running_registry(port, workdir / "reg-latency.db", on_stored=on_stored):
        await asyncio.sleep(2.0)  # the agent connects and opens the port
        agent.check_running()
        for i in range(scans):
            text = f"1111224100{i:08d}"
            t0 = time.perf_counter()
            sent_at[text] = t0
            pty.scan(text)
            if not await pty.aread(1, 10):
                agent.check_running()
                raise SystemExit("no host ACK within 10 s")
            ack_lat.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
        await asyncio.wait_for(got.wait(), 60)
    rss = proc_rss(agent.pid)
    agent.stop()
    pty.close()
    reg_lat = [stored_at[t] - sent_at[t] for t in sent_at]
    ms = 1000.0
    return {
        "scans": scans,
        "rate_per_s": rate,
        "ack_ms": {
            "p50": pct(ack_lat, 50) * ms,
            "p99": pct(ack_lat, 99) * ms,
            "p99.9": pct(ack_lat, 99.9) * ms,
        },
        "registry_ms": {
            "p50": pct(reg_lat, 50) * ms,
            "p99": pct(reg_lat, 99) * ms,
            "p99.9": pct(reg_lat, 99.9) * ms,
        },
        "rss_after_bytes": rss,
    }


async def fill_outbox(db: Path, n: int) -> list[Any]:
    async with Outbox(db) as ob:
        recs = await asyncio.gather(
            *(
                ob.append(
                    Read(
                        device="ticket-scanner",
                        kind="barcode",
                        data={
                            "text": f"1111224100{i:08d}",
                            "symbology": None,
                            "interpretation": {
                                "type": "vaccination_ticket",
                                "valid": True,
                                "fields": {},
                                "problems": [],
                            },
                        },
                    )
                )
                for i in range(n)
            )
        )
    return list(recs)


async def drain(port: int, workdir: Path, backlog: int) -> dict[str, Any]:
    name = "drain"
    cfg = agent_config(workdir, port, None, name)
    db = workdir / name / "outbox.db"
    await fill_outbox(db, backlog)
    done = asyncio.Event()
    count = 0

    def on_stored(s: Stored) -> None:
        nonlocal count
        count += s.new
        if count >= backlog:
            done.set()

    async with running_registry(
        port,
        workdir / "reg-drain.db",
        on_stored=on_stored,
        client_id="bench-registry-drain",
        keep=False,  # as `madoguchi registry` runs: nothing held per record
    ):
        t0 = time.perf_counter()
        agent = start_agent(cfg, workdir / "drain.log")
        await asyncio.wait_for(done.wait(), 600)
        stored_s = time.perf_counter() - t0
        while read_stats(db)["unconfirmed"]:
            await asyncio.sleep(0.01)
        confirmed_s = time.perf_counter() - t0
        rss = proc_rss(agent.pid)
    agent.stop()
    return {
        "records": backlog,
        "stored_s": stored_s,
        "confirmed_s": confirmed_s,
        "rate_stored": backlog / stored_s,
        "rate_confirmed": backlog / confirmed_s,
        "agent_rss_after_drain_bytes": rss,
    }


def raw_paho(port: int, records: list[Any]) -> dict[str, Any]:
    """What a user would write: one QoS 1 message per record, paho's own loop."""
    return raw_paho_payloads(port, [envelope("bench-site", "raw", [r]) for r in records])


def raw_paho_process(port: int, records: list[Any], workdir: Path) -> dict[str, Any]:
    """`raw_paho` in a process of its own, as the agent is: no GIL shared with the registry."""
    file = workdir / "raw-payloads.jsonl"
    with file.open("wb") as f:
        for r in records:
            f.write(envelope("bench-site", "raw", [r]) + b"\n")
    out = subprocess.run(
        [sys.executable, __file__, "--raw-publish", str(port), str(file)],
        capture_output=True,
        check=True,
        cwd=ROOT,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


#: messages a raw publisher lets be outstanding. Paho reuses a message id after 65,535
#: without checking: with 100,000 queued at once it overwrote 34,000 of them (lost).
WINDOW = 1000


def raw_paho_payloads(port: int, payloads: list[bytes]) -> dict[str, Any]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-raw")
    acked = 0
    all_acked = threading.Event()
    connected = threading.Event()

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= len(payloads):
            all_acked.set()

    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    connected.wait(10)
    t0 = time.perf_counter()
    sent = []
    for i, p in enumerate(payloads):
        sent.append(client.publish("madoguchi/v1/bench-site/raw/records", p, qos=1))
        if i >= WINDOW:  # paho's 16-bit message ids: never 65,535 messages outstanding
            sent[i - WINDOW].wait_for_publish()
    all_acked.wait(600)
    dt = time.perf_counter() - t0
    client.loop_stop()
    client.disconnect()
    return {"records": len(payloads), "puback_s": dt, "rate_puback": len(payloads) / dt}


async def raw_paho_through_registry(port: int, workdir: Path, records: list[Any]) -> dict[str, Any]:
    done = asyncio.Event()
    count = 0

    def on_stored(s: Stored) -> None:
        nonlocal count
        count += s.new
        if count >= len(records):
            done.set()

    async with running_registry(
        port,
        workdir / f"reg-raw-{time.monotonic_ns()}.db",  # a fresh registry every run
        on_stored=on_stored,
        client_id="bench-registry-raw",
        keep=False,  # the same registry as the drain's
    ):
        t0 = time.perf_counter()
        pub = await asyncio.to_thread(raw_paho_process, port, records, workdir)
        await asyncio.wait_for(done.wait(), 900)
        dt = time.perf_counter() - t0
    return {**pub, "stored_s": dt, "rate_stored": len(records) / dt}


async def idle(port: int, workdir: Path, seconds: float) -> dict[str, Any]:
    pty = Pty(workdir / "ttyIdle")
    agent = start_agent(agent_config(workdir, port, pty.link, "idle"), workdir / "idle.log")
    await asyncio.sleep(3)
    agent.check_running()
    c0 = proc_cpu_s(agent.pid)
    await asyncio.sleep(seconds)
    cpu = (proc_cpu_s(agent.pid) - c0) / seconds
    rss = proc_rss(agent.pid)
    agent.stop()
    pty.close()
    return {"rss_bytes": rss, "cpu_share": cpu, "seconds": seconds}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="madoguchi-bench-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir, persistence=False, log=False, settings="")
        broker.start()
        port = broker.port
        try:
            out: dict[str, Any] = {"machine": machine()}
            out["idle"] = await idle(port, workdir, args.idle_s)
            out["latency"] = await latency(port, workdir, args.scans, args.rate)
            out["drain"] = await drain(port, workdir, args.backlog)
            recs = await fill_outbox(workdir / "raw-source.db", args.backlog)
            out["raw_paho"] = await raw_paho_through_registry(port, workdir, recs)
            out["ratios"] = {
                "drain_vs_raw_puback": out["drain"]["rate_confirmed"]
                / out["raw_paho"]["rate_puback"],
                "drain_vs_raw_through_registry": out["drain"]["rate_confirmed"]
                / out["raw_paho"]["rate_stored"],
            }
        finally:
            broker.stop()
    return out


def markdown(r: dict[str, Any]) -> str:
    m, lat, d, raw, idle_ = r["machine"], r["latency"], r["drain"], r["raw_paho"], r["idle"]
    return "\n".join(
        [
            f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| scan -> host ACK p50 / p99 / p99.9 ({lat['scans']} scans at {lat['rate_per_s']}/s) "
            f"| {lat['ack_ms']['p50']:.2f} / {lat['ack_ms']['p99']:.2f} / "
            f"{lat['ack_ms']['p99.9']:.2f} ms | |",
            f"| scan -> registry commit p50 / p99 / p99.9 | {lat['registry_ms']['p50']:.2f} / "
            f"{lat['registry_ms']['p99']:.2f} / {lat['registry_ms']['p99.9']:.2f} ms "
            "| p99 <= 20 ms |",
            f"| backlog drain, {d['records']} records, stored by registry | "
            f"{d['rate_stored']:.0f} records/s | |",
            f"| backlog drain incl. acks back in the outbox | "
            f"{d['rate_confirmed']:.0f} records/s | |",
            f"| raw paho, one QoS 1 message per record, until all PUBACKs | "
            f"{raw['rate_puback']:.0f} records/s | |",
            f"| raw paho, same, until stored by the registry | "
            f"{raw['rate_stored']:.0f} records/s | |",
            f"| **ratio drain / raw paho PUBACK rate** | "
            f"**{r['ratios']['drain_vs_raw_puback']:.1f}x** | >= 3x |",
            f"| ratio drain / raw paho through the registry | "
            f"{r['ratios']['drain_vs_raw_through_registry']:.1f}x | |",
            f"| idle RSS of the agent (1 serial device) | {idle_['rss_bytes'] / 1e6:.1f} MB "
            f"| <= 40 MB |",
            f"| idle CPU of the agent | {idle_['cpu_share'] * 100:.2f} % of one core | |",
            f"| agent RSS after draining {d['records']} records | "
            f"{d['agent_rss_after_drain_bytes'] / 1e6:.1f} MB | |",
        ]
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-publish"]:  # the raw paho publisher's own process
        lines = Path(sys.argv[3]).read_bytes().splitlines()
        print(json.dumps(raw_paho_payloads(int(sys.argv[2]), lines)))
        raise SystemExit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--backlog", type=int, default=20000)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    tune_gc()  # the registry hosted here runs as `madoguchi registry` does
    result = asyncio.run(main(a))
    print(json.dumps(result, indent=2))
    if a.markdown:
        print(markdown(result))
