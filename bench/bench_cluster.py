"""Registry on AMQP (3-node RabbitMQ cluster, quorum queue) against MQTT (one mosquitto,
shared subscription), in one run: records/s stored *and acked* with 1 and 2 registry
processes, and the registry processes' CPU per record (user + system, from /proc).

Real parts only: tests/support/rabbit.py's cluster on loopback, mosquitto, a PostgreSQL
cluster of its own, `madoguchi registry` processes (`--config` with `transport = "amqp"`,
or `--shared bench`). The load is bench_registry.py's: simulated agents publishing
envelopes over MQTT (QoS 1), a record counts when its ack is back over MQTT.

    python bench/bench_cluster.py [--records 4000] [--agents 100] [--batch 1,10]
                                  [--consumers 1,2,4] [--repeat 2]
                                  [--sessions 100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support

from bench_registry import Mosquitto, Postgres, load  # noqa: E402

from agent.central.amqp import RECORDS_QUEUE, declare_records_queue  # noqa: E402
from agent.testing import LoggedProcess, RegistryProcess  # noqa: E402
from tests.support.rabbit import RabbitCluster  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def amqp_registries(cluster: RabbitCluster, dsn: str, n: int, run: Path) -> list[LoggedProcess]:
    urls = ", ".join(f'"amqp://guest@127.0.0.1:{node.amqp_port}/"' for node in cluster.nodes)
    (run / "pw").write_text("guest\n")
    procs = []
    for i in range(n):
        conf = run / f"reg{i}.toml"
        # each process starts on another node (the list is tried in turn from the first)
        rotated = ", ".join(urls.split(", ")[i % 3 :] + urls.split(", ")[: i % 3])
        conf.write_text(
            f'[broker]\nhost = "127.0.0.1"\nport = {cluster.nodes[0].mqtt_port}\n\n'
            f'[database]\ndsn = "{dsn}"\n\n'
            '[registry]\ntransport = "amqp"\nquiet = true\n\n'
            f'[amqp]\nurl = [{rotated}]\npassword_file = "pw"\nprefetch = 256\n'
        )
        p = LoggedProcess(
            [sys.executable, "-m", "agent", "registry", "--config", str(conf)],
            run / f"reg{i}.log",
        )
        p.start()
        procs.append(p)
    for p in procs:
        p.wait_log("registry consuming", 60)
    return procs


def mqtt_registries(port: int, dsn: str, n: int, run: Path) -> list[LoggedProcess]:
    procs: list[LoggedProcess] = []
    for i in range(n):
        p = RegistryProcess(port, dsn, run / f"reg{i}.log", "--shared", "bench", "--quiet")
        p.start()
        procs.append(p)
    for p in procs:
        p.wait_log("registry consuming", 60)
    return procs


def measure(
    procs: list[LoggedProcess],
    brokers: list[int],
    mqtt_port: int,
    records: int,
    agents: int,
    batch: int,
) -> tuple[float, float, float, int]:
    """(records/s, registry CPU ms per record, broker CPU ms per record, missing);
    `brokers` are the broker pids (every cluster node, or mosquitto)."""
    before = sum(cpu_s(p.pid) for p in procs)
    broker_before = sum(cpu_s(pid) for pid in brokers)
    elapsed, missing = load(mqtt_port, records, agents, batch)
    used = sum(cpu_s(p.pid) for p in procs) - before
    broker_used = sum(cpu_s(pid) for pid in brokers) - broker_before
    done = max(records - missing, 1)
    return done / elapsed, 1000 * used / done, 1000 * broker_used / done, missing


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _sessions(port: int, ids: list[str], *, clean: bool, parallel: int = 25) -> None:
    """Connect each id (MQTT 3.1.1), subscribe to its ack topic at QoS 1 as a station does,
    disconnect. clean=False leaves a persistent session (its queue) behind; clean=True
    removes it."""
    import aiomqtt

    sem = asyncio.Semaphore(parallel)

    async def one(cid: str) -> None:
        async with (
            sem,
            aiomqtt.Client(
                "127.0.0.1",
                port,
                identifier=cid,
                protocol=aiomqtt.ProtocolVersion.V311,
                clean_session=clean,
                timeout=60,
            ) as c,
        ):
            if not clean:
                await c.subscribe(f"madoguchi/v1/mem/{cid}/ack", qos=1)

    await asyncio.gather(*(one(c) for c in ids))


def session_memory(cluster: RabbitCluster, counts: list[int]) -> None:
    """Memory the cluster holds per persistent station session (disconnected, its
    subscription queue kept: what a station whose Pi is off costs), at each count: the
    three nodes' RSS before and after, settled for 5 s; then the sessions are removed."""
    import time

    print(
        f"\n{'persistent sessions':>20} {'cluster RSS MB':>15} {'added MB':>9} "
        f"{'kB/session':>11} {'s to open':>10}"
    )
    pids = [cluster.beam_pid(i) for i in range(len(cluster.nodes))]
    port = cluster.nodes[0].mqtt_port
    held: list[str] = []
    time.sleep(5)
    base = sum(rss_kb(p) for p in pids)
    for n in counts:
        new = [f"mem-{k}" for k in range(len(held), n)]
        t0 = time.monotonic()
        asyncio.run(_sessions(port, new, clean=False))
        took = time.monotonic() - t0
        held += new
        time.sleep(5)
        now = sum(rss_kb(p) for p in pids)
        print(
            f"{n:>20} {now / 1024:>15.1f} {(now - base) / 1024:>9.1f} "
            f"{(now - base) / n:>11.1f} {took:>10.1f}",
            flush=True,
        )
    asyncio.run(_sessions(port, held, clean=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--batch", default="1,10", help="records per message")
    ap.add_argument("--consumers", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=2, help="runs per row: median")
    ap.add_argument(
        "--sessions", default="100,1000", help="persistent sessions to hold ('' = skip)"
    )
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpu(s), {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(f"{args.records} records from {args.agents} agents, {args.batch} per message\n")
    print(
        f"{'transport':<22} {'consumers':>9} {'rec/msg':>7} {'records/s':>10} "
        f"{'CPU ms/rec':>11} {'broker ms/rec':>13} {'missing':>8}"
    )
    work = Path(tempfile.mkdtemp(prefix="madoguchi-bench-cluster-"))
    pg = Postgres()
    cluster = RabbitCluster()
    try:
        cluster.start_all()
        print(f"(3-node cluster started in {cluster.startup_s:.1f} s)", flush=True)
        asyncio.run(declare_records_queue(cluster.nodes[0].url))
        if args.sessions:
            session_memory(cluster, [int(x) for x in args.sessions.split(",")])
            print()
        for transport in ("amqp", "mqtt"):
            for n, batch in (
                (int(x), int(b)) for x in args.consumers.split(",") for b in args.batch.split(",")
            ):
                rates, cpus, bcpus, lost = [], [], [], 0
                for k in range(args.repeat):
                    run = work / f"{transport}-{n}-{batch}-{k}"
                    run.mkdir()
                    dsn = pg.new_dsn()
                    broker = Mosquitto(run) if transport == "mqtt" else None
                    port = broker.port if broker else cluster.nodes[0].mqtt_port
                    procs = (
                        mqtt_registries(port, dsn, n, run)
                        if broker
                        else amqp_registries(cluster, dsn, n, run)
                    )
                    pids = (
                        [broker.proc.pid]
                        if broker
                        else [cluster.beam_pid(i) for i in range(len(cluster.nodes))]
                    )
                    try:
                        rate, cpu, bcpu, missing = measure(
                            procs, pids, port, args.records, args.agents, batch
                        )
                    finally:
                        for p in procs:
                            p.stop()
                        if broker:
                            broker.stop()
                    rates.append(rate)
                    cpus.append(cpu)
                    bcpus.append(bcpu)
                    lost += missing
                name = f"AMQP quorum ({RECORDS_QUEUE})" if transport == "amqp" else "MQTT $share"
                print(
                    f"{name:<22} {n:>9} {batch:>7} {statistics.median(rates):>10.0f} "
                    f"{statistics.median(cpus):>11.3f} {statistics.median(bcpus):>13.3f} "
                    f"{lost:>8}",
                    flush=True,
                )
    finally:
        cluster.stop_all()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
