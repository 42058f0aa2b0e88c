"""Drain CPU per record and status cost under backlog (issue #18 points 1 and 2).

Real processes on loopback: a mosquitto, `python -m agent registry` (SQLite) and
`python -m agent run` draining a backlog from its outbox. Process CPU time
(/proc/PID/stat, user + system) per drained record for the agent and the
registry, for this tree and, with `--base DIR` (a checkout of the merge-base), for
the old code in the same run: each process is started with DIR as its working
directory, so `python -m agent` imports DIR's package.

The agent's figure runs from the first ack it receives to the moment its outbox is
all confirmed (its start-up and imports excluded); the registry's from before the
agent starts to the last ack, over every record.

Then, in this process: `Outbox.stats()` cost at 100,000 and 1,000,000 queued (this
tree's counters against the COUNT queries it replaced, `_query_stats`), and append
p99 at 100 scans/s with 1,000,000 queued, without stats, with stats every 0.5 s, and
with the old COUNT every 0.5 s.

    python bench/bench_drain_cpu.py [--records 100000] [--runs 3] [--base DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent

from agent.contract.records import Read, iso_ms, utc_now, uuid7  # noqa: E402
from agent.station.outbox import Outbox, _query_stats  # noqa: E402
from agent.testing import (  # noqa: E402
    LOOPBACK,
    AgentProcess,
    Broker,
    RegistryProcess,
    write_config,
)

#: extra `[mqtt]` lines for every drained agent (--agent-mqtt): a setting measured
#: against the default in two runs of this bench
AGENT_MQTT = [""]

DATA = json.dumps(
    {
        "text": "111122410000000001",
        "symbology": None,
        "interpretation": {
            "type": "vaccination_ticket",
            "valid": True,
            "fields": {},
            "problems": [],
        },
    },
    separators=(",", ":"),
)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill_sql(db: Path, n: int, *, start: int = 1) -> None:
    """`n` pending barcode records written straight into the outbox schema (fast, for big
    backlogs); the outbox is opened once first so the schema and meta are its own."""
    asyncio.run(_touch(db))
    con = sqlite3.connect(db)
    now = time.time()
    captured = iso_ms(utc_now())
    with con:
        con.executemany(
            "INSERT INTO records (seq, id, captured_at, device, kind, source, operator,"
            " clock_synced, data, sealed, bytes, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                (
                    s,
                    str(uuid7()),
                    captured,
                    "ticket-scanner",
                    "barcode",
                    "device",
                    None,
                    None,
                    DATA.replace("00000001", f"{s:08d}"),
                    None,
                    len(DATA) + 200,
                    now,
                )
                for s in range(start, start + n)
            ),
        )
        con.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (start + n - 1,))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    # written behind the outbox's back: its next open must not trust a clean-close mark
    with contextlib.suppress(FileNotFoundError):
        Path(str(db) + ".clean").unlink()


async def _touch(db: Path) -> None:
    async with Outbox(db):
        pass


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


async def one_drain(
    tree: Path,
    seed: Path,
    records: int,
    workdir: Path,
    registry_tree: Path | None = None,
    *,
    console: bool = False,
) -> dict[str, float]:
    """Drain `seed` (records pending) through a real agent into a real registry.

    The registry runs as shipped (`quiet = true` in provisioning/central.example.toml)
    unless `console`: then it prints a line per record, as `madoguchi registry` does
    on a terminal. The agent's RSS is read at every ack (its peak while draining)."""
    workdir.mkdir(parents=True)
    broker = Broker(workdir, persistence=False, log=False)
    broker.start()
    data_dir = workdir / "station"
    data_dir.mkdir()
    for suffix in ("", ".counters"):
        if Path(str(seed) + suffix).exists():
            shutil.copy(str(seed) + suffix, str(data_dir / "outbox.db") + suffix)
    cfg = write_config(
        workdir,
        broker.port,
        devices="",
        site="bench-site",
        name="drain",
        data_dir=data_dir,
        extra_agent='log_level = "WARNING"',
        telemetry_interval_s=None,
        mqtt=AGENT_MQTT[0],
        outbox="resend_after_s = 60",
    )
    registry = RegistryProcess(
        broker.port,
        workdir / "registry.db",
        workdir / "registry.log",
        *(() if console else ("--quiet",)),
    )
    registry.cwd = registry_tree or tree
    registry.start()
    agent: AgentProcess | None = None
    try:
        registry.wait_ready(30)
        acked = 0
        peak_rss = 0.0
        first: tuple[int, float] | None = None
        first_at = 0.0
        async with aiomqtt.Client(LOOPBACK, broker.port) as sub:
            await sub.subscribe("madoguchi/v1/bench-site/drain/ack", qos=1)
            reg_cpu0 = cpu_s(registry.proc.pid)  # type: ignore[union-attr]
            t0 = time.perf_counter()
            agent = AgentProcess(cfg, workdir / "agent.log", cwd=tree)
            agent.start()
            pid = agent.proc.pid  # type: ignore[union-attr]
            async with asyncio.timeout(600):
                async for m in sub.messages:
                    acked += len(json.loads(m.payload)["ids"])  # type: ignore[arg-type]
                    peak_rss = max(peak_rss, rss_mb(pid))
                    if first is None:
                        first = (acked, cpu_s(pid))
                        first_at = time.perf_counter()
                    if acked >= records:
                        break
            reg_cpu = cpu_s(registry.proc.pid) - reg_cpu0  # type: ignore[union-attr]
            stored_s = time.perf_counter() - t0
        db = data_dir / "outbox.db"
        # the last confirm lands a moment after the last ack: wait for it (read-only reader)
        while True:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            left = con.execute("SELECT count(*) FROM records WHERE state < 2").fetchone()[0]
            con.close()
            if not left:
                break
            await asyncio.sleep(0.005)
        assert first is not None
        agent_cpu = cpu_s(pid) - first[1]
        confirmed_s = time.perf_counter() - t0
        peak_rss = max(peak_rss, rss_mb(pid))
    finally:
        if agent is not None:
            agent.stop()
        registry.stop()
        broker.stop()
    log_text = agent.text() if agent is not None else ""
    return {
        "agent_us_per_record": agent_cpu / (records - first[0]) * 1e6,
        "registry_us_per_record": reg_cpu / records * 1e6,
        "rate_confirmed": records / confirmed_s,
        "rate_stored": records / stored_s,
        # from the first ack to the last record confirmed, start-up left out: the peer's
        # backlog rate is taken the same way (first arrival to last, bench_peer.py)
        "rate_confirmed_connected": (records - first[0]) / (t0 + confirmed_s - first_at),
        "agent_rss_peak_mb": peak_rss,
        # the largest records window the drain used (uplink.Window logs each change)
        "window_max": max(
            [int(x) for x in re.findall(r": (\d+) records message\(s\) in flight", log_text)],
            default=0,  # 0: it never left inflight_messages
        ),
    }


