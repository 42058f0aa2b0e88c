"""`make bench`: the whole suite in one run, on loopback, side by side with the alternatives.

Measures durable ingest (1 and 8 devices), backlog drain against raw paho, latency at
1 / 10 / 100 scans/s, start-to-READY with 0 / 100k / 1M queued records, broker return
to first confirmed record, footprint with every driver family configured, RSS under a
1M-record backlog, TinyDB (JSON and tinydb-sqlite) against the outbox, and outbox
growth and purge. Writes docs/PERFORMANCE.md, docs/perf/*.png and docs/perf/results.json.

    .venv/bin/python bench/run.py [--quick] [--runs 3] [--no-write]

Agent figures come from real `python -m agent run` processes (pty scanners, a real
mosquitto, the reference registry in this process); nothing is simulated but the
scanner's keystrokes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # core_bench, when run as a module

import core_bench as core  # noqa: E402

from agent.central.registry import Stored, tune_gc  # noqa: E402
from agent.contract.records import Read  # noqa: E402
from agent.station.outbox import Outbox, read_stats  # noqa: E402
from agent.testing import (  # noqa: E402
    AgentProcess,
    Broker,
    NotifySocket,
    Pty,
    running_registry,
    serial_scanner,
    write_config,
)

DOCS = ROOT / "docs"
PERF = DOCS / "perf"


def scan_read(i: int, device: str = "ticket-scanner") -> Read:
    """A realistic stored read: ticket text plus its interpretation."""
    return Read(
        device=device,
        kind="barcode",
        data={
            "text": f"1111224100{i:08d}",
            "symbology": None,
            "interpretation": {
                "type": "vaccination_ticket",
                "valid": True,
                "fields": {
                    "kind_code": "1",
                    "round_code": "1",
                    "municipality_code": "112241",
                    "ticket_number": f"00{i:08d}",
                },
                "problems": [],
            },
        },
    )


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def machine(workdir: Path) -> dict[str, Any]:
    info = core.machine()
    df = subprocess.run(
        ["df", "--output=source,fstype", str(workdir)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    info["disk"] = " ".join(df[-1].split()) if len(df) > 1 else "unknown"
    return info


def mosquitto(workdir: Path) -> Broker:
    """A broker with persistence, stopped and started again by the suite; unlimited queues."""
    directory = workdir / f"mosquitto-{time.monotonic_ns()}"
    directory.mkdir()
    if os.geteuid() == 0:  # mosquitto drops to its own user: let it write here
        shutil.chown(directory, "mosquitto")
        os.chmod(workdir, 0o755)
    return Broker(directory, log=False, settings="max_queued_messages 0\n")


def config(
    workdir: Path,
    port: int,
    name: str,
    devices: str = "",
    outbox: str = "resend_after_s = 60",
    log_level: str = "WARNING",
) -> Path:
    return write_config(
        workdir,
        port,
        devices=devices,
        site="bench-site",
        name=name,
        data_dir=workdir / name,
        extra_agent=f'log_level = "{log_level}"',
        telemetry_interval_s=None,
        mqtt="backoff_max_s = 2",
        outbox=outbox,
    )


def serial_device(link: Path) -> str:
    return serial_scanner(link, host_nak=None)


# -- durable ingest -------------------------------------------------------------------------


async def ingest(workdir: Path, records: int, devices: int) -> dict[str, float]:
    """Appends through the outbox as the station makes them: each device awaits its commit."""
    commits: list[int] = []

    class Counting(Outbox):
        def _commit(self, batch):  # type: ignore[no-untyped-def]
            commits.append(len(batch))
            return super()._commit(batch)

    db = workdir / f"ingest-{devices}-{time.monotonic_ns()}.db"
    per_device = records // devices
    async with Counting(db) as ob:

        async def device(d: int) -> None:
            for i in range(per_device):
                await ob.append(scan_read(i, f"dev{d}"))

        t0 = time.perf_counter()
        await asyncio.gather(*(device(d) for d in range(devices)))
        dt = time.perf_counter() - t0
    n = per_device * devices
    return {"records_per_s": n / dt, "records_per_commit": n / len(commits)}


def tinydb_appends(workdir: Path, records: int, backend: str) -> float:
    """Durable TinyDB inserts: fsync (JSON) or commit with synchronous=FULL (tinydb-sqlite)."""
    import sqlite3

    from tinydb import TinyDB
    from tinydb.storages import JSONStorage

    class FsyncJSON(JSONStorage):
        def write(self, data: dict[str, Any]) -> None:
            super().write(data)
            os.fsync(self._handle.fileno())

    path = workdir / f"tinydb-{backend}-{time.monotonic_ns()}"
    if backend == "json":
        db = TinyDB(path, storage=FsyncJSON)
    else:
        from tinydb_sqlite import SQLiteStorage

        class CommittingSQLite(SQLiteStorage):  # type: ignore[misc]
            """tinydb-sqlite never commits by itself; a durable buffer has to."""

            def __init__(self, file: str) -> None:
                conn = sqlite3.connect(file)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                super().__init__(conn)

            def write(self, data: Any) -> None:
                super().write(data)
                self._conn.commit()

        db = TinyDB(str(path), storage=CommittingSQLite)
    reads = [scan_read(i) for i in range(records)]
    t0 = time.perf_counter()
    for i, r in enumerate(reads):
        db.insert({"seq": i + 1, "device": r.device, "kind": r.kind, "data": r.data})
    dt = time.perf_counter() - t0
    db.close()
    return records / dt


# -- drain ----------------------------------------------------------------------------------


async def fill(db: Path, n: int) -> None:
    async with Outbox(db) as ob:
        for start in range(0, n, 5000):
            await asyncio.gather(
                *(ob.append(scan_read(i)) for i in range(start, min(n, start + 5000)))
            )


async def drain(broker: Broker, workdir: Path, backlog: int, seed: Path) -> dict[str, Any]:
    """A pre-filled outbox to the reference registry, acks included; a timeline of stores."""
    name = f"drain{time.monotonic_ns()}"
    cfg = config(workdir, broker.port, name)
    (workdir / name).mkdir()
    shutil.copy(seed, workdir / name / "outbox.db")
    db = workdir / name / "outbox.db"
    count = 0
    done = asyncio.Event()
    first_stored: list[float] = []

    def on_stored(s: Stored) -> None:
        nonlocal count
        if not first_stored:
            first_stored.append(time.perf_counter())
        count += s.new
        if count >= backlog:
            done.set()

    timeline: list[tuple[float, int]] = []
    async with running_registry(
        broker.port,
        workdir / f"{name}-registry.db",
        on_stored=on_stored,
        client_id=f"bench-{name}",
        keep=False,  # as `madoguchi registry` runs: nothing held per record
    ):
        t0 = time.perf_counter()
        agent = core.start_agent(cfg, workdir / f"{name}.log")

        async def sample() -> None:
            while True:
                timeline.append((time.perf_counter() - t0, count))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.wait_for(done.wait(), 900)
            stored_s = time.perf_counter() - t0
            while read_stats(db)["unconfirmed"]:
                agent.check_running()
                await asyncio.sleep(0.02)
            confirmed_s = time.perf_counter() - t0
        finally:
            sampler.cancel()
            agent.stop()
    # from the first record stored to the last confirmed: the peer's backlog rate is taken
    # the same way (first arrival to last, bench_peer.py), with no acks at all
    connected_s = confirmed_s - (first_stored[0] - t0)
    return {
        "stored_per_s": backlog / stored_s,
        "confirmed_per_s": backlog / confirmed_s,
        "connected_confirmed_per_s": (backlog - 1) / connected_s,
        "timeline": timeline,
    }


# -- latency --------------------------------------------------------------------------------


async def latency(broker: Broker, workdir: Path, rate: float, scans: int) -> dict[str, Any]:
    sub = workdir / f"lat-{rate:g}-{time.monotonic_ns()}"
    sub.mkdir()
    return await core.latency(broker.port, sub, scans, rate)


# -- start to READY, RSS under backlog --------------------------------------------------------


async def ready(
    broker: Broker, workdir: Path, seed: Path | None, watch_s: float
) -> dict[str, float]:
    """Start to READY=1 on a NOTIFY_SOCKET we own, twice: first after a crash (the agent
    started once and killed with SIGKILL once READY: no clean-close mark, the WAL as the
    kill left it, the configuration check cached as at any station that had run), then
    restarted after a clean stop (the mark lets it skip the check). RSS while the backlog
    is sent, after the second."""
    name = f"ready{time.monotonic_ns()}"
    pty = Pty(workdir / f"tty-{name}")
    # INFO: the bench waits for the agent's "quick_check ok" line
    cfg = config(workdir, broker.port, name, serial_device(pty.link), log_level="INFO")
    (workdir / name).mkdir()
    if seed is not None:
        os.link(seed, workdir / name / "outbox.db")  # the same file every run: no copy
    notify = NotifySocket()
    log = workdir / f"{name}.log"

    async def start() -> tuple[AgentProcess, float]:
        t0 = time.perf_counter()
        agent = AgentProcess(cfg, log, env=notify.env(), cwd=ROOT)
        agent.start()
        assert agent.proc is not None
        if not await asyncio.to_thread(notify.wait_ready, agent.proc, 120):
            agent.check_running()
            agent.close()
            raise SystemExit("no READY=1 within 120 s")
        return agent, time.perf_counter() - t0

    def stop(agent: AgentProcess) -> None:
        code = agent.signal(signal.SIGTERM)
        if code != 0:
            raise SystemExit(f"agent exited {code} on SIGTERM: see {log}")

    try:
        # a crash is of a station that was running: without this first start, the timed
        # one would also be a first start (a configuration check in a child process,
        # ~0.45 s here, that a restart after a crash reads from its cache)
        proc, _ = await start()
        proc.kill9()
        proc, unclean_s = await start()
        # the check runs after READY; a stop before it has finished leaves no mark
        # (the file was never vouched for), and the second start would check again
        await asyncio.to_thread(proc.wait_log, "quick_check ok", 120, this_run=True)
        stop(proc)
        if not (workdir / name / "outbox.db.clean").exists():
            raise SystemExit(f"no clean-close mark after SIGTERM: see {log}")
        proc, ready_s = await start()
        try:
            rss: list[int] = []
            end = time.monotonic() + watch_s
            while time.monotonic() < end:
                rss.append(core.proc_rss(proc.pid))
                await asyncio.sleep(0.25)
            proc.check_running()
        finally:
            stop(proc)
    finally:
        notify.close()
        pty.close()
    return {
        "ready_s": ready_s,
        "ready_unclean_s": unclean_s,
        "rss_max_bytes": max(rss),
        "rss_last_bytes": rss[-1],
    }


async def broker_return(workdir: Path, down_s: float) -> float:
    """Broker stopped while scans go on; seconds from its return to the first confirmation."""
    broker = mosquitto(workdir)
    broker.start()
    name = f"ret{time.monotonic_ns()}"
    pty = Pty(workdir / f"tty-{name}")
    cfg = config(workdir, broker.port, name, serial_device(pty.link))
    log = workdir / f"{name}.log"
    db = workdir / name / "outbox.db"
    async with running_registry(
        broker.port, workdir / f"{name}-registry.db", client_id=f"bench-{name}"
    ):
        agent = core.start_agent(cfg, log)
        try:
            await asyncio.sleep(2.0)
            agent.check_running()
            broker.stop()
            await asyncio.sleep(down_s / 2)
            for i in range(5):  # scans while the broker is away: ACKed from the outbox
                pty.scan(f"9999000000{i:08d}")
                if not await pty.aread(1, 10):
                    raise SystemExit("no host ACK within 10 s")
            await asyncio.sleep(down_s / 2)
            confirmed = read_stats(db)["confirmed"]
            broker.start()
            t0 = time.perf_counter()
            while read_stats(db)["confirmed"] == confirmed:
                agent.check_running()
                if time.perf_counter() - t0 > 120:
                    raise SystemExit("nothing confirmed within 120 s of the broker's return")
                await asyncio.sleep(0.005)
            return time.perf_counter() - t0
        finally:
            agent.stop()
            broker.stop()
            pty.close()


# -- footprint ------------------------------------------------------------------------------


async def footprint(broker: Broker, workdir: Path, seconds: float) -> dict[str, float]:
    """Idle agent with a serial, a keyboard-mode, a PC/SC and a camera device configured."""
    name = f"foot{time.monotonic_ns()}"
    pty = Pty(workdir / f"tty-{name}")
    devices = serial_device(pty.link) + (
        '\n[[devices]]\nname = "hid-scanner"\nprofile = "generic-hid-scanner-us"\n'
        'path = "/dev/input/by-id/usb-none-event-kbd"\nhotplug_wait_s = 60\n'
        '\n[[devices]]\nname = "card-reader"\nprofile = "generic-pcsc-reader"\n'
        'reader = "Bench Reader *"\n'
        '\n[[devices]]\nname = "camera"\nprofile = "generic-uvc-webcam"\n'
        'device = "/dev/video-bench-none"\n'
    )
    cfg = config(workdir, broker.port, name, devices)
    log = workdir / f"{name}.log"
    agent = core.start_agent(cfg, log)
    try:
        await asyncio.sleep(4)
        agent.check_running()
        c0 = core.proc_cpu_s(agent.pid)
        await asyncio.sleep(seconds)
        cpu = (core.proc_cpu_s(agent.pid) - c0) / seconds
        rss = core.proc_rss(agent.pid)
        modules = Path(f"/proc/{agent.pid}/maps").read_text()
    finally:
        agent.stop()
        pty.close()
    loaded = [lib for lib in ("serial", "evdev", "smartcard", "zxingcpp") if lib in modules]
    return {"rss_bytes": rss, "cpu_share": cpu, "native_libs_mapped": len(loaded)}


_IMPORT_STEPS = """
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024
steps = [("Python interpreter", rss())]
import asyncio, ssl, socket, subprocess
steps.append(("asyncio, ssl, sockets, subprocess", rss()))
import sqlite3
steps.append(("sqlite3", rss()))
import agent.config
steps.append(("madoguchi's configuration classes and loader, records, errors", rss()))
import aiomqtt
steps.append(("aiomqtt, paho-mqtt", rss()))
import agent.cli.main, agent.station.app
agent.cli.main.build_parser("run")
steps.append(("the rest of what `run` imports (supervisor, uplink, outbox, drivers)", rss()))
print(json.dumps(steps))
"""


def import_breakdown() -> list[tuple[str, int]]:
    """RSS after each layer of imports, in the order the agent loads them."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_STEPS], cwd=ROOT, check=True, capture_output=True
    ).stdout
    return [(name, int(b)) for name, b in json.loads(out)]