async def idle_rss(tree: Path, workdir: Path, settle_s: float = 6.0) -> float:
    """The same agent configuration on an empty outbox, connected, nothing to send:
    VmRSS after `settle_s` (the reference for RSS while draining)."""
    workdir.mkdir(parents=True)
    broker = Broker(workdir, persistence=False, log=False)
    broker.start()
    data_dir = workdir / "station"
    data_dir.mkdir()
    cfg = write_config(
        workdir,
        broker.port,
        devices="",
        site="bench-site",
        name="drain",
        data_dir=data_dir,
        extra_agent='log_level = "WARNING"',
        telemetry_interval_s=None,
        mqtt="",
        outbox="resend_after_s = 60",
    )
    agent = AgentProcess(cfg, workdir / "agent.log", cwd=tree)
    agent.start()
    try:
        await asyncio.sleep(settle_s)
        return rss_mb(agent.proc.pid)  # type: ignore[union-attr]
    finally:
        agent.stop()
        broker.stop()


_OUTBOX_PATH = """
import asyncio, json, shutil, sys, tempfile, time
from pathlib import Path
from agent.contract.records import envelope_of
from agent.station.outbox import Outbox
async def main(db):
    cpu = 0.0
    n = 0
    async with Outbox(db) as ob:
        while True:
            t = time.process_time()
            if hasattr(ob, "next_wire_batch"):
                batch = await ob.next_wire_batch(500, 60)
                parts = [o.wire for o in batch]
            else:
                batch = await ob.next_batch(500, 60)
                parts = [r.wire_json().encode() for r in batch]
            if not batch:
                break
            envelope_of("bench-site", "drain", parts)
            await ob.mark_sent([r.seq for r in batch])
            await ob.confirm([r.id for r in batch])
            cpu += time.process_time() - t
            n += len(batch)
    print(json.dumps({"outbox_path_us_per_record": cpu / n * 1e6}))
work = Path(tempfile.mkdtemp(prefix="madoguchi-bench-path-"))
shutil.copy(sys.argv[1], work / "outbox.db")
try:
    asyncio.run(main(work / "outbox.db"))
finally:
    shutil.rmtree(work)
"""


def outbox_path(tree: Path, seed: Path) -> dict[str, float]:
    """The outbox side of the drain in one process of `tree`'s code, no MQTT: read the next
    500, build the envelope, mark sent, confirm; process CPU per record."""
    done = subprocess.run(
        [sys.executable, "-c", _OUTBOX_PATH, str(seed)],
        cwd=tree,
        capture_output=True,
        check=True,
        timeout=600,
    )
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


async def stats_cost(db: Path, calls: int = 20) -> dict[str, float]:
    """Milliseconds per stats() call (this tree) and per COUNT query set (the old stats)."""
    async with Outbox(db) as ob:
        t = time.perf_counter()
        for _ in range(calls):
            await ob.stats()
        new = (time.perf_counter() - t) / calls
        t = time.perf_counter()
        for _ in range(calls):
            await ob._run(lambda: _query_stats(ob.db, time.time()))
        old = (time.perf_counter() - t) / calls
    return {"stats_ms": new * 1e3, "count_ms": old * 1e3}


async def append_p99(db: Path, mode: str, seconds: float, rate: float = 100.0) -> float:
    """p99 of append latency (ms) at `rate` scans/s while `mode` runs every 0.5 s."""
    async with Outbox(db) as ob:
        lat: list[float] = []

        async def status() -> None:
            while True:
                await asyncio.sleep(0.5)
                if mode == "stats":
                    await ob.stats()
                elif mode == "count":
                    await ob._run(lambda: _query_stats(ob.db, time.time()))

        async def scans() -> None:
            n = int(seconds * rate)
            t_next = time.perf_counter()
            for i in range(n):
                t_next += 1 / rate
                t = time.perf_counter()
                await ob.append(Read("ticket-scanner", "barcode", {"text": f"P{i}"}))
                lat.append(time.perf_counter() - t)
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))

        async with asyncio.TaskGroup() as tg:
            side = tg.create_task(status(), name="bench-status")
            await tg.create_task(scans(), name="bench-scans")
            side.cancel()
    lat.sort()
    return lat[int(len(lat) * 0.99)] * 1e3


def backlogs(work: Path, sizes: list[int], runs: int, p99_seconds: float) -> dict[str, Any]:
    """Every backlog size, `runs` drains of this tree each, interleaved (10k, 100k, 1M,
    10k, ...): the machine's load drifts, and target 2 compares the sizes. Then append
    p99 at each size."""
    seeds = {}
    for size in sizes:
        seeds[size] = work / f"backlog-seed-{size}" / "outbox.db"
        seeds[size].parent.mkdir()
        fill_sql(seeds[size], size)
    rs: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    for i in range(runs):
        for size in sizes:
            r = asyncio.run(one_drain(ROOT, seeds[size], size, work / f"backlog-{size}-{i}"))
            shutil.rmtree(work / f"backlog-{size}-{i}")  # a 1M outbox is ~0.4 GB
            print(f"backlog {size}", {k: round(v, 1) for k, v in r.items()}, flush=True)
            rs[size].append(r)
    out: dict[str, Any] = {}
    for size in sizes:
        got: dict[str, Any] = spread_by_key(rs[size])
        for mode in ("none", "stats"):
            got[f"append_p99_ms_{mode}"] = asyncio.run(append_p99(seeds[size], mode, p99_seconds))
        print(f"backlog {size} append p99", got["append_p99_ms_none"], got["append_p99_ms_stats"])
        shutil.rmtree(seeds[size].parent)
        out[f"backlog_{size}"] = got
    return out