# -- outbox growth --------------------------------------------------------------------------


async def growth(workdir: Path, n: int) -> dict[str, float]:
    db = workdir / "growth.db"

    def size() -> int:
        return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())

    await fill(db, n)
    async with Outbox(db) as ob:
        await ob.stats()
    after_fill = size()
    async with Outbox(db) as ob:
        batch = await ob.next_batch(n, resend_after_s=0)
        await ob.confirm([r.id for r in batch])
        purged = await ob.purge(retention_days=0)
    after_purge = size()
    await fill(db, n)
    after_refill = size()
    return {
        "records": n,
        "bytes_per_record": after_fill / n,
        "purged": purged,
        "bytes_after_purge": after_purge,
        "bytes_after_fill": after_fill,
        "bytes_after_refill": after_refill,
    }


# -- the run --------------------------------------------------------------------------------


async def repeat(runs: int, fn: Callable[[], Awaitable[Any]], label: str) -> list[Any]:
    out = []
    for i in range(runs):
        print(f"  {label}: run {i + 1}/{runs}", file=sys.stderr, flush=True)
        out.append(await fn())
    return out


async def suite(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    runs = 1 if q else args.runs
    core.compile_code(ROOT)
    sizes = {
        "ingest": 500 if q else 2000,
        "backlog": 5000 if q else 100_000,
        "ready": [0, 2000, 20_000] if q else [0, 100_000, 1_000_000],
        "tinydb": [200, 400] if q else [1000, 2000],
        "outbox_vs_tinydb": 2000 if q else 10_000,
        "scans": {1.0: 5, 10.0: 30, 100.0: 200} if q else {1.0: 20, 10.0: 200, 100.0: 1000},
    }
    out: dict[str, Any] = {"sizes": {k: v for k, v in sizes.items() if k != "scans"}}
    out["sizes"]["scans"] = {str(k): v for k, v in sizes["scans"].items()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="madoguchi-suite-", dir=args.tmp) as tmp:
        workdir = Path(tmp)
        out["machine"] = machine(workdir)
        brokers: list[Broker] = []

        def fresh_broker() -> Broker:
            """A broker per section: registries' persistent sessions do not pile up queues."""
            for b in brokers:
                b.stop()
            brokers.append(mosquitto(workdir))
            brokers[-1].start()
            return brokers[-1]

        try:
            print("durable ingest", file=sys.stderr)
            for devices in (1, 8):
                res = await repeat(
                    runs,
                    lambda d=devices: ingest(workdir, sizes["ingest"], d),
                    f"{devices} device(s)",
                )
                out[f"ingest_{devices}"] = {
                    "records_per_s": spread([r["records_per_s"] for r in res]),
                    "records_per_commit": spread([r["records_per_commit"] for r in res]),
                }

            print("TinyDB against the outbox", file=sys.stderr)
            n_cmp = sizes["outbox_vs_tinydb"]
            res = await repeat(runs, lambda: ingest(workdir, n_cmp, 1), f"outbox {n_cmp}")
            out["outbox_appends"] = {
                "records": n_cmp,
                "records_per_s": spread([r["records_per_s"] for r in res]),
            }
            tiny: dict[str, Any] = {}
            for backend in ("json", "sqlite"):
                for n in sizes["tinydb"]:
                    print(f"  tinydb {backend} {n}", file=sys.stderr, flush=True)
                    tiny[f"{backend}_{n}"] = tinydb_appends(workdir, n, backend)
            out["tinydb"] = tiny

            print("backlog drain", file=sys.stderr)
            broker = fresh_broker()
            seed = workdir / "backlog-seed.db"
            await fill(seed, sizes["backlog"])
            res = await repeat(
                runs,
                lambda: drain(broker, workdir, sizes["backlog"], seed),
                f"drain {sizes['backlog']}",
            )
            recs = await core.fill_outbox(workdir / "raw-seed.db", sizes["backlog"])
            raw = await repeat(
                runs,
                lambda: core.raw_paho_through_registry(broker.port, workdir, recs),
                "raw paho",
            )
            out["drain"] = {
                "records": sizes["backlog"],
                "stored_per_s": spread([r["stored_per_s"] for r in res]),
                "confirmed_per_s": spread([r["confirmed_per_s"] for r in res]),
                "connected_confirmed_per_s": spread([r["connected_confirmed_per_s"] for r in res]),
                "timeline": res[len(res) // 2]["timeline"],
            }
            out["raw_paho"] = {
                "puback_per_s": spread([r["rate_puback"] for r in raw]),
                "stored_per_s": spread([r["rate_stored"] for r in raw]),
            }
            out["drain_ratio"] = {
                "vs_puback": out["drain"]["confirmed_per_s"]["median"]
                / out["raw_paho"]["puback_per_s"]["median"],
                "vs_stored": out["drain"]["confirmed_per_s"]["median"]
                / out["raw_paho"]["stored_per_s"]["median"],
            }

            print("latency", file=sys.stderr)
            broker = fresh_broker()
            lat: dict[str, Any] = {}
            for rate, scans in sizes["scans"].items():
                res = await repeat(
                    runs, lambda r=rate, s=scans: latency(broker, workdir, r, s), f"{rate:g}/s"
                )
                lat[f"{rate:g}"] = {
                    "scans": scans,
                    **{
                        f"{what}_{p}": spread([r[f"{what}_ms"][p] for r in res])
                        for what in ("ack", "registry")
                        for p in ("p50", "p99", "p99.9")
                    },
                }
            out["latency"] = lat

            print("start to READY", file=sys.stderr)
            broker = fresh_broker()
            ready_out: dict[str, Any] = {}
            for n in sizes["ready"]:
                seed_n: Path | None = None
                if n:
                    seed_n = workdir / f"ready-seed-{n}.db"
                    print(f"  filling {n} records", file=sys.stderr, flush=True)
                    await fill(seed_n, n)
                res = await repeat(
                    runs, lambda s=seed_n: ready(broker, workdir, s, 6.0), f"READY with {n}"
                )
                ready_out[str(n)] = {
                    "ready_s": spread([r["ready_s"] for r in res]),
                    "ready_unclean_s": spread([r["ready_unclean_s"] for r in res]),
                    "rss_max_bytes": spread([r["rss_max_bytes"] for r in res]),
                }
                if seed_n is not None:
                    with contextlib.suppress(OSError):
                        seed_n.unlink()
            out["ready"] = ready_out

            print("broker return", file=sys.stderr)
            res = await repeat(runs, lambda: broker_return(workdir, 3.0), "broker return")
            out["broker_return_s"] = spread(res)

            print("footprint", file=sys.stderr)
            res = await repeat(
                runs, lambda: footprint(broker, workdir, 5.0 if q else 10.0), "all driver families"
            )
            out["footprint"] = {
                "rss_bytes": spread([r["rss_bytes"] for r in res]),
                "cpu_share": spread([r["cpu_share"] for r in res]),
                "imports": import_breakdown(),
            }

            print("outbox growth", file=sys.stderr)
            out["growth"] = await growth(workdir, 5000 if q else 100_000)
        finally:
            for b in brokers:
                b.stop()
    out["suite_s"] = time.perf_counter() - started
    out["quick"] = q
    out["runs"] = runs
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one run (a smoke test)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (min/median/max)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/")
    ap.add_argument("--tmp", default=None, help="directory for the databases (default: /tmp)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite docs/PERFORMANCE.md from docs/perf/results.json (after editing "
        "bench/subsystems.md or report.py), measuring nothing",
    )
    a = ap.parse_args()
    import report

    if a.report_only:
        saved = json.loads((PERF / "results.json").read_text())
        if saved["machine"].get("disk", "unknown") == "unknown":  # runs before df was read right
            saved["machine"]["disk"] = machine(Path(a.tmp or tempfile.gettempdir()))["disk"]
        report.write(saved, DOCS / "PERFORMANCE.md", PERF)
        raise SystemExit(0)
    tune_gc()  # the registry hosted here runs as `madoguchi registry` does
    result = asyncio.run(suite(a))

    if a.no_write:
        print(json.dumps({k: v for k, v in result.items() if k != "drain"}, indent=2))
    else:
        report.write(result, DOCS / "PERFORMANCE.md", PERF)
        print(f"wrote {DOCS / 'PERFORMANCE.md'} in {result['suite_s']:.0f} s", file=sys.stderr)