def plot(out: dict[str, Any], sizes: list[int], path: Path) -> None:
    """Drain CPU per record and append p99 against backlog size (docs/perf/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cpu, lat) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("agent_us_per_record", "agent"),
        ("registry_us_per_record", "registry (SQLite, as shipped)"),
    ):
        med = [out[f"backlog_{n}"][key]["median"] for n in sizes]
        lo = [m - out[f"backlog_{n}"][key]["min"] for m, n in zip(med, sizes, strict=True)]
        hi = [out[f"backlog_{n}"][key]["max"] - m for m, n in zip(med, sizes, strict=True)]
        cpu.errorbar(sizes, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
    for target, label in ((15, "agent target 15 µs"), (25, "registry target 25 µs")):
        cpu.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        cpu.text(sizes[0], target + 0.4, label, fontsize=8, color="grey")
    cpu.set_xscale("log")
    cpu.set_ylim(bottom=0)
    cpu.set_xlabel("records queued at the start of the drain")
    cpu.set_ylabel("process CPU per drained record (µs)")
    cpu.legend(fontsize=8)
    for mode, label in (("none", "no status calls"), ("stats", "stats() every 0.5 s")):
        lat.plot(
            sizes,
            [out[f"backlog_{n}"][f"append_p99_ms_{mode}"] for n in sizes],
            marker="o",
            label=label,
        )
    lat.set_xscale("log")
    lat.set_ylim(bottom=0)
    lat.set_xlabel("records queued")
    lat.set_ylabel("append p99 at 100 scans/s (ms)")
    lat.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread_by_key(rs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each figure of a run's result over the runs: median, min, max."""
    return {
        k: {
            "median": median([r[k] for r in rs]),
            "min": min(r[k] for r in rs),
            "max": max(r[k] for r in rs),
        }
        for k in rs[0]
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", type=Path, default=None, help="a checkout of the old code")
    ap.add_argument("--big", type=int, default=1_000_000, help="backlog for the stats figures")
    ap.add_argument("--p99-seconds", type=float, default=10.0)
    ap.add_argument("--skip-drain", action="store_true")
    ap.add_argument(
        "--backlog",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="backlog sizes (e.g. 10000,100000,1000000): each drained through the real"
        " processes (CPU per record, the agent's peak RSS against an idle agent), and"
        " append p99 at 100 scans/s at that size, with and without stats() every 0.5 s",
    )
    ap.add_argument("--plot", type=Path, default=None, help="write the backlog plot here (PNG)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--agent-mqtt", default="", help="extra [mqtt] lines, e.g. 'inflight_messages = 32'"
    )
    args = ap.parse_args()
    AGENT_MQTT[0] = args.agent_mqtt.replace("\\n", "\n")
    out: dict[str, Any] = {"records": args.records}
    with tempfile.TemporaryDirectory(prefix="madoguchi-bench-cpu-") as tmp:
        work = Path(tmp)
        seed = work / "seed" / "outbox.db"
        seed.parent.mkdir()
        fill_sql(seed, args.records)
        trees = {"this tree": ROOT}
        if args.base is not None:
            trees["base"] = args.base.resolve()
        for tree in trees.values():  # bytecode as a wheel install has it (core_bench.py)
            compile_all = [sys.executable, "-m", "compileall", "-q", str(tree / "agent")]
            subprocess.run(compile_all, check=True)
        if not args.skip_drain:
            # interleaved (this, base, this, base, ...): the machine's load drifts
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for i in range(args.runs):
                for name, tree in trees.items():
                    r = asyncio.run(one_drain(tree, seed, args.records, work / f"{name}-{i}"))
                    shown = asyncio.run(
                        one_drain(tree, seed, args.records, work / f"{name}-{i}-c", console=True)
                    )
                    r["registry_console_us_per_record"] = shown["registry_us_per_record"]
                    r.update(outbox_path(tree, seed))
                    print(name, {k: round(v, 1) for k, v in r.items()}, flush=True)
                    runs[name].append(r)
            for name, rs in runs.items():
                out[name] = spread_by_key(rs)
        if args.backlog:
            out["agent_idle_rss_mb"] = asyncio.run(idle_rss(ROOT, work / "idle"))
            print("agent idle RSS", round(out["agent_idle_rss_mb"], 1), "MB", flush=True)
            out.update(backlogs(work, args.backlog, args.runs, args.p99_seconds))
            if args.plot is not None:
                plot(out, args.backlog, args.plot)
        for n in dict.fromkeys((args.records, args.big)):  # once each, if equal
            db = work / f"stats-{n}" / "outbox.db"
            db.parent.mkdir()
            fill_sql(db, n)
            out[f"stats_{n}"] = asyncio.run(stats_cost(db))
            for name, tree in trees.items():  # flat under backlog: the outbox side at n
                out[f"outbox_path_{n}_{name}"] = outbox_path(tree, db)["outbox_path_us_per_record"]
                print(f"outbox side at {n} queued, {name}:", out[f"outbox_path_{n}_{name}"])
            print(f"stats at {n}", out[f"stats_{n}"], flush=True)
        db = work / f"stats-{args.big}" / "outbox.db"
        for mode in ("none", "stats", "count"):
            p99 = asyncio.run(append_p99(db, mode, args.p99_seconds))
            out[f"append_p99_ms_{mode}"] = p99
            print(
                f"append p99 with {mode} every 0.5 s at {args.big} queued: {p99:.1f} ms", flush=True
            )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
